"""The flat data path against a real server process: flat pushes over tcp and ipc, the
shared-memory segment, the wire encodings, reply weights in fp16/bf16, zero-copy replies that
are never torn, and every malformed flat push refused with the weights unchanged."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from asgd.client import ServerError
from asgd.core import encoding as enc
from asgd.core import protocol
from asgd.core.shm import Segment
from asgd.core.endpoint import is_local

SGD = {"optimizer": {"name": "sgd", "lr": 1.0},
       "schedule": {"kind": "constant", "warmup": 0}}


def flat_weights(client, numel: int) -> tuple[int, np.ndarray]:
    out = np.empty(numel, np.float32)
    return client.pull_flat(out), out


@pytest.fixture
def sgd_server(start_server, make_config, tmp_path):
    """A server with SGD at lr 1 (new weights = old - gradient), tcp or ipc."""
    def start(bind: str = "tcp://127.0.0.1:0", **sections):
        return start_server(make_config(**SGD, **sections), bind=bind)
    return start


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_flat_push_pull_applies_the_gradient_and_returns_the_weights(
        sgd_server, clients, tmp_path, transport):
    bind = "tcp://127.0.0.1:0" if transport == "tcp" else f"ipc://{tmp_path}/s.sock"
    server = sgd_server(bind)
    c = clients(server.endpoint)
    info, tensors = c.hello(rank=0)
    numel = sum(t.array.size for t in tensors)
    v0, w0 = flat_weights(c, numel)
    assert np.array_equal(w0, np.concatenate([t.array.reshape(-1) for t in tensors]))
    g = np.random.default_rng(0).normal(size=numel).astype(np.float32)
    out = np.empty(numel, np.float32)
    reply = c.push_pull_flat(v0, g, out)
    assert (reply["version"], reply["applied"], reply["staleness"]) == (v0 + 1, True, 0)
    assert np.allclose(out, w0 - g, atol=1e-6)
    # a plain push, then a per-parameter pull: both forms see the same weights
    c.push_flat(reply["version"], g)
    version, per_tensor = c.pull()
    assert version == v0 + 2
    assert np.allclose(np.concatenate([t.array.reshape(-1) for t in per_tensor]), w0 - 2 * g,
                       atol=1e-5)


@pytest.mark.slow
def test_shared_memory_moves_only_the_header(sgd_server, clients, tmp_path):
    server = sgd_server(f"ipc://{tmp_path}/s.sock")
    c = clients(server.endpoint)
    _, tensors = c.hello()
    numel = sum(t.array.size for t in tensors)
    seg = Segment.create(numel)
    try:
        c.hello(rank=0, shm=seg)
        assert c.segment is seg, c.shm_refused
        v0, w0 = flat_weights(c, numel)
        g = np.linspace(-1, 1, numel, dtype=np.float32)
        seg.grad(1)[:] = g
        sent = c.bytes_sent
        out = np.empty(numel, np.float32)
        reply = c.push_pull_flat(v0, None, out, slot=1)
        assert c.bytes_sent - sent < 200             # a header, no tensor bytes
        assert reply["version"] == v0 + 1
        assert np.allclose(out, w0 - g, atol=1e-6)
        assert np.array_equal(seg.weights, out)      # the server wrote them in the segment
        # a non-finite gradient in the segment is refused and changes nothing
        seg.grad(0)[:] = g
        seg.grad(0)[numel // 2] = np.nan
        with pytest.raises(ServerError) as e:
            c.push_pull_flat(reply["version"], None, out, slot=0)
        assert e.value.code == "bad_tensor"
        with pytest.raises(ServerError) as e:
            c.push_pull_flat(reply["version"], None, out, slot=2)   # no such slot
        assert e.value.code == "bad_request"
        assert flat_weights(c, numel)[0] == v0 + 1
    finally:
        c.bye()
        seg.close()


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", [
    {"name": "sgd", "lr": 1.0},
    {"name": "adam", "lr": 0.01, "betas": [0.9, 0.95], "weight_decay": 0.1}])
def test_a_large_model_over_shared_memory_gets_every_version_whole(
        start_server, make_config, clients, tmp_path, optimizer):
    """Above server.store.FUSE_MIN values the step writes the pusher's segment block by block
    as it goes, instead of one copy after it: two workers in turn, each with its segment,
    get exactly the weights of their own push's version (the other worker's segment is
    copied into as before), equal to the same torch optimizer stepped in one process."""
    from server.store import FUSE_BLOCK, FUSE_MIN

    server = start_server(make_config(
        optimizer=optimizer, schedule=SGD["schedule"],
        model={"name": "cnn1d", "args": {"channels": 896}}), bind=f"ipc://{tmp_path}/s.sock")
    a, b = clients(server.endpoint, "a"), clients(server.endpoint, "b")
    _, tensors = a.hello(rank=0)
    numel = sum(t.array.size for t in tensors)
    assert numel >= FUSE_MIN and numel % FUSE_BLOCK      # several blocks, a short last one
    segs = [Segment.create(numel), Segment.create(numel)]
    try:
        for c, seg, rank in ((a, segs[0], 0), (b, segs[1], 1)):
            c.hello(rank=rank, shm=seg)
            assert c.segment is seg, c.shm_refused
        version, w0 = flat_weights(a, numel)
        ref = torch.nn.Parameter(torch.from_numpy(w0.copy()))
        kw = {k: tuple(v) if isinstance(v, list) else v
              for k, v in optimizer.items() if k != "name"}
        opt = (torch.optim.SGD if optimizer["name"] == "sgd" else torch.optim.Adam)([ref], **kw)
        rng = np.random.default_rng(0)
        out = np.empty(numel, np.float32)
        for k in range(6):
            c, seg = (a, segs[0]) if k % 2 == 0 else (b, segs[1])
            g = rng.normal(size=numel).astype(np.float32) * 1e-2
            seg.grad(0)[:] = g
            reply = c.push_pull_flat(version, None, out, slot=0)
            assert reply["version"] == version + 1 and reply["applied"], reply
            ref.grad = torch.from_numpy(g)
            opt.step()
            assert np.array_equal(seg.weights, out)
            np.testing.assert_allclose(out, ref.detach().numpy(), rtol=1e-5, atol=1e-6)
            other = segs[1] if c is a else segs[0]
            pulled = np.empty(numel, np.float32)
            assert (b if c is a else a).pull_flat(pulled) == reply["version"]
            assert np.array_equal(pulled, out) and np.array_equal(other.weights, out)
            version = reply["version"]
    finally:
        for c in (a, b):
            c.bye()
        for seg in segs:
            seg.close()


@pytest.mark.slow
def test_the_server_maps_only_segments_it_can_trust(sgd_server, clients, tmp_path):
    server = sgd_server()
    c = clients(server.endpoint)
    _, tensors = c.hello()
    numel = sum(t.array.size for t in tensors)
    wrong_size = Segment.create(numel + 1)
    elsewhere = Segment.create(numel, folder=tmp_path)
    try:
        for seg, why in ((wrong_size, "this server has"), (elsewhere, "is not a segment in")):
            c.hello(rank=0, shm=seg)
            assert c.segment is None and why in c.shm_refused, c.shm_refused
        for path in ("/dev/shm/../../etc/passwd", "/etc/passwd", "/dev/shm/asgd-nope.shm"):
            head, _ = c.request("hello", shm=path)
            assert head["shm"]["ok"] is False
        # a shared-memory push without a segment is refused; the server keeps serving
        with pytest.raises(ServerError) as e:
            c.push_pull_flat(0, None, np.empty(numel, np.float32), slot=0)
        assert e.value.code == "bad_request"
        assert c.stats()["version"] == 0
    finally:
        wrong_size.close()
        elsewhere.close()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fp16", "bf16", "int8", "topk"])
def test_encoded_pushes_apply_what_the_encoding_carries(sgd_server, clients, name):
    server = sgd_server()
    c = clients(server.endpoint)
    _, tensors = c.hello(rank=0)
    numel = sum(t.array.size for t in tensors)
    v0, w0 = flat_weights(c, numel)
    g = torch.from_numpy(np.random.default_rng(1).normal(size=numel).astype(np.float32))
    meta, arrays = enc.encode(name, g, topk_ratio=0.05)
    expected = np.empty(numel, np.float32)
    enc.decode(meta, arrays, expected)
    sent = c.bytes_sent
    out = np.empty(numel, np.float32)
    c.push_pull_flat(v0, None, out, encoded=(meta, arrays))
    assert np.allclose(out, w0 - expected, atol=1e-6)
    payload = c.bytes_sent - sent
    assert payload < numel * 4 * (0.6 if name != "topk" else 0.15), payload


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["fp16", "bf16"])
def test_weights_come_back_in_half_precision_on_request(sgd_server, clients, weights):
    server = sgd_server()
    c = clients(server.endpoint)
    _, tensors = c.hello(rank=0)
    numel = sum(t.array.size for t in tensors)
    exact = np.concatenate([t.array.reshape(-1) for t in tensors])
    got = np.empty(numel, np.float32)
    received = c.bytes_received
    c.pull_flat(got, weights=weights)
    assert c.bytes_received - received < numel * 2 + 400
    assert np.allclose(got, exact, rtol=1e-2, atol=1e-3)


def _flat_request(op, version, specs, parts, **fields):
    h = protocol.request_header(op, 7, "bad", version=version, flat=True, **fields)
    h["tensors"] = specs
    return [protocol.pack_header(h)] + parts


@pytest.mark.slow
def test_malformed_flat_pushes_are_refused_and_change_nothing(sgd_server, clients, raw_peer):
    server = sgd_server()
    c = clients(server.endpoint)
    _, tensors = c.hello(rank=0)
    numel = sum(t.array.size for t in tensors)
    v0, w0 = flat_weights(c, numel)
    g = np.ones(numel, np.float32)
    nan = g.copy()
    nan[3] = np.inf
    short = g[:-1]
    half = g.astype(np.float16)
    spec = lambda dt, n, name="grad": [{"name": name, "dtype": dt, "shape": [n]}]  # noqa: E731
    cases = {
        "non-finite": (spec("float32", numel), [nan.tobytes()], {}, "bad_tensor"),
        "too few values": (spec("float32", numel - 1), [short.tobytes()], {}, "bad_tensor"),
        "dtype of another encoding": (spec("float16", numel), [half.tobytes()], {},
                                      "bad_tensor"),
        "a stray chunk name": (spec("float32", numel, "extra"), [g.tobytes()], {},
                               "bad_tensor"),
        "unknown encoding": (spec("float32", numel), [g.tobytes()], {"encoding": "zip"},
                             "bad_request"),
        "int8 without its scales": (spec("int8", numel), [np.zeros(numel, np.int8).tobytes()],
                                    {"encoding": "int8", "enc": {"block": 256}},
                                    "bad_tensor"),
        "topk index out of range": (
            [{"name": "grad.0", "dtype": "int32", "shape": [1]},
             {"name": "grad.1", "dtype": "float32", "shape": [1]}],
            [np.array([numel + 5], np.int32).tobytes(), np.ones(1, np.float32).tobytes()],
            {"encoding": "topk", "enc": {"k": 1}}, "bad_tensor"),
    }
    peer = raw_peer(server.endpoint)
    for what, (specs, parts, fields, code) in cases.items():
        head, _ = peer.exchange(_flat_request("push_pull", v0, specs, parts, **fields))
        assert (head["ok"], head.get("error")) == (False, code), (what, head)
    # an encoding needs the flat form
    h = protocol.request_header("push", 8, "bad", version=v0, encoding="fp16")
    head, _ = peer.exchange([protocol.pack_header(h)])
    assert head.get("error") == "bad_request", head
    # so do weights in half precision
    h = protocol.request_header("pull", 9, "bad", weights="bf16")
    head, _ = peer.exchange([protocol.pack_header(h)])
    assert head.get("error") == "bad_request" and "flat" in head["message"], head
    v, w = flat_weights(c, numel)
    assert v == v0 and np.array_equal(w, w0)


@pytest.mark.slow
def test_large_replies_are_never_torn(sgd_server, clients):
    """Replies of 1 MiB and more go without a copy from the snapshot pool: each one must hold
    the weights of one version, even while pushes keep changing them."""
    server = sgd_server(model={"name": "cnn1d", "args": {"channels": 256}})
    a, b = clients(server.endpoint, "a"), clients(server.endpoint, "b")
    _, tensors = a.hello(rank=0)
    b.hello(rank=1)
    numel = sum(t.array.size for t in tensors)
    assert numel * 4 >= 1 << 20
    # with lr 1, pushing (w - c) makes every weight c: a reply mixing versions is not uniform
    version, w = flat_weights(a, numel)
    out = np.empty(numel, np.float32)
    for k in range(1, 25):
        rid = b.send_push_pull_flat(version, (w - float(k)).astype(np.float32))
        pulled = np.empty(numel, np.float32)
        a.pull_flat(pulled)            # version k - 1 or k, but one of them throughout
        reply = b.finish(rid, out)
        assert np.allclose(out, float(k), atol=1e-4), (k, out[:3], out[-3:])
        if k > 1:                      # version 0 holds the initial weights
            assert np.allclose(pulled, pulled[0], atol=1e-4), k
        version, w = reply["version"], out.copy()


def test_is_local():
    assert is_local("ipc:///tmp/x.sock") and is_local("tcp://127.0.0.1:5555")
    assert is_local("tcp://localhost:1") and is_local("tcp://[::1]:5")
    assert not is_local("tcp://10.0.0.2:5555") and not is_local("tcp://server:5555")


@pytest.mark.slow
def test_a_vector_of_several_chunks_arrives_whole(sgd_server, clients):
    """More than 4 MiB of float32 travels as several frames both ways; the server checks and
    applies the chunks in order, and the client puts the weights' chunks back together."""
    from asgd.core.flat import CHUNK_BYTES, chunk_ranges

    assert chunk_ranges(10, 4, chunk_bytes=16) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_ranges(0, 4) == [(0, 0)]
    server = sgd_server(model={"name": "cnn1d", "args": {"channels": 600}})
    c = clients(server.endpoint)
    _, tensors = c.hello(rank=0)
    numel = sum(t.array.size for t in tensors)
    assert numel * 4 > 2 * CHUNK_BYTES                  # three frames each way
    v0, w0 = flat_weights(c, numel)
    g = np.random.default_rng(2).normal(size=numel).astype(np.float32)
    received = c.bytes_received
    out = np.empty(numel, np.float32)
    reply = c.push_pull_flat(v0, g, out)
    assert reply["version"] == v0 + 1
    assert np.allclose(out, w0 - g, atol=1e-6)
    assert c.bytes_received - received >= numel * 4
    g[-1] = np.nan                                      # a bad value in the last chunk
    with pytest.raises(ServerError) as e:
        c.push_pull_flat(v0 + 1, g, out)
    assert e.value.code == "bad_tensor"
    assert flat_weights(c, numel)[0] == v0 + 1
    assert np.array_equal(flat_weights(c, numel)[1], out)   # nothing of the bad push applied
    g[-1] = 0.5
    g[:numel // 2] = 3e38                               # finite, but their sum overflows
    reply = c.push_pull_flat(v0 + 1, g, out)
    assert reply["version"] == v0 + 2


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, 65_535, 65_536, 199_999])
def test_the_finiteness_check_finds_every_bad_value(bad, where):
    """The fast path (a sum) and the exact one (block by block) agree: one bad value
    anywhere is found; finite values whose sum overflows are not refused."""
    from asgd.core.flat import FiniteCheck

    check = FiniteCheck()
    a = np.random.default_rng(0).normal(size=200_000).astype(np.float32)
    assert check(a) and check.exact(a)
    a[where] = bad
    assert not check(a) and not check.exact(a)
    big = np.full(200_000, 3e38, np.float32)            # the sum is inf, every value finite
    assert check(big)
    big[where] = bad
    assert not check(big)
    half = np.full(1000, 60_000, np.float16)            # float16: the exact path
    assert check(half)
    half[3] = bad
    assert not check(half)
