"""ServerCore without sockets: frames in, reply frames out. Staleness, the bound, every kind
of bad request (answered with its code, changing nothing), and the stats counters."""
from __future__ import annotations

import itertools
from collections import Counter

import msgpack
import numpy as np
import pytest
import torch
from torch import nn

from asgd.core import protocol
from asgd.config import from_dict
from server.core import ServerCore
from server.store import ParameterStore

IDENTITY = b"\x00peer-1"


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def make_core(**sections) -> ServerCore:
    sections.setdefault("optimizer", {"name": "adam", "lr": 0.01})
    sections.setdefault("schedule", {"kind": "constant", "warmup": 0})
    sections.setdefault("server", {"policy": "none", "max_staleness": None})   # plain A-SGD
    cfg = from_dict(sections)
    return ServerCore(ParameterStore.from_model(small_model(), cfg), cfg)


_ids = itertools.count(1)


def request_frames(op: str, tensors=(), **fields) -> tuple[int, list]:
    rid = next(_ids)
    header = {"v": 1, "op": op, "id": rid, "worker": "w0", **fields}
    return rid, protocol.encode(header, tensors)


def call(core: ServerCore, frames, identity: bytes = IDENTITY):
    replies = core.handle(identity, frames)
    assert len(replies) == 1
    peer, out = replies[0]
    assert peer == identity
    return protocol.decode(out)


def send(core: ServerCore, op: str, tensors=(), worker: str = "w0", **fields):
    rid = next(_ids)
    header = {"v": 1, "op": op, "id": rid, "worker": worker, **fields}
    head, out = call(core, protocol.encode(header, tensors))
    assert head["id"] == rid
    return head, out


def grads_for(core: ServerCore, seed: int = 0, scale: float = 1.0):
    g = np.random.default_rng(seed)
    return [(s["name"], (scale * g.standard_normal(s["shape"])).astype(np.float32))
            for s in core.store.specs]


def state_bytes(core: ServerCore) -> tuple:
    """Everything a rejected request must leave alone, as bytes."""
    store = core.store
    opt = store.optimizer.state.get(store.flat, {})
    return (store.version, store.flat.detach().numpy().tobytes(),
            tuple(sorted((k, v.numpy().tobytes() if torch.is_tensor(v) else v)
                         for k, v in opt.items())))


# ----------------------------------------------------------------------------------------------
# ops

def test_hello_describes_the_model_and_sends_the_weights():
    core = make_core()
    head, weights = send(core, "hello", rank=1)
    assert head["ok"] is True and head["version"] == 0
    assert head["tensors"] == core.store.specs
    assert head["shard"] == {"index": 0, "count": 1, "start": 0, "stop": core.store.numel}
    assert head["config"]["optimizer"]["name"] == "adam"
    assert [t.name for t in weights] == core.store.names
    flat = np.concatenate([t.array.reshape(-1) for t in weights])
    assert flat.tobytes() == core.store.flat.detach().numpy().tobytes()
    assert core.stats()["workers"]["w0"]["rank"] == 1


def test_pull_push_and_push_pull():
    core = make_core(optimizer={"name": "sgd", "lr": 0.5})
    head, weights = send(core, "pull")
    assert head["version"] == 0
    w0 = np.concatenate([t.array.reshape(-1) for t in weights]).copy()
    grads = grads_for(core)
    head, out = send(core, "push", grads, version=0)
    assert (head["ok"], head["version"], head["staleness"], head["applied"]) == (True, 1, 0, True)
    assert out == []
    g = np.concatenate([a.reshape(-1) for _, a in grads])
    np.testing.assert_allclose(core.store.flat.detach().numpy(), w0 - 0.5 * g, rtol=0, atol=1e-6)
    head, weights = send(core, "push_pull", grads, version=1)
    assert (head["version"], head["staleness"], head["applied"]) == (2, 0, True)
    fresh = np.concatenate([t.array.reshape(-1) for t in weights])
    assert fresh.tobytes() == core.store.flat.detach().numpy().tobytes()
    np.testing.assert_allclose(fresh, w0 - 2 * 0.5 * g, rtol=0, atol=1e-6)


