"""K-batch asynchronous SGD's state on the server (Dutta, Joshi, Ghosh, Dube, Nagpurkar 2018,
"Slow and Stale Gradients Can Win the Race"): the running sum of the pushes kept since the last
update, and the versions each update ended at, to count a push's staleness in updates.

    kb = KBatch(numel)
    kb.staleness(store.version, base, k)       # K-push updates applied after version ``base``
    kb.add(grad)                               # a kept push joins the sum (any worker, any version)
    if kb.count >= k:
        count, factor = kb.take_mean(store.grad)   # the mean, and the rate's factor (scale)
        ...                                        # one optimizer step; the version moves by count
        kb.mark(store.version, count)

No reply waits: every push is answered at once with the current weights (a push that waits in
the sum is answered ``applied``: it is kept, and counts in the next update). Unlike ``sync``
(``server.staleness.SyncRound``: one push from every live worker, replies held), any K pushes
make an update, several from one fast worker included.

The version moves by the number of pushes an update applied (K), not by 1: ``run.max_updates``,
the schedule (cosine by version) and the summary's ``updates_applied`` then count pushes applied,
that is samples, at any K: 3,000 at batch 100 is 300,000 samples whatever K is, and one worker
(K = 1) is the run without ``kbatch``, bit for bit. The optimizer steps are about
``updates_applied / K``. A push's staleness, what the bound, ``scale``, ``adaptive`` and ``age``
judge it by, counts updates (K-push steps) applied since its base version: about (n - 1) / K
with n workers. The pushes of a partial sum are applied as one update of their mean when the
server stops, before its checkpoint (``StalenessControl.flush``): a kept push is never lost.
A periodic checkpoint does not hold them (a server killed without warning loses at most
K - 1 pushes, answered ``applied``).
"""
from __future__ import annotations

import bisect
import math

import torch

MARKS = 4096   # update versions kept to count staleness; an older base is estimated


class KBatch:
    def __init__(self, numel: int):
        self.grad_sum = torch.zeros(numel)
        self.count = 0            # pushes in the sum
        self.weight = 0.0         # the sum of their rate factors (1 each without scale)
        self.marks: list[int] = []   # the version after each update, ascending
        self.known_from = 0          # every update after this version is in marks
        self.updates = 0          # K-push updates applied since the server started

    def staleness(self, version: int, base: int, k: int) -> int:
        """Updates applied after version ``base`` (the current version ``version``). A base
        older than the updates kept (before a restart, or MARKS updates ago) adds its
        distance in versions over ``k``."""
        if base >= version:
            return 0
        known = self.known_from if self.marks else version   # no update yet: all before us
        newer = len(self.marks) - bisect.bisect_right(self.marks, base)
        if base < known:
            newer += math.ceil((known - base) / max(1, k))
        return newer

    def add(self, grad, weight: float = 1.0) -> None:
        """Add a kept push (a flat tensor, or ``FlatChunks``) to the sum, times ``weight`` (its
        rate factor: ``scale``, ``adaptive``); the sender's memory is only read."""
        if hasattr(grad, "add_into"):
            if weight != 1.0:
                raise ValueError("a weighted push must be one tensor (copy its frames first)")
            grad.add_into(self.grad_sum)
        elif weight == 1.0:
            self.grad_sum.add_(grad)
        else:
            self.grad_sum.add_(grad, alpha=weight)
        self.count += 1
        self.weight += weight

    def take_mean(self, into: torch.Tensor) -> tuple[int, float]:
        """Write the update's gradient into ``into``: the sum over the pushes' weights (their
        mean when every weight is 1); returns the pushes in it and the factor on the rate (the
        mean weight: ``scale``'s 1/staleness averaged over the K pushes). The sum starts afresh."""
        count, weight = self.count, self.weight
        into.copy_(self.grad_sum.div_(weight))
        self.grad_sum.zero_()
        self.count, self.weight = 0, 0.0
        return count, weight / count

    def mark(self, version: int, count: int) -> None:
        """An update of ``count`` pushes was applied; the version is now ``version``."""
        if not self.marks:
            self.known_from = version - count    # where this server's updates start
        self.updates += 1
        self.marks.append(version)
        if len(self.marks) > 2 * MARKS:
            self.known_from = self.marks[-MARKS - 1]
            del self.marks[:-MARKS]
