"""K-batch asynchronous SGD (server.policy kbatch): the server sums kept pushes until it has K,
from any workers and versions, and applies their mean as one update; no reply waits.

Against weights computed by hand: the store is the server's own under
``server.staleness.StalenessControl`` with plain SGD at a constant rate 0.5 on a two-value
vector, so an update moves the weights by exactly 0.5 x rate factor x the mean; every number is
a power of two or a small sum of them, exact in float32. Then through a real server process on
loopback, and the simulator, which drives the same control.
"""
from __future__ import annotations

import pytest
import torch

from asgd.config import Config, ConfigError
from asgd.core.policies import kbatch_lr_factor, kbatch_size, parse_policy
from server.kbatch import KBatch
from server.staleness import Pending, StalenessControl
from tests.test_policies_keep import SPECS, Clock, control as keep_control


def control(clock=None, init=(1.0, 2.0), specs=SPECS, **overrides) -> StalenessControl:
    return keep_control(clock, init, specs, **{"server.policy": "kbatch", **overrides})


def push(ctl: StalenessControl, worker: str, base: int, grad):
    return ctl.push(Pending(b"", worker, 0, "push"), base,
                    torch.tensor(grad, dtype=torch.float32))


def weights(ctl) -> list[float]:
    return ctl.store.weights.tolist()


# ----------------------------------------------------------------------------------------------
# the rule

def test_k_from_the_config_or_the_live_workers():
    assert kbatch_size(None, 8) == 4 and kbatch_size(None, 16) == 8
    assert kbatch_size(None, 3) == 2 and kbatch_size(None, 2) == 1 and kbatch_size(None, 1) == 1
    assert kbatch_size(None, 0) == 1                     # nobody yet: every push an update
    assert kbatch_size(None, 16, fraction=0.25) == 4 and kbatch_size(None, 6, 1 / 3) == 2
    assert kbatch_size(5, 8) == 5                        # server.kbatch wins
    assert kbatch_lr_factor(1, "linear") == 1.0 and kbatch_lr_factor(9, "sqrt") == 3.0


@pytest.mark.parametrize("policy, word", [("kbatch+sync", "sync"), ("kbatch+ssp", "ssp"),
                                          ("kbatch+delayed_nesterov", "delayed_nesterov")])
def test_clashes_are_refused(policy, word):
    with pytest.raises(ValueError, match=f"kbatch cannot be combined with {word}"):
        parse_policy(policy)


def test_combinations_parse():
    for p in ("kbatch+scale", "kbatch+scale+max_staleness", "kbatch+dc", "kbatch+age",
              "kbatch+adaptive", "kbatch+scale+dc"):
        assert "kbatch" in parse_policy(p)


