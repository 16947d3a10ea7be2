"""The worker's training loop: pull, compute a gradient on its own shard, push_pull, repeat.

    python -m worker --config configs/default.yaml --server tcp://127.0.0.1:5555 --rank 0

No barrier and no waiting on other workers: each step computes the gradient on the weights of
version v and sends it with v; the reply carries the weights after the server applied it (and
whatever other workers pushed meanwhile). The gradient and the weights move as flat buffers
(``asgd.client.exchange``): through shared memory when the server is on this host, else as chunks
on the wire; with ``worker.exchange.overlap`` the exchange runs while the next step computes.
When the server goes away the worker reconnects with bounded exponential back-off, and gives up
with a clear message after ``worker.reconnect_timeout_s``; the gradient in flight at that moment
is dropped, not resent.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass

import torch

from asgd.client import ServerError, ServerTimeout, connect_client
from asgd.client.exchange import Exchange
from asgd.config import Config
from asgd.core.endpoint import read_addresses
from asgd.core.layout import ParameterLayout
from asgd.tasks.straggler import Straggler
from asgd.metrics import MetricsWriter
from asgd.tasks.data import ShardLoader
from asgd.tasks.step import LocalSteps, compute_gradient
from asgd.tasks.task import build_task
from worker.faults import (FAULT_ENV, FAULT_EXIT_CODE, Diverged, ServerGone,
                           WorkerError, fault_exit_step)
from worker.precision import LossScaler
from asgd.tasks.devices import resolve_device as _resolve_device
from worker.stages import build_pipeline

log = logging.getLogger("asgd.worker")

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


STATUS_EVERY_S = 5.0       # a status line in the log, and a waiting note, this often
FIRST_STATUS_S = 2.0       # ... the first status line this soon
HELLO_TIMEOUT_S = 2.0      # each attempt to reach the server waits this long at most
MAX_NONFINITE_RUN = 10     # non-finite losses in a row before the worker gives up


def resolve_device(name: str, rank: int = 0) -> torch.device:
    """``worker.device`` for this rank: ``auto``, ``cpu``, ``cuda:N``, or ``cuda:{local_rank}``
    (or ``{local_rank}``) with the rank modulo the visible CUDA devices filled in."""
    try:
        return _resolve_device(name, rank)
    except ValueError as e:
        raise WorkerError(str(e)) from None


@dataclass
class StopFlag:
    """Set by SIGTERM/SIGINT, installed before the (slow) set-up so a stop is never lost."""
    set: bool = False

    def __call__(self, *_):
        self.set = True


@dataclass
class WorkerResult:
    steps: int = 0
    samples: int = 0
    version: int = 0
    elapsed_s: float = 0.0
    reason: str = ""


class Worker:
    def __init__(self, cfg: Config, endpoint, rank: int = 0, worker_id: str | None = None,
                 metrics: MetricsWriter | None = None, stop: "StopFlag | None" = None):
        """``endpoint``: the server's, or a callable that returns it once known (``asgd
        launch`` starts every process at once; the worker builds its task meanwhile)."""
        if not 0 <= rank < cfg.run.workers:
            raise WorkerError(f"rank {rank} is not in [0, run.workers={cfg.run.workers})")
        self.cfg, self.rank = cfg, rank
        self.id = worker_id or f"w{rank}"
        self.metrics = metrics or MetricsWriter(None)
        self.device = resolve_device(cfg.worker.device, rank)
        task = build_task(cfg)
        ds = task.dataset
        self.layout = task.layout
        # Inside the node (worker.stages): stages on their devices, micro-batches, autocast,
        # recompute, offload; None on the plain path. Every stage is on its device before the
        # exchange makes the parameters views of its flat buffers.
        self.pipeline = build_pipeline(cfg.worker, task.model, rank,
                                       example=ds.x_train[:cfg.worker.batch_size],
                                       default_device=self.device)
        if self.pipeline is None:
            self.model = task.model.to(self.device)
        else:
            self.model = task.model
            self.device = self.pipeline.device        # batches go in at the first stage
        # fp16: the loss scale; a step whose gradient overflowed is skipped (step() -> None)
        self.scaler = LossScaler() if cfg.worker.stages.precision == "fp16" else None
        self.params = list(self.model.parameters())
        self.names = self.layout.names
        self.loader = ShardLoader.for_config(cfg, ds, rank, cfg.run.workers, self.device)
        self.stop = stop or StopFlag()
        if callable(endpoint):
            endpoint = endpoint(self.stop)
        # one server, or every shard of a sharded one (a list, or endpoints joined by commas)
        self.client = connect_client(endpoint, self.id, timeout_s=cfg.worker.request_timeout_s,
                                     spin_us=cfg.worker.spin_us)
        w = cfg.worker.exchange
        self.ex = Exchange(self.model, self.layout, self.client, self.device,
                           shared_memory=w.shared_memory, overlap=w.overlap,
                           encoding=w.encoding, weights_encoding=w.weights_encoding,
                           encoding_args={"topk_ratio": w.topk_ratio}
                           if w.encoding == "topk" else {}, retries=w.push_retries)
        # a push resent after a timeout goes to a server that moved (restarted on a new
        # port by asgd launch) if the address files say so, else on a fresh socket
        self.ex.on_timeout = lambda: follow_server_files(self) or self.client.reconnect()
        # local steps (asynchronous Local SGD, DiLoCo): the worker's own optimizer takes
        # worker.exchange.local_steps steps from the weights last pulled, then pushes the difference
        self.local_steps = w.local_steps
        self.local = LocalSteps(cfg, self.params) if self.local_steps > 1 else None
        self.straggler = Straggler.for_rank(cfg.worker, rank)
        self.crash_at = fault_exit_step(rank)
        self.max_updates = cfg.run.max_updates       # the server's, once it has said hello
        self.nonfinite_run = 0
        self._status_t = time.monotonic()
        self._next_status = self._status_t + FIRST_STATUS_S
        self._status_samples = 0

    @property
    def version(self) -> int:
        return self.ex.version

    @property
    def stopping(self) -> bool:
        return self.stop.set

    def request_stop(self, *_):
        self.stop.set = True

    # ------------------------------------------------------------------------------------------
    # connection

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

    def _hello(self, what: str) -> dict:
        """Say hello (again), offering the shared-memory segment; the weights it carries are
        loaded. A hello again (``what`` is not "hello") is logged and recorded
        (``worker_rejoined``), saying when the server's version went back (a server restarted
        from a checkpoint): the worker trains on from the server's weights."""
        def hello():
            # the settings this worker's pushes depend on: a server with another update rule
            # refuses the hello (and an older one, that does not compare, is checked below)
            return self._with_retry(what, lambda t: self.client.hello(
                rank=self.rank, timeout_s=t, settings={"local_steps": self.local_steps}))

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
                f"worker {self.id}: worker.exchange.local_steps is {self.local_steps}, the server's "
                f"local_steps {h}: it would apply this worker's pushes with the wrong rule "
                f"(1: gradients for its optimizer; more: pseudo-gradients for its outer "
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

    # ------------------------------------------------------------------------------------------

    def compute_gradient(self):
        """Loss and batch size of one step; the gradient is in the exchange's buffer (times
        the loss scale with fp16)."""
        scale = self.scaler.scale if self.scaler is not None else 1.0
        return compute_gradient(self.model, self.loader, self.ex, self.pipeline, scale)

    def step(self):
        """One step's loss, samples and the flat gradient to push (on the host). With local
        steps: ``local_steps`` steps of the worker's own optimizer, and the pseudo-gradient
        (the weights pulled minus the weights now), which the server's outer optimizer
        applies.

        With fp16 the gradient is unscaled here; when it overflowed (inf or nan) the returned
        gradient is None: the step is skipped and nothing may be pushed (the scale has shrunk
        for the next one). Once the scale has shrunk below its floor the non-finite gradient
        itself is returned, for the caller's divergence check."""
        if self.local_steps <= 1:
            loss, n = self.compute_gradient()
            grad = self.ex.gradient()
            if self.scaler is not None and not self.scaler.unscale_and_update(grad) \
                    and not self.scaler.exhausted:
                return loss, n, None
            return loss, n, grad
        return self.local.run(self.version, self.compute_gradient, self.ex)

    def run(self) -> WorkerResult:
        cfg = self.cfg
        self.connect()
        res = WorkerResult(version=self.version)
        started = time.monotonic()
        window_loss, window_stale, window_t, window_samples = 0.0, 0, started, 0
        window_steps, window_compute, window_exchange = 0, 0.0, 0.0
        while True:
            reason = self._budget_reason(res)
            if reason:
                res.reason = reason
                break
            step_started = time.perf_counter()
            loss, n, grad = self.step()
            if grad is None:      # fp16 overflow: step skipped, nothing pushed (see step)
                self.metrics.write("fp16_overflow", worker=self.id, rank=self.rank,
                                   version=self.version, **self.scaler.state())
                continue
            if not self.ex.finite(grad):
                self._nonfinite(loss)
                continue
            self.nonfinite_run = 0
            try:
                sent = time.perf_counter()
                reply = self.ex.exchange(grad)
                # a slowed rank's whole step (compute and exchange) takes slow_factor times as
                # long: it sleeps before its next gradient, as a slower device would compute
                self.straggler.after_step(sent - step_started,
                                          exchange_s=time.perf_counter() - sent)
            except ServerTimeout:
                self._hello("reconnecting")
                continue
            except ServerError as e:
                # The server restarted behind us: a version it never had (it resumed from an
                # older checkpoint), or it no longer knows this worker (its shared-memory
                # segment). Say hello again for its weights (said once here; _hello records
                # worker_rejoined with both versions); the same again without a step between
                # is fatal after a few tries.
                lost = e.code == "bad_version" or (e.code == "bad_request" and
                                                   "hello" in e.message)
                tries = self.__dict__.get("_resync_tries", 0) + 1 \
                    if self.__dict__.get("_resync_step") == res.steps else 1
                self._resync_step, self._resync_tries = res.steps, tries
                if lost and tries <= 3:
                    log.warning("%s: %s: the server restarted; hello again for its weights",
                                self.id, e)
                    self._hello("resync")
                    continue
                raise WorkerError(f"worker {self.id}: {e}") from None
            done = time.perf_counter()
            window_compute += sent - step_started
            window_exchange += done - sent
            res.steps += 1
            res.samples += n
            if self.crash_at is not None and res.steps >= self.crash_at:
                log.error("%s: %s: exiting at step %d", self.id, FAULT_ENV, res.steps)
                os._exit(FAULT_EXIT_CODE)
            res.version = self.version
            window_loss += loss.detach()      # a tensor: no device sync every step
            window_steps += 1
            if reply is not None:
                window_stale += int(reply.get("staleness", 0))
            window_samples += n
            self._status(res, loss)
            if res.steps % cfg.worker.log_every == 0:
                now = time.monotonic()
                k = window_steps
                self.metrics.write("worker_step", worker=self.id, rank=self.rank, step=res.steps,
                                   loss=float(window_loss) / k, staleness=window_stale / k,
                                   samples_per_s=window_samples / max(now - window_t, 1e-9),
                                   version=self.version, samples=res.samples,
                                   compute_ms=1e3 * window_compute / k,
                                   exchange_ms=1e3 * window_exchange / k,
                                   transport=self.ex.transport)
                window_loss, window_stale, window_t, window_samples = 0.0, 0, now, 0
                window_steps, window_compute, window_exchange = 0, 0.0, 0.0
        self.ex.drain()
        res.version = self.version
        res.elapsed_s = time.monotonic() - started
        try:  # best effort: under ssp or sync the others need not wait for us to time out
            self.client.timeout_s = min(self.client.timeout_s, 2.0)
            self.client.bye()
        except (ServerTimeout, ServerError):
            pass
        self.metrics.write("worker_done", worker=self.id, rank=self.rank, step=res.steps,
                           samples=res.samples, version=res.version, elapsed_s=res.elapsed_s,
                           samples_per_s=res.samples / max(res.elapsed_s, 1e-9), reason=res.reason,
                           transport=self.ex.transport, overlap=self.ex.overlap)
        return res

    def _budget_reason(self, res: WorkerResult) -> str:
        cfg = self.cfg
        if self.stopping:
            return "stopped"
        if cfg.worker.max_steps and res.steps >= cfg.worker.max_steps:
            return "max_steps"
        if self.max_updates and self.version >= self.max_updates:
            return "max_updates"
        if cfg.run.max_seconds and time.time() - self.metrics.t0 >= cfg.run.max_seconds:
            return "max_seconds"
        return ""

    def _nonfinite(self, loss) -> None:
        """A batch whose loss or gradient is NaN or Inf: the gradient is not pushed (the
        server would refuse it); fresh weights are pulled. Many in a row mean the model has
        diverged."""
        self.nonfinite_run += 1
        self.metrics.write("nonfinite_loss", worker=self.id, rank=self.rank,
                           version=self.version, loss=str(loss.item()), run=self.nonfinite_run)
        if self.nonfinite_run >= MAX_NONFINITE_RUN:
            raise Diverged(f"worker {self.id}: the loss or gradient was not finite for "
                           f"{self.nonfinite_run} steps in a row (loss {loss.item()}) at "
                           f"version {self.version}: the model diverged")
        log.warning("%s: a non-finite loss or gradient (loss %s) at version %d: not pushed",
                    self.id, loss.item(), self.version)
        try:
            self.ex.drain()
            self.ex.pull()
        except (ServerTimeout, ServerError):
            pass

    def _status(self, res: WorkerResult, loss) -> None:
        """A short status line in the log every STATUS_EVERY_S seconds."""
        now = time.monotonic()
        if now < self._next_status:
            return
        done = res.samples - self._status_samples
        rate = done / max(now - self._status_t, 1e-9)
        log.info("%s: step %d, loss %.4f, %.0f samples/s, version %d", self.id,
                 res.steps, loss.item(), rate, self.version)
        self._next_status, self._status_t, self._status_samples = \
            now + STATUS_EVERY_S, now, res.samples

    def close(self):
        self.ex.close()
        self.client.close()


def run_worker(cfg: Config, endpoint, rank: int, run_dir=None,
               worker_id: str | None = None) -> WorkerResult:
    torch.set_num_threads(cfg.worker.threads)
    stop = StopFlag()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    metrics = MetricsWriter(os.path.join(run_dir, "metrics.jsonl") if run_dir else None)
    worker = Worker(cfg, endpoint, rank, worker_id, metrics, stop)
    try:
        return worker.run()
    finally:
        worker.close()
        metrics.close()
