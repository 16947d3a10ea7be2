"""The built-in worker's connection to its server: hello with bounded retries, a server that
moved followed through its address files, and the checks of the server's answer.

    worker.connect()                       # hello; the server's weights and budget taken
    worker._hello("reconnecting")          # hello again (recorded as worker_rejoined)
    follow_server_files(worker)            # True when the server now listens elsewhere

While the server does not answer, the worker reconnects with bounded exponential back-off,
says so at once and every STATUS_EVERY_S seconds, and gives up (ServerGone, exit 3) after
``worker.reconnect_timeout_s``. The hello carries the settings a worker's pushes depend on
(local steps): a server with another update rule refuses it, and one that predates the
check is checked here (WorkerError, exit 2, before the first push).
"""
from __future__ import annotations

import logging
import time

from asgd.client import ServerError, ServerTimeout
from asgd.core.endpoint import read_addresses
from asgd.core.layout import ParameterLayout
from worker.faults import ServerGone, WorkerError

log = logging.getLogger("asgd.worker")

STATUS_EVERY_S = 5.0       # a status line in the log, and a waiting note, this often
HELLO_TIMEOUT_S = 2.0      # each attempt to reach the server waits this long at most


def follow_server_files(worker) -> bool:
    """A worker started from address files (``--server-file``, as asgd launch starts it) reads
    them again when the server stops answering: a server that the launcher restarted listens
    on a new port. If the endpoints changed, the client moves there (the exchange speaks
    through the same one) and the next request is a hello. True when it moved."""
    files = getattr(worker.stop, "server_files", None)   # set by worker.main
    if not files:
        return False
    endpoints = read_addresses(files)
    if endpoints is None or ",".join(endpoints) == worker.client.endpoint:
        return False
    worker.client.reconnect(endpoints if len(endpoints) > 1 else endpoints[0])
    log.warning("%s: the server now listens at %s (read from %s)", worker.id,
                worker.client.endpoint, ", ".join(map(str, files)))
    return True


class ServerConnection:
    """Mixed into ``worker.train.Worker``: it has ``cfg``, ``id``, ``rank``, ``client``,
    ``ex`` (the Exchange), ``layout``, ``local_steps``, ``metrics``, ``stop`` and
    ``max_updates``."""

    def _with_retry(self, what: str, fn):
        """Call ``fn(timeout_s)``; while the server does not answer, reconnect with bounded
        back-off, say so at once and every few seconds, and give up (ServerGone) once
        worker.reconnect_timeout_s has passed. Before each new attempt a worker started from
        address files reads them again and follows a server that moved (a restart)."""
        budget = self.cfg.worker.reconnect_timeout_s
        started = time.monotonic()
        give_up = started + budget
        delay, next_note = 0.1, started + STATUS_EVERY_S
        attempt_s = min(self.cfg.worker.request_timeout_s, HELLO_TIMEOUT_S)
        while True:
            try:
                return fn(min(attempt_s, max(0.1, give_up - time.monotonic())))
            except ServerTimeout:
                now = time.monotonic()
                if self.stopping:
                    raise ServerGone(f"worker {self.id}: stopped while waiting for the server "
                                     f"at {self.client.endpoint}") from None
                if now >= give_up:
                    raise ServerGone(
                        f"worker {self.id}: gave up: no answer from the server at "
                        f"{self.client.endpoint} for {budget:g} s "
                        "(worker.reconnect_timeout_s)") from None
                if delay == 0.1:
                    log.warning("%s: waiting for the server at %s (%s; giving up after %g s)",
                                self.id, self.client.endpoint, what, budget)
                elif now >= next_note:
                    next_note = now + STATUS_EVERY_S
                    log.warning("%s: still waiting for the server at %s: %.0f s of %g s",
                                self.id, self.client.endpoint, now - started, budget)
                time.sleep(min(delay, max(0.0, give_up - now)))
                delay = min(delay * 2, 2.0)
                if not follow_server_files(self):
                    self.client.reconnect()

    def _settings(self) -> dict:
        """local_steps, and with local steps whether this worker follows dylu's counts (its
        config's server.policy: a server that differs refuses it)."""
        from asgd.tasks.step import follows_dylu

        out = {"local_steps": self.local_steps}
        if self.local_steps > 1:
            out["dylu"] = follows_dylu(self.cfg)
        return out

    def _hello(self, what: str) -> dict:
        """Say hello (again), offering the shared-memory segment; the weights it carries are
        loaded. A hello again (``what`` is not "hello") is logged and recorded
        (``worker_rejoined``), saying when the server's version went back (a server restarted
        from a checkpoint): the worker trains on from the server's weights."""
        def hello():
            # the settings this worker's pushes depend on: a server with another update rule
            # refuses the hello (and an older one, that does not compare, is checked below)
            return self._with_retry(what, lambda t: self.client.hello(
                rank=self.rank, timeout_s=t, settings=self._settings()))

        before = self.ex.version
        try:
            info = self.ex.connect(hello, self._check_layout)
        except RuntimeError as e:
            raise WorkerError(f"worker {self.id}: {e}") from None
        except ServerError as e:       # refused: another model or settings, a key's id, ...
            raise WorkerError(f"worker {self.id}: the server at {self.client.endpoint} "
                              f"refused this worker: {e.message}") from None
        if what != "hello":
            back = self.version < before
            log.warning("%s: %s: hello again at version %d%s", self.id, what, self.version,
                        f", behind this worker's {before}: the server went back (a restart)"
                        if back else "")
            self.metrics.write("worker_rejoined", worker=self.id, rank=self.rank, reason=what,
                               version=self.version, previous_version=before,
                               endpoint=self.client.endpoint)
        return info

    def _check_layout(self, info: dict) -> None:
        try:
            self.layout.check_same(ParameterLayout.from_specs(info.get("tensors", [])),
                                   "worker's", "server's")
        except (ValueError, KeyError, TypeError) as e:
            raise WorkerError(f"worker {self.id}: the model built from the config does not "
                              f"match the server's: {e}") from None
        # the server's update rule (absent from servers that predate it: not checked)
        h = (info.get("config") or {}).get("local_steps")
        if h is not None and h != self.local_steps:
            raise WorkerError(
                f"worker {self.id}: worker.exchange.local_steps is {self.local_steps}, the "
                f"server's local_steps {h}: it would apply this worker's pushes with the wrong "
                f"rule (1: gradients for its optimizer; more: pseudo-gradients for its outer "
                f"optimizer). Set worker.exchange.local_steps={h}, or start the server with "
                f"worker.exchange.local_steps={self.local_steps}")

    def connect(self) -> dict:
        log.info("%s: connecting to the server at %s", self.id, self.client.endpoint)
        info = self._hello("hello")
        budget = info.get("config", {}).get("max_updates")
        if isinstance(budget, int) and budget != self.max_updates:
            log.info("%s: the server's budget is %d updates (run.max_updates)", self.id, budget)
            self.max_updates = budget
        log.info("%s: connected at version %d (%s%s)", self.id, self.version, self.ex.transport,
                 ", overlapped" if self.ex.overlap else "")
        return info
