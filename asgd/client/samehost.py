"""The same-host link of one client: the shared-memory segment it offers the server, whether
the server took it (and why not), and the server's local socket. One ``SameHost`` serves a
client and, for a sharded server, every shard's client: the shards map the one segment (each
reads and writes only its range) and each has its own local socket.

    link = SameHost()
    seg = link.share(numel, "auto", endpoint)     # a segment when the server is on this host
    link.begin()                                  # before a hello: a fresh segment if needed
    offered = link.offer()                        # what the hello names (or a caller's own)
    link.answered(endpoint, worker, reply["shm"], timeout_s)   # each server's answer
    link.settle()                                 # taken by every one? (its name removed)
    link.memory()                                 # where gradients go: the segment, or None
    link.close()

The segment is created here and closed here; a buffer that views it (the exchange's) keeps
its memory mapped until it lets go (``Segment.close`` leaves a viewed mapping to the GC).
The local socket (``server.local``, server/local.py) is a unix datagram socket the hello's
reply names, with a token that makes the connection this worker's: a shared-memory request's
header goes there instead of through ZeroMQ's I/O threads. A server that cannot be reached
that way is spoken to over ZeroMQ as before.
"""
from __future__ import annotations

import logging
import select
import socket
import time

import msgpack

from asgd.client.common import ServerTimeout, check_reply
from asgd.core import protocol
from asgd.core.endpoint import is_local
from asgd.core.shm import Segment

LOCAL_DATAGRAM = 1 << 16    # the largest reply taken on the local socket (a header)

log = logging.getLogger("asgd.client")


class LocalGone(ServerTimeout):
    """The local socket failed or closed (the server stopped or restarted: say hello
    again)."""


