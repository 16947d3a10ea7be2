"""`asgd launch` when things go wrong: a worker that dies (made to, by the $ASGD_FAULT switch
of worker/train.py) is reported, and Ctrl-C stops the cluster but still evaluates the weights
reached and writes the run directory."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from asgd.core.checkpoint import load_checkpoint
from asgd.launch import processes as proclib
from asgd.metrics import read_metrics
from tests.conftest import REPO
from worker.faults import FAULT_ENV, FAULT_EXIT_CODE, WorkerError, fault_exit_step


FAULT_STEP = 20
BUDGET = 200              # run.max_updates: the surviving worker trains on to it


def test_a_worker_that_dies_is_reported(processes, child_env, make_config, tmp_path,
                                        mnist1d_cached):
    """$ASGD_FAULT=exit:20:0 makes worker 0 exit with code 5 after 20 steps; the launcher says
    so (with the tail of its log), worker 1 goes on to the budget, the final evaluation runs,
    and the run ends "failed" (with run.max_restarts 0: restarts are in
    test_launch_restarts.py)."""
    config = make_config(run={"workers": 2, "max_updates": BUDGET, "max_seconds": 600,
                              "max_restarts": 0, "out_dir": str(tmp_path / "runs"),
                              "name": "dies"})
    env = dict(child_env, ASGD_FAULT=f"exit:{FAULT_STEP}:0")
    try:
        result = proclib.run_to_end(["-m", "asgd.cli", "launch", "--quiet", "--config",
                                     str(config)], 120, env=env, cwd=tmp_path,
                                    on_start=processes.popens.append)
    except proclib.ProcessError as e:
        raise AssertionError(str(e)) from None
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"worker 0 died (exit {FAULT_EXIT_CODE})" in result.stderr, result.stderr
    assert f"{FAULT_ENV}: exiting at step {FAULT_STEP}" in result.stderr   # its log's tail
    assert "worker 1 died" not in result.stderr
    assert "Traceback" not in result.stderr

    run_dir = tmp_path / "runs" / "dies"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["failures"] == [f"worker 0 died (exit {FAULT_EXIT_CODE})"], summary
    assert not summary.get("diverged"), summary          # a death, not a divergence
    assert json.loads(result.stdout)["status"] == "failed"

    records = read_metrics(run_dir / "metrics.jsonl")
    w0_steps = [r["step"] for r in records if r["kind"] == "worker_step" and r["worker"] == "w0"]
    assert w0_steps and max(w0_steps) <= FAULT_STEP, w0_steps
    done = {r["worker"]: r for r in records if r["kind"] == "worker_done"}
    assert set(done) == {"w1"}, done                    # w0 never finished: it died
    assert done["w1"]["reason"] == "max_updates", done["w1"]
    assert done["w1"]["version"] >= BUDGET
    assert summary["updates_applied"] >= BUDGET

    # the final evaluation ran on the checkpoint the server wrote when it was stopped
    ckpt = load_checkpoint(run_dir / "checkpoint")
    assert ckpt.version == summary["updates_applied"]
    final = [r for r in records if r["kind"] == "eval" and r.get("final")]
    assert len(final) == 1 and final[0]["version"] == ckpt.version, final
    assert summary["test_accuracy"] is not None and 0.0 <= summary["test_accuracy"] <= 1.0
    assert final[0]["accuracy"] == summary["test_accuracy"]
    assert f"{FAULT_ENV}: exiting at step {FAULT_STEP}" in \
        (run_dir / "logs" / "worker-0.log").read_text()


@pytest.mark.parametrize("spec, rank, step", [
    ("", 0, None),                       # no fault
    ("exit:20", 0, 20),                  # every rank
    ("exit:20", 3, 20),
    ("exit:20:0", 0, 20),                # only the listed ranks
    ("exit:20:0", 1, None),
    ("exit:7:1,3", 1, 7),
    ("exit:7:1,3", 3, 7),
    ("exit:7:1,3", 2, None),
])
def test_fault_exit_step_parses_the_switch(spec, rank, step):
    assert fault_exit_step(rank, spec) == step


def test_fault_exit_step_reads_the_environment(monkeypatch):
    monkeypatch.delenv(FAULT_ENV, raising=False)
    assert fault_exit_step(0) is None
    monkeypatch.setenv(FAULT_ENV, "exit:3:2")
    assert fault_exit_step(2) == 3 and fault_exit_step(0) is None
    assert fault_exit_step(2, "") is None                # an explicit spec wins


@pytest.mark.parametrize("spec", ["crash:20", "exit", "exit:20:0:1", "EXIT:20", "20"])
def test_fault_exit_step_refuses_a_bad_switch(spec):
    with pytest.raises(WorkerError, match=FAULT_ENV):
        fault_exit_step(0, spec)


@pytest.mark.parametrize("spec", ["exit:abc", "exit:20:x", "exit:20:", "exit::0", "exit:0",
                                  "exit:-1"])
def test_fault_exit_step_refuses_a_non_integer_switch(spec):
    with pytest.raises(WorkerError, match=FAULT_ENV):
        fault_exit_step(0, spec)


@pytest.mark.timeout(300)
def test_ctrl_c_stops_the_cluster_and_still_evaluates(child_env, tmp_path, mnist1d_cached):
    launcher = subprocess.Popen(
        [sys.executable, "-m", "asgd.cli", "launch", "--quiet", "--set",
         f"run.out_dir={tmp_path}", "--set", "run.name=stopped", "--set", "run.max_updates=0",
         "--set", "run.max_seconds=300"], cwd=REPO, env=child_env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 100
        def stepping() -> set:   # workers that have logged a training step
            if not metrics.exists():
                return set()
            from asgd.metrics import read_metrics   # skips a line still being written

            # past the learning rate's warm-up (50 updates), so the weights have learned
            return {r["worker"] for r in read_metrics(metrics)
                    if r["kind"] == "worker_step" and r["step"] >= 60}

        while stepping() != {"w0", "w1"}:
            assert launcher.poll() is None, launcher.communicate()
            assert time.monotonic() < deadline, "the workers did not start training in 100 s"
            time.sleep(0.2)
        launcher.send_signal(signal.SIGINT)
        out, err = launcher.communicate(timeout=90)
    finally:
        try:                             # the launcher and whatever it left: its whole group
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        launcher.wait(timeout=10)
    assert launcher.returncode == 1
    summary = json.loads((tmp_path / "stopped" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["interrupted"] is True
    assert summary["updates_applied"] > 0
    assert summary["test_accuracy"] is not None and summary["test_accuracy"] > 0.1
    assert (tmp_path / "stopped" / "checkpoint" / "state.asgd").exists()
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert sum(r["kind"] == "worker_done" for r in records) == 2   # both workers ended cleanly
