"""The local socket (server/local.py) against a real server process: a worker on the server's
host sends its shared-memory requests over a unix socket instead of ZeroMQ; a connection
speaks only for the worker whose hello gave it its token, only in requests answered by a
header alone; strangers, wrong workers, malformed and oversized datagrams are refused and
the server keeps serving; ``server.local: false`` keeps everything on ZeroMQ; a server that
dies is noticed at once, not after the reply timeout."""
from __future__ import annotations

import signal
import socket
import time

import msgpack
import numpy as np
import pytest

from asgd.client import ServerError, ServerTimeout
from asgd.core import protocol
from asgd.core.shm import Segment

SGD = {"optimizer": {"name": "sgd", "lr": 1.0},
       "schedule": {"kind": "constant", "warmup": 0}}


@pytest.fixture
def server(start_server, make_config, tmp_path):
    def start(**server_section):
        return start_server(make_config(**SGD, server=server_section),
                            bind=f"ipc://{tmp_path}/s.sock")
    return start


@pytest.fixture
def segment_client(clients):
    """(client, segment, numel): a client that said hello with a segment the server took."""
    made = []

    def make(endpoint: str, worker: str = "t0", timeout_s: float | None = None):
        c = clients(endpoint, worker) if timeout_s is None else \
            clients(endpoint, worker, timeout_s=timeout_s)
        _, tensors = c.hello()
        numel = sum(t.array.size for t in tensors)
        seg = Segment.create(numel)
        made.append(seg)
        c.hello(rank=0, shm=seg)
        assert c.segment is seg, c.shm_refused
        seg.unlink()
        return c, seg, numel

    yield make
    for seg in made:
        seg.close()


