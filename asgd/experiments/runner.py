"""Experiments: the same model and data under several policies, worker counts and slowdowns.

    asgd experiment straggler                       # 4 workers, one 4x slower: async vs sync
    asgd experiment straggler --vs ddp              # ... and torch DDP (gloo) on the same shards
    asgd experiment staleness --workers 1,8 --policies none,scale,dc
    asgd experiment throughput --workers 1,2,4      # against one plain process, same run

Each run is a real cluster (``asgd launch``) or a reference trainer (asgd.experiments.reference) with its own
run directory under ``<out>/runs/``. Runs get the same budget of training samples, so a
synchronous update (one gradient from each of W workers) counts W pushes' worth of samples.
``<out>/results.json`` holds one record per run (a failed run is recorded as failed),
``results.csv`` the same as a table, ``summary.md`` medians and spreads per configuration,
and PNG plots beside them.
"""
from __future__ import annotations

import time
import traceback
from pathlib import Path

from asgd.experiments.measures import eval_curve, time_to_target
from asgd.experiments.report import write_results
from asgd.experiments.spec import Experiment, RunSpec

# ----------------------------------------------------------------------------------------------
# one run

def base_record(exp: Experiment, spec: RunSpec) -> dict:
    """What a run is, before it runs: its experiment and its spec's settings."""
    return {"experiment": exp.name, "policy": spec.policy, "workers": spec.workers,
            "local_steps": spec.local_steps, "slow_factor": spec.slow_factor,
            "delay_s": spec.delay_s, "repeat": spec.repeat,
            **({"label": spec.label} if spec.label else {})}


def run_one(exp: Experiment, spec: RunSpec) -> dict:
    from asgd.experiments.reference import run_reference
    from asgd.launch.launcher import launch

    record = base_record(exp, spec)
    try:
        cfg = exp.config_for(spec)
        if spec.policy in ("ddp", "single"):
            summary = run_reference(cfg, spec.policy)
        else:
            summary = launch(cfg, quiet=True)
    except Exception as e:  # recorded, not dropped: the other runs go on
        record.update(status="failed", error=f"{type(e).__name__}: {e}",
                      traceback=traceback.format_exc())
        return record
    return finish_record(record, exp, summary)


def finish_record(record: dict, exp: Experiment, summary: dict) -> dict:
    """``record`` (what the run was) with what the run's summary and run directory say: its
    status, accuracy, time to the target, rates, staleness, bytes and evaluation curve (also
    the simulator's, whose summaries have the same keys)."""
    run_dir = Path(summary["run_dir"])
    curve = eval_curve(run_dir)
    train_s = summary.get("train_s") or None
    record.update(
        status=summary.get("status", "ok"),
        test_accuracy=summary.get("test_accuracy"), test_loss=summary.get("test_loss"),
        time_to_target_s=time_to_target(curve, exp.target_accuracy, train_s),
        samples_per_s=summary.get("samples_per_s"),
        updates_per_s=(summary.get("updates_applied", 0) / train_s) if train_s else None,
        updates_applied=summary.get("updates_applied"), samples=summary.get("samples"),
        staleness_mean=summary.get("staleness_mean"), staleness_max=summary.get("staleness_max"),
        staleness_histogram=summary.get("staleness_histogram", {}),
        bytes_moved=sum(summary.get(k, 0) or 0 for k in ("bytes_in", "bytes_out",
                                                          "shm_bytes_in", "shm_bytes_out"))
        or None,
        train_s=train_s, wall_s=summary.get("wall_s"), run_dir=str(run_dir),
        error="; ".join(summary.get("failures", [])) or None, curve=curve,
    )
    return record


# ----------------------------------------------------------------------------------------------
# many runs

def run_experiment(exp: Experiment, quiet: bool = False, run=None) -> list[dict]:
    """Every spec of ``exp``, one after the other, each by ``run(exp, spec)`` (default
    ``run_one``: a real cluster or reference trainer; the simulator's for ``--simulate``)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
        TimeElapsedColumn

    exp.out.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True, quiet=quiet)
    records = []
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task(exp.name, total=len(exp.specs))
        for spec in exp.specs:
            progress.update(task, description=f"{exp.name}: {spec.name}")
            started = time.monotonic()
            record = (run or run_one)(exp, spec)
            records.append(record)
            write_results(exp, records)   # a crash later keeps what has run
            tta = record.get("time_to_target_s")
            acc = record.get("test_accuracy")
            console.print(f"{spec.name:<28} {record['status']:<7} "
                          f"acc {acc if acc is None else f'{acc:.4f}'}  "
                          f"to {exp.target_accuracy:g}: "
                          f"{'never' if tta is None else f'{tta:.1f}s'}  "
                          f"samples/s {record.get('samples_per_s') or 0:,.0f}  "
                          f"staleness {record.get('staleness_mean') or 0:.2f}  "
                          f"({time.monotonic() - started:.0f}s)")
            progress.advance(task)
    write_results(exp, records)
    try:
        from asgd.experiments.plots import plot_experiment

        plot_experiment(exp.name, records, exp.out, exp.target_accuracy)
    except ImportError as e:
        console.print(f"[yellow]no plots: {e} (pip install 'asgd[plot]')[/yellow]")
    return records


