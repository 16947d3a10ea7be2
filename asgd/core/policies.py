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
| ``adaptive``    | delay-adaptive step size: the full rate while staleness <= ``adaptive_threshold`` x the live workers n, past that the rate times ``adaptive_decay``'s factor (Koloskova, Stich, Jaggi 2022, eq. 11; Mishchenko, Bach, Even, Woodworth 2022) |
| ``age``         | age-aware scaling: the push (gradient or pseudo-gradient) times exp(-``age_alpha`` τ), cut to 0 by a half-cosine gate at ``age_cutoff`` (the form of Shah & Sun 2026, CGAD) |
| ``delayed_nesterov`` | local steps only: the outer momentum updated every ``dn_buffer`` pushes with their mean, each push applied at lr / ``dn_buffer`` in between (Liu et al. 2024, Delayed Nesterov) |
| ``dylu``        | local steps only: each worker's local steps scaled by its speed, H_w = max(1, floor(H v_w / v_max)) (Liu et al. 2024, DyLU); the reply to a push carries H_w |
| ``kbatch``      | K-batch asynchronous SGD: the server keeps pushes until it has K (from any workers, of any versions) and applies their mean as one update; no reply waits. K = ``server.kbatch``, or ceil(``kbatch_fraction`` x the live workers) (Dutta, Joshi, Ghosh, Dube, Nagpurkar 2018) |

Clashes are refused: ``sync`` with anything; ``scale`` with ``adaptive`` (two rules for one
rate); ``delayed_nesterov`` with ``dc`` (a correction of gradients, not of pseudo-gradients);
``kbatch`` with ``ssp`` (which holds replies) and with ``delayed_nesterov`` (two buffers of
pushes). With ``kbatch`` every other rule (the bound, ``scale``, ``adaptive``, ``age``, ``dc``)
judges each push as it comes, by its staleness in K-push updates.

The state these rules need (kept weight versions, clocks, rounds) lives on the server, in
``server.staleness``; nothing here imports torch (``dc_compensate`` works on any tensors).

    decision = decide(parse_policy("scale"), staleness=4, max_staleness=8)
    decision.apply, decision.lr_scale            # True, 0.25
    decide(parse_policy("adaptive"), staleness=12, workers=8).lr_scale   # 1/12
    age_factor(3, alpha=0.1, cutoff=0)           # exp(-0.3)
    dylu_steps(16, speed=2.0, fastest=5.0)       # 6
    kbatch_size(None, workers=8)                 # 4: ceil(0.5 x 8)
    kbatch_lr_factor(4, "sqrt")                  # 2.0
    g = dc_compensate(g, w_now, w_base, lam=0.04)
    ssp_may_proceed(clock=7, live_clocks=[5, 7, 6], slack=2)   # True
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

POLICIES = ("none", "max_staleness", "scale", "dc", "ssp", "sync", "adaptive", "age",
            "delayed_nesterov", "dylu", "kbatch")
LOCAL_STEP_POLICIES = ("delayed_nesterov", "dylu")   # rules of the outer optimizer, H > 1
ADAPTIVE_DECAYS = ("inverse", "ratio", "drop")
KBATCH_LR_RULES = ("none", "sqrt", "linear")     # the rate of a K-push update: x 1, √K, K
CLASHES = (("scale", "adaptive", "both set the rate of a stale push: take one"),
           ("delayed_nesterov", "dc", "dc corrects gradients; delayed_nesterov applies "
            "pseudo-gradients of local steps"),
           ("kbatch", "ssp", "ssp holds a worker's reply; kbatch never does"),
           ("kbatch", "delayed_nesterov", "both apply the mean of a buffer of pushes: take one"))


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
    if "sync" in names and "kbatch" in names:
        raise ValueError("kbatch cannot be combined with sync (sync waits for one push from "
                         "every live worker and holds their replies; kbatch takes any K pushes "
                         "and holds none: take one)")
    if "sync" in names and len(names - {"none"}) > 1:
        raise ValueError("sync cannot be combined with other policies (its staleness is 0)")
    for a, b, why in CLASHES:
        if a in names and b in names:
            raise ValueError(f"{a} cannot be combined with {b} ({why})")
    if "none" in names and len(names) > 1:
        names = names - {"none"}
    return names


def scale_factor(staleness: int) -> float:
    """Staleness-aware learning rate factor: 1 / max(1, staleness)."""
    return 1.0 / max(1, staleness)


