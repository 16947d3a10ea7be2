"""The event loop: N virtual workers and the server's real update code in one process.

    sim = Simulation(cfg, parse_delay("exponential"))   # cfg.run.workers virtual workers
    summary = sim.run()                                  # until run.max_updates are applied
    sim.store.weights                                    # the final weights (the same seed:
                                                         # bitwise the same)

The server is ``server.store.ParameterStore`` and ``server.staleness.StalenessControl`` as the
server process runs them (every policy, the bound, the outer optimizer of local steps), with
the simulated clock in place of the wall clock. A worker is ``asgd.tasks.step`` on its own
shard's ``ShardLoader`` (and its own ``LocalSteps`` optimizer with local steps), run on one
shared model whose parameters are views of one flat buffer.

Events are pushes, in order of simulated time in a heap; ties go to the lower rank, then the
earlier step. With local steps a step's duration is a whole round's of H steps; with ``dylu``
a worker told fewer steps takes that fraction of it. A worker's gradient is computed when it gets its weights (the reply to its last
push, or the start) and held until its push is due, its step's duration later (``delays``):
a virtual worker holds one flat gradient and its data position, not a model. At the push the
control decides as the server would (apply, scale, drop, compensate, defer); the reply's
weights are the store's right after it, or when a held reply is released (ssp, sync).
"""
from __future__ import annotations

import heapq
import math
import time

import torch

from asgd.config import Config
from asgd.metrics import MetricsWriter
from asgd.tasks.data import ShardLoader
from asgd.tasks.evaluate import evaluate
from asgd.tasks.step import FlatBuffers, LocalSteps, compute_gradient
from asgd.tasks.straggler import Straggler
from asgd.tasks.task import build_task
from server.staleness import Pending, StalenessControl
from server.store import ParameterStore
from server.workers import bucket
from simulator.delays import DelayModel

MAX_NONFINITE_RUN = 10     # non-finite gradients in a row before a worker (the run) gives up
EVALS = 40                 # evaluations over a run, besides the final one
PUSHES_PER_UPDATE = 50     # a run that needs more pushes than this per update has stalled


class VirtualWorker:
    __slots__ = ("rank", "name", "loader", "duration", "straggler", "local", "buffers", "base",
                 "grad", "batch", "steps", "samples", "loss", "losses", "stale", "nonfinite",
                 "pending")

    def __init__(self, rank: int, loader, duration, straggler: Straggler, local):
        self.rank, self.name, self.loader = rank, f"w{rank}", loader
        self.duration, self.straggler, self.local = duration, straggler, local
        self.buffers = None       # the model's buffers (BatchNorm statistics): each worker's
        self.base = 0             # the version its gradient is computed from
        self.grad = None          # that gradient (flat), held until its push is due
        self.batch = 0            # the samples it was computed on
        self.steps = self.samples = self.stale = self.nonfinite = 0
        self.loss = 0.0           # the last step's
        self.losses = 0.0         # summed since the last worker_step record
        self.pending = None       # its Pending while a policy holds its reply

    def next_duration(self) -> float:
        d = self.duration()
        return d + self.straggler.extra_s(d)


