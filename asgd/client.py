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

import zmq

from asgd.core import protocol


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
        self._connect()

    def _connect(self):
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
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
        header = protocol.request_header(op, rid, self.worker, **fields)
        frames = protocol.encode(header, tensors)
        self.bytes_sent += sum(memoryview(f).nbytes for f in frames)
        self.sock.send_multipart(frames, copy=False)
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1, zmq.POLLIN):
                raise ServerTimeout(f"no reply to {op} from {self.endpoint} within "
                                    f"{timeout_s:g} s")
            reply = self.sock.recv_multipart(copy=False)
            self.bytes_received += sum(f.buffer.nbytes for f in reply)
            head, out = protocol.decode(reply)
            if head.get("id") is None and not head.get("ok"):
                # an error the server could not tie to an id: ours is the only request waiting
                raise ServerError(head.get("error", "internal"), head.get("message", ""))
            if head.get("id") != rid:
                continue  # a late reply to an earlier request
            if not head.get("ok"):
                raise ServerError(head.get("error", "internal"), head.get("message", ""))
            return head, out

    def hello(self, rank: int | None = None, timeout_s: float | None = None
              ) -> tuple[dict, list[protocol.Tensor]]:
        """The server's version, parameter list (``tensors``), shard and settings, with the
        current weights."""
        fields = {} if rank is None else {"rank": rank}
        return self.request("hello", timeout_s=timeout_s, **fields)

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
