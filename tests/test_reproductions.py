"""The literature's reproductions (asgd.experiments.literature): each one's runs at a tiny
budget on the simulator, and the shape of what they write. Not their results: those are
docs/experiments.md's."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from asgd.cli import cli
from asgd.experiments.literature import (DAI_OPTIMIZERS, REPRODUCTIONS, reproduction,
                                         run_reproduction, samples_to_target)
from asgd.experiments.literature_report import accuracy_at


def _run(name, tmp_path, **kw):
    exp = reproduction(name, tmp_path / name, "tiny", **kw)
    records = run_reproduction(exp, quiet=True)
    assert [r["status"] for r in records] == ["ok"] * len(exp.specs), \
        [r.get("error") for r in records]
    for f in ("results.json", "results.csv", "summary.md", "literature.md", "literature.png",
              "accuracy_vs_time.png"):
        assert (exp.out / f).exists(), f
    assert len(json.loads((exp.out / "results.json").read_text())) == len(exp.specs)
    return exp, records


@pytest.mark.slow
def test_dai_injects_exactly_s_staleness_for_every_optimizer_and_depth(tmp_path):
    exp, records = _run("dai", tmp_path)
    labels = {r["label"] for r in records}
    assert labels == {f"{d}-{o}-s{s}" for d in ("mlp1", "mlp4") for o in DAI_OPTIMIZERS
                      for s in (0, 2)}
    for r in records:
        s = int(r["label"].rsplit("-s", 1)[1])
        assert r["workers"] == s + 1
        # every push s stale but the first s (computed from version 0 before any update)
        assert r["staleness_histogram"] == ({"0": 12} if s == 0 else
                                            {"0": 1, "1": 1, "2": r["updates_applied"] - 2})
    table = (exp.out / "literature.md").read_text()
    assert "| mlp4 | rmsprop |" in table and "| 2 | 8 | 0.8333 | 2 |" in table


@pytest.mark.slow
def test_ringmaster_drops_only_under_a_bound(tmp_path):
    exp, records = _run("ringmaster", tmp_path)
    by = {r["label"]: r for r in records}
    assert by["mlp1-R2"]["updates_dropped"] > 0 and by["mlp1-Rinf"]["updates_dropped"] == 0
    assert by["mlp1-Rinf"]["staleness_max"] > 2
    assert "| mlp1 | ∞ (none) | 8 |" in (exp.out / "literature.md").read_text()


@pytest.mark.slow
def test_mishchenko_and_liu_compare_the_policies_they_name(tmp_path):
    _, records = _run("mishchenko", tmp_path, policy="scale")
    assert [r["policy"] for r in records] == ["none", "scale", "sync"]    # 0.1 x 16 / 4: 0.1
    assert all(r["delay_model"] == "pareto:1.5" for r in records)
    _, records = _run("liu", tmp_path)
    assert [r["policy"] for r in records] == ["sync", "none", "none", "delayed_nesterov",
                                              "delayed_nesterov+dylu"]
    assert {r["local_steps"] for r in records} == {2}
    assert {r["outer_lr"] for r in records} == {0.7, 0.7 / 4}


def test_samples_to_target_counts_what_an_update_holds():
    curve = [{"t": 1.0, "version": 10, "accuracy": 0.3, "final": False},
             {"t": 2.0, "version": 20, "accuracy": 0.6, "final": False}]
    rec = {"policy": "none", "workers": 4, "local_steps": 1, "curve": curve}
    assert samples_to_target(rec, 0.5, 32) == 20 * 32
    assert samples_to_target({**rec, "policy": "sync"}, 0.5, 32) == 20 * 32 * 4
    assert samples_to_target({**rec, "local_steps": 8}, 0.5, 32) == 20 * 32 * 8
    assert samples_to_target(rec, 0.9, 32) is None
    assert accuracy_at(curve, 1.5) == 0.3 and accuracy_at(curve, 0.5) is None


def test_every_reproduction_has_its_runs_and_a_bad_name_is_refused(tmp_path):
    for name in REPRODUCTIONS:
        exp = reproduction(name, tmp_path, "full")
        assert exp.specs and all(s.delay_model for s in exp.specs)
        assert len({s.name for s in exp.specs}) == len(exp.specs)   # one folder each
    with pytest.raises(ValueError, match="unknown reproduction 'x'"):
        reproduction("x", tmp_path)
    out = CliRunner().invoke(cli, ["experiment", "reproduce", "mishchenko", "--policy", "nope",
                                    "--out", str(tmp_path / "m")])
    assert out.exit_code != 0 and "unknown staleness policy" in out.output


def test_rmsprop_is_torchs_on_the_server():
    """Dai et al. compare RMSProp: the server's step is torch.optim.RMSprop's, number for
    number."""
    import torch

    from asgd.config import Config
    from asgd.core.optim import make_optimizer

    cfg = Config().replace(**{"optimizer.name": "rmsprop", "optimizer.lr": 0.01})
    w = torch.tensor([1.0, -2.0, 3.0])
    ref = w.clone().requires_grad_()
    mine = w.clone().requires_grad_()
    opt, torch_opt = make_optimizer(cfg, [mine], fused=True), torch.optim.RMSprop([ref], lr=0.01)
    for g in ([0.5, -1.0, 2.0], [0.1, 0.2, -0.3]):
        mine.grad, ref.grad = torch.tensor(g), torch.tensor(g)
        opt.step()
        torch_opt.step()
    assert isinstance(opt, torch.optim.RMSprop) and torch.equal(mine, ref)


def test_sync_with_more_workers_than_the_stall_guards_pushes_does_not_stall():
    """A sync update is one push of each of n workers: at n = 64 (more than the simulator's
    50 pushes an update before it calls a run stalled) the run still ends ok."""
    from asgd.config import Config
    from simulator import Simulation, parse_delay

    cfg = Config().replace(**{
        "model.name": "mlp", "model.args": {"hidden": [4]}, "data.name": "synthetic",
        "data.args": {"n_train": 2048, "n_test": 64, "shape": [8]}, "worker.batch_size": 8,
        "server.policy": "sync", "server.max_staleness": None, "run.workers": 64,
        "run.max_updates": 3, "run.seed": 0})
    summary = Simulation(cfg, parse_delay("pareto:1.5"), eval_every=3).run()
    assert summary["status"] == "ok", summary["failures"]
    assert summary["updates_applied"] == 3 and summary["samples"] > 50 * 8
