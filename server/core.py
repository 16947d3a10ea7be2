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

A gradient arrives in one of three forms, and the weights go back the same way:
per parameter (a frame each, the protocol's first form), flat (the whole vector in chunks of a
few MiB, optionally encoded: fp16, bf16, int8, top-k), or in the worker's shared-memory
segment (same host: only the header travels). Each is copied at most once, into the store's
gradient buffer (shared memory: read in place), checked for NaN and Inf block by block while
in cache, and applied by one fused optimizer step. Large replies are sent without copying from
the store's snapshot pool; small ones are copied once.
"""
from __future__ import annotations

import logging
import resource
import time
import traceback
from collections import Counter, OrderedDict
from typing import Callable

import numpy as np
import torch
import zmq

from asgd.core import protocol
from asgd.core.flat import FiniteCheck, bf16_to_f32, chunk_ranges, copy_checked
from asgd.core.protocol import ProtocolError, Request
from asgd.core.shm import Segment, SegmentError
from server import adopt
from server.staleness import Pending, StalenessControl
from server.store import FlatChunks, ParameterStore

ZERO_COPY_BYTES = 1 << 20    # float32 replies at least this large are sent from the live
                             # weights without a copy (ParameterStore.lend)
MAX_SEGMENTS = 1024          # shared-memory segments mapped at once (one per worker)
REPLY_MEMORY = 64            # answered pushes remembered per worker, by sequence number
STATS_WORKERS = 64           # workers listed by name in stats (the most recently heard)
HISTOGRAM_BUCKETS = 1000     # staleness counted exactly up to this; above, in one bucket
HELD = "held"                # a remembered push whose reply a policy still holds
WIRE_DTYPES = {"none": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _readonly_tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor over a received frame (read-only memory: nothing here writes to it)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


class ReplyForm:
    """How one reply carries the weights: per parameter, flat in a wire dtype, or written
    into the worker's shared-memory segment."""
    __slots__ = ("flat", "dtype", "segment")

    def __init__(self, flat: bool = False, dtype: str = "float32", segment=None):
        self.flat, self.dtype, self.segment = flat, dtype, segment


PER_TENSOR = ReplyForm()

log = logging.getLogger("asgd.server")

DEFER = None     # what an op returns when its reply is held back


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