def adaptive_factor(staleness: int, workers: int, threshold: float = 1.0,
                    decay: str = "inverse") -> float:
    """The delay-adaptive step size's factor on the rate (Koloskova, Stich, Jaggi 2022,
    eq. 11, after Mishchenko et al. 2022): 1 while staleness τ <= K = threshold · n (n the
    workers computing at once, the concurrency), and past K a factor no larger than the
    theorem's min(1, 1/(4 L η τ)), which leaves its rate depending on n, not on the largest
    delay. ``decay`` picks it: ``inverse`` 1/τ (the paper's practical η_t <= η/τ_t),
    ``ratio`` K/τ (continuous at K: min(η, 1/(4Lτ)) when η = 1/(4LK)), ``drop`` 0 (allowed
    by the theorem: such pushes are dropped)."""
    limit = threshold * max(1, workers)
    if staleness <= limit:
        return 1.0
    if decay == "inverse":
        return 1.0 / staleness
    if decay == "ratio":
        return limit / staleness
    if decay == "drop":
        return 0.0
    raise ValueError(f"unknown adaptive decay {decay!r} (known: {', '.join(ADAPTIVE_DECAYS)})")


def age_factor(staleness: int, alpha: float, cutoff: int = 0) -> float:
    """Age-aware scaling of a push (the form of Shah & Sun 2026, CGAD): σ(τ) = γ(τ) e^(−ατ),
    γ(τ) = (1 + cos(π τ / cutoff)) / 2 below ``cutoff`` and 0 from it (``cutoff`` 0: no
    gate, γ = 1). σ(0) = 1: a fresh push is applied as it is."""
    if cutoff and staleness >= cutoff:
        return 0.0
    gate = 0.5 * (1.0 + math.cos(math.pi * staleness / cutoff)) if cutoff else 1.0
    return gate * math.exp(-alpha * staleness)


def kbatch_size(kbatch: Optional[int], workers: int, fraction: float = 0.5) -> int:
    """K of K-batch asynchronous SGD: ``kbatch`` if set, else ceil(``fraction`` x the live
    workers), at least 1 (one worker: K = 1, every push an update as without kbatch)."""
    if kbatch:
        return kbatch
    return max(1, math.ceil(fraction * max(1, workers) - 1e-9))


def kbatch_lr_factor(k: int, rule: str = "none") -> float:
    """The factor on the rate of an update that is the mean of ``k`` pushes: 1 (``none``),
    √k (``sqrt``) or k (``linear``), the large-batch rules (a mean of k batches is one batch
    k times as large); 1 for k = 1 whatever the rule."""
    if rule == "none" or k <= 1:
        return 1.0
    if rule == "sqrt":
        return math.sqrt(k)
    if rule == "linear":
        return float(k)
    raise ValueError(f"unknown kbatch lr rule {rule!r} (known: {', '.join(KBATCH_LR_RULES)})")


def dylu_steps(steps: int, speed: float, fastest: float) -> int:
    """DyLU (Liu et al. 2024): the local steps of a worker of speed ``speed`` (steps/s) when
    the fastest runs ``steps``: max(1, floor(steps · speed / fastest)), so that every
    worker's round takes about as long as the fastest one's."""
    if fastest <= 0 or speed <= 0 or speed >= fastest:
        return steps
    return max(1, int(steps * speed / fastest))


def decide(policy: str | frozenset, staleness: int, max_staleness: Optional[int] = None,
           workers: int = 1, threshold: float = 1.0, decay: str = "inverse") -> Decision:
    """Whether a push of this staleness is applied, and the factor on its learning rate
    (``workers``, ``threshold``, ``decay``: ``adaptive``'s n, K / n and rule past K).
    ``sync`` takes every gradient and ignores the bound: a round's mean is one update, each
    worker's gradient in it computed from the round's version (server.staleness). With
    ``kbatch`` the staleness counts K-push updates, not pushes (server.kbatch)."""
    names = parse_policy(policy) if isinstance(policy, str) else policy
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    if "sync" in names:
        return Decision(True, 1.0)
    if max_staleness is not None and staleness > max_staleness:
        return Decision(False, 0.0, f"staleness {staleness} > max_staleness {max_staleness}")
    if "scale" in names:
        return Decision(True, scale_factor(staleness))
    if "adaptive" in names:
        f = adaptive_factor(staleness, workers, threshold, decay)
        if f == 0.0:
            return Decision(False, 0.0, f"staleness {staleness} > {threshold:g} x {workers} "
                            "workers (adaptive, drop)")
        return Decision(True, f)
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
