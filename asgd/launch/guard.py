"""The divergence guard: tells a run that is learning from one that is not.

    guard = DivergenceGuard(num_classes=10, warmup=50, max_updates=6000)
    reason = guard.loss(version=700, loss=2.3021)      # "" while all is well
    reason = guard.accuracy(version=900, accuracy=0.09)
    reason = guard.final(accuracy=0.089, version=6000)

A run has diverged when its training loss is not finite, when the loss still sits at chance
(ln K for K classes) once the warm-up and a grace period are over, when its live accuracy
collapses to chance after it had clearly learned, or when it ends at chance. The launcher
stops such a run, says why at once, and ends it with ``status: diverged``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

NEAR_CHANCE_LOSS = 0.97       # a loss >= this x ln K is "at chance"
CHANCE_ACCURACY = 1.5         # an accuracy <= this / K is "at chance"
GRACE_MIN = 300               # updates after the warm-up before a stuck loss counts
GRACE_SHARE = 0.1             # ... or this share of run.max_updates, whichever is larger
STUCK_WINDOWS = 3             # consecutive loss reports at chance before it counts


@dataclass
class DivergenceGuard:
    num_classes: int
    warmup: int = 0
    max_updates: int = 0
    best_accuracy: float = 0.0
    _stuck: int = 0
    reasons: list = field(default_factory=list)

    @property
    def chance_loss(self) -> float:
        return math.log(max(self.num_classes, 2))

    @property
    def chance_accuracy(self) -> float:
        return CHANCE_ACCURACY / max(self.num_classes, 2)

    @property
    def grace_until(self) -> int:
        """The version from which a loss still at chance means the run is not learning."""
        return self.warmup + max(GRACE_MIN, int(GRACE_SHARE * self.max_updates))

    def _found(self, reason: str) -> str:
        if reason and reason not in self.reasons:
            self.reasons.append(reason)
        return reason

    def loss(self, version: int, loss: float | None) -> str:
        """Judge a (windowed, averaged) training loss reported at ``version``."""
        if loss is None or not math.isfinite(loss):
            return self._found(f"the training loss became {loss} at version {version}")
        if loss >= NEAR_CHANCE_LOSS * self.chance_loss and version >= self.grace_until:
            self._stuck += 1
            if self._stuck >= STUCK_WINDOWS:
                return self._found(
                    f"the training loss is stuck at chance ({loss:.3f}, ln {self.num_classes} = "
                    f"{self.chance_loss:.3f}) at version {version}, past the warm-up")
        else:
            self._stuck = 0
        return ""

    def accuracy(self, version: int, accuracy: float) -> str:
        """Judge a live evaluation: a collapse to chance after real learning."""
        self.best_accuracy = max(self.best_accuracy, accuracy)
        learned = self.best_accuracy >= 2 * self.chance_accuracy + 0.1
        if learned and accuracy <= self.chance_accuracy:
            return self._found(f"the live accuracy collapsed to {accuracy:.3f} at version "
                               f"{version} (it had reached {self.best_accuracy:.3f})")
        return ""

    def final(self, accuracy: float | None, version: int | None = None) -> str:
        """Judge the final evaluation: a model at chance is never a success, once the run has
        had the warm-up and the grace period to learn (a shorter run is untrained, not
        diverged; its non-finite loss is caught by ``loss``)."""
        if version is not None and version < self.grace_until:
            return ""
        if accuracy is not None and accuracy <= self.chance_accuracy:
            return self._found(f"the final test accuracy {accuracy:.3f} is at chance "
                               f"(1/{self.num_classes} = {1 / self.num_classes:.3f})")
        return ""
