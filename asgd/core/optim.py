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


def make_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                 weight_decay=o.weight_decay)
    if o.name == "adagrad":
        return torch.optim.Adagrad(params, lr=o.lr, eps=o.eps, weight_decay=o.weight_decay)
    raise ValueError(f"unknown optimizer {o.name!r}")