def test_staleness_is_version_minus_base_version():
    core = make_core()
    for v in range(3):
        head, _ = send(core, "push", grads_for(core, v), version=v)
        assert (head["staleness"], head["version"]) == (0, v + 1)
    head, _ = send(core, "push", grads_for(core, 9), version=0, worker="w1")
    assert (head["applied"], head["staleness"], head["version"]) == (True, 3, 4)
    head, _ = send(core, "push_pull", grads_for(core, 10), version=2, worker="w1")
    assert (head["staleness"], head["version"]) == (2, 5)


def test_max_staleness_drops_with_weights_unchanged():
    core = make_core(server={"policy": "max_staleness", "max_staleness": 2})
    for v in range(3):
        send(core, "push", grads_for(core, v), version=v)
    head, _ = send(core, "push", grads_for(core, 3), version=1)      # staleness 2 == K
    assert (head["ok"], head["applied"], head["staleness"], head["version"]) == (True, True, 2, 4)
    before = state_bytes(core)
    head, _ = send(core, "push", grads_for(core, 4), version=1)      # staleness 3 == K + 1
    assert (head["ok"], head["applied"], head["staleness"], head["version"]) == (True, False, 3, 4)
    assert state_bytes(core) == before
    head, weights = send(core, "push_pull", grads_for(core, 5), version=0)
    assert (head["applied"], head["staleness"], head["version"]) == (False, 4, 4)
    assert np.concatenate([t.array.reshape(-1) for t in weights]).tobytes() == before[1]
    assert state_bytes(core) == before
    s = core.stats()
    assert (s["updates_applied"], s["updates_dropped"]) == (4, 2)


def test_staleness_policies_apply_to_pseudo_gradients_with_the_outer_rate():
    """worker.exchange.local_steps > 1: a push is a pseudo-gradient, stepped with the outer
    optimizer's rate times the staleness policy's scale (``scale``: 1 / max(1, staleness)), and
    dropped past the bound as any push is. Plain outer SGD, so each step is lr * scale * g."""
    core = make_core(optimizer={"name": "adam", "lr": 0.01}, worker={"local_steps": 4},
                     server={"policy": "scale+max_staleness", "max_staleness": 2,
                             "outer_lr": 0.5, "outer_momentum": 0.0, "outer_nesterov": False})
    assert type(core.store.optimizer).__name__ == "SGD"     # the outer rule, not the inner Adam
    flat = lambda: core.store.flat.detach().numpy().copy()  # noqa: E731
    for staleness, scale in ((0, 1.0), (1, 1.0), (2, 0.5)):
        before = flat()
        grads = grads_for(core, staleness)
        head, _ = send(core, "push", grads, version=0)       # based on the first weights
        assert (head["applied"], head["staleness"]) == (True, staleness)
        g = np.concatenate([a.reshape(-1) for _, a in grads])
        np.testing.assert_allclose(flat(), before - 0.5 * scale * g, rtol=0, atol=1e-6)
    before = state_bytes(core)
    head, _ = send(core, "push", grads_for(core, 7), version=0)   # staleness 3 > 2
    assert (head["applied"], head["staleness"]) == (False, 3)
    assert state_bytes(core) == before


# ----------------------------------------------------------------------------------------------
# bad requests: the right code, nothing changed

def _header(**fields):
    h = {"v": 1, "op": "push", "id": 99, "worker": "w0", "version": 1}
    h.update(fields)
    return {k: v for k, v in h.items() if v is not DROP}


DROP = object()


def _push(core, grads=None, **fields):
    """Frames of a push whose header gets ``fields`` (DROP removes a key)."""
    return protocol.encode(_header(**fields), grads if grads is not None else grads_for(core))


def _with(core, index, array):
    grads = grads_for(core)
    name, _ = grads[index]
    grads[index] = (name, array)
    return grads


def _replace_frame(frames, i, data):
    frames = list(frames)
    frames[i] = data
    return frames


