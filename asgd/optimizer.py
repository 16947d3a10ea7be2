"""asgd.Optimizer: a torch optimizer whose steps train on the parameter server.

    import asgd
    # A-SGD: the server holds the optimizer; step() pushes the gradient, the server applies it
    # under its staleness policy and the fresh weights are written back into the parameters.
    opt = asgd.Optimizer(model.parameters(), optimizer="adamw", lr=3e-4, weight_decay=0.01)
    # Local steps (asynchronous Local SGD, DiLoCo): your optimizer steps locally; every
    # local_steps steps the pseudo-gradient goes to the server's outer optimizer.
    opt = asgd.Optimizer(model.parameters(), inner=torch.optim.AdamW(model.parameters()),
                         local_steps=32)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.log(loss=loss)
        if opt.done:                 # the server's budget is spent
            break
    opt.close()

The server is ``server=`` or ``$ASGD_SERVER`` (shards comma-separated); with neither, the
optimizer runs standalone: the named optimizer with the same schedule (or the inner one
alone) steps in this process, so the script is its own single-process reference.

Design choices (docs/library.md): the server owns the clock and, in A-SGD mode, the learning
rate and its schedule (``schedule=``, ``warmup=``, ``max_updates=`` or the server's config): a
torch learning-rate scheduler attached to this optimizer is refused at the next step with a
message saying so, where it would silently do nothing. In local-steps mode ``param_groups``
are the inner optimizer's, so a scheduler on either one drives the inner rate. The gradients
stay after a step, as torch's, except where their buffer is still needed (overlap: in flight;
local steps: the pseudo-gradient was written there): then they are zero.
"""
from __future__ import annotations

import collections
import logging
import math
import os
import time
import weakref

import torch

from asgd import api
from asgd.optimizer_config import SCHEDULER_HELP, parameters, resolve, server_config

log = logging.getLogger("asgd.optimizer")

MAX_NONFINITE_RUN = 10     # non-finite gradients in a row before the model counts as diverged
LOGGED = 10_000            # log() records kept in ``opt.logged``


class _Resources:
    """What close() lets go of, also reachable from the finalizer (which must not hold the
    optimizer itself)."""

    def __init__(self):
        self.link = self.metrics = None
        self.steps = 0
        self.unpushed = 0      # local steps since the last push (close() pushes them)
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.link is not None:
            if self.steps == 0:
                log.warning("asgd.Optimizer: step() was never called: nothing was pushed to "
                            "the server at %s (call opt.step() after loss.backward())",
                            self.link.endpoint)
            if self.unpushed:
                log.warning("asgd.Optimizer: the last %d local steps were not pushed to the "
                            "server at %s: call opt.close() (or use with) at the end",
                            self.unpushed, self.link.endpoint)
            self.link.close()
        if self.metrics is not None:
            self.metrics.close()


