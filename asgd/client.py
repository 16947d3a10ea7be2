"""A client of one parameter-server shard, named after the protocol's ops: the library that the
worker, the launcher's monitor, benchmarks and users' own tools all speak the protocol with.

    from asgd.client import Client
    client = Client("tcp://127.0.0.1:5555", worker="w0", timeout_s=10)
    info = client.hello(rank=0)                       # version, tensors, shard, config
    version, weights = client.pull()                  # weights: list of protocol.Tensor
    reply = client.push(version, [("fc.weight", g), ...])
    reply, weights = client.push_pull(version, grads)
    client.stats()

A sharded server (``server.shards`` > 1) is several such servers, each holding a contiguous
range of the flat parameters: ``ShardedClient`` talks to all of them at once with the same
flat-form calls (``connect_client`` picks the right class for one endpoint or several).

    client = connect_client("tcp://a:5555,tcp://b:5555", worker="w0")

One DEALER socket per server, no empty delimiter frame. Every receive is bounded by a poll timeout: a
server that does not answer raises ``ServerTimeout``; an error reply raises ``ServerError``
with the protocol's code. ``reconnect()`` replaces the socket (replies to the old one are lost,
and a reply whose id is not the request's is discarded).
"""
from __future__ import annotations

import itertools
import logging
import select
import socket
import time

import msgpack
import numpy as np
import zmq

from asgd.core import auth, protocol
from asgd.core.flat import bf16_to_f32, chunk_ranges


ZERO_COPY_BYTES = 1 << 20   # requests at least this large go without a copy
LOCAL_DATAGRAM = 1 << 16    # the largest reply taken on the local socket (a header)

log = logging.getLogger("asgd.client")


class ServerError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(f"server answered {code}: {message}")
        self.code, self.message = code, message


class ServerTimeout(Exception):
    pass


_CURVE_HINT = (" (CURVE: a server that refuses this key, or whose public key is not "
               "worker.server_key, never answers)")


