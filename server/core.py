"""The server's request handling, without sockets: frames in, reply frames out.

    core = ServerCore(store, cfg)
    reply_frames = core.handle(frames)          # frames of one request (no routing identity)

Every request is validated in full before anything changes: header keys and types, protocol
version, op, tensor names, dtypes, shapes, frame sizes and finiteness. A bad request gets an
error reply (see asgd.protocol.ERROR_CODES) and leaves the weights, the optimizer state and the
version exactly as they were. Nothing a client sends can make ``handle`` raise.
"""
from __future__ import annotations

import logging
import time
import traceback
from collections import Counter, defaultdict
from typing import Callable, Optional

import numpy as np

import torch

from asgd import protocol
from asgd.policies import parse_policy
from asgd.protocol import ProtocolError
from server.gate import Pending, Participants, SSPGate, SyncRound
from asgd.optim import scheduled_lr
from server.store import ParameterStore

log = logging.getLogger("asgd.server")

MAX_WORKER_ID = 256


def _nbytes(frame) -> int:
    if hasattr(frame, "buffer"):  # zmq.Frame
        return frame.buffer.nbytes
    return memoryview(frame).nbytes


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
            "dropped": self.dropped, "last_seen": self.last_seen,
            "last_seen_ago_s": round(now - self.last_seen, 3) if self.last_seen else None,
            "staleness_histogram": {str(k): v for k, v in sorted(self.staleness.items())},
        }


class _Deferred(Exception):
    """Raised by an op whose reply a policy holds back."""


