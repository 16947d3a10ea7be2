"""Straggler simulation for experiments: make chosen ranks slower on one machine.

    s = Straggler.for_rank(cfg.worker, rank)
    ... compute a gradient and exchange it, taking step_s seconds ...
    s.after_step(step_s)        # sleeps (slow_factor - 1) * step_s + delay_s

A slowed step takes ``slow_factor`` times as long as it would, plus ``delay_s`` seconds. The extra
time is spent sleeping, so the slow worker leaves the CPU to the others, as a slower device
would. This is a simulation of heterogeneous hardware, not a model of any particular one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Straggler:
    slow_factor: float = 1.0
    delay_s: float = 0.0

    @classmethod
    def for_rank(cls, worker_cfg, rank: int) -> "Straggler":
        slowed = worker_cfg.slow_ranks is None or rank in worker_cfg.slow_ranks
        if not slowed:
            return cls()
        return cls(worker_cfg.slow_factor, worker_cfg.delay_s)

    def extra_s(self, compute_s: float) -> float:
        return max(0.0, (self.slow_factor - 1.0) * compute_s) + self.delay_s

    def after_step(self, compute_s: float) -> None:
        extra = self.extra_s(compute_s)
        if extra > 0:
            time.sleep(extra)
