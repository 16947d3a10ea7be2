"""The state of two per-push policies, kept by ``server.staleness.StalenessControl``:
``dc``'s kept weight versions (``DelayCompensation``) and ``dylu``'s worker speeds
(``WorkerSpeeds``).

    dc = DelayCompensation(numel, history=64, lam=2.0, adaptive=True)
    dc.remember(store.weights, store.version)
    dc.compensate(grad, store.weights, base, store.version)    # grad rewritten in place
    speeds = WorkerSpeeds(steps=16)
    speeds.start("w0", now); speeds.pushed("w0", later); speeds.answer("w0", later, ["w0"])
"""
from __future__ import annotations

import torch

from asgd.core.policies import dc_compensate, dylu_steps


class DelayCompensation:
    """DC-ASGD (Zheng et al. 2017): g + λ g⊙g⊙(w_now − w_base), against the weights the
    gradient was computed from. Keeps the last ``history`` versions (history × 4 bytes ×
    parameters of memory); a push from an older version is compensated against the oldest
    kept one and counted in ``fallbacks``. Adaptive λ (DC-ASGD-a): λ0 / √(mean square of g),
    the mean square a running average with momentum 0.95."""

    def __init__(self, numel: int, history: int, lam: float, adaptive: bool):
        self.lam, self.adaptive = lam, adaptive
        self.ring = torch.empty(history, numel)
        self.ring_versions = [-1] * history
        self.mean_square = torch.zeros(numel) if adaptive else None
        self.fallbacks = 0

    def remember(self, weights: torch.Tensor, version: int) -> None:
        slot = version % len(self.ring_versions)
        self.ring[slot].copy_(weights)
        self.ring_versions[slot] = version

    def forget(self) -> None:
        self.ring_versions = [-1] * len(self.ring_versions)

    def weights_at(self, version: int) -> torch.Tensor:
        """The weights of ``version`` if kept, else the oldest kept (counted in fallbacks)."""
        slot = version % len(self.ring_versions)
        if self.ring_versions[slot] == version:
            return self.ring[slot]
        self.fallbacks += 1
        oldest = min(v for v in self.ring_versions if v >= 0)
        return self.ring[oldest % len(self.ring_versions)]

    def compensate(self, grad: torch.Tensor, weights: torch.Tensor, base: int,
                   version: int) -> None:
        """Replace ``grad`` (flat, in place) by its compensated value."""
        if self.adaptive:
            self.mean_square.mul_(0.95).addcmul_(grad, grad, value=0.05)
            lam = self.lam / (self.mean_square.sqrt() + 1e-7)
        else:
            lam = self.lam
        if base == version:
            return
        grad.copy_(dc_compensate(grad, weights, self.weights_at(base), lam))


class WorkerSpeeds:
    """DyLU's clock: each worker's seconds per local step, a running mean (weight 1/2 on the
    newest) of the time from a reply to its next push over the steps that reply asked for;
    its next count ``policies.dylu_steps`` against the fastest live worker's speed."""

    def __init__(self, steps: int):
        self.steps = steps                  # H: the fastest worker's local steps
        self.per_step: dict = {}            # worker -> seconds per local step
        self.since: dict = {}               # worker -> when it got its last reply (or hello)
        self.told: dict = {}                # worker -> the steps that reply asked for

    def start(self, worker: str, now: float) -> None:
        self.since[worker], self.told[worker] = now, self.steps

    def forget(self, worker: str) -> None:
        for d in (self.per_step, self.since, self.told):
            d.pop(worker, None)

    def pushed(self, worker: str, now: float) -> None:
        """A push arrived: the round it ends timed its steps."""
        if worker not in self.since:
            return
        took = (now - self.since[worker]) / max(1, self.told.get(worker, self.steps))
        old = self.per_step.get(worker)
        self.per_step[worker] = took if old is None else 0.5 * (old + took)

    def answer(self, worker: str, now: float, live) -> int:
        """The steps of ``worker``'s next round (its reply goes now); ``live``: the workers
        that count for the fastest speed."""
        mine = self.per_step.get(worker)
        times = [self.per_step[w] for w in live if self.per_step.get(w, 0) > 0]
        steps = self.steps
        if mine and times:
            steps = dylu_steps(self.steps, 1.0 / mine, 1.0 / min(times))
        self.since[worker], self.told[worker] = now, steps
        return steps
