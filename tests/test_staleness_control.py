"""Staleness control without sockets: the policies' arithmetic, and ssp/sync in ServerCore.

ServerCore takes a clock, so worker time-outs are driven by a fake clock here, not by sleeping.
"""
from __future__ import annotations

import pytest
import torch

from asgd.core import protocol
from asgd.config import Config
from asgd.core.layout import ParameterLayout
from asgd.core.policies import dc_compensate, decide, parse_policy, scale_factor, ssp_may_proceed
from server.core import ServerCore
from server.staleness import StalenessControl
from server.store import ParameterStore

SPECS = [{"name": "w", "dtype": "float32", "shape": [4]}, {"name": "b", "dtype": "float32",
                                                           "shape": [2]}]


def make_store(**overrides) -> ParameterStore:
    base = {"optimizer.name": "sgd", "optimizer.lr": 0.5, "schedule.kind": "constant",
            "schedule.warmup": 0, "server.policy": "none", "server.max_staleness": None}
    base.update(overrides)
    cfg = Config().replace(**base)
    return ParameterStore(ParameterLayout.from_specs(SPECS), torch.arange(6, dtype=torch.float32)
                          / 10, cfg)


def make_control(**overrides) -> StalenessControl:
    """The async update path of a store under a policy, without a socket."""
    return StalenessControl(make_store(**overrides))


def grads(values):
    """The flat gradient a push hands the control (the core's checked copy)."""
    return torch.as_tensor(values, dtype=torch.float32).clone()


# ----------------------------------------------------------------------------------------------
# pure functions

def test_scale_factor_is_one_over_staleness_floored_at_one():
    assert [scale_factor(s) for s in (0, 1, 2, 4, 10)] == [1.0, 1.0, 0.5, 0.25, 0.1]
    d = decide("scale", 4)
    assert d.apply and d.lr_scale == 0.25


def test_bound_combines_with_scale():
    assert not decide("scale+max_staleness", 5, max_staleness=4).apply
    d = decide("scale+max_staleness", 4, max_staleness=4)
    assert d.apply and d.lr_scale == 0.25


def test_parse_policy_rejects_unknown_and_clashing_names():
    assert parse_policy("ssp+scale") == {"ssp", "scale"}
    assert parse_policy("none") == {"none"}
    with pytest.raises(ValueError, match="bogus"):
        parse_policy("scale+bogus")
    with pytest.raises(ValueError, match="sync"):
        parse_policy("sync+scale")


def test_dc_compensate_matches_the_formula_elementwise():
    g = torch.tensor([1.0, -2.0, 0.5])
    w_now = torch.tensor([0.3, 0.1, -1.0])
    w_base = torch.tensor([0.1, 0.4, -1.0])
    out = dc_compensate(g, w_now, w_base, lam=0.5)
    expected = [1.0 + 0.5 * 1.0 * 0.2, -2.0 + 0.5 * 4.0 * -0.3, 0.5]
    torch.testing.assert_close(out, torch.tensor(expected))
    assert g.tolist() == [1.0, -2.0, 0.5]   # the input is not modified


def test_ssp_may_proceed_counts_from_the_slowest():
    assert ssp_may_proceed(5, [3, 5, 4], slack=2)
    assert not ssp_may_proceed(6, [3, 6, 4], slack=2)
    assert ssp_may_proceed(3, [], slack=0)


# ----------------------------------------------------------------------------------------------
# the store under scale and dc

def test_scale_divides_the_step_by_the_staleness():
    control = make_control(**{"server.policy": "scale"})
    store = control.store
    control.apply(grads([0] * 6), 0)
    control.apply(grads([0] * 6), 1)               # version 2 now
    before = store.flat.detach().clone()
    g = torch.tensor([1.0, 2, 3, 4, 5, 6])
    r = control.apply(grads(g), 0)                 # staleness 2
    assert r.staleness == 2 and r.lr == pytest.approx(0.25)
    torch.testing.assert_close(store.flat.detach(), before - 0.25 * g)


def test_dc_compensates_against_the_weights_the_gradient_came_from():
    control = make_control(**{"server.policy": "dc", "server.dc_adaptive": False,
                              "server.dc_lambda": 0.5})
    store = control.store
    w0 = store.flat.detach().clone()
    control.apply(grads([1.0] * 6), 0)             # version 1, weights moved
    w1 = store.flat.detach().clone()
    g = torch.tensor([1.0, -1, 2, 0, 3, 1])
    control.apply(grads(g), 0)                     # computed on version 0's weights
    compensated = g + 0.5 * g * g * (w1 - w0)
    torch.testing.assert_close(store.flat.detach(), w1 - 0.5 * compensated)


def test_dc_without_staleness_is_plain_sgd():
    control = make_control(**{"server.policy": "dc"})
    store = control.store
    before = store.flat.detach().clone()
    g = torch.tensor([1.0, -1, 2, 0, 3, 1])
    control.apply(grads(g), 0)
    torch.testing.assert_close(store.flat.detach(), before - 0.5 * g)


