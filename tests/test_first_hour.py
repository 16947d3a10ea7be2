"""What a new user meets in the first hour, on real processes: a user model in the current
folder, switching the model with one --set, bad addresses, a missing server, damaged
checkpoints, progress of a cluster started by hand, extending a finished run, a run that
diverges, and a closed stdout."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from asgd.core.checkpoint import load_checkpoint, write_checkpoint
from asgd.launch.display import Monitor, fit
from asgd.launch.guard import DivergenceGuard
from asgd.config import Config


USER_MODEL = '''
import torch.nn as nn


def make(input_shape, num_classes, width=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], width), nn.ReLU(),
                         nn.Linear(width, num_classes))
'''


def launch(processes, tmp_path, *args, timeout=150):
    return processes.run(["-m", "asgd.cli", "launch", "--quiet", "--set",
                          f"run.out_dir={tmp_path / 'runs'}", *args], timeout=timeout)


def only_run(tmp_path) -> Path:
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    return run_dir


# ----------------------------------------------------------------------------------------------
# user code and model switching

@pytest.mark.slow
def test_a_user_model_in_the_current_folder_trains_and_evaluates(processes, tmp_path,
                                                                 mnist1d_cached):
    (tmp_path / "mymodel.py").write_text(USER_MODEL)
    result = launch(processes, tmp_path, "--set", "model.name=mymodel:make",
                    "--set", "model.args={width: 32}", "--set", "run.max_updates=300",
                    "--set", "run.eval_every_s=1")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "ok" and summary["test_accuracy"] > 0.3
    ev = processes.run(["-m", "asgd.cli", "eval", str(only_run(tmp_path))], timeout=60)
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["test_accuracy"] == summary["test_accuracy"]


@pytest.mark.parametrize("name, message", [
    ("nosuchmodule:make", "cannot import nosuchmodule"),
    ("mymodel:nothing", "mymodel has no nothing"),
])
def test_a_bad_import_path_fails_before_anything_starts(processes, tmp_path, name, message):
    (tmp_path / "mymodel.py").write_text(USER_MODEL)
    result = launch(processes, tmp_path, "--set", f"model.name={name}", timeout=60)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("Error:") == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_switching_the_model_takes_one_set(processes, tmp_path, mnist1d_cached):
    result = launch(processes, tmp_path, "--set", "model.name=mlp", "--set",
                    "run.max_updates=200", "--set", "run.eval_every_s=0")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "ok"


def test_an_argument_a_model_does_not_take_names_what_it_takes(processes, tmp_path):
    result = launch(processes, tmp_path, "--set", "model.name=mlp",
                    "--set", "model.args.channels=32", timeout=60)
    assert result.returncode != 0
    assert "model 'mlp' does not take channels (model.args); it takes hidden" in result.stderr


# ----------------------------------------------------------------------------------------------
# addresses and a missing server

@pytest.mark.parametrize("command, option, value", [
    ("worker", "--server", "localhost"),
    ("worker", "--server", "tcp://127.0.0.1:abc"),
    ("worker", "--server", "udp://127.0.0.1:5555"),
    ("server", "--bind", "tcp://127.0.0.1:abc"),
])
def test_a_bad_address_is_one_line_with_an_example(processes, tmp_path, make_config, command,
                                                   option, value):
    extra = ["--rank", "0"] if command == "worker" else []
    result = processes.run(["-m", "asgd.cli", command, "--config", str(make_config()), option,
                            value, *extra], timeout=30)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "ZMQError" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert option in result.stderr and "e.g. tcp://" in result.stderr, result.stderr


@pytest.mark.slow
def test_host_port_means_tcp(start_server, make_config, processes, tmp_path):
    server = start_server(make_config(run={"workers": 1, "max_updates": 20}))
    host_port = server.endpoint.removeprefix("tcp://")
    result = processes.run(["-m", "worker", "--config", str(make_config(
        run={"workers": 1, "max_updates": 20})), "--server", host_port], timeout=60)
    assert result.returncode == 0, result.stderr


def test_a_missing_server_is_announced_at_once_then_a_clear_give_up(processes, tmp_path,
                                                                     make_config, child_env):
    config = make_config(worker={"reconnect_timeout_s": 7})
    log_path = tmp_path / "worker.log"
    popen = processes.spawn(["-m", "worker", "--config", str(config), "--server",
                             "tcp://127.0.0.1:9", "--rank", "0"], log_path)
    deadline = time.monotonic() + 40
    while "waiting for the server at tcp://127.0.0.1:9" not in log_path.read_text():
        assert popen.poll() is None and time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.1)
    assert popen.wait(timeout=40) == 3
    log = log_path.read_text()
    assert "still waiting for the server at tcp://127.0.0.1:9" in log
    gave_up = [line for line in log.splitlines() if "gave up" in line]
    assert len(gave_up) == 1 and "7 s (worker.reconnect_timeout_s)" in gave_up[0], log
    assert "Traceback" not in log


# ----------------------------------------------------------------------------------------------
# damaged checkpoints

def damaged_run(start_server, make_config, clients, tmp_path):
    """A real server's checkpoint, then the same with a NaN weight (checksums intact)."""
    config = make_config()
    server = start_server(config, run_dir=tmp_path / "run")
    c = clients(server.endpoint)
    info, weights = c.hello()
    c.push(info["version"], [(w.name, w.array * 0 + 1e-3) for w in weights])
    assert server.stop() == 0
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint")
    flat = ckpt.flat.clone()
    flat[7] = float("nan")
    write_checkpoint(tmp_path / "run" / "checkpoint", ckpt.version, ckpt.layout, flat,
                     ckpt.config, "adam", ckpt.optimizer_scalars,
                     list(ckpt.optimizer_tensors.items()))
    return config


