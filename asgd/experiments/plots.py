"""PNG plots of an experiment's records (matplotlib, the ``plot`` extra).

    plot_experiment("straggler", records, Path("experiments/straggler"), target=0.9)

Writes accuracy_vs_time.png, accuracy_vs_updates.png, staleness.png and a bar chart of
samples/s, final accuracy and time to target per configuration.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _label(r: dict) -> str:
    s = f"{r['policy']} w{r['workers']}"
    if r["slow_factor"] != 1:
        s += f" x{r['slow_factor']:g}"
    if r["delay_s"]:
        s += f" +{r['delay_s']:g}s"
    return s


def _configs(records):
    out: dict[str, list] = {}
    for r in records:
        out.setdefault(_label(r), []).append(r)
    return out


def plot_experiment(name: str, records: list[dict], out: Path, target: float,
                    suffix: str = "") -> list[Path]:
    ok = [r for r in records if r["status"] == "ok" and r.get("curve")]
    paths = []
    configs = _configs(ok)
    colors = {label: f"C{i % 10}" for i, label in enumerate(configs)}
    for xkey, xlabel, fname in (("t", "seconds since training began", "accuracy_vs_time.png"),
                                ("version", "server updates", "accuracy_vs_updates.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, rs in configs.items():
            for i, r in enumerate(rs):
                pts = [p for p in r["curve"] if not p["final"]]
                ax.plot([p[xkey] for p in pts], [p["accuracy"] for p in pts], color=colors[label],
                        alpha=0.85, lw=1.4, label=label if i == 0 else None)
        ax.axhline(target, color="gray", ls="--", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}: test accuracy")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fname = fname.replace(".png", f"{suffix}.png")
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        paths.append(out / fname)

    hists = [(l, rs[0]) for l, rs in configs.items() if rs[0].get("staleness_histogram")]
    if hists:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, r in hists:
            h = {int(k): v for k, v in r["staleness_histogram"].items()}
            total = sum(h.values()) or 1
            xs = sorted(h)
            ax.plot(xs, [h[x] / total for x in xs], marker="o", ms=3, color=colors[label],
                    label=f"{label} (mean {r.get('staleness_mean') or 0:.2f})")
        ax.set_xlabel("staleness (server versions)")
        ax.set_ylabel("fraction of pushes")
        ax.set_title(f"{name}: staleness distribution")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "staleness.png", dpi=110)
        plt.close(fig)
        paths.append(out / "staleness.png")

    labels = list(configs)
    if labels:
        import statistics

        def med(rs, key):
            vals = [r.get(key) for r in rs if r.get(key) is not None]
            return statistics.median(vals) if vals else 0.0

        fig, axes = plt.subplots(1, 3, figsize=(12, 4))
        for ax, key, title in zip(axes, ("samples_per_s", "test_accuracy", "time_to_target_s"),
                                  ("samples/s", "final test accuracy",
                                   f"seconds to accuracy {target:g}")):
            if key == "time_to_target_s":
                from asgd.experiments.measures import median_time_to_target

                meds = [median_time_to_target(configs[l]) for l in labels]
                top = max([m for m in meds if m is not None], default=1.0)
                vals = [m if m is not None else 0.0 for m in meds]
                for i, (l, m) in enumerate(zip(labels, meds)):
                    n = len(configs[l])
                    k = sum(r.get(key) is not None for r in configs[l])
                    ax.text(i, (m or 0.0) + 0.02 * top, "never" if m is None else f"{k}/{n}",
                            ha="center", fontsize=7)
            else:
                vals = [med(configs[l], key) for l in labels]
            ax.bar(range(len(labels)), vals, color=[colors[l] for l in labels])
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
            ax.set_title(title)
            if key == "test_accuracy":
                lo = min(v for v in vals if v) if any(vals) else 0
                ax.set_ylim(max(0.0, lo - 0.05), 1.0)
        fig.suptitle(f"{name} (medians)")
        fig.tight_layout()
        fig.savefig(out / f"bars{suffix}.png", dpi=110)
        plt.close(fig)
        paths.append(out / f"bars{suffix}.png")
    return paths
