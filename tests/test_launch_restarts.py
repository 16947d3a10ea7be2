"""`asgd launch` when processes die: a worker killed with SIGKILL is started again with its
rank and the run ends ok; with run.max_restarts 0 it ends failed; a server killed with SIGKILL
is started again with --resume and training goes on from its checkpoint, never from before it;
`asgd launch --resume RUN` goes on with a finished run in the same run directory.

The kills are placed by the workers' own progress (a fixed step or version read from
metrics.jsonl), not by wall time, so each test kills at the same point of training."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asgd.core.checkpoint import load_checkpoint
from asgd.metrics import read_metrics
from tests.conftest import REPO

BUDGET = 600               # run.max_updates
KILL_AT = 200              # the version at which a process is killed
RUN_TIMEOUT_S = 300.0

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def children(pid: int) -> list[tuple[int, list[str]]]:
    """(pid, argv) of the processes whose parent is ``pid``."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            argv = Path(f"/proc/{d}/cmdline").read_bytes().decode().split("\0")
        except (OSError, IndexError):
            continue
        if int(stat[1]) == pid:
            out.append((int(d), argv))
    return out


def child(launcher: int, module: str, rank: int | None = None,
          flag: str = "--rank") -> int | None:
    """The launcher's child ``python -m <module>`` (with ``<flag> <rank>``: a worker's rank,
    a server's ``--shard``)."""
    for pid, argv in children(launcher):
        if "-m" in argv and argv[argv.index("-m") + 1] == module and \
                (rank is None or argv[argv.index(flag) + 1] == str(rank)):
            return pid
    return None


