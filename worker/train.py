"""The worker's training loop: pull, compute a gradient on its own shard, push_pull, repeat.

    python -m worker --config configs/default.yaml --server tcp://127.0.0.1:5555 --rank 0

No barrier and no waiting on other workers: each step computes the gradient on the weights of
version v and sends it with v; the reply carries the weights after the server applied it (and
whatever other workers pushed meanwhile). The gradient and the weights move as flat buffers
(``asgd.client.exchange``): through shared memory when the server is on this host, else as chunks
on the wire; with ``worker.exchange.overlap`` the exchange runs while the next step computes.
When the server goes away the worker reconnects with bounded exponential back-off, and gives up
with a clear message after ``worker.reconnect_timeout_s`` (worker.connect: hello, retries, the
checks of the server's answer); the gradient in flight at that moment is dropped, not resent.
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
from asgd.metrics import MetricsWriter
from asgd.tasks.data import ShardLoader
from asgd.tasks.step import LocalSteps, compute_gradient
from asgd.tasks.devices import resolve_device as _resolve_device
from asgd.tasks.straggler import Straggler
from asgd.tasks.task import build_task
from worker.connect import STATUS_EVERY_S, ServerConnection, follow_server_files
from worker.faults import FAULT_ENV, FAULT_EXIT_CODE, Diverged, WorkerError, fault_exit_step
from worker.precision import LossScaler
from worker.stages import build_pipeline

log = logging.getLogger("asgd.worker")

FIRST_STATUS_S = 2.0       # the first status line this soon (then every STATUS_EVERY_S)
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


class Worker(ServerConnection):
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
                if self.local is not None:
                    self.local.follow(reply)      # dylu: the next round's local steps
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