def test_adaptive_dc_matches_numbers_computed_by_hand():
    """DC-ASGD-a: ms <- 0.95 ms + 0.05 g*g, λ = λ0 / (sqrt(ms) + 1e-7), then
    g + λ g*g*(w_now - w_base), stepped with sgd lr 0.5."""
    control = make_control(**{"server.policy": "dc", "server.dc_lambda": 2.0})
    store = control.store
    w0 = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    # push 1, staleness 0: the mean square is updated, the gradient is not compensated
    control.apply(grads([1.0, 1, 1, 1, 1, 1]), 0)
    w1 = [w - 0.5 * 1.0 for w in w0]
    ms1 = 0.05 * 1.0                                        # 0.95 * 0 + 0.05 * 1^2
    # push 2 from version 0 (staleness 1), g = 2 everywhere but 0 in the last entry
    g = [2.0, 2, 2, 2, 2, 0]
    control.apply(grads(g), 0)
    expected = []
    for gi, a, b in zip(g, w1, w0):
        ms2 = 0.95 * ms1 + 0.05 * gi * gi
        lam = 2.0 / (ms2 ** 0.5 + 1e-7)
        compensated = gi + lam * gi * gi * (a - b)
        expected.append(a - 0.5 * compensated)
    torch.testing.assert_close(store.flat.detach(), torch.tensor(expected))
    # by hand for the first entry: ms2 = 0.0475 + 0.2 = 0.2475, λ = 2/0.49749 = 4.0202,
    # g' = 2 + 4.0202 * 4 * (-0.5) = -6.0404, w = -0.5 - 0.5 * -6.0404 = 2.5202
    assert store.flat[0].item() == pytest.approx(2.5202, abs=1e-3)


def test_dc_history_is_bounded_and_falls_back_to_the_oldest():
    control = make_control(**{"server.policy": "dc", "server.dc_history": 3})
    store = control.store
    for v in range(5):
        control.apply(grads([0.1] * 6), v)
    assert control.dc.ring.shape == (3, 6)          # memory: dc_history x parameters
    control.apply(grads([0.1] * 6), 0)             # version 0 is no longer kept
    assert control.dc_fallbacks == 1


# ----------------------------------------------------------------------------------------------
# ServerCore: ssp and sync with a fake clock

class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def request(op, worker, rid, tensors=(), **fields):
    return protocol.encode({"v": 1, "op": op, "id": rid, "worker": worker, **fields}, tensors)


def push(core, worker, rid, version, values):
    t = torch.as_tensor(values, dtype=torch.float32)
    return core.handle(worker.encode(), request("push", worker, rid,
                                                [("w", t[:4]), ("b", t[4:])], version=version))


def replies(out):
    return {ident.decode(): protocol.decode([bytes(f) for f in frames])[0]
            for ident, frames in out}


def make_core(policy, clock, **overrides):
    store = make_store(**{"server.policy": policy, **overrides})
    return store, ServerCore(store, store.cfg, clock=clock)


def test_ssp_holds_the_worker_that_runs_ahead_until_the_slowest_catches_up():
    clock = FakeClock()
    store, core = make_core("ssp", clock, **{"server.ssp_slack": 1})
    for w in ("a", "b"):
        core.handle(w.encode(), request("hello", w, 1))
    assert replies(push(core, "a", 2, 0, [0] * 6))["a"]["ok"]     # a: clock 1, b: 0
    assert push(core, "a", 3, 1, [0] * 6) == []                   # a: clock 2 > 0 + 1: held
    assert store.version == 2                                     # ... but its push applied
    out = replies(push(core, "b", 2, 0, [0] * 6))                 # b: clock 1 releases a
    assert set(out) == {"a", "b"}
    assert out["a"]["id"] == 3 and out["a"]["version"] == 3


def test_ssp_dead_worker_stops_counting_after_the_timeout():
    clock = FakeClock()
    store, core = make_core("ssp", clock, **{"server.ssp_slack": 0,
                                             "server.worker_timeout_s": 5.0})
    for w in ("a", "b"):
        core.handle(w.encode(), request("hello", w, 1))
    assert push(core, "a", 2, 0, [0] * 6) == []                   # 1 > 0 + 0: held on b
    clock.now += 4.0
    assert core.tick() == []                                      # b still counts
    clock.now += 2.0
    out = replies(core.tick())                                    # b silent 6 s > 5 s
    assert out["a"]["ok"] and out["a"]["id"] == 2


