"""Staleness policies: what the server does with a push, given how stale it is.

Plain functions of integers and the server's settings, testable without a socket:

    decision = decide("max_staleness", staleness=5, max_staleness=4)
    decision.apply        # False: staler than the bound, dropped
    decision.lr_scale     # factor on the learning rate for this update

The staleness of a push is the server's version when it arrives minus the version its gradient
was computed from. A bound (``max_staleness``) combines with every policy: a push staler than
the bound is dropped whatever the policy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class Decision:
    apply: bool
    lr_scale: float = 1.0
    reason: str = ""


def _none(staleness: int) -> Decision:
    """Downpour SGD: apply every gradient as it comes."""
    return Decision(True)


POLICIES: dict[str, Callable[[int], Decision]] = {
    "none": _none,
    "max_staleness": _none,  # the bound itself does the work, see decide()
}


def decide(policy: str, staleness: int, max_staleness: Optional[int] = None) -> Decision:
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    if max_staleness is not None and staleness > max_staleness:
        return Decision(False, 0.0, f"staleness {staleness} > max_staleness {max_staleness}")
    try:
        rule = POLICIES[policy]
    except KeyError:
        raise ValueError(f"unknown staleness policy {policy!r}") from None
    return rule(staleness)
