"""asgd.Optimizer's link to the server: the built-in worker's data path, said hello to and
kept up through restarts.

    link = Link(named, "tcp://127.0.0.1:5555", rank=0, worker_id="w0", wcfg=cfg.worker,
                settings={"optimizer": {...}, "local_steps": 1})
    info = link.connect()              # hello with the model and settings; weights in
    link.ex.zero_grad(); loss.backward()
    reply = link.push(link.ex.gradient())   # None when the server restarted (hello again)
    link.close()                       # the last push waited for, bye

Everything the data path does (shared memory on the server's host, flat frames across
hosts, encodings with error feedback, overlap, resends answered once, shards) is the
Exchange's; this adds what the built-in worker's loop adds around it: hello with bounded
retries and the same "waiting for the server at ADDR" messages as ``asgd worker``, a hello
again when the server restarted, and the checks of the server's answer.
"""
from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path

# The data path, imported here and nowhere else by the optimizer (it moves into the asgd.client
# package: these two lines are the ones to re-point).
from asgd.client import ServerError, ServerTimeout, connect_client
from worker.exchange import Exchange

from asgd.core.layout import ParameterLayout, TensorSpec
from asgd.optimizer_config import check_settings

log = logging.getLogger("asgd.optimizer")

STATUS_EVERY_S = 5.0       # a "still waiting" note this often
HELLO_TIMEOUT_S = 2.0      # each attempt to reach the server waits this long at most
MAX_RESYNCS = 3            # hellos again without a push between them before giving up


class ServerGone(ConnectionError):
    """The server did not answer within reconnect_timeout_s."""


class ServerRefused(RuntimeError):
    """The server answered with an error the optimizer cannot train through."""


class _Named:
    """What the Exchange takes for a model: its (name, parameter) pairs, or its parameters
    in the layout's order (the Exchange of asgd.client takes either)."""

    def __init__(self, named):
        self._named = list(named)

    def named_parameters(self):
        return iter(self._named)

    def __iter__(self):
        return (p for _, p in self._named)


