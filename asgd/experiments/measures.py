"""Measures of experiment runs: when training began, accuracy curves, time to a target, medians.

    curve = eval_curve(run_dir)                       # [{"t", "version", "accuracy", "final"}]
    time_to_target(curve, 0.9, train_s)               # seconds, or None if never reached
    median_time_to_target(records)                    # a run that never reached counts as slowest
    median_of(records, "samples_per_s", workers=2)

Pure functions of records and metrics files, shared by the runner, the report and the plots.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from asgd.metrics import read_metrics


def train_start(records: list[dict]) -> float:
    done = [r for r in records if r.get("kind") == "worker_done"]
    if done:
        return min(r["t"] - r["elapsed_s"] for r in done)
    steps = [r["t"] for r in records if r.get("kind") == "worker_step"]
    return min(steps) if steps else 0.0


def eval_curve(run_dir: Path) -> list[dict]:
    """(seconds since training began, version, accuracy) of each mid-run evaluation."""
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    t0 = train_start(records)
    return [{"t": r["t"] - t0, "version": r["version"], "accuracy": r["accuracy"],
             "final": bool(r.get("final"))} for r in records if r.get("kind") == "eval"]


def time_to_target(curve: list[dict], target: float, train_s: float | None) -> float | None:
    for point in curve:
        if not point["final"] and point["accuracy"] >= target:
            return round(max(point["t"], 0.0), 3)
    finals = [p for p in curve if p["final"]]
    if finals and finals[-1]["accuracy"] >= target and train_s:
        return round(train_s, 3)   # reached only by the end of training
    return None


def median_time_to_target(records: list[dict]) -> float | None:
    """Median time to target, a run that never reached it counting as infinitely slow
    (None when the median run never reached it)."""
    times = sorted(r["time_to_target_s"] if r.get("time_to_target_s") is not None
                   else float("inf") for r in records)
    if not times:
        return None
    med = statistics.median(times)
    return None if med == float("inf") else med


def median_of(records: list[dict], key: str, **where) -> float | None:
    vals = [r.get(key) for r in records if r["status"] == "ok"
            and all(r.get(k) == v for k, v in where.items()) and r.get(key) is not None]
    return statistics.median(vals) if vals else None