@pytest.mark.slow
def test_nan_weights_are_refused_by_eval_and_resume(start_server, make_config, clients,
                                                     processes, tmp_path):
    config = damaged_run(start_server, make_config, clients, tmp_path)
    ev = processes.run(["-m", "asgd.cli", "eval", str(tmp_path / "run")], timeout=60)
    assert ev.returncode != 0 and "weights holds 1 non-finite" in ev.stderr, ev.stderr
    assert "NaN" not in ev.stdout and "Traceback" not in ev.stderr
    resume = processes.run(["-m", "server", "--config", str(config), "--bind",
                            "tcp://127.0.0.1:0", "--run-dir", str(tmp_path / "run"),
                            "--resume"], timeout=60)
    assert resume.returncode == 1
    assert "weights holds 1 non-finite" in resume.stderr and "Traceback" not in resume.stderr


def test_resume_without_a_checkpoint_says_so(processes, make_config, tmp_path):
    result = processes.run(["-m", "server", "--config", str(make_config()), "--bind",
                            "tcp://127.0.0.1:0", "--run-dir", str(tmp_path / "empty"),
                            "--resume"], timeout=60)
    assert result.returncode == 1
    assert "no checkpoint at" in result.stderr and "Errno" not in result.stderr


# ----------------------------------------------------------------------------------------------
# a cluster started by hand: progress, and going on

@pytest.mark.slow
@pytest.mark.timeout(600)
def test_status_lines_and_extending_a_finished_run(start_server, make_config, processes,
                                                   tmp_path, clients):
    # a budget in seconds, so the first status lines (after 2 s) come however fast the steps
    config = make_config(run={"workers": 1, "max_updates": 0, "max_seconds": 3.0})
    run_dir = tmp_path / "run"
    server = start_server(config, run_dir=run_dir)
    worker = processes.run(["-m", "worker", "--config", str(config), "--server",
                            server.endpoint], timeout=240)
    assert worker.returncode == 0, worker.stderr
    assert "step " in worker.stderr and "samples/s" in worker.stderr    # periodic status
    reached = clients(server.endpoint, "observer").stats()["version"]
    assert server.stop() == 0
    assert "updates/s" in server.log() and "worker(s) seen" in server.log()
    # the same config again would do 0 steps; --extend trains 100 more
    server2 = start_server(config, "--extend", "100", run_dir=run_dir, resume=True)
    again = processes.run(["-m", "worker", "--config", str(config), "--server",
                           server2.endpoint, "--quiet"], timeout=240)
    assert again.returncode == 0, again.stderr
    assert "step " not in again.stderr                                   # --quiet
    stats = clients(server2.endpoint, "observer").stats()
    assert reached + 100 <= stats["version"] <= reached + 102
    assert server2.stop() == 0


