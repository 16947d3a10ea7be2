"""Experiments: the same model and data under several policies, worker counts and slowdowns.

    asgd experiment straggler                       # 4 workers, one 4x slower: async vs sync
    asgd experiment straggler --vs ddp              # ... and torch DDP (gloo) on the same shards
    asgd experiment staleness --workers 1,8 --policies none,scale,dc
    asgd experiment throughput --workers 1,2,4      # against one plain process, same run

Each run is a real cluster (``asgd launch``) or a reference trainer (asgd.local) with its own
run directory under ``<out>/runs/``. Runs get the same budget of training samples, so a
synchronous update (one gradient from each of W workers) counts W pushes' worth of samples.
``<out>/results.json`` holds one record per run (a failed run is recorded as failed),
``results.csv`` the same as a table, ``summary.md`` medians and spreads per configuration,
and PNG plots beside them.
"""
from __future__ import annotations

import csv
import json
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from asgd.config import Config
from asgd.metrics import read_metrics

FIELDS = ("experiment", "policy", "workers", "slow_factor", "delay_s", "repeat", "status",
          "test_accuracy", "test_loss", "time_to_target_s", "samples_per_s", "updates_per_s",
          "updates_applied", "samples", "staleness_mean", "staleness_max", "train_s", "wall_s",
          "run_dir", "error")
SYNCHRONOUS = ("sync", "ddp", "single")


@dataclass(frozen=True)
class RunSpec:
    policy: str          # a server policy, or "ddp" / "single" for the reference trainers
    workers: int
    slow_factor: float = 1.0
    delay_s: float = 0.0
    repeat: int = 0

    @property
    def name(self) -> str:
        slow = f"-f{self.slow_factor:g}" if self.slow_factor != 1 else ""
        delay = f"-d{self.delay_s:g}" if self.delay_s else ""
        return f"{self.policy.replace('+', '_')}-w{self.workers}{slow}{delay}-r{self.repeat}"


