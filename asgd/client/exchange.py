"""The client's side of the data path: a model in flat buffers, and the exchange with the
server (the built-in worker's, and a user's own training script's).

    ex = Exchange(model, layout, client, device, shared_memory="auto", overlap=False)
    ex.connect(rank)                      # hello (offering a shared-memory segment), weights in
    ex.zero_grad(); loss.backward()       # gradients land in the flat gradient buffer
    reply = ex.exchange()                 # push it, take the weights after it (or, with
                                          # overlap, those of the previous push)

The model's parameters are views into one flat weights tensor and their ``.grad`` views into
one of two flat gradient buffers, so nothing is gathered or scattered per parameter: the
gradient leaves in one piece and the weights arrive in one copy.

* Same host: the gradient buffers are the slots of the worker's shared-memory segment
  (asgd.core.shm), so autograd writes the gradient where the server reads it; only a header
  crosses ZeroMQ, and the weights come back in the segment (one copy out).
* Across machines: the gradient goes as flat chunks without a copy (optionally encoded:
  fp16, bf16, int8, top-k with error feedback), the weights come back as chunks copied once
  into the weights buffer.
* GPU: the flat buffers live on the device; a step makes one device-to-host copy of the
  gradient into pinned host memory (or the segment) and one host-to-device copy of the weights.
  A model split into stages over several devices (worker.devices) has its flat buffers in
  parts, one per run of consecutive parameters on one device (``Spread``); each part copies
  its own range of the host buffer, so the server sees one flat vector as always.
* Overlap: the push of step k and the weights after it travel while step k+1 computes, on
  the weights from before step k's push (one more step of staleness). The two gradient buffers
  alternate so the one in flight is never written.
* Exactly once: every push carries a sequence number (from a random start per process, so a
  restarted worker's never collide with its predecessor's). A push whose reply does not come
  within the request timeout is sent again, on a fresh socket, up to ``retries`` times with
  the same number; the server applies it once and answers a repeat from memory.
* A sharded server (``asgd.client.ShardedClient``): every shard reads its range of the same
  gradient buffer (or segment) and writes its range of the weights; each push carries every
  shard the version of its range that the gradient was computed on. Encodings are applied
  per shard's range (top-k and error feedback per range).
"""
from __future__ import annotations

import ipaddress
import logging
import secrets
import socket

import numpy as np
import torch

from asgd.client.buffers import Spread, device_runs
from asgd.client.ops import ServerTimeout
from asgd.core.flat import FiniteCheck
from asgd.core.shm import Segment

log = logging.getLogger("asgd.worker")


def is_local(endpoint: str) -> bool:
    """An endpoint on this machine for certain: a unix socket, a loopback address, or an
    address of one of this machine's interfaces (every one of a comma-separated list of
    shards' endpoints). Host names other than localhost are not looked up."""
    if "," in endpoint:
        return all(is_local(e.strip()) for e in endpoint.split(","))
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = endpoint.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.") or own_address(host)


