"""A client of one parameter-server shard, named after the protocol's ops: the library that the
worker, the launcher's monitor, benchmarks and users' own tools all speak the protocol with.

    from asgd.client import Client
    client = Client("tcp://127.0.0.1:5555", worker="w0", timeout_s=10)
    info = client.hello(rank=0)                       # version, tensors, shard, config
    version, weights = client.pull()                  # weights: list of protocol.Tensor
    reply = client.push(version, [("fc.weight", g), ...])
    reply, weights = client.push_pull(version, grads)
    client.stats()

Same host: ``share_memory(numel)`` makes the client offer a shared-memory segment at every
hello (``asgd.client.samehost``: the one owner of the segment, the local socket and why a
server refused them); the flat form then moves only headers. ``hello`` takes extra header
fields and tensor frames as they are, for additions to the protocol.

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
import time

import numpy as np
import zmq

from asgd.client.common import Push, ServerError, ServerTimeout, check_reply, model_frames
from asgd.client.samehost import LinkFace, LocalGone, SameHost
from asgd.core import auth, protocol
from asgd.core.flat import bf16_to_f32, chunk_ranges


ZERO_COPY_BYTES = 1 << 20   # requests at least this large go without a copy

log = logging.getLogger("asgd.client")


_CURVE_HINT = (" (CURVE: a server that refuses this key, or whose public key is not "
               "worker.auth.server_key, never answers)")


class Client(LinkFace):
    """``curve``: CURVE keys (``asgd.core.auth.ClientKeys``) for a server with
    ``server.auth.mode: curve``; by default the process's (``auth.use_client_keys``, which
    ``asgd worker`` sets from worker.auth.secret_key_file and worker.auth.server_key), else none."""

    def __init__(self, endpoint: str, worker: str, timeout_s: float = 10.0,
                 context: zmq.Context | None = None, curve: auth.ClientKeys | None = None,
                 spin_us: float = 0.0, local: bool = True, link: SameHost | None = None):
        self.endpoint, self.worker, self.timeout_s = endpoint, worker, timeout_s
        # the same-host link (segment, local socket): this client's own, or its sharded
        # client's, shared by every shard (``local``: use a server's local socket)
        self._own_link = link is None
        self.link = SameHost(local) if link is None else link
        self._local_ids: set = set()
        self.curve = curve or auth.default_client_keys()
        # wait for a reply by polling for up to this long before sleeping in the kernel: a
        # reply that comes within it is taken without a wake-up (worker.spin_us)
        self.spin_s = spin_us * 1e-6
        self.ctx = context or zmq.Context.instance()
        self._ids = itertools.count(1)
        self.sock = None
        self.bytes_sent = self.bytes_received = 0
        self.span = None              # a shard's [start, stop) of the model's flat values
        self.shard_count, self.shard_index = 1, 0     # the server's, said at hello
        self.version = 0              # of the weights last loaded (hello, pull, push_pull)
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

    def reconnect(self, endpoint: str | None = None):
        """A new socket (a new routing identity, the same keys); replies owed to the old
        one are lost. The local socket is closed: the next hello offers a new one.
        ``endpoint``: the server moved there (a restart on a new port): the next request
        must be a hello."""
        self._close_local()
        self.sock.close(0)
        if endpoint is not None and endpoint != self.endpoint:
            self.endpoint = endpoint
            self.span, self.shard_count = None, 1
        self._connect()

    def close(self):
        self._close_local()
        if self._own_link:
            self.link.close()
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None

    # ------------------------------------------------------------------------------------------
    # the same host: shared memory, the local socket

    @property
    def local(self):
        """The server's local socket this client's shared-memory requests take, or None."""
        return self.link.local(self.endpoint)

    def _close_local(self) -> None:
        self.link.close_local(self.endpoint)
        self._local_ids.clear()

    def _send_local(self, local, rid: int, op: str, header: bytes) -> int:
        try:
            local.send(header, op, self.timeout_s)
        except LocalGone:                # the server is gone (ServerTimeout: say hello again)
            self._close_local()
            raise
        self.bytes_sent += len(header)
        self._sent_ops[rid] = op
        self._local_ids.add(rid)
        return rid

    def _wait_local(self, local, rid: int, op: str, timeout_s: float | None = None) -> dict:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            head, nbytes = local.wait(rid, op, timeout_s, self.spin_s, self.endpoint)
            self.bytes_received += nbytes
            return head
        except LocalGone:
            self._close_local()
            raise
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
                if not check_reply(head, rid):   # a late reply to an earlier request
                    ms = int((deadline - time.monotonic()) * 1000) + 1
                    if ms <= 1:
                        raise zmq.Again()
                    continue
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
            seg = self.link.segment()
            if seg is None or seg.weights is None:
                raise ServerError("bad_request", "the server answered through a shared-memory "
                                  "segment this client no longer has; say hello again")
            w = seg.weights
            src = w if self.span is None else w[self.span[0]:self.span[1]]
            # ``out`` may be the segment's own area (``ctypes.data`` costs microseconds: last)
            if out is not src and (not np.may_share_memory(out, src)
                                   or src.ctypes.data != out.ctypes.data):
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
        shm = self.link.active
        fields = {"shm": True} if shm else {"flat": True, "weights": weights}
        if shm:
            self._shm_ids.add(rid)
        header = protocol.request_header("pull", rid, self.worker, **fields)
        local = self.link.local(self.endpoint)
        if local is not None:
            return self._send_local(local, rid, "pull", protocol.pack_header(header))
        return self._send(rid, "pull", [protocol.pack_header(header)])

    def send_push(self, push: Push) -> int:
        """Send ``push`` without waiting (again, if its reply was late); the request id for
        ``finish``."""
        return self.send_push_pull_flat(
            push.version, push.grad, slot=push.slot, weights=push.weights, op=push.op,
            encoded=None if push.encoded is None else push.encoded[0], seq=push.seq)

    def parts(self, numel: int) -> list[tuple[int, int]]:
        """The ranges of a flat vector of ``numel`` values that go to each server, in order:
        here the whole. RuntimeError when the server said it is one shard of several."""
        if self.shard_count > 1:
            raise RuntimeError(f"the server at {self.endpoint} is shard {self.shard_index} "
                               f"of {self.shard_count}: give every shard's endpoint "
                               "(--server A,B,...)")
        return [(0, numel)]

    def base(self) -> int:
        """What a push says it was computed on: the version of the weights last loaded."""
        return self.version

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
            local = self.link.local(self.endpoint)
            if local is not None:
                return self._send_local(local, rid, op, protocol.pack_header(header))
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
        small = rid in self._shm_ids and self.link.active
        self._shm_ids.discard(rid)
        if rid in self._local_ids:
            local = self.link.local(self.endpoint)
            if local is None:            # closed since: the reply is lost with it
                self._local_ids.discard(rid)
                raise ServerTimeout(f"the server's local socket closed before the reply "
                                    f"to {op}")
            head, tensors = self._wait_local(local, rid, op, timeout_s), []
        else:
            head, tensors = self._wait(rid, op, timeout_s, copy=small)
        if op in ("pull", "push_pull"):
            if out is not None:
                self._weights_into(head, tensors, out)
            self.version = head.get("version", self.version)
        return head

    def push_pull_flat(self, version: int, grad: np.ndarray | None, out: np.ndarray,
                       **kw) -> dict:
        """Push a flat gradient and take the weights after it into ``out``: the reply header
        (version, staleness, applied)."""
        return self.finish(self.send_push_pull_flat(version, grad, **kw), out)

    def push_flat(self, version: int, grad: np.ndarray | None, **kw) -> dict:
        return self.finish(self.send_push_pull_flat(version, grad, op="push", **kw))

    def hello(self, rank: int | None = None, timeout_s: float | None = None, shm=None,
              tensors=(), **fields) -> tuple[dict, list[protocol.Tensor]]:
        """The server's version, parameter list (``tensors``), shard and settings, with the
        current weights. Offers the shared-memory segment (``share_memory``, or ``shm``: a
        caller's own Segment); ``transport`` then says whether the server mapped it (same
        host) and ``shm_refused`` why not. ``tensors``: the model (name -> tensor, or pairs:
        the parameters that train, in model order; sent as float32 frames) and ``settings``
        (docs/protocol.md, hello): a server without a model adopts them, one with a model
        checks them (ServerError naming the first difference); ``fields``: further header
        fields, as they are (protocol additions)."""
        tensors = model_frames(tensors)
        if rank is not None:
            fields["rank"] = rank
        if self._own_link:
            self.link.begin()
        seg = self.link.offer(shm)
        if seg is not None:
            fields["shm"] = str(seg.path)
        self._close_local()
        head, frames = self.request("hello", tensors, timeout_s=timeout_s, **fields)
        shard = head.get("shard") or {}
        self.shard_count, self.shard_index = shard.get("count", 1), shard.get("index")
        self.span = (shard["start"], shard["stop"]) \
            if self.shard_count > 1 and "start" in shard else None
        self.version = head.get("version", 0)
        self.link.answered(self.endpoint, self.worker,
                           None if seg is None else head.get("shm") or {}, self.timeout_s)
        if self._own_link:
            self.link.settle()
        return head, frames

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


def _as_tensor(a):
    import torch

    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
