"""The reproductions' own tables and plots (``asgd experiment reproduce``): each paper's
measure from the runs' records, beside the experiments' usual summary.md and plots.

    write_literature(exp, records)      # <out>/literature.md and <out>/literature.png
    text = literature_table("reproduce-dai", records, target=0.5)

- ``dai``: samples to the target at each staleness s, over s = 0's, per optimizer and depth;
  and each run's measured staleness (the fraction of pushes exactly s stale).
- ``ringmaster``: simulated time to the target against R, with the pushes dropped.
- ``mishchenko``: time to the target and accuracy at plain ASGD's last moment, per policy and
  worker count.
- ``liu``: final accuracy, updates and time to the target per variant.

Medians over repeats; "never" where the median run did not reach the target.
"""
from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _groups(records: list[dict], key) -> dict:
    out: dict = {}
    for r in records:
        if r.get("status") == "ok":
            out.setdefault(key(r), []).append(r)
    return out


def _median(rs: list[dict], field: str, never=float("inf")):
    """The median of ``field`` over ``rs``, a missing value counting as ``never`` (a run
    that did not reach the target is the slowest); None if the median is ``never``."""
    vals = [r.get(field) if r.get(field) is not None else never for r in rs]
    if not vals:
        return None
    m = statistics.median(vals)
    return None if m == never else m


def accuracy_at(curve: list[dict], t: float) -> float | None:
    """The accuracy of the last evaluation at or before simulated time ``t``."""
    pts = [p for p in curve or [] if p["t"] <= t + 1e-9]
    return pts[-1]["accuracy"] if pts else None


def _label_parts(label: str) -> tuple:
    depth, opt, s = label.rsplit("-", 2)
    return depth, opt, int(s[1:])


# ----------------------------------------------------------------------------------------------
# dai