def test_sync_applies_the_mean_once_every_live_worker_has_pushed():
    clock = FakeClock()
    store, core = make_core("sync", clock)
    for w in ("a", "b"):
        core.handle(w.encode(), request("hello", w, 1))
    before = store.flat.detach().clone()
    g1, g2 = torch.arange(6.0), torch.full((6,), 2.0)
    assert push(core, "a", 2, 0, g1) == []
    assert store.version == 0
    out = replies(push(core, "b", 2, 0, g2))
    assert set(out) == {"a", "b"}
    assert store.version == 1 and all(r["version"] == 1 and r["staleness"] == 0
                                      for r in out.values())
    torch.testing.assert_close(store.flat.detach(), before - 0.5 * (g1 + g2) / 2)
    s = core.stats()
    assert s["updates_applied"] == 1 and s["workers"]["a"]["pushes"] == 1


def test_sync_round_completes_without_a_dead_worker():
    clock = FakeClock()
    store, core = make_core("sync", clock, **{"server.worker_timeout_s": 3.0})
    for w in ("a", "b", "c"):
        core.handle(w.encode(), request("hello", w, 1))
    push(core, "a", 2, 0, [1.0] * 6)
    push(core, "b", 2, 0, [3.0] * 6)
    assert core.tick() == [] and store.version == 0               # c may still come
    clock.now += 3.5
    out = replies(core.tick())                                    # c is dead: round of two
    assert set(out) == {"a", "b"} and store.version == 1


def test_sync_bye_releases_the_round_at_once():
    clock = FakeClock()
    store, core = make_core("sync", clock)
    for w in ("a", "b"):
        core.handle(w.encode(), request("hello", w, 1))
    push(core, "a", 2, 0, [1.0] * 6)
    out = replies(core.handle(b"b", request("bye", "b", 2)))
    assert set(out) == {"a", "b"} and out["a"]["version"] == 1


def test_observers_do_not_join_a_sync_round():
    clock = FakeClock()
    store, core = make_core("sync", clock)
    core.handle(b"a", request("hello", "a", 1))
    core.handle(b"m", request("pull", "monitor", 1))               # the launcher's evaluation
    core.handle(b"m", request("stats", "monitor", 2))
    out = replies(push(core, "a", 2, 0, [1.0] * 6))
    assert out["a"]["ok"] and store.version == 1


def test_ssp_worker_coming_back_starts_at_the_slowest_live_clock():
    clock = FakeClock()
    store, core = make_core("ssp", clock, **{"server.ssp_slack": 0,
                                             "server.worker_timeout_s": 5.0})
    for w in ("a", "b"):
        core.handle(w.encode(), request("hello", w, 1))
    clock.now += 6.0                               # both silent: neither counts
    core.handle(b"a", request("hello", "a", 2))
    for k in range(5):                             # a runs alone: b does not count
        out = replies(push(core, "a", 10 + k, store.version, [0] * 6))
        assert out["a"]["ok"]
    core.handle(b"b", request("hello", "b", 3))    # b comes back at a's clock, not at 0
    assert core.control.ssp.people.clocks["b"] == 5
    assert push(core, "a", 20, store.version, [0] * 6) == []   # 6 > 5 + 0: held on b
    out = replies(push(core, "b", 4, store.version, [0] * 6))
    assert set(out) == {"a", "b"}


def test_sync_takes_every_gradient_whatever_the_bound():
    """The default bound (3) must not make --set server.policy=sync an error: sync ignores it
    (asgd.core.policies.decide), however stale a push is."""
    from asgd.core.policies import decide

    assert decide("sync", 10**6, max_staleness=0).apply
    clock = FakeClock()
    store, core = make_core("sync", clock, **{"server.max_staleness": 0})
    for w in ("a", "b"):
        core.handle(w.encode(), request("hello", w, 1))
    push(core, "a", 2, 0, [1.0] * 6)
    out = replies(push(core, "b", 2, 0, [3.0] * 6))
    assert all(r["applied"] for r in out.values()) and store.version == 1


def test_straggler_stretches_compute_and_the_fastest_recent_exchange():
    from asgd.tasks.straggler import Straggler

    s = Straggler(slow_factor=4.0, delay_s=0.5)
    assert s.extra_s(0.1, exchange_s=0.02) == pytest.approx(3 * 0.12 + 0.5)
    # a reply held 2 s by the server (ssp/sync) is not stretched: the exchange counts as 0.02
    assert s.extra_s(0.1, exchange_s=2.0) == pytest.approx(3 * 0.12 + 0.5)


def test_scale_and_dc_combine():
    control = make_control(**{"server.policy": "scale+dc", "server.dc_adaptive": False,
                              "server.dc_lambda": 0.5})
    store = control.store
    w0 = store.flat.detach().clone()
    control.apply(grads([1.0] * 6), 0)
    control.apply(grads([0.0] * 6), 1)
    w2 = store.flat.detach().clone()
    g = torch.tensor([1.0, -1, 2, 0, 3, 1])
    r = control.apply(grads(g), 0)                  # staleness 2: half the lr, compensated
    assert r.staleness == 2 and r.lr == pytest.approx(0.25)
    compensated = g + 0.5 * g * g * (w2 - w0)
    torch.testing.assert_close(store.flat.detach(), w2 - 0.25 * compensated)