class Optimizer(torch.optim.Optimizer):
    def __init__(self, params=None, optimizer: str | None = None, lr: float | None = None, *,
                 momentum=None, nesterov=None, betas=None, eps=None, weight_decay=None,
                 schedule=None, warmup=None, max_updates=None, min_lr=None, total=None,
                 step_size=None, gamma=None,
                 inner: torch.optim.Optimizer | None = None, local_steps: int | None = None,
                 outer=None, outer_lr=None, outer_momentum=None, outer_nesterov=None,
                 server: str | None = None, rank: int | None = None, worker: str | None = None,
                 config=None, run_dir=None, **data_path):
        given = {k: v for k, v in dict(
            optimizer=optimizer, lr=lr, momentum=momentum, nesterov=nesterov, betas=betas,
            eps=eps, weight_decay=weight_decay, schedule=schedule, warmup=warmup,
            max_updates=max_updates, min_lr=min_lr, total=total, step_size=step_size,
            gamma=gamma, local_steps=local_steps, outer=outer, outer_lr=outer_lr,
            outer_momentum=outer_momentum, outer_nesterov=outer_nesterov,
            **data_path).items() if v is not None}
        self.inner = inner
        if inner is not None:
            if not isinstance(inner, torch.optim.Optimizer):
                raise TypeError(f"asgd.Optimizer: inner= takes a torch.optim.Optimizer, got "
                                f"{type(inner).__name__}")
            clash = [k for k in ("optimizer", "lr", "momentum", "nesterov", "betas", "eps",
                                 "weight_decay", "schedule", "warmup") if k in given]
            if clash:
                raise ValueError(f"asgd.Optimizer: {', '.join(clash)} set the server's "
                                 "optimizer in A-SGD mode; with inner= your optimizer's own "
                                 "settings apply (outer=, outer_lr= set the server's rule)")
            if params is None:
                params = [p for g in inner.param_groups for p in g["params"]]
        elif local_steps is not None and local_steps != 1:
            raise ValueError("asgd.Optimizer: local_steps needs inner=, the optimizer that "
                             "takes the local steps")
        if params is None:
            raise TypeError("asgd.Optimizer: give the parameters to train")
        named, trainable, self.positional = parameters(params, groups=inner is not None)
        resolved = resolve(given, config, inner is not None)
        self.cfg, self.settings = resolved.cfg, resolved.settings
        self.local_steps = self.cfg.worker.exchange.local_steps
        o = self.cfg.optimizer
        defaults = {"lr": o.lr, "weight_decay": o.weight_decay}
        super().__init__([p for _, p in named], defaults)
        if inner is not None:      # a scheduler on this optimizer drives the inner one
            self.param_groups = inner.param_groups
        self._trainable = trainable
        self._res = _Resources()
        self._finalizer = weakref.finalize(self, self._res.close)
        self.staleness: int | None = None
        self.applied: bool | None = None
        self.steps = 0                  # step() calls that stepped
        self._version = 0               # standalone: updates made here
        self._nonfinite_run = 0
        self._local = None
        self.logged = collections.deque(maxlen=LOGGED)
        self.samples = 0                # as log(samples=) counts them
        self._started = time.monotonic()
        self._rate = (self._started, 0)
        self.rank = api.rank() if rank is None else rank
        self.workers = api.workers()
        if rank is None:             # both from the environment: they must agree
            api.check_place(self.rank, self.workers)
        self.workers = max(self.workers, self.rank + 1)
        self.id = worker or f"w{self.rank}"
        where = run_dir if run_dir is not None else api.run_dir()
        if where:
            from asgd.metrics import MetricsWriter

            self._res.metrics = MetricsWriter(os.path.join(where, "metrics.jsonl"))
        self.server, self.server_files = api.server(server, self.cfg.worker.reconnect_timeout_s)
        self.link = None
        if self.server is None:
            self._standalone()
        else:
            self._connect()
        self.anchor = self.link.ex.weights.clone() \
            if self.link is not None and inner is not None else None
        self._shown_lr = self._show_lr()

    # ------------------------------------------------------------------------------------------
    # set-up

    def _standalone(self) -> None:
        """No server: this process is the whole run (the script's own reference)."""
        self.server_cfg = server_config(self.cfg, self.settings)
        if self.inner is None:
            from asgd.core.optim import make_optimizer

            self._local = make_optimizer(self.server_cfg, [p for _, p in self._trainable])
        log.info("asgd.Optimizer: no server given ($ASGD_SERVER unset): training standalone")

    def _connect(self) -> None:
        from asgd.link import Link

        self.link = Link(self._trainable, self.server, self.rank, self.id, self.cfg.worker,
                         self.settings, positional=self.positional,
                         server_files=self.server_files)
        self._res.link = self.link
        try:
            info = self.link.connect()
        except BaseException:
            self._res.steps = 1           # nothing to warn about: it never started
            self._res.close()
            raise
        self.server_cfg = server_config(self.cfg, info.get("config"))
        log.info("%s: connected to %s at version %d (%s)", self.id, self.link.endpoint,
                 self.version, self.link.ex.transport)

    # ------------------------------------------------------------------------------------------
    # what a script reads

    @property
    def version(self) -> int:
        """The server's version of the weights in the parameters (standalone: the updates
        made here)."""
        return self.link.ex.version if self.link is not None else self._version

    @property
    def max_updates(self) -> int:
        return self.server_cfg.run.max_updates

    @property
    def done(self) -> bool:
        """The server's budget (max_updates) is spent."""
        return bool(self.max_updates) and self.version >= self.max_updates

    @property
    def lr(self) -> float:
        """The server's learning rate now: its schedule's at this version (before the
        staleness policy's scale); with local steps its outer rate."""
        from asgd.core.optim import server_lr

        return server_lr(self.server_cfg, self.version)

    @property
    def transport(self) -> str:
        return self.link.ex.transport if self.link is not None else "standalone"

    def _show_lr(self) -> float | None:
        """A-SGD: every group's ``lr`` shows the server's rate (for code that logs it)."""
        if self.inner is not None:
            return None
        lr = self.lr
        for g in self.param_groups:
            g["lr"] = lr
        return lr

    def _check_lr(self) -> None:
        if self.inner is not None:
            return
        for i, g in enumerate(self.param_groups):
            if "initial_lr" in g:
                raise RuntimeError(SCHEDULER_HELP.format(what="a scheduler is attached"))
            if g["lr"] != self._shown_lr:
                raise RuntimeError(SCHEDULER_HELP.format(
                    what=f"param_groups[{i}]['lr'] was changed from {self._shown_lr:g} to "
                         f"{g['lr']:g}"))

    # ------------------------------------------------------------------------------------------
    # steps

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's; the trained parameters' gradients become zeroed views of the
        exchange's gradient buffer (backward then writes where the push reads)."""
        if self.link is None:
            return super().zero_grad(set_to_none)
        linked = {id(p) for _, p in self._trainable}
        for g in self.param_groups:
            for p in g["params"]:
                if id(p) not in linked and p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.detach_().zero_()
        self.link.ex.zero_grad()

    @torch.no_grad()
    def step(self, closure=None):
        """One step: A-SGD pushes the gradient and loads the weights after it; local steps
        step the inner optimizer and push the pseudo-gradient every local_steps steps. A
        non-finite gradient is not pushed (the weights are pulled afresh instead)."""
        self._check_lr()
        if self.inner is not None:
            with torch.enable_grad():
                loss = self.inner.step(closure) if closure is not None else self.inner.step()
            self._count_step()
            if self.steps % self.local_steps == 0:
                self._push_delta()
            if self.link is not None:
                self._res.unpushed = self.steps % self.local_steps
            return loss
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.link is None:
            self._local_step()
        else:
            grad = self.link.ex.gradient()
            if not self.link.ex.finite(grad):
                self._nonfinite()
                return loss
            self._push(grad)
            if self.link.ex.overlap:     # the buffer the gradients view is in flight
                self.link.ex.zero_grad()
        self._count_step()
        self._shown_lr = self._show_lr()
        return loss

    def _count_step(self) -> None:
        self.steps += 1
        self._res.steps = self.steps

    def _local_step(self) -> None:
        grads = [p.grad for _, p in self._trainable if p.grad is not None]
        if grads and not all(torch.isfinite(g).all() for g in grads):
            self._nonfinite()
            return
        for g in self._local.param_groups:
            g["lr"] = self.lr
        self._local.step()
        self._version += 1
        self._nonfinite_run = 0

    def _push(self, grad) -> None:
        reply = self.link.push(grad)
        self._nonfinite_run = 0
        if reply is not None:
            self.staleness = int(reply.get("staleness", 0))
            self.applied = bool(reply.get("applied", True))

    def _push_delta(self) -> None:
        """Local steps: the pseudo-gradient (the weights pulled minus the weights now) to the
        server's outer optimizer; the weights after it become the next round's start."""
        if self.link is None:
            self._version += 1
            return
        delta = self.link.ex.delta(self.anchor)
        if self.link.ex.finite(delta):
            self._push(delta)
        else:
            self._nonfinite()
        self.anchor.copy_(self.link.ex.weights)
        self.link.ex.zero_grad()

    def _nonfinite(self) -> None:
        """The same rule as the built-in worker: not pushed, the weights pulled afresh; many
        in a row mean the model diverged."""
        self._nonfinite_run += 1
        if self._nonfinite_run >= MAX_NONFINITE_RUN:
            raise FloatingPointError(
                f"asgd.Optimizer: the gradient was not finite for {self._nonfinite_run} steps "
                f"in a row at version {self.version}: the model diverged")
        log.warning("%s: a non-finite gradient at version %d: not pushed", self.id,
                    self.version)
        if self.link is not None:
            self.link.pull()
            if self.anchor is not None:
                self.anchor.copy_(self.link.ex.weights)
            self.link.ex.zero_grad()

    # ------------------------------------------------------------------------------------------
    # records, state, the end

    def log(self, **scalars) -> dict:
        """Record scalars (e.g. ``loss=loss``) with this worker's step, version and
        staleness: into the run's metrics.jsonl under ``asgd launch`` (a ``worker_step``
        record, as the built-in worker writes), else printed. Kept in ``opt.logged``.
        ``samples=`` (the samples since the last log) becomes the running total and a
        ``samples_per_s`` rate, as the built-in worker records them."""
        values = {}
        for k, v in scalars.items():
            if isinstance(v, torch.Tensor):
                v = v.detach().float().mean().item()
            if not isinstance(v, (int, float, str, bool)) and v is not None:
                raise TypeError(f"opt.log({k}=...): a number or a one-value tensor, got "
                                f"{type(v).__name__}")
            values[k] = v
        if isinstance(values.get("samples"), int):     # this step's: the rate, the total
            now = time.monotonic()
            self.samples += values["samples"]
            values["samples_per_s"] = (self.samples - self._rate[1]) / max(
                now - self._rate[0], 1e-9)
            values["samples"], self._rate = self.samples, (now, self.samples)
        rec = {"worker": self.id, "rank": self.rank, "step": self.steps,
               "version": self.version, "staleness": self.staleness, **values}
        self.logged.append(rec)
        if self._res.metrics is not None:
            self._res.metrics.write("worker_step", **rec)
        else:
            shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) and math.isfinite(v)
                              else f"{k} {v}" for k, v in values.items())
            print(f"[{self.id}] step {self.steps}, version {self.version}: {shown}", flush=True)
        return rec

    def state_dict(self) -> dict:
        """What lives on the worker: the inner optimizer (or, standalone, the local one), the
        encoding's error feedback, the step count. The server's optimizer state is the
        server's (its checkpoint)."""
        feedback = None
        if self.link is not None and self.link.ex.feedback is not None:
            fb = self.link.ex.feedback
            feedback = [f.residual.clone() for f in (fb if isinstance(fb, list) else [fb])]
        own = self.inner if self.inner is not None else self._local
        return {"asgd": 1, "mode": "local" if self.inner is not None else "asgd",
                "steps": self.steps, "version": self.version,
                "optimizer": own.state_dict() if own is not None else None,
                "feedback": feedback}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("asgd") != 1:
            raise ValueError("asgd.Optimizer.load_state_dict takes what its state_dict gave")
        mode = "local" if self.inner is not None else "asgd"
        if state.get("mode") != mode:
            raise ValueError(f"a state of {state.get('mode')} mode, this optimizer is in {mode}"
                             " mode")
        own = self.inner if self.inner is not None else self._local
        if own is not None and state.get("optimizer") is not None:
            own.load_state_dict(state["optimizer"])
        fb = self.link.ex.feedback if self.link is not None else None
        saved = state.get("feedback")
        if fb is not None and saved:
            for f, r in zip(fb if isinstance(fb, list) else [fb], saved):
                f.residual.copy_(r)
                f._pending = bool(r.abs().sum() > 0)
        self.steps = self._res.steps = int(state.get("steps", 0))
        if self.link is None:
            self._version = int(state.get("version", 0))

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_res", None) is not None:
            raise RuntimeError("asgd.Optimizer: the model is fixed once the server has it; "
                               "give every parameter at construction")
        super().add_param_group(param_group)

    def close(self) -> None:
        """Push what is left, wait for the last push, say bye, let go of the shared memory
        (idempotent); under a launch, a ``worker_done`` record as the built-in worker's. With
        local steps the steps since the last push go as one more (shorter) pseudo-gradient,
        unless the server's budget is spent: a run of 23 steps with local_steps=10 pushes
        three times, and the server's weights are the last local step's."""
        if self._finalizer.alive:
            self._push_trailing()
        if self._finalizer.alive and self._res.metrics is not None:
            elapsed = time.monotonic() - self._started
            self._res.metrics.write(
                "worker_done", worker=self.id, rank=self.rank, step=self.steps,
                samples=self.samples, version=self.version, elapsed_s=elapsed,
                samples_per_s=self.samples / max(elapsed, 1e-9) if self.samples else None,
                reason="max_updates" if self.done else "closed", transport=self.transport)
        self._finalizer()

    def _push_trailing(self) -> None:
        if self.inner is None or self.link is None or self.steps % self.local_steps == 0 \
                or self.done:
            self._res.unpushed = 0
            return
        try:
            self._push_delta()
        except (ConnectionError, RuntimeError, ValueError) as e:   # the server went away
            log.warning("%s: the last %d local steps were not pushed: %s", self.id,
                        self.steps % self.local_steps, e)
        self._res.unpushed = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
