"""This host's workers: their shared-memory segments and the local socket, behind one face.

A worker on the server's host says hello with the path of its shared-memory segment
(asgd.core.shm); the server maps it, and from then on that worker's pushes and pulls carry
only a header: the gradient and the weights are in the segment. Such a request may also skip
ZeroMQ: the worker is offered a unix SOCK_SEQPACKET socket and a token (the greeting and its
limit are asgd.core.protocol's, ``local_greeting``), and sends its shared-memory requests
there, one datagram each way. ZeroMQ hands every message through an I/O thread on each side,
four thread wake-ups a round trip; on the local socket the worker's thread writes straight to
the server's, which on a busy two-core machine saves about 100 us of a 150-250 us exchange
(docs/performance.md).

    local = LocalPeers(numel, socket=True)       # socket=False: shared memory over ZeroMQ
    answer = local.attach("w0", path)            # hello's "shm": {"ok", "socket", "token"}
    seg = local.segment("w0", request_id)        # ProtocolError if it has none
    local.bye("w0"); local.forget("w0")          # bye; evicted (its connection closes too)
    local.watch(poller)                          # the loop's poller: listener, connections
    for ident, worker, data in local.readable(fd): serve(ident, [data], local=worker)
    local.send(ident, header_bytes)              # a reply, by identity

The token, new at every hello and sent only in the hello's reply (over CURVE when the server
uses it), is what lets a connection speak for a worker: a process that was not given it
cannot. A request on a connection must name the connection's worker (``check``), and be one
answered by a header alone: the others go over ZeroMQ. A connection that closes is
forgotten; at most MAX_CONNECTIONS are open at once, and MAX_SEGMENTS segments mapped.
"""
from __future__ import annotations

import itertools
import logging
import secrets
import socket

import zmq

from asgd.core import protocol
from asgd.core.protocol import ProtocolError, Request
from asgd.core.shm import Segment, SegmentError

log = logging.getLogger("asgd.server")

MAX_SEGMENTS = 1024        # shared-memory segments mapped at once (one per worker)
MAX_CONNECTIONS = 1024     # open local connections at once (one per worker on this host)
MAX_BATCH = 256            # datagrams read from one connection per wake-up
PREFIX = b"\x00L"          # local identities: this and a 4-byte counter; ZeroMQ's never begin
                           # with 0 (its own are 5 bytes, and a peer cannot choose one)


