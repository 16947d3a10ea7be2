"""The client's side of the data path: a model in flat buffers and its exchange with the
server, for the built-in worker and for a user's own training script alike.

    client = connect_client(endpoint, "w0")       # one server, or every shard of one
    ex = Exchange(model, layout, client, device, shared_memory="auto", overlap=False,
                  encoding="none", retries=2)     # the parameters now view flat buffers
    info = ex.connect()                           # hello (offering shared memory), weights in
    ex.zero_grad(); loss.backward()               # gradients land in the flat gradient buffer
    grad = ex.gradient()                          # it, flat on the host
    if ex.finite(grad):
        reply = ex.exchange(grad)                 # push it, take the weights after it (or,
                                                  # with overlap, those of the previous push)
    ex.start_local(); ...; grad = ex.delta()      # local steps: the distance travelled
    ex.drain(); client.bye(); ex.close(); client.close()

``model`` is a module or its trainable parameters in ``layout``'s order; ``layout`` defaults
to the module's. ``connect(hello, check)``: ``hello()`` says hello (default
``client.hello()``; pass one that adds fields or retries), ``check(info)`` may refuse the
server's answer before anything is loaded. ``version``: of the weights loaded;
``transport``: "shm" or "frames". A reply that does not come in time is sent again
(``retries``; ``on_timeout()`` runs first, by default ``client.reconnect()``); a server that
moved (``client.endpoint`` changed) raises ServerTimeout: say hello again (``connect``).

The model's parameters are views into one flat weights tensor and their ``.grad`` views into
one of two flat gradient buffers, so nothing is gathered or scattered per parameter: the
gradient leaves in one piece and the weights arrive in one copy.

* Same host: the gradient buffers are the slots of the client's shared-memory segment
  (``client.share_memory``; asgd.client.samehost owns it), so autograd writes the gradient
  where the server reads it; only a header crosses, and the weights come back in the
  segment (one copy out).
* Across machines: the gradient goes as flat chunks without a copy (optionally encoded:
  fp16, bf16, int8, top-k with error feedback), the weights come back as chunks copied once
  into the weights buffer.
* GPU: the flat buffers live on the device; a step makes one device-to-host copy of the
  gradient into pinned host memory (or the segment) and one host-to-device copy of the weights.
  A model split into stages over several devices (worker.stages.devices) has its flat buffers in
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
  shard the version of its range that the gradient was computed on (``client.base()``).
  Encodings are applied per shard's range (``client.parts``: top-k and error feedback per
  range).
"""
from __future__ import annotations

import logging
import secrets

import torch

from asgd.client.buffers import Spread, device_runs
from asgd.client.common import Push, ServerTimeout
from asgd.core.flat import FiniteCheck

log = logging.getLogger("asgd.worker")


