"""The server's record of each worker that said hello: its pushes, staleness and replies.

    rec = WorkerStats()
    rec.remember(seq, reply)                 # a push's reply, for answering it again
    rec.staleness[bucket(staleness)] += 1    # the histogram's key
    rec.to_dict(now, timeout_s)              # its entry in stats
"""
from __future__ import annotations

from collections import Counter, OrderedDict

REPLY_MEMORY = 64            # answered pushes remembered per worker, by sequence number
HISTOGRAM_BUCKETS = 1000     # staleness counted exactly up to this; above, in one bucket


def bucket(staleness: int) -> int:
    """The staleness histogram's key: exact up to HISTOGRAM_BUCKETS, that bucket above."""
    return min(staleness, HISTOGRAM_BUCKETS)


class WorkerStats:
    """One worker's record, made when it says hello (and only then: a request under an
    unknown name leaves nothing behind). ``replies``: its last REPLY_MEMORY pushes' replies by
    sequence number, for answering a push sent again without applying it twice."""
    __slots__ = ("pushes", "applied", "dropped", "repeats", "last_seen", "rank", "staleness",
                 "replies")

    def __init__(self):
        self.pushes = self.applied = self.dropped = self.repeats = 0
        self.last_seen = 0.0
        self.rank = None
        self.staleness = Counter()
        self.replies: OrderedDict = OrderedDict()

    def remember(self, seq: int, reply) -> None:
        self.replies[seq] = reply
        self.replies.move_to_end(seq)
        while len(self.replies) > REPLY_MEMORY:
            self.replies.popitem(last=False)

    def to_dict(self, now: float, timeout_s: float) -> dict:
        ago = now - self.last_seen if self.last_seen else None
        return {
            "rank": self.rank, "pushes": self.pushes, "applied": self.applied,
            "dropped": self.dropped, "repeats": self.repeats,
            "last_seen_ago_s": round(ago, 3) if ago is not None else None,
            "alive": ago is not None and ago <= timeout_s,
            "staleness_histogram": {str(k): v for k, v in sorted(self.staleness.items())},
        }
