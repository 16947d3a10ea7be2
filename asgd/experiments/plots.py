"""PNG plots of an experiment's records (matplotlib, the ``plot`` extra).

    plot_experiment("straggler", records, Path("experiments/straggler"), target=0.9)
    fig = bars_figure("straggler", configs_of(records), target=0.9)   # to look at, unsaved

Writes accuracy_vs_time.png, accuracy_vs_updates.png, staleness.png and a bar chart of
samples/s, final accuracy and time to target per configuration. Each ``*_figure`` function
draws one figure and returns it; ``plot_experiment`` saves and closes them.
"""
from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from asgd.experiments.measures import median_time_to_target  # noqa: E402

SINGLE_POINT_MS = 13   # marker size of the largest one-value staleness distribution


def _label(r: dict) -> str:
    s = f"{r['policy']} w{r['workers']}"
    if r.get("label"):
        s += f" {r['label']}"
    if r["slow_factor"] != 1:
        s += f" x{r['slow_factor']:g}"
    if r["delay_s"]:
        s += f" +{r['delay_s']:g}s"
    model = r.get("delay_model")
    if model:     # simulated; a trace by its run's folder, not its whole path
        s += f" trace {Path(model[6:]).name}" if model.startswith("trace:") else f" {model}"
    return s


def configs_of(records: list[dict]) -> dict[str, list]:
    """The successful runs with a curve, by configuration label, in the records' order."""
    out: dict[str, list] = {}
    for r in records:
        if r["status"] == "ok" and r.get("curve"):
            out.setdefault(_label(r), []).append(r)
    return out


def _colors(configs: dict) -> dict[str, str]:
    return {label: f"C{i % 10}" for i, label in enumerate(configs)}


def accuracy_figure(name: str, configs: dict, target: float, xkey: str, xlabel: str):
    """Test accuracy of every run against ``xkey`` of its curve ("t" or "version")."""
    colors = _colors(configs)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, rs in configs.items():
        for i, r in enumerate(rs):
            pts = [p for p in r["curve"] if not p["final"]]
            ax.plot([p[xkey] for p in pts], [p["accuracy"] for p in pts], color=colors[label],
                    alpha=0.85, lw=1.4, label=label if i == 0 else None)
    ax.axhline(target, color="gray", ls="--", lw=0.8)
    ax.set_xlim(left=0)   # evaluations before training began have t < 0
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{name}: test accuracy")
    if configs:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def staleness_figure(name: str, configs: dict):
    """The staleness distribution of each configuration's first run, or None if none has one.
    A distribution of one value (one worker, ``sync``) is a single large hollow marker, each
    a size smaller than the one before, so that several at the same point stay visible."""
    colors = _colors(configs)
    hists = [(l, rs[0]) for l, rs in configs.items() if rs[0].get("staleness_histogram")]
    if not hists:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    singles = 0
    for label, r in hists:
        h = {int(k): v for k, v in r["staleness_histogram"].items()}
        total = sum(h.values()) or 1
        xs = sorted(h)
        ys = [h[x] / total for x in xs]
        text = f"{label} (mean {r.get('staleness_mean') or 0:.2f})"
        if len(xs) == 1:
            ms = max(4, SINGLE_POINT_MS - 3 * singles)
            singles += 1
            ax.plot(xs, ys, ls="none", marker="o", ms=ms, mfc="none", mew=2,
                    color=colors[label], zorder=3, label=text)
        else:
            ax.plot(xs, ys, marker="o", ms=3, color=colors[label], label=text)
    ax.set_xlim(left=-1)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("staleness (server versions)")
    ax.set_ylabel("fraction of pushes")
    ax.set_title(f"{name}: staleness distribution")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _median(rs: list[dict], key: str) -> float:
    vals = [r.get(key) for r in rs if r.get(key) is not None]
    return statistics.median(vals) if vals else 0.0


def _bars(ax, configs: dict, vals: list[float]) -> None:
    labels = list(configs)
    colors = _colors(configs)
    ax.bar(range(len(labels)), vals, color=[colors[l] for l in labels])
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)


def _accuracy_bars(ax, configs: dict) -> None:
    vals = [_median(rs, "test_accuracy") for rs in configs.values()]
    _bars(ax, configs, vals)
    for i, v in enumerate(vals):
        ax.text(i, v + 0.01, f"{v:.3f}", ha="center", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_title("final test accuracy")


def _time_to_target_bars(ax, configs: dict, target: float) -> None:
    """Median seconds to ``target``, with how many runs reached it; "never" on the axis for a
    configuration whose median run did not, and only a sentence if no run reached it."""
    ax.set_title(f"seconds to accuracy {target:g}")
    meds = [median_time_to_target(rs) for rs in configs.values()]
    if all(m is None for m in meds):
        ax.text(0.5, 0.5, f"no run reached accuracy {target:g}", transform=ax.transAxes,
                ha="center", va="center", fontsize=11, color="dimgray")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    top = max(m for m in meds if m is not None)
    _bars(ax, configs, [m or 0.0 for m in meds])
    for i, (rs, m) in enumerate(zip(configs.values(), meds)):
        if m is None:
            ax.text(i, 0.03 * top, "never", ha="center", va="bottom", fontsize=9,
                    color="firebrick", fontweight="bold")
        else:
            k = sum(r.get("time_to_target_s") is not None for r in rs)
            ax.text(i, m + 0.02 * top, f"{k}/{len(rs)}", ha="center", fontsize=7)
    ax.set_ylim(0, 1.12 * top)


def bars_figure(name: str, configs: dict, target: float):
    """Medians per configuration: samples/s, final test accuracy and seconds to ``target``."""
    fig, (sps, acc, tta) = plt.subplots(1, 3, figsize=(12, 4))
    _bars(sps, configs, [_median(rs, "samples_per_s") for rs in configs.values()])
    sps.set_title("samples/s")
    _accuracy_bars(acc, configs)
    _time_to_target_bars(tta, configs, target)
    fig.suptitle(f"{name} (medians)")
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_experiment(name: str, records: list[dict], out: Path, target: float,
                    suffix: str = "") -> list[Path]:
    """Draw and save every plot of ``records`` into ``out``; the paths written."""
    configs = configs_of(records)
    sim = "simulated " if any(r.get("simulated") for r in records) else ""
    paths = [_save(accuracy_figure(name, configs, target, "t",
                                   f"{sim}seconds since training began"),
                   out / f"accuracy_vs_time{suffix}.png"),
             _save(accuracy_figure(name, configs, target, "version", "server updates"),
                   out / f"accuracy_vs_updates{suffix}.png")]
    fig = staleness_figure(name, configs)
    if fig is not None:
        paths.append(_save(fig, out / "staleness.png"))
    if configs:
        paths.append(_save(bars_figure(name, configs, target), out / f"bars{suffix}.png"))
    return paths
