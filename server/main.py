"""The parameter-server process: a ROUTER socket around ServerCore.

    asgd server --config configs/default.yaml [--bind tcp://127.0.0.1:5555] [--resume]
    python -m server --config configs/default.yaml       # the same command
    asgd server --config c.yaml --set server.shards=2 --shard 1 --bind tcp://0.0.0.0:5556

Binds to loopback unless told otherwise. Every receive is under a poll timeout, so signals and
periodic work (a ``server`` record in metrics.jsonl, periodic checkpoints) are never starved.
SIGINT/SIGTERM stop the loop; the server then writes its checkpoint (atomically) and exits 0.
``--resume`` starts from that checkpoint with its version, weights and optimizer state.
With ``server.shards`` S > 1 this process is shard ``--shard I``: it serves the I-th of S
balanced contiguous ranges of the flat parameters (``asgd.core.flat.shard_range``) with its own
version, and keeps its checkpoint in ``<checkpoint dir>/shard-I``.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import torch
import zmq

from asgd.config import Config
from asgd.core import auth, protocol
from asgd.core.checkpoint import CheckpointError
from asgd.core.endpoint import write_address
from asgd.metrics import MetricsWriter
from server.checkpoint import resume_store, save_store
from server.core import ServerCore
from server.local import LocalPeers
from server.reply import Reply
from server.router import open_socket, socket_limits  # noqa: F401 (socket_limits: its home)
from server.store import ParameterStore

log = logging.getLogger("asgd.server")

POLL_MS = 100
STATUS_EVERY_S = 5.0   # a status line in the log this often, when anything changed
MAX_BATCH = 256   # requests handled per wake-up before periodic work gets a turn
MAX_REPLIED = 1024  # clients whose last reply time is kept (server.spin.us)
SPIN_POLL_S = 50e-6   # while spinning for one client, every source is polled this often


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def build_store(cfg: Config, shard: int = 0) -> ParameterStore:
    """The store with the model's initial weights (same seed as every worker), or shard
    ``shard``'s range of them. A built-in data set is not loaded: the model needs only its
    shape. Without ``model.name`` the store is empty until the first worker's hello brings
    the model (server.adopt) or ``--resume`` the checkpoint's."""
    from asgd.core.flat import shard_range
    from asgd.core.layout import ParameterLayout
    from asgd.tasks.task import build_task

    if not cfg.model.name:
        return ParameterStore.empty(cfg, (shard, cfg.server.shards))
    model = build_task(cfg, data=False).model
    span = None
    if cfg.server.shards > 1:
        span = shard_range(ParameterLayout.from_model(model).numel, shard, cfg.server.shards)
    return ParameterStore.from_model(model, cfg, span=span)


def shard_checkpoint_dir(base: Path, shard: int, shards: int) -> Path:
    """Where shard ``shard`` of ``shards`` keeps its checkpoint (the base itself for one)."""
    return base if shards == 1 else base / f"shard-{shard}"