def dai_table(records: list[dict], target: float, budget: int) -> str:
    g = _groups(records, lambda r: _label_parts(r["label"]))
    stale = sorted({k[2] for k in g})
    rows = sorted({k[:2] for k in g}, key=lambda k: (k[0], ["sgd", "momentum", "adam",
                                                           "rmsprop"].index(k[1])))
    head = " | ".join(f"s={s}" for s in stale)
    lines = [f"Samples to test accuracy {target:g}, over s = 0's (s = 0: thousands of "
             f"samples); '>' a run that never reached it within the budget of {budget:,}.",
             "", f"| model | optimizer | s = 0 samples | {head} |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in stale) + " |"]
    for depth, opt in rows:
        base = _median(g.get((depth, opt, 0), []), "samples_to_target")
        cells = []
        for s in stale:
            m = _median(g.get((depth, opt, s), []), "samples_to_target")
            if not g.get((depth, opt, s)):
                cells.append("-")
            elif base is None:
                cells.append("never" if m is None else f"{m / 1000:.0f}k")
            else:
                cells.append(f">{budget / base:.2f}" if m is None else f"{m / base:.2f}")
        first = "never" if base is None else f"{base / 1000:.1f}k"
        lines.append(f"| {depth} | {opt} | {first} | " + " | ".join(cells) + " |")
    lines += ["", f"Final test accuracy (median over runs) after {budget:,} samples.", "",
              f"| model | optimizer | {head} |",
              "| --- | --- | " + " | ".join("---:" for _ in stale) + " |"]
    for depth, opt in rows:
        cells = [f"{_median(g[(depth, opt, s)], 'test_accuracy'):.3f}"
                 if g.get((depth, opt, s)) else "-" for s in stale]
        lines.append(f"| {depth} | {opt} | " + " | ".join(cells) + " |")
    lines += ["", "Measured staleness: the fraction of pushes exactly s versions stale "
              "(the first s pushes of a run are less stale: every worker's first gradient "
              "is computed from version 0), and the largest.", "",
              "| s | runs | pushes exactly s stale (min over runs) | largest staleness |",
              "| ---: | ---: | ---: | ---: |"]
    for s in stale:
        rs = [r for k, v in g.items() if k[2] == s for r in v]
        frac = [r["staleness_histogram"].get(str(s), 0) / max(1, sum(
            r["staleness_histogram"].values())) for r in rs]
        lines.append(f"| {s} | {len(rs)} | {min(frac):.4f} | "
                     f"{max(r['staleness_max'] for r in rs)} |")
    return "\n".join(lines) + "\n"


def dai_figure(records: list[dict], target: float, budget: int):
    g = _groups(records, lambda r: _label_parts(r["label"]))
    depths = sorted({k[0] for k in g})
    fig, axes = plt.subplots(1, len(depths), figsize=(5.5 * len(depths), 4), squeeze=False)
    for ax, depth in zip(axes[0], depths):
        for opt in ("sgd", "momentum", "adam", "rmsprop"):
            base = _median(g.get((depth, opt, 0), []), "samples_to_target")
            pts = [(s, _median(v, "samples_to_target")) for (d, o, s), v in sorted(g.items())
                   if d == depth and o == opt]
            if not pts or base is None:
                continue
            xs = [s for s, _ in pts]
            ys = [(m if m is not None else budget) / base for _, m in pts]
            ax.plot(xs, ys, marker="o", label=opt)
            for s, (_, m) in zip(xs, pts):
                if m is None:        # never reached: drawn at the budget, hollow
                    ax.plot([s], [budget / base], marker="o", mfc="white", color="gray")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks([0, 1, 2, 4, 8, 16], ["0", "1", "2", "4", "8", "16"])
        ax.set_xlabel("staleness s")
        ax.set_ylabel(f"samples to {target:g}, over s = 0's")
        ax.set_title(f"{depth} (hollow: not reached in the budget)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# ringmaster, mishchenko, liu

def _r_value(label: str) -> tuple:
    """(depth, R) of a Ringmaster label ``mlp4-R16`` (R infinite for ``Rinf``)."""
    depth, _, r = label.rpartition("-R")
    return depth, float("inf") if r == "inf" else float(r)


def _r_name(label: str) -> str:
    r = label.rpartition("-R")[2]
    return "∞" if r == "inf" else r


def ringmaster_table(records: list[dict], target: float) -> str:
    g = _groups(records, lambda r: r["label"])
    lines = [f"Simulated time to test accuracy {target:g} against R (pushes staler than R "
             "dropped), and what each run applied and dropped.", "",
             "| model | R | workers | time to target | final accuracy | simulated time of "
             "the run | pushes dropped | staleness mean (max) of all pushes |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label in sorted(g, key=_r_value):
        rs = g[label]
        t = _median(rs, "time_to_target_s")
        pushes = [r["updates_applied"] + (r.get("updates_dropped") or 0) for r in rs]
        dropped = statistics.median((r.get("updates_dropped") or 0) / p
                                    for r, p in zip(rs, pushes))
        name = _r_name(label)
        lines.append(f"| {_r_value(label)[0]} | {name if name != '∞' else '∞ (none)'} | "
                     f"{rs[0]['workers']} | {'never' if t is None else f'{t:,.0f}'} | "
                     f"{_median(rs, 'test_accuracy'):.3f} | {_median(rs, 'train_s'):,.0f} | "
                     f"{dropped:.0%} | {_median(rs, 'staleness_mean'):.1f} "
                     f"({max(r['staleness_max'] for r in rs)}) |")
    return "\n".join(lines) + "\n"


def ringmaster_figure(records: list[dict], target: float):
    g = _groups(records, lambda r: r["label"])
    depths = sorted({_r_value(lb)[0] for lb in g})
    fig, axes = plt.subplots(len(depths), 2, figsize=(11, 4 * len(depths)), squeeze=False)
    for (a, b), depth in zip(axes, depths):
        labels = sorted((lb for lb in g if _r_value(lb)[0] == depth), key=_r_value)
        xs = list(range(len(labels)))
        names = [_r_name(lb) for lb in labels]
        times = [_median(g[lb], "time_to_target_s") for lb in labels]
        top = max([t for t in times if t is not None] or [1.0])
        a.bar(xs, [t if t is not None else 0 for t in times])
        for x, t in zip(xs, times):
            if t is None:
                a.text(x, 0.02 * top, "never", ha="center", color="firebrick", rotation=90)
        a.set_xticks(xs, names)
        a.set_xlabel("R (server.max_staleness)")
        a.set_ylabel(f"simulated time to {target:g}")
        a.set_title(depth)
        for i, lb in enumerate(labels):
            pts = [p for p in g[lb][0]["curve"] if not p["final"]]
            b.plot([p["t"] for p in pts], [p["accuracy"] for p in pts], label=f"R={names[i]}",
                   color=f"C{i % 10}")
        b.axhline(target, color="gray", ls="--", lw=0.8)
        b.set_xlabel("simulated time")
        b.set_ylabel("test accuracy")
        b.set_title(depth)
        b.legend(fontsize=7)
    fig.suptitle("Ringmaster: pushes staler than R dropped, speeds 1/(i+1)")
    fig.tight_layout()
    return fig


def mishchenko_table(records: list[dict], target: float) -> str:
    g = _groups(records, lambda r: (r["workers"], r["label"]))
    lines = [f"Per worker count: simulated time to test accuracy {target:g}, and the "
             "accuracy each policy has when plain ASGD (`none`) ends its budget of samples.",
             "", "| workers | policy | time to target | accuracy at none's end | final "
             "accuracy | simulated time of the run | staleness mean (max) |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for n in sorted({k[0] for k in g}):
        plain = g.get((n, "none"), [])
        end = _median(plain, "train_s") if plain else None
        for (m, label), rs in g.items():
            if m != n:
                continue
            t = _median(rs, "time_to_target_s")
            at = [a for a in (accuracy_at(r.get("curve"), end) for r in rs) if a is not None] \
                if end is not None else []
            lines.append(f"| {n} | {label} | {'never' if t is None else f'{t:,.1f}'} | "
                         f"{f'{statistics.median(at):.3f}' if at else '-'} | "
                         f"{_median(rs, 'test_accuracy'):.3f} | {_median(rs, 'train_s'):,.1f}"
                         f" | {_median(rs, 'staleness_mean'):.1f} "
                         f"({max(r['staleness_max'] for r in rs)}) |")
    return "\n".join(lines) + "\n"


def curves_figure(records: list[dict], target: float, by, title: str):
    """Accuracy against simulated time, one panel per value of ``by(record)``."""
    panels = _groups(records, by)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (key, rs) in zip(axes[0], sorted(panels.items(),
                                             key=lambda kv: (kv[1][0]["workers"], kv[0]))):
        for i, label in enumerate(sorted({r["label"] for r in rs})):
            r = next(r for r in rs if r["label"] == label)
            pts = [p for p in r["curve"] if not p["final"]]
            ax.plot([p["t"] for p in pts], [p["accuracy"] for p in pts], label=label,
                    color=f"C{i % 10}")
        ax.axhline(target, color="gray", ls="--", lw=0.8)
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlim(left=0)
        ax.set_xlabel("simulated time")
        ax.set_ylabel("test accuracy")
        ax.set_title(str(key))
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def liu_table(records: list[dict], target: float) -> str:
    g = _groups(records, lambda r: r["label"])
    lines = [f"Local SGD, outer Nesterov: final accuracy, server updates and simulated time "
             f"to test accuracy {target:g}.", "",
             "| variant | policy | workers | H | outer lr | final accuracy | updates to "
             "target | time to target | updates | simulated time |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, rs in g.items():
        r = rs[0]
        reach = [next((p["version"] for p in x["curve"] if p["accuracy"] >= target), None)
                 for x in rs]
        u = statistics.median(v if v is not None else float("inf") for v in reach)
        t = _median(rs, "time_to_target_s")
        lines.append(f"| {label} | {r['policy']} | {r['workers']} | {r['local_steps']} | "
                     f"{r.get('outer_lr', '-')} | {_median(rs, 'test_accuracy'):.3f} | "
                     f"{'never' if u == float('inf') else f'{u:,.0f}'} | "
                     f"{'never' if t is None else f'{t:,.1f}'} | "
                     f"{_median(rs, 'updates_applied'):,.0f} | {_median(rs, 'train_s'):,.1f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------

def _views(kind: str, records: list[dict], target: float, budget: int):
    """A reproduction's (table, figure) makers, bound to its records."""
    views = {
        "dai": (lambda: dai_table(records, target, budget),
                lambda: dai_figure(records, target, budget)),
        "ringmaster": (lambda: ringmaster_table(records, target),
                       lambda: ringmaster_figure(records, target)),
        "mishchenko": (lambda: mishchenko_table(records, target),
                       lambda: curves_figure(records, target, lambda r: f"{r['workers']} workers",
                                             "Mishchenko: Pareto(1.5) delays")),
        "liu": (lambda: liu_table(records, target),
                lambda: curves_figure(records, target, lambda r: f"{r['workers']} workers, "
                                      f"H={r['local_steps']}", "Liu: Local SGD, unequal speeds")),
    }
    if kind not in views:
        raise ValueError(f"no reproduction {kind!r} (known: dai, ringmaster, mishchenko, liu)")
    return views[kind]


def literature_table(name: str, records: list[dict], target: float, budget: int) -> str:
    return _views(name.removeprefix("reproduce-"), records, target, budget)[0]()


def literature_figure(name: str, records: list[dict], target: float, budget: int):
    return _views(name.removeprefix("reproduce-"), records, target, budget)[1]()


def write_literature(exp, records: list[dict]) -> tuple[Path, Path | None]:
    """``<out>/literature.md`` (the reproduction's table) and ``<out>/literature.png``."""
    ok = [r for r in records if r.get("status") == "ok"]
    md = exp.out / "literature.md"
    md.write_text(literature_table(exp.name, ok, exp.target_accuracy, exp.samples)
                  if ok else "no run succeeded\n")
    if not ok:
        return md, None
    png = exp.out / "literature.png"
    fig = literature_figure(exp.name, ok, exp.target_accuracy, exp.samples)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return md, png
