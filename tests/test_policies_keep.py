"""The policies that keep the work (adaptive, age, delayed_nesterov, dylu): each against
weights computed by hand in the test, a few pushes of given staleness on a two-value vector.

The store is the server's own (``server.store.ParameterStore`` under
``server.staleness.StalenessControl``) with plain SGD at a constant rate, so each applied push
moves the weights by exactly rate x factor x gradient; every number below is a power of two
or a small sum of them, exact in float32. A fake clock drives the live-worker count and the
workers' speeds.
"""
from __future__ import annotations

import math

import pytest
import torch

from asgd.config import Config, ConfigError
from asgd.core.layout import ParameterLayout
from asgd.core.optim import DelayedNesterov
from asgd.core.policies import (adaptive_factor, age_factor, decide, dylu_steps,
                                parse_policy)
from server.staleness import Pending, StalenessControl
from server.store import ParameterStore

SPECS = [{"name": "w", "dtype": "float32", "shape": [2]}]


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def control(clock=None, init=(1.0, 2.0), specs=SPECS, **overrides) -> StalenessControl:
    """A staleness control over a store of ``init`` (SGD at rate 0.5, constant, no bound)."""
    base = {"optimizer.name": "sgd", "optimizer.lr": 0.5, "schedule.kind": "constant",
            "schedule.warmup": 0, "server.max_staleness": None}
    base.update(overrides)
    cfg = Config().replace(**base)
    store = ParameterStore(ParameterLayout.from_specs(specs),
                           torch.tensor(init, dtype=torch.float32), cfg)
    return StalenessControl(store, cfg, clock=clock or Clock())


def push(ctl: StalenessControl, worker: str, staleness: int, grad):
    """A push from ``worker`` computed ``staleness`` versions ago."""
    base = ctl.store.version - staleness
    return ctl.push(Pending(b"", worker, 0, "push"), base,
                    torch.tensor(grad, dtype=torch.float32))


def weights(ctl) -> list[float]:
    return ctl.store.weights.tolist()


# ----------------------------------------------------------------------------------------------
# adaptive: the full rate up to K = threshold x n, then the decay's factor

def test_adaptive_factor_by_hand():
    # n = 4 workers, K = 4: full rate up to staleness 4, then 1/τ, K/τ or nothing
    assert [adaptive_factor(s, 4) for s in (0, 3, 4, 5, 8)] == [1, 1, 1, 1 / 5, 1 / 8]
    assert [adaptive_factor(s, 4, decay="ratio") for s in (4, 8, 16)] == [1, 0.5, 0.25]
    assert adaptive_factor(5, 4, decay="drop") == 0.0
    assert adaptive_factor(8, 4, threshold=2.0) == 1.0        # K = 2n = 8
    assert adaptive_factor(2, 0) == 0.5                       # n is at least 1
    d = decide("adaptive", 9, workers=4, decay="drop")
    assert not d.apply and "4 workers" in d.reason
    assert decide("adaptive", 9, max_staleness=8, workers=16).apply is False   # the bound too


@pytest.mark.parametrize("decay", ["inverse", "ratio", "drop"])
def test_adaptive_pushes_by_hand(decay):
    clock = Clock()
    ctl = control(clock, **{"server.policy": "adaptive", "server.adaptive_decay": decay})
    ctl.hello("w0")
    ctl.hello("w1")                   # n = 2, K = 2; the rate 0.5
    assert ctl.live_workers() == 2
    push(ctl, "w0", 0, [1.0, 1.0])    # τ 0: w - 0.5 [1, 1]       = [0.5, 1.5]
    assert weights(ctl) == [0.5, 1.5]
    push(ctl, "w1", 1, [2.0, 0.0])    # τ 1: w - 0.5 [2, 0]       = [-0.5, 1.5]
    push(ctl, "w0", 2, [0.0, 2.0])    # τ 2 = K: w - 0.5 [0, 2]   = [-0.5, 0.5]
    assert weights(ctl) == [-0.5, 0.5]
    out = push(ctl, "w1", 4, [-4.0, 12.0])
    # τ 4 > K: inverse: w - 0.5/4 [-4, 12]   = [-0.5, 0.5] - [-0.5, 1.5] = [0, -1]
    #          ratio:   w - 0.5·2/4 [-4, 12] = [-0.5, 0.5] - [-1, 3]     = [0.5, -2.5]
    #          drop:    nothing moves
    expected = {"inverse": [0.0, -1.0], "ratio": [0.5, -2.5], "drop": [-0.5, 0.5]}[decay]
    assert weights(ctl) == expected
    assert out.applied == (decay != "drop")
    assert out.lr == {"inverse": 0.125, "ratio": 0.25, "drop": 0.0}[decay]


