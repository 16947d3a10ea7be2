"""The update rule's pieces both sides share: the optimizer and the learning-rate schedule.

    opt = make_optimizer(cfg, [flat])          # torch.optim's, from cfg.optimizer
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