class Client:
    """``curve``: CURVE keys (``asgd.core.auth.ClientKeys``) for a server with
    ``server.auth: curve``; by default the process's (``auth.use_client_keys``, which
    ``asgd worker`` sets from worker.secret_key_file and worker.server_key), else none."""

    def __init__(self, endpoint: str, worker: str, timeout_s: float = 10.0,
                 context: zmq.Context | None = None, curve: auth.ClientKeys | None = None,
                 spin_us: float = 0.0, local: bool = True):
        self.endpoint, self.worker, self.timeout_s = endpoint, worker, timeout_s
        # the server's local socket, for shared-memory requests (server/local.py): used
        # when the server offers one at hello and ``local``
        self.use_local = local
        self.local: socket.socket | None = None
        self._local_ids: set = set()
        self.curve = curve or auth.default_client_keys()
        # wait for a reply by polling for up to this long before sleeping in the kernel: a
        # reply that comes within it is taken without a wake-up (worker.spin_us)
        self.spin_s = spin_us * 1e-6
        self.ctx = context or zmq.Context.instance()
        self._ids = itertools.count(1)
        self.sock = None
        self.bytes_sent = self.bytes_received = 0
        self.segment = None           # the shared-memory segment the server accepted
        self.span = None              # a shard's [start, stop) of the model's flat values
        self.shm_refused = ""         # why the server did not take one
        self._sent_ops = {}           # request id -> op, for replies taken later (finish)
        self._shm_ids = set()         # ... of those, the ones answered by a header alone
        self._connect()

    def _connect(self):
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self._rcvtimeo = -1
        self.sock.sndtimeo = int(self.timeout_s * 1000) + 1
        auth.set_heartbeats(self.sock)       # a dead server's connection is dropped
        if self.curve is not None:
            self.curve.apply(self.sock)
        self.sock.connect(self.endpoint)

    def reconnect(self):
        """A new socket (a new routing identity, the same keys); replies owed to the old
        one are lost. The local socket is closed: the next hello offers a new one."""
        self._close_local()
        self.sock.close(0)
        self._connect()

    def close(self):
        self._close_local()
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None

    # ------------------------------------------------------------------------------------------
    # the local socket (same host: shared-memory requests without ZeroMQ)

    def _open_local(self, offer: dict) -> None:
        """Connect to the server's local socket and prove to be this worker with the token
        of its hello. Where that fails (another network namespace, an old server) the
        requests go over ZeroMQ as before."""
        self._close_local()
        name, token = offer.get("socket"), offer.get("token")
        if not (self.use_local and isinstance(name, str) and isinstance(token, str)):
            return
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.settimeout(min(self.timeout_s, 5.0))
            s.connect("\0" + name)
            s.send(msgpack.packb({"worker": self.worker, "token": token}))
            answer = msgpack.unpackb(s.recv(LOCAL_DATAGRAM), raw=False)
            if not (isinstance(answer, dict) and answer.get("ok")):
                raise OSError(f"refused: {answer}")
            s.setblocking(False)
        except (OSError, ValueError, msgpack.UnpackException) as e:
            s.close()
            log.info("the server's local socket cannot be used (%s): ZeroMQ carries "
                     "everything", e)
            return
        self.local = s

    def _close_local(self) -> None:
        if self.local is not None:
            self.local.close()
            self.local = None
        self._local_ids.clear()

    def _send_local(self, rid: int, op: str, header: bytes) -> int:
        try:
            try:
                self.local.send(header)
            except BlockingIOError:      # the server is not reading: wait, bounded
                if not select.select([], [self.local], [], self.timeout_s)[1]:
                    raise ServerTimeout(f"could not send {op} to the local socket within "
                                        f"{self.timeout_s:g} s") from None
                self.local.send(header)
        except OSError as e:             # the server is gone (ServerTimeout: say hello again)
            self._close_local()
            raise ServerTimeout(f"the server's local socket: {e}") from None
        self.bytes_sent += len(header)
        self._sent_ops[rid] = op
        self._local_ids.add(rid)
        return rid

    def _wait_local(self, rid: int, op: str, timeout_s: float | None = None) -> dict:
        """The reply to ``rid`` on the local socket: polled for ``spin_s``, then waited for
        in ``select`` up to the timeout."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        sock = self.local
        spin_end = time.perf_counter() + self.spin_s
        try:
            while True:
                try:
                    data = sock.recv(LOCAL_DATAGRAM)
                except BlockingIOError:
                    if time.perf_counter() < spin_end:
                        continue
                    left = deadline - time.monotonic()
                    if left <= 0 or not select.select([sock], [], [], left)[0]:
                        raise ServerTimeout(f"no reply to {op} from {self.endpoint} within "
                                            f"{timeout_s:g} s (local socket)") from None
                    continue
                except OSError as e:
                    data, why = b"", e
                else:
                    why = "closed"
                if not data:            # the server closed it: it stopped or restarted
                    self._close_local()
                    raise ServerTimeout(f"the server's local socket: {why}")
                self.bytes_received += len(data)
                head, _ = protocol.decode([data])
                if head.get("id") is None and not head.get("ok"):
                    raise ServerError(head.get("error", "internal"), head.get("message", ""))
                if head.get("id") != rid:      # a late reply to an earlier request
                    continue
                if not head.get("ok"):
                    raise ServerError(head.get("error", "internal"), head.get("message", ""))
                return head
        finally:
            self._sent_ops.pop(rid, None)
            self._local_ids.discard(rid)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------------------------------

    def request(self, op: str, tensors=(), timeout_s: float | None = None,
                **fields) -> tuple[dict, list[protocol.Tensor]]:
        """Send one request and wait (bounded: ``timeout_s``, else the client's) for its
        reply."""
        rid = next(self._ids)
        frames = protocol.encode(protocol.request_header(op, rid, self.worker, **fields),
                                 tensors)
        self._send(rid, op, frames)
        return self._wait(rid, op, timeout_s)

    def _send(self, rid: int, op: str, frames: list) -> int:
        """Send a request's frames; its id."""
        nbytes = sum(memoryview(f).nbytes for f in frames)
        try:   # bounded (sndtimeo): a socket whose handshake failed has nowhere to send
            # below ZERO_COPY_BYTES a copy is cheaper than handing ZeroMQ our memory (which
            # costs a message to pyzmq's collector thread when ZeroMQ lets go of it)
            self.sock.send_multipart(frames, copy=nbytes < ZERO_COPY_BYTES)
        except zmq.Again:
            raise ServerTimeout(f"could not send {op} to {self.endpoint} within "
                                f"{self.timeout_s:g} s" + _CURVE_HINT * (self.curve is not None)
                                ) from None
        self.bytes_sent += nbytes
        self._sent_ops[rid] = op
        return rid

    def _wait(self, rid: int, op: str, timeout_s: float | None = None, copy: bool = False):
        """The reply to request ``rid``, waiting at most ``timeout_s``. Blocking receives
        with ZeroMQ's own receive timeout (a poll per reply costs more than the rest of a
        small exchange); ``copy``: the reply is small (a header), receive it as bytes."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        sock = self.sock
        ms = int(timeout_s * 1000) + 1       # the same for every call: set once, not per reply
        try:
            while True:
                if ms != self._rcvtimeo:
                    sock.rcvtimeo = self._rcvtimeo = ms
                reply = self._spin(copy) if self.spin_s else None
                if reply is None:
                    reply = sock.recv_multipart(copy=copy)
                self.bytes_received += sum(len(f) for f in reply) if copy else \
                    sum(f.buffer.nbytes for f in reply)
                head, out = protocol.decode(reply)
                if head.get("id") is None and not head.get("ok"):
                    # an error the server could not tie to an id: ours is the only one waiting
                    raise ServerError(head.get("error", "internal"), head.get("message", ""))
                if head.get("id") != rid:   # a late reply to an earlier request
                    ms = int((deadline - time.monotonic()) * 1000) + 1
                    if ms <= 1:
                        raise zmq.Again()
                    continue
                if not head.get("ok"):
                    raise ServerError(head.get("error", "internal"), head.get("message", ""))
                return head, out
        except zmq.Again:
            raise ServerTimeout(f"no reply to {op} from {self.endpoint} within "
                                f"{timeout_s:g} s") from None
        finally:
            self._sent_ops.pop(rid, None)

    def _spin(self, copy: bool):
        """A reply that arrives within ``spin_s``, taken by polling; None if none did. Sleeping
        in a blocking receive costs a wake-up (tens to hundreds of microseconds on a busy
        machine), more than a small exchange takes."""
        sock, end = self.sock, time.perf_counter() + self.spin_s
        while True:
            try:
                return sock.recv_multipart(zmq.NOBLOCK, copy=copy)
            except zmq.Again:
                if time.perf_counter() >= end:
                    return None

    # ------------------------------------------------------------------------------------------
    # the flat form


    def _weights_into(self, head: dict, tensors, out: np.ndarray) -> None:
        """The reply's weights (flat chunks, or the shared-memory segment) into ``out``."""
        if head.get("shm"):
            if self.segment is None or self.segment.weights is None:
                raise ServerError("bad_request", "the server answered through a shared-memory "
                                  "segment this client no longer has; say hello again")
            w = self.segment.weights
            src = w if self.span is None else w[self.span[0]:self.span[1]]
            if src.ctypes.data != out.ctypes.data:   # ``out`` may be the segment's own area
                np.copyto(out, src)
            return
        if not head.get("flat"):
            raise ServerError("bad_request", "the server did not answer in the flat form")
        pos = 0
        for t in tensors:
            n = t.array.size
            if pos + n > out.size:
                break
            if t.dtype == "bfloat16":
                bf16_to_f32(t.array.reshape(-1), out[pos:pos + n])
            else:
                np.copyto(out[pos:pos + n], t.array.reshape(-1), casting="unsafe")
            pos += n
        if pos != out.size:
            raise ServerError("bad_tensor", f"the reply holds {sum(t.array.size for t in tensors)}"
                              f" weights, expected {out.size}")

    def pull_flat(self, out: np.ndarray, weights: str = "none",
                  timeout_s: float | None = None) -> int:
        """The current weights into ``out`` (float32, every parameter in layout order); the
        version."""
        return self.finish(self.send_pull_flat(weights), out, timeout_s)["version"]

    def send_pull_flat(self, weights: str = "none") -> int:
        """Ask for the weights in the flat form (or in the segment) without waiting; the
        request id for ``finish``."""
        rid = next(self._ids)
        fields = {"shm": True} if self.segment is not None else {"flat": True,
                                                                  "weights": weights}
        if self.segment is not None:
            self._shm_ids.add(rid)
        header = protocol.request_header("pull", rid, self.worker, **fields)
        if self.local is not None and self.segment is not None:
            return self._send_local(rid, "pull", protocol.pack_header(header))
        return self._send(rid, "pull", [protocol.pack_header(header)])

    def send_push_pull_flat(self, version: int, grad: np.ndarray | None = None, *,
                            slot: int | None = None, encoding: str = "none",
                            weights: str = "none", encoded=None, op: str = "push_pull",
                            seq: int | None = None) -> int:
        """Send a gradient computed on ``version`` without waiting; the request id for
        ``finish``. The gradient is ``grad`` (flat float32, sent without copying: leave it
        alone until the reply came), or already in the shared-memory segment's ``slot``, or
        ``encoded``: (meta, arrays) from ``asgd.core.encoding``. ``seq``: this push's sequence
        number; sending it again with the same one is safe (the server applies it once)."""
        rid = next(self._ids)
        extra = {} if seq is None else {"seq": seq}
        if slot is not None:
            header = protocol.request_header(op, rid, self.worker, version=version, shm=slot,
                                             **extra)
            self._shm_ids.add(rid)
            if self.local is not None:
                return self._send_local(rid, op, protocol.pack_header(header))
            return self._send(rid, op, [protocol.pack_header(header)])
        fields = {"version": version, "flat": True, **extra}
        if op == "push_pull":
            fields["weights"] = weights
        if encoded is not None:
            meta, arrays = encoded
            fields["encoding"] = meta["encoding"]
            fields["enc"] = {k: v for k, v in meta.items() if k not in ("encoding", "numel")}
        elif encoding != "none":
            from asgd.core import encoding as enc

            meta, arrays = enc.encode(encoding, _as_tensor(grad))
            fields["encoding"] = encoding
            fields["enc"] = {k: v for k, v in meta.items() if k not in ("encoding", "numel")}
        else:
            arrays = [grad]
        single = len(arrays) == 1
        specs, parts = [], []
        for i, a in enumerate(arrays):
            a = protocol.as_wire_array(a).reshape(-1)
            dtype = protocol.wire_dtype(a) if a.dtype != np.uint16 else "bfloat16"
            name = "grad" if single else f"grad.{i}"
            for lo, hi in chunk_ranges(a.size, a.itemsize):
                specs.append({"name": name, "dtype": dtype, "shape": [hi - lo]})
                parts.append(memoryview(a[lo:hi]).cast("B") if hi > lo else b"")
        header = protocol.request_header(op, rid, self.worker, **fields)
        header["tensors"] = specs
        return self._send(rid, op, [protocol.pack_header(header)] + parts)

    def finish(self, rid: int, out: np.ndarray | None = None,
               timeout_s: float | None = None) -> dict:
        """Wait for the reply to request ``rid``; the weights it carries go into ``out``."""
        op = self._sent_ops.get(rid, "push_pull")
        small = self.segment is not None and rid in self._shm_ids
        self._shm_ids.discard(rid)
        if rid in self._local_ids:
            if self.local is None:       # closed since: the reply is lost with it
                self._local_ids.discard(rid)
                raise ServerTimeout(f"the server's local socket closed before the reply "
                                    f"to {op}")
            head, tensors = self._wait_local(rid, op, timeout_s), []
        else:
            head, tensors = self._wait(rid, op, timeout_s, copy=small)
        if op in ("pull", "push_pull") and out is not None:
            self._weights_into(head, tensors, out)
        return head

    def push_pull_flat(self, version: int, grad: np.ndarray | None, out: np.ndarray,
                       **kw) -> dict:
        """Push a flat gradient and take the weights after it into ``out``: the reply header
        (version, staleness, applied)."""
        return self.finish(self.send_push_pull_flat(version, grad, **kw), out)

    def push_flat(self, version: int, grad: np.ndarray | None, **kw) -> dict:
        return self.finish(self.send_push_pull_flat(version, grad, op="push", **kw))

    def hello(self, rank: int | None = None, timeout_s: float | None = None,
              shm=None, tensors=None, settings: dict | None = None
              ) -> tuple[dict, list[protocol.Tensor]]:
        """The server's version, parameter list (``tensors``), shard and settings, with the
        current weights. ``shm``: a Segment (asgd.core.shm) to offer; ``self.segment`` is
        it if the server mapped it (same host), else None and ``shm_refused`` says why.
        ``tensors`` (name -> tensor, the parameters that train, in model order; sent as
        float32 frames) and ``settings`` (docs/protocol.md, hello): a server without a model
        adopts them, one with a model checks them (ServerError naming the first difference)."""
        fields = {} if rank is None else {"rank": rank}
        if shm is not None:
            fields["shm"] = str(shm.path)
        if settings is not None:
            fields["settings"] = settings
        model = [(n, _float32(t)) for n, t in
                 (tensors.items() if hasattr(tensors, "items") else tensors or ())]
        head, tensors = self.request("hello", model, timeout_s=timeout_s, **fields)
        shard = head.get("shard") or {}
        self.span = (shard["start"], shard["stop"]) \
            if shard.get("count", 1) > 1 and "start" in shard else None
        if shm is not None:
            answer = head.get("shm") or {}
            self.segment = shm if answer.get("ok") else None
            self.shm_refused = "" if answer.get("ok") else str(answer.get("reason",
                                                                           "not supported"))
            if self.segment is not None:
                self._open_local(answer)
            else:
                self._close_local()
        else:
            self._close_local()
        return head, tensors

    def pull(self) -> tuple[int, list[protocol.Tensor]]:
        head, tensors = self.request("pull")
        return head["version"], tensors

    def push(self, version: int, grads, encoding: str | None = None) -> dict:
        fields = {"version": version}
        if encoding:
            fields["encoding"] = encoding
        head, _ = self.request("push", grads, **fields)
        return head

    def push_pull(self, version: int, grads, encoding: str | None = None):
        fields = {"version": version}
        if encoding:
            fields["encoding"] = encoding
        head, tensors = self.request("push_pull", grads, **fields)
        return head, tensors

    def bye(self) -> dict:
        """Tell the server this worker is leaving (it stops counting for ssp and sync)."""
        head, _ = self.request("bye")
        return head

    def stats(self) -> dict:
        head, _ = self.request("stats")
        return head


def _float32(t):
    """A parameter as hello sends it: float32, on the host."""
    if hasattr(t, "detach"):
        import torch

        return t.detach().to(device="cpu", dtype=torch.float32)
    return np.asarray(t, dtype=np.float32)


def _as_tensor(a):
    import torch

    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))


