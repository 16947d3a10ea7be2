"""Experiment reports without running anything: headline sentences when a value is missing,
the plots' axes, and `asgd experiment report` on a results.json written here."""
from __future__ import annotations

import json

import pytest

from asgd.experiments.report import headline

PNG = b"\x89PNG\r\n\x1a\n"


def _curve(*points, final_accuracy=None):
    """[(t, accuracy), ...] as an evaluation curve, with a final evaluation if given."""
    curve = [{"t": t, "version": 10 * i, "accuracy": a, "final": False}
             for i, (t, a) in enumerate(points)]
    if final_accuracy is not None:
        curve.append({"t": points[-1][0] + 1, "version": 10 * len(points),
                      "accuracy": final_accuracy, "final": True})
    return curve


def _record(policy, workers, curve, tta, accuracy=0.9, samples_per_s=1000.0, hist=None):
    return {"experiment": "x", "policy": policy, "workers": workers, "slow_factor": 1.0,
            "delay_s": 0.0, "repeat": 0, "status": "ok", "test_accuracy": accuracy,
            "time_to_target_s": tta, "samples_per_s": samples_per_s, "updates_per_s": 20.0,
            "staleness_mean": 0.0 if workers == 1 else 1.0, "staleness_max": workers - 1,
            "staleness_histogram": hist or {"0": 100}, "train_s": curve[-1]["t"],
            "curve": curve}


# ----------------------------------------------------------------------------------------------
# headlines

def _throughput(t_single, t_workers):
    return [{"status": "ok", "policy": "single", "workers": 1, "samples_per_s": 2000.0,
             "time_to_target_s": t_single},
            {"status": "ok", "policy": "none", "workers": 2, "samples_per_s": 3000.0,
             "time_to_target_s": t_workers}]


@pytest.mark.parametrize("t_single, t_workers, ending", [
    (2.0, 3.0, "time to target 1.50 of the plain process's (3.0 s vs 2.0 s)"),
    (2.0, None, "they never reached 0.9 (the plain process did in 2.0 s)"),
    (None, 3.0, "they reached 0.9 in 3.0 s, the plain process never did"),
    (None, None, "neither they nor the plain process reached 0.9"),
])
def test_throughput_headline_reads_whether_or_not_the_target_was_reached(t_single, t_workers,
                                                                         ending):
    assert headline("throughput", _throughput(t_single, t_workers), target=0.9) == [
        f"- 2 worker(s): 3,000 samples/s = 1.50 x one plain process (2,000); {ending}"]


def test_straggler_headline_names_the_target_a_policy_never_reached():
    recs = [{"status": "ok", "policy": "none", "workers": 4, "test_accuracy": 0.88,
             "time_to_target_s": None},
            {"status": "ok", "policy": "sync", "workers": 4, "test_accuracy": 0.91,
             "time_to_target_s": 25.0}]
    assert headline("straggler", recs, target=0.9) == [
        "- `none` vs `sync`: `none` never reached 0.9 (`sync` did in 25.0 s); final accuracy "
        "-0.030 (0.880 vs 0.910)"]
    recs[1]["time_to_target_s"] = None
    assert headline("straggler", recs)[0].startswith(
        "- `none` vs `sync`: neither `none` nor `sync` reached the target; final accuracy")


def test_staleness_headline_when_many_workers_lost_nothing():
    recs = [{"status": "ok", "policy": "none", "workers": 1, "test_accuracy": 0.90},
            {"status": "ok", "policy": "none", "workers": 8, "test_accuracy": 0.91},
            {"status": "ok", "policy": "scale", "workers": 8, "test_accuracy": 0.92}]
    assert headline("staleness", recs) == [
        "- 8 workers, none: 0.910 against one worker's 0.900 (lost nothing)",
        "  - scale: 0.920 (+0.010 against none)"]


# ----------------------------------------------------------------------------------------------
# plots

@pytest.fixture
def plots():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from asgd.experiments import plots

    yield plots
    plt.close("all")


def _two_configs(tta_one, tta_two):
    one = _record("none", 1, _curve((-1.0, 0.1), (1.0, 0.6), (2.0, 0.92)), tta_one, 0.92)
    two = _record("none", 2, _curve((-0.5, 0.1), (1.0, 0.5), (2.0, 0.86)), tta_two, 0.86,
                  hist={"0": 20, "1": 60, "2": 20})
    return [one, two]