class LocalPeers:
    """The segment table and, with ``socket``, the local socket and its connections.
    ``identity`` names a connection the way a ROUTER identity names a peer; the server sends
    a reply to either kind by identity."""

    def __init__(self, numel: int, socket: bool = True):
        self.numel = numel                 # the whole model's values: what a segment holds
        self.segments: dict[str, Segment] = {}
        self.sockets = None
        if socket:
            try:
                self.sockets = LocalSockets()
            except OSError as e:           # no unix sockets here: ZeroMQ carries everything
                log.info("no local socket (%s): every request goes over ZeroMQ", e)

    def __len__(self) -> int:
        """Workers whose segment is mapped: this host's workers."""
        return len(self.segments)

    def stats(self) -> dict | None:
        return self.sockets.stats() if self.sockets is not None else None

    # ------------------------------------------------------------------------------------------
    # the segment table (ServerCore's side)

    def attach(self, worker: str, path: str) -> dict:
        """Map ``worker``'s segment (replacing its last); whether it worked, and why not (a
        worker on another host cannot share memory with us, and then uses frames), with the
        local socket's offer when there is one."""
        old = self.segments.pop(worker, None)
        if old is not None:
            old.close()
        if len(self.segments) >= MAX_SEGMENTS:
            return {"ok": False, "reason": f"{MAX_SEGMENTS} segments are mapped already"}
        try:
            # the segment holds the whole model; a shard reads and writes its own range
            self.segments[worker] = Segment.open(path, self.numel)
        except (SegmentError, OSError, ValueError) as e:
            return {"ok": False, "reason": str(e)}
        offer = self.sockets.offer(worker) if self.sockets is not None else {}
        return {"ok": True, **offer}

    def segment(self, worker: str, request_id: int | None) -> Segment:
        """``worker``'s mapped segment; ProtocolError if it has none (or it was closed)."""
        seg = self.segments.get(worker)
        if seg is None or seg.weights is None:
            raise ProtocolError("bad_request", f"worker {worker!r} has no shared-memory "
                                "segment (say hello with 'shm' first)", request_id)
        return seg

    def bye(self, worker: str) -> None:
        """A worker said bye: its segment and token go (its connection closes from its side)."""
        if self.sockets is not None:
            self.sockets.tokens.pop(worker, None)
        self._unmap(worker)

    def forget(self, worker: str) -> None:
        """A worker evicted: its segment, its token and its connection go."""
        if self.sockets is not None:
            self.sockets.forget(worker)
        self._unmap(worker)

    def _unmap(self, worker: str) -> None:
        seg = self.segments.pop(worker, None)
        if seg is not None:
            seg.close()

    @staticmethod
    def check(req: Request, worker: str) -> None:
        """A request over a local socket: from the worker that connection proved to be, and
        one answered by a header alone (shared-memory pushes and pulls, stats, bye)."""
        if req.worker != worker:
            raise ProtocolError("unauthorized", f"this local connection is worker "
                                f"{worker[:64]!r}'s, not {req.worker[:64]!r}'s", req.id)
        shm = req.get("shm")        # a slot (0 is one), or true for a pull
        if req.op in ("push", "push_pull", "pull") and (shm is None or shm is False) or \
                req.op == "hello":
            raise ProtocolError("bad_request", f"{req.op} without shared memory goes over "
                                "ZeroMQ: the local socket carries only requests answered by "
                                "a header alone", req.id)

    # ------------------------------------------------------------------------------------------
    # the socket (the server loop's side)

    def watch(self, poller) -> None:
        """Poll the listener and, as they come, the connections with ``poller`` (a
        zmq.Poller: it reports sockets that are not ZeroMQ's by their descriptor)."""
        if self.sockets is not None:
            self.sockets.poller = poller
            poller.register(self.sockets.listener, zmq.POLLIN)

    def is_local(self, identity: bytes) -> bool:
        return identity.startswith(PREFIX) and self.sockets is not None

    def readable(self, fd: int):
        """What a readable descriptor of ours brought: (identity, worker, request header)
        for each request, read one at a time (greetings are answered here); nothing for a
        descriptor that is not ours."""
        sockets = self.sockets
        if sockets is None:
            return
        if fd == sockets.listener.fileno():
            sockets.accept()
            return
        ident = sockets.by_fd.get(fd)
        for _ in range(MAX_BATCH):
            data = sockets.recv(ident) if ident in sockets.conns else b""
            if not data:                   # nothing more waiting, or it closed
                return
            worker = self.request(ident, data)
            if worker is not None:
                yield ident, worker, data

    def request(self, ident: bytes, data: bytes) -> str | None:
        """The worker a datagram of connection ``ident`` is a request of; None for its
        greeting (answered here)."""
        worker = self.sockets.owner.get(ident)
        if worker is None:
            self.sockets.greet(ident, data)
            return None
        self.sockets.requests += 1
        return worker

    def recv(self, ident: bytes) -> bytes | None:
        return self.sockets.recv(ident)

    def send(self, ident: bytes, data: bytes) -> None:
        self.sockets.send(ident, data)

    def close_all(self) -> None:
        if self.sockets is not None:
            self.sockets.close_all()
        for worker in list(self.segments):
            self._unmap(worker)


