"""The server's request handling, without sockets: frames in, reply frames out.

    core = ServerCore(store, cfg)
    for identity, frames in core.handle(identity, request_frames): send(identity, frames)
    for identity, frames in core.tick(): send(identity, frames)     # replies time released

Every request is validated in full before anything changes: the schema by
``asgd.core.protocol.check_request`` (header, version, op, fields, frames), then what depends
on the server's state here (the push's version, the parameter list, finiteness). A bad request
gets an error reply and leaves the weights, the optimizer state and the version exactly as they
were. What a push does is ``server.staleness``'s to decide; a policy may hold a reply (ssp,
sync), and ``handle`` then returns no reply for it now and the held one later. Nothing a
client sends can make ``handle`` raise.
"""
from __future__ import annotations

import logging
import time
import traceback
from collections import Counter, defaultdict
from typing import Callable

import numpy as np

from asgd.core import protocol
from asgd.core.protocol import ProtocolError, Request
from server.staleness import Pending, StalenessControl
from server.store import ParameterStore

log = logging.getLogger("asgd.server")

DEFER = None     # what an op returns when its reply is held back


class WorkerStats:
    __slots__ = ("pushes", "applied", "dropped", "last_seen", "rank", "staleness")

    def __init__(self):
        self.pushes = self.applied = self.dropped = 0
        self.last_seen = 0.0
        self.rank = None
        self.staleness = Counter()

    def to_dict(self, now: float) -> dict:
        return {
            "rank": self.rank, "pushes": self.pushes, "applied": self.applied,
            "dropped": self.dropped,
            "last_seen_ago_s": round(now - self.last_seen, 3) if self.last_seen else None,
            "staleness_histogram": {str(k): v for k, v in sorted(self.staleness.items())},
        }