class ServerCore:
    def __init__(self, store: ParameterStore, cfg, shard: tuple[int, int] = (0, 1),
                 metrics=None, clock: Callable[[], float] = time.monotonic):
        self.store, self.cfg, self.shard = store, cfg, shard
        self.max_bytes = int(cfg.server.max_message_mb * 2**20)
        self.metrics = metrics      # a MetricsWriter for per-push records, or None
        self.clock = clock
        self.policy = parse_policy(cfg.server.policy)
        sv = cfg.server
        self.ssp = SSPGate(sv.ssp_slack, sv.worker_timeout_s) if "ssp" in self.policy else None
        self.sync = SyncRound(sv.worker_timeout_s) if "sync" in self.policy else None
        self.people: Optional[Participants] = (self.ssp or self.sync).people \
            if (self.ssp or self.sync) else None
        self._released: list[tuple[bytes, list]] = []
        self._identity = b""
        self.started = time.time()
        self.applied = self.dropped = 0
        self.staleness = Counter()
        self.workers: dict[str, WorkerStats] = defaultdict(WorkerStats)
        self.requests = Counter()
        self.errors = Counter()
        self.bytes_in = self.bytes_out = 0
        self._ops = {"hello": self._hello, "pull": self._pull, "push": self._push,
                     "push_pull": self._push_pull, "stats": self._stats, "bye": self._bye}

    # ------------------------------------------------------------------------------------------

    def handle(self, identity: bytes, frames) -> list[tuple[bytes, list]]:
        """The replies to send now, as (identity, frames) pairs, for one request from
        ``identity``. Usually one pair; none when a policy defers the reply (ssp, sync) and
        several when this request releases deferred ones. Never raises."""
        self._identity = identity
        out = self.handle_frames(frames)
        replies = [] if out is None else [(identity, out)]
        replies += self._released
        self._released = []
        return replies

    def tick(self) -> list[tuple[bytes, list]]:
        """Replies released by the passage of time (a dead worker stops counting)."""
        self._release()
        out, self._released = self._released, []
        return out

    def handle_frames(self, frames) -> list | None:
        """Reply frames for one request's frames (None when the reply is deferred).
        Never raises."""
        nbytes = sum(_nbytes(f) for f in frames)
        self.bytes_in += nbytes
        request_id = None
        try:
            header = protocol.decode_header(frames[0]) if frames else None
            if header is None:
                raise ProtocolError("bad_request", "empty message")
            request_id = header.get("id")
            if not isinstance(request_id, int) or isinstance(request_id, bool):
                request_id = None
                raise ProtocolError("bad_request", "'id' must be an integer")
            if nbytes > self.max_bytes:
                raise ProtocolError("too_large", f"message of {nbytes} bytes exceeds "
                                    f"{self.max_bytes} (server.max_message_mb)")
            self._check_header(header)
            _, tensors = protocol.decode(frames, self.max_bytes)
            op = header["op"]
            self.requests[op] += 1
            worker = None
            # observers (the launcher's monitor and its evaluation pulls) are not workers
            if op in ("hello", "push", "push_pull") or header["worker"] in self.workers:
                worker = self.workers[header["worker"]]
                worker.last_seen = time.time()
            reply_header, reply_tensors = self._ops[op](header, tensors, worker)
            reply = {"ok": True, "id": request_id, **reply_header}
            out = protocol.encode(reply, reply_tensors)
        except _Deferred:
            return None
        except ProtocolError as e:
            self.errors[e.code] += 1
            out = [protocol.pack_header(protocol.error_reply(request_id, e.code, e.message))]
        except Exception as e:  # a bug of ours: report it, keep serving
            log.error("internal error: %s\n%s", e, traceback.format_exc())
            self.errors["internal"] += 1
            out = [protocol.pack_header(protocol.error_reply(request_id, "internal", repr(e)))]
        self.bytes_out += sum(_nbytes(f) for f in out)
        return out

    def _check_header(self, h: dict) -> None:
        v = h.get("v")
        if not isinstance(v, int) or isinstance(v, bool):
            raise ProtocolError("bad_request", "'v' (protocol version) must be an integer")
        if v != protocol.PROTOCOL_VERSION:
            raise ProtocolError("bad_version", f"protocol version {v} is not supported "
                                f"(this server speaks {protocol.PROTOCOL_VERSION})")
        op = h.get("op")
        if not isinstance(op, str):
            raise ProtocolError("bad_request", "'op' must be a string")
        if op not in self._ops:
            raise ProtocolError("unknown_op", f"unknown op {op!r} (known: {', '.join(self._ops)})")
        w = h.get("worker")
        if not isinstance(w, str) or not w or len(w) > MAX_WORKER_ID:
            raise ProtocolError("bad_request", f"'worker' must be a non-empty string of at most "
                                f"{MAX_WORKER_ID} characters")

    # ------------------------------------------------------------------------------------------
    # ops: (header, tensors, worker stats) -> (reply header, reply tensors)

    def _no_tensors(self, op, tensors):
        if tensors:
            raise ProtocolError("bad_request", f"{op} takes no tensors")

    def _hello(self, h, tensors, worker):
        self._no_tensors("hello", tensors)
        rank = h.get("rank")
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 0):
            raise ProtocolError("bad_request", "'rank' must be a non-negative integer")
        worker.rank = rank
        if self.people is not None:
            self.people.join(h["worker"], self.clock())
            self._log("join", worker=h["worker"], clock=self.people.clocks[h["worker"]],
                      version=self.store.version)
        # "tensors" is the model's parameter list; its frames are the current weights, so the
        # header describes its frames as every message's does and a new worker needs no pull.
        return {
            "version": self.store.version,
            "shard": {"index": self.shard[0], "count": self.shard[1]},
            "config": self.training_settings(),
        }, self.store.weight_tensors()

    def _pull(self, h, tensors, worker):
        self._no_tensors("pull", tensors)
        return {"version": self.store.version}, self.store.weight_tensors()

    def _validate_push(self, h, tensors) -> tuple[int, list[np.ndarray]]:
        base = h.get("version")
        if not isinstance(base, int) or isinstance(base, bool):
            raise ProtocolError("bad_request", "'version' must be an integer")
        if base < 0 or base > self.store.version:
            raise ProtocolError("bad_version", f"version {base} is not one this shard has had "
                                f"(current version {self.store.version})")
        encoding = h.get("encoding")
        if encoding not in (None, "none"):
            raise ProtocolError("bad_request", f"unknown encoding {encoding!r}")
        specs = self.store.specs
        if len(tensors) != len(specs):
            raise ProtocolError("bad_tensor", f"push has {len(tensors)} tensors, the model has "
                                f"{len(specs)}")
        arrays = []
        for t, s in zip(tensors, specs):
            if t.name != s["name"]:
                raise ProtocolError("bad_tensor", f"expected tensor {s['name']!r}, got {t.name!r}")
            if t.dtype != s["dtype"]:
                raise ProtocolError("bad_tensor", f"tensor {t.name!r}: dtype {t.dtype}, "
                                    f"expected {s['dtype']}")
            if list(t.array.shape) != s["shape"]:
                raise ProtocolError("bad_tensor", f"tensor {t.name!r}: shape "
                                    f"{list(t.array.shape)}, expected {s['shape']}")
            if not np.isfinite(t.array).all():
                raise ProtocolError("bad_tensor", f"tensor {t.name!r} has non-finite values")
            arrays.append(t.array)
        return base, arrays

    def _count(self, worker: WorkerStats, staleness: int, applied: bool) -> None:
        worker.pushes += 1
        worker.staleness[staleness] += 1
        self.staleness[staleness] += 1
        if applied:
            worker.applied += 1
        else:
            self.dropped += 1
            worker.dropped += 1

    def _push(self, h, tensors, worker, op="push"):
        base, arrays = self._validate_push(h, tensors)
        if self.sync is not None:
            return self._sync_push(h, arrays, base, worker, op)
        result = self.store.push(arrays, base)
        self._count(worker, result.staleness, result.applied)
        self.applied += result.applied
        reply = {"version": result.version, "staleness": result.staleness,
                 "applied": result.applied}
        if result.reason:
            reply["reason"] = result.reason
        record = {"worker": h["worker"], "staleness": result.staleness,
                  "applied": result.applied, "version": result.version, "lr": result.lr}
        if self.ssp is not None:
            now = self.clock()
            clock = self.ssp.pushed(h["worker"], now)
            record.update(clock=clock, min_clock=self.ssp.min_clock(now))
            if not self.ssp.may_proceed(h["worker"], now):
                self._log("push", deferred=True, **record)
                self.ssp.hold(Pending(self._identity, h["worker"], h["id"], op, reply, now,
                                      clock))
                raise _Deferred
            self._log("push", deferred=False, **record)
            self._release()   # this push may have moved the slowest clock
        else:
            self._log("push", deferred=False, **record)
        return reply, []

    def _push_pull(self, h, tensors, worker):
        reply, _ = self._push(h, tensors, worker, op="push_pull")
        reply["version"] = self.store.version
        return reply, self.store.weight_tensors()

    def _bye(self, h, tensors, worker):
        """A worker leaves: it stops counting for ssp and sync at once."""
        self._no_tensors("bye", tensors)
        if self.people is not None:
            self.people.leave(h["worker"])
            self._log("leave", worker=h["worker"], version=self.store.version)
            self._release()
        return {"version": self.store.version}, []

    # ------------------------------------------------------------------------------------------
    # deferred replies: ssp and sync

    def _sync_push(self, h, arrays, base, worker, op):
        now = self.clock()
        self.sync.people.seen(h["worker"], now)
        staleness = self.store.staleness_of(base)
        held = self.sync.people.waiting.get(h["worker"])
        if held is not None:
            # the worker re-sent after reconnecting: answer the new request, keep the gradient
            held.identity, held.request_id, held.op = self._identity, h["id"], op
            raise _Deferred
        if self.sync.grad_sum is None:
            self.sync.grad_sum = torch.zeros(self.store.numel)
        self.store.add_grad(arrays, self.sync.grad_sum)
        self._count(worker, staleness, True)
        self.sync.add(Pending(self._identity, h["worker"], h["id"], op,
                              {"staleness": staleness, "applied": True}, now))
        self._log("push", worker=h["worker"], staleness=staleness, applied=True,
                  version=self.store.version, deferred=True, round_size=self.sync.count)
        self._release()
        raise _Deferred

    def _release(self) -> None:
        """Move every reply that may go now to ``self._released``."""
        now = self.clock()
        if self.ssp is not None:
            for p in self.ssp.release(now):
                p.reply["version"] = self.store.version
                self._log("release", worker=p.worker, clock=p.clock,
                          min_clock=self.ssp.min_clock(now), wait_s=round(now - p.since, 6),
                          version=self.store.version)
                self._answer(p)
        if self.sync is not None and self.sync.complete(now):
            n = self.sync.count
            self.store.flat.grad.copy_(self.sync.grad_sum.div_(n))
            self.sync.grad_sum.zero_()
            lr = scheduled_lr(self.cfg, self.store.version)
            self.store.apply_flat_grad(lr)
            self.applied += 1
            pending = self.sync.take()
            self._log("round", size=n, workers=sorted(p.worker for p in pending),
                      version=self.store.version, lr=lr,
                      wait_s=round(now - min(p.since for p in pending), 6))
            for p in pending:
                p.reply["version"] = self.store.version
                self._answer(p)

    def _answer(self, p: Pending) -> None:
        reply = {"ok": True, "id": p.request_id, **p.reply}
        tensors = self.store.weight_tensors() if p.op == "push_pull" else []
        frames = protocol.encode(reply, tensors)
        self.bytes_out += sum(_nbytes(f) for f in frames)
        self._released.append((p.identity, frames))

    def _log(self, kind: str, **fields) -> None:
        if self.metrics is not None:
            self.metrics.write(kind, **fields)

    def _stats(self, h, tensors, worker):
        self._no_tensors("stats", tensors)
        return self.stats(), []

    # ------------------------------------------------------------------------------------------

    def training_settings(self) -> dict:
        c = self.cfg
        return {"optimizer": c.to_dict()["optimizer"], "schedule": c.to_dict()["schedule"],
                "policy": c.server.policy, "max_staleness": c.server.max_staleness,
                "model": c.to_dict()["model"], "data": c.to_dict()["data"],
                "seed": c.run.seed, "max_updates": c.run.max_updates}

    def stats(self) -> dict:
        now = time.time()
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
            "waiting": sorted(self.people.waiting) if self.people is not None else [],
            "dc_fallbacks": self.store.dc_fallbacks,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "uptime_s": round(now - self.started, 3),
        }
