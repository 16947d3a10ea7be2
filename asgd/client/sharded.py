"""A sharded server (``server.shards`` > 1) spoken to as one: ``ShardedClient`` sends each
shard its range of every flat-form request and awaits the replies under one deadline;
``connect_client`` picks ``Client`` or ``ShardedClient`` for one endpoint or several.

    client = connect_client("tcp://a:5555,tcp://b:5555", worker="w0")
    info, weights = client.hello(rank=0)          # every shard's, merged and in order
"""
from __future__ import annotations

import itertools
import time

import numpy as np
import zmq

from asgd.client.common import Push, ServerError, ServerTimeout, model_frames
from asgd.client.ops import Client
from asgd.client.samehost import LinkFace, SameHost
from asgd.core import auth, protocol


def connect_client(endpoints, worker: str, timeout_s: float = 10.0, context=None,
                   curve: auth.ClientKeys | None = None, spin_us: float = 0.0,
                   local: bool = True):
    """A ``Client`` for one endpoint, a ``ShardedClient`` for several (a list, or one string
    of comma-separated endpoints). ``local``: use a server's local socket when it offers
    one (shared-memory requests without ZeroMQ)."""
    if isinstance(endpoints, str):
        endpoints = [e.strip() for e in endpoints.split(",") if e.strip()]
    if len(endpoints) == 1:
        return Client(endpoints[0], worker, timeout_s, context, curve, spin_us, local)
    return ShardedClient(endpoints, worker, timeout_s, context, curve, spin_us, local)