def test_adaptive_counts_the_live_workers():
    """A worker silent past server.worker_timeout_s stops counting: n, so K, shrinks."""
    clock = Clock()
    ctl = control(clock, **{"server.policy": "adaptive", "server.worker_timeout_s": 10.0})
    for w in ("w0", "w1", "w2", "w3"):
        ctl.hello(w)
    push(ctl, "w0", 0, [0.0, 0.0])
    out = push(ctl, "w0", 4, [8.0, 0.0])           # n = 4: τ 4 at the full rate 0.5
    assert out.lr == 0.5 and weights(ctl) == [-3.0, 2.0]
    clock.t = 11.0                                  # w1..w3 silent for 11 s: n = 1 (w0 pushes)
    out = push(ctl, "w0", 2, [8.0, 0.0])           # K = 1 < τ 2: 0.5 / 2 · 8 = 2
    assert ctl.live_workers() == 1
    assert out.lr == 0.25 and weights(ctl) == [-5.0, 2.0]
    ctl.bye("w0")
    assert ctl.live_workers() == 1                  # never below one


def test_adaptive_workers_fixed_by_config():
    ctl = control(**{"server.policy": "adaptive", "server.adaptive_workers": 8})
    out = push(ctl, "w0", 8, [1.0, 1.0])            # nobody said hello: n is 8 all the same
    assert out.lr == 0.5 and weights(ctl) == [0.5, 1.5]


def test_adaptive_with_ssp_shares_the_participants():
    ctl = control(**{"server.policy": "adaptive+ssp", "server.ssp_slack": 8})
    ctl.hello("w0")
    ctl.hello("w1")
    assert ctl.roster is ctl.people and ctl.live_workers() == 2


# ----------------------------------------------------------------------------------------------
# age: the push itself scaled by exp(-α τ), gated to 0 at the cutoff

def test_age_factor_by_hand():
    assert age_factor(0, alpha=0.1) == 1.0
    assert age_factor(2, alpha=0.1) == pytest.approx(0.8187307531, abs=1e-10)   # e^-0.2
    assert age_factor(2, alpha=0.0, cutoff=4) == 0.5        # (1 + cos(π/2)) / 2
    assert age_factor(1, alpha=0.0, cutoff=3) == 0.75       # (1 + cos(π/3)) / 2
    assert age_factor(4, alpha=0.0, cutoff=4) == 0.0
    assert age_factor(9, alpha=0.0) == 1.0                  # no cutoff, no decay


def test_age_pushes_by_hand():
    ctl = control(**{"server.policy": "age", "server.age_alpha": 0.0, "server.age_cutoff": 4})
    push(ctl, "w0", 0, [2.0, 2.0])     # σ(0) = 1:   w - 0.5 [2, 2]       = [0, 1]
    assert weights(ctl) == [0.0, 1.0]
    push(ctl, "w0", 2, [4.0, -4.0])    # σ(2) = 1/2: w - 0.5 · 1/2 [4, -4] = [-1, 2]
    assert weights(ctl) == [-1.0, 2.0]
    out = push(ctl, "w0", 4, [4.0, 4.0])   # σ(4) = 0: dropped, nothing moves
    assert not out.applied and "age_cutoff" in out.reason and weights(ctl) == [-1.0, 2.0]
    assert ctl.store.version == 2