class Simulation:
    def __init__(self, cfg: Config, delay: DelayModel, metrics: MetricsWriter | None = None,
                 eval_every: int | None = None):
        if cfg.worker.stages.devices or cfg.worker.stages.precision != "fp32" or \
                cfg.worker.stages.microbatches != 1:
            raise ValueError("the simulator runs the plain worker: worker.stages is not "
                             "simulated (devices, precision, micro-batches)")
        if cfg.server.shards > 1:
            raise ValueError("the simulator runs one server: server.shards must be 1")
        ex = cfg.worker.exchange
        if ex.overlap or ex.encoding != "none" or ex.weights_encoding != "none":
            raise ValueError("the simulator exchanges exact float32 one push at a time: "
                             "worker.exchange.overlap and its encodings are not simulated")
        self.cfg, self.delay = cfg, delay
        self.metrics = metrics or MetricsWriter(None)
        torch.manual_seed(cfg.run.seed)           # dropout and the like: the same draws
        task = build_task(cfg)
        self.task, self.model, self.ds = task, task.model, task.dataset
        self.model.train()
        self.store = ParameterStore.from_model(self.model, cfg)
        self.flat = FlatBuffers(self.model, task.layout)
        self.model_buffers = list(self.model.buffers())
        self.now = 0.0
        self.control = StalenessControl(self.store, cfg, clock=lambda: self.now,
                                        log=self._log)
        n = cfg.run.workers
        params = task.layout.parameters(self.model)
        self.workers = []
        for r in range(n):
            loader = ShardLoader(self.ds.x_train, self.ds.y_train, r, n, cfg.worker.batch_size,
                                 seed=cfg.run.seed, augment=self._augment(r))
            local = LocalSteps(cfg, params) if cfg.worker.exchange.local_steps > 1 else None
            w = VirtualWorker(r, loader, delay.sampler(r, n, cfg.run.seed),
                              Straggler.for_rank(cfg.worker, r), local)
            w.buffers = [b.clone() for b in self.model_buffers]
            self.workers.append(w)
        self.heap: list[tuple[float, int, int]] = []
        self.histogram: dict[int, int] = {}
        self.dropped = 0
        self.evals: list[dict] = []
        self.eval_every = eval_every or max(1, cfg.run.max_updates // EVALS)
        self.status, self.failures = "ok", []

    def _augment(self, rank: int):
        from asgd.tasks.augment import Augment

        aug = Augment.from_config(self.cfg.data, self.ds.input_shape, self.cfg.run.seed, rank,
                                  "cpu")
        return aug if aug.active else None

    def _log(self, kind: str, **fields) -> None:
        self.metrics.write(kind, t=round(self.now, 6), **fields)

    # ------------------------------------------------------------------------------------------
    # a worker's side

    def _pull_and_compute(self, w: VirtualWorker) -> None:
        """``w`` gets the store's current weights and computes its next push from them; the
        push is due one step's duration from now."""
        self.flat.load(self.store.weights)
        w.base = self.store.version
        for mine, b in zip(w.buffers, self.model_buffers):
            b.copy_(mine)
        gradient = (lambda: compute_gradient(self.model, w.loader, self.flat))
        if w.local is None:
            loss, n = gradient()
            g = self.flat.gradient()
        else:
            loss, n, g = w.local.run(w.base, gradient, self.flat)
        for mine, b in zip(w.buffers, self.model_buffers):
            mine.copy_(b)
        w.loss, w.batch = float(loss.detach()), n
        if w.grad is None:
            w.grad = g.clone()
        else:
            w.grad.copy_(g)
        d = w.next_duration()
        if w.local is not None:    # dylu: a round of fewer local steps takes that much less
            d *= w.local.steps / w.local.full
        heapq.heappush(self.heap, (self.now + d, w.rank, w.steps))

    def _finite(self, w: VirtualWorker) -> bool:
        """A non-finite gradient is not pushed (the server would refuse it): the worker
        pulls afresh, as the real one does; too many in a row end the run as diverged."""
        if math.isfinite(w.loss) and bool(torch.isfinite(w.grad).all()):
            w.nonfinite = 0
            return True
        w.nonfinite += 1
        self.metrics.write("nonfinite_loss", t=round(self.now, 6), worker=w.name, rank=w.rank,
                           version=self.store.version, loss=str(w.loss), run=w.nonfinite)
        if w.nonfinite >= MAX_NONFINITE_RUN:
            self.status = "diverged"
            self.failures.append(f"worker {w.name}: the loss or gradient was not finite for "
                                 f"{w.nonfinite} steps in a row at version "
                                 f"{self.store.version}: the model diverged")
        return False

    # ------------------------------------------------------------------------------------------
    # the server's side

    def _push(self, w: VirtualWorker) -> None:
        version = self.store.version
        p = Pending(b"", w.name, w.steps, "push_pull")
        out = self.control.push(p, w.base, w.grad)
        k = bucket(out.staleness)
        self.histogram[k] = self.histogram.get(k, 0) + 1
        self.dropped += not out.applied
        w.steps += 1
        w.samples += w.batch
        w.stale += out.staleness
        w.losses += w.loss
        if w.steps % self.cfg.worker.log_every == 0:
            self._worker_step(w)
        if out.deferred:
            w.pending = p
        else:
            if w.local is not None:
                w.local.follow(out.reply())       # dylu: the next round's local steps
            self._pull_and_compute(w)
        for held in self.control.release():
            self._release(held)
        if self.store.version // self.eval_every > version // self.eval_every:
            self._evaluate()

    def _release(self, held: Pending) -> None:
        w = self.workers[int(held.worker[1:])]
        w.pending = None
        if w.local is not None:
            w.local.follow(held.reply)
        self._pull_and_compute(w)

    def _worker_step(self, w: VirtualWorker) -> None:
        k = self.cfg.worker.log_every
        self.metrics.write("worker_step", t=round(self.now, 6), worker=w.name, rank=w.rank,
                           step=w.steps, loss=w.losses / k, staleness=w.stale / k,
                           version=self.store.version, samples=w.samples)
        w.losses, w.stale = 0.0, 0

    def _evaluate(self, final: bool = False) -> dict:
        self.flat.load(self.store.weights)
        acc, loss = evaluate(self.model, self.ds.x_test, self.ds.y_test,
                             self.cfg.run.eval_batch_size)
        rec = self.metrics.write("eval", t=round(self.now, 6), version=self.store.version,
                                 accuracy=acc, loss=loss, **({"final": True} if final else {}))
        self.evals.append(rec)
        return rec

    # ------------------------------------------------------------------------------------------

    def run(self) -> dict:
        """Run until ``run.max_updates`` are applied (or the run stalls or diverges); the
        summary (the fields of a launch's summary.json, times in simulated seconds)."""
        started = time.monotonic()
        cfg = self.cfg
        threads = torch.get_num_threads()
        torch.set_num_threads(cfg.worker.threads)   # as a worker: the same sums, bit for bit
        try:
            return self._run(started)
        finally:
            torch.set_num_threads(threads)

    def _run(self, started: float) -> dict:
        cfg = self.cfg
        for w in self.workers:
            self.control.hello(w.name)
        for w in self.workers:
            self._pull_and_compute(w)
        budget = cfg.run.max_updates
        # a sync update is one push of every worker: PUSHES_PER_UPDATE rounds of them
        per_update = PUSHES_PER_UPDATE * (len(self.workers) if "sync" in self.control.policy
                                          else 1)
        pushes, limit = 0, budget * per_update + len(self.workers)
        while self.store.version < budget and self.status == "ok":
            if not self.heap:
                if not self._unblock():
                    break
                continue
            pushes += 1
            if pushes > limit:
                self.status = "stalled"
                self.failures.append(f"{limit} pushes for {self.store.version} updates: the "
                                     "policy drops (or holds) nearly everything")
                break
            self.now, rank, _ = heapq.heappop(self.heap)
            w = self.workers[rank]
            if self._finite(w):
                self._push(w)
            elif self.status == "ok":
                self._pull_and_compute(w)
        return self._finish(time.monotonic() - started)

    def _unblock(self) -> bool:
        """Every worker waits on a held reply: the server's clock moves on until the
        silent ones stop counting (server.worker_timeout_s), as its periodic tick would."""
        self.now += self.cfg.server.worker_timeout_s
        released = self.control.release()
        for held in released:
            self._release(held)
        if not released:
            self.status = "stalled"
            self.failures.append(f"every worker waits on a held reply at version "
                                 f"{self.store.version}")
        return bool(released)

    def _finish(self, wall_s: float) -> dict:
        for w in self.workers:
            self.control.bye(w.name)
            self.metrics.write("worker_done", t=round(self.now, 6), worker=w.name,
                               rank=w.rank, step=w.steps, samples=w.samples,
                               version=self.store.version, elapsed_s=round(self.now, 6),
                               samples_per_s=w.samples / max(self.now, 1e-9),
                               reason="max_updates" if self.status == "ok" else self.status)
        final = self._evaluate(final=True)
        total = sum(self.histogram.values())
        samples = sum(w.samples for w in self.workers)
        return {
            "workers": len(self.workers), "test_accuracy": final["accuracy"],
            "test_loss": final["loss"], "train_s": round(self.now, 6),
            "wall_s": round(wall_s, 3), "updates_applied": self.store.version,
            "updates_dropped": self.dropped, "version": self.store.version,
            "staleness_mean": sum(k * v for k, v in self.histogram.items()) / total
            if total else 0.0,
            "staleness_max": max(self.histogram) if self.histogram else 0,
            "staleness_histogram": {str(k): v for k, v in sorted(self.histogram.items())},
            "samples": samples, "samples_per_s": samples / max(self.now, 1e-9),
            "policy": self.cfg.server.policy, "delay_model": self.delay.spec,
            "simulated": True, "dc_fallbacks": self.control.dc_fallbacks,
            "failures": list(self.failures), "status": self.status,
            "evals": len(self.evals),
        }
