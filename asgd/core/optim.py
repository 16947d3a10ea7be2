"""The update rule's pieces both sides share: the optimizer and the learning-rate schedule.

    opt = make_optimizer(cfg, [flat])          # torch.optim's, from cfg.optimizer
    opt = make_outer(cfg, [flat])              # the server's: A-SGD's optimizer, the outer
                                               # one of local steps, or Delayed Nesterov
    lr = scheduled_lr(cfg, version)            # warm-up, then constant, cosine or step decay

The server runs them on its flat buffer, driven by its version; the reference trainers
(asgd.experiments.reference) run the same ones by step.
"""
from __future__ import annotations

import math

import torch

from asgd.config import Config



def scheduled_lr(cfg: Config, version: int) -> float:
    s, base = cfg.schedule, cfg.optimizer.lr
    if s.warmup and version < s.warmup:
        return base * (version + 1) / s.warmup
    if s.kind == "constant":
        return base
    if s.kind == "step":
        return base * s.gamma ** ((version - s.warmup) // s.step_size)
    total = s.total or cfg.run.max_updates
    if total <= s.warmup:
        return base
    progress = min(1.0, (version - s.warmup) / (total - s.warmup))
    return s.min_lr + (base - s.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def outer_config(cfg: Config) -> Config:
    """The server's update rule: cfg's optimizer for A-SGD, or with local steps
    (worker.exchange.local_steps > 1) the outer optimizer of the server section (DiLoCo)."""
    if cfg.worker.exchange.local_steps <= 1:
        return cfg
    sv = cfg.server
    return cfg.replace(**{"optimizer.name": sv.outer.optimizer, "optimizer.lr": sv.outer.lr,
                          "optimizer.momentum": sv.outer.momentum if sv.outer.optimizer == "sgd"
                          else 0.0,
                          "optimizer.nesterov": sv.outer.nesterov and
                          sv.outer.optimizer == "sgd",
                          "optimizer.weight_decay": 0.0})


def server_lr(cfg: Config, version: int) -> float:
    """The server's learning rate at ``version`` (before the staleness policy's scale): the
    schedule for A-SGD; the constant outer rate with local steps."""
    if cfg.worker.exchange.local_steps > 1:
        return cfg.server.outer.lr
    return scheduled_lr(cfg, version)


def inner_config(cfg: Config) -> Config:
    """The worker's own schedule with local steps: the same shape over the run's inner steps
    (run.max_updates pushes of worker.exchange.local_steps steps each)."""
    h = cfg.worker.exchange.local_steps
    total = (cfg.schedule.total or cfg.run.max_updates) * h
    return cfg.replace(**{"schedule.total": total}) if total else cfg


def make_optimizer(cfg: Config, params, fused: bool = False) -> torch.optim.Optimizer:
    """cfg.optimizer's torch.optim optimizer. ``fused``: one fused kernel over each parameter
    (torch's ``fused=True``) where torch has one for the optimizer and device: the server's
    one flat parameter steps in one pass (fused Adam is about 5x faster on a CPU than the
    default), with the same arithmetic to float rounding."""
    o = cfg.optimizer
    params = list(params)
    kw = {"fused": True} if fused else {}
    if o.name == "sgd":
        make = lambda **k: torch.optim.SGD(params, lr=o.lr, momentum=o.momentum,  # noqa: E731
                                           nesterov=o.nesterov, weight_decay=o.weight_decay,
                                           **k)
    elif o.name == "adam":
        make = lambda **k: torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas),  # noqa: E731
                                            eps=o.eps, weight_decay=o.weight_decay, **k)
    elif o.name == "adamw":
        make = lambda **k: torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas),  # noqa: E731
                                             eps=o.eps, weight_decay=o.weight_decay, **k)
    elif o.name == "rmsprop":   # torch's smoothing constant alpha 0.99
        make = lambda **k: torch.optim.RMSprop(params, lr=o.lr, eps=o.eps,  # noqa: E731
                                               momentum=o.momentum,
                                               weight_decay=o.weight_decay, **k)
    elif o.name == "adagrad":
        make = lambda **k: torch.optim.Adagrad(params, lr=o.lr, eps=o.eps,  # noqa: E731
                                               weight_decay=o.weight_decay, **k)
    else:
        raise ValueError(f"unknown optimizer {o.name!r}")
    try:
        return make(**kw)
    except (RuntimeError, ValueError, TypeError):   # no fused kernel for this one
        return make()


class DelayedNesterov(torch.optim.Optimizer):
    """Delayed Nesterov (Liu et al. 2024, "Asynchronous Local-SGD Training for Language
    Modeling", arXiv 2401.09135), the outer optimizer of asynchronous local steps: every push
    g is applied at once at lr / N, and added to a buffer Δ; every N-th push the momentum
    takes the buffer's mean, m ← β m + Δ / N, and moves the weights by lr β m (then Δ ← 0).
    The momentum thus moves once per N pushes, as in synchronous DiLoCo with N workers, and
    not on every stale pseudo-gradient. N = 1 is torch's Nesterov SGD (dampening 0):
    m ← β m + g, w ← w − lr (g + β m). (The reference code's extra c, a fraction of the
    momentum step spread over the pushes between, is 0 here.)

    State per parameter (checkpointed as the store's other optimizers'): ``momentum_buffer``
    m, ``delta`` Δ and ``step``, the pushes so far."""

    def __init__(self, params, lr: float, momentum: float, buffer: int):
        if buffer < 1:
            raise ValueError(f"delayed_nesterov: the buffer must be >= 1, got {buffer}")
        if not 0 <= momentum < 1:
            raise ValueError(f"delayed_nesterov: momentum must be in [0, 1), got {momentum}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "buffer": buffer})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, beta, n = group["lr"], group["momentum"], group["buffer"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "step" not in st:
                    st["step"] = 0
                    st["momentum_buffer"] = torch.zeros_like(p)
                    st["delta"] = torch.zeros_like(p)
                g, m, delta = p.grad, st["momentum_buffer"], st["delta"]
                delta.add_(g)
                if (st["step"] + 1) % n == 0:
                    m.mul_(beta).add_(delta, alpha=1.0 / n)
                    p.add_(m, alpha=-lr * beta)
                    delta.zero_()
                p.add_(g, alpha=-lr / n)
                st["step"] += 1
        return None


def make_outer(cfg: Config, params) -> torch.optim.Optimizer:
    """The server's optimizer: cfg's for A-SGD; with local steps the outer one, or Delayed
    Nesterov when server.policy has ``delayed_nesterov`` (its N server.dn_buffer, null:
    run.workers)."""
    from asgd.core.policies import parse_policy

    sv = cfg.server
    if cfg.worker.exchange.local_steps > 1 and "delayed_nesterov" in parse_policy(sv.policy):
        return DelayedNesterov(list(params), lr=sv.outer.lr, momentum=sv.outer.momentum,
                               buffer=sv.dn_buffer or cfg.run.workers)
    return make_optimizer(outer_config(cfg), params, fused=True)
