"""Staleness policies: what the server does with a push, given how stale it is.

Plain functions of integers and tensors, testable without a socket. A configured policy is a
'+'-joined set of names (``server.policy: "scale+ssp"``):

| name            | effect                                                                   |
| --------------- | ------------------------------------------------------------------------ |
| ``none``        | apply every gradient as it comes (Downpour SGD)                          |
| ``max_staleness`` | drop pushes staler than ``server.max_staleness`` (the bound also works with any other policy) |
| ``scale``       | learning rate / max(1, staleness) (Zhang, Gupta, Lian, Liu 2016)         |
| ``dc``          | delay compensation g + λ g⊙g⊙(w_now − w_base) (DC-ASGD, Zheng et al. 2017)|
| ``ssp``         | stale synchronous parallel: no worker more than ``ssp_slack`` pushes ahead of the slowest live worker (the server defers its reply) |
| ``sync``        | synchronous SGD: one gradient from each live worker, their mean applied as one update |

The state these rules need (kept weight versions, clocks, rounds) lives on the server, in
``server.staleness``; nothing here imports torch (``dc_compensate`` works on any tensors).

    decision = decide(parse_policy("scale"), staleness=4, max_staleness=8)
    decision.apply, decision.lr_scale            # True, 0.25
    g = dc_compensate(g, w_now, w_base, lam=0.04)
    ssp_may_proceed(clock=7, live_clocks=[5, 7, 6], slack=2)   # True
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

POLICIES = ("none", "max_staleness", "scale", "dc", "ssp", "sync")


@dataclass(frozen=True)
class Decision:
    apply: bool
    lr_scale: float = 1.0
    reason: str = ""


def parse_policy(policy: str) -> frozenset[str]:
    """The set of policy names in ``policy`` ('+'-joined); ValueError on unknown or clashing
    names."""
    names = frozenset(p.strip() for p in policy.split("+") if p.strip())
    if not names:
        raise ValueError("empty staleness policy")
    unknown = sorted(names - set(POLICIES))
    if unknown:
        raise ValueError(f"unknown staleness policy {', '.join(unknown)} "
                         f"(known: {', '.join(POLICIES)})")
    if "sync" in names and len(names - {"none"}) > 1:
        raise ValueError("sync cannot be combined with other policies (its staleness is 0)")
    if "none" in names and len(names) > 1:
        names = names - {"none"}
    return names


def scale_factor(staleness: int) -> float:
    """Staleness-aware learning rate factor: 1 / max(1, staleness)."""
    return 1.0 / max(1, staleness)


def decide(policy: str | frozenset, staleness: int, max_staleness: Optional[int] = None
           ) -> Decision:
    """Whether a push of this staleness is applied, and the factor on its learning rate.
    ``sync`` takes every gradient and ignores the bound: a round's mean is one update, each
    worker's gradient in it computed from the round's version (server.staleness)."""
    names = parse_policy(policy) if isinstance(policy, str) else policy
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    if "sync" in names:
        return Decision(True, 1.0)
    if max_staleness is not None and staleness > max_staleness:
        return Decision(False, 0.0, f"staleness {staleness} > max_staleness {max_staleness}")
    if "scale" in names:
        return Decision(True, scale_factor(staleness))
    return Decision(True, 1.0)


def dc_compensate(grad, w_now, w_base, lam):
    """DC-ASGD's delay-compensated gradient g + λ · g ⊙ g ⊙ (w_now − w_base): a first-order
    Taylor correction of the gradient towards the current weights, with the outer product
    g gᵀ standing in (diagonally) for the Hessian. Returns a new tensor."""
    return grad + lam * grad * grad * (w_now - w_base)


def ssp_may_proceed(clock: int, live_clocks: Iterable[int], slack: int) -> bool:
    """Stale synchronous parallel: a worker that has completed ``clock`` pushes may go on
    while it is at most ``slack`` pushes ahead of the slowest live worker."""
    clocks = list(live_clocks)
    return not clocks or clock - min(clocks) <= slack