# ----------------------------------------------------------------------------------------------
# divergence

def test_the_guard_tells_learning_from_not_learning():
    g = DivergenceGuard(num_classes=10, warmup=50, max_updates=6000)
    assert g.grace_until == 650
    assert g.loss(100, 2.30) == ""                      # early: not yet judged
    assert all(g.loss(v, 2.30) == "" for v in (700, 710))
    assert "stuck at chance" in g.loss(720, 2.29)       # the third report in a row
    assert "became nan" in DivergenceGuard(10).loss(5, float("nan"))
    h = DivergenceGuard(10)
    assert h.accuracy(100, 0.12) == "" and h.accuracy(200, 0.9) == ""
    assert "collapsed to 0.100" in h.accuracy(300, 0.10)
    assert "at chance" in DivergenceGuard(10).final(0.089)
    assert DivergenceGuard(10).final(0.5) == ""
    short = DivergenceGuard(10, warmup=50, max_updates=61)     # ends inside its grace period
    assert short.final(0.116, version=61) == ""                 # untrained, not diverged
    assert "at chance" in short.final(0.116, version=short.grace_until)


def test_a_diverging_run_is_stopped_and_reported(processes, tmp_path, mnist1d_cached):
    result = launch(processes, tmp_path, "--set", "optimizer.name=sgd",
                    "--set", "optimizer.lr=1e6", "--set", "schedule.warmup=0",
                    "--set", "model.args={channels: 8}", "--set", "run.max_updates=6000")
    assert result.returncode == 1, result.stderr
    assert "diverged:" in result.stderr
    run = only_run(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in (run / "logs").glob("*"))
    assert summary["status"] == "diverged" and summary["diverged"], (summary, result.stderr,
                                                                     logs)
    assert summary["updates_applied"] < 3000                  # stopped early, not at the budget


# ----------------------------------------------------------------------------------------------
# the display and a closed stdout

def test_the_line_fits_80_columns_by_dropping_fields():
    mon = Monitor(Config(), time.time())
    mon.updates, mon.loss, mon.accuracy, mon.samples_per_s = 1234, 0.4321, 0.9123, 10066
    full = mon.line()
    assert "acc 0.912" in full and "samples/s" in full
    for width in (80, 60, 40, 24):
        line = mon.line(width)
        assert len(line) <= width and line.startswith("updates 1234/3000")
        assert "…" not in line
    assert fit(["a" * 30, "b"], 10) == "a" * 30                 # the first field stays whole


def test_the_throughput_clock_stops_with_training():
    mon = Monitor(Config(), time.time() - 10)
    mon.samples_per_s = 5000.0
    mon.finish_training()
    elapsed = mon.elapsed_s
    mon.update_stats({"version": 10, "staleness_mean": 0.0,
                      "workers": {"w0": {"pushes": 100}}})
    assert mon.samples_per_s == 5000.0 and mon.elapsed_s == elapsed


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_a_closed_stdout_still_leaves_the_summary(child_env, tmp_path, mnist1d_cached):
    """`asgd launch ... | head` with Ctrl-C: the pipe's reader is gone, the run still stops
    its cluster, evaluates the weights and writes summary.json."""
    launcher = subprocess.Popen(
        [sys.executable, "-m", "asgd.cli", "launch", "--set", f"run.out_dir={tmp_path}",
         "--set", "run.name=piped", "--set", "model.args={channels: 8}",
         "--set", "run.max_updates=0", "--set", "run.max_seconds=300"],
        cwd=tmp_path, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True)
    metrics = tmp_path / "piped" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 100
        while not (metrics.exists() and '"worker_step"' in metrics.read_text()):
            assert launcher.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        launcher.stdout.close()                      # the reader goes away
        launcher.stderr.close()
        os.killpg(launcher.pid, signal.SIGINT)       # Ctrl-C reaches the whole group
        launcher.wait(timeout=90)
    finally:
        try:                             # the launcher and whatever it left: its whole group
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        launcher.wait(timeout=10)
    summary = json.loads((tmp_path / "piped" / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert summary["test_accuracy"] is not None and summary["updates_applied"] > 0
    assert torch.isfinite(torch.tensor(summary["test_loss"]))
