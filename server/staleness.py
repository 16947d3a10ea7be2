"""Staleness control on the server: what a push does, given how stale it is. One home for every
policy's state; the pure rules it applies are ``asgd.core.policies``.

    control = StalenessControl(store, cfg, clock=time.monotonic, log=metrics.write)
    control.hello("w0"); control.bye("w0")               # ssp and sync count participants
    outcome = control.push(Pending(identity, "w0", request_id, "push_pull"), base, arrays)
    outcome.deferred                                     # the reply is held (ssp, sync)
    for p in control.release(): ...                      # held replies that may go now

| policy | state kept here |
| --- | --- |
| ``none``, ``max_staleness``, ``scale`` | nothing: a decision per push (``policies.decide``) |
| ``dc`` | ``server.policy_state.DelayCompensation``: a ring of the last ``dc_history`` weight versions and, for the adaptive variant, the running mean square of the gradient |
| ``ssp`` | ``SSPGate``: each worker's clock (pushes answered) and the replies it holds |
| ``sync`` | ``SyncRound``: the running sum of this round's gradients and its held replies |
| ``adaptive`` | the participants (below), to count the live workers n |
| ``age`` | nothing: a factor per push, on the gradient (a copy: never the sender's memory) |
| ``delayed_nesterov`` | the outer optimizer's own state (``asgd.core.optim.DelayedNesterov``) |
| ``dylu`` | ``server.policy_state.WorkerSpeeds``: each worker's seconds per local step, and the steps it was told |
| ``kbatch`` | ``server.kbatch.KBatch``: the running sum of the pushes kept since the last update, and the versions updates ended at (the participants count the live workers when K is derived) |

A *participant* (ssp, sync, adaptive, dylu, kbatch) is a worker that said hello or pushed and has not said bye. It is
*live* while it has a reply waiting (it is blocked on us) or it was heard from within
``server.worker_timeout_s``; a worker that stays silent longer stops counting, so a dead worker
never stalls the others. Every time comes from the injected ``clock``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from asgd.core.optim import server_lr
from asgd.core.policies import (age_factor, decide, kbatch_lr_factor, kbatch_size,
                                parse_policy, ssp_may_proceed)
from server.kbatch import KBatch
from server.policy_state import DelayCompensation, WorkerSpeeds
from server.store import FlatChunks


@dataclass
class Pending:
    """A reply that may be held back: who to answer and what to tell them."""
    identity: bytes
    worker: str
    request_id: int
    op: str
    reply: dict = field(default_factory=dict)
    form: object = None       # how the reply carries the weights (server.core.ReplyForm)
    since: float = 0.0
    clock: int = 0
    seq: int | None = None    # the push's sequence number (exactly-once), if it has one


@dataclass(frozen=True)
class Outcome:
    """What became of one push."""
    applied: bool
    staleness: int
    version: int          # the version after this push
    lr: float = 0.0
    reason: str = ""
    deferred: bool = False
    repeat: bool = False  # sync: a worker re-sent a push already in the round (not counted)
    local_steps: int = 0  # dylu: the local steps of the worker's next round (0: not told)

    def reply(self) -> dict:
        out = {"version": self.version, "staleness": self.staleness, "applied": self.applied}
        if self.reason:
            out["reason"] = self.reason
        if self.local_steps:
            out["local_steps"] = self.local_steps
        return out


# ----------------------------------------------------------------------------------------------
# the policies' state

@dataclass
class Participants:
    timeout_s: float
    last_seen: dict = field(default_factory=dict)   # worker -> time
    clocks: dict = field(default_factory=dict)      # worker -> pushes answered (ssp clock)
    waiting: dict = field(default_factory=dict)     # worker -> Pending

    def join(self, worker: str, now: float) -> None:
        """A worker says hello: it starts at the slowest live clock of the others (SSP's clock
        of a newcomer), so joining late, or coming back after it stopped counting, does not
        stall the others."""
        others = {w: c for w, c in self.live_clocks(now).items() if w != worker}
        floor = min(others.values()) if others else 0
        self.clocks[worker] = max(self.clocks.get(worker, 0), floor)
        self.last_seen[worker] = now

    def seen(self, worker: str, now: float) -> None:
        if worker not in self.clocks:
            self.join(worker, now)
        self.last_seen[worker] = now

    def leave(self, worker: str) -> None:
        self.clocks.pop(worker, None)
        self.last_seen.pop(worker, None)

    def is_live(self, worker: str, now: float) -> bool:
        if worker not in self.clocks:
            return False
        return worker in self.waiting or now - self.last_seen.get(worker, 0.0) <= self.timeout_s

    def live(self, now: float) -> list[str]:
        return [w for w in self.clocks if self.is_live(w, now)]

    def live_clocks(self, now: float) -> dict[str, int]:
        return {w: self.clocks[w] for w in self.clocks if self.is_live(w, now)}


class SSPGate:
    """Stale synchronous parallel with slack S: a worker's reply is held while it is more than
    S pushes ahead of the slowest live worker."""

    def __init__(self, slack: int, timeout_s: float):
        self.slack = slack
        self.people = Participants(timeout_s)

    def pushed(self, worker: str, now: float) -> int:
        """Count one push of ``worker`` (applied or dropped); returns its new clock."""
        self.people.seen(worker, now)
        self.people.clocks[worker] += 1
        return self.people.clocks[worker]

    def may_proceed(self, worker: str, now: float) -> bool:
        others = self.people.live_clocks(now)
        return ssp_may_proceed(self.people.clocks[worker], others.values(), self.slack)

    def min_clock(self, now: float) -> int | None:
        clocks = self.people.live_clocks(now)
        return min(clocks.values()) if clocks else None

    def release(self, now: float) -> list[Pending]:
        """Held replies that may go now (the slowest moved on, or a worker stopped counting)."""
        out = []
        for w, p in list(self.people.waiting.items()):
            if w not in self.people.clocks or self.may_proceed(w, now):
                out.append(self.people.waiting.pop(w))
        return out


class SyncRound:
    """One synchronous round: a gradient from each live worker, then one update with their
    mean (the running sum divided by the round's size)."""

    def __init__(self, numel: int, timeout_s: float):
        self.people = Participants(timeout_s)
        self.grad_sum = torch.zeros(numel)
        self.count = 0

    def add(self, p: Pending) -> None:
        self.people.waiting[p.worker] = p
        self.count += 1

    def complete(self, now: float) -> bool:
        """Every live participant has contributed (and someone has)."""
        if not self.people.waiting:
            return False
        return set(self.people.live(now)) <= set(self.people.waiting)

    def take_mean(self, into: torch.Tensor) -> tuple[int, list[Pending]]:
        """Write the round's mean gradient into ``into``; the round's size and held replies.
        The round starts afresh."""
        n = self.count
        into.copy_(self.grad_sum.div_(n))
        self.grad_sum.zero_()
        out = list(self.people.waiting.values())
        self.people.waiting.clear()
        self.count = 0
        return n, out


# ----------------------------------------------------------------------------------------------
# the interface the request handler calls

class StalenessControl:
    def __init__(self, store, cfg=None, clock: Callable[[], float] = time.monotonic,
                 log: Callable[..., object] | None = None):
        self.store = store
        self.cfg = cfg = cfg or store.cfg
        self.clock = clock
        self.log = log or (lambda kind, **fields: None)
        self.policy = parse_policy(cfg.server.policy)
        sv = cfg.server
        self.dc = DelayCompensation(store.numel, sv.dc_history, sv.dc_lambda, sv.dc_adaptive) \
            if "dc" in self.policy else None
        self.ssp = SSPGate(sv.ssp_slack, sv.worker_timeout_s) if "ssp" in self.policy else None
        self.sync = SyncRound(store.numel, sv.worker_timeout_s) if "sync" in self.policy \
            else None
        gate = self.ssp or self.sync
        self.people: Participants | None = gate.people if gate else None
        # adaptive and dylu count the live workers: the gate's participants, or their own
        self.roster: Participants | None = self.people
        if self.roster is None and {"adaptive", "dylu", "kbatch"} & self.policy:
            self.roster = Participants(sv.worker_timeout_s)
        self.speeds = WorkerSpeeds(cfg.worker.exchange.local_steps) \
            if "dylu" in self.policy else None
        self.age = "age" in self.policy
        self.kb = KBatch(store.numel) if "kbatch" in self.policy else None
        if self.dc is not None:
            self.dc.remember(store.weights, store.version)

    @property
    def dc_fallbacks(self) -> int:
        return self.dc.fallbacks if self.dc else 0

    def waiting(self) -> list[str]:
        return sorted(self.people.waiting) if self.people is not None else []

    # ------------------------------------------------------------------------------------------

    def hello(self, worker: str) -> None:
        now = self.clock()
        if self.roster is not None:
            self.roster.join(worker, now)
        if self.people is not None:
            self.log("join", worker=worker, clock=self.people.clocks[worker],
                     version=self.store.version)
        if self.speeds is not None:
            self.speeds.start(worker, now)

    def bye(self, worker: str) -> None:
        """A worker leaves: it stops counting for ssp, sync, adaptive, dylu and kbatch at
        once."""
        if self.roster is not None:
            self.roster.leave(worker)
        if self.speeds is not None:
            self.speeds.forget(worker)
        if self.people is not None:
            self.log("leave", worker=worker, version=self.store.version)

    def live_workers(self, now: float | None = None) -> int:
        """n of ``adaptive``: server.adaptive_workers, else the live participants (>= 1)."""
        fixed = self.cfg.server.adaptive_workers
        if fixed:
            return fixed
        if self.roster is None:
            return 1
        return max(1, len(self.roster.live(self.clock() if now is None else now)))

    def kbatch_size(self, now: float | None = None) -> int:
        """K of ``kbatch``: server.kbatch, else ceil(server.kbatch_fraction x the live
        participants) (1 without kbatch)."""
        if self.kb is None:
            return 1
        sv = self.cfg.server
        if sv.kbatch:
            return sv.kbatch
        now = self.clock() if now is None else now
        return kbatch_size(None, len(self.roster.live(now)), sv.kbatch_fraction)

    def push(self, p: Pending, base: int, grads) -> Outcome:
        """One validated push (a flat float32 tensor, or ``FlatChunks``: the frames it came
        in) computed from version ``base``. When the outcome is ``deferred`` the reply waits in this object until ``release`` returns
        it; ``p.reply`` then holds the reply fields."""
        now = self.clock()
        if self.sync is not None:
            return self._sync_push(p, base, grads, now)
        if self.roster is not None and self.roster is not self.people:
            self.roster.seen(p.worker, now)
        if self.speeds is not None:
            self.speeds.pushed(p.worker, now)
        out = self.apply(grads, base, now)
        record = {"worker": p.worker, "staleness": out.staleness, "applied": out.applied,
                  "version": out.version, "lr": out.lr}
        if self.kb is not None:        # pushes waiting in the sum (0: this one made an update)
            record["kbatch"] = self.kb.count
        if self.ssp is not None:
            clock = self.ssp.pushed(p.worker, now)
            record.update(clock=clock, min_clock=self.ssp.min_clock(now))
            if not self.ssp.may_proceed(p.worker, now):
                p.reply, p.since, p.clock = out.reply(), now, clock
                self.ssp.people.waiting[p.worker] = p
                self.log("push", deferred=True, **record)
                return Outcome(out.applied, out.staleness, out.version, out.lr, out.reason, True)
        if self.speeds is not None:
            out = Outcome(out.applied, out.staleness, out.version, out.lr, out.reason,
                          local_steps=self._steps_for(p.worker, now))
            record["local_steps"] = out.local_steps
        self.log("push", deferred=False, **record)
        return out

    def _steps_for(self, worker: str, now: float) -> int:
        return self.speeds.answer(worker, now, self.roster.live(now))

    def apply(self, grads, base: int, now: float | None = None) -> Outcome:
        """The asynchronous update: decide (bound, scale, adaptive), compensate (dc), scale
        by age (age), step (kbatch: add to the sum, and step when it has K pushes)."""
        if self.kb is not None:
            return self._kbatch(grads, base, now)
        return self._apply(grads, base, self.store.staleness_of(base), now)

    def _judge(self, grads, base: int, staleness: int, now: float | None):
        """A push's fate: the Outcome of a dropped push, or its gradient ready to apply
        (compensated, scaled by age; never the sender's memory rewritten) and its factor on
        the rate."""
        store, sv = self.store, self.cfg.server
        workers = self.live_workers(now) if "adaptive" in self.policy else 1
        decision = decide(self.policy, staleness, sv.max_staleness, workers,
                          sv.adaptive_threshold, sv.adaptive_decay)
        if not decision.apply:
            return Outcome(False, staleness, store.version, 0.0, decision.reason)
        factor = age_factor(staleness, sv.age_alpha, sv.age_cutoff) if self.age else 1.0
        if factor == 0.0:
            return Outcome(False, staleness, store.version, 0.0,
                           f"staleness {staleness} >= age_cutoff {sv.age_cutoff}")
        grad = grads
        if self.dc is not None or factor != 1.0:
            if isinstance(grad, FlatChunks):  # compensation needs it whole, and rewrites it:
                grad = grad.copy_into(store.grad)   # never the sender's memory
            elif grad is not store.grad:
                store.grad.copy_(grad)
                grad = store.grad
        if self.dc is not None:
            self.dc.compensate(grad, store.weights, base, store.version)
        if factor != 1.0:
            grad.mul_(factor)
        return grad, decision.lr_scale

    def _apply(self, grads, base: int, staleness: int, now: float | None) -> Outcome:
        """One push, one update (every policy but sync, and kbatch with K = 1)."""
        store = self.store
        kept = self._judge(grads, base, staleness, now)
        if isinstance(kept, Outcome):
            return kept
        grad, scale = kept
        lr = server_lr(self.cfg, store.version) * scale
        if store.ahead is not None:
            store.ahead.observe(staleness)
        self._step(lr, grad)
        return Outcome(True, staleness, store.version, lr)

    def _kbatch(self, grads, base: int, now: float | None) -> Outcome:
        """K-batch async SGD (server.kbatch): a kept push joins the sum and is answered at once;
        the K-th makes the update, the mean at the server's rate times the pushes' mean rate
        factor and server.kbatch_lr's, and moves the version by K. Staleness counts updates."""
        store, kb = self.store, self.kb
        now = self.clock() if now is None else now
        k = self.kbatch_size(now)
        staleness = kb.staleness(store.version, base, k)
        if k == 1 and kb.count == 0:       # every push an update: the path without kbatch
            out = self._apply(grads, base, staleness, now)
            if out.applied:
                kb.mark(store.version, 1)
            return out
        kept = self._judge(grads, base, staleness, now)
        if isinstance(kept, Outcome):
            return kept
        grad, scale = kept
        if scale != 1.0 and isinstance(grad, FlatChunks):   # weighted: one tensor
            grad = grad.copy_into(store.grad)
        kb.add(grad, scale)
        if store.ahead is not None:
            store.ahead.observe(staleness)
        if kb.count < k:
            return Outcome(True, staleness, store.version, 0.0)
        count, factor = kb.take_mean(store.grad)
        factor *= kbatch_lr_factor(count, self.cfg.server.kbatch_lr)
        lr = server_lr(self.cfg, store.version) * factor
        self._step(lr, advance=count)
        kb.mark(store.version, count)
        return Outcome(True, staleness, store.version, lr)

    def flush(self) -> int:
        """Apply what is kept but not yet applied (kbatch: a partial sum of fewer than K
        pushes, answered ``applied``) as one update of those pushes, as the server stops and
        before its checkpoint: a kept push is never lost. Returns the pushes applied."""
        kb, store = self.kb, self.store
        if kb is None or kb.count == 0:
            return 0
        count, factor = kb.take_mean(store.grad)
        factor *= kbatch_lr_factor(count, self.cfg.server.kbatch_lr)
        self._step(server_lr(self.cfg, store.version) * factor, advance=count)
        kb.mark(store.version, count)
        return count

    def _step(self, lr: float, grad: torch.Tensor | None = None, advance: int = 1) -> None:
        # look-ahead (server.lookahead) predicts the served weights at the next update's rate
        store = self.store
        store.step(lr, grad, next_lr=None if store.ahead is None else
                   server_lr(self.cfg, store.version + advance))
        store.version += advance - 1      # kbatch: the version counts the pushes applied
        if self.dc is not None:
            self.dc.remember(self.store.weights, self.store.version)

    def _sync_push(self, p: Pending, base: int, grads, now: float) -> Outcome:
        people = self.sync.people
        people.seen(p.worker, now)
        staleness = self.store.staleness_of(base)
        # every gradient joins the round, whatever the bound (policies.decide says so too)
        held = people.waiting.get(p.worker)
        if held is not None:
            # the worker re-sent after reconnecting: answer the new request, keep the gradient
            held.identity, held.request_id, held.op = p.identity, p.request_id, p.op
            return Outcome(True, staleness, self.store.version, deferred=True, repeat=True)
        if isinstance(grads, FlatChunks):
            grads.add_into(self.sync.grad_sum)
        else:
            self.sync.grad_sum.add_(grads)
        p.reply, p.since = {"staleness": staleness, "applied": True}, now
        self.sync.add(p)
        self.log("push", worker=p.worker, staleness=staleness, applied=True,
                 version=self.store.version, deferred=True, round_size=self.sync.count)
        return Outcome(True, staleness, self.store.version, deferred=True)

    def release(self) -> list[Pending]:
        """Held replies that may go now, their ``reply`` fields complete (ssp: the slowest
        moved on or stopped counting; sync: the round is complete and its update applied)."""
        now = self.clock()
        out = []
        if self.ssp is not None:
            for p in self.ssp.release(now):
                p.reply["version"] = self.store.version
                if self.speeds is not None:
                    p.reply["local_steps"] = self._steps_for(p.worker, now)
                self.log("release", worker=p.worker, clock=p.clock,
                         min_clock=self.ssp.min_clock(now), wait_s=round(now - p.since, 6),
                         version=self.store.version)
                out.append(p)
        if self.sync is not None and self.sync.complete(now):
            n, pending = self.sync.take_mean(self.store.grad)
            lr = server_lr(self.cfg, self.store.version)
            self._step(lr)
            self.log("round", size=n, workers=sorted(p.worker for p in pending),
                     version=self.store.version, lr=lr,
                     wait_s=round(now - min(p.since for p in pending), 6))
            for p in pending:
                p.reply["version"] = self.store.version
                out.append(p)
        return out
