"""The parameter store (server.store): flat layout, optimizer steps equal to torch.optim's on
the per-tensor model, and the learning-rate schedule driven by the version."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from asgd.config import Config, from_dict
from asgd.core.layout import ParameterLayout
from asgd.tasks.models import build_model
from asgd.core.optim import scheduled_lr
from server.store import ParameterStore
from tests.conftest import apply_push


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(),
                         nn.Linear(4, 3, bias=False))


def gradients(model: nn.Module, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g) for p in model.parameters()]


CONSTANT = {"kind": "constant", "warmup": 0}


def config(optimizer: dict, schedule: dict = CONSTANT, **sections) -> Config:
    """A config whose schedule is explicit (the defaults are the default run's cosine) and,
    unless given, plain A-SGD (no staleness policy)."""
    sections.setdefault("server", {"policy": "none", "max_staleness": None})
    return from_dict({"optimizer": optimizer, "schedule": schedule, **sections})


def flat_bytes(store: ParameterStore) -> bytes:
    return store.flat.detach().numpy().tobytes()


# ----------------------------------------------------------------------------------------------
# layout

def test_layout_follows_the_model():
    model = small_model()
    store = ParameterStore.from_model(model, Config())
    assert store.specs == ParameterLayout.from_model(model).to_specs()
    assert store.names == [n for n, _ in model.named_parameters()]
    assert store.numel == sum(p.numel() for p in model.parameters())
    assert store.version == 0
    for view, p in zip(store.views, model.parameters()):
        assert view.shape == p.shape
        assert torch.equal(view, p.detach())
    # the views are windows on the one flat buffer
    with torch.no_grad():
        store.flat[store.offsets[1]] = 123.0
    assert store.views[1].reshape(-1)[0].item() == 123.0
    # and the store does not alias the model
    assert not torch.equal(store.views[1], list(model.parameters())[1].detach())


def test_store_refuses_non_float32_parameters_and_wrong_sizes():
    with pytest.raises(ValueError):
        ParameterStore(ParameterLayout.from_specs([{"name": "w", "dtype": "float16", "shape": [2]}]),
                       torch.zeros(2), Config())
    with pytest.raises(ValueError):
        ParameterStore(ParameterLayout.from_specs([{"name": "w", "dtype": "float32", "shape": [2, 3]}]),
                       torch.zeros(5),
                       Config())


def test_same_seed_builds_the_same_model():
    """Server and workers build their models independently; they must agree exactly."""
    cfg = Config()
    a = build_model(cfg.model, (40,), 10, seed=3)
    b = build_model(cfg.model, (40,), 10, seed=3)
    c = build_model(cfg.model, (40,), 10, seed=4)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


# ----------------------------------------------------------------------------------------------
# optimizer steps equal torch.optim's on the per-tensor model

OPTIMIZERS = {
    "sgd": ({"name": "sgd", "lr": 0.1},
            lambda ps: torch.optim.SGD(ps, lr=0.1)),
    "sgd-momentum": ({"name": "sgd", "lr": 0.05, "momentum": 0.9},
                     lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)),
    "sgd-nesterov-wd": ({"name": "sgd", "lr": 0.05, "momentum": 0.8, "nesterov": True,
                         "weight_decay": 0.01},
                        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, nesterov=True,
                                                   weight_decay=0.01)),
    "adam": ({"name": "adam", "lr": 0.01, "betas": [0.85, 0.99], "eps": 1e-7},
             lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.85, 0.99), eps=1e-7)),
    "adam-wd": ({"name": "adam", "lr": 0.003, "weight_decay": 0.05},
                lambda ps: torch.optim.Adam(ps, lr=0.003, weight_decay=0.05)),
    "adamw": ({"name": "adamw", "lr": 0.01, "weight_decay": 0.1},
              lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1)),
    "adagrad": ({"name": "adagrad", "lr": 0.1, "eps": 1e-10, "weight_decay": 0.01},
                lambda ps: torch.optim.Adagrad(ps, lr=0.1, eps=1e-10, weight_decay=0.01)),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_step_matches_torch_optim(name):
    section, reference = OPTIMIZERS[name]
    cfg = config(section)
    model = small_model()
    ref = copy.deepcopy(model)
    ref_opt = reference(list(ref.parameters()))
    store = ParameterStore.from_model(model, cfg)

    for step in range(6):
        grads = gradients(model, step)
        result = apply_push(store, [g.numpy() for g in grads], store.version)
        assert result.applied and result.staleness == 0 and result.version == step + 1
        assert result.lr == pytest.approx(section["lr"])
        for p, g in zip(ref.parameters(), grads):
            p.grad = g.clone()
        ref_opt.step()
        for (pname, p), view in zip(ref.named_parameters(), store.views):
            torch.testing.assert_close(view, p.detach(), rtol=1e-6, atol=1e-7,
                                       msg=lambda m: f"{name} step {step} {pname}: {m}")
    assert store.version == 6


def test_optimizer_step_follows_the_schedule():
    """With warm-up and cosine decay the store's step equals torch.optim's at the same lr."""
    cfg = config({"name": "sgd", "lr": 0.2, "momentum": 0.5},
                 {"kind": "cosine", "warmup": 3, "total": 8, "min_lr": 0.01},
                 run={"max_updates": 100})
    model = small_model(1)
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.5)
    store = ParameterStore.from_model(model, cfg)
    lrs = []
    for step in range(10):
        grads = gradients(model, step)
        result = apply_push(store, [g.numpy() for g in grads], store.version)
        lrs.append(result.lr)
        for group in ref_opt.param_groups:
            group["lr"] = scheduled_lr(cfg, step)
        for p, g in zip(ref.parameters(), grads):
            p.grad = g.clone()
        ref_opt.step()
    for view, p in zip(store.views, ref.parameters()):
        torch.testing.assert_close(view, p.detach(), rtol=1e-6, atol=1e-7)
    assert lrs[:3] == pytest.approx([0.2 / 3, 0.4 / 3, 0.2])
    assert lrs[8:] == pytest.approx([0.01, 0.01])


def test_stale_push_uses_the_current_weights_and_reports_staleness():
    cfg = config({"name": "sgd", "lr": 0.5})
    store = ParameterStore.from_model(small_model(), cfg)
    for step in range(3):
        apply_push(store, [g.numpy() for g in gradients(small_model(), step)], store.version)
    before = store.flat.detach().clone()
    grads = gradients(small_model(), 9)
    result = apply_push(store, [g.numpy() for g in grads], 0)
    assert (result.applied, result.staleness, result.version) == (True, 3, 4)
    expected = before - 0.5 * torch.cat([g.reshape(-1) for g in grads])
    torch.testing.assert_close(store.flat.detach(), expected, rtol=0, atol=1e-7)


def test_store_drops_pushes_past_the_bound_without_touching_anything():
    cfg = config({"name": "adam"}, server={"policy": "max_staleness", "max_staleness": 1})
    store = ParameterStore.from_model(small_model(), cfg)
    grads = [g.numpy() for g in gradients(small_model(), 0)]
    apply_push(store, grads, 0)
    apply_push(store, grads, 1)
    assert apply_push(store, grads, 1).applied            # staleness 1 == K
    flat = flat_bytes(store)
    state = {k: v.clone() for k, v in store.optimizer.state[store.flat].items()}
    result = apply_push(store, grads, 1)                  # staleness 2 == K + 1
    assert (result.applied, result.staleness, result.version) == (False, 2, 3)
    assert result.reason
    assert flat_bytes(store) == flat and store.version == 3
    for k, v in store.optimizer.state[store.flat].items():
        assert torch.equal(v, state[k]), k


class Tracker:
    """Stands in for a ZeroMQ MessageTracker: done once the frame it tracks was sent."""
    def __init__(self):
        self.done = False


def test_snapshot_pool_reuses_buffers_zeromq_has_let_go_of():
    cfg = config({"name": "sgd", "lr": 0.1})
    store = ParameterStore.from_model(small_model(), cfg)
    buf0, trackers0 = store.pool.take(store.version)
    assert np.shares_memory(buf0, store.pool.take(store.version)[0])   # same version: shared
    assert not np.shares_memory(buf0, store.weights.numpy())
    copy0 = buf0.copy()
    t = Tracker()
    trackers0.append(t)                      # a reply queued from this buffer
    apply_push(store, [g.numpy() for g in gradients(small_model(), 0)], 0)
    buf1, _ = store.pool.take(store.version)
    assert not np.shares_memory(buf0, buf1)  # still in use: another buffer
    assert np.array_equal(buf0, copy0)       # the queued reply keeps its bytes
    assert np.array_equal(buf1, store.weights.numpy())
    t.done = True
    apply_push(store, [g.numpy() for g in gradients(small_model(), 1)], 1)
    buf2, _ = store.pool.take(store.version)
    assert any(np.shares_memory(buf2, b) for b in (buf0, buf1))   # reused, not allocated
    assert np.array_equal(buf2, store.weights.numpy())
    assert len(store.pool.entries["float32"]) == 2
    half, _ = store.pool.take(store.version, "float16")
    assert half.dtype == np.float16 and np.allclose(half, buf2, atol=1e-3)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_gradient_in_pieces_steps_exactly_as_a_whole(name):
    """A flat push of several frames is stepped piece by piece where ZeroMQ put them
    (FlatChunks): the weights and optimizer state of one step over the whole (to rounding:
    a short piece takes the kernel's scalar tail, which may round a fused multiply-add
    differently from its vector loop)."""
    from server.store import FlatChunks

    section, _ = OPTIMIZERS[name]
    whole = ParameterStore.from_model(small_model(), config(section))
    pieces = ParameterStore.from_model(small_model(), config(section))
    cuts = [0, 7, 8, 40, whole.numel]               # uneven, one of a single value
    for step in range(5):
        g = torch.cat([x.reshape(-1) for x in gradients(small_model(), step)])
        whole.step(0.03, g.clone())
        pieces.step(0.03, FlatChunks([g[a:b].clone() for a, b in zip(cuts, cuts[1:])]))
        torch.testing.assert_close(pieces.weights, whole.weights, rtol=1e-6, atol=1e-7)
    assert pieces.version == whole.version == 5
    (s1, t1), (s2, t2) = pieces.optimizer_state(), whole.optimizer_state()
    assert s1 == s2
    for (n1, a), (n2, b) in zip(t1, t2):
        assert n1 == n2
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_step_that_writes_a_segment_as_it_goes_steps_as_a_whole(name, monkeypatch):
    """A push whose reply goes into a worker's segment (``reply_to``) is stepped block by
    block, each block of the new weights copied there as it goes: the weights and optimizer
    state of one step over the whole (to the rounding of a short block's scalar tail), and
    the segment holds exactly the weights. A rule it cannot take (Adagrad; a first step,
    before the optimizer's state exists) steps as usual and leaves the copy to the reply."""
    import server.store as store_module

    monkeypatch.setattr(store_module, "FUSE_BLOCK", 16)
    monkeypatch.setattr(store_module, "FUSE_MIN", 40)
    section, _ = OPTIMIZERS[name]
    whole = ParameterStore.from_model(small_model(), config(section))
    fused = ParameterStore.from_model(small_model(), config(section))
    assert fused.numel % 16 and fused.numel >= 40     # a short last block
    wrote = []
    for step in range(5):
        g = torch.cat([x.reshape(-1) for x in gradients(small_model(), step)])
        seg = np.full(fused.numel, np.nan, np.float32)
        whole.step(0.03, g.clone())
        fused.reply_to = seg
        fused.step(0.03, g.clone())
        fused.reply_to = None
        torch.testing.assert_close(fused.weights, whole.weights, rtol=1e-6, atol=1e-7)
        if fused.filled is not None:
            assert fused.filled == fused.version
            assert np.array_equal(seg, fused.weights.numpy())
            fused.filled = None
        else:
            assert np.isnan(seg).all()             # not touched: the reply copies
        wrote.append(not np.isnan(seg).any())
    assert wrote == ([False] * 5 if name == "adagrad" else
                     [True] * 5 if name == "sgd" else [False] + [True] * 4)
    (s1, t1), (s2, t2) = fused.optimizer_state(), whole.optimizer_state()
    assert s1 == s2
    for (n1, a), (n2, b) in zip(t1, t2):
        assert n1 == n2
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_lent_weights_are_moved_only_while_zeromq_holds_them():
    """Large replies are sent from the live weights themselves. A step while such a reply is
    still queued moves the weights to another buffer first (the reply keeps its bytes); a
    step after ZeroMQ let go of it changes them in place, with no copy."""
    cfg = config({"name": "sgd", "lr": 0.1})
    store = ParameterStore.from_model(small_model(), cfg)
    live, trackers = store.lend()
    assert np.shares_memory(live, store.weights.numpy())
    before = live.copy()
    t = Tracker()
    trackers.append(t)                       # a reply queued from the live weights
    apply_push(store, [g.numpy() for g in gradients(small_model(), 0)], 0)
    assert store.moves == 1
    assert np.array_equal(live, before)      # the queued reply keeps its bytes
    assert not np.shares_memory(live, store.weights.numpy())
    assert not np.array_equal(store.weights.numpy(), before)    # the step was applied
    for view, (a, b) in zip(store.views, store.layout.spans()):   # views follow the move
        assert np.shares_memory(view.numpy(), store.weights.numpy())
    t.done = True
    now, trackers = store.lend()
    trackers.append(Tracker())
    trackers[-1].done = True                 # sent already
    apply_push(store, [g.numpy() for g in gradients(small_model(), 1)], 1)
    assert store.moves == 1                  # nothing held: stepped in place
    assert np.shares_memory(now, store.weights.numpy())
    trackers.append(Tracker())               # held again: the spare buffer is reused
    apply_push(store, [g.numpy() for g in gradients(small_model(), 2)], 2)
    assert store.moves == 2 and np.shares_memory(live, store.weights.numpy())


def test_copies_on_write_leave_nothing_behind():
    """Thousands of copies on write, each spare taken back once its reply was sent, hold
    the same few arrays: the buffers lent are those arrays themselves, not views of views
    (which piled up a wrapper per move, and grew the server by ~3 MB a minute)."""
    import tracemalloc

    cfg = config({"name": "sgd", "lr": 0.1})
    store = ParameterStore.from_model(small_model(), cfg)
    grads = [g.numpy() for g in gradients(small_model(), 0)]

    def cycle():
        buf, trackers = store.lend()
        t = Tracker()
        trackers.append(t)                   # queued: the next step moves the weights
        apply_push(store, grads, store.version)
        t.done = True                        # then sent: the old buffer is a free spare
        return buf

    for _ in range(50):
        cycle()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        moves = store.moves
        lent = {cycle().ctypes.data for _ in range(2000)}
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert store.moves - moves == 2000
    assert len(lent) <= 2                    # the live buffer and one spare, in turn
    assert grown < 64 * 1024, grown


# ----------------------------------------------------------------------------------------------
# learning-rate schedule

def sched(**schedule) -> Config:
    """Schedule settings over a base lr of 0.1 and run.max_updates 1000 (no warm-up unless
    given)."""
    return config({"lr": 0.1}, {"warmup": 0, "min_lr": 0.0, **schedule},
                  run={"max_updates": 1000})


@pytest.mark.parametrize("version", [0, 1, 50, 10**6])
def test_constant_schedule(version):
    assert scheduled_lr(sched(kind="constant"), version) == pytest.approx(0.1)


@pytest.mark.parametrize("kind", ["constant", "cosine", "step"])
def test_warmup_is_linear_from_zero(kind):
    cfg = sched(kind=kind, warmup=10, total=110, min_lr=0.001, step_size=100)
    assert scheduled_lr(cfg, 0) == pytest.approx(0.01)
    assert scheduled_lr(cfg, 4) == pytest.approx(0.05)
    assert scheduled_lr(cfg, 9) == pytest.approx(0.1)
    assert scheduled_lr(cfg, 10) == pytest.approx(0.1)      # warm-up over: the base lr


def test_cosine_schedule():
    cfg = sched(kind="cosine", warmup=10, total=110, min_lr=0.001)
    assert scheduled_lr(cfg, 10) == pytest.approx(0.1)
    assert scheduled_lr(cfg, 35) == pytest.approx(0.001 + 0.099 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert scheduled_lr(cfg, 60) == pytest.approx(0.0505)    # half way: the mid point
    assert scheduled_lr(cfg, 110) == pytest.approx(0.001)
    assert scheduled_lr(cfg, 5000) == pytest.approx(0.001)   # stays at the floor
    lrs = [scheduled_lr(cfg, v) for v in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))          # never rises


def test_cosine_total_defaults_to_max_updates():
    cfg = sched(kind="cosine", warmup=0, total=0, min_lr=0.0)   # run.max_updates = 1000
    assert scheduled_lr(cfg, 0) == pytest.approx(0.1)
    assert scheduled_lr(cfg, 500) == pytest.approx(0.05)
    assert scheduled_lr(cfg, 1000) == pytest.approx(0.0, abs=1e-12)


def test_step_schedule():
    cfg = sched(kind="step", warmup=0, step_size=100, gamma=0.5)
    assert [scheduled_lr(cfg, v) for v in (0, 99, 100, 199, 200, 250, 300)] == pytest.approx(
        [0.1, 0.1, 0.05, 0.05, 0.025, 0.025, 0.0125])
    cfg = sched(kind="step", warmup=10, step_size=100, gamma=0.1)
    assert [scheduled_lr(cfg, v) for v in (10, 109, 110, 210)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.001])


def test_push_records_the_scheduled_lr_of_its_version():
    cfg = config({"name": "sgd", "lr": 0.1},
                 {"kind": "step", "warmup": 2, "step_size": 2, "gamma": 0.5},
                 run={"max_updates": 100})
    store = ParameterStore.from_model(small_model(), cfg)
    grads = [g.numpy() for g in gradients(small_model(), 0)]
    lrs = [apply_push(store, grads, store.version).lr for _ in range(6)]
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.1, 0.05, 0.05])
    assert lrs == pytest.approx([scheduled_lr(cfg, v) for v in range(6)])



def test_local_steps_apply_pseudo_gradients_with_the_outer_optimizer():
    """worker.exchange.local_steps > 1: the server's rule is server.outer (DiLoCo's Nesterov SGD
    at a constant rate), not the optimizer section, which the workers use inside."""
    from asgd.core.optim import server_lr

    cfg = config({"name": "adam", "lr": 0.01}, worker={"local_steps": 4},
                 server={"policy": "none", "max_staleness": None, "outer_lr": 0.05,
                         "outer_momentum": 0.9, "outer_nesterov": True})
    store = ParameterStore.from_model(small_model(), cfg)
    assert type(store.optimizer).__name__ == "SGD"
    assert server_lr(cfg, 0) == server_lr(cfg, 999) == 0.05
    ref = small_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    for step in range(3):
        deltas = gradients(ref, step)
        apply_push(store, [d.numpy() for d in deltas], step)
        for p, d in zip(ref.parameters(), deltas):
            p.grad = d.clone()
        ref_opt.step()
    expected = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
    assert torch.allclose(store.flat.detach(), expected, atol=1e-6)
