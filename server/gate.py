"""Who may go on: the bookkeeping of stale synchronous parallel and of synchronous rounds.

Plain logic over worker ids, clocks and times; no sockets, no frames. ServerCore asks it which
deferred replies to release after each push and on each tick.

A *participant* is a worker that said hello or pushed and has not said bye. It is *live* while
it has a reply waiting (it is blocked on us) or it was heard from within ``timeout_s``; a worker
that stays silent longer stops counting, so a dead worker never stalls the others.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from asgd.policies import ssp_may_proceed


@dataclass
class Pending:
    """A reply held back: who to answer and what to tell them."""
    identity: bytes
    worker: str
    request_id: int
    op: str
    reply: dict
    since: float
    clock: int = 0


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

    def hold(self, p: Pending) -> None:
        self.people.waiting[p.worker] = p

    def release(self, now: float) -> list[Pending]:
        """Held replies that may go now (the slowest moved on, or a worker stopped counting)."""
        out = []
        for w, p in list(self.people.waiting.items()):
            if w not in self.people.clocks or self.may_proceed(w, now):
                out.append(self.people.waiting.pop(w))
        return out


class SyncRound:
    """One synchronous round: a gradient from each live worker, then one averaged update."""

    def __init__(self, timeout_s: float):
        self.people = Participants(timeout_s)
        self.grad_sum: Any = None      # flat accumulator, allocated by the caller
        self.count = 0

    def contributed(self) -> set[str]:
        return set(self.people.waiting)

    def add(self, p: Pending) -> bool:
        """Hold ``p`` in this round; False if its worker already has a gradient in it."""
        if p.worker in self.people.waiting:
            return False
        self.people.waiting[p.worker] = p
        self.count += 1
        return True

    def complete(self, now: float) -> bool:
        """Every live participant has contributed (and someone has)."""
        if not self.people.waiting:
            return False
        return set(self.people.live(now)) <= self.contributed()

    def take(self) -> list[Pending]:
        out = list(self.people.waiting.values())
        self.people.waiting.clear()
        self.count = 0
        return out