class Link:
    def __init__(self, named, endpoint, rank: int, worker_id: str, wcfg, settings: dict,
                 positional: bool = False, server_files=None):
        from asgd.core import auth

        self.rank, self.id, self.wcfg, self.settings = rank, worker_id, wcfg, settings
        self.positional = positional       # names made up: only shapes are compared
        self.server_files = list(server_files or [])
        self.layout = ParameterLayout(TensorSpec(n, "float32", tuple(p.shape)) for n, p in named)
        try:
            keys = auth.client_keys(wcfg, worker_id)
        except auth.AuthError as e:
            raise ValueError(f"asgd.Optimizer: {e}") from None
        self.keys = keys
        self.client = connect_client(endpoint, worker_id, timeout_s=wcfg.request_timeout_s,
                                     spin_us=wcfg.spin_us, curve=keys)
        try:
            self.ex = Exchange(_Named(named), self.layout, self.client, named[0][1].device,
                               shared_memory=wcfg.shared_memory, overlap=wcfg.overlap,
                               encoding=wcfg.encoding, weights_encoding=wcfg.weights_encoding,
                               encoding_args={"topk_ratio": wcfg.topk_ratio}
                               if wcfg.encoding == "topk" else {}, retries=wcfg.push_retries)
        except BaseException:
            self.client.close()
            raise
        # a push resent after a timeout goes to a server that moved, if the address files
        # say so (the Exchange then says so, and the push is dropped for a hello there)
        self.ex.on_timeout = lambda: self.follow() or self.client.reconnect()
        self.info: dict = {}
        self._resyncs = 0

    @property
    def endpoint(self) -> str:
        return self.client.endpoint

    @property
    def transport(self) -> str:
        """"shm" or "frames" (a property of the Exchange, or of its client's)."""
        t = self.ex.transport
        return t() if callable(t) else t

    # ------------------------------------------------------------------------------------------
    # hello

    def _with_retry(self, what: str, fn):
        """``fn(timeout_s)`` until the server answers: reconnect with bounded back-off, say so
        at once and every few seconds, give up (ServerGone) after reconnect_timeout_s."""
        budget = self.wcfg.reconnect_timeout_s
        started = time.monotonic()
        give_up, next_note, delay = started + budget, started + STATUS_EVERY_S, 0.1
        attempt_s = min(self.wcfg.request_timeout_s, HELLO_TIMEOUT_S)
        while True:
            try:
                return fn(min(attempt_s, max(0.1, give_up - time.monotonic())))
            except ServerTimeout:
                now = time.monotonic()
                if delay == 0.1:       # said at once, even when the budget is already spent
                    log.warning("%s: waiting for the server at %s (%s; giving up after %g s)",
                                self.id, self.endpoint, what, budget)
                if now >= give_up:
                    raise ServerGone(f"worker {self.id}: gave up: no answer from the server at "
                                     f"{self.endpoint} for {budget:g} s "
                                     "(reconnect_timeout_s)") from None
                if delay > 0.1 and now >= next_note:
                    next_note = now + STATUS_EVERY_S
                    log.warning("%s: still waiting for the server at %s: %.0f s of %g s",
                                self.id, self.endpoint, now - started, budget)
                time.sleep(min(delay, max(0.0, give_up - now)))
                delay = min(delay * 2, 2.0)
                if not self.follow():
                    self.client.reconnect()

    def follow(self) -> bool:
        """With address files ($ASGD_SERVER_FILE: asgd launch restarts a dead server on a
        new port and announces it there), a server that moved gets a new client, shared with
        the Exchange. True when it switched."""
        found = []
        for f in self.server_files:
            try:
                found.append(Path(f).read_text().strip())
            except OSError:
                return False
        if not found or not all(found) or ",".join(found) == self.client.endpoint:
            return False
        if inspect.signature(self.client.reconnect).parameters:
            self.client.reconnect(",".join(found))     # a client that follows by itself
        else:
            old = self.client
            self.client = self.ex.client = connect_client(
                found, self.id, timeout_s=old.timeout_s, spin_us=self.wcfg.spin_us,
                curve=self.keys)
            old.close()
        log.warning("%s: the server now listens at %s (read from %s)", self.id,
                    self.client.endpoint, ", ".join(map(str, self.server_files)))
        return True

    def _say_hello(self, timeout_s: float, segment=None):
        kw = {} if segment is None else {"shm": segment}   # a segment the Exchange offers
        # a Client whose hello carries the model (HELLO.md) is given it: a server without a
        # model learns it from the first hello, one with a model checks it
        if "tensors" in inspect.signature(self.client.hello).parameters:
            kw.update(tensors=[(s.name, p.detach()) for s, p in zip(self.layout.specs,
                                                                     self.ex.params)],
                      settings=self.settings)
        return self.client.hello(rank=self.rank, timeout_s=timeout_s, **kw)

    def connect(self, what: str = "hello") -> dict:
        """Say hello (again): the model and settings go, the server's weights come back into
        the parameters. ValueError when the server's model or settings differ."""
        before = self.ex.version
        try:
            self.info = self.ex.connect(
                lambda seg=None: self._with_retry(what, lambda t: self._say_hello(t, seg)),
                self._check)
        except ServerError as e:
            raise ValueError(f"worker {self.id}: the server at {self.endpoint} refused this "
                             f"optimizer: {e.message} ({e.code})") from None
        except RuntimeError as e:
            if isinstance(e, ServerRefused):
                raise
            raise ServerRefused(f"worker {self.id}: {e}") from None
        if what != "hello":
            log.warning("%s: %s: hello again at version %d%s", self.id, what, self.ex.version,
                        f", behind this worker's {before}: the server went back (a restart)"
                        if self.ex.version < before else "")
        return self.info

    def _check(self, info: dict) -> None:
        theirs = ParameterLayout.from_specs(info.get("tensors") or [])
        mine = self.layout
        if self.positional:     # names made up here: the server's order and shapes count
            mine = ParameterLayout(TensorSpec(t.name, s.dtype, s.shape)
                                   for s, t in zip(mine.specs, theirs.specs)) \
                if len(theirs) == len(mine) else mine
        try:
            mine.check_same(theirs, "optimizer's", "server's")
        except ValueError as e:
            raise ValueError(f"worker {self.id}: the parameters do not match the model of the "
                             f"server at {self.endpoint}: {e}") from None
        check_settings(self.settings, info.get("config"), self.endpoint)

    # ------------------------------------------------------------------------------------------
    # steps

    def push(self, grad):
        """Push ``grad`` (host, flat); the reply whose weights are now in the parameters, or
        None when the server had to be said hello to again (the push is dropped, as the
        built-in worker drops it, and the server's weights are loaded)."""
        try:
            reply = self.ex.exchange(grad)
        except ServerTimeout:
            self.connect("reconnecting")
            return None
        except ServerError as e:
            # the server restarted behind us (a version it never had, or a segment it no
            # longer knows): hello again, a few times at most without a push between
            lost = e.code == "bad_version" or (e.code == "bad_request" and "hello" in e.message)
            if lost and self._resyncs < MAX_RESYNCS:
                self._resyncs += 1
                log.warning("%s: %s: the server restarted; hello again for its weights",
                            self.id, e)
                self.connect("resync")
                return None
            raise ServerRefused(f"worker {self.id}: {e}") from None
        self._resyncs = 0
        return reply

    def pull(self) -> None:
        """The server's weights into the parameters (best effort: a server away is said
        hello to at the next push)."""
        try:
            self.ex.drain()
            self.ex.pull()
        except (ServerTimeout, ServerError) as e:
            log.warning("%s: could not pull the weights (%s)", self.id, e)

    def close(self) -> None:
        """Wait for a push in flight, say bye (best effort), let the segment go."""
        try:
            self.ex.drain()
            self.client.timeout_s = min(self.client.timeout_s, 2.0)
            self.client.bye()
        except (ServerTimeout, ServerError):
            pass
        finally:
            self.ex.close()
            self.client.close()
