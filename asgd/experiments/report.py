"""Experiment reports: results.json and .csv, summary.md with medians and headline comparisons,
and the plots drawn again at another target.

    write_results(exp, records)                        # after every run, so a crash keeps them
    text = rereport(Path("experiments/straggler"), target=0.92)
"""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from asgd.config import Config
from asgd.experiments.measures import (median_of, median_time_to_target, time_to_target)
from asgd.experiments.spec import FIELDS, SYNCHRONOUS, Experiment


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
    if all(isinstance(v, int) and not isinstance(v, bool) for v in vals):   # counts: 5, not 5.000
        fmt = (lambda v: f"{int(v):,}" if float(v).is_integer() else f"{v:,.1f}")
    elif med < 10:
        fmt = (lambda v: f"{v:.3f}")
    else:
        fmt = (lambda v: f"{v:,.0f}")
    if len(vals) == 1:
        return fmt(med)
    return f"{fmt(med)} ({fmt(min(vals))}–{fmt(max(vals))})"


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
    return (r["policy"], r["workers"], r.get("local_steps", 1), r["slow_factor"], r["delay_s"],
            r.get("delay_model") or "", r.get("label") or "")


def summary_table(exp: Experiment, records: list[dict]) -> str:
    groups: dict[tuple, list] = {}
    for r in records:
        groups.setdefault(group_key(r), []).append(r)
    simulated = any(r.get("simulated") for r in records)
    # simulated runs: the delay model's column, and times in simulated seconds
    model_head, model_rule = ("delay model | ", "--- | ") if simulated else ("", "")
    lines = [f"Experiment `{exp.name}`: {exp.samples:,} training samples a run, target accuracy "
             f"{exp.target_accuracy:g}; medians (min–max) over repeats"
             f"{'; simulated (times and rates in simulated seconds)' if simulated else ''}.",
             "",
             f"| policy | workers | local steps | slow factor | delay s | {model_head}runs ok "
             "| test accuracy | time to target s | samples/s | updates/s | staleness mean "
             "| staleness max | MB moved |",
             f"| --- | ---: | ---: | ---: | ---: | {model_rule}---: | ---: | ---: | ---: | ---: "
             "| ---: | ---: | ---: |"]
    for (policy, workers, local, slow, delay, model, label), rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        tta = _time_to_target_cell(ok)
        moved = [r["bytes_moved"] / 1e6 for r in ok if r.get("bytes_moved")]
        cell = f"{model or 'real'} | " if simulated else ""
        lines.append(
            f"| {policy}{f' ({label})' if label else ''} | {workers} | {local} | {slow:g} | {delay:g} | {cell}"
            f"{len(ok)}/{len(rs)} | "
            f"{_spread([r.get('test_accuracy') for r in ok])} | {tta} | "
            f"{_spread([r.get('samples_per_s') for r in ok])} | "
            f"{_spread([r.get('updates_per_s') for r in ok])} | "
            f"{_spread([r.get('staleness_mean') for r in ok])} | "
            f"{_spread([r.get('staleness_max') for r in ok])} | {_spread(moved)} |")
    heads = headline(exp.name, records, exp.target_accuracy)
    if heads:
        lines += ["", *heads]
    return "\n".join(lines) + "\n"


def _seconds(t: float) -> str:
    return f"{t:.1f} s"


def _time_comparison(who: str, t, ref: str, t_ref, target) -> str:
    """How ``who``'s median time to target compares with ``ref``'s, either possibly None
    (never reached)."""
    goal = "the target" if target is None else f"{target:g}"
    if t is None and t_ref is None:
        return f"neither {who} nor {ref} reached {goal}"
    if t is None:
        return f"{who} never reached {goal} ({ref} did in {_seconds(t_ref)})"
    if t_ref is None:
        return f"{who} reached {goal} in {_seconds(t)}, {ref} never did"
    if t_ref > 0:
        return (f"time to target {t / t_ref:.2f} of {ref}'s "
                f"({_seconds(t)} vs {_seconds(t_ref)})")
    return f"{who} reached {goal} in {_seconds(t)}, {ref} in {_seconds(t_ref)}"


def _accuracy_comparison(a, a_ref) -> str:
    if a is None or a_ref is None:
        show = (lambda v: "not recorded" if v is None else f"{v:.3f}")
        return f"final accuracy {show(a)} vs {show(a_ref)}"
    return f"final accuracy {a - a_ref:+.3f} ({a:.3f} vs {a_ref:.3f})"