def test_age_never_writes_the_senders_gradient():
    ctl = control(**{"server.policy": "age", "server.age_alpha": 0.0, "server.age_cutoff": 4})
    push(ctl, "w0", 0, [0.0, 0.0])
    push(ctl, "w0", 0, [0.0, 0.0])
    mine = torch.tensor([4.0, 4.0])
    ctl.push(Pending(b"", "w0", 0, "push"), ctl.store.version - 2, mine)
    assert mine.tolist() == [4.0, 4.0] and weights(ctl) == [0.0, 1.0]


def test_age_with_adaptive_multiplies():
    ctl = control(**{"server.policy": "adaptive+age", "server.adaptive_workers": 1,
                     "server.age_alpha": 0.0, "server.age_cutoff": 4})
    push(ctl, "w0", 0, [0.0, 0.0])
    push(ctl, "w0", 0, [0.0, 0.0])
    push(ctl, "w0", 2, [8.0, 0.0])     # adaptive 1/2 on the rate, age 1/2 on the push: 1
    assert weights(ctl) == [0.0, 2.0]


# ----------------------------------------------------------------------------------------------
# delayed_nesterov: the outer momentum every N pushes

LOCAL = {"worker.exchange.local_steps": 4, "server.outer.optimizer": "sgd",
         "server.outer.lr": 1.0, "server.outer.momentum": 0.5, "server.outer.nesterov": True}


def test_delayed_nesterov_pushes_by_hand():
    ctl = control(init=(0.0, 0.0), **LOCAL, **{"server.policy": "delayed_nesterov",
                                               "server.dn_buffer": 2})
    assert isinstance(ctl.store.optimizer, DelayedNesterov)
    # N = 2, β = 1/2, rate 1. Each push: w -= g / 2; every second push first m = β m + Δ/2,
    # w -= β m.
    push(ctl, "w0", 0, [1.0, 0.0])     # Δ [1,0]; w = [-0.5, 0]
    assert weights(ctl) == [-0.5, 0.0]
    push(ctl, "w1", 1, [3.0, 2.0])     # Δ [4,2]; m = [2,1]; w -= [1,0.5] + [1.5,1] = [-3,-1.5]
    assert weights(ctl) == [-3.0, -1.5]
    push(ctl, "w0", 1, [2.0, 0.0])     # Δ [2,0]; w -= [1, 0]               = [-4, -1.5]
    assert weights(ctl) == [-4.0, -1.5]
    push(ctl, "w1", 2, [0.0, 4.0])     # Δ [2,4]; m = [1,0.5]+[1,2] = [2,2.5];
    assert weights(ctl) == [-5.0, -4.75]   # w -= [1, 1.25] + [0, 2]
    st = ctl.store.optimizer.state[ctl.store.param]
    assert st["step"] == 4 and st["momentum_buffer"].tolist() == [2.0, 2.5]
    assert st["delta"].tolist() == [0.0, 0.0]


def test_delayed_nesterov_of_one_is_torch_nesterov():
    gs = [torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0]), torch.tensor([-1.0, 0.25])]
    a = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    b = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    dn = DelayedNesterov([a], lr=0.5, momentum=0.5, buffer=1)
    sgd = torch.optim.SGD([b], lr=0.5, momentum=0.5, nesterov=True)
    for g in gs:
        a.grad, b.grad = g.clone(), g.clone()
        dn.step()
        sgd.step()
    assert a.tolist() == b.tolist()


def test_delayed_nesterov_checkpoint_state_round_trips():
    ctl = control(init=(0.0, 0.0), **LOCAL, **{"server.policy": "delayed_nesterov",
                                               "server.dn_buffer": 2})
    push(ctl, "w0", 0, [1.0, 0.0])
    scalars, tensors = ctl.store.optimizer_state()
    assert scalars == {"step": 1}
    other = control(init=(0.0, 0.0), **LOCAL, **{"server.policy": "delayed_nesterov",
                                                 "server.dn_buffer": 2})
    other.store.load_weights(ctl.store.weights.clone(), 1)
    other.store.load_optimizer_state(scalars, dict(tensors))
    for c in (ctl, other):
        push(c, "w1", 1, [3.0, 2.0])
    assert weights(other) == weights(ctl) == [-3.0, -1.5]