# ----------------------------------------------------------------------------------------------
# several shards

def connect_client(endpoints, worker: str, timeout_s: float = 10.0, context=None,
                   curve: auth.ClientKeys | None = None, spin_us: float = 0.0,
                   local: bool = True):
    """A ``Client`` for one endpoint, a ``ShardedClient`` for several (a list, or one string
    of comma-separated endpoints). ``local``: use a server's local socket when it offers
    one (shared-memory requests without ZeroMQ)."""
    if isinstance(endpoints, str):
        endpoints = [e.strip() for e in endpoints.split(",") if e.strip()]
    if len(endpoints) == 1:
        return Client(endpoints[0], worker, timeout_s, context, curve, spin_us, local)
    return ShardedClient(endpoints, worker, timeout_s, context, curve, spin_us, local)


class ShardedClient:
    """The shards of one sharded server, spoken to as one: each flat-form request goes to
    every shard at once (its range of the gradient, the weights of its range back into the
    same range of ``out``), and the replies are awaited together.

    The shards are ordered by their index once ``hello`` (or ``stats``) has told it; each
    keeps its own version: ``versions`` holds the one of each shard whose weights were last
    loaded, and a push carries each shard its own (``send_push_pull_flat`` takes the list).
    A merged reply's ``version`` is the lowest, ``staleness`` the highest, ``applied`` true
    when every shard applied it. Per-parameter requests are not offered: a shard of several
    refuses them."""

    def __init__(self, endpoints: list[str], worker: str, timeout_s: float = 10.0,
                 context: zmq.Context | None = None, curve: auth.ClientKeys | None = None,
                 spin_us: float = 0.0, local: bool = True):
        if len(set(endpoints)) != len(endpoints):
            raise ValueError(f"the same endpoint twice among {endpoints}")
        # every shard has the same allow-list and key pair: one set of client keys for all
        self.clients = [Client(e, worker, timeout_s, context, curve, spin_us, local)
                        for e in endpoints]
        self.endpoint = ",".join(endpoints)
        self.worker = worker
        self.ranges: list[tuple[int, int]] | None = None
        self.numel = None
        self.versions: list[int] | None = None
        self.shm_refused = ""
        self._segment = None
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[str, list[int]]] = {}

    # --- plumbing shared with Client -----------------------------------------------------------

    @property
    def timeout_s(self) -> float:
        return self.clients[0].timeout_s

    @timeout_s.setter
    def timeout_s(self, value: float) -> None:
        for c in self.clients:
            c.timeout_s = value

    @property
    def segment(self):
        return self._segment

    @segment.setter
    def segment(self, seg) -> None:
        self._segment = seg
        for c in self.clients:
            c.segment = seg

    @property
    def bytes_sent(self) -> int:
        return sum(c.bytes_sent for c in self.clients)

    @property
    def bytes_received(self) -> int:
        return sum(c.bytes_received for c in self.clients)

    def reconnect(self):
        for c in self.clients:
            c.reconnect()

    def close(self):
        for c in self.clients:
            c.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- which shard is which --------------------------------------------------------------------

    def _order(self, heads: list[dict]) -> list[dict]:
        """Check the shards' own account of themselves (``shard``: index, count, start,
        stop) and put the clients in index order; ``heads`` reordered the same way."""
        count = len(self.clients)
        shards = [h.get("shard") or {} for h in heads]
        where = {c.endpoint: s for c, s in zip(self.clients, shards)}
        if any(s.get("count") != count for s in shards):
            raise ServerError("bad_request", f"{count} endpoints given, but the servers say "
                              f"they are shards of {[s.get('count') for s in shards]}: give "
                              "every shard's endpoint once")
        if sorted(s.get("index") for s in shards) != list(range(count)):
            raise ServerError("bad_request", "the servers' shard indexes are "
                              f"{[s.get('index') for s in shards]}: each of 0-{count - 1} "
                              "must be there once")
        order = sorted(range(count), key=lambda i: shards[i]["index"])
        self.clients = [self.clients[i] for i in order]
        heads = [heads[i] for i in order]
        ranges = [(where[c.endpoint]["start"], where[c.endpoint]["stop"]) for c in self.clients]
        pos = 0
        for i, (lo, hi) in enumerate(ranges):
            if lo != pos or hi <= lo:
                raise ServerError("bad_request", f"shard {i} holds values {lo}-{hi}; expected "
                                  f"it to start at {pos}: the shards do not fit together")
            pos = hi
        self.ranges, self.numel = ranges, pos
        return heads

    def _learn(self) -> None:
        if self.ranges is None:
            self.stats()

    # --- requests to every shard -----------------------------------------------------------------

    def _gather(self, op: str, rids: list[int], out: np.ndarray | None,
                timeout_s: float | None) -> list[dict]:
        """Every shard's reply (its weights into its range of ``out``), under one deadline;
        the first error is raised once every reply has been taken or timed out."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        heads, error = [], None
        for c, rid, (lo, hi) in zip(self.clients, rids, self.ranges):
            try:
                heads.append(c.finish(rid, None if out is None else out[lo:hi],
                                      max(0.001, deadline - time.monotonic())))
            except (ServerError, ServerTimeout) as e:
                heads.append(None)
                error = error or e
        if error is not None:
            raise error
        return heads

    def _merge(self, token: int, heads: list[dict]) -> dict:
        self.versions = [h["version"] for h in heads]
        head = dict(heads[0], id=token, version=min(self.versions), versions=self.versions)
        if any("staleness" in h for h in heads):
            head["staleness"] = max(h.get("staleness", 0) for h in heads)
            head["staleness_per_shard"] = [h.get("staleness", 0) for h in heads]
        if any("applied" in h for h in heads):
            head["applied"] = all(h.get("applied", False) for h in heads)
        return head

    def hello(self, rank: int | None = None, timeout_s: float | None = None,
              shm=None, tensors=None, settings: dict | None = None
              ) -> tuple[dict, list[protocol.Tensor]]:
        """Hello to every shard (offering each the same segment: each reads and writes only
        its own range of it; ``tensors`` and ``settings`` as ``Client.hello``: every shard
        gets the whole model and keeps its range). The merged answer has ``tensors``: the
        model's parameter list, ``flat``: true, ``shards``: each shard's ``shard`` map; the
        weights come back as flat chunks in order (every shard's range, concatenated)."""
        if tensors is not None and not hasattr(tensors, "items"):
            tensors = list(tensors)          # sent to every shard
        answers = [c.hello(rank, timeout_s, shm, tensors, settings) for c in self.clients]
        by_endpoint = {c.endpoint: w for c, (_, w) in zip(self.clients, answers)}
        heads = self._order([h for h, _ in answers])
        weights = [t for c in self.clients for t in by_endpoint[c.endpoint]]
        params = [h.get("params") for h in heads]
        if any(p != params[0] for p in params):
            raise ServerError("bad_request", "the shards serve different models")
        if shm is not None:
            refused = [c.shm_refused for c in self.clients if c.segment is None]
            self.segment = shm if not refused else None
            self.shm_refused = refused[0] if refused else ""
        info = self._merge(0, heads)
        info.update(tensors=params[0] or [], flat=True,
                    shards=[h.get("shard") for h in heads])
        return info, weights

    def send_push_pull_flat(self, version, grad: np.ndarray | None = None, *,
                            slot: int | None = None, encoding: str = "none",
                            weights: str = "none", encoded=None, op: str = "push_pull",
                            seq: int | None = None) -> int:
        """As ``Client.send_push_pull_flat``, to every shard: ``version`` is the list of the
        shards' versions the gradient was computed on (or one int for all); ``grad`` the whole
        flat gradient (each shard gets its range) or ``slot`` in the shared segment;
        ``encoded``: one (meta, arrays) per shard, each of its range."""
        self._learn()
        versions = version if isinstance(version, (list, tuple)) else [version] * len(self.ranges)
        rids = []
        for i, (c, (lo, hi)) in enumerate(zip(self.clients, self.ranges)):
            if slot is not None:
                rids.append(c.send_push_pull_flat(versions[i], slot=slot, op=op, seq=seq))
            elif encoded is not None:
                rids.append(c.send_push_pull_flat(versions[i], encoded=encoded[i],
                                                  weights=weights, op=op, seq=seq))
            else:
                rids.append(c.send_push_pull_flat(versions[i], grad[lo:hi], encoding=encoding,
                                                  weights=weights, op=op, seq=seq))
        token = next(self._ids)
        self._pending[token] = (op, rids)
        return token

    def finish(self, token: int, out: np.ndarray | None = None,
               timeout_s: float | None = None) -> dict:
        op, rids = self._pending.pop(token)
        return self._merge(token, self._gather(op, rids, out, timeout_s))

    def push_pull_flat(self, version, grad: np.ndarray | None, out: np.ndarray, **kw) -> dict:
        return self.finish(self.send_push_pull_flat(version, grad, **kw), out)

    def push_flat(self, version, grad: np.ndarray | None, **kw) -> dict:
        return self.finish(self.send_push_pull_flat(version, grad, op="push", **kw))

    def pull_flat(self, out: np.ndarray, weights: str = "none",
                  timeout_s: float | None = None) -> int:
        """Every shard's weights into its range of ``out``; the lowest version."""
        self._learn()
        rids = [c.send_pull_flat(weights) for c in self.clients]
        return self._merge(0, self._gather("pull", rids, out, timeout_s))["version"]

    def bye(self) -> dict:
        heads, error = [], None
        for c in self.clients:
            try:
                heads.append(c.bye())
            except (ServerError, ServerTimeout) as e:
                error = error or e
        if error is not None:
            raise error
        return {"ok": True, "version": min(h["version"] for h in heads)}

    def stats(self) -> dict:
        """Every shard's stats, merged: the lowest version and update count, sums of bytes,
        requests and errors, the highest staleness; ``shards``: each shard's own."""
        heads = [c.stats() for c in self.clients]
        if self.ranges is None:
            heads = self._order(heads)
        out = dict(heads[0])
        for k in ("version", "updates_applied"):
            out[k] = min(h.get(k, 0) for h in heads)
        for k in ("updates_dropped", "staleness_max"):
            out[k] = max(h.get(k, 0) for h in heads)
        for k in ("bytes_in", "bytes_out", "shm_bytes_in", "shm_bytes_out", "dc_fallbacks"):
            out[k] = sum(h.get(k, 0) for h in heads)
        for k in ("requests", "errors"):
            total: dict = {}
            for h in heads:
                for name, n in (h.get(k) or {}).items():
                    total[name] = total.get(name, 0) + n
            out[k] = total
        out["staleness_mean"] = sum(h.get("staleness_mean", 0.0) for h in heads) / len(heads)
        out["peak_rss_mb"] = round(sum(h.get("peak_rss_mb") or 0 for h in heads), 1)
        out["shards"] = heads
        return out
