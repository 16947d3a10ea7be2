"""A client of one parameter-server shard, named after the protocol's ops: the library that the
worker, the launcher's monitor, benchmarks and users' own tools all speak the protocol with.

    from asgd.client import Client
    client = Client("tcp://127.0.0.1:5555", worker="w0", timeout_s=10)
    info = client.hello(rank=0)                       # version, tensors, shard, config
    version, weights = client.pull()                  # weights: list of protocol.Tensor
    reply = client.push(version, [("fc.weight", g), ...])
    reply, weights = client.push_pull(version, grads)
    client.stats()

One DEALER socket, no empty delimiter frame. Every receive is bounded by a poll timeout: a
server that does not answer raises ``ServerTimeout``; an error reply raises ``ServerError``
with the protocol's code. ``reconnect()`` replaces the socket (replies to the old one are lost,
and a reply whose id is not the request's is discarded).
"""
from __future__ import annotations

import itertools
import time

import numpy as np
import zmq

from asgd.core import protocol
from asgd.core.flat import bf16_to_f32, chunk_ranges


class ServerError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(f"server answered {code}: {message}")
        self.code, self.message = code, message


class ServerTimeout(Exception):
    pass


class Client:
    def __init__(self, endpoint: str, worker: str, timeout_s: float = 10.0,
                 context: zmq.Context | None = None):
        self.endpoint, self.worker, self.timeout_s = endpoint, worker, timeout_s
        self.ctx = context or zmq.Context.instance()
        self._ids = itertools.count(1)
        self.sock = None
        self.bytes_sent = self.bytes_received = 0
        self.segment = None           # the shared-memory segment the server accepted
        self.shm_refused = ""         # why the server did not take one
        self._sent_ops = {}           # request id -> op, for replies taken later (finish)
        self._shm_ids = set()         # ... of those, the ones answered by a header alone
        self._connect()

    def _connect(self):
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self._rcvtimeo = -1
        self.sock.connect(self.endpoint)

    def reconnect(self):
        self.sock.close(0)
        self._connect()

    def close(self):
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None

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
        self.bytes_sent += sum(memoryview(f).nbytes for f in frames)
        self.sock.send_multipart(frames, copy=False)
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

    # ------------------------------------------------------------------------------------------
    # the flat form


    def _weights_into(self, head: dict, tensors, out: np.ndarray) -> None:
        """The reply's weights (flat chunks, or the shared-memory segment) into ``out``."""
        if head.get("shm"):
            np.copyto(out, self.segment.weights)
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
        fields = {"shm": True} if self.segment is not None else {"flat": True,
                                                                  "weights": weights}
        head, tensors = self.request("pull", timeout_s=timeout_s, **fields)
        self._weights_into(head, tensors, out)
        return head["version"]

    def send_push_pull_flat(self, version: int, grad: np.ndarray | None = None, *,
                            slot: int | None = None, encoding: str = "none",
                            weights: str = "none", encoded=None, op: str = "push_pull") -> int:
        """Send a gradient computed on ``version`` without waiting; the request id for
        ``finish``. The gradient is ``grad`` (flat float32, sent without copying: leave it
        alone until the reply came), or already in the shared-memory segment's ``slot``, or
        ``encoded``: (meta, arrays) from ``asgd.core.encoding``."""
        rid = next(self._ids)
        if slot is not None:
            header = protocol.request_header(op, rid, self.worker, version=version, shm=slot)
            self._shm_ids.add(rid)
            return self._send(rid, op, [protocol.pack_header(header)])
        fields = {"version": version, "flat": True}
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
              shm=None) -> tuple[dict, list[protocol.Tensor]]:
        """The server's version, parameter list (``tensors``), shard and settings, with the
        current weights. ``shm``: a Segment (asgd.core.shm) to offer; ``self.segment`` is
        it if the server mapped it (same host), else None and ``shm_refused`` says why."""
        fields = {} if rank is None else {"rank": rank}
        if shm is not None:
            fields["shm"] = str(shm.path)
        head, tensors = self.request("hello", timeout_s=timeout_s, **fields)
        if shm is not None:
            answer = head.get("shm") or {}
            self.segment = shm if answer.get("ok") else None
            self.shm_refused = "" if answer.get("ok") else str(answer.get("reason",
                                                                           "not supported"))
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


def _as_tensor(a):
    import torch

    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
