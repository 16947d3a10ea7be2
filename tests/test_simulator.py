"""The simulator: virtual workers driving the server's real update code in simulated time.
Bitwise reproducible, every policy the server accepts, 256 workers, trace replay, and
``asgd experiment --simulate`` writing the experiments' results files."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from asgd.config import Config
from asgd.core.policies import LOCAL_STEP_POLICIES, POLICIES
from asgd.metrics import MetricsWriter
from simulator import Simulation, parse_delay
from simulator.delays import read_trace
from simulator.runs import simulate


def small(workers: int = 4, updates: int = 40, **keys) -> Config:
    """A synthetic data set and a small MLP: a step takes about a millisecond."""
    base = {"model.name": "mlp", "model.args": {"hidden": [16]},
            "data.name": "synthetic", "data.args": {"n_train": 2048, "n_test": 256,
                                                    "shape": [16]},
            "optimizer.name": "adam", "optimizer.lr": 0.01, "worker.batch_size": 16,
            "server.policy": "none", "server.max_staleness": None,
            "run.workers": workers, "run.max_updates": updates, "run.seed": 0}
    base.update(keys)
    return Config().replace(**base)


def run(cfg: Config, delay: str = "exponential", eval_every: int = 20) -> Simulation:
    sim = Simulation(cfg, parse_delay(delay), eval_every=eval_every)
    sim.summary = sim.run()
    return sim


# ----------------------------------------------------------------------------------------------
# delay models

def test_delay_models_draw_what_they_say():
    assert [parse_delay("constant:2").sampler(3, 8, 0)() for _ in range(3)] == [2.0] * 3
    uniform = parse_delay("uniform:1:3").sampler(0, 4, 0)
    lo_hi = [uniform() for _ in range(200)]
    assert all(1 <= d <= 3 for d in lo_hi) and len(set(lo_hi)) > 100
    tail = parse_delay("pareto:1.5:0.2").sampler(1, 4, 0)
    assert min(tail() for _ in range(500)) >= 0.2
    assert [parse_delay("inverse").sampler(r, 4, 0)() for r in range(4)] == [1, 2, 3, 4]
    exp = parse_delay("exponential:2").sampler(0, 1, 7)
    assert sum(exp() for _ in range(4000)) / 4000 == pytest.approx(2.0, rel=0.1)
    # per worker and seed: the same seed, the same durations; another worker, others
    a, b = parse_delay("exponential"), parse_delay("exponential")
    draws = (lambda model, rank: (lambda f: [f() for _ in range(5)])(model.sampler(rank, 4, 5)))
    assert draws(a, 2) == draws(b, 2) != draws(a, 3)


@pytest.mark.parametrize("spec, says", [
    ("gamma", "unknown delay model 'gamma'"), ("uniform:2:1", "0 <= lo <= hi"),
    ("pareto:-1", "alpha > 0"), ("constant:0", "must be > 0"), ("constant:x", "not a number"),
    ("exponential:1:2", "at most 1"), ("trace", "needs a run")])
def test_bad_delay_models_are_refused_with_a_reason(spec, says):
    with pytest.raises(ValueError, match=says):
        parse_delay(spec)


def test_a_trace_is_each_workers_intervals_between_pushes(tmp_path):
    m = MetricsWriter(tmp_path / "metrics.jsonl")
    for t, w in [(10.0, "w0"), (10.5, "w1"), (11.0, "w0"), (12.5, "w10"), (13.0, "w1")]:
        m.write("push", t=t, worker=w, staleness=0, applied=True, version=1)
    m.write("eval", t=14.0, version=2, accuracy=0.5)
    m.close()
    # w0, w1, w10; each last step (in flight at the end): to the end, then its last again
    assert read_trace(tmp_path) == ((1e-6, 1.0, 3.0), (0.5, 2.5, 2.5), (2.5, 3.0))
    step = parse_delay(f"trace:{tmp_path}").sampler(3, 4, 0)   # rank 3 plays w0: cycled
    assert [step() for _ in range(4)] == [1e-6, 1.0, 3.0, 1e-6]
    (tmp_path / "empty.jsonl").write_text('{"t": 1, "kind": "eval"}\nnot json\n')
    with pytest.raises(ValueError, match="no push records"):
        parse_delay(f"trace:{tmp_path / 'empty.jsonl'}")
    with pytest.raises(ValueError, match="cannot read"):
        parse_delay(f"trace:{tmp_path / 'nothing'}")


# ----------------------------------------------------------------------------------------------
# the simulation

def test_the_same_seed_gives_bitwise_the_same_weights():
    cfg = small(workers=6, updates=40, **{"server.policy": "scale+dc"})
    a, b = run(cfg), run(cfg)
    assert torch.equal(a.store.weights, b.store.weights)
    assert a.summary["staleness_histogram"] == b.summary["staleness_histogram"]
    assert a.summary["train_s"] == b.summary["train_s"]
    other = run(small(workers=6, updates=40, **{"server.policy": "scale+dc", "run.seed": 1}))
    assert not torch.equal(a.store.weights, other.store.weights)


def test_equal_speeds_make_every_push_n_minus_1_stale():
    n = 5
    sim = run(small(workers=n, updates=50), delay="constant")
    h = {int(k): v for k, v in sim.summary["staleness_histogram"].items()}
    assert h == {**{k: 1 for k in range(n - 1)}, n - 1: sum(h.values()) - (n - 1)}
    assert sim.summary["updates_applied"] == 50 and sim.store.version == 50
    assert sim.summary["train_s"] == pytest.approx(50 / n, abs=1)   # n pushes a second


@pytest.mark.parametrize("policy", [*(p for p in POLICIES if p not in LOCAL_STEP_POLICIES),
                                    "scale+ssp", "max_staleness+dc"])
def test_every_policy_the_server_accepts_runs(policy):
    cfg = small(workers=4, updates=24, **{"server.policy": policy, "server.max_staleness": 2,
                                          "server.ssp_slack": 1})
    sim = run(cfg, delay="exponential")
    s = sim.summary
    assert s["status"] == "ok" and s["version"] == 24, s
    assert torch.isfinite(sim.store.weights).all()
    if policy == "sync":        # one update a round of every worker's gradient, none stale
        assert s["staleness_histogram"] == {"0": 4 * 24}
    elif policy in ("max_staleness", "max_staleness+dc"):
        assert s["staleness_max"] > 2 and s["updates_dropped"] > 0
    if "ssp" in policy:         # nobody got more than the slack ahead of the slowest
        steps = [w.steps for w in sim.workers]
        assert max(steps) - min(steps) <= 1 + 1


def test_local_steps_push_pseudo_gradients_to_the_outer_optimizer():
    cfg = small(workers=3, updates=12, **{"worker.exchange.local_steps": 4,
                                          "server.outer.lr": 0.7})
    sim = run(cfg)
    assert sim.summary["status"] == "ok" and sim.store.version == 12
    assert sim.summary["samples"] == sim.summary["updates_applied"] * 4 * 16
    assert type(sim.store.optimizer).__name__ == "SGD"       # the outer optimizer
    assert all(w.local is not None for w in sim.workers)


@pytest.mark.slow
def test_256_virtual_workers_hold_a_gradient_each_not_a_model():
    n = 256      # equal speeds: the first round is every worker's push, 0 ... 255 stale
    sim = run(small(workers=n, updates=n + 8, **{"server.policy": "scale"}), delay="constant",
              eval_every=1000)
    s = sim.summary
    assert s["status"] == "ok" and s["updates_applied"] == n + 8
    assert all(w.steps >= 1 for w in sim.workers) and s["staleness_max"] == n - 1
    numel = sim.store.numel
    assert all(w.grad.numel() == numel for w in sim.workers)     # one flat vector each
    assert len({id(p) for p in sim.model.parameters()}) == len(list(sim.model.parameters()))


def test_a_trace_of_a_run_replays_its_staleness(tmp_path):
    cfg = small(workers=4, updates=60, **{"server.policy": "scale", "server.max_staleness": 2,
                                          "run.out_dir": str(tmp_path), "run.name": "first"})
    first = simulate(cfg, parse_delay("exponential"), eval_every=30)
    again = simulate(cfg.replace(**{"run.name": "again", "run.seed": 3}),
                     parse_delay(f"trace:{first['run_dir']}"), eval_every=30)
    assert again["staleness_histogram"] == first["staleness_histogram"]
    assert again["updates_dropped"] == first["updates_dropped"] > 0


def test_a_simulated_run_directory_reads_like_a_launch(tmp_path):
    from asgd.experiments.measures import eval_curve

    cfg = small(workers=2, updates=40, **{"run.out_dir": str(tmp_path), "run.name": "s"})
    summary = simulate(cfg, parse_delay("constant:0.5"), eval_every=10)
    run_dir = tmp_path / "s"
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert summary["simulated"] and summary["train_s"] == pytest.approx(40 * 0.5 / 2, abs=0.6)
    curve = eval_curve(run_dir)       # t in simulated seconds from the start of training
    assert [p["version"] for p in curve] == [10, 20, 30, 40, 40] and curve[-1]["final"]
    assert curve[0]["t"] == pytest.approx(10 * 0.5 / 2, abs=0.5)
    kinds = {json.loads(line)["kind"] for line in open(run_dir / "metrics.jsonl")}
    assert {"push", "worker_done", "eval"} <= kinds
    assert (run_dir / "config.yaml").exists()


def test_the_simulator_refuses_what_it_does_not_model():
    with pytest.raises(ValueError, match="worker.stages"):
        Simulation(small(**{"worker.stages.microbatches": 2}), parse_delay("constant"))
    with pytest.raises(ValueError, match="server.shards"):
        Simulation(small(**{"server.shards": 2}), parse_delay("constant"))
    for key, value in [("overlap", True), ("encoding", "int8"), ("weights_encoding", "fp16")]:
        with pytest.raises(ValueError, match="overlap and its encodings"):
            Simulation(small(**{f"worker.exchange.{key}": value}), parse_delay("constant"))


# ----------------------------------------------------------------------------------------------
# asgd experiment --simulate

@pytest.mark.slow      # four runs, and matplotlib
def test_experiment_simulate_writes_the_experiments_results(tmp_path):
    from asgd.experiments.cli import experiment

    cfg = tmp_path / "base.yaml"
    cfg.write_text(json.dumps({
        "model": {"name": "mlp", "args": {"hidden": [16]}},
        "data": {"name": "synthetic", "args": {"n_train": 2048, "n_test": 256,
                                               "shape": [16]}},
        "optimizer": {"name": "adam", "lr": 0.01}, "worker": {"batch_size": 16}}))
    out = tmp_path / "exp"
    result = CliRunner().invoke(experiment, [
        "straggler", "--simulate", "--config", str(cfg), "--workers", "3",
        "--policies", "none,sync", "--delay-model", "constant,uniform:0.5:1.5",
        "--slow-factor", "4", "--samples", "960", "--target-accuracy", "0.3", "--out",
        str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    records = json.loads((out / "results.json").read_text())
    assert len(records) == 4 and all(r["status"] == "ok" and r["simulated"] for r in records)
    assert {r["delay_model"] for r in records} == {"constant", "uniform:0.5:1.5"}
    for r in records:
        assert r["curve"] and r["slow_factor"] == 4
    sync = [r for r in records if r["policy"] == "sync"]
    assert all(r["updates_applied"] == 960 // 16 // 3 for r in sync)
    text = (out / "summary.md").read_text()
    assert "simulated" in text and "| none | 3 | 1 | 4 | 0 | constant |" in text
    assert "delay model uniform:0.5:1.5:" in text
    assert (out / "accuracy_vs_time.png").exists() and (out / "results.csv").exists()
    bad = CliRunner().invoke(experiment, ["staleness", "--simulate", "--delay-model", "gamma"])
    assert bad.exit_code != 0 and "unknown delay model" in bad.output