def headline(name: str, records: list[dict], target: float | None = None) -> list[str]:
    """The comparisons each experiment is for, from medians over repeats. ``target``, the
    accuracy of time to target, is named where a configuration never reached it."""
    models = sorted({r.get("delay_model") or "" for r in records})
    if len(models) > 1:     # simulated under several delay models: compared within each
        out = []
        for m in models:
            lines = headline(name, [r for r in records if (r.get("delay_model") or "") == m],
                             target)
            if lines:
                out += [f"- delay model {m or 'real'}:", *("  " + line for line in lines)]
        return out
    ok = [r for r in records if r["status"] == "ok"]
    if name == "straggler":
        return _straggler_headline(ok, target)
    if name == "staleness":
        return _staleness_headline(ok)
    if name == "throughput":
        return _throughput_headline(ok, target)
    if name == "local-steps":
        return _local_steps_headline(ok, target)
    return []


def _local_steps_headline(ok: list[dict], target) -> list[str]:
    lines = []
    for w in sorted({r["workers"] for r in ok}):
        base = [r for r in ok if r["workers"] == w and r.get("local_steps", 1) == 1]
        if not base:
            continue
        a_ref = median_of(base, "test_accuracy")
        t_ref = median_time_to_target(base)
        b_ref = median_of(base, "bytes_moved")
        for h in sorted({r.get("local_steps", 1) for r in ok if r["workers"] == w} - {1}):
            rs = [r for r in ok if r["workers"] == w and r.get("local_steps", 1) == h]
            b = median_of(rs, "bytes_moved")
            moved = (f"{b_ref / b:.1f}x fewer bytes moved" if b and b_ref else
                     "bytes not recorded")
            times = _time_comparison(f"H={h}", median_time_to_target(rs), "H=1", t_ref,
                                     target)
            lines.append(f"- {w} worker(s), H={h} against H=1: {moved}; {times}; "
                         f"{_accuracy_comparison(median_of(rs, 'test_accuracy'), a_ref)}")
    return lines


def _straggler_headline(ok: list[dict], target) -> list[str]:
    lines = []
    for ref_name in ("sync", "ddp"):
        ref = [r for r in ok if r["policy"] == ref_name]
        if not ref:
            continue
        t_ref = median_time_to_target(ref)
        a_ref = median_of(ok, "test_accuracy", policy=ref_name)
        for pol in sorted({r["policy"] for r in ok} - set(SYNCHRONOUS)):
            t = median_time_to_target([r for r in ok if r["policy"] == pol])
            a = median_of(ok, "test_accuracy", policy=pol)
            mine, theirs = f"`{pol}`", f"`{ref_name}`"
            times = _time_comparison(mine, t, theirs, t_ref, target)
            lines.append(f"- {mine} vs {theirs}: {times}; {_accuracy_comparison(a, a_ref)}")
    return lines


def _staleness_headline(ok: list[dict]) -> list[str]:
    single = median_of(ok, "test_accuracy", workers=1)
    if single is None:
        return []
    lines = []
    for w in sorted({r["workers"] for r in ok} - {1}):
        none = median_of(ok, "test_accuracy", workers=w, policy="none")
        if none is None:
            continue
        lost = single - none
        loss = f"lost {lost:.3f}" if lost > 0 else "lost nothing"
        lines.append(f"- {w} workers, none: {none:.3f} against one worker's {single:.3f} "
                     f"({loss})")
        for pol in sorted({r["policy"] for r in ok if r["workers"] == w} - {"none"}):
            a = median_of(ok, "test_accuracy", workers=w, policy=pol)
            if a is None:
                lines.append(f"  - {pol}: final accuracy not recorded")
            elif lost > 0:
                lines.append(f"  - {pol}: {a:.3f}, recovers {(a - none) / lost:.0%} of what "
                             f"none lost")
            else:
                lines.append(f"  - {pol}: {a:.3f} ({a - none:+.3f} against none)")
    return lines


def _throughput_headline(ok: list[dict], target) -> list[str]:
    single = median_of(ok, "samples_per_s", policy="single")
    if not single:
        return []
    t_single = median_time_to_target([r for r in ok if r["policy"] == "single"])
    lines = []
    for w in sorted({r["workers"] for r in ok if r["policy"] != "single"}):
        rs = [r for r in ok if r["workers"] == w and r["policy"] != "single"]
        sps = median_of(rs, "samples_per_s")
        speed = ("samples/s not recorded" if sps is None else
                 f"{sps:,.0f} samples/s = {sps / single:.2f} x one plain process "
                 f"({single:,.0f})")
        times = _time_comparison("they", median_time_to_target(rs), "the plain process",
                                 t_single, target)
        lines.append(f"- {w} worker(s): {speed}; {times}")
    return lines


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
        from asgd.experiments.plots import plot_experiment

        plot_experiment(exp.name, records, out, target, suffix=suffix)
        if exp.name.startswith("reproduce-") and not suffix:   # a paper's table and plot
            from asgd.experiments.literature_report import write_literature

            write_literature(exp, records)
    except ImportError:
        pass
    return table