# ----------------------------------------------------------------------------------------------
# dylu: each worker's local steps by its speed, told in the reply

def test_dylu_steps_by_hand():
    assert dylu_steps(16, speed=2.0, fastest=5.0) == 6        # floor(6.4)
    assert dylu_steps(16, speed=5.0, fastest=5.0) == 16
    assert dylu_steps(16, speed=0.1, fastest=5.0) == 1        # never below one
    assert dylu_steps(16, speed=1.0, fastest=0.0) == 16       # nothing measured yet


def test_dylu_tells_each_worker_its_steps():
    clock = Clock()
    ctl = control(clock, **LOCAL, **{"server.policy": "dylu"})   # H = 4
    ctl.hello("w0")
    ctl.hello("w1")
    clock.t = 1.0
    out = push(ctl, "w0", 0, [0.0, 0.0])    # w0: 4 steps in 1 s, 0.25 s a step: the fastest
    assert out.local_steps == 4 and out.reply()["local_steps"] == 4
    clock.t = 4.0
    out = push(ctl, "w1", 1, [0.0, 0.0])    # w1: 4 steps in 4 s: a quarter of w0's speed
    assert out.local_steps == 1             # floor(4 · 1/4)
    clock.t = 5.0
    out = push(ctl, "w0", 1, [0.0, 0.0])    # w0: 4 steps in 4 s (mean with 0.25): 0.625 s a step
    assert out.local_steps == 4
    clock.t = 7.0
    out = push(ctl, "w1", 1, [0.0, 0.0])    # w1: 1 step in 3 s, mean with 1 s: 2 s a step
    assert out.local_steps == 1             # floor(4 · 0.625 / 2) = 1
    ctl.bye("w1")
    assert "w1" not in ctl.speeds.per_step


def test_a_policy_without_dylu_tells_nothing():
    ctl = control(**LOCAL, **{"server.policy": "none"})
    out = push(ctl, "w0", 0, [0.0, 0.0])
    assert out.local_steps == 0 and "local_steps" not in out.reply()


# ----------------------------------------------------------------------------------------------
# combining by '+' and the config's checks

def test_clashing_combinations_are_refused():
    assert parse_policy("adaptive+ssp") == {"adaptive", "ssp"}
    assert parse_policy("delayed_nesterov+dylu+age") == {"delayed_nesterov", "dylu", "age"}
    with pytest.raises(ValueError, match="scale cannot be combined with adaptive"):
        parse_policy("adaptive+scale")
    with pytest.raises(ValueError, match="delayed_nesterov cannot be combined with dc"):
        parse_policy("dc+delayed_nesterov")
    with pytest.raises(ValueError, match="sync"):
        parse_policy("sync+adaptive")


