"""Straggler simulation for experiments: make chosen ranks slower on one machine.

    s = Straggler.for_rank(cfg.worker, rank)
    ... compute a gradient (compute_s), exchange it with the server (exchange_s) ...
    s.after_step(compute_s, exchange_s)   # sleeps (slow_factor - 1) * step + delay_s

A slowed step takes ``slow_factor`` times as long as it would, plus ``delay_s`` seconds. The
step is the compute time plus the exchange; the exchange counts as the fastest of the recent
ones, so time a reply was held by the server (ssp, sync) is not stretched too. The extra time
is spent sleeping, so the slow worker leaves the CPU to the others, as a slower device would.
This is a simulation of heterogeneous hardware, not a model of any particular one.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

RECENT = 20   # exchanges the estimate looks back over


@dataclass
class Straggler:
    slow_factor: float = 1.0
    delay_s: float = 0.0
    _exchanges: deque = field(default_factory=lambda: deque(maxlen=RECENT), repr=False)

    @classmethod
    def for_rank(cls, worker_cfg, rank: int) -> "Straggler":
        slowed = worker_cfg.straggler.ranks is None or rank in worker_cfg.straggler.ranks
        if not slowed:
            return cls()
        return cls(worker_cfg.straggler.factor, worker_cfg.straggler.delay_s)

    def extra_s(self, compute_s: float, exchange_s: float = 0.0) -> float:
        self._exchanges.append(exchange_s)
        step = compute_s + min(self._exchanges)
        return max(0.0, (self.slow_factor - 1.0) * step) + self.delay_s

    def after_step(self, compute_s: float, exchange_s: float = 0.0) -> None:
        extra = self.extra_s(compute_s, exchange_s)
        if extra > 0:
            time.sleep(extra)
