"""`asgd launch --on ray`: the default run on a local Ray instance of two CPUs trains to the
accuracy bar and leaves the run directory of a local launch; on a running Ray cluster
(`ray start --head`, two CPUs and two declared GPUs, reached with --address) each worker gets
a GPU of its own, and a server killed with SIGKILL and a worker that crashes ($ASGD_FAULT) are
restarted by Ray, the server from its checkpoint, and the run still ends ok above the bar;
and the errors: --address or --num-cpus without --on ray, an address nobody answers at, bad
worker.resources and server.resources, too few CPUs for the run.

The Ray tests need the `ray` extra (pip install -e '.[ray]') and are skipped without it. Every
Ray process a test starts lives in a session of its own (the launcher's, or `ray start`'s):
the test checks what is left of that session at its end and kills it (SIGTERM, then SIGKILL,
bounded). Ray's files go to a temporary folder of the test's own ($RAY_TMPDIR, --temp-dir),
removed afterwards.

    python -m pytest -q tests/test_ray.py -s     # -s: the runs' accuracy and wall time
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from asgd.config import load_config, split_batch
from asgd.core.checkpoint import load_checkpoint
from asgd.metrics import read_metrics
from tests.conftest import DEFAULT_CONFIG

RUN_TIMEOUT_S = 400.0
RAY_START_TIMEOUT_S = 60.0


# ----------------------------------------------------------------------------------------------
# sessions: every process a test starts, and every process those start

def session_pids(sid: int) -> list[int]:
    """The processes of session ``sid`` (from /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(stat[3]) == sid and stat[0] != "Z":
            out.append(int(d))
    return out


def end_session(sid: int, wait_s: float = 15.0, term_s: float = 5.0) -> list[int]:
    """Wait up to ``wait_s`` for session ``sid`` to be empty, then SIGTERM what is left and
    wait up to ``term_s``, then SIGKILL and wait up to 5 s. Returns the processes that had to
    be signalled."""
    deadline = time.monotonic() + wait_s
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = session_pids(sid)
    for sig, grace in ((signal.SIGTERM, term_s), (signal.SIGKILL, 5.0)):
        for pid in session_pids(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.1)
    return left


def argv_of(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def visible_gpus(pid: int) -> str | None:
    """CUDA_VISIBLE_DEVICES in the environment of process ``pid``."""
    for item in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0"):
        if item.startswith("CUDA_VISIBLE_DEVICES="):
            return item.split("=", 1)[1]
    return None


def run_process(sid: int, module: str, run_dir: Path) -> int | None:
    """The ``python -m <module>`` of the run in ``run_dir`` (a server or worker an actor
    started), among session ``sid``'s processes."""
    for pid in session_pids(sid):
        argv = argv_of(pid)
        if "-m" in argv and argv[argv.index("-m") + 1] == module and str(run_dir) in argv:
            return pid
    return None


# ----------------------------------------------------------------------------------------------
# fixtures

@pytest.fixture
def ray_installed():
    return pytest.importorskip("ray")


@pytest.fixture
def ray_tmp():
    """A short temporary folder for Ray's files (its socket paths must stay short)."""
    path = tempfile.mkdtemp(prefix="asgd-ray-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ray_env(child_env, ray_tmp):
    """The environment of the launcher and of `ray start`: Ray's files in ``ray_tmp``, no
    usage report, token authentication with a token of the test's own (so nothing is read
    from or written to ~/.ray), and none of the shell's Ray or asgd cluster variables."""
    env = {k: v for k, v in child_env.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "ASGD_FAULT", "ASGD_WORKERS")}
    return dict(env, RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
                RAY_AUTH_TOKEN=secrets.token_hex(32))


def ray_cli() -> list[str]:
    script = Path(sys.executable).with_name("ray")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ray.scripts.scripts"]


@dataclass
class Cluster:
    address: str
    sid: int          # the session of its processes (and of the actors' children)


@pytest.fixture
def ray_cluster(ray_installed, ray_env, ray_tmp):
    """A running Ray cluster of one node with two CPUs and two GPUs, as `ray start --head`
    makes one, in a session of its own. The GPUs are declared, not real: Ray hands them out
    by setting CUDA_VISIBLE_DEVICES, and a worker that finds no CUDA trains on the CPU.
    Stopped at the end: its whole session, bounded."""
    head = subprocess.Popen([*ray_cli(), "start", "--head", "--num-cpus", "2", "--num-gpus", "2",
                             "--port", "0",
                             "--include-dashboard=false", "--disable-usage-stats",
                             "--temp-dir", ray_tmp],
                            env=ray_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = head.communicate(timeout=RAY_START_TIMEOUT_S)
        found = re.search(r"ray start --address='([^']+)'", out)
        assert head.returncode == 0 and found, out
        yield Cluster(found.group(1), head.pid)
    finally:
        if head.poll() is None:
            head.kill()
            head.wait(timeout=10)
        end_session(head.pid, wait_s=0.0, term_s=1.0)    # a throwaway cluster: no state
        assert session_pids(head.pid) == [], "the Ray cluster's processes outlived it"


def launch(args: list[str], env: dict, cwd: Path, on_poll=None,
           timeout_s: float = RUN_TIMEOUT_S) -> tuple[subprocess.CompletedProcess, float, list]:
    """Run `asgd launch ...` in a session of its own; ``on_poll()`` is called every 50 ms
    while it runs. Returns its result, its wall time and the processes of its session that
    were still there 15 s after it exited (then killed)."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "asgd.cli", "launch", *args], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    left: list[int] = []
    try:
        deadline = started + timeout_s
        while on_poll is not None and proc.poll() is None:
            assert time.monotonic() < deadline, "the run did not end in time"
            on_poll()
            time.sleep(0.05)
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        wall = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)     # the launcher stops its actors and Ray
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        left = end_session(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), wall, left


def kinds(records: list[dict], kind: str) -> list[dict]:
    return [r for r in records if r["kind"] == kind]


# ----------------------------------------------------------------------------------------------
# the default run on a local Ray instance

@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_default_run_trains_on_a_local_ray_instance_of_two_cpus(
        ray_installed, ray_env, tmp_path, mnist1d_cached):
    """`asgd launch --on ray --num-cpus 2` with configs/default.yaml: a local Ray instance of
    two CPUs, the server and two workers as actors, the run directory of a local launch, the
    accuracy bar; the instance ends with the launcher (nothing of its session is left)."""
    shutil.copytree(DEFAULT_CONFIG.parent, tmp_path / "configs")    # what `asgd launch` runs
    # the update budget ends the run, not the time budget (a busy machine is slower)
    result, wall, left = launch(["--on", "ray", "--num-cpus", "2", "--quiet",
                                 "--set", "run.max_seconds=0"], ray_env, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert left == [], f"processes left after the launcher exited: {left}"
    printed = json.loads(result.stdout)
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"\ndefault run on a local Ray instance (2 CPUs): test accuracy "
          f"{summary['test_accuracy']:.3f}, {wall:.1f} s wall ({summary['train_s']:.1f} s "
          f"training)")
    assert printed["status"] == summary["status"] == "ok", summary
    assert summary["test_accuracy"] >= 0.93, summary
    assert summary["on"] == "ray" and summary["workers"] == 2
    assert summary["deaths"] == [] and summary["restarts"] == [] and summary["failures"] == []
    assert load_config(run_dir / "config.yaml") == \
        split_batch(load_config(DEFAULT_CONFIG, ["run.max_seconds=0"]))    # as a local launch
    assert load_checkpoint(run_dir / "checkpoint").version >= 3000
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == \
        ["server.log", "worker-0.log", "worker-1.log"]

    records = read_metrics(run_dir / "metrics.jsonl")
    (started,) = kinds(records, "ray_started")
    assert started["address"] == "local" and started["bundle"] == {"CPU": 1}
    assert started["resources"]["CPU"] == 2
    done = kinds(records, "worker_done")
    assert sorted(r["worker"] for r in done) == ["w0", "w1"]
    assert all(r["reason"] == "max_updates" for r in done), done
    final = [r for r in kinds(records, "eval") if r.get("final")]
    assert final and final[-1]["accuracy"] == summary["test_accuracy"]
    # a local instance keeps the run on loopback: the server bound 127.0.0.1
    assert "at tcp://127.0.0.1:" in (run_dir / "logs" / "server.log").read_text()


# ----------------------------------------------------------------------------------------------
# faults on a running cluster

@pytest.mark.slow
@pytest.mark.timeout(600)
def test_on_a_ray_cluster_ray_restarts_a_killed_server_and_a_crashed_worker(
        ray_cluster, ray_env, tmp_path, mnist1d_cached):
    """The default run on the cluster at --address, one worker per GPU (each actor given its
    own by Ray, and its process that one alone), with two faults: worker 1 crashes at its
    step 100 ($ASGD_FAULT, exit 5), and the server is SIGKILLed once a worker has logged
    version 1000 (checkpoints every 250 updates). Ray restarts both actors: the worker with
    its rank and without the fault, the server with --resume from its newest checkpoint; the
    workers find it again, no version below that checkpoint is seen after, and the run
    reaches its budget and the accuracy bar and ends ok, every death and restart in the
    summary and metrics.jsonl. At the end the launcher's actors are gone from the cluster,
    which keeps running."""
    budget, kill_at = 3000, 1000
    run_dir = (tmp_path / "runs" / "faults").resolve()
    sets = {"run.out_dir": tmp_path / "runs", "run.name": "faults",
            "server.checkpoint_every": 250, "worker.request_timeout_s": 3,
            "worker.reconnect_timeout_s": 60, "run.max_seconds": 0,   # the budget: updates
            "worker.batch_split": "false"}      # whole batches: the versions as counted here
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    env = dict(ray_env, ASGD_FAULT="exit:100:1")
    killed: dict = {}
    gpus: dict = {}

    def kill_the_server():
        if not gpus:        # what each process of the run was given (before any restart)
            seen = {pid: argv_of(pid) for pid in session_pids(ray_cluster.sid)}
            seen = {pid: argv[argv.index("-m") + 1] for pid, argv in seen.items()
                    if str(run_dir) in argv and "-m" in argv}
            if sorted(seen.values()) == ["server", "worker", "worker"]:
                gpus.update({pid: (module, visible_gpus(pid)) for pid, module in seen.items()})
        if killed:
            return
        steps = [r for r in read_metrics(run_dir / "metrics.jsonl")
                 if r["kind"] == "worker_step"]
        if not steps or max(r["version"] for r in steps) < kill_at:
            return
        pid = run_process(ray_cluster.sid, "server", run_dir)   # an actor's child
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            killed["pid"] = pid

    result, wall, left = launch(["--on", "ray", "--address", ray_cluster.address, "--quiet",
                                 "--config", str(DEFAULT_CONFIG), *args], env, tmp_path,
                                on_poll=kill_the_server)
    assert killed, "the server was never killed"
    assert result.returncode == 0, result.stdout + result.stderr
    assert left == []
    err = result.stderr
    assert "Ray restarted server" in err and "Ray restarted worker 1" in err, err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["failures"] == [], summary
    assert summary["on"] == "ray"
    deaths = sorted((d["process"], d["exit_code"], d["signal"]) for d in summary["deaths"])
    assert deaths == [("server", -9, "SIGKILL"), ("worker 1", 5, None)], summary["deaths"]
    restarts = {r["process"]: r for r in summary["restarts"]}
    assert sorted(restarts) == ["server", "worker 1"], summary["restarts"]
    assert all(r["by"] == "ray" for r in restarts.values())

    records = read_metrics(run_dir / "metrics.jsonl")
    (started,) = kinds(records, "ray_started")
    assert started["address"] == ray_cluster.address and started["bundle"] == {"GPU": 1}
    assert started["resources"]["CPU"] == 2 and started["resources"]["GPU"] == 2
    # one GPU a worker, each its own; none for the server (it asks for none)
    by_module = sorted(gpus.values(), key=str)
    assert [m for m, _ in by_module] == ["server", "worker", "worker"], gpus
    assert by_module[0][1] is None and sorted(g for _, g in by_module[1:]) == ["0", "1"], gpus
    # the worker: restarted with its rank, without the fault (one death only), and it
    # finished the run with the other
    (wdied,) = kinds(records, "worker_died")
    assert (wdied["worker"], wdied["exit_code"]) == ("w1", 5)
    log1 = (run_dir / "logs" / "worker-1.log").read_text()
    assert "[asgd ray] worker 1: restarted by Ray" in log1
    assert sorted(r["worker"] for r in kinds(records, "worker_done")) == ["w0", "w1"]
    # the server: from its newest checkpoint, never from before it
    (sdied,) = kinds(records, "server_died")
    (srestarted,) = kinds(records, "server_restarted")
    resumed = srestarted["resumed_version"]
    assert srestarted["resume"] is True and resumed is not None and resumed >= 750
    assert srestarted["endpoint"] == (run_dir / "server.addr").read_text().strip()
    before = [r["version"] for r in records if r["t"] <= sdied["t"] and
              r["kind"] == "worker_step"]
    assert before and max(before) >= kill_at and resumed <= max(before)
    after = [r["version"] for r in records if r["t"] >= srestarted["t"] and
             r["kind"] in ("server", "worker_rejoined", "worker_step")]
    assert after and min(after) >= resumed, (resumed, sorted(after)[:5])
    slog = (run_dir / "logs" / "server.log").read_text()
    assert "[asgd ray] server: restarted by Ray" in slog
    assert f"resuming from its checkpoint at version {resumed}" in slog
    assert f"Ray restarted server from its checkpoint at version {resumed}" in err
    assert load_checkpoint(run_dir / "checkpoint").version >= budget
    # the pauses as training saw them (the launcher records a death and its restart
    # together, when it sees the restarted actor): the longest silence of all workers (the
    # server's outage: w0 trained on through w1's), and w1's from its last step to the first
    # of its restart
    steps = [r["t"] for r in kinds(records, "worker_step")]
    paused = max(b - a for a, b in zip(steps, steps[1:]))
    w1 = [r for r in kinds(records, "worker_step") if r["worker"] == "w1"]
    (w1_gap,) = [b["t"] - a["t"] for a, b in zip(w1, w1[1:]) if b["step"] < a["step"]]
    print(f"\nthe default run on a Ray cluster through two faults: test accuracy "
          f"{summary['test_accuracy']:.3f}, {wall:.1f} s wall; the server killed at version "
          f"{max(before)}, training paused {paused:.1f} s, resumed from version {resumed}; "
          f"worker 1 back {w1_gap:.1f} s after its crash")
    assert summary["test_accuracy"] >= 0.93, summary
    # the cluster runs on, without the run's processes
    assert session_pids(ray_cluster.sid)
    assert run_process(ray_cluster.sid, "server", run_dir) is None
    assert run_process(ray_cluster.sid, "worker", run_dir) is None


# ----------------------------------------------------------------------------------------------
# errors

def asgd_launch(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asgd.cli", "launch", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args, says", [
    (["--address", "127.0.0.1:6379"], "give it with --on ray"),
    (["--on", "local", "--address", "127.0.0.1:6379"], "give it with --on ray"),
    (["--num-cpus", "2"], "give it with --on ray"),
    (["--on", "ray", "--address", "127.0.0.1:6379", "--num-cpus", "2"],
     "a cluster at --address has its own"),
])
def test_ray_options_without_on_ray_are_usage_errors(args, says, child_env, tmp_path):
    result = asgd_launch(args, child_env, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Usage:" in result.stderr and says in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.timeout(60)
def test_an_address_nobody_answers_at_fails_at_once_in_one_line(ray_installed, ray_env,
                                                                  tmp_path):
    """A loopback port that is bound but does not listen refuses the connection: one line,
    exit 1, no run directory, no Ray process started."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{held.getsockname()[1]}"
        result, _, left = launch(["--on", "ray", "--address", address, "--quiet"], ray_env,
                                 tmp_path, timeout_s=40)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot reach the Ray cluster at {address}" in lines[0], lines
    assert result.stdout == ""
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert left == []


@pytest.mark.parametrize("key, value, says", [
    ("worker.resources", "{CPU: -1}", "amounts >= 0"),
    ("worker.resources", "{GPU: one}", "amounts >= 0"),
    ("worker.resources", "2", "expected dict"),
    ("worker.resources", "{cpu: 1}", "'cpu': Ray's built-in resources are spelt CPU, GPU"),
    ("worker.resources", "{CPU: 0}", "must ask for some resource > 0"),
    ("server.resources", "{Memory: 1000}", "'Memory': Ray's built-in resources are spelt"),
])
def test_bad_resources_are_refused_naming_the_key(key, value, says, child_env, tmp_path):
    """Before anything starts (Ray or not installed): one line naming the key, no run
    directory. A misspelt built-in would be a custom resource no node has."""
    result = asgd_launch(["--on", "ray", "--set", f"{key}={value}"], child_env, tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and says in lines[0], lines
    assert not (tmp_path / "runs").exists()


def test_a_local_instance_too_small_for_the_run_is_refused_before_ray_starts(
        ray_installed, ray_env, tmp_path):
    result, _, left = launch(["--on", "ray", "--num-cpus", "1", "--quiet",
                              "--set", "worker.resources={CPU: 1}"], ray_env, tmp_path,
                             timeout_s=40)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs 2 CPUs" in lines[0] and "--num-cpus is 1" in lines[0], \
        lines
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert left == []