def own_address(host: str) -> bool:
    """True when ``host`` is a literal IP address of this machine's (in this network
    namespace): a socket can be bound to it only then."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return False
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind((host, 0))
        except OSError:
            return False
    return True


class Exchange:
    def __init__(self, model: torch.nn.Module, layout, client, device: torch.device,
                 shared_memory: str = "auto", overlap: bool = False, encoding: str = "none",
                 encoding_args: dict | None = None, weights_encoding: str = "none",
                 staged: bool | None = None, retries: int = 2,
                 parts: list[int] | None = None):
        self.model, self.layout, self.client = model, layout, client
        self.device = device
        self.numel = layout.numel
        self.overlap = overlap
        self.encoding, self.encoding_args = encoding, dict(encoding_args or {})
        self.weights_encoding = weights_encoding
        self.params = layout.parameters(model)   # trainable ones: model.freeze stays off
        cuda = device.type == "cuda"
        # staged: device buffers apart from the host's, one copy each way a step (on a GPU;
        # on the CPU only when asked, which runs the GPU's code path for tests)
        multi = len({p.device for p in self.params}) > 1
        self.staged = (cuda or multi) if staged is None else staged or cuda or multi
        self.cuda = cuda or any(p.device.type == "cuda" for p in self.params)
        cuda = self.cuda
        self.shared_memory = shared_memory
        self.want_segment = shared_memory == "on" or (shared_memory == "auto" and
                                                      is_local(client.endpoint))
        self.segment = None
        self._own_weights = self._host(self.numel, cuda)
        self.host_weights = self._own_weights
        self._frame_grads = None
        if self.staged:          # device buffers: the parameters and gradients view these
            if multi or parts:   # a split model: a part per stage's device
                runs = device_runs(self.params, layout, parts)
                self.weights, self.grads = Spread(runs), [Spread(runs)]
                self._views_g = [self.grads[0].views(layout)]
            else:
                self.weights = torch.zeros(self.numel, device=device)
                self.grads = [torch.zeros(self.numel, device=device)]
                self._views_g = [layout.views(self.grads[0])]
        else:
            self.weights = self.host_weights
        self.slot = 0
        self._views_w = self._views(self.weights)
        with torch.no_grad():
            for p, v in zip(self.params, self._views_w):
                v.copy_(p.detach().reshape(-1).view_as(v))
                p.data = v
        self._bind_gradients(self._new_segment())
        self.check = FiniteCheck()
        self.sharded = hasattr(client, "clients")
        self.feedback = None         # error feedback of an encoding (one per shard's range)
        if encoding not in ("none",) and not self.sharded:
            from asgd.core.encoding import ErrorFeedback

            self.feedback = ErrorFeedback(self.numel)
        self.version = 0
        self.in_flight = None        # (request id, how to send it again)
        self.retries = retries
        self.on_timeout = None       # what to do before a resend (default: a fresh socket)
        self.seq = secrets.randbits(40) << 20      # this process's pushes: seq, seq + 1, ...
        self.resent = 0

    def _views(self, flat) -> list[torch.Tensor]:
        return flat.views(self.layout) if isinstance(flat, Spread) else self.layout.views(flat)

    @staticmethod
    def _host(numel: int, pinned: bool) -> torch.Tensor:
        return torch.zeros(numel, pin_memory=pinned)

    def _new_segment(self) -> Segment | None:
        """A fresh shared-memory segment to offer, when this worker wants one."""
        if not self.want_segment:
            return None
        try:
            return Segment.create(self.numel, slots=2)
        except OSError as e:
            if self.shared_memory == "on":
                raise
            log.info("no shared-memory segment (%s): sending frames", e)
            return None

    def _bind_gradients(self, segment: Segment | None) -> None:
        """The host gradient buffers: the segment's two slots, or plain (pinned on CUDA)
        memory for frames; without staging they are also the buffers autograd writes. Then
        the weights' place (``_bind_weights``); then the old segment is let go."""
        old, self.segment = self.segment, segment
        if segment is None:
            if self._frame_grads is None:
                self._frame_grads = [self._host(self.numel, self.cuda) for _ in range(2)]
            self.host_grads = self._frame_grads
        else:
            self.host_grads = [torch.from_numpy(segment.grad(i)) for i in range(2)]
            if self.cuda:
                for t in self.host_grads:   # page-lock the segment for fast copies
                    torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * 4, 0)
        if not self.staged:
            self.grads = self.host_grads
            self._views_g = [self.layout.views(g) for g in self.grads]
        self._bind_weights()
        if old is not None and old is not segment:
            old.close()

    def _bind_weights(self) -> None:
        """Where the host weights live. With a segment, no staging and no overlap, in the
        segment's weights area: the server writes the weights where the model reads them, and
        a round trip makes no copy on this side (nothing reads them while the server writes:
        the worker waits for its reply). Otherwise in the worker's own buffer. Moving copies
        the current weights and points the parameters at the new place."""
        seg = self.segment
        direct = seg is not None and not self.staged and not self.overlap
        target = torch.from_numpy(seg.weights) if direct else self._own_weights
        if target.data_ptr() == self.host_weights.data_ptr():
            return
        with torch.no_grad():
            target.copy_(self.host_weights)
        self.host_weights = target
        if not self.staged:
            self.weights = target
            self._views_w = self.layout.views(target)
            for p, v in zip(self.params, self._views_w):
                p.data = v

    # ------------------------------------------------------------------------------------------

    @property
    def transport(self) -> str:
        return "shm" if self.client.segment is not None else "frames"

    def connect(self, hello, check=None) -> dict:
        """``hello(shm)`` says hello (with the segment to offer); ``check(info)`` may refuse
        the server's answer before anything is loaded; then the weights it carries are loaded.
        The shared-memory path is used if the server took the segment."""
        if self.want_segment and (self.segment is None or self.segment.unlinked):
            # a hello again (a restarted server): the last segment's name is gone, offer anew
            self.client.segment = None
            self._bind_gradients(self._new_segment())
        info, weights = hello(self.segment)
        shard = info.get("shard") or {}
        if not self.sharded and shard.get("count", 1) > 1:
            raise RuntimeError(f"the server at {self.client.endpoint} is shard "
                               f"{shard.get('index')} of {shard.get('count')}: give every "
                               "shard's endpoint (--server A,B,...)")
        if check is not None:
            check(info)
        if self.sharded and self.encoding != "none" and self.feedback is None:
            from asgd.core.encoding import ErrorFeedback

            self.feedback = [ErrorFeedback(hi - lo) for lo, hi in self.client.ranges]
        if self.segment is not None and self.client.segment is None:
            if self.shared_memory == "on":
                raise RuntimeError("the server did not take the shared-memory segment "
                                   f"(worker.shared_memory: on): {self.client.shm_refused}")
            log.info("the server cannot share memory with this worker (%s): sending frames",
                     self.client.shm_refused)
            self._bind_gradients(None)
        elif self.segment is not None:
            # the server has it mapped: remove its name now, so that nothing is left in
            # /dev/shm whatever becomes of this process
            self.segment.unlink()
        self.in_flight = None
        if info.get("flat"):
            self.load_flat(info["version"], weights)
        else:
            self.load_tensors(info["version"], weights)
        return info

    def load_tensors(self, version: int, tensors) -> None:
        with torch.no_grad():
            for v, t in zip(self._views_w, tensors):
                v.copy_(t.to_torch().reshape(v.shape), non_blocking=True)
        self.version = version

    def load_flat(self, version: int, chunks) -> None:
        """Weights given as consecutive flat chunks (a sharded server's hello)."""
        host = self.host_weights.numpy()
        pos = 0
        for t in chunks:
            n = t.array.size
            if t.dtype != "float32" or pos + n > host.size:
                raise RuntimeError("the servers' weights do not fit this model")
            host[pos:pos + n] = t.array.reshape(-1)
            pos += n
        if pos != host.size:
            raise RuntimeError(f"the servers sent {pos} weights, this model has {host.size}")
        if self.weights is not self.host_weights:
            self.weights.copy_(self.host_weights, non_blocking=True)
        self.version = version

    def base(self):
        """What a push says it was computed on: the version of the weights loaded (each
        shard's, for a sharded server)."""
        return list(self.client.versions) if self.sharded else self.version

    def _free(self) -> torch.Tensor:
        """The device gradient buffer not in flight."""
        return self.grads[self.slot if len(self.grads) > 1 else 0]

    def _free_views(self) -> list[torch.Tensor]:
        return self._views_g[self.slot if len(self.grads) > 1 else 0]

    def _to_host(self, g: torch.Tensor) -> torch.Tensor:
        """``g`` in the host buffer that goes on the wire (itself on the CPU)."""
        host = self.host_grads[self.slot]
        if isinstance(g, Spread):
            g.copy_to(host)
        elif g is not host:
            host.copy_(g, non_blocking=True)
            if self.cuda:
                torch.cuda.synchronize(self.device)
        return host

    def zero_grad(self) -> None:
        """Point every parameter's ``.grad`` at the free gradient buffer, zeroed: backward
        accumulates into it in place."""
        self._free().zero_()
        for p, v in zip(self.params, self._free_views()):
            p.grad = v

    def gradient(self) -> torch.Tensor:
        """The gradient just computed, as one flat tensor on the host (copied off the device
        on CUDA). Parameters that autograd gave a fresh ``.grad`` (it does when a buffer's
        layout does not suit it) are copied in."""
        for p, v in zip(self.params, self._free_views()):
            if p.grad is None:
                v.zero_()
            elif p.grad.data_ptr() != v.data_ptr():
                v.copy_(p.grad)
        return self._to_host(self._free())

    def delta(self, anchor: torch.Tensor) -> torch.Tensor:
        """``anchor - weights`` (a pseudo-gradient) in the free gradient buffer, on the
        host."""
        g = self._free()
        if isinstance(g, Spread):
            g.set_difference(anchor, self.weights)
        else:
            torch.sub(anchor, self.weights, out=g)
        return self._to_host(g)

    def finite(self, host_grad: torch.Tensor) -> bool:
        return self.check(host_grad.numpy())

    def exchange(self, host_grad: torch.Tensor) -> dict | None:
        """Push the gradient (computed on ``self.version``); returns the reply whose weights
        are now loaded: this push's, or with overlap the previous push's (None on the first
        step)."""
        base = self.base()                  # the weights the gradient was computed on
        reply = self.finish() if self.overlap else None
        self.seq += 1
        again = self._sender(host_grad, base, self.seq)
        self.in_flight = (again(), again)
        self.slot = (self.slot + 1) % 2
        if not self.overlap:
            reply = self.finish()
        return reply

    def _sender(self, host_grad: torch.Tensor, base, seq: int):
        """A function that sends this push (and sends the very same push again when called
        again: the encoding, and its error feedback, happen once)."""
        c, kw, w = self.client, {"seq": seq}, self.weights_encoding
        if c.segment is not None:
            slot = self.slot
            return lambda: self.client.send_push_pull_flat(base, slot=slot, **kw)
        if self.sharded and self.feedback is not None:
            enc = [fb.encode(self.encoding, host_grad[lo:hi], **self.encoding_args)
                   for fb, (lo, hi) in zip(self.feedback, c.ranges)]
            kw.update(encoded=enc)
        elif self.feedback is not None:
            kw.update(encoded=self.feedback.encode(self.encoding, host_grad,
                                                   **self.encoding_args))
        else:
            grad = host_grad.numpy()
            return lambda: self.client.send_push_pull_flat(base, grad, weights=w, **kw)
        return lambda: self.client.send_push_pull_flat(base, weights=w, **kw)

    def finish(self) -> dict | None:
        """The reply to the push in flight, its weights loaded; None if none is in flight."""
        if self.in_flight is None:
            return None
        rid, again = self.in_flight
        self.in_flight = None
        for attempt in range(self.retries + 1):
            try:
                head = self.client.finish(rid, self.host_weights.numpy())
                break
            except ServerTimeout:
                if attempt == self.retries:
                    raise
                log.warning("no reply to a push within %g s: sending it again (%d of %d)",
                            self.client.timeout_s, attempt + 1, self.retries)
                before = self.client
                (self.on_timeout or self.client.reconnect)()
                if self.client is not before:
                    # another server now (a restart on a new port): it knows neither this
                    # worker nor its segment; the worker says hello there instead
                    raise ServerTimeout(f"the server moved to {self.client.endpoint}")
                self.resent += 1
                rid = again()
        if self.weights is not self.host_weights:
            self.weights.copy_(self.host_weights, non_blocking=True)
        self.version = head["version"]
        return head

    def drain(self) -> None:
        """Wait for the push in flight (at the end of a run), best effort."""
        try:
            self.finish()
        except Exception:
            self.in_flight = None

    def pull(self) -> None:
        self.in_flight = None
        self.version = self.client.pull_flat(self.host_weights.numpy(),
                                             weights=self.weights_encoding)
        if self.weights is not self.host_weights:
            self.weights.copy_(self.host_weights, non_blocking=True)

    def close(self) -> None:
        for p in self.params:
            p.grad = None
        if self.segment is not None:
            self.client.segment = None
            seg, self.segment = self.segment, None
            self._bind_weights()        # the weights back in the worker's own memory
            seg.close()
