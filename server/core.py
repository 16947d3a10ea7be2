"""The server's request handling, without sockets: frames in, what to send out.

    core = ServerCore(store, cfg, local=LocalPeers(numel))   # local: this host's workers
    for identity, reply in core.handle(identity, request_frames): send(identity, reply)
    for identity, reply in core.tick(): send(identity, reply)     # replies time released

A reply (``server.reply.Reply``) is its frames: the header, packed, and the payload buffers,
with what the sender must track (buffers the store lent); the loop (``server.main``) makes the
ZeroMQ frames.

Every request is validated in full before anything changes: the schema by
``asgd.core.protocol.check_request`` (header, version, op, fields, frames), then what depends
on the server's state here (the push's version, the parameter list, finiteness). A bad request
gets an error reply and leaves the weights, the optimizer state and the version exactly as they
were. What a push does is ``server.staleness``'s to decide; a policy may hold a reply (ssp,
sync), and ``handle`` then returns no reply for it now and the held one later. Nothing a
client sends can make ``handle`` raise.

A gradient comes per parameter (a frame each), flat (in chunks of a few MiB, maybe encoded:
fp16, bf16, int8, top-k) or in the worker's shared-memory segment (only the header travels),
and the weights go back the same way. Each is copied at most once, into the store's gradient
buffer (shared memory: read in place), checked for NaN and Inf, and applied by one fused step
(which writes a large model's weights into the segment block by block as it goes). Large
replies are sent without copying from the store's snapshot pool; small ones are copied once.
"""
from __future__ import annotations

import logging
import resource
import time
import traceback
from collections import Counter
from typing import Callable

import numpy as np
import torch

from asgd.core import encoding as enc
from asgd.core import protocol
from asgd.core.flat import FiniteCheck, copy_checked
from asgd.core.protocol import ProtocolError, Request
from server import adopt
from server.local import LocalPeers
from server.reply import PER_TENSOR, Reply, ReplyForm, weights_reply
from server.staleness import Pending, StalenessControl
from server.store import FlatChunks, ParameterStore
from server.workers import WorkerStats, bucket

STATS_WORKERS = 64           # workers listed by name in stats (the most recently heard)
HELD = "held"                # a remembered push whose reply a policy still holds

log = logging.getLogger("asgd.server")

DEFER = None     # what an op returns when its reply is held back


