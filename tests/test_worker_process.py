"""Real worker processes: they train against a real server, refuse a model that differs from
the server's (exit 2), and give up on a server that is not there (exit 3)."""
from __future__ import annotations

import signal
import time

from asgd.metrics import read_metrics
from asgd.core.checkpoint import load_checkpoint

WORKER_TIMEOUT_S = 75


# Port 9 (discard) on loopback: a privileged port no test binds, so nothing listens there.
NOBODY = "tcp://127.0.0.1:9"


def test_two_workers_push_until_the_budget(start_server, make_config, processes, clients,
                                           tmp_path):
    """The version equals the number of acknowledged pushes, and each worker's steps show up
    in the server's per-worker counts."""
    config = make_config(run={"workers": 2, "max_updates": 60, "max_seconds": 600},
                         worker={"log_every": 5})
    server = start_server(config)
    run_dir = tmp_path / "run"
    workers = [processes.spawn(["-m", "worker", "--config", str(config), "--server",
                                server.endpoint, "--rank", str(r), "--run-dir", str(run_dir)],
                               tmp_path / f"worker-{r}.log")
               for r in range(2)]
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    for r, w in enumerate(workers):
        code = w.wait(timeout=max(1.0, deadline - time.monotonic()))
        assert code == 0, (tmp_path / f"worker-{r}.log").read_text()
    stats = clients(server.endpoint, "observer").stats()
    assert stats["version"] == stats["updates_applied"] >= 60
    assert stats["updates_dropped"] == 0
    assert set(stats["workers"]) == {"w0", "w1"}
    assert sum(w["pushes"] for w in stats["workers"].values()) == stats["updates_applied"]
    assert sum(stats["staleness_histogram"].values()) == stats["updates_applied"]
    done = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "worker_done"]
    assert sorted(r["worker"] for r in done) == ["w0", "w1"]
    assert {r["worker"]: r["step"] for r in done} == \
        {w: s["pushes"] for w, s in stats["workers"].items()}
    assert all(r["reason"] == "max_updates" for r in done)
    assert server.stop(signal.SIGTERM) == 0
    assert load_checkpoint(server.run_dir / "checkpoint").version == stats["version"]


def test_worker_with_a_different_model_exits_2(start_server, processes, make_config):
    server = start_server(make_config())                       # channels 8
    result = processes.run(["-m", "worker", "--config", str(make_config()), "--server",
                            server.endpoint, "--rank", "0", "--set", "model.args.channels=4"],
                           timeout=WORKER_TIMEOUT_S)
    assert result.returncode == 2, result.stderr
    assert "does not match the server's" in result.stderr
    assert "worker's conv1.weight float32[4, 1, 5], server's conv1.weight float32[8, 1, 5]" \
        in result.stderr
    assert "conv1.weight" in result.stderr                      # it shows what differs
    assert server.popen.poll() is None                          # the server is unharmed


def test_worker_without_a_server_exits_3(processes, make_config, mnist1d_cached):
    config = make_config(worker={"request_timeout_s": 0.5, "reconnect_timeout_s": 1.5})
    endpoint = NOBODY
    result = processes.run(["-m", "worker", "--config", str(config), "--server", endpoint,
                            "--rank", "0"], timeout=WORKER_TIMEOUT_S)
    assert result.returncode == 3, result.stderr
    assert endpoint in result.stderr
    assert "gave up: no answer from the server at" in result.stderr
    assert "for 1.5 s (worker.reconnect_timeout_s)" in result.stderr


def test_worker_with_a_bad_config_key_fails_naming_it(processes, make_config):
    result = processes.run(["-m", "worker", "--config", str(make_config()), "--server",
                            "tcp://127.0.0.1:1", "--set", "worker.batchsize=10"], timeout=60)
    assert result.returncode != 0
    assert "worker.batchsize" in result.stderr
