"""Fuzzing the real server: 10,000 malformed requests of every kind we could think of, from a
seeded generator, over a raw socket. The server answers each with an error (or, for what
ZeroMQ itself refuses, drops it), never dies, and its weights, version and optimizer state are
bitwise what they were."""
from __future__ import annotations

import random

import msgpack
import numpy as np
import pytest
import zmq

from asgd.core import protocol

MESSAGES = 10_000
SEED = 1234


def header(rng: random.Random, **fields) -> dict:
    h = {"v": 1, "op": rng.choice(protocol.OPS), "id": rng.randrange(1 << 30),
         "worker": f"f{rng.randrange(1 << 20)}"}
    h.update(fields)
    return {k: v for k, v in h.items() if v is not DROP}


DROP = object()
BAD_VALUES = [None, True, False, -1, (1 << 64) - 1, -(1 << 63), 3.5, float("nan"), "x", "", [],
              [1, 2], {}, {"a": 1}, b"\x00" * 3]


def malformed(rng: random.Random, numel: int) -> list[bytes]:
    """One request that must be refused (every branch is invalid by construction)."""
    kind = rng.randrange(16)
    g = np.zeros(numel, np.float32)
    if kind == 0:                                     # not msgpack at all
        return [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))]
    if kind == 1:                                     # msgpack, but not a map
        return [msgpack.packb(rng.choice([[1, 2, 3], 7, "push", None, 2.5, [{"op": "pull"}]]))]
    if kind == 2:                                     # a required key missing or mistyped
        key = rng.choice(["v", "op", "id", "worker"])
        bad = rng.choice([DROP, *[v for v in BAD_VALUES if not isinstance(v, (bytes,))]])
        if key == "op" and isinstance(bad, str) and bad in protocol.OPS:
            bad = DROP
        if key == "v" and bad == 1:
            bad = 2
        if key == "worker" and isinstance(bad, str) and protocol.WORKER_ID.match(bad or "-"):
            bad = "bad name"
        if key == "id" and isinstance(bad, int) and not isinstance(bad, bool):
            key, bad = "v", 99                       # an int id is fine: break v instead
        return [msgpack.packb(header(rng, **{key: bad}), use_bin_type=True)]
    if kind == 3:                                     # a field of the wrong type or range
        op = rng.choice(["push", "push_pull"])
        field, value = rng.choice([("version", "1"), ("version", True), ("version", -1),
                                   ("version", 10 ** 6), ("flat", 1), ("encoding", "zip"),
                                   ("enc", [1]), ("weights", "fp8"), ("seq", -5),
                                   ("seq", True), ("seq", (1 << 64) - 1), ("shm", -1),
                                   ("shm", "0")])
        fields = {"version": 0, field: value}
        return protocol.encode(header(rng, op=op, flat=fields.pop("flat", True), **fields),
                               [("grad", g)])
    if kind == 4:                                     # hello with a bad rank or shm path
        value = rng.choice([{"rank": -3}, {"rank": "0"}, {"shm": ""}, {"shm": "x" * 5000},
                            {"shm": 5}, {"rank": True}])
        return [msgpack.packb(header(rng, op="hello", **value))]
    if kind == 5:                                     # tensors listed, frames missing or extra
        h = header(rng, op="push", version=0, flat=True)
        h["tensors"] = [{"name": "grad", "dtype": "float32", "shape": [numel]}]
        frames = [msgpack.packb(h)]
        return frames if rng.random() < 0.5 else frames + [g.tobytes(), b"extra"]
    if kind == 6:                                     # a frame of the wrong byte size
        h = header(rng, op="push", version=0, flat=True)
        h["tensors"] = [{"name": "grad", "dtype": "float32", "shape": [numel]}]
        return [msgpack.packb(h), g.tobytes()[:rng.randrange(0, 4 * numel)]]
    if kind == 7:                                     # a bad dtype or shape in the spec
        h = header(rng, op="push", version=0, flat=True)
        h["tensors"] = [rng.choice([
            {"name": "grad", "dtype": "float128", "shape": [numel]},
            {"name": "grad", "dtype": "float32", "shape": [-numel]},
            {"name": "grad", "dtype": "float32", "shape": ["n"]},
            {"name": "grad", "dtype": "float32", "shape": [1 << 40, 1 << 40]},
            {"name": 5, "dtype": "float32", "shape": [numel]},
            {"dtype": "float32", "shape": [numel]},
            "grad"])]
        return [msgpack.packb(h), g.tobytes()]
    if kind == 8:                                     # NaN or Inf in the gradient
        bad = g.copy()
        bad[rng.randrange(numel)] = rng.choice([np.nan, np.inf, -np.inf])
        op = rng.choice(["push", "push_pull"])
        return protocol.encode(header(rng, op=op, version=0, flat=True), [("grad", bad)])
    if kind == 9:                                     # the wrong number of values, flat
        n = rng.choice([0, 1, numel - 1, numel + 1, 2 * numel])
        return protocol.encode(header(rng, op="push", version=0, flat=True),
                               [("grad", np.zeros(n, np.float32))])
    if kind == 10:                                    # per parameter: wrong names, dtypes
        h = header(rng, op="push", version=0)
        return protocol.encode(h, [(rng.choice(["w", "", "grad"]),
                                    np.zeros(rng.randrange(1, 50), np.float32))])
    if kind == 11:                                    # encodings with garbage inside
        enc = rng.choice(["int8", "topk", "fp16", "bf16"])
        if enc == "int8":
            scales = np.full(-(-numel // 256), np.nan, np.float32)
            arrays = [("grad.0", scales), ("grad.1", np.zeros(numel, np.int8))]
            fields = {"enc": {"block": 256}}
        elif enc == "topk":
            idx = np.array([numel + 5, 3], np.int32)
            arrays = [("grad.0", idx), ("grad.1", np.ones(2, np.float32))]
            fields = {"enc": {"k": 2}}
        else:
            arrays = [("grad", np.zeros(numel, np.float32))]     # float32 where 16-bit is due
            fields = {}
        return protocol.encode(header(rng, op="push", version=0, flat=True, encoding=enc,
                                      **fields), arrays)
    if kind == 12:                                    # shared memory without a segment
        op = rng.choice(["push", "push_pull", "pull"])
        fields = {"version": 0, "shm": rng.randrange(0, 8)} if op != "pull" else {"shm": True}
        return [msgpack.packb(header(rng, op=op, **fields))]
    if kind == 13:                                    # tensors where an op takes none
        return protocol.encode(header(rng, op=rng.choice(["stats", "bye", "pull", "hello"])),
                               [("x", np.zeros(3, np.float32))])
    if kind == 14:                                    # ext and bin values, deep nesting
        value = rng.choice([msgpack.ExtType(5, b"abc"), b"\x00\x01",
                            {"a": {"b": {"c": {"d": [[[[[[1]]]]]]}}}}])
        h = header(rng, op="push", version=0)
        h["enc"] = value
        return [msgpack.packb(h, use_bin_type=True)]
    # a header over the limit
    h = header(rng, op="stats")
    h["pad"] = "x" * (protocol.MAX_HEADER_BYTES + 10)
    return [msgpack.packb(h)]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ten_thousand_malformed_requests_change_nothing(start_server, make_config, clients):
    server = start_server(make_config(optimizer={"name": "adam", "lr": 0.01}))
    observer = clients(server.endpoint, "observer")
    _, tensors = observer.hello()
    numel = sum(t.array.size for t in tensors)
    before = np.empty(numel, np.float32)
    version0 = observer.pull_flat(before)

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(server.endpoint)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    rng = random.Random(SEED)
    answered = errors_ok = 0
    try:
        for i in range(MESSAGES):
            sock.send_multipart(malformed(rng, numel))
            if not poller.poll(10_000):
                pytest.fail(f"message {i}: no answer within 10 s")
            reply = sock.recv_multipart()
            head = protocol.decode_header(reply[0])
            answered += 1
            assert head.get("ok") is False, (i, head)
            assert head["error"] in protocol.ERROR_CODES
            errors_ok += 1
    finally:
        sock.close(0)
    assert answered == errors_ok == MESSAGES
    after = np.empty(numel, np.float32)
    assert observer.pull_flat(after) == version0
    assert after.tobytes() == before.tobytes()
    stats = observer.stats()
    assert sum(stats["errors"].values()) >= MESSAGES
    assert stats["errors"].get("internal", 0) == 0, stats["errors"]
    assert stats["updates_applied"] == 0 and server.popen.poll() is None