class ServerCore:
    def __init__(self, store: ParameterStore, cfg, shard: tuple[int, int] = (0, 1),
                 metrics=None, clock: Callable[[], float] = time.monotonic,
                 local: LocalPeers | None = None):
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
        self._form = None        # the reply form a push_pull's step used (and maybe filled)
        # this host's workers: their segments and the local socket (server.local)
        self.local = local if local is not None else LocalPeers(store.layout.numel, False)
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
        self.local.numel = self.store.layout.numel     # what a worker's segment holds
        self.control = StalenessControl(self.store, cfg, self.clock, self._log)

    def refuse(self, frames, request_id, code: str, message: str) -> Reply:
        """The error reply to a request refused before it reached ``reply_frames`` (CURVE's
        ``unauthorized``), counted as every request received and every error reply is."""
        self.bytes_in += sum(protocol.frame_nbytes(f) for f in frames)
        self.errors[code] += 1
        out = Reply(protocol.error_reply(request_id, code, message))
        self.bytes_out += out.nbytes
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

    def reply_frames(self, identity: bytes, frames, local: str | None = None) -> Reply | None:
        """The reply to one request's frames, or DEFER. Never raises."""
        request_id, self._form = None, None
        self.bytes_in += sum(protocol.frame_nbytes(f) for f in frames)
        try:
            req = protocol.check_request(frames, self.max_bytes)
            request_id = req.id
            if local is not None:
                self.local.check(req, local)
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
                form = self._form or self._reply_form(req)
            else:   # a shard's hello carries its range of the weights, flat
                form = PER_TENSOR if self.store.whole else ReplyForm(True)
            return self._answer(req.id, req.op, fields, tensors, form)
        except ProtocolError as e:
            self.errors[e.code] += 1
            out = Reply(protocol.error_reply(e.request_id, e.code, e.message))
        except Exception as e:  # a bug of ours: report it, keep serving
            log.error("internal error: %s\n%s", e, traceback.format_exc())
            self.errors["internal"] += 1
            out = Reply(protocol.error_reply(request_id, "internal", repr(e)))
        self.bytes_out += out.nbytes
        return out

    def _reply_form(self, req: Request) -> ReplyForm:
        shm = req.get("shm")
        if shm is not None and shm is not False:     # pull: true; push_pull: a slot, maybe 0
            return ReplyForm(segment=self.local.segment(req.worker, req.id))
        if req.get("flat"):
            return ReplyForm(True, enc.REGISTRY[req.get("weights") or "none"].wire_dtype)
        self._need_whole(req)
        return PER_TENSOR

    def _need_whole(self, req: Request) -> None:
        """Per-parameter frames need the whole model: a shard of several refuses them."""
        if not self.store.whole:
            raise ProtocolError("bad_request", f"this server is shard {self.shard[0]} of "
                                f"{self.shard[1]} (parameters {self.lo}-{self.hi}): use the "
                                "flat form ('flat': true) or shared memory", req.id)

    def _answer(self, request_id: int, op: str, fields: dict, tensors=None,
                form: ReplyForm = PER_TENSOR) -> Reply:
        """A successful reply; pull's and push_pull's carry the current weights in the form
        asked for (server.reply)."""
        store = self.store
        header = {"ok": True, "id": request_id, **fields}
        if op in ("hello", "pull", "push_pull"):
            header["version"] = store.version
            form = form or PER_TENSOR
            if form.segment is not None:
                if form.segment.weights is None:   # closed by a later hello or a bye
                    return Reply(protocol.error_reply(request_id, "bad_request",
                                                      "the shared-memory segment was replaced"))
                if form.filled != store.version:     # not written by the step as it went
                    np.copyto(form.segment.weights[self.lo:self.hi], store.weights.numpy())
                self.shm_bytes_out += store.numel * 4
                header["shm"] = True
            out = weights_reply(store, header, form)
        else:                    # the ops' other replies are a header alone
            out = Reply(header)
        self.bytes_out += out.nbytes
        return out

    # ------------------------------------------------------------------------------------------
    # ops: (request, worker stats, identity) -> (reply fields, reply tensors) or DEFER

    def _hello(self, req: Request, worker: WorkerStats | None, identity: bytes):
        # a server without a model adopts the first worker's; a later or a different one must
        # match it (the parameter list, the settings it gives), else nothing changes here
        adopt.admit(self, req)
        if worker is None:
            worker = self._new_worker(req.worker)
        worker.rank = req.get("rank")
        shm = self.local.attach(req.worker, req.header["shm"]) if req.get("shm") else None
        self.control.hello(req.worker)
        # "tensors" is the model's parameter list; its frames are the current weights, so the
        # header describes its frames as every message's does and a new worker needs no pull.
        # A shard of several answers in the flat form: "tensors" are the chunks of its range
        # of the weights, "params" the model's parameter list.
        return {
            "version": self.store.version,
            "shard": {"index": self.shard[0], "count": self.shard[1], "start": self.lo,
                      "stop": self.hi},
            "config": adopt.hello_config(self.cfg),
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
        self.local.forget(name)

    def _pull(self, req: Request, worker, identity: bytes):
        adopt.need_model(self.store, req)
        return {"version": self.store.version}, None

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
        seg = self.local.segment(req.worker, req.id)
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
        numel, out = self.store.numel, self.store.grad.numpy()
        name = req.get("encoding") or "none"

        def bad(problem: str):
            raise ProtocolError("bad_tensor", f"flat push ({name}): {problem}", req.id)

        groups: dict[str, list] = {}
        for t in req.tensors:
            if t.array.ndim != 1:
                bad(f"chunk {t.name!r} must be 1-D")
            groups.setdefault(t.name, []).append(t)
        form = enc.REGISTRY[name]
        if form.wire_dtype is not None:      # a conversion of each value: chunk by chunk
            want = form.wire_dtype
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
                    return chunks[0].to_torch()
                return FlatChunks([t.to_torch() for t in chunks])
            pos = 0
            for t in chunks:     # each chunk widened and checked while it is in cache
                n = t.array.size
                form.widen(t.array, out[pos:pos + n])
                if not self.check(out[pos:pos + n]):
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
        adopt.need_model(self.store, req)
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
        form = self._form = self._reply_form(req) if req.op == "push_pull" else None
        store, seg = self.store, form and form.segment   # a step writes it as it goes
        store.reply_to = None if seg is None else seg.weights[self.lo:self.hi]
        try:
            out = self.control.push(Pending(identity, req.worker, req.id, req.op,
                                            form=form or PER_TENSOR, seq=seq), base, grad)
        finally:
            if seg is not None:
                form.filled = store.filled
            store.reply_to = store.filled = None
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
        self.local.bye(req.worker)
        return {"version": self.store.version}, None

    def _stats(self, req: Request, worker, identity: bytes):
        return self.stats(), None

    def _log(self, kind: str, **fields) -> None:
        if self.metrics is not None:
            if self.shard[1] > 1:
                fields["shard"] = self.shard[0]
            self.metrics.write(kind, **fields)

    # ------------------------------------------------------------------------------------------

    def stats(self) -> dict:
        now = self.clock()
        total = sum(self.staleness.values())
        mean = sum(k * v for k, v in self.staleness.items()) / total if total else 0.0
        timeout = self.cfg.server.worker_timeout_s
        recent = sorted(self.workers.items(), key=lambda kv: kv[1].last_seen,
                        reverse=True)[:STATS_WORKERS]
        return {
            "version": self.store.version,
            "updates_applied": self.applied, "updates_dropped": self.dropped,
            "staleness_histogram": {str(k): v for k, v in sorted(self.staleness.items())},
            "staleness_mean": mean,
            "staleness_max": max(self.staleness) if self.staleness else 0,
            # bounded: the STATS_WORKERS most recently heard by name, the rest in totals
            "workers": {w: s.to_dict(now, timeout) for w, s in recent},
            "workers_known": len(self.workers),
            "workers_alive": sum(now - s.last_seen <= timeout for s in self.workers.values()),
            "workers_evicted": self.evicted,
            "repeats": self.repeats, "requests": dict(self.requests),
            "errors": dict(self.errors), "waiting": self.control.waiting(),
            "dc_fallbacks": self.control.dc_fallbacks,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "shm_bytes_in": self.shm_bytes_in, "shm_bytes_out": self.shm_bytes_out,
            "local": self.local.stats(),
            "shard": {"index": self.shard[0], "count": self.shard[1], "start": self.lo,
                      "stop": self.hi},
            "uptime_s": round(now - self.started, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