class LocalSockets:
    """The listening socket and its connections; ``poller`` (set by ``LocalPeers.watch``)
    polls each connection from its accept to its close."""

    def __init__(self):
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.name = f"asgd-{secrets.token_hex(8)}"
        self.listener.bind("\0" + self.name)          # abstract: nothing on the file system
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.tokens: dict[str, str] = {}               # worker -> the token of its last hello
        self.conns: dict[bytes, socket.socket] = {}    # identity -> connection
        self.by_fd: dict[int, bytes] = {}              # descriptor -> identity
        self.owner: dict[bytes, str] = {}              # identity -> worker, once it proved it
        self.refused = 0           # connections refused (no token, too many)
        self.requests = 0          # requests taken over local connections
        self.poller = None
        self._ids = itertools.count(1)

    def stats(self) -> dict:
        return {"connections": len(self.conns), "workers": len(self.owner),
                "requests": self.requests, "refused": self.refused}

    def offer(self, worker: str) -> dict:
        """What a worker that said hello with a mapped segment is told: where to connect and
        the token to give. A new hello replaces the worker's token."""
        if len(self.tokens) >= MAX_CONNECTIONS and worker not in self.tokens:
            self.tokens.pop(next(iter(self.tokens)))
        token = self.tokens[worker] = secrets.token_hex(16)
        return {"socket": self.name, "token": token}

    def forget(self, worker: str) -> None:
        """A worker that was evicted: its token goes, its connection closes."""
        self.tokens.pop(worker, None)
        for ident, w in list(self.owner.items()):
            if w == worker:
                self.close(ident)

    def accept(self) -> None:
        """Take the connections waiting, and poll them."""
        for _ in range(64):
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                log.warning("local socket: accept failed: %s", e)
                break
            if len(self.conns) >= MAX_CONNECTIONS:
                conn.close()
                self.refused += 1
                continue
            conn.setblocking(False)
            ident = PREFIX + (next(self._ids) % 2**32).to_bytes(4, "little")
            self.conns[ident] = conn
            self.by_fd[conn.fileno()] = ident
            if self.poller is not None:
                self.poller.register(conn, zmq.POLLIN)

    def recv(self, ident: bytes) -> bytes | None:
        """One datagram from connection ``ident``: b"" when it closed (and it is closed
        here), None when nothing is waiting. A datagram over the protocol's limit closes it."""
        conn = self.conns.get(ident)
        if conn is None:
            return b""
        try:
            data, _, flags, _ = conn.recvmsg(protocol.MAX_LOCAL_DATAGRAM)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            data, flags = b"", 0
        if not data or flags & socket.MSG_TRUNC:
            if data:
                log.warning("local socket: a datagram over %d bytes; connection closed",
                            protocol.MAX_LOCAL_DATAGRAM)
            self.close(ident)
            return b""
        return data

    def greet(self, ident: bytes, data: bytes) -> bool:
        """A connection's first datagram, the greeting (asgd.core.protocol). True if it
        proved the worker (and is answered {"ok": true}); else it is answered and closed."""
        try:
            worker, token = protocol.check_local_greeting(data)
            ok = secrets.compare_digest(self.tokens.get(worker, ""), token)
        except ProtocolError:
            ok, worker = False, None
        if ok:
            self.owner[ident] = worker
            self.send(ident, protocol.pack_header({"ok": True}))
            return True
        self.refused += 1
        self.send(ident, protocol.pack_header(protocol.error_reply(
            None, "unauthorized", "no hello gave this token")))
        self.close(ident)
        return False

    def send(self, ident: bytes, data: bytes) -> None:
        conn = self.conns.get(ident)
        if conn is None:
            return
        try:
            conn.send(data)
        except (BlockingIOError, InterruptedError):
            # the worker does not read its replies: it is not the worker we know
            log.warning("local socket of %s: its replies are not read; closed",
                        self.owner.get(ident, "a stranger"))
            self.close(ident)
        except OSError:
            self.close(ident)

    def close(self, ident: bytes) -> None:
        conn = self.conns.pop(ident, None)
        self.owner.pop(ident, None)
        if conn is not None:
            self.by_fd.pop(conn.fileno(), None)
            if self.poller is not None:
                self.poller.unregister(conn)
            conn.close()

    def close_all(self) -> None:
        for ident in list(self.conns):
            self.close(ident)
        self.listener.close()