class LocalSocket:
    """One connection to a server's local socket, proven to be ``worker``'s by its token."""

    def __init__(self, name: str, token: str, worker: str, timeout_s: float):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.settimeout(min(timeout_s, 5.0))
            s.connect("\0" + name)
            s.send(msgpack.packb({"worker": worker, "token": token}))
            answer = msgpack.unpackb(s.recv(LOCAL_DATAGRAM), raw=False)
            if not (isinstance(answer, dict) and answer.get("ok")):
                raise OSError(f"refused: {answer}")
            s.setblocking(False)
        except BaseException:
            s.close()
            raise
        self.sock = s

    def send(self, header: bytes, op: str, timeout_s: float) -> None:
        """Send one request's header, waiting at most ``timeout_s`` for the server to read."""
        try:
            try:
                self.sock.send(header)
            except BlockingIOError:      # the server is not reading: wait, bounded
                if not select.select([], [self.sock], [], timeout_s)[1]:
                    raise ServerTimeout(f"could not send {op} to the local socket within "
                                        f"{timeout_s:g} s") from None
                self.sock.send(header)
        except OSError as e:
            raise LocalGone(f"the server's local socket: {e}") from None

    def wait(self, rid: int, op: str, timeout_s: float, spin_s: float,
             endpoint: str) -> tuple[dict, int]:
        """The reply to request ``rid`` and the bytes taken: polled for ``spin_s``, then
        waited for in ``select`` up to ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        sock, nbytes = self.sock, 0
        spin_end = time.perf_counter() + spin_s
        while True:
            try:
                data = sock.recv(LOCAL_DATAGRAM)
            except BlockingIOError:
                if time.perf_counter() < spin_end:
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([sock], [], [], left)[0]:
                    raise ServerTimeout(f"no reply to {op} from {endpoint} within "
                                        f"{timeout_s:g} s (local socket)") from None
                continue
            except OSError as e:
                raise LocalGone(f"the server's local socket: {e}") from None
            if not data:                 # the server closed it: it stopped or restarted
                raise LocalGone("the server's local socket: closed")
            nbytes += len(data)
            head, _ = protocol.decode([data])
            if check_reply(head, rid):
                return head, nbytes

    def close(self) -> None:
        self.sock.close()


class SameHost:
    """``local``: use a server's local socket when it offers one."""

    def __init__(self, local: bool = True):
        self.use_local = local
        self.mode, self.numel, self._want = "off", 0, False
        self._segment: Segment | None = None
        self._owned = False               # created here (else a caller's own, not closed here)
        self._answers: dict[str, str] = {}    # endpoint -> "" (taken) or why not
        self._active = False
        self.refused = ""                 # why the last hello's segment was not taken
        self._sockets: dict[str, LocalSocket] = {}

    # --- the segment -----------------------------------------------------------------------------

    def share(self, numel: int, mode: str = "auto", endpoint: str = "") -> Segment | None:
        """Offer a segment of ``numel`` values (two gradient slots) at every hello from now on,
        when ``mode`` is "on", or "auto" and ``endpoint`` (every shard's) is on this host.
        Created now, so that buffers can live there before the first hello: returns it, or
        None (not wanted, or "auto" and it could not be created)."""
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"shared memory {mode!r}: expected auto, on or off")
        self.mode, self.numel = mode, numel
        self._want = mode == "on" or (mode == "auto" and is_local(endpoint))
        if self._want:
            self._replace()
        else:
            self._drop()
        return self._segment

    def _replace(self) -> None:
        try:
            seg = Segment.create(self.numel, slots=2)
        except OSError as e:
            if self.mode == "on":
                raise
            log.info("no shared-memory segment (%s): sending frames", e)
            seg = None
        self._drop()
        self._segment, self._owned = seg, seg is not None

    def _drop(self) -> None:
        """Let the segment go (closed if it was made here) and the local sockets with it."""
        for endpoint in list(self._sockets):
            self.close_local(endpoint)
        if self._owned and self._segment is not None:
            self._segment.close()
        self._segment, self._owned, self._active = None, False, False

    def begin(self) -> None:
        """Before a hello (to every shard): a segment whose name is gone (taken by a server
        that has since restarted: a new one must map it by name) is replaced."""
        self._answers.clear()
        self._active = False
        seg = self._segment
        if self._want and (seg is None or (self._owned and seg.unlinked)):
            self._replace()           # refused before, or taken before: offer a fresh one

    def offer(self, segment: Segment | None = None) -> Segment | None:
        """The segment a hello names: ``segment`` (a caller's own: offered by the hello that
        names it only), else this link's."""
        if segment is not None and segment is not self._segment:
            self._drop()
            self._segment, self._owned = segment, False
        elif segment is None and not self._owned and self._segment is not None:
            self._drop()              # a caller's, named by an earlier hello: not this one
        return self._segment

    def answered(self, endpoint: str, worker: str, answer: dict | None,
                 timeout_s: float) -> None:
        """One server's answer to the segment its hello offered (None: none offered); a
        server that took it may offer its local socket."""
        self.close_local(endpoint)
        if self._segment is None or answer is None:
            return
        if not answer.get("ok"):
            self._answers[endpoint] = str(answer.get("reason", "not supported"))
            return
        self._answers[endpoint] = ""
        name, token = answer.get("socket"), answer.get("token")
        if self.use_local and isinstance(name, str) and isinstance(token, str):
            try:
                self._sockets[endpoint] = LocalSocket(name, token, worker, timeout_s)
            except (OSError, ValueError, msgpack.UnpackException) as e:
                log.info("the server's local socket cannot be used (%s): ZeroMQ carries "
                         "everything", e)

    def settle(self) -> None:
        """After every server has answered: the segment is in use if each took it (its name
        is then removed, so that nothing is left in /dev/shm whatever becomes of this
        process). RuntimeError when shared memory is "on" and a server refused it."""
        if self._segment is None:
            self._active, self.refused = False, ""
            return
        reasons = [r for r in self._answers.values() if r]
        self._active = bool(self._answers) and not reasons
        self.refused = reasons[0] if reasons else ("" if self._answers else "not offered")
        if self._active:
            if self._owned:
                self._segment.unlink()
            return
        for endpoint in list(self._sockets):
            self.close_local(endpoint)      # (taken by some shards only)
        if self.mode == "on":
            raise RuntimeError("the server did not take the shared-memory segment "
                               f"(worker.exchange.shared_memory: on): {self.refused}")
        if self._owned:
            log.info("the server cannot share memory with this worker (%s): sending frames",
                     self.refused)
            self._drop()

    @property
    def active(self) -> bool:
        return self._active

    def segment(self) -> Segment | None:
        """The segment the servers took (None: frames)."""
        return self._segment if self._active else None

    def memory(self) -> Segment | None:
        """Where gradients go and weights come back: the segment while it is offered or
        taken, None once it was refused (frames)."""
        return self._segment

    # --- the local sockets -----------------------------------------------------------------------

    def local(self, endpoint: str) -> LocalSocket | None:
        return self._sockets.get(endpoint) if self._active else None

    def close_local(self, endpoint: str) -> None:
        s = self._sockets.pop(endpoint, None)
        if s is not None:
            s.close()

    def close(self) -> None:
        self._drop()


class LinkFace:
    """What a client (one server's, or every shard's) offers of its same-host link: its
    ``link`` (a SameHost) and ``endpoint`` are the client's own."""

    link: SameHost
    endpoint: str

    def share_memory(self, numel: int, mode: str = "auto"):
        """Offer a shared-memory segment of ``numel`` values at every hello (``mode``: on,
        off, or auto: when the server is on this host; every shard maps the one segment);
        the segment, made now (or None)."""
        return self.link.share(numel, mode, self.endpoint)

    def memory(self):
        """Where a push's gradient goes and the weights come back: the segment while it is
        offered or taken, None for frames."""
        return self.link.memory()

    @property
    def segment(self):
        """The segment the server took, or None."""
        return self.link.segment()

    @property
    def shm_refused(self) -> str:
        """Why the server did not take the segment the last hello offered."""
        return self.link.refused

    @property
    def transport(self) -> str:
        return "shm" if self.link.active else "frames"