@pytest.mark.parametrize("overrides, key", [
    ({"server.kbatch": 0}, "server.kbatch"),
    ({"server.kbatch_fraction": 0}, "server.kbatch_fraction"),
    ({"server.kbatch_fraction": 1.5}, "server.kbatch_fraction"),
    ({"server.kbatch_lr": "square"}, "server.kbatch_lr"),
    ({"server.policy": "kbatch+sync"}, "server.policy"),
])
def test_config_checks(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Config().replace(**{"model.name": "mlp", **overrides})


def test_staleness_counts_updates_not_pushes():
    kb = KBatch(2)
    assert kb.staleness(10, 2, 4) == 2        # resumed at 10, no update yet: 8 versions / K
    for v in (14, 18, 22):                   # three updates of 4 pushes
        kb.mark(v, 4)
    assert [kb.staleness(22, b, 4) for b in (22, 18, 14, 10)] == [0, 1, 2, 3]
    assert kb.staleness(22, 6, 4) == 4        # before the restart: its distance over K
    assert kb.updates == 3 and kb.known_from == 10


# ----------------------------------------------------------------------------------------------
# against weights computed by hand

def test_k_pushes_make_one_update_of_their_mean():
    ctl = control(**{"server.kbatch": 2})
    out = push(ctl, "w0", 0, [2.0, 0.0])
    # below K: kept and answered at once, nothing moves yet
    assert out.applied and not out.deferred and out.version == 0 and out.lr == 0.0
    assert weights(ctl) == [1.0, 2.0]
    out = push(ctl, "w1", 0, [0.0, 4.0])
    # the mean [1, 2] at 0.5: [1, 2] - [0.5, 1] = [0.5, 1]; the version moves by the 2 pushes
    assert out.applied and out.version == 2 and out.lr == 0.5
    assert weights(ctl) == [0.5, 1.0]
    out = push(ctl, "w0", 0, [4.0, 4.0])     # one update since its base
    assert out.staleness == 1 and weights(ctl) == [0.5, 1.0]
    out = push(ctl, "w0", 2, [0.0, 0.0])     # any worker: w0 twice in one update
    # the mean [2, 2] at 0.5: [0.5, 1] - [1, 1] = [-0.5, 0]
    assert out.staleness == 0 and out.version == 4
    assert weights(ctl) == [-0.5, 0.0]
    assert ctl.kb.updates == 2 and ctl.kb.count == 0


def test_scale_and_the_bound_judge_each_push_by_updates():
    ctl = control(**{"server.kbatch": 2, "server.policy": "kbatch+scale",
                     "server.max_staleness": 2})
    for base in (0, 0, 2, 2):                # two updates of zeros: version 4, weights alike
        push(ctl, "w0", base, [0.0, 0.0])
    assert ctl.store.version == 4 and weights(ctl) == [1.0, 2.0]
    out = push(ctl, "w1", 0, [2.0, 0.0])     # 2 updates stale: kept at 1/2
    assert out.applied and out.staleness == 2 and weights(ctl) == [1.0, 2.0]
    out = push(ctl, "w2", 0, [0.0, 4.0])     # 2 stale, 1/2: sum 1/2 [2, 0] + 1/2 [0, 4]
    # = [1, 2] over weights 1/2 + 1/2 = 1; the rate 0.5 x their mean 1/2 = 0.25:
    # [1, 2] - 0.25 [1, 2] = [0.75, 1.5]
    assert out.version == 6 and out.lr == 0.25
    assert weights(ctl) == [0.75, 1.5]
    out = push(ctl, "w1", 0, [8.0, 8.0])     # 3 updates stale > 2: dropped, not in the sum
    assert not out.applied and out.staleness == 3 and "max_staleness 2" in out.reason
    assert ctl.kb.count == 0 and weights(ctl) == [0.75, 1.5] and ctl.store.version == 6


def test_k_follows_the_live_workers():
    clock = Clock()
    ctl = control(clock, **{"server.worker_timeout_s": 10.0})
    for w in ("w0", "w1", "w2", "w3"):
        ctl.hello(w)
    assert ctl.kbatch_size() == 2
    push(ctl, "w0", 0, [2.0, 2.0])
    assert weights(ctl) == [1.0, 2.0]
    for w in ("w1", "w2", "w3"):
        ctl.bye(w)
    assert ctl.kbatch_size() == 1
    out = push(ctl, "w0", 0, [0.0, 2.0])     # K is 1 now: the two kept pushes are the update
    # mean [1, 2] at 0.5: [0.5, 1]
    assert out.version == 2 and weights(ctl) == [0.5, 1.0]
    out = push(ctl, "w0", 2, [1.0, 0.0])     # then every push is an update of its own
    assert out.version == 3 and weights(ctl) == [0.0, 1.0]


def test_one_worker_is_the_run_without_kbatch_bit_for_bit():
    """K = 1 (one live worker): each push goes the way it goes without kbatch, so the default
    run with one worker cannot change. Adam at a cosine rate, random gradients."""
    specs = [{"name": "w", "dtype": "float32", "shape": [64]}]
    init = tuple(torch.linspace(-1, 1, 64).tolist())
    common = {"optimizer.name": "adam", "optimizer.lr": 0.01, "schedule.kind": "cosine",
              "schedule.warmup": 3, "run.max_updates": 20, "server.max_staleness": 3}
    a = control(init=init, specs=specs, **common, **{"server.policy": "kbatch+scale"})
    b = control(init=init, specs=specs, **common, **{"server.policy": "scale"})
    gen = torch.Generator().manual_seed(0)
    for ctl in (a, b):
        ctl.hello("w0")
    for step in range(20):
        g = torch.randn(64, generator=gen)
        for ctl in (a, b):
            out = ctl.push(Pending(b"", "w0", step, "push"), ctl.store.version, g.clone())
            assert out.applied and out.version == step + 1
    assert torch.equal(a.store.weights, b.store.weights)


def test_dc_and_age_combine():
    """dc corrects each push against the weights when it arrives, age scales it; the update
    is then their mean (age: e^-τα, 0.5 here, on the push one update stale)."""
    import math

    ctl = control(**{"server.kbatch": 2, "server.policy": "kbatch+age",
                     "server.age_alpha": math.log(2)})
    push(ctl, "w0", 0, [0.0, 0.0])
    push(ctl, "w0", 0, [0.0, 0.0])           # version 2
    push(ctl, "w0", 2, [2.0, 0.0])           # fresh: x 1
    push(ctl, "w1", 0, [0.0, 4.0])           # 1 update stale: x 1/2 -> [0, 2]
    # mean [1, 1] at 0.5: [1, 2] - [0.5, 0.5]
    assert torch.allclose(ctl.store.weights, torch.tensor([0.5, 1.5]))
    dc = control(**{"server.kbatch": 2, "server.policy": "kbatch+dc"})
    for base in (0, 0, 2, 0):
        out = dc.push(Pending(b"", "w0", 0, "push"), base, torch.tensor([1.0, 1.0]))
        assert out.applied
    assert dc.store.version == 4 and bool(torch.isfinite(dc.store.weights).all())


# ----------------------------------------------------------------------------------------------
# a real server process, and the simulator

@pytest.mark.slow
def test_kbatch_through_a_real_server(start_server, make_config, clients):
    """Two workers, K = 2: the first push is answered at once with the weights unchanged, the
    second makes the update of their mean; the version and the stats count pushes."""
    import numpy as np

    from conftest import gradients

    server = start_server(make_config(
        optimizer={"name": "sgd", "lr": 0.5}, schedule={"kind": "constant", "warmup": 0},
        server={"policy": "kbatch", "kbatch": 2, "max_staleness": None}))
    c0, c1 = clients(server.endpoint, "w0"), clients(server.endpoint, "w1")
    info, frames = c0.hello()
    c1.hello()
    specs = info["tensors"]
    flat = lambda fs: np.concatenate([t.array.reshape(-1) for t in fs])  # noqa: E731
    start = flat(frames).astype(np.float32)
    ones = [(n, np.ones_like(g)) for n, g in gradients(specs, 0)]
    threes = [(n, 3 * np.ones_like(g)) for n, g in gradients(specs, 0)]
    r = c0.push(0, ones)
    assert r["applied"] and r["version"] == 0
    _, now = c0.pull()
    assert np.array_equal(flat(now), start)                 # below K: nothing moved
    r = c1.push(0, threes)
    assert r["applied"] and r["version"] == 2 and r["staleness"] == 0
    _, now = c1.pull()
    assert np.array_equal(flat(now), start - np.float32(1.0))   # mean 2 at rate 0.5
    r = c0.push(0, ones)
    assert r["applied"] and r["staleness"] == 1 and r["version"] == 2
    stats = c0.stats()
    assert stats["version"] == 2 and stats["updates_dropped"] == 0
    # stopped, the server applies the kept push (a partial sum of 1) before its checkpoint
    from asgd.core.checkpoint import load_checkpoint

    assert server.stop() == 0
    ckpt = load_checkpoint(server.run_dir / "checkpoint")
    saved = np.concatenate([t.reshape(-1).numpy() for t in ckpt.weights().values()])
    assert ckpt.version == 3
    assert np.array_equal(saved, start - np.float32(1.0) - np.float32(0.5))   # 1 at 0.5


@pytest.mark.slow
def test_kbatch_in_the_simulator_reaches_its_budget_in_pushes():
    from simulator.delays import parse_delay
    from simulator.engine import Simulation

    cfg = Config().replace(**{"model.name": "mlp", "model.args": {"hidden": [8]},
                              "data.name": "mnist1d", "worker.batch_size": 16,
                              "run.workers": 4, "run.max_updates": 24, "run.seed": 0,
                              "server.policy": "kbatch+scale"})
    sim = Simulation(cfg, parse_delay("inverse"))
    s = sim.run()
    assert s["status"] == "ok" and s["version"] == 24
    assert sim.control.kb.updates == 12                     # K = 2 with four workers
    assert s["updates_dropped"] == 0


@pytest.mark.parametrize("rule, lr", [("none", 0.5), ("sqrt", 1.0), ("linear", 2.0)])
def test_the_rate_of_a_k_push_update(rule, lr):
    """server.kbatch_lr: the update of K = 4 pushes at 0.5 x 1, x √4 or x 4."""
    ctl = control(**{"server.kbatch": 4, "server.kbatch_lr": rule})
    for g in ([1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]):
        out = push(ctl, "w0", 0, g)
    # the mean [0.5, 0.5] at the rate lr
    assert out.lr == lr and weights(ctl) == [1.0 - lr / 2, 2.0 - lr / 2]


def test_a_partial_sum_is_applied_when_the_server_stops():
    """flush (called by the server before its last checkpoint): the pushes kept below K are
    one update of their mean, the version moves by their count; nothing kept is lost."""
    ctl = control(**{"server.kbatch": 4})
    push(ctl, "w0", 0, [2.0, 0.0])
    push(ctl, "w1", 0, [0.0, 4.0])
    assert weights(ctl) == [1.0, 2.0] and ctl.store.version == 0
    assert ctl.flush() == 2
    # the mean [1, 2] at 0.5: [1, 2] - [0.5, 1] = [0.5, 1]
    assert weights(ctl) == [0.5, 1.0] and ctl.store.version == 2
    assert ctl.kb.count == 0 and ctl.flush() == 0 and weights(ctl) == [0.5, 1.0]
    assert control(**{"server.policy": "scale"}).flush() == 0   # nothing kept without kbatch