@dataclass
class Experiment:
    name: str
    base: Config
    specs: list
    out: Path
    samples: int
    target_accuracy: float
    max_seconds: float
    slow_ranks: list = field(default_factory=lambda: [0])
    eval_every_s: float = 0.5

    def config_for(self, spec: RunSpec) -> Config:
        b = self.base.worker.batch_size
        pushes = max(1, self.samples // b)
        per_update = spec.workers if spec.policy in ("sync", "ddp") else 1
        overrides = {
            "run.name": spec.name, "run.out_dir": str(self.out / "runs"),
            "run.workers": spec.workers, "run.max_updates": max(1, pushes // per_update),
            "run.max_seconds": self.max_seconds, "run.eval_every_s": self.eval_every_s,
            "run.seed": self.base.run.seed + spec.repeat,
            "worker.slow_factor": spec.slow_factor, "worker.delay_s": spec.delay_s,
            "worker.slow_ranks": self.slow_ranks if spec.slow_factor != 1 or spec.delay_s
            else None,
        }
        if spec.policy not in ("ddp", "single"):
            overrides["server.policy"] = spec.policy
        return self.base.replace(**overrides)


# ----------------------------------------------------------------------------------------------
# one run

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


def run_one(exp: Experiment, spec: RunSpec) -> dict:
    from asgd.launch import launch
    from asgd.local import run_reference

    record = {"experiment": exp.name, "policy": spec.policy, "workers": spec.workers,
              "slow_factor": spec.slow_factor, "delay_s": spec.delay_s, "repeat": spec.repeat}
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
        train_s=train_s, wall_s=summary.get("wall_s"), run_dir=str(run_dir),
        error="; ".join(summary.get("failures", [])) or None, curve=curve,
    )
    return record


# ----------------------------------------------------------------------------------------------
# many runs

def run_experiment(exp: Experiment, quiet: bool = False) -> list[dict]:
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
            record = run_one(exp, spec)
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
        from asgd.plots import plot_experiment

        plot_experiment(exp.name, records, exp.out, exp.target_accuracy)
    except ImportError as e:
        console.print(f"[yellow]no plots: {e} (pip install 'asgd[plot]')[/yellow]")
    return records


def write_results(exp: Experiment, records: list[dict]) -> None:
    (exp.out / "experiment.json").write_text(json.dumps(
        {"name": exp.name, "samples": exp.samples, "target_accuracy": exp.target_accuracy,
         "max_seconds": exp.max_seconds, "base_config": exp.base.to_dict()}, indent=1) + "\n")
    (exp.out / "results.json").write_text(json.dumps(records, indent=1) + "\n")
    with open(exp.out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow(r)
    (exp.out / "summary.md").write_text(summary_table(exp, records))


def _spread(values: list) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    med = statistics.median(vals)
    fmt = (lambda v: f"{v:.3f}") if med < 10 else (lambda v: f"{v:,.0f}")
    if len(vals) == 1:
        return fmt(med)
    return f"{fmt(med)} ({fmt(min(vals))}–{fmt(max(vals))})"


def median_time_to_target(records: list[dict]) -> float | None:
    """Median time to target, a run that never reached it counting as infinitely slow
    (None when the median run never reached it)."""
    times = sorted(r["time_to_target_s"] if r.get("time_to_target_s") is not None
                   else float("inf") for r in records)
    if not times:
        return None
    med = statistics.median(times)
    return None if med == float("inf") else med


def _time_to_target_cell(records: list[dict]) -> str:
    if not records:
        return "-"
    reached = [r["time_to_target_s"] for r in records if r.get("time_to_target_s") is not None]
    med = median_time_to_target(records)
    text = "never" if med is None else f"{med:.1f}"
    if len(records) > 1:
        text += f" ({len(reached)}/{len(records)} reached"
        text += f", {min(reached):.1f}–{max(reached):.1f})" if reached else ")"
    return text


def group_key(r: dict) -> tuple:
    return (r["policy"], r["workers"], r["slow_factor"], r["delay_s"])


def summary_table(exp: Experiment, records: list[dict]) -> str:
    groups: dict[tuple, list] = {}
    for r in records:
        groups.setdefault(group_key(r), []).append(r)
    lines = [f"Experiment `{exp.name}`: {exp.samples:,} training samples a run, target accuracy "
             f"{exp.target_accuracy:g}; medians (min–max) over repeats.", "",
             "| policy | workers | slow factor | delay s | runs ok | test accuracy | time to "
             "target s | samples/s | updates/s | staleness mean | staleness max |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (policy, workers, slow, delay), rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        tta = _time_to_target_cell(ok)
        lines.append(
            f"| {policy} | {workers} | {slow:g} | {delay:g} | {len(ok)}/{len(rs)} | "
            f"{_spread([r.get('test_accuracy') for r in ok])} | {tta} | "
            f"{_spread([r.get('samples_per_s') for r in ok])} | "
            f"{_spread([r.get('updates_per_s') for r in ok])} | "
            f"{_spread([r.get('staleness_mean') for r in ok])} | "
            f"{_spread([r.get('staleness_max') for r in ok])} |")
    heads = headline(exp.name, records)
    if heads:
        lines += ["", *heads]
    return "\n".join(lines) + "\n"


def headline(name: str, records: list[dict]) -> list[str]:
    """The comparisons each experiment is for, from medians over repeats."""
    ok = [r for r in records if r["status"] == "ok"]
    lines = []
    if name == "straggler":
        for ref_name in ("sync", "ddp"):
            ref = [r for r in ok if r["policy"] == ref_name]
            if not ref:
                continue
            t_ref = median_time_to_target(ref)
            a_ref = median_of(ok, "test_accuracy", policy=ref_name)
            for pol in sorted({r["policy"] for r in ok} - set(SYNCHRONOUS)):
                mine = [r for r in ok if r["policy"] == pol]
                t = median_time_to_target(mine)
                a = median_of(ok, "test_accuracy", policy=pol)
                ratio = "-" if t is None or t_ref is None else f"{t / t_ref:.2f}"
                lines.append(f"- {pol} vs {ref_name}: time to target {ratio} of {ref_name}'s "
                             f"({'never' if t is None else f'{t:.1f} s'} vs "
                             f"{'never' if t_ref is None else f'{t_ref:.1f} s'}); final "
                             f"accuracy {a - a_ref:+.3f} ({a:.3f} vs {a_ref:.3f})")
    elif name == "staleness":
        single = median_of(ok, "test_accuracy", workers=1)
        if single is not None:
            for w in sorted({r["workers"] for r in ok} - {1}):
                none = median_of(ok, "test_accuracy", workers=w, policy="none")
                if none is None:
                    continue
                lost = single - none
                lines.append(f"- {w} workers, none: {none:.3f} against one worker's "
                             f"{single:.3f} (lost {lost:.3f})")
                for pol in sorted({r["policy"] for r in ok if r["workers"] == w} - {"none"}):
                    a = median_of(ok, "test_accuracy", workers=w, policy=pol)
                    share = f"{(a - none) / lost:.0%}" if lost > 0 else "n/a (nothing lost)"
                    lines.append(f"  - {pol}: {a:.3f}, recovers {share} of what none lost")
    elif name == "throughput":
        single = median_of(ok, "samples_per_s", policy="single")
        t_single = median_time_to_target([r for r in ok if r["policy"] == "single"])
        if single:
            for w in sorted({r["workers"] for r in ok if r["policy"] != "single"}):
                rs = [r for r in ok if r["workers"] == w and r["policy"] != "single"]
                sps = median_of(rs, "samples_per_s")
                t = median_time_to_target(rs)
                tt = "-" if t is None or not t_single else f"{t / t_single:.2f}"
                lines.append(f"- {w} worker(s): {sps:,.0f} samples/s = {sps / single:.2f} x one "
                             f"plain process ({single:,.0f}); time to target {tt} of its")
    return lines


def median_of(records: list[dict], key: str, **where) -> float | None:
    vals = [r.get(key) for r in records if r["status"] == "ok"
            and all(r.get(k) == v for k, v in where.items()) and r.get(key) is not None]
    return statistics.median(vals) if vals else None


def rereport(out: Path, target: float | None = None) -> str:
    """summary.md and plots of ``out`` again from its results.json, at ``target`` if given
    (time to target is recomputed from each run's evaluation curve). Returns the table."""
    records = json.loads((out / "results.json").read_text())
    if not records:
        raise ValueError("results.json holds no runs")
    meta = json.loads((out / "experiment.json").read_text())
    target = meta["target_accuracy"] if target is None else target
    for r in records:
        if r.get("curve") is not None:
            r["time_to_target_s"] = time_to_target(r["curve"], target, r.get("train_s"))
    exp = Experiment(meta["name"], Config(), [], out, meta["samples"], target,
                     meta.get("max_seconds", 0))
    suffix = "" if target == meta["target_accuracy"] else f"-{target:g}"
    table = summary_table(exp, records)
    (out / f"summary{suffix}.md").write_text(table)
    try:
        from asgd.plots import plot_experiment

        plot_experiment(exp.name, records, out, target, suffix=suffix)
    except ImportError:
        pass
    return table
