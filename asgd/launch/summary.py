"""A launch's summary: its figures from the server's last stats and the workers' records, its
status, and summary.json.

    records = read_metrics(run_dir / "metrics.jsonl", start)     # this launch's (asgd.metrics)
    summary.update(training_figures(records, stats, t0))          # samples/s, updates, ...
    summary["status"] = run_status(failures, diverged, interrupted)
    write_summary(run_dir, summary, keep_earlier=resume)          # summary.json

Split from asgd.launch.launcher (Launch._summarize puts these together).
"""
from __future__ import annotations

import json
import time
from pathlib import Path


def training_figures(records: list[dict], stats: dict | None, t0: float) -> dict:
    """The run's figures: wall and training time, the server's counts (since it last
    started: a restarted server counts afresh; the version is whole), samples and samples/s
    from the workers' ``worker_done`` records."""
    done = [r for r in records if r.get("kind") == "worker_done"]
    samples = sum(r["samples"] for r in done)
    starts = [r["t"] - r["elapsed_s"] for r in done]
    train_s = (max(r["t"] for r in done) - min(starts)) if done else 0.0
    stats = stats or {}
    return dict(
        wall_s=round(time.time() - t0, 3),
        train_s=round(train_s, 3),
        updates_applied=stats.get("updates_applied", 0),
        updates_dropped=stats.get("updates_dropped", 0),
        version=stats.get("version", 0),
        staleness_mean=stats.get("staleness_mean", 0.0),
        staleness_max=stats.get("staleness_max", 0),
        staleness_histogram=stats.get("staleness_histogram", {}),
        bytes_in=stats.get("bytes_in", 0), bytes_out=stats.get("bytes_out", 0),
        shm_bytes_in=stats.get("shm_bytes_in", 0),
        shm_bytes_out=stats.get("shm_bytes_out", 0),
        samples=samples,
        samples_per_s=samples / train_s if train_s > 0 else 0.0,
    )


def run_status(failures, diverged, interrupted: bool) -> str:
    """failed, diverged, interrupted or ok, in that order of precedence."""
    if failures:
        return "failed"
    if diverged:
        return "diverged"
    return "interrupted" if interrupted else "ok"


def write_summary(run_dir: Path, summary: dict, keep_earlier: bool) -> Path:
    """summary.json; ``keep_earlier`` (a resumed run): the earlier launch's is kept as
    summary-K.json."""
    path = run_dir / "summary.json"
    if keep_earlier and path.exists():
        k = 1
        while (run_dir / f"summary-{k}.json").exists():
            k += 1
        path.rename(run_dir / f"summary-{k}.json")
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path