class Exchange:
    """A model's flat buffers and their exchange through ``client`` (see the module)."""

    def __init__(self, model, layout, client, device: torch.device,
                 shared_memory: str = "auto", overlap: bool = False, encoding: str = "none",
                 encoding_args: dict | None = None, weights_encoding: str = "none",
                 staged: bool | None = None, retries: int = 2,
                 parts: list[int] | None = None):
        if layout is None:
            from asgd.core.layout import ParameterLayout

            layout = ParameterLayout.from_model(model)
        self.model, self.layout, self.client = model, layout, client
        self.device = device
        self.numel = layout.numel
        self.overlap = overlap
        self.encoding, self.encoding_args = encoding, dict(encoding_args or {})
        self.weights_encoding = weights_encoding
        if isinstance(model, torch.nn.Module):   # trainable ones: model.freeze stays off
            self.params = layout.parameters(model)
        else:
            self.params = list(model)
            if [tuple(p.shape) for p in self.params] != [s.shape for s in layout.specs]:
                raise ValueError("the parameters do not match the layout's shapes")
        cuda = device.type == "cuda"
        # staged: device buffers apart from the host's, one copy each way a step (on a GPU;
        # on the CPU only when asked, which runs the GPU's code path for tests)
        multi = len({p.device for p in self.params}) > 1
        self.staged = (cuda or multi) if staged is None else staged or cuda or multi
        self.cuda = cuda or any(p.device.type == "cuda" for p in self.params)
        cuda = self.cuda
        self.segment = None          # the segment the buffers are bound to (the client's)
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
        self._bind_gradients(client.share_memory(self.numel, shared_memory))
        self.check = FiniteCheck()
        self.ranges: list[tuple[int, int]] | None = None    # each server's range (connect)
        self.feedback = None         # error feedback of an encoding (one per server's range)
        self.anchor = None           # local steps: the weights they started from
        self.version = 0
        self.in_flight: tuple[int, Push] | None = None      # (request id, the push)
        self.retries = retries
        self.on_timeout = None       # what to do before a resend (default: a fresh socket)
        self.seq = secrets.randbits(40) << 20      # this process's pushes: seq, seq + 1, ...
        self.resent = 0

    def _views(self, flat) -> list[torch.Tensor]:
        return flat.views(self.layout) if isinstance(flat, Spread) else self.layout.views(flat)

    @staticmethod
    def _host(numel: int, pinned: bool) -> torch.Tensor:
        return torch.zeros(numel, pin_memory=pinned)

    def _bind_gradients(self, segment) -> None:
        """The host gradient buffers: the segment's two slots, or plain (pinned on CUDA)
        memory for frames; without staging they are also the buffers autograd writes. Then
        the weights' place (``_bind_weights``). The segment is the client's (it closes it)."""
        self.segment = segment
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
        return self.client.transport

    def connect(self, hello=None, check=None) -> dict:
        """``hello()`` says hello (default ``client.hello()``: the client offers its segment);
        ``check(info)`` may refuse the server's answer before anything is loaded; then the
        buffers move to where the server left them (the segment it took, or frames' memory)
        and the weights the hello carries are loaded."""
        info, weights = (hello or self.client.hello)()
        self.ranges = self.client.parts(self.numel)   # a lone shard of several: RuntimeError
        if check is not None:
            check(info)
        if self.encoding != "none" and (self.feedback is None or len(self.feedback) !=
                                        len(self.ranges)):
            from asgd.core.encoding import ErrorFeedback

            self.feedback = [ErrorFeedback(hi - lo) for lo, hi in self.ranges]
        memory = self.client.memory()
        if memory is not self.segment:
            self._bind_gradients(memory)
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

    def start_local(self) -> None:
        """Local steps begin here: ``delta()`` is the distance travelled from these weights."""
        if self.anchor is None:
            self.anchor = self.weights.clone()    # a tensor, or per stage's device
        else:
            self.anchor.copy_(self.weights)

    def delta(self, anchor=None) -> torch.Tensor:
        """``anchor - weights`` (a pseudo-gradient: the weights local steps started from,
        ``start_local``, minus the weights now) in the free gradient buffer, on the host."""
        anchor = self.anchor if anchor is None else anchor
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
        base = self.client.base()           # the weights the gradient was computed on
        reply = self.finish() if self.overlap else None
        self.seq += 1
        push = self._push(host_grad, base, self.seq)
        self.in_flight = (self.client.send_push(push), push)
        self.slot = (self.slot + 1) % 2
        if not self.overlap:
            reply = self.finish()
        return reply

    def _push(self, host_grad: torch.Tensor, base, seq: int) -> Push:
        """This push as it is sent (and sent again: the encoding, and its error feedback,
        happen once)."""
        if self.client.transport == "shm":
            return Push(base, seq, slot=self.slot)
        if self.feedback is not None:
            return Push(base, seq, weights=self.weights_encoding, encoded=[
                fb.encode(self.encoding, host_grad[lo:hi], **self.encoding_args)
                for fb, (lo, hi) in zip(self.feedback, self.ranges)])
        return Push(base, seq, grad=host_grad.numpy(), weights=self.weights_encoding)

    def finish(self) -> dict | None:
        """The reply to the push in flight, its weights loaded; None if none is in flight."""
        if self.in_flight is None:
            return None
        rid, push = self.in_flight
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
                before = self.client.endpoint
                (self.on_timeout or self.client.reconnect)()
                if self.client.endpoint != before:
                    # another server now (a restart on a new port): it knows neither this
                    # worker nor its segment; the worker says hello there instead
                    raise ServerTimeout(f"the server moved to {self.client.endpoint}")
                self.resent += 1
                rid = self.client.send_push(push)
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
            self.segment = None
            self._bind_weights()        # the weights back in the worker's own memory
            self.client.share_memory(self.numel, "off")     # the client lets it go