def launch_and_kill(env: dict, cwd: Path, args: list[str], module: str | None,
                    run_dir: Path, rank: int | None = None, at_version: int = KILL_AT,
                    flag: str = "--rank", after_kill=None):
    """Run `asgd launch args` and, once a worker has logged a step at ``at_version`` or
    later, SIGKILL its child ``python -m <module>`` (the worker of ``rank``, or with ``flag``
    "--shard" the server shard), then call ``after_kill()``. Returns the finished process's
    (returncode, stdout, stderr) and whether it killed."""
    launcher = subprocess.Popen([sys.executable, "-m", "asgd.cli", "launch", "--quiet", *args],
                                cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    killed = False
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        metrics = run_dir / "metrics.jsonl"
        while module is not None and not killed and launcher.poll() is None:
            assert time.monotonic() < deadline, "the run did not reach the kill point"
            steps = [r for r in read_metrics(metrics) if r["kind"] == "worker_step"]
            if steps and max(r["version"] for r in steps) >= at_version:
                pid = child(launcher.pid, module, rank, flag)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    killed = True
                    if after_kill is not None:
                        after_kill()
            time.sleep(0.02)
        out, err = launcher.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(timeout=10)
    return launcher.returncode, out, err, killed


def kinds(records: list[dict], kind: str) -> list[dict]:
    return [r for r in records if r["kind"] == kind]


def test_a_killed_worker_is_restarted_and_the_run_ends_ok(make_config, child_env, tmp_path,
                                                           mnist1d_cached):
    config = make_config(run={"max_updates": BUDGET, "out_dir": str(tmp_path / "runs"),
                              "name": "wk"})
    run_dir = tmp_path / "runs" / "wk"
    rc, out, err, killed = launch_and_kill(child_env, tmp_path, ["--config", str(config)],
                                           "worker", run_dir, rank=0)
    assert killed
    assert rc == 0, out + err
    assert "worker 0 died (exit -9, SIGKILL)" in err and "restarting worker 0" in err, err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["failures"] == []
    assert [(d["process"], d["rank"], d["exit_code"], d["signal"]) for d in summary["deaths"]] \
        == [("worker 0", 0, -9, "SIGKILL")]
    assert [(r["process"], r["rank"]) for r in summary["restarts"]] == [("worker 0", 0)]
    assert summary["version"] >= BUDGET

    records = read_metrics(run_dir / "metrics.jsonl")
    (died,) = kinds(records, "worker_died")
    (restarted,) = kinds(records, "worker_restarted")
    assert (died["worker"], died["rank"], died["exit_code"]) == ("w0", 0, -9)
    assert restarted["rank"] == 0 and restarted["t"] >= died["t"]
    # the new w0 said hello again (same name, same shard) and finished the run with w1
    done = kinds(records, "worker_done")
    assert sorted(r["worker"] for r in done) == ["w0", "w1"]
    assert all(r["reason"] == "max_updates" for r in done), done
    # ... starting from the server's weights of the moment, not from the initial ones
    connected = re.findall(r"w0: connected at version (\d+)",
                           (run_dir / "logs" / "worker-0.log").read_text())
    assert len(connected) == 2 and int(connected[1]) >= KILL_AT, connected


def test_with_no_restarts_a_dead_worker_fails_the_run(make_config, child_env, tmp_path,
                                                       mnist1d_cached):
    """run.max_restarts 0: the death is reported and the run ends failed (the other worker
    still trains to the budget)."""
    config = make_config(run={"max_updates": 300, "max_restarts": 0,
                              "out_dir": str(tmp_path / "runs"), "name": "norestart"})
    env = dict(child_env, ASGD_FAULT="exit:20:0")
    rc, out, err, _ = launch_and_kill(env, tmp_path, ["--config", str(config)], None,
                                      tmp_path / "runs" / "norestart")
    assert rc == 1, out + err
    assert "worker 0 died (exit 5)" in err and "run.max_restarts is 0" in err, err
    summary = json.loads((tmp_path / "runs" / "norestart" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["failures"] == ["worker 0 died (exit 5)"]
    assert len(summary["deaths"]) == 1 and summary["restarts"] == []


def test_an_injected_fault_fires_once_a_restarted_worker_trains_on(make_config, child_env,
                                                                   tmp_path, mnist1d_cached):
    """$ASGD_FAULT crashes worker 0 at step 20; its restart runs without the switch."""
    config = make_config(run={"max_updates": 300, "max_restarts": 1,
                              "out_dir": str(tmp_path / "runs"), "name": "once"})
    env = dict(child_env, ASGD_FAULT="exit:20:0")
    rc, out, err, _ = launch_and_kill(env, tmp_path, ["--config", str(config)], None,
                                      tmp_path / "runs" / "once")
    assert rc == 0, out + err
    summary = json.loads((tmp_path / "runs" / "once" / "summary.json").read_text())
    assert summary["status"] == "ok"
    assert [d["exit_code"] for d in summary["deaths"]] == [5]
    assert len(summary["restarts"]) == 1


def test_a_killed_server_is_restarted_from_its_checkpoint(make_config, child_env, tmp_path,
                                                          mnist1d_cached):
    """The server is killed at version >= 200 with a checkpoint every 100 updates: it comes
    back with --resume from its last checkpoint, the workers find it, notice the version went
    back and take its weights; no version below the checkpoint is seen after the restart, and
    the run reaches its budget and ends ok."""
    config = make_config(run={"max_updates": BUDGET, "out_dir": str(tmp_path / "runs"),
                              "name": "sv"},
                         server={"checkpoint_every": 100},
                         worker={"request_timeout_s": 3.0, "reconnect_timeout_s": 120.0})
    run_dir = tmp_path / "runs" / "sv"
    rc, out, err, killed = launch_and_kill(child_env, tmp_path, ["--config", str(config)],
                                           "server", run_dir)
    assert killed
    assert rc == 0, out + err
    assert "server died (exit -9, SIGKILL)" in err and "restarting server from its checkpoint" \
        in err, err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok", summary
    assert [d["process"] for d in summary["deaths"]] == ["server"]
    assert [r["process"] for r in summary["restarts"]] == ["server"]

    records = read_metrics(run_dir / "metrics.jsonl")
    (died,) = kinds(records, "server_died")
    (restarted,) = kinds(records, "server_restarted")
    resumed = restarted["resumed_version"]
    assert restarted["resume"] is True and resumed is not None and resumed >= 100
    assert "checkpoint_error" not in restarted
    before = [r["version"] for r in records if r["t"] <= died["t"] and r["kind"] == "worker_step"]
    assert before and resumed <= max(before) + 100
    after = [r["version"] for r in records if r["t"] >= restarted["t"] and
             r["kind"] in ("server", "worker_rejoined", "worker_step")]
    assert after and min(after) >= resumed, (resumed, sorted(after)[:5])
    rejoined = kinds(records, "worker_rejoined")
    assert {r["worker"] for r in rejoined} == {"w0", "w1"}
    assert all(r["version"] >= resumed for r in rejoined)
    ckpt = load_checkpoint(run_dir / "checkpoint")
    assert ckpt.version >= BUDGET and summary["test_accuracy"] is not None


def test_a_killed_shard_that_cannot_have_its_port_back_moves_and_workers_follow(
        make_config, child_env, tmp_path, mnist1d_cached):
    """server.shards 2, shard 1 killed, and its port taken by someone else at once: the
    launcher starts it on a new port and writes it to server-1.addr; the workers, whose
    requests time out, read their address files again, switch to the new endpoint, say hello
    to both shards again and train on to the budget."""
    config = make_config(run={"max_updates": BUDGET, "out_dir": str(tmp_path / "runs"),
                              "name": "moved"},
                         server={"checkpoint_every": 100, "shards": 2},
                         worker={"request_timeout_s": 3.0, "reconnect_timeout_s": 120.0})
    run_dir = tmp_path / "runs" / "moved"
    squatter = socket.socket()
    old = {}

    def take_the_port():
        old["endpoint"] = (run_dir / "server-1.addr").read_text().strip()
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 20.0     # the killed process's socket closes soon
        while True:                            # (the restart takes seconds: python, torch)
            try:
                squatter.bind(("127.0.0.1", int(old["endpoint"].rsplit(":", 1)[1])))
                break
            except OSError:
                assert time.monotonic() < deadline, "the killed shard's port stayed taken"
                time.sleep(0.01)
        squatter.listen(1)

    try:
        rc, out, err, killed = launch_and_kill(child_env, tmp_path, ["--config", str(config)],
                                               "server", run_dir, rank=1, flag="--shard",
                                               after_kill=take_the_port)
    finally:
        squatter.close()
    assert killed
    assert rc == 0, out + err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok", summary
    assert [(d["process"], d["shard"]) for d in summary["deaths"]] == [("server shard 1", 1)]
    records = read_metrics(run_dir / "metrics.jsonl")
    (restarted,) = kinds(records, "server_restarted")
    new = restarted["endpoint"]
    assert restarted["shard"] == 1 and new != old["endpoint"]
    assert (run_dir / "server-1.addr").read_text().strip() == new
    rejoined = kinds(records, "worker_rejoined")
    assert {r["worker"] for r in rejoined} == {"w0", "w1"}
    assert all(new in r["endpoint"].split(",") for r in rejoined), rejoined
    for w in ("w0", "w1"):
        log = (run_dir / "logs" / f"worker-{w[1]}.log").read_text()
        assert "the server now listens at" in log and new in log
    assert load_checkpoint(run_dir / "checkpoint").version >= BUDGET


def test_launch_resume_goes_on_with_a_run(make_config, child_env, tmp_path, mnist1d_cached):
    """A run of 300 updates, then `asgd launch --resume RUN --set run.max_updates=600`: the
    server starts from the run's checkpoint, the run directory is the same, metrics.jsonl is
    appended to, and a new summary is written (the first kept as summary-1.json)."""
    config = make_config(run={"max_updates": 300, "out_dir": str(tmp_path / "runs"),
                              "name": "first"})
    run_dir = tmp_path / "runs" / "first"
    rc, out, err, _ = launch_and_kill(child_env, tmp_path, ["--config", str(config)], None,
                                      run_dir)
    assert rc == 0, out + err
    first = load_checkpoint(run_dir / "checkpoint").version
    lines_before = len((run_dir / "metrics.jsonl").read_text().splitlines())

    rc, out, err, _ = launch_and_kill(child_env, tmp_path, ["--resume", str(run_dir), "--set",
                                                            "run.max_updates=600"], None, run_dir)
    assert rc == 0, out + err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["first"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["resumed_from"] == [first]
    assert json.loads((run_dir / "summary-1.json").read_text())["status"] == "ok"
    assert load_checkpoint(run_dir / "checkpoint").version >= 600
    records = read_metrics(run_dir / "metrics.jsonl")
    assert len(records) > lines_before
    (resumed,) = kinds(records, "launch_resumed")
    assert resumed["versions"] == [first]
    later = records[records.index(resumed):]
    steps = [r["version"] for r in later if r["kind"] == "worker_step"]
    assert steps and min(steps) >= first        # trained on from the checkpoint
    assert "max_updates: 600" in (run_dir / "config.yaml").read_text()


def test_launch_resume_without_a_checkpoint_fails_and_changes_nothing(make_config, child_env,
                                                                      tmp_path):
    run_dir = tmp_path / "runs" / "empty"
    run_dir.mkdir(parents=True)
    config = make_config()
    (run_dir / "config.yaml").write_text(Path(config).read_text())
    result = subprocess.run([sys.executable, "-m", "asgd.cli", "launch", "--resume",
                             str(run_dir)], cwd=REPO, env=child_env, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 1
    assert "nothing to resume" in result.stderr and "no checkpoint" in result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]
