"""The local socket: requests of workers on this host, without ZeroMQ.

A worker whose shared-memory segment the server mapped sends its shared-memory requests (a
push_pull or pull whose tensors are in the segment: a header alone each way) over a unix
SOCK_SEQPACKET socket instead of the ROUTER. The header is the same msgpack message, one
datagram each way. ZeroMQ hands every message through an I/O thread on each side, four thread
wake-ups a round trip; on the local socket the worker's thread writes straight to the
server's, which on a busy two-core machine saves about 100 us of a 150-250 us exchange
(docs/performance.md).

    local = LocalSockets()               # listens on an abstract unix name (no file)
    offer = local.offer("w0")            # {"socket": name, "token": ...}: in hello's "shm"
    # the worker connects and sends {"worker": "w0", "token": ...}; the server answers
    # {"ok": true}, and from then on every datagram is a request header from "w0"

The token, new at every hello and sent only in the hello's reply (over CURVE when the server
uses it), is what lets a connection speak for a worker: a process that was not given it
cannot. A request on a connection must name the connection's worker. Requests whose reply
carries frames (anything but the shared-memory forms) are refused there: they go over ZeroMQ.
A connection that closes is forgotten; at most MAX_CONNECTIONS are open at once.
"""
from __future__ import annotations

import itertools
import logging
import secrets
import socket

import msgpack

log = logging.getLogger("asgd.server")

MAX_CONNECTIONS = 1024     # open local connections at once (one per worker on this host)
MAX_DATAGRAM = 1 << 16     # the largest request taken: a shared-memory request is ~100 bytes
PREFIX = b"\x00L"          # local identities: this and a 4-byte counter; ZeroMQ's never begin
                           # with 0 (its own are 5 bytes, and a peer cannot choose one)


class LocalSockets:
    """The listening socket and its connections. ``identity(fd)`` names a connection the
    way a ROUTER identity names a peer; the server sends a reply to either kind by identity."""

    def __init__(self):
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.name = f"asgd-{secrets.token_hex(8)}"
        self.listener.bind("\0" + self.name)          # abstract: nothing on the file system
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.tokens: dict[str, str] = {}               # worker -> the token of its last hello
        self.conns: dict[bytes, socket.socket] = {}    # identity -> connection
        self.owner: dict[bytes, str] = {}              # identity -> worker, once it proved it
        self.refused = 0           # connections refused (no token, too many)
        self.requests = 0          # requests taken over local connections
        self.unregister = None     # called with a connection before it is closed (the poller)
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
        """A worker that said bye (or was evicted): its token goes, its connection closes."""
        self.tokens.pop(worker, None)
        for ident, w in list(self.owner.items()):
            if w == worker:
                self.close(ident)

    def accept(self) -> list[tuple[bytes, socket.socket]]:
        """Take the connections waiting; the new ones (identity, socket), to poll."""
        new = []
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
            new.append((ident, conn))
        return new

    def recv(self, ident: bytes) -> bytes | None:
        """One datagram from connection ``ident``: b"" when it closed (and it is closed
        here), None when nothing is waiting. A datagram over MAX_DATAGRAM closes it."""
        conn = self.conns.get(ident)
        if conn is None:
            return b""
        try:
            data, _, flags, _ = conn.recvmsg(MAX_DATAGRAM)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            data, flags = b"", 0
        if not data or flags & socket.MSG_TRUNC:
            if data:
                log.warning("local socket: a datagram over %d bytes; connection closed",
                            MAX_DATAGRAM)
            self.close(ident)
            return b""
        return data

    def greet(self, ident: bytes, data: bytes) -> bool:
        """A connection's first datagram: {"worker", "token"}. True if it proved the worker
        (and is answered {"ok": true}); else it is answered and closed."""
        try:
            msg = msgpack.unpackb(data, raw=False)
            worker, token = msg["worker"], msg["token"]
            ok = isinstance(worker, str) and isinstance(token, str) and \
                secrets.compare_digest(self.tokens.get(worker, ""), token) and token != ""
        except Exception:
            ok, worker = False, None
        if ok:
            self.owner[ident] = worker
            self.send(ident, msgpack.packb({"ok": True}))
            return True
        self.refused += 1
        self.send(ident, msgpack.packb({"ok": False, "error": "unauthorized",
                                        "message": "no hello gave this token"}))
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
            if self.unregister is not None:
                self.unregister(conn)
            conn.close()

    def close_all(self) -> None:
        for ident in list(self.conns):
            self.close(ident)
        self.listener.close()