class ShardedClient(LinkFace):
    """The shards of one sharded server, spoken to as one: each flat-form request goes to
    every shard at once (its range of the gradient, the weights of its range back into the
    same range of ``out``), and the replies are awaited together.

    The shards are ordered by their index once ``hello`` (or ``stats``) has told it; each
    keeps its own version: ``versions`` holds the one of each shard whose weights were last
    loaded, and a push carries each shard its own (``send_push_pull_flat`` takes the list).
    A merged reply's ``version`` is the lowest, ``staleness`` the highest, ``applied`` true
    when every shard applied it. Per-parameter requests are not offered: a shard of several
    refuses them."""

    def __init__(self, endpoints: list[str], worker: str, timeout_s: float = 10.0,
                 context: zmq.Context | None = None, curve: auth.ClientKeys | None = None,
                 spin_us: float = 0.0, local: bool = True):
        if len(set(endpoints)) != len(endpoints):
            raise ValueError(f"the same endpoint twice among {endpoints}")
        # every shard has the same allow-list and key pair: one set of client keys for all;
        # one same-host link: every shard maps the one segment
        self.link = SameHost(local)
        self.clients = [Client(e, worker, timeout_s, context, curve, spin_us, link=self.link)
                        for e in endpoints]
        self.endpoint = ",".join(endpoints)
        self.worker = worker
        self.ranges: list[tuple[int, int]] | None = None
        self.numel = None
        self.versions: list[int] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[str, list[int]]] = {}

    # --- plumbing shared with Client -----------------------------------------------------------

    @property
    def timeout_s(self) -> float:
        return self.clients[0].timeout_s

    @timeout_s.setter
    def timeout_s(self, value: float) -> None:
        for c in self.clients:
            c.timeout_s = value

    def parts(self, numel: int) -> list[tuple[int, int]]:
        """Each shard's range of the flat vector, in shard order."""
        self._learn()
        if self.numel != numel:
            raise RuntimeError(f"the shards hold {self.numel} values, this model {numel}")
        return list(self.ranges)

    def base(self) -> list[int]:
        """What a push says it was computed on: each shard's version of its range."""
        return list(self.versions)

    @property
    def bytes_sent(self) -> int:
        return sum(c.bytes_sent for c in self.clients)

    @property
    def bytes_received(self) -> int:
        return sum(c.bytes_received for c in self.clients)

    def reconnect(self, endpoints=None):
        """New sockets; ``endpoints`` (a list, or comma-separated): the shards moved there
        (restarted on new ports), in the same number; the next request must be a hello."""
        if isinstance(endpoints, str):
            endpoints = [e.strip() for e in endpoints.split(",") if e.strip()]
        if endpoints is not None and len(endpoints) != len(self.clients):
            raise ValueError(f"{len(endpoints)} endpoints for {len(self.clients)} shards")
        for i, c in enumerate(self.clients):
            c.reconnect(None if endpoints is None else endpoints[i])
        if endpoints is not None and ",".join(endpoints) != self.endpoint:
            self.endpoint, self.ranges, self.numel = ",".join(endpoints), None, None

    def close(self):
        for c in self.clients:
            c.close()
        self.link.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- which shard is which --------------------------------------------------------------------

    def _order(self, heads: list[dict]) -> list[dict]:
        """Check the shards' own account of themselves (``shard``: index, count, start,
        stop) and put the clients in index order; ``heads`` reordered the same way."""
        count = len(self.clients)
        shards = [h.get("shard") or {} for h in heads]
        where = {c.endpoint: s for c, s in zip(self.clients, shards)}
        if any(s.get("count") != count for s in shards):
            raise ServerError("bad_request", f"{count} endpoints given, but the servers say "
                              f"they are shards of {[s.get('count') for s in shards]}: give "
                              "every shard's endpoint once")
        if sorted(s.get("index") for s in shards) != list(range(count)):
            raise ServerError("bad_request", "the servers' shard indexes are "
                              f"{[s.get('index') for s in shards]}: each of 0-{count - 1} "
                              "must be there once")
        order = sorted(range(count), key=lambda i: shards[i]["index"])
        self.clients = [self.clients[i] for i in order]
        heads = [heads[i] for i in order]
        ranges = [(where[c.endpoint]["start"], where[c.endpoint]["stop"]) for c in self.clients]
        pos = 0
        for i, (lo, hi) in enumerate(ranges):
            if lo != pos or hi <= lo:
                raise ServerError("bad_request", f"shard {i} holds values {lo}-{hi}; expected "
                                  f"it to start at {pos}: the shards do not fit together")
            pos = hi
        self.ranges, self.numel = ranges, pos
        return heads

    def _learn(self) -> None:
        if self.ranges is None:
            self.stats()

    # --- requests to every shard -----------------------------------------------------------------

    def _gather(self, op: str, rids: list[int], out: np.ndarray | None,
                timeout_s: float | None) -> list[dict]:
        """Every shard's reply (its weights into its range of ``out``), under one deadline;
        the first error is raised once every reply has been taken or timed out."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        heads, error = [], None
        for c, rid, (lo, hi) in zip(self.clients, rids, self.ranges):
            try:
                heads.append(c.finish(rid, None if out is None else out[lo:hi],
                                      max(0.001, deadline - time.monotonic())))
            except (ServerError, ServerTimeout) as e:
                heads.append(None)
                error = error or e
        if error is not None:
            raise error
        return heads

    def _merge(self, token: int, heads: list[dict]) -> dict:
        self.versions = [h["version"] for h in heads]
        head = dict(heads[0], id=token, version=min(self.versions), versions=self.versions)
        if any("staleness" in h for h in heads):
            head["staleness"] = max(h.get("staleness", 0) for h in heads)
            head["staleness_per_shard"] = [h.get("staleness", 0) for h in heads]
        if any("applied" in h for h in heads):
            head["applied"] = all(h.get("applied", False) for h in heads)
        return head

    def hello(self, rank: int | None = None, timeout_s: float | None = None, shm=None,
              tensors=(), **fields) -> tuple[dict, list[protocol.Tensor]]:
        """Hello to every shard (offering each the same segment: each reads and writes only
        its own range of it; ``tensors`` and ``settings`` as ``Client.hello``: every shard
        gets the whole model and keeps its range). The merged answer has ``tensors``: the
        model's parameter list, ``flat``: true, ``shards``: each shard's ``shard`` map; the
        weights come back as flat chunks in order (every shard's range, concatenated)."""
        tensors = model_frames(tensors)          # once, for every shard
        self.link.begin()
        answers = [c.hello(rank, timeout_s, shm, tensors, **fields) for c in self.clients]
        self.link.settle()
        by_endpoint = {c.endpoint: w for c, (_, w) in zip(self.clients, answers)}
        heads = self._order([h for h, _ in answers])
        weights = [t for c in self.clients for t in by_endpoint[c.endpoint]]
        params = [h.get("params") for h in heads]
        if any(p != params[0] for p in params):
            raise ServerError("bad_request", "the shards serve different models")
        info = self._merge(0, heads)
        info.update(tensors=params[0] or [], flat=True,
                    shards=[h.get("shard") for h in heads])
        return info, weights

    def send_push_pull_flat(self, version, grad: np.ndarray | None = None, *,
                            slot: int | None = None, encoding: str = "none",
                            weights: str = "none", encoded=None, op: str = "push_pull",
                            seq: int | None = None) -> int:
        """As ``Client.send_push_pull_flat``, to every shard: ``version`` is the list of the
        shards' versions the gradient was computed on (or one int for all); ``grad`` the whole
        flat gradient (each shard gets its range) or ``slot`` in the shared segment;
        ``encoded``: one (meta, arrays) per shard, each of its range."""
        self._learn()
        versions = version if isinstance(version, (list, tuple)) else [version] * len(self.ranges)
        rids = []
        for i, (c, (lo, hi)) in enumerate(zip(self.clients, self.ranges)):
            if slot is not None:
                rids.append(c.send_push_pull_flat(versions[i], slot=slot, op=op, seq=seq))
            elif encoded is not None:
                rids.append(c.send_push_pull_flat(versions[i], encoded=encoded[i],
                                                  weights=weights, op=op, seq=seq))
            else:
                rids.append(c.send_push_pull_flat(versions[i], grad[lo:hi], encoding=encoding,
                                                  weights=weights, op=op, seq=seq))
        token = next(self._ids)
        self._pending[token] = (op, rids)
        return token

    def send_push(self, push: Push) -> int:
        """As ``Client.send_push``: ``push.encoded`` holds one encoding per shard's range."""
        return self.send_push_pull_flat(push.version, push.grad, slot=push.slot,
                                        weights=push.weights, encoded=push.encoded,
                                        op=push.op, seq=push.seq)

    def finish(self, token: int, out: np.ndarray | None = None,
               timeout_s: float | None = None) -> dict:
        op, rids = self._pending.pop(token)
        return self._merge(token, self._gather(op, rids, out, timeout_s))

    def push_pull_flat(self, version, grad: np.ndarray | None, out: np.ndarray, **kw) -> dict:
        return self.finish(self.send_push_pull_flat(version, grad, **kw), out)

    def push_flat(self, version, grad: np.ndarray | None, **kw) -> dict:
        return self.finish(self.send_push_pull_flat(version, grad, op="push", **kw))

    def pull_flat(self, out: np.ndarray, weights: str = "none",
                  timeout_s: float | None = None) -> int:
        """Every shard's weights into its range of ``out``; the lowest version."""
        self._learn()
        rids = [c.send_pull_flat(weights) for c in self.clients]
        return self._merge(0, self._gather("pull", rids, out, timeout_s))["version"]

    def bye(self) -> dict:
        heads, error = [], None
        for c in self.clients:
            try:
                heads.append(c.bye())
            except (ServerError, ServerTimeout) as e:
                error = error or e
        if error is not None:
            raise error
        return {"ok": True, "version": min(h["version"] for h in heads)}

    def stats(self) -> dict:
        """Every shard's stats, merged: the lowest version and update count, sums of bytes,
        requests and errors, the highest staleness; ``shards``: each shard's own."""
        heads = [c.stats() for c in self.clients]
        if self.ranges is None:
            heads = self._order(heads)
        out = dict(heads[0])
        for k in ("version", "updates_applied"):
            out[k] = min(h.get(k, 0) for h in heads)
        for k in ("updates_dropped", "staleness_max"):
            out[k] = max(h.get(k, 0) for h in heads)
        for k in ("bytes_in", "bytes_out", "shm_bytes_in", "shm_bytes_out", "dc_fallbacks"):
            out[k] = sum(h.get(k, 0) for h in heads)
        for k in ("requests", "errors"):
            total: dict = {}
            for h in heads:
                for name, n in (h.get(k) or {}).items():
                    total[name] = total.get(name, 0) + n
            out[k] = total
        out["staleness_mean"] = sum(h.get("staleness_mean", 0.0) for h in heads) / len(heads)
        out["peak_rss_mb"] = round(sum(h.get("peak_rss_mb") or 0 for h in heads), 1)
        out["shards"] = heads
        return out