class Server:
    def __init__(self, cfg: Config, bind: str, run_dir: Path | None = None,
                 checkpoint_dir: Path | None = None, resume: bool = False, shard: int = 0):
        self.cfg = cfg
        self.run_dir = run_dir
        if not 0 <= shard < cfg.server.shards:
            raise ValueError(f"--shard {shard} is not in [0, server.shards="
                             f"{cfg.server.shards})")
        self.shard = shard
        base = Path(checkpoint_dir or cfg.server.checkpoint_dir or
                    (run_dir / "checkpoint" if run_dir else "checkpoint"))
        self.checkpoint_dir = shard_checkpoint_dir(base, shard, cfg.server.shards)
        self.store = build_store(cfg, shard)
        if resume:
            for reason in resume_store(self.store, self.checkpoint_dir):
                log.error("checkpoint skipped: %s", reason)
            log.info("resumed from %s at version %d", self.checkpoint_dir, self.store.version)
        self.metrics = MetricsWriter(run_dir / "metrics.jsonl" if run_dir else None,
                                     buffered=True)
        # this host's workers: shared memory, and the local socket unless server.local is off
        self.local = LocalPeers(self.store.layout.numel, socket=cfg.server.local)
        # the store's config: the server's, with the settings of the worker its model was
        # adopted from when it resumed such a model (server.adopt)
        self.core = ServerCore(self.store, self.store.cfg, (shard, cfg.server.shards),
                               metrics=self.metrics, local=self.local)
        self.ctx = zmq.Context()
        try:
            self.sock, self.authenticator = open_socket(self.ctx, bind, self.store, cfg)
        except BaseException:
            self.local.close_all()
            self.ctx.term()
            raise
        self.unauthorized = 0         # requests whose worker is not their key's (CURVE)
        self._unauthorized_logged: set = set()
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.stopping = False
        self._last_checkpoint_version = self.store.version
        self._last_checkpoint_t = time.monotonic()
        self._next_status = time.monotonic() + 1.0
        self._status_at = (time.monotonic(), self.store.version)
        self.spin_s = cfg.server.spin.us * 1e-6
        self.spare_spin_s = max(self.spin_s, cfg.server.spin.spare_us * 1e-6)
        self.cores = usable_cores()
        self.shards = cfg.server.shards
        self._spin_next = None           # the identity to poll for after a reply (_spin)
        self._replied: dict[bytes, float] = {}    # identity -> when it was last answered

    def extend_budget(self, updates: int) -> None:
        """run.max_updates = the current version + ``updates`` (what hello tells workers)."""
        self.cfg = self.cfg.replace(**{"run.max_updates": self.store.version + updates})
        self.core.cfg = self.core.cfg.replace(**{"run.max_updates": self.cfg.run.max_updates})
        log.info("budget extended: run.max_updates is now %d", self.cfg.run.max_updates)

    def request_stop(self, *_):
        self.stopping = True

    def serve(self, max_seconds: float | None = None) -> None:
        """The loop: requests from the ROUTER and the local socket, replies, periodic work."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        self.local.watch(poller)
        every = self.cfg.server.stats_every_s
        next_stats = time.monotonic() + every
        deadline = time.monotonic() + max_seconds if max_seconds else None
        while not self.stopping:
            if deadline and time.monotonic() > deadline:
                break
            spun = self._spin(poller)
            if isinstance(spun, tuple):      # a local request taken while polling
                self._serve(*spun)
                events = poller.poll(0)      # and whatever else came meanwhile
            else:
                events = spun or poller.poll(POLL_MS)
            if any(s is self.sock for s, _ in events):
                sock = self.sock
                for _ in range(MAX_BATCH):   # a message is waiting: poll said so, or EVENTS
                    try:
                        identity, request, user = self._recv()
                    except zmq.Again:
                        break
                    self._serve(identity, request, user)
                    if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        break
            for s, _ in events:              # the local socket's, by descriptor
                if s is not self.sock:
                    for ident, worker, data in self.local.readable(s):
                        self._serve(ident, [data], local=worker)
            for identity, reply in self.core.tick():
                self._send(identity, reply)
            now = time.monotonic()
            if now >= next_stats:
                next_stats = now + every
                self._record_stats()
            if now >= self._next_status:
                self._status(now)
            ce, ces = self.cfg.server.checkpoint_every, self.cfg.server.checkpoint_every_s
            moved = self.store.version - self._last_checkpoint_version
            if ce and moved >= ce or ces and moved and now - self._last_checkpoint_t >= ces:
                self.checkpoint()

    def _spin(self, poller: zmq.Poller):
        """What came while polling for up to the spin window (``_spin_window``): the
        poller's events, or ``_serve``'s arguments for a request of the local client polled
        for, or None.
        The loop polls only after answering a client that came back that fast last time (its
        request arrived within the window of our reply before it): one waiting on us in a
        loop costs no wake-up of the server, while workers that compute between pushes, and
        idle times, leave it asleep in ``poll`` (no CPU). Every source is polled, so the
        client that made the server spin is not served before the others."""
        ident = self._spin_next
        if ident is None:
            return None
        self._spin_next = None
        end = time.perf_counter() + self._spin_window()
        recv = self.local.recv if self.local.is_local(ident) else None
        sock = self.sock
        others = 0.0                 # when to look at every source next
        while True:
            now = time.perf_counter()
            if now >= end:
                return None
            if recv is not None:
                data = recv(ident)
                if data is not None:         # a request (or a greeting: answered), or closed
                    worker = self.local.request(ident, data) if data else None
                    return (ident, [data], None, worker) if worker else None
            elif sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                return [(sock, zmq.POLLIN)]
            if now >= others:        # the others, every SPIN_POLL_S: a zmq_poll costs more
                others = now + SPIN_POLL_S
                events = poller.poll(0)
                if events:
                    return events

    def _spin_window(self) -> float:
        """How long to poll after a reply: server.spin.spare_us while this host has a core to
        spare for the server (its workers, by their shared-memory segments, and the server
        fewer than or as many as its cores; with ``server.shards`` every shard counted as on
        this host): the core is idle anyway, and a server awake when the next push comes
        answers it sooner than one woken from sleep, its caches warm. Otherwise
        server.spin.us: the workers need every core. A shard without a core to spare does not
        spin at all: its clients come back only once every shard has answered, so a shard
        polling for them holds the core that a sibling still needs to finish its range."""
        local = len(self.local)
        if local and local + self.shards <= self.cores:
            return self.spare_spin_s
        return self.spin_s if self.shards == 1 else 0.0

    def _turnaround(self, identity: bytes, arrived: float) -> None:
        """Note whether ``identity`` came back within the spin window of our last reply."""
        last = self._replied.get(identity)
        self._spin_next = identity if last is not None and \
            arrived - last <= self._spin_window() else None

    def _recv(self) -> tuple[bytes, list, str | None]:
        """One request: the routing identity and the header as bytes (small: copying is
        cheaper than a Frame object), the tensor frames without a copy; and with CURVE the
        connection's User-Id (the worker ids its key may use, asgd.core.auth), else None."""
        sock = self.sock
        identity = sock.recv(zmq.NOBLOCK)
        frames = []
        user = None
        if sock.rcvmore:
            if self.authenticator is None:
                frames.append(sock.recv())
            else:
                head = sock.recv(copy=False)
                try:
                    user = head.get("User-Id")
                except zmq.ZMQError:
                    user = ""
                frames.append(head.bytes)
            while sock.rcvmore:
                frames.append(sock.recv(copy=False))
        return identity, frames, user

    def _serve(self, identity: bytes, request: list, user: str | None = None,
               local: str | None = None) -> None:
        if self.spare_spin_s:
            self._turnaround(identity, time.perf_counter())
        if local is None and self.authenticator is not None and \
                not self._authorized(identity, request, user):
            return
        for peer, reply in self.core.handle(identity, request, local):
            self._send(peer, reply)
        if self.spare_spin_s:
            if len(self._replied) >= MAX_REPLIED:   # bounded: strangers come and go
                self._replied.clear()
            self._replied[identity] = time.perf_counter()

    def _authorized(self, identity: bytes, request: list, user: str | None) -> bool:
        """With CURVE: does the header's ``worker`` belong to the key the request came with?
        If not, answer ``unauthorized`` and change nothing. A header that cannot be read goes
        on to the core, which answers it as always."""
        try:
            header = protocol.decode_header(request[0])
        except Exception:   # not even a header (ProtocolError and the like): the core's case
            return True
        worker = header.get("worker")
        if not isinstance(worker, str) or worker in auth.names_of(user):
            return True
        rid = header.get("id")
        rid = rid if isinstance(rid, int) and not isinstance(rid, bool) else None
        self.unauthorized += 1
        if len(self._unauthorized_logged) < 100 and (user, worker) not in \
                self._unauthorized_logged:
            self._unauthorized_logged.add((user, worker))
            log.warning("unauthorized: a request as worker %r from a key allowed as %r",
                        worker[:64], user)
        # counted as every refused request is (stats: errors, bytes_in, bytes_out)
        self._send(identity, self.core.refuse(
            request, rid, "unauthorized", f"worker {worker[:64]!r} is not the id of the key "
            f"this connection authenticated with ({user or 'none'})"))
        return False

    def _send(self, identity: bytes, reply: Reply) -> None:
        """One reply. Buffers the store lent go as tracked frames, without a copy, and their
        trackers go with the reply into the store's list (server.reply); the rest are copied
        once into ZeroMQ messages, cheaper than a frame each for small ones."""
        if self.local.is_local(identity):
            # only requests answered by a header alone come this way (LocalPeers.check)
            self.local.send(identity, reply[0])
            reply.sent = True
            return
        sock = self.sock
        try:
            last = len(reply) - 1        # 0: a header alone (shared memory, errors, stats)
            sock.send_multipart([identity, reply[0]], zmq.SNDMORE if last else 0)
            for i in range(1, len(reply)):
                flags = 0 if i == last else zmq.SNDMORE
                if reply.copy:
                    sock.send(reply[i], flags)
                else:
                    frame = zmq.Frame(reply[i], track=True)
                    reply.trackers.append(frame.tracker)
                    sock.send(frame, flags, copy=False)
        except zmq.ZMQError as e:  # the peer is gone: nothing to do
            log.warning("reply not sent: %s", e)
        finally:
            reply.sent = True    # what it lent is the store's again once ZeroMQ let go

    def _status(self, now: float) -> None:
        """version, updates/s, workers seen, staleness: one line, only when it changed."""
        t_prev, v_prev = self._status_at
        version = self.store.version
        if version == v_prev:
            self._next_status = now + 1.0       # idle: look again soon, say nothing
            return
        self._next_status = now + STATUS_EVERY_S
        s = self.core.stats()
        log.info("version %d, %.0f updates/s, %d worker(s) seen, staleness mean %.2f max %d, "
                 "%d dropped", version, (version - v_prev) / max(now - t_prev, 1e-9),
                 len(s["workers"]), s["staleness_mean"], s["staleness_max"],
                 s["updates_dropped"])
        self._status_at = (now, version)
        budget = self.cfg.run.max_updates      # said once (again after --extend moved it)
        if budget and version >= budget and getattr(self, "_budget_said", None) != budget:
            self._budget_said = budget
            log.info("budget spent: version %d reached run.max_updates %d; the workers stop "
                     "here (Ctrl-C or SIGTERM writes the checkpoint and stops the server)",
                     version, budget)

    def _record_stats(self) -> None:
        s = self.core.stats()
        self.metrics.flush()
        self.metrics.write("server", version=s["version"], updates_applied=s["updates_applied"],
                           updates_dropped=s["updates_dropped"],
                           staleness_mean=s["staleness_mean"], staleness_max=s["staleness_max"],
                           bytes_in=s["bytes_in"], bytes_out=s["bytes_out"],
                           workers=len(s["workers"]),
                           **({"shard": self.shard} if self.cfg.server.shards > 1 else {}))

    def checkpoint(self) -> Path:
        path = save_store(self.store, self.checkpoint_dir)
        self._last_checkpoint_version = self.store.version
        self._last_checkpoint_t = time.monotonic()
        return path

    def close(self) -> None:
        self._status(time.monotonic())       # the last stretch's figures
        try:
            if not self.store.has_model:
                log.info("no model yet (no worker said hello with one): no checkpoint written")
            else:
                kept = self.core.control.flush()     # kbatch: a partial sum is applied
                if kept:
                    log.info("applied the %d kept push(es) of a partial K-batch", kept)
                path = self.checkpoint()
                log.info("checkpoint at version %d written to %s", self.store.version, path)
        finally:
            self._record_stats()
            self.metrics.close()
            self.local.close_all()
            self.sock.close(0)
            if self.authenticator is not None:
                self.authenticator.stop()
            self.ctx.term()