class ServerCore:
    def __init__(self, store: ParameterStore, cfg, shard: tuple[int, int] = (0, 1),
                 metrics=None, clock: Callable[[], float] = time.monotonic):
        self.store, self.cfg, self.shard = store, cfg, shard
        self.max_bytes = int(cfg.server.max_message_mb * 2**20)
        self.metrics = metrics      # a MetricsWriter for per-push records, or None
        self.clock = clock
        self.control = StalenessControl(store, cfg, clock, self._log)
        self.started = clock()
        self.start_version = store.version
        self.dropped = 0
        self.staleness = Counter()
        self.workers: dict[str, WorkerStats] = defaultdict(WorkerStats)
        self.requests = Counter()
        self.errors = Counter()
        self.bytes_in = self.bytes_out = 0
        self._ops = {"hello": self._hello, "pull": self._pull, "push": self._push,
                     "push_pull": self._push, "stats": self._stats, "bye": self._bye}
        assert set(self._ops) == set(protocol.OPS)

    @property
    def applied(self) -> int:
        """Updates applied since this server started (an update is one version)."""
        return self.store.version - self.start_version

    # ------------------------------------------------------------------------------------------

    def handle(self, identity: bytes, frames) -> list[tuple[bytes, list]]:
        """The replies to send now, as (identity, frames) pairs, for one request from
        ``identity``: usually its own; none when a policy holds it (ssp, sync); and any held
        replies this request released. Never raises."""
        out = self.reply_frames(identity, frames)
        replies = [] if out is DEFER else [(identity, out)]
        return replies + self.tick()

    def tick(self) -> list[tuple[bytes, list]]:
        """Held replies that may go now (the slowest moved on, a round completed, a dead
        worker stopped counting)."""
        return [(p.identity, self._answer(p.request_id, p.op, p.reply))
                for p in self.control.release()]

    def reply_frames(self, identity: bytes, frames) -> list | None:
        """Reply frames for one request's frames, or DEFER. Never raises."""
        request_id = None
        self.bytes_in += sum(protocol.frame_nbytes(f) for f in frames)
        try:
            req = protocol.check_request(frames, self.max_bytes)
            request_id = req.id
            self.requests[req.op] += 1
            worker = None
            # observers (the launcher's monitor and its evaluation pulls) are not workers
            if req.op in ("hello", "push", "push_pull") or req.worker in self.workers:
                worker = self.workers[req.worker]
                worker.last_seen = self.clock()
            result = self._ops[req.op](req, worker, identity)
            if result is DEFER:
                return DEFER
            return self._answer(req.id, req.op, *result)
        except ProtocolError as e:
            self.errors[e.code] += 1
            out = protocol.error_frames(e.request_id, e.code, e.message)
        except Exception as e:  # a bug of ours: report it, keep serving
            log.error("internal error: %s\n%s", e, traceback.format_exc())
            self.errors["internal"] += 1
            out = protocol.error_frames(request_id, "internal", repr(e))
        self.bytes_out += sum(protocol.frame_nbytes(f) for f in out)
        return out

    def _answer(self, request_id: int, op: str, fields: dict, tensors=None) -> list:
        """The frames of a successful reply; push_pull's carries the current weights."""
        if op == "push_pull":
            fields = dict(fields, version=self.store.version)
            tensors = self.store.weight_tensors()
        frames = protocol.encode({"ok": True, "id": request_id, **fields}, tensors or [])
        self.bytes_out += sum(protocol.frame_nbytes(f) for f in frames)
        return frames

    # ------------------------------------------------------------------------------------------
    # ops: (request, worker stats, identity) -> (reply fields, reply tensors) or DEFER

    def _hello(self, req: Request, worker: WorkerStats, identity: bytes):
        worker.rank = req.get("rank")
        self.control.hello(req.worker)
        # "tensors" is the model's parameter list; its frames are the current weights, so the
        # header describes its frames as every message's does and a new worker needs no pull.
        return {
            "version": self.store.version,
            "shard": {"index": self.shard[0], "count": self.shard[1]},
            "config": self.training_settings(),
        }, self.store.weight_tensors()

    def _pull(self, req: Request, worker, identity: bytes):
        return {"version": self.store.version}, self.store.weight_tensors()

    def _check_push(self, req: Request) -> tuple[int, list[np.ndarray]]:
        """The push's base version and gradient arrays, checked against this server."""
        base = req.header["version"]
        if base < 0 or base > self.store.version:
            raise ProtocolError("bad_version", f"version {base} is not one this shard has had "
                                f"(current version {self.store.version})", req.id)
        specs = self.store.layout.specs
        if len(req.tensors) != len(specs):
            raise ProtocolError("bad_tensor", f"push has {len(req.tensors)} tensors, the model "
                                f"has {len(specs)}", req.id)
        arrays = []
        for t, s in zip(req.tensors, specs):
            if t.name != s.name:
                problem = f"expected tensor {s.name!r}, got {t.name!r}"
            elif t.dtype != s.dtype:
                problem = f"tensor {t.name!r}: dtype {t.dtype}, expected {s.dtype}"
            elif tuple(t.array.shape) != s.shape:
                problem = (f"tensor {t.name!r}: shape {list(t.array.shape)}, expected "
                           f"{list(s.shape)}")
            elif not np.isfinite(t.array).all():
                problem = f"tensor {t.name!r} has non-finite values"
            else:
                arrays.append(t.array)
                continue
            raise ProtocolError("bad_tensor", problem, req.id)
        return base, arrays

    def _push(self, req: Request, worker: WorkerStats, identity: bytes):
        base, arrays = self._check_push(req)
        out = self.control.push(Pending(identity, req.worker, req.id, req.op), base, arrays)
        if not out.repeat:
            worker.pushes += 1
            worker.staleness[out.staleness] += 1
            self.staleness[out.staleness] += 1
            if out.applied:
                worker.applied += 1
            else:
                self.dropped += 1
                worker.dropped += 1
        return DEFER if out.deferred else (out.reply(), None)

    def _bye(self, req: Request, worker, identity: bytes):
        self.control.bye(req.worker)
        return {"version": self.store.version}, None

    def _stats(self, req: Request, worker, identity: bytes):
        return self.stats(), None

    def _log(self, kind: str, **fields) -> None:
        if self.metrics is not None:
            self.metrics.write(kind, **fields)

    # ------------------------------------------------------------------------------------------

    def training_settings(self) -> dict:
        c = self.cfg.to_dict()
        return {"optimizer": c["optimizer"], "schedule": c["schedule"],
                "policy": c["server"]["policy"], "max_staleness": c["server"]["max_staleness"],
                "model": c["model"], "data": c["data"], "seed": c["run"]["seed"],
                "max_updates": c["run"]["max_updates"]}

    def stats(self) -> dict:
        now = self.clock()
        total = sum(self.staleness.values())
        mean = sum(k * v for k, v in self.staleness.items()) / total if total else 0.0
        return {
            "version": self.store.version,
            "updates_applied": self.applied,
            "updates_dropped": self.dropped,
            "staleness_histogram": {str(k): v for k, v in sorted(self.staleness.items())},
            "staleness_mean": mean,
            "staleness_max": max(self.staleness) if self.staleness else 0,
            "workers": {w: s.to_dict(now) for w, s in self.workers.items()},
            "requests": dict(self.requests),
            "errors": dict(self.errors),
            "waiting": self.control.waiting(),
            "dc_fallbacks": self.control.dc_fallbacks,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "uptime_s": round(now - self.started, 3),
        }