def test_accuracy_against_time_starts_at_zero_seconds(plots):
    configs = plots.configs_of(_two_configs(2.0, None))
    ax = plots.accuracy_figure("x", configs, 0.9, "t", "seconds").axes[0]
    left, right = ax.get_xlim()
    assert left == 0 and right >= 2.0


def test_final_accuracy_bars_start_at_zero(plots):
    fig = plots.bars_figure("x", plots.configs_of(_two_configs(2.0, None)), 0.9)
    acc = fig.axes[1]
    assert acc.get_ylim()[0] == 0
    assert [round(p.get_height(), 3) for p in acc.patches] == [0.92, 0.86]


def test_time_to_target_bars_mark_the_configurations_that_never_reached_it(plots):
    fig = plots.bars_figure("x", plots.configs_of(_two_configs(2.0, None)), 0.9)
    tta = fig.axes[2]
    assert [p.get_height() for p in tta.patches] == [2.0, 0.0]
    texts = {t.get_text(): t.get_position()[0] for t in tta.texts}
    assert texts == {"1/1": 0, "never": 1}
    bottom, top = tta.get_ylim()
    assert bottom == 0 and top > 2.0


def test_time_to_target_panel_says_so_when_no_run_reached_it(plots):
    fig = plots.bars_figure("x", plots.configs_of(_two_configs(None, None)), 0.9)
    tta = fig.axes[2]
    assert [t.get_text() for t in tta.texts] == ["no run reached accuracy 0.9"]
    assert not tta.patches
    assert list(tta.get_xticks()) == [] and list(tta.get_yticks()) == []


def test_a_one_value_staleness_distribution_is_a_large_marker_in_the_legend(plots):
    fig = plots.staleness_figure("x", plots.configs_of(_two_configs(2.0, None)))
    ax = fig.axes[0]
    one, two = ax.get_lines()
    assert list(one.get_xdata()) == [0] and list(one.get_ydata()) == [1.0]
    assert one.get_markersize() > 2 * two.get_markersize()
    assert one.get_zorder() > two.get_zorder()
    assert ax.get_ylim()[1] > 1.0                   # the point is not on the frame
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "none w1 (mean 0.00)", "none w2 (mean 1.00)"]


def test_plot_experiment_writes_every_png(plots, tmp_path):
    paths = plots.plot_experiment("x", _two_configs(2.0, None), tmp_path, 0.9, suffix="-0.9")
    assert sorted(p.name for p in paths) == [
        "accuracy_vs_time-0.9.png", "accuracy_vs_updates-0.9.png", "bars-0.9.png",
        "staleness.png"]
    for p in paths:
        assert p.read_bytes()[:8] == PNG


# ----------------------------------------------------------------------------------------------
# asgd experiment report

def test_report_at_another_target_recomputes_time_to_target_from_the_curves(processes,
                                                                            tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "exp"
    out.mkdir()
    records = [   # as run to 0.9: single reached it at 3.0 s, the two workers never
        _record("single", 1, _curve((0.0, 0.1), (1.0, 0.55), (3.0, 0.92)), 3.0, 0.92, 2000.0),
        _record("none", 2, _curve((0.0, 0.1), (1.0, 0.3), (2.0, 0.6), (4.0, 0.85),
                                  final_accuracy=0.86), None, 0.86, 3000.0,
                hist={"0": 30, "1": 70})]
    (out / "results.json").write_text(json.dumps(records))
    (out / "experiment.json").write_text(json.dumps(
        {"name": "throughput", "samples": 1000, "target_accuracy": 0.9, "max_seconds": 60}))
    result = processes.run(["-m", "asgd.cli", "experiment", "report", str(out),
                            "--target-accuracy", "0.5"], timeout=120)
    assert result.returncode == 0, result.stderr
    summary = (out / "summary-0.5.md").read_text()
    assert summary in result.stdout
    assert "target accuracy 0.5;" in summary
    assert "| single | 1 | 1 | 1 | 0 | 1/1 | 0.920 | 1.0 |" in summary
    assert "| none | 2 | 1 | 1 | 0 | 1/1 | 0.860 | 2.0 |" in summary
    assert summary.rstrip().endswith("- 2 worker(s): 3,000 samples/s = 1.50 x one plain "
                                     "process (2,000); time to target 2.00 of the plain "
                                     "process's (2.0 s vs 1.0 s)")
    for name in ("accuracy_vs_time-0.5.png", "accuracy_vs_updates-0.5.png", "bars-0.5.png",
                 "staleness.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert not (out / "summary.md").exists()      # the report as run is left alone
    assert json.loads((out / "results.json").read_text()) == records