def connect(name: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(10)
    s.connect("\0" + name)
    return s


def ask(s: socket.socket, header: dict | bytes) -> dict:
    s.send(header if isinstance(header, bytes) else protocol.pack_header(header))
    return protocol.decode_header(s.recv(1 << 16))


def test_shared_memory_requests_skip_zeromq(server, segment_client):
    srv = server()
    c, seg, numel = segment_client(srv.endpoint)
    assert c.local is not None
    before = c.stats()["local"]
    out = np.empty(numel, np.float32)
    version = c.pull_flat(out)
    w0 = out.copy()
    g = np.linspace(-1, 1, numel, dtype=np.float32)
    seg.grad(0)[:] = g
    for i in range(5):
        reply = c.push_pull_flat(version, None, out, slot=0)
        assert (reply["version"], reply["applied"]) == (version + 1, True)
        version = reply["version"]
    assert np.allclose(out, w0 - 5 * g, atol=1e-5)
    after = c.stats()["local"]
    # the pull and the five pushes came over the local socket (stats itself over ZeroMQ)
    assert after["requests"] - before["requests"] == 6
    assert after["workers"] == 1
    # a non-finite gradient is refused over it as over ZeroMQ, and changes nothing
    seg.grad(1)[:] = g
    seg.grad(1)[7] = np.inf
    with pytest.raises(ServerError) as e:
        c.push_pull_flat(version, None, out, slot=1)
    assert e.value.code == "bad_tensor"
    assert c.pull_flat(out) == version


def test_the_local_socket_speaks_only_for_its_worker(server, segment_client):
    srv = server()
    c, _, numel = segment_client(srv.endpoint, "w0")
    seg = Segment.create(numel)
    try:
        head, _ = c.request("hello", shm=str(seg.path))   # a second hello: a new token
        seg.unlink()
        offer = head["shm"]
        name, token = offer["socket"], offer["token"]
        _speak_for(c, seg, name, token)
    finally:
        seg.close()


def _speak_for(c, seg, name: str, token: str) -> None:
    # strangers: a wrong token, no token, not msgpack at all
    for greeting in (msgpack.packb({"worker": "w0", "token": "0" * 32}),
                     msgpack.packb({"worker": "w0"}), b"\xc1 not msgpack"):
        s = connect(name)
        s.send(greeting)
        answer = msgpack.unpackb(s.recv(4096))
        assert answer["ok"] is False and answer["error"] == "unauthorized"
        assert s.recv(4096) == b""                  # and closed
        s.close()
    s = connect(name)
    s.send(msgpack.packb({"worker": "w0", "token": token}))
    assert msgpack.unpackb(s.recv(4096)) == {"ok": True}
    version = c.stats()["version"]
    # as another worker: unauthorized; without shared memory, or a hello: bad_request
    r = ask(s, protocol.request_header("push_pull", 1, "w1", version=version, shm=0))
    assert (r["ok"], r["error"]) == (False, "unauthorized")
    for op, fields in (("pull", {"flat": True}), ("hello", {}),
                       ("push_pull", {"version": version, "flat": True})):
        r = ask(s, protocol.request_header(op, 2, "w0", **fields))
        assert (r["ok"], r["error"]) == (False, "bad_request"), (op, r)
    r = ask(s, b"\x93garbage")
    assert r["ok"] is False
    seg.grad(0)[:] = 0.5
    r = ask(s, protocol.request_header("push_pull", 3, "w0", version=version, shm=0))
    assert r["ok"] and r["version"] == version + 1
    # a datagram over the limit closes the connection; the server goes on
    s.send(b"x" * 70_000)
    assert s.recv(4096) == b""
    s.close()
    stats = c.stats()
    assert stats["version"] == version + 1
    assert stats["local"]["refused"] >= 3


def test_server_local_false_keeps_everything_on_zeromq(server, segment_client):
    srv = server(local=False)
    c, seg, numel = segment_client(srv.endpoint)
    assert c.local is None
    out = np.empty(numel, np.float32)
    version = c.pull_flat(out)
    seg.grad(0)[:] = 1.0
    assert c.push_pull_flat(version, None, out, slot=0)["version"] == version + 1
    assert c.stats()["local"] is None


def test_a_server_that_dies_is_noticed_at_once(server, segment_client):
    srv = server()
    c, seg, numel = segment_client(srv.endpoint, timeout_s=120)
    out = np.empty(numel, np.float32)
    version = c.pull_flat(out)
    srv.stop(signal.SIGKILL)
    t = time.monotonic()
    with pytest.raises(ServerTimeout):
        c.push_pull_flat(version, None, out, slot=0)
    assert time.monotonic() - t < 60         # the socket closed: not the 120 s timeout
    assert c.local is None                   # the next requests go over ZeroMQ


def test_a_local_client_in_a_loop_does_not_starve_the_others(server, segment_client, clients):
    """The server polls for a client that comes straight back (server.spin.us, and
    spin_spare_us with a core to spare), but looks at every other source while it does: a
    ZeroMQ client is answered while a local one pushes in a loop. Both make progress at the
    same time: the local loop is running before the other's first pull and still running
    after its last, and the other's pulls go on until the loop has also moved on by as many
    round trips (a server that served only the spinning client would never answer the other:
    its pull would time out)."""
    import threading

    srv = server(spin_spare_us=20_000)
    c, seg, numel = segment_client(srv.endpoint, "looping")
    seg.grad(0)[:] = 1e-6
    stop = threading.Event()
    done = []
    failed = []

    def loop():
        try:
            version = c.stats()["version"]
            while not stop.is_set():
                version = c.push_pull_flat(version, None, seg.weights, slot=0)["version"]
                done.append(version)
        except Exception as e:  # reported below, not hidden
            failed.append(repr(e))

    def wait_for(n: int) -> None:
        deadline = time.monotonic() + 60
        while len(done) < n and not failed and time.monotonic() < deadline:
            time.sleep(0.01)

    rounds = 40
    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        wait_for(10)                                # the server spins for it by now
        other = clients(srv.endpoint, "other")
        other.hello()
        out = np.empty(numel, np.float32)
        first = len(done)
        pulls = 0
        deadline = time.monotonic() + 60
        while (pulls < rounds or len(done) < first + rounds) and not failed \
                and time.monotonic() < deadline:
            other.pull_flat(out)                    # ServerTimeout if starved
            pulls += 1
        last = len(done)
        wait_for(last + 1)                          # the loop still runs after the last pull
    finally:
        stop.set()
        t.join(timeout=30)
    assert not failed, failed
    assert first >= 10 and pulls >= rounds and last >= first + rounds, (first, pulls, last)
    assert len(done) > last, "the local loop stopped while the other was served"
    assert done == list(range(done[0], done[0] + len(done)))     # each push applied once
