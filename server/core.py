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

from asgd import protocol
from asgd.protocol import ProtocolError
from server.store import ParameterStore, PushResult

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


class ServerCore:
    def __init__(self, store: ParameterStore, cfg, shard: tuple[int, int] = (0, 1),
                 on_push: Optional[Callable[[str, PushResult], None]] = None):
        self.store, self.cfg, self.shard = store, cfg, shard
        self.max_bytes = int(cfg.server.max_message_mb * 2**20)
        self.on_push = on_push
        self.started = time.time()
        self.applied = self.dropped = 0
        self.staleness = Counter()
        self.workers: dict[str, WorkerStats] = defaultdict(WorkerStats)
        self.requests = Counter()
        self.errors = Counter()
        self.bytes_in = self.bytes_out = 0
        self._ops = {"hello": self._hello, "pull": self._pull, "push": self._push,
                     "push_pull": self._push_pull, "stats": self._stats}

    # ------------------------------------------------------------------------------------------

    def handle(self, identity: bytes, frames) -> list[tuple[bytes, list]]:
        """The replies to send now, as (identity, frames) pairs, for one request from
        ``identity``. Usually one pair; none when a policy defers the reply (ssp, sync) and
        several when this request releases deferred ones. Never raises."""
        return [(identity, self.handle_frames(frames))]

    def tick(self) -> list[tuple[bytes, list]]:
        """Replies released by the passage of time (a dead worker stops counting)."""
        return []

    def handle_frames(self, frames) -> list:
        """Reply frames for one request's frames. Never raises."""
        nbytes = sum(_nbytes(f) for f in frames)
        self.bytes_in += nbytes
        request_id = None
        try:
            if nbytes > self.max_bytes:
                raise ProtocolError("too_large", f"message of {nbytes} bytes exceeds "
                                    f"{self.max_bytes} (server.max_message_mb)")
            header = protocol.decode_header(frames[0]) if frames else None
            if header is None:
                raise ProtocolError("bad_request", "empty message")
            request_id = header.get("id")
            if not isinstance(request_id, int) or isinstance(request_id, bool):
                request_id = None
                raise ProtocolError("bad_request", "'id' must be an integer")
            self._check_header(header)
            _, tensors = protocol.decode(frames, self.max_bytes)
            op = header["op"]
            self.requests[op] += 1
            worker = None
            if op != "stats":  # observers (the launcher's monitor) are not workers
                worker = self.workers[header["worker"]]
                worker.last_seen = time.time()
            reply_header, reply_tensors = self._ops[op](header, tensors, worker)
            reply = {"ok": True, "id": request_id, **reply_header}
            out = protocol.encode(reply, reply_tensors)
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

    def _push(self, h, tensors, worker):
        base, arrays = self._validate_push(h, tensors)
        result = self.store.push(arrays, base)
        worker.pushes += 1
        worker.staleness[result.staleness] += 1
        self.staleness[result.staleness] += 1
        if result.applied:
            self.applied += 1
            worker.applied += 1
        else:
            self.dropped += 1
            worker.dropped += 1
        if self.on_push is not None:
            self.on_push(h["worker"], result)
        reply = {"version": result.version, "staleness": result.staleness,
                 "applied": result.applied}
        if result.reason:
            reply["reason"] = result.reason
        return reply, []

    def _push_pull(self, h, tensors, worker):
        reply, _ = self._push(h, tensors, worker)
        reply["version"] = self.store.version
        return reply, self.store.weight_tensors()

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
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "uptime_s": round(now - self.started, 3),
        }
