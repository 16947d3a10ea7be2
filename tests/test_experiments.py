"""`asgd experiment`: real (tiny) runs end to end, failed runs recorded, and the helpers that
turn run directories into records."""
from __future__ import annotations

import csv
import json

import pytest

from asgd.experiments.measures import time_to_target
from asgd.experiments.report import summary_table
from asgd.experiments.spec import RunSpec

REQUIRED = ("policy", "workers", "slow_factor", "repeat", "status", "test_accuracy",
            "time_to_target_s", "samples_per_s", "staleness_mean", "run_dir")


def test_time_to_target_takes_the_first_evaluation_at_or_above_it():
    curve = [{"t": 1.0, "version": 10, "accuracy": 0.5, "final": False},
             {"t": 2.0, "version": 20, "accuracy": 0.91, "final": False},
             {"t": 3.0, "version": 30, "accuracy": 0.95, "final": False},
             {"t": 4.0, "version": 40, "accuracy": 0.96, "final": True}]
    assert time_to_target(curve, 0.9, train_s=3.5) == 2.0
    assert time_to_target(curve, 0.955, train_s=3.5) == 3.5    # only the final evaluation
    assert time_to_target(curve, 0.99, train_s=3.5) is None


def test_run_names_say_what_varies():
    assert RunSpec("none", 4, 4.0, 0.0, 1).name == "none-w4-f4-r1"
    assert RunSpec("scale+ssp", 2, 1.0, 0.01, 0).name == "scale_ssp-w2-d0.01-r0"
    assert RunSpec("none", 2, local_steps=4).name == "none-w2-h4-r0"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_local_steps_experiment_gives_every_h_the_same_samples(processes, tmp_path,
                                                               mnist1d_cached):
    out, samples = tmp_path / "exp", 6000
    result = processes.run(
        ["-m", "asgd.cli", "experiment", "local-steps", "--workers", "2", "--local-steps",
         "1,4", "--samples", str(samples), "--target-accuracy", "0.3", "--max-seconds", "600",
         "--out", str(out), "--quiet", "--set", "model.args.channels=8",
         "--set", "optimizer.lr=0.01"], timeout=500)
    assert result.returncode == 0, result.stderr
    records = json.loads((out / "results.json").read_text())
    by = {r["local_steps"]: r for r in records}
    assert set(by) == {1, 4} and all(r["status"] == "ok" for r in records), records
    assert by[1]["updates_applied"] >= samples // 50
    assert samples // 50 // 4 <= by[4]["updates_applied"] <= samples // 50 // 4 + 2
    for r in records:   # every H trains on the same samples (a push is H batches)
        assert samples <= r["samples"] <= samples + 2 * 4 * 50, r["samples"]
    assert by[4]["bytes_moved"] < by[1]["bytes_moved"] / 3       # a quarter of the pushes
    text = (out / "summary.md").read_text()
    assert "| none | 2 | 4 |" in text and "H=4 against H=1" in text


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_straggler_experiment_runs_every_kind_and_writes_its_results(processes, tmp_path,
                                                                     mnist1d_cached):
    # enough samples and learning rate that sync's few updates leave chance accuracy behind
    # (the launcher's divergence guard ends a run that finishes at chance as "diverged")
    out, samples = tmp_path / "exp", 8000
    result = processes.run(
        ["-m", "asgd.cli", "experiment", "straggler", "--workers", "2", "--slow-factor", "2",
         "--policies", "none,sync", "--vs", "ddp", "--samples", str(samples),
         "--target-accuracy", "0.3", "--max-seconds", "600", "--out", str(out), "--quiet",
         "--set", "model.args.channels=8", "--set", "optimizer.lr=0.01"], timeout=500)
    assert result.returncode == 0, result.stderr
    records = json.loads((out / "results.json").read_text())
    assert [(r["policy"], r["workers"], r["slow_factor"]) for r in records] == \
        [("none", 2, 2.0), ("sync", 2, 2.0), ("ddp", 2, 2.0)]
    for r in records:
        assert all(k in r for k in REQUIRED), r
        assert r["status"] == "ok", r
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert r["samples_per_s"] > 0
        summary = json.loads((tmp_path / "exp" / "runs" / r["run_dir"].split("/")[-1]
                              / "summary.json").read_text())
        assert summary["test_accuracy"] == r["test_accuracy"]
    by = {r["policy"]: r for r in records}
    assert by["none"]["updates_applied"] >= samples // 50       # one update a push
    assert by["sync"]["updates_applied"] == samples // 50 // 2  # one update a round of two
    assert by["sync"]["staleness_mean"] == 0.0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["policy"] for row in rows] == ["none", "sync", "ddp"]
    for png in ("accuracy_vs_time.png", "accuracy_vs_updates.png", "staleness.png", "bars.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| sync | 2 | 1 | 2 |" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_a_failed_run_is_recorded_as_failed(processes, tmp_path, mnist1d_cached):
    out = tmp_path / "exp"
    result = processes.run(
        ["-m", "asgd.cli", "experiment", "throughput", "--workers", "2", "--samples", "1000",
         "--out", str(out), "--quiet", "--set", "model.name=no_such_module:factory"],
        timeout=180)
    assert result.returncode == 0, result.stderr
    assert "run(s) failed" in result.stderr
    records = json.loads((out / "results.json").read_text())
    assert [r["policy"] for r in records] == ["single", "none"]
    assert all(r["status"] == "failed" for r in records)
    assert "no_such_module" in records[1]["error"]


def test_summary_table_reports_medians_and_spreads():
    class Exp:
        name, samples, target_accuracy = "x", 1000, 0.9

    recs = [{"policy": "none", "workers": 2, "slow_factor": 1.0, "delay_s": 0.0,
             "status": "ok", "test_accuracy": a, "time_to_target_s": t, "samples_per_s": 100.0,
             "updates_per_s": 2.0, "staleness_mean": 1.0, "staleness_max": 3}
            for a, t in ((0.90, 4.0), (0.94, None), (0.92, 6.0))]
    table = summary_table(Exp, recs)
    # the run that never reached the target counts as the slowest: median 6.0, not 5.0
    assert "| none | 2 | 1 | 1 | 0 | 3/3 | 0.920 (0.900–0.940) | 6.0 (2/3 reached, 4.0–6.0) |" \
        in table


def test_headlines_compare_against_the_references():
    from asgd.experiments.report import headline

    staleness = [
        {"status": "ok", "policy": "none", "workers": 1, "test_accuracy": 0.93},
        {"status": "ok", "policy": "none", "workers": 8, "test_accuracy": 0.50},
        {"status": "ok", "policy": "scale", "workers": 8, "test_accuracy": 0.85},
        {"status": "failed", "policy": "dc", "workers": 8, "test_accuracy": None}]
    lines = headline("staleness", staleness)
    assert lines[0] == "- 8 workers, none: 0.500 against one worker's 0.930 (lost 0.430)"
    assert lines[1] == "  - scale: 0.850, recovers 81% of what none lost"
    assert len(lines) == 2                          # the failed dc run is left out
    straggler = [
        {"status": "ok", "policy": "none", "workers": 4, "test_accuracy": 0.94,
         "time_to_target_s": 5.0},
        {"status": "ok", "policy": "sync", "workers": 4, "test_accuracy": 0.90,
         "time_to_target_s": 25.0}]
    assert headline("straggler", straggler) == [
        "- `none` vs `sync`: time to target 0.20 of `sync`'s (5.0 s vs 25.0 s); final accuracy "
        "+0.040 (0.940 vs 0.900)"]