@pytest.mark.parametrize("overrides, key", [
    ({"server.policy": "dylu"}, "server.policy"),                 # local steps only
    ({"server.policy": "delayed_nesterov"}, "server.policy"),
    ({"server.adaptive_decay": "half"}, "server.adaptive_decay"),
    ({"server.adaptive_threshold": 0}, "server.adaptive_threshold"),
    ({"server.adaptive_workers": 0}, "server.adaptive_workers"),
    ({"server.age_alpha": -1}, "server.age_alpha"),
    ({"server.age_cutoff": -1}, "server.age_cutoff"),
    ({"server.dn_buffer": 0}, "server.dn_buffer"),
    ({**LOCAL, "server.policy": "delayed_nesterov", "server.outer.optimizer": "adam"},
     "server.policy"),
    ({**LOCAL, "server.policy": "dylu", "server.shards": 2}, "server.policy"),
])
def test_config_checks(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Config().replace(**{"model.name": "mlp", **overrides})


def test_age_alpha_is_the_exponent():
    assert age_factor(3, alpha=0.5) == math.exp(-1.5)


# ----------------------------------------------------------------------------------------------
# dylu's local steps in the simulator, and through a real server process

@pytest.mark.slow
def test_dylu_in_the_simulator_gives_slow_workers_fewer_steps():
    from simulator.delays import parse_delay
    from simulator.engine import Simulation

    cfg = Config().replace(**{"model.name": "mlp", "model.args": {"hidden": [8]},
                              "data.name": "mnist1d", "worker.batch_size": 16,
                              "run.workers": 3, "run.max_updates": 24, "run.seed": 0,
                              "worker.exchange.local_steps": 4, "server.policy": "dylu",
                              "server.max_staleness": None})
    sim = Simulation(cfg, parse_delay("inverse"))   # speeds 1, 1/2, 1/3
    s = sim.run()
    assert s["status"] == "ok" and s["version"] == 24
    told = [w.local.steps for w in sim.workers]
    assert told[0] == 4 and told[0] >= told[1] >= told[2] and told[2] < 4, told


@pytest.mark.slow
def test_dylu_through_a_real_server(start_server, make_config, clients):
    """hello carries dylu both ways and a mismatch is refused; a push's reply gives the
    worker its next round's local steps."""
    from asgd.client import ServerError
    from conftest import gradients

    server = start_server(make_config(server={"policy": "dylu"},
                                      worker={"exchange": {"local_steps": 4}}))
    c = clients(server.endpoint, "w0")
    with pytest.raises(ServerError) as e:
        c.hello(settings={"local_steps": 4, "dylu": False})
    assert e.value.code == "bad_request" and "setting dylu differs" in e.value.message
    info, weights = c.hello(settings={"local_steps": 4, "dylu": True})
    assert info["config"]["dylu"] is True and info["config"]["local_steps"] == 4
    reply = c.push(info["version"], gradients(info["tensors"], 0))
    assert reply["applied"] and reply["local_steps"] == 4     # the only worker: the fastest


def test_the_worker_follows_the_steps_it_is_told():
    from asgd.tasks.step import LocalSteps, follows_dylu

    cfg = Config().replace(**{"model.name": "mlp", **LOCAL, "server.policy": "dylu"})
    local = LocalSteps(cfg, [torch.nn.Parameter(torch.zeros(2))])
    assert follows_dylu(cfg) and not follows_dylu(cfg.replace(**{"server.policy": "scale"}))
    local.follow({"local_steps": 2})
    assert local.steps == 2 and local.full == 4
    for bad in ({"local_steps": 0}, {"local_steps": True}, {"local_steps": "3"}, {}, None):
        local.follow(bad)                    # nothing usable: the count stays
        assert local.steps == 2
    local.follow({"local_steps": 64})        # never more than the worker's own H
    assert local.steps == 4


@pytest.mark.slow
def test_adaptive_through_a_real_server_counts_who_said_hello(start_server, make_config,
                                                             clients):
    """The server's n is the workers that said hello and not bye: the same staleness 2 gets
    the full rate with two workers (K = 2) and half of it with one (K = 1)."""
    import numpy as np

    from conftest import gradients

    server = start_server(make_config(
        optimizer={"name": "sgd", "lr": 0.5}, schedule={"kind": "constant", "warmup": 0},
        server={"policy": "adaptive", "max_staleness": None}))
    c0, c1 = clients(server.endpoint, "w0"), clients(server.endpoint, "w1")
    info, frames = c0.hello()
    c1.hello()
    specs = info["tensors"]
    start = np.concatenate([t.array.reshape(-1) for t in frames]).astype(np.float32)
    zeros = [(n, 0 * g) for n, g in gradients(specs, 0)]
    ones = [(n, np.ones_like(g)) for n, g in gradients(specs, 0)]
    c0.push(0, zeros)
    c0.push(1, zeros)
    r = c1.push(0, ones)                      # τ 2 = K: w - 0.5
    assert r["applied"] and r["staleness"] == 2
    c1.bye()                                  # n = 1, K = 1
    c0.push(3, zeros)
    c0.push(4, zeros)
    r = c0.push(3, ones)                      # τ 2 > K: w - 0.5 / 2
    assert r["applied"] and r["staleness"] == 2
    _, now = c0.pull()
    got = np.concatenate([t.array.reshape(-1) for t in now])
    assert np.array_equal(got, start - np.float32(0.5) - np.float32(0.25))