def run_server(cfg: Config, bind: str | None, run_dir=None, checkpoint_dir=None,
               resume: bool = False, address_file=None, extend: int = 0,
               quiet: bool = False, shard: int = 0) -> int:
    """Serve until SIGINT/SIGTERM, then checkpoint; the exit code (0, or 1 when it cannot
    start). ``extend`` moves run.max_updates to the starting version plus that many updates
    (the workers take the server's budget when they say hello)."""
    name = "server" if cfg.server.shards == 1 else f"server shard {shard}"
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format=f"%(asctime)s {name} %(levelname)s %(message)s")
    torch.set_num_threads(cfg.server.threads)
    bind = bind or cfg.server.bind
    if bind.startswith("tcp://") and bind.endswith(":0"):
        bind = bind[:-2] + ":*"   # ZeroMQ's spelling of "any free port"
    try:
        server = Server(cfg, bind, Path(run_dir) if run_dir else None,
                        Path(checkpoint_dir) if checkpoint_dir else None, resume, shard)
    except (CheckpointError, ValueError) as e:
        log.error("%s", e)
        return 1
    except zmq.ZMQError as e:
        log.error("cannot bind %s: %s", bind, e)
        return 1
    if extend:
        server.extend_budget(extend)
    signal.signal(signal.SIGTERM, server.request_stop)
    signal.signal(signal.SIGINT, server.request_stop)
    if address_file:
        write_address(Path(address_file), server.endpoint)
    lo, hi = server.store.span
    if not server.store.has_model:
        log.info("serving at %s without a model: the first worker's hello brings it",
                 server.endpoint)
    else:
        log.info("serving %d parameters (%d tensors%s) at %s, version %d",
                 server.store.numel, len(server.store.specs),
                 "" if server.store.whole else
                 f"; values {lo}-{hi} of {server.store.layout.numel}",
                 server.endpoint, server.store.version)
    try:
        server.serve()
    finally:
        server.close()
    return 0