class ServerCore:
    def __init__(self, store: ParameterStore, cfg, shard: tuple[int, int] = (0, 1),
                 metrics=None, clock: Callable[[], float] = time.monotonic):
        self.store, self.cfg, self.shard = store, cfg, shard
        # a shard of several holds a range of the flat parameters: it speaks the flat form only
        self.lo, self.hi = store.span
        self.max_bytes = int(cfg.server.max_message_mb * 2**20)
        self.metrics = metrics      # a MetricsWriter for per-push records, or None
        self.clock = clock
        self.control = StalenessControl(store, cfg, clock, self._log)
        self.started = clock()
        self.start_version = store.version
        self.dropped = 0
        self.staleness = Counter()
        # workers that said hello, at most server.max_workers (the longest silent evicted)
        self.workers: dict[str, WorkerStats] = {}
        self.max_workers = cfg.server.max_workers
        self.evicted = self.repeats = 0
        self.requests = Counter()
        self.errors = Counter()
        self.bytes_in = self.bytes_out = 0
        self.shm_bytes_in = self.shm_bytes_out = 0   # tensors moved through shared memory
        self.check = FiniteCheck()
        self.segments: dict[str, Segment] = {}
        self.local = None        # the server's LocalSockets (server.local), or None
        self._ops = {"hello": self._hello, "pull": self._pull, "push": self._push,
                     "push_pull": self._push, "stats": self._stats, "bye": self._bye}
        assert set(self._ops) == set(protocol.OPS)

    @property
    def applied(self) -> int:
        """Updates applied since this server started (an update is one version)."""
        return self.store.version - self.start_version

    def model_changed(self, cfg) -> None:
        """The store adopted a model (server.adopt): its range, the config it runs with (the
        first worker's settings), and a staleness control sized for it (no worker counts
        yet: the one adopted from says hello after this)."""
        self.cfg = cfg
        self.lo, self.hi = self.store.span
        self.control = StalenessControl(self.store, cfg, self.clock, self._log)

    def refuse(self, frames, request_id, code: str, message: str) -> list:
        """The error reply to a request refused before it reached ``reply_frames`` (CURVE's
        ``unauthorized``), counted as every request received and every error reply is."""
        self.bytes_in += sum(protocol.frame_nbytes(f) for f in frames)
        self.errors[code] += 1
        out = protocol.error_frames(request_id, code, message)
        self.bytes_out += sum(protocol.frame_nbytes(f) for f in out)
        return out

    # ------------------------------------------------------------------------------------------

    def handle(self, identity: bytes, frames, local: str | None = None
               ) -> list[tuple[bytes, list]]:
        """The replies to send now, as (identity, frames) pairs, for one request from
        ``identity``: usually its own; none when a policy holds it (ssp, sync); and any held
        replies this request released. ``local``: the request came over the local socket of
        this worker (server.local). Never raises."""
        out = self.reply_frames(identity, frames, local)
        replies = [] if out is DEFER else [(identity, out)]
        return replies + self.tick()

    def tick(self) -> list[tuple[bytes, list]]:
        """Held replies that may go now (the slowest moved on, a round completed, a dead
        worker stopped counting)."""
        out = []
        for p in self.control.release():
            rec = self.workers.get(p.worker)
            if p.seq is not None and rec is not None:
                rec.remember(p.seq, dict(p.reply))
            out.append((p.identity, self._answer(p.request_id, p.op, p.reply, None, p.form)))
        return out

    def reply_frames(self, identity: bytes, frames, local: str | None = None) -> list | None:
        """Reply frames for one request's frames, or DEFER. Never raises."""
        request_id = None
        self.bytes_in += sum(protocol.frame_nbytes(f) for f in frames)
        try:
            req = protocol.check_request(frames, self.max_bytes)
            request_id = req.id
            if local is not None:
                self._check_local(req, local)
            self.requests[req.op] += 1
            # a record exists only for a worker that said hello; observers (the launcher's
            # monitor, evaluation pulls) and strangers leave none
            worker = self.workers.get(req.worker)
            if worker is not None:
                worker.last_seen = self.clock()
            result = self._ops[req.op](req, worker, identity)
            if result is DEFER:
                return DEFER
            fields, tensors = result
            if req.op in ("pull", "push_pull"):
                form = self._reply_form(req)
            else:   # a shard's hello carries its range of the weights, flat
                form = PER_TENSOR if self.store.whole else ReplyForm(True)
            return self._answer(req.id, req.op, fields, tensors, form)
        except ProtocolError as e:
            self.errors[e.code] += 1
            out = protocol.error_frames(e.request_id, e.code, e.message)
        except Exception as e:  # a bug of ours: report it, keep serving
            log.error("internal error: %s\n%s", e, traceback.format_exc())
            self.errors["internal"] += 1
            out = protocol.error_frames(request_id, "internal", repr(e))
        self.bytes_out += sum(protocol.frame_nbytes(f) for f in out)
        return out

    @staticmethod
    def _check_local(req: Request, worker: str) -> None:
        """A request over a local socket: from the worker that connection proved to be, and
        one answered by a header alone (shared-memory pushes and pulls, stats, bye)."""
        if req.worker != worker:
            raise ProtocolError("unauthorized", f"this local connection is worker "
                                f"{worker[:64]!r}'s, not {req.worker[:64]!r}'s", req.id)
        if req.op in ("push", "push_pull", "pull") and req.get("shm") is None or \
                req.op == "hello":
            raise ProtocolError("bad_request", f"{req.op} without shared memory goes over "
                                "ZeroMQ: the local socket carries only requests answered by "
                                "a header alone", req.id)

    def _reply_form(self, req: Request) -> ReplyForm:
        shm = req.get("shm")
        if shm is not None and shm is not False:     # pull: true; push_pull: a slot, maybe 0
            seg = self.segments.get(req.worker)
            if seg is None:
                raise ProtocolError("bad_request", f"worker {req.worker!r} has no shared-memory "
                                    "segment (say hello with 'shm' first)", req.id)
            return ReplyForm(segment=seg)
        if req.get("flat"):
            return ReplyForm(True, WIRE_DTYPES[req.get("weights") or "none"])
        self._need_whole(req)
        return PER_TENSOR

    def _need_whole(self, req: Request) -> None:
        """Per-parameter frames need the whole model: a shard of several refuses them."""
        if not self.store.whole:
            raise ProtocolError("bad_request", f"this server is shard {self.shard[0]} of "
                                f"{self.shard[1]} (parameters {self.lo}-{self.hi}): use the "
                                "flat form ('flat': true) or shared memory", req.id)

    def _answer(self, request_id: int, op: str, fields: dict, tensors=None,
                form: ReplyForm = PER_TENSOR) -> list:
        """The frames of a successful reply; pull's and push_pull's carry the current
        weights in the form asked for."""
        store = self.store
        if op in ("hello", "pull", "push_pull"):
            fields = dict(fields, version=store.version)
            tensors = None
            form = form or PER_TENSOR
            if form.segment is not None:
                if form.segment.weights is None:   # closed by a later hello or a bye
                    return protocol.error_frames(request_id, "bad_request",
                                                 "the shared-memory segment was replaced")
                np.copyto(form.segment.weights[self.lo:self.hi], store.weights.numpy())
                self.shm_bytes_out += store.numel * 4
                fields["shm"] = True
                return self._frames({"ok": True, "id": request_id, **fields}, [], [])
            nbytes = store.numel * protocol.DTYPES[form.dtype].itemsize
            if form.flat:
                fields["flat"] = True
                if form.dtype != "float32":
                    buf, trackers = store.pool.take(store.version, form.dtype)
                elif nbytes >= ZERO_COPY_BYTES:
                    buf, trackers = store.lend()
                else:
                    buf, trackers = store.weights.numpy(), None
                specs, parts = [], []
                for a, b in chunk_ranges(store.numel, buf.itemsize):
                    specs.append({"name": "weights", "dtype": form.dtype, "shape": [b - a]})
                    parts.append(buf[a:b])
                return self._frames({"ok": True, "id": request_id, **fields, "tensors": specs},
                                    parts, trackers)
            # per parameter: a frame each, from a pool buffer or a copy (never the live weights)
            if nbytes >= ZERO_COPY_BYTES:
                buf, trackers = store.lend()
            else:
                buf, trackers = store.weights.numpy(), None
            views = store.layout.named_views(torch.from_numpy(buf))
            header = {"ok": True, "id": request_id, **fields,
                      "tensors": [{"name": n, "dtype": "float32", "shape": list(t.shape)}
                                  for n, t in views]}
            return self._frames(header, [t.numpy().reshape(-1) for _, t in views], trackers)
        frames = protocol.encode({"ok": True, "id": request_id, **fields}, tensors or [])
        self.bytes_out += sum(protocol.frame_nbytes(f) for f in frames)
        return frames

    def _frames(self, header: dict, parts: list, trackers) -> list:
        """Header and payload frames. With ``trackers`` (the live weights lent by the store,
        or a snapshot-pool buffer) the parts go without copying and their trackers tell the
        store when ZeroMQ is done; without, each is copied now, once, into a ZeroMQ message
        (the live weights change with the next push)."""
        frames = [protocol.pack_header(header)]
        for part in parts:
            if trackers is None:
                frames.append(zmq.Frame(part, copy=True))
            else:
                f = zmq.Frame(part, track=True)
                trackers.append(f.tracker)
                frames.append(f)
        self.bytes_out += sum(protocol.frame_nbytes(f) for f in frames)
        return frames

    # ------------------------------------------------------------------------------------------
    # ops: (request, worker stats, identity) -> (reply fields, reply tensors) or DEFER

    def _hello(self, req: Request, worker: WorkerStats | None, identity: bytes):
        # a server without a model adopts the first worker's; a later or a different one must
        # match it (the parameter list, the settings it gives), else nothing changes here
        adopt.admit(self, req)
        if worker is None:
            worker = self._new_worker(req.worker)
        worker.rank = req.get("rank")
        shm = self._attach(req) if req.get("shm") else None
        self.control.hello(req.worker)
        # "tensors" is the model's parameter list; its frames are the current weights, so the
        # header describes its frames as every message's does and a new worker needs no pull.
        # A shard of several answers in the flat form: "tensors" are the chunks of its range
        # of the weights, "params" the model's parameter list.
        return {
            "version": self.store.version,
            "shard": {"index": self.shard[0], "count": self.shard[1], "start": self.lo,
                      "stop": self.hi},
            "config": self.training_settings(),
            **({} if self.store.whole else {"params": self.store.specs}),
            **({} if shm is None else {"shm": shm}),
        }, None

    def _new_worker(self, name: str) -> WorkerStats:
        """A record for a worker saying hello; past server.max_workers the longest silent
        one's record (and segment, and place in ssp or sync) goes first."""
        if len(self.workers) >= self.max_workers:
            gone = min(self.workers, key=lambda w: self.workers[w].last_seen)
            self._forget(gone)
            self.evicted += 1
            log.warning("%d workers known: forgot %s, the longest silent", self.max_workers,
                        gone)
        rec = self.workers[name] = WorkerStats()
        rec.last_seen = self.clock()
        return rec

    def _forget(self, name: str) -> None:
        self.workers.pop(name, None)
        self.control.bye(name)
        if self.local is not None:
            self.local.forget(name)
        seg = self.segments.pop(name, None)
        if seg is not None:
            seg.close()

    def _attach(self, req: Request) -> dict:
        """Map the worker's shared-memory segment; whether it worked, and why not (a worker
        on another host cannot share memory with us, and then uses frames)."""
        old = self.segments.pop(req.worker, None)
        if old is not None:
            old.close()
        if len(self.segments) >= MAX_SEGMENTS:
            return {"ok": False, "reason": f"{MAX_SEGMENTS} segments are mapped already"}
        try:
            # the segment holds the whole model; a shard reads and writes its own range
            self.segments[req.worker] = Segment.open(req.header["shm"],
                                                     self.store.layout.numel)
        except (SegmentError, OSError, ValueError) as e:
            return {"ok": False, "reason": str(e)}
        # on this host: the shared-memory requests may also skip ZeroMQ (server.local)
        return {"ok": True, **(self.local.offer(req.worker) if self.local is not None else {})}

    def _pull(self, req: Request, worker, identity: bytes):
        self._need_model(req)
        return {"version": self.store.version}, None

    def _need_model(self, req: Request) -> None:
        if not self.store.has_model:
            raise ProtocolError("bad_request", adopt.NO_MODEL, req.id)

    def _check_push(self, req: Request):
        """The push's base version and its gradient, checked against this server: a flat
        float32 tensor (per-parameter and flat pushes are copied into the store's gradient
        buffer, a shared-memory push is read in place)."""
        base = req.header["version"]
        if base < 0 or base > self.store.version:
            raise ProtocolError("bad_version", f"version {base} is not one this shard has had "
                                f"(current version {self.store.version})", req.id)
        if req.get("shm") is not None:
            return base, self._shm_grad(req)
        if req.get("flat"):
            return base, self._flat_grad(req)
        self._need_whole(req)
        specs = self.store.layout.specs
        if len(req.tensors) != len(specs):
            raise ProtocolError("bad_tensor", f"push has {len(req.tensors)} tensors, the model "
                                f"has {len(specs)}", req.id)
        grad = self.store.grad.numpy()
        for t, s, (a, b) in zip(req.tensors, specs, self.store.layout.spans()):
            if t.name != s.name:
                problem = f"expected tensor {s.name!r}, got {t.name!r}"
            elif t.dtype != s.dtype:
                problem = f"tensor {t.name!r}: dtype {t.dtype}, expected {s.dtype}"
            elif tuple(t.array.shape) != s.shape:
                problem = (f"tensor {t.name!r}: shape {list(t.array.shape)}, expected "
                           f"{list(s.shape)}")
            elif not copy_checked(grad[a:b], t.array.reshape(-1), self.check):
                problem = f"tensor {t.name!r} has non-finite values"
            else:
                continue
            raise ProtocolError("bad_tensor", problem, req.id)
        return base, self.store.grad

    def _shm_grad(self, req: Request) -> torch.Tensor:
        seg = self.segments.get(req.worker)
        if seg is None or seg.weights is None:
            raise ProtocolError("bad_request", f"worker {req.worker!r} has no shared-memory "
                                "segment (say hello with 'shm' first)", req.id)
        slot = req.header["shm"]
        if slot >= seg.slots:
            raise ProtocolError("bad_request", f"gradient slot {slot} is not in [0, "
                                f"{seg.slots})", req.id)
        g = seg.grad(slot)[self.lo:self.hi]
        self.shm_bytes_in += g.nbytes
        if not self.check(g):
            raise ProtocolError("bad_tensor", "the gradient has non-finite values", req.id)
        return torch.from_numpy(g)

    def _flat_grad(self, req: Request) -> torch.Tensor:
        """A flat push's chunks, decoded into the store's gradient buffer and checked."""
        from asgd.core import encoding as enc

        numel, out = self.store.numel, self.store.grad.numpy()
        name = req.get("encoding") or "none"

        def bad(problem: str):
            raise ProtocolError("bad_tensor", f"flat push ({name}): {problem}", req.id)

        groups: dict[str, list] = {}
        for t in req.tensors:
            if t.array.ndim != 1:
                bad(f"chunk {t.name!r} must be 1-D")
            groups.setdefault(t.name, []).append(t)
        if name in ("none", "fp16", "bf16"):
            want = WIRE_DTYPES[name]
            chunks = groups.pop("grad", [])
            if groups or any(t.dtype != want for t in chunks):
                bad(f"expected only 'grad' chunks of {want}")
            if sum(t.array.size for t in chunks) != numel:
                bad(f"the chunks hold {sum(t.array.size for t in chunks)} values, the model "
                    f"has {numel}")
            if want == "float32":
                # the frames are the gradient: check each, and let the update read them where
                # ZeroMQ put them (no copy); one frame is the whole gradient, contiguous
                for t in chunks:
                    if not self.check(t.array):
                        bad("the gradient has non-finite values")
                if len(chunks) == 1:
                    return _readonly_tensor(chunks[0].array)
                return FlatChunks([_readonly_tensor(t.array) for t in chunks])
            pos = 0
            for t in chunks:
                n = t.array.size
                if t.dtype == "bfloat16":
                    bf16_to_f32(t.array, out[pos:pos + n])
                    ok = self.check(out[pos:pos + n])
                else:
                    ok = copy_checked(out[pos:pos + n], t.array, self.check)
                if not ok:
                    bad("the gradient has non-finite values")
                pos += n
            return self.store.grad
        arrays = [np.concatenate([t.array for t in ts]) if len(ts) > 1 else ts[0].array
                  for ts in groups.values()]
        meta = dict(req.get("enc") or {}, encoding=name, numel=numel)
        try:
            enc.decode(meta, arrays, out)
        except enc.EncodingError as e:
            bad(str(e))
        if not self.check(out):
            bad("the gradient has non-finite values")
        return self.store.grad

    def _push(self, req: Request, worker: WorkerStats | None, identity: bytes):
        self._need_model(req)
        seq = req.get("seq")
        if seq is not None and worker is None:
            # replies are remembered in the worker's record, made by hello: without one a push
            # sent again would be applied again, so a sequence number needs a hello first
            raise ProtocolError("bad_request", f"push with 'seq' from worker "
                                f"{req.worker[:64]!r}, which has not said hello (or was "
                                "forgotten): say hello first; the server answers a push sent "
                                "again exactly once only for a worker that said hello", req.id)
        if seq is not None and seq in worker.replies:
            return self._repeat(req, worker, identity, seq)
        base, grad = self._check_push(req)
        form = self._reply_form(req) if req.op == "push_pull" else PER_TENSOR
        out = self.control.push(Pending(identity, req.worker, req.id, req.op, form=form,
                                        seq=seq), base, grad)
        if not out.repeat:
            k = bucket(out.staleness)
            self.staleness[k] += 1
            if not out.applied:
                self.dropped += 1
            if worker is not None:
                worker.pushes += 1
                worker.staleness[k] += 1
                worker.applied += out.applied
                worker.dropped += not out.applied
        if seq is not None:
            worker.remember(seq, HELD if out.deferred else out.reply())
        return DEFER if out.deferred else (out.reply(), None)

    def _repeat(self, req: Request, worker: WorkerStats, identity: bytes, seq: int):
        """A push sent again (its reply was lost or late): answered from memory, with the
        current weights for a push_pull, and never applied again. If a policy still holds
        the first one's reply, the held reply goes to this request instead."""
        self.repeats += 1
        worker.repeats += 1
        known = worker.replies[seq]
        if known == HELD:
            people = self.control.people
            held = people.waiting.get(req.worker) if people is not None else None
            if held is not None and held.seq == seq:
                held.identity, held.request_id, held.op = identity, req.id, req.op
                if req.op == "push_pull":
                    held.form = self._reply_form(req)
                return DEFER
            raise ProtocolError("internal", f"push {seq} of {req.worker!r} is held but not "
                                "found", req.id)
        return dict(known, repeat=True), None

    def _bye(self, req: Request, worker, identity: bytes):
        self.control.bye(req.worker)
        if self.local is not None:
            self.local.tokens.pop(req.worker, None)   # its connection closes from its side
        seg = self.segments.pop(req.worker, None)
        if seg is not None:
            seg.close()
        return {"version": self.store.version}, None

    def _stats(self, req: Request, worker, identity: bytes):
        return self.stats(), None

    def _log(self, kind: str, **fields) -> None:
        if self.metrics is not None:
            if self.shard[1] > 1:
                fields["shard"] = self.shard[0]
            self.metrics.write(kind, **fields)

    # ------------------------------------------------------------------------------------------

    def training_settings(self) -> dict:
        """hello's "config": every server-side setting a worker's behaviour depends on (the
        update rule: local_steps and the outer optimizer among them)."""
        c = self.cfg.to_dict()
        own = adopt.server_settings(self.cfg)
        return {"optimizer": c["optimizer"], "schedule": c["schedule"],
                "policy": c["server"]["policy"], "max_staleness": c["server"]["max_staleness"],
                "model": c["model"], "data": c["data"], "seed": c["run"]["seed"],
                "max_updates": c["run"]["max_updates"], "local_steps": own["local_steps"],
                "outer": own["outer"]}

    def stats(self) -> dict:
        now = self.clock()
        total = sum(self.staleness.values())
        mean = sum(k * v for k, v in self.staleness.items()) / total if total else 0.0
        timeout = self.cfg.server.worker_timeout_s
        recent = sorted(self.workers.items(), key=lambda kv: kv[1].last_seen,
                        reverse=True)[:STATS_WORKERS]
        return {
            "version": self.store.version,
            "updates_applied": self.applied,
            "updates_dropped": self.dropped,
            "staleness_histogram": {str(k): v for k, v in sorted(self.staleness.items())},
            "staleness_mean": mean,
            "staleness_max": max(self.staleness) if self.staleness else 0,
            # bounded: the STATS_WORKERS most recently heard by name, the rest in totals
            "workers": {w: s.to_dict(now, timeout) for w, s in recent},
            "workers_known": len(self.workers),
            "workers_alive": sum(now - s.last_seen <= timeout for s in self.workers.values()),
            "workers_evicted": self.evicted,
            "repeats": self.repeats,
            "requests": dict(self.requests),
            "errors": dict(self.errors),
            "waiting": self.control.waiting(),
            "dc_fallbacks": self.control.dc_fallbacks,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "shm_bytes_in": self.shm_bytes_in,
            "shm_bytes_out": self.shm_bytes_out,
            "local": self.local.stats() if self.local is not None else None,
            "shard": {"index": self.shard[0], "count": self.shard[1], "start": self.lo,
                      "stop": self.hi},
            "uptime_s": round(now - self.started, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