BAD_REQUESTS = {
    # the message
    "not msgpack": ("bad_request", lambda c: [b"\xc1garbage"]),
    "empty message": ("bad_request", lambda c: []),
    "empty header frame": ("bad_request", lambda c: [b""]),
    "header is a list": ("bad_request", lambda c: [msgpack.packb([1, "push"])]),
    "garbage frames": ("bad_request", lambda c: [b"\xc1", b"\x00" * 8, b"junk"]),
    "too large": ("too_large", lambda c: _push(c, pad="x" * 4096)),
    # the header's keys
    "missing v": ("bad_request", lambda c: _push(c, v=DROP)),
    "v is a string": ("bad_request", lambda c: _push(c, v="1")),
    "v=2": ("bad_version", lambda c: _push(c, v=2)),
    "v=0": ("bad_version", lambda c: _push(c, v=0)),
    "unknown op": ("unknown_op", lambda c: _push(c, op="frobnicate")),
    "missing op": ("bad_request", lambda c: _push(c, op=DROP)),
    "op not a string": ("bad_request", lambda c: _push(c, op=3)),
    "missing id": ("bad_request", lambda c: _push(c, id=DROP)),
    "id is a string": ("bad_request", lambda c: _push(c, id="99")),
    "id is a bool": ("bad_request", lambda c: _push(c, id=True)),
    "id is a float": ("bad_request", lambda c: _push(c, id=1.0)),
    "missing worker": ("bad_request", lambda c: _push(c, worker=DROP)),
    "worker not a string": ("bad_request", lambda c: _push(c, worker=7)),
    "empty worker": ("bad_request", lambda c: _push(c, worker="")),
    "worker id too long": ("bad_request", lambda c: _push(c, worker="w" * 257)),
    "bad rank": ("bad_request", lambda c: protocol.encode(_header(op="hello", rank=-1))),
    "pull with tensors": ("bad_request", lambda c: _push(c, op="pull")),
    "unknown encoding": ("bad_request", lambda c: _push(c, encoding="zip")),
    # the push's version
    "missing version": ("bad_request", lambda c: _push(c, version=DROP)),
    "version is a string": ("bad_request", lambda c: _push(c, version="1")),
    "version is a bool": ("bad_request", lambda c: _push(c, version=True)),
    "version from the future": ("bad_version", lambda c: _push(c, version=2)),
    "negative version": ("bad_version", lambda c: _push(c, version=-1)),
    "push_pull from the future": ("bad_version", lambda c: _push(c, op="push_pull", version=5)),
    # the tensors
    "wrong tensor name": ("bad_tensor", lambda c: _push(
        c, [("nope" if i == 1 else n, a) for i, (n, a) in enumerate(grads_for(c))])),
    "tensors out of order": ("bad_tensor", lambda c: _push(c, grads_for(c)[::-1])),
    "wrong dtype float16": ("bad_tensor", lambda c: _push(
        c, _with(c, 0, grads_for(c)[0][1].astype(np.float16)))),
    "wrong dtype int32": ("bad_tensor", lambda c: _push(
        c, _with(c, 2, grads_for(c)[2][1].astype(np.int32)))),
    "wrong dtype bfloat16": ("bad_tensor", lambda c: _push(
        c, _with(c, 1, torch.from_numpy(grads_for(c)[1][1]).to(torch.bfloat16)))),
    "wrong shape": ("bad_tensor", lambda c: _push(
        c, _with(c, 0, grads_for(c)[0][1].reshape(-1)))),
    "transposed shape": ("bad_tensor", lambda c: _push(
        c, _with(c, 0, np.ascontiguousarray(grads_for(c)[0][1].T)))),
    "one tensor missing": ("bad_tensor", lambda c: _push(c, grads_for(c)[:-1])),
    "one tensor too many": ("bad_tensor", lambda c: _push(
        c, grads_for(c) + [("extra", np.zeros(2, np.float32))])),
    "no tensors": ("bad_tensor", lambda c: protocol.encode(_header())),
    "NaN": ("bad_tensor", lambda c: _push(c, _with(c, 2, np.full((2, 3), np.nan, np.float32)))),
    "one NaN among numbers": ("bad_tensor", lambda c: _push(
        c, _with(c, 3, np.array([0.5, np.nan], np.float32)))),
    "+inf": ("bad_tensor", lambda c: _push(c, _with(c, 1, np.array([1, np.inf, 2], np.float32)))),
    "-inf": ("bad_tensor", lambda c: _push(c, _with(c, 1, np.array([1, 2, -np.inf], np.float32)))),
    # frames that disagree with the header
    "frame count mismatch": ("bad_request", lambda c: _push(c)[:-1]),
    "extra frame": ("bad_request", lambda c: _push(c) + [b"\x00" * 8]),
    "frame byte size mismatch": ("bad_tensor", lambda c: _replace_frame(_push(c), 2, b"\0" * 5)),
    "unknown dtype": ("bad_tensor", lambda c: [msgpack.packb(
        _header(tensors=[{"name": "0.weight", "dtype": "float64", "shape": [3, 4]}])),
        b"\0" * 96]),
    "malformed shape": ("bad_request", lambda c: [msgpack.packb(
        _header(tensors=[{"name": "0.weight", "dtype": "float32", "shape": [3, -4]}])), b""]),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_its_code_and_changes_nothing(case):
    code, build = BAD_REQUESTS[case]
    core = make_core(server={"max_message_mb": 0.002})    # 2 KiB: a push of this model fits
    send(core, "push", grads_for(core, 0), version=0)     # version 1, optimizer state exists
    before = state_bytes(core)
    errors_before = dict(core.errors)

    head, tensors = call(core, build(core))
    assert head["ok"] is False, head
    assert head["error"] == code, head
    assert isinstance(head["message"], str) and head["message"]
    assert tensors == []
    assert state_bytes(core) == before
    assert core.errors[code] == errors_before.get(code, 0) + 1
    assert core.applied == 1 and core.dropped == 0
    # and the core goes on serving
    head, _ = send(core, "push", grads_for(core, 1), version=1)
    assert (head["ok"], head["applied"], head["version"]) == (True, True, 2)


def test_the_good_push_used_as_a_base_fits_the_limit():
    core = make_core(server={"max_message_mb": 0.002})
    frames = _push(core)
    assert sum(memoryview(f).nbytes for f in frames) < core.max_bytes
    assert sum(memoryview(f).nbytes for f in _push(core, pad="x" * 4096)) > core.max_bytes


@pytest.mark.parametrize("shape", [[2**62, 2**62], [0, 2**63], [2**63, 0, 3]],
                         ids=["2^62x2^62", "0x2^63", "2^63x0x3"])
def test_absurd_shape_is_bad_tensor_not_internal(shape):
    """A shape whose element count wraps around int64, or a zero-size shape with a dimension
    numpy cannot hold, is rejected as a bad tensor; it must not reach numpy and come back as
    an internal error."""
    core = make_core()
    before = state_bytes(core)
    spec = {"name": "0.weight", "dtype": "float32", "shape": shape}
    frames = [msgpack.packb(_header(version=0, tensors=[spec]))]
    frames += [b""]
    head, _ = call(core, frames)
    assert head["ok"] is False
    assert head["error"] == "bad_tensor", head
    assert core.errors.get("internal", 0) == 0
    assert state_bytes(core) == before


@pytest.mark.parametrize("case", ["v=2", "unknown op", "wrong shape", "NaN",
                                  "version from the future", "too large"])
def test_error_reply_echoes_the_request_id(case):
    """Every reply carries the request's id when the request's header could be read: a
    client matches replies to requests by id and discards the others."""
    code, build = BAD_REQUESTS[case]
    core = make_core(server={"max_message_mb": 0.002})
    send(core, "push", grads_for(core, 0), version=0)
    head, _ = call(core, build(core))
    assert head["error"] == code
    assert head["id"] == 99


def test_unparseable_request_is_answered_without_an_id():
    core = make_core()
    head, _ = call(core, [b"\xc1"])
    assert head == {"ok": False, "id": None, "error": "bad_request", "message": head["message"]}


# ----------------------------------------------------------------------------------------------
# stats

def test_stats_counters():
    core = make_core(server={"policy": "max_staleness", "max_staleness": 1})
    sent = received = 0

    def tracked(frames, identity=IDENTITY):
        nonlocal sent, received
        sent += sum(memoryview(f).nbytes for f in frames)
        replies = core.handle(identity, frames)
        received += sum(memoryview(f).nbytes for f in replies[0][1])
        return protocol.decode(replies[0][1])

    tracked(request_frames("hello", rank=0)[1])
    tracked(request_frames("push", grads_for(core, 0), version=0)[1])       # staleness 0
    tracked(request_frames("push", grads_for(core, 1), version=0)[1])       # staleness 1
    tracked(request_frames("push", grads_for(core, 2), version=0)[1])       # 2: dropped
    tracked(request_frames("pull")[1])
    h = {"v": 1, "op": "push_pull", "id": 5, "worker": "w1", "version": 2}
    tracked(protocol.encode(h, grads_for(core, 3)))                         # w1, staleness 0
    tracked([b"\xc1"])                                                      # bad_request
    tracked(protocol.encode({**h, "version": 9}, grads_for(core, 3)))      # bad_version
    tracked(protocol.encode({**h, "op": "nope"}))                          # unknown_op

    s = core.stats()
    assert s["version"] == 3 == core.store.version
    assert (s["updates_applied"], s["updates_dropped"]) == (3, 1)
    assert s["staleness_histogram"] == {"0": 2, "1": 1, "2": 1}
    assert s["staleness_mean"] == pytest.approx(3 / 4)
    assert s["staleness_max"] == 2
    w0 = s["workers"]["w0"]
    assert (w0["pushes"], w0["applied"], w0["dropped"], w0["rank"]) == (3, 2, 1, 0)
    assert w0["staleness_histogram"] == {"0": 1, "1": 1, "2": 1}
    assert w0["last_seen_ago_s"] >= 0 and w0["alive"] is True
    # w1 never said hello: its push counts in the totals, but it has no record of its own
    assert "w1" not in s["workers"] and s["workers_known"] == 1
    # requests whose header passed are counted by op, the rejected push_pull too
    assert s["requests"] == {"hello": 1, "push": 3, "pull": 1, "push_pull": 2}
    assert s["errors"] == {"bad_request": 1, "bad_version": 1, "unknown_op": 1}
    assert s["bytes_in"] == sent
    assert s["bytes_out"] == received

    # the stats op: a client that is not a worker, no tensors
    head, out = send(core, "stats", worker="launcher")
    assert head["ok"] is True and out == []
    assert head["updates_applied"] == 3 and head["staleness_histogram"] == s["staleness_histogram"]
    assert "launcher" not in head["workers"]


def test_applied_count_equals_version_after_many_pushes():
    core = make_core()
    rng = np.random.default_rng(0)
    acknowledged = 0
    for w in ("w0", "w1", "w2"):
        send(core, "hello", worker=w)
    for i in range(40):
        base = int(rng.integers(0, core.store.version + 1))
        head, _ = send(core, "push", grads_for(core, i, scale=0.1), version=base,
                       worker=f"w{i % 3}")
        acknowledged += head["applied"]
        assert head["staleness"] == head["version"] - 1 - base
    assert core.store.version == acknowledged == 40 == core.stats()["updates_applied"]
    assert sum(core.stats()["staleness_histogram"].values()) == 40
    assert Counter(w["pushes"] for w in core.stats()["workers"].values()) == Counter({14: 1, 13: 2})


# ----------------------------------------------------------------------------------------------
# exactly once, bounded state

def test_a_push_sent_again_is_answered_from_memory_and_applied_once():
    core = make_core()
    send(core, "hello", worker="w0")
    g = grads_for(core, 1, scale=0.1)
    first, _ = send(core, "push", g, version=0, seq=7)
    before = state_bytes(core)
    again, _ = send(core, "push", g, version=0, seq=7)          # the reply was lost: resent
    assert state_bytes(core) == before                                 # nothing applied again
    assert again["repeat"] is True and (again["version"], again["applied"]) == (1, True)
    # a push_pull resent gets the current weights with the first reply's outcome
    head, weights = send(core, "push_pull", g, version=1, seq=8)
    head2, weights2 = send(core, "push_pull", g, version=1, seq=8)
    assert (head2["version"], head2["repeat"]) == (2, True) and core.store.version == 2
    assert [w.array.tobytes() for w in weights] == [w.array.tobytes() for w in weights2]
    s = core.stats()
    assert s["repeats"] == 2 and s["workers"]["w0"]["repeats"] == 2
    assert s["workers"]["w0"]["pushes"] == 2 == s["updates_applied"]


def test_sequence_numbers_are_per_worker_and_remembered_for_a_bounded_window():
    from server.workers import REPLY_MEMORY

    core = make_core(optimizer={"name": "sgd", "lr": 0.01})
    for w in ("a", "b"):
        send(core, "hello", worker=w)
    g = grads_for(core, 2, scale=0.01)
    send(core, "push", g, worker="a", version=0, seq=1)
    head, _ = send(core, "push", g, worker="b", version=1, seq=1)   # b's 1 is not a's 1
    assert head.get("repeat") is None and core.store.version == 2
    for k in range(2, REPLY_MEMORY + 3):
        send(core, "push", g, worker="a", version=core.store.version, seq=k)
    assert len(core.workers["a"].replies) == REPLY_MEMORY
    v = core.store.version
    head, _ = send(core, "push", g, worker="a", version=v, seq=1)  # forgotten: a new push
    assert head.get("repeat") is None and core.store.version == v + 1


def test_a_push_held_by_sync_and_sent_again_is_answered_once_with_the_round():
    core = make_core(server={"policy": "sync", "max_staleness": None})
    for w in ("a", "b"):
        send(core, "hello", worker=w)
    g = grads_for(core, 3, scale=0.1)
    first = request_frames("push", g, worker="a", version=0, seq=5)[1]
    assert core.handle(b"A", first) == []                   # held for the round
    again = request_frames("push", g, worker="a", version=0, seq=5)[1]
    assert core.handle(b"A2", again) == []                  # still held, now for this request
    replies = core.handle(b"B", request_frames("push", g, worker="b", version=0, seq=1)[1])
    assert sorted(i for i, _ in replies) == [b"A2", b"B"]   # one reply each, to the latest
    assert core.store.version == 1


def test_only_workers_that_said_hello_get_records_and_they_are_bounded():
    core = make_core(server={"max_workers": 8})
    for i in range(50):                      # strangers: pushes, pulls, stats, bad requests
        send(core, "push", grads_for(core, 0, scale=0.0), worker=f"x{i}", version=0)
        send(core, "stats", worker=f"y{i}")
        call(core, [protocol.pack_header({"v": 1, "op": "push", "id": 1, "worker": f"z{i}"})])
    assert core.workers == {}
    for i in range(20):
        send(core, "hello", worker=f"w{i}")
    s = core.stats()
    assert s["workers_known"] == 8 and s["workers_evicted"] == 12
    assert set(core.workers) == {f"w{i}" for i in range(12, 20)}   # the longest silent went


@pytest.mark.parametrize("name", ["", "a b", "-x", "w\n0", "ü", "x" * 257])
def test_a_worker_name_outside_the_allowed_characters_is_refused(name):
    core = make_core()
    head, _ = send(core, "hello", worker=name)
    assert head["ok"] is False and head["error"] == "bad_request"
    assert core.workers == {}


def test_stats_stay_small_with_many_workers():
    from server.core import STATS_WORKERS

    core = make_core(server={"max_workers": 4096})
    for i in range(3000):
        send(core, "hello", worker=f"worker-{i:05d}")
    head, _ = send(core, "stats", worker="launcher")
    assert len(head["workers"]) == STATS_WORKERS and head["workers_known"] == 3000
    assert len(protocol.pack_header(head)) < 64 * 1024


def test_a_reply_keeps_the_weights_it_was_made_with_until_it_is_sent():
    """A reply reads the live weights without a copy (server.reply): a step that comes before
    the loop has sent it (a held round released in the same turn) moves the weights to another
    buffer first; once it is sent, steps go on in place."""
    core = make_core()
    core.handle(IDENTITY, request_frames("hello")[1])[0][1].sent = True
    (peer, reply), = core.handle(IDENTITY, request_frames("pull")[1])
    assert not reply.done                        # made, not sent: the store waits for it
    before = [bytes(memoryview(p)) for p in reply[1:]]
    head, _ = send(core, "push", grads_for(core, 0), version=core.store.version)
    assert head["applied"] and core.store.moves >= 1
    assert [bytes(memoryview(p)) for p in reply[1:]] == before      # not the new weights
    for peer, r in core.handle(IDENTITY, request_frames("pull")[1]):
        r.sent = True                            # what the loop does once it sent it
    reply.sent = True
    moves = core.store.moves
    send(core, "push", grads_for(core, 1), version=core.store.version)
    assert core.store.moves == moves             # nothing unsent reads the weights: in place
