"""`asgd launch` when things go wrong: a worker that dies is reported, and Ctrl-C stops the
cluster but still evaluates the weights reached and writes the run directory."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_worker_that_dies_is_reported(processes, tmp_path, mnist1d_cached):
    result = processes.run(
        ["-m", "asgd.cli", "launch", "--quiet", "--set", f"run.out_dir={tmp_path}",
         "--set", "run.name=dies", "--set", "worker.device=cuda:0",
         "--set", "run.max_updates=200"], timeout=120)
    assert result.returncode == 1
    assert "worker 0 died (exit 2)" in result.stderr
    assert "CUDA is not available" in result.stderr          # the tail of its log is shown
    summary = json.loads((tmp_path / "dies" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "worker 1 died (exit 2)" in summary["failures"]
    assert summary["test_accuracy"] is not None               # the server's weights, evaluated


def test_ctrl_c_stops_the_cluster_and_still_evaluates(child_env, tmp_path, mnist1d_cached):
    launcher = subprocess.Popen(
        [sys.executable, "-m", "asgd.cli", "launch", "--quiet", "--set",
         f"run.out_dir={tmp_path}", "--set", "run.name=stopped", "--set", "run.max_updates=0",
         "--set", "run.max_seconds=120"], cwd=REPO, env=child_env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 60
        def stepping() -> set:   # workers that have logged a training step
            if not metrics.exists():
                return set()
            from asgd.metrics import read_metrics   # skips a line still being written

            return {r["worker"] for r in read_metrics(metrics) if r["kind"] == "worker_step"}

        while stepping() != {"w0", "w1"}:
            assert launcher.poll() is None, launcher.communicate()
            assert time.monotonic() < deadline, "the workers did not start training in 60 s"
            time.sleep(0.2)
        launcher.send_signal(signal.SIGINT)
        out, err = launcher.communicate(timeout=90)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=10)
    assert launcher.returncode == 1
    summary = json.loads((tmp_path / "stopped" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["interrupted"] is True
    assert summary["updates_applied"] > 0
    assert summary["test_accuracy"] is not None and summary["test_accuracy"] > 0.1
    assert (tmp_path / "stopped" / "checkpoint" / "state.asgd").exists()
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert sum(r["kind"] == "worker_done" for r in records) == 2   # both workers ended cleanly
