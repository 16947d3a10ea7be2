"""The parameter store: every weight in one flat buffer, the optimizer beside it, a version.

    store = ParameterStore.from_model(model, cfg)
    store.grad.copy_(flat)             # a gradient into the store's buffer (server.core)
    store.step(lr)                     # one optimizer step; version += 1
    store.step(lr, grad=flat_tensor)   # ... or with a gradient held elsewhere (shared memory)
    buf, trackers = store.lend()       # the live weights, for a zero-copy reply
    buf, trackers = store.pool.take(store.version, "float16")   # a reused converted snapshot

The flat buffer is one float32 allocation laid out by ``asgd.core.layout.ParameterLayout``;
``views`` are per-tensor views into it in the model's parameter order. The optimizer is
torch.optim's, run on the flat buffer as a single parameter (its update rules are elementwise,
so this is the same arithmetic as per tensor), with torch's fused kernel where there is one.
Large float32 replies are sent from the live weights themselves, without a copy (``lend``):
the frames' trackers are kept, and a step that finds ZeroMQ still holding the live buffer
first moves the weights to another (copy on write, into a reused spare). A client that waits
for its reply before pushing again (the common case) therefore costs no copy of the weights
at all. Replies in another dtype (fp16, bf16 weights) are converted into ``SnapshotPool``: a
few reused buffers, each taken back once ZeroMQ reports it sent them.
What a push does to the store (the learning
rate, whether it is applied at all, delay compensation, synchronous rounds) is decided by
``server.staleness``; the store only holds state and steps.

With ``server.lookahead`` (server.lookahead) the optimizer steps ``param``, the true weights,
and the flat buffer that replies read holds the weights predicted for when a worker's
gradient will land: ``weights`` is what workers get, ``true_weights`` what the server
trains, checkpoints and gives at the end (without look-ahead both are the flat buffer).
"""
from __future__ import annotations

import torch

import numpy as np

from asgd.config import Config
from asgd.core.encoding import by_wire_dtype
from asgd.core.protocol import DTYPES
from asgd.core.layout import ParameterLayout
from asgd.core.optim import make_outer
from server.lookahead import LookAhead

POOL_SIZE = 4          # snapshot buffers kept per wire dtype
# a push whose reply goes into a worker's segment: the step and the copy out block by block,
# each block of new weights copied while it is still in cache (one read of them fewer)
FUSE_BLOCK = 1 << 20   # values a block (4 MB)
FUSE_MIN = 4 * FUSE_BLOCK    # smaller stores: the step, then one copy
FUSED_ADAM = {"Adam": getattr(torch, "_fused_adam_", None),
              "AdamW": getattr(torch, "_fused_adamw_", None)}


class SnapshotPool:
    """Reused buffers holding the weights at some version, for zero-copy replies.

    ``take(version, dtype)`` returns a buffer holding the current weights (in the wire dtype
    asked for) and the list to which the caller appends the ZeroMQ trackers of the frames it
    sends from it. A buffer is reused for a later version once every tracker is done (ZeroMQ
    let go of it); replies at the same version share one buffer. At most ``size`` buffers per
    dtype are kept; past that a busy pool hands out a fresh buffer that is not kept."""

    def __init__(self, weights, size: int = POOL_SIZE):
        self._weights = weights        # the live flat weights, or a callable returning them
        self.size = size
        self.entries: dict[str, list[list]] = {}   # dtype -> [[version, array, trackers]]

    def _free(self, entry) -> bool:
        trackers = entry[2]
        trackers[:] = [t for t in trackers if not t.done]
        return not trackers

    def take(self, version: int, dtype: str = "float32") -> tuple[np.ndarray, list]:
        entries = self.entries.setdefault(dtype, [])
        for e in entries:
            if e[0] == version:
                return e[1], e[2]
        entry = next((e for e in entries if self._free(e)), None)
        if entry is None:
            entry = [version, np.empty(self.weights.numel(), dtype=DTYPES[dtype]), []]
            if len(entries) < self.size:
                entries.append(entry)
        self._fill(entry[1], dtype)
        entry[0] = version
        return entry[1], entry[2]

    @property
    def weights(self) -> torch.Tensor:
        return self._weights() if callable(self._weights) else self._weights

    def _fill(self, out: np.ndarray, dtype: str) -> None:
        # the registry's weights form: float16 and bfloat16 saturate at their largest value
        by_wire_dtype(dtype).narrow(self.weights.detach().numpy(), out)

    def invalidate(self) -> None:
        for entries in self.entries.values():
            for e in entries:
                e[0] = -1


class FlatChunks:
    """A flat gradient as consecutive 1-D float32 tensors that together cover the store's
    range in order: the frames it arrived in, read where ZeroMQ put them (no copy into one
    buffer). The optimizer steps over the matching slices of the weights and its state."""

    def __init__(self, parts: list[torch.Tensor]):
        self.parts = parts

    def spans(self) -> list[tuple[int, int, torch.Tensor]]:
        out, pos = [], 0
        for g in self.parts:
            out.append((pos, pos + g.numel(), g))
            pos += g.numel()
        return out

    def copy_into(self, out: torch.Tensor) -> torch.Tensor:
        for a, b, g in self.spans():
            out[a:b].copy_(g)
        return out

    def add_into(self, acc: torch.Tensor) -> None:
        for a, b, g in self.spans():
            acc[a:b].add_(g)


class ParameterStore:
    """``span``: the [start, stop) range of the model's flat parameters this store holds (a
    server shard's; the whole model by default). ``init`` is the whole model's flat weights.
    Per-tensor views exist only for a store of the whole model."""

    def __init__(self, layout: ParameterLayout, init: torch.Tensor, cfg: Config,
                 version: int = 0, span: tuple[int, int] | None = None):
        self.cfg = cfg
        self.settings = None           # the settings adopted from the first worker (adopt)
        self.shard_of = getattr(self, "shard_of", (0, 1))   # (index, count): which range
        self.layout = layout
        for s in layout.specs:
            if s.dtype != "float32":
                raise ValueError(f"parameter {s.name}: only float32 parameters are served")
        if init.numel() != layout.numel:
            raise ValueError(f"initial weights have {init.numel()} values, layout needs "
                             f"{layout.numel}")
        self.span = span = span or (0, layout.numel)
        if not 0 <= span[0] < span[1] <= layout.numel and layout.numel:
            raise ValueError(f"range {span} is not inside the model's {layout.numel} values")
        self.whole = span == (0, layout.numel)
        self.numel = span[1] - span[0]
        init = init.detach().to(torch.float32).reshape(-1)[span[0]:span[1]]
        self.flat = torch.nn.Parameter(init.clone())
        self.flat.grad = torch.zeros_like(self.flat)
        self.views = layout.views(self.flat.data) if self.whole else None
        # look-ahead in A-SGD: the optimizer steps a parameter of its own, the true weights
        self.ahead = LookAhead() if cfg.server.lookahead and \
            cfg.worker.exchange.local_steps <= 1 else None
        self.param = torch.nn.Parameter(init.clone()) if self.ahead else self.flat
        self.optimizer = make_outer(cfg, [self.param])
        self.version = version
        self.pool = SnapshotPool(lambda: self.flat.detach())
        self._lent: list = []          # trackers of zero-copy replies from the live buffer
        self._spare: list = []         # [array, trackers]: former live buffers, reused when free
        # the array under the live weights, kept as itself: a buffer taken back as a spare
        # must be that array, not a view of a tensor over it (views over views would pile up
        # one wrapper per copy on write, and with them the server's memory)
        self._live = self.flat.data.numpy()
        self.moves = 0                 # copies on write (the live buffer was still being sent)
        self._fast = True              # torch's fused Adam kernel called directly (_fused_adam)
        # where a push's reply carries the new weights (a worker's segment: set by the core
        # around the push), and the version whose weights a step wrote there
        self.reply_to = None
        self.filled = None

    @classmethod
    def from_model(cls, model: torch.nn.Module, cfg: Config,
                   span: tuple[int, int] | None = None) -> "ParameterStore":
        layout = ParameterLayout.from_model(model)
        with torch.no_grad():
            init = layout.flatten(model.parameters())
        return cls(layout, init, cfg, span=span)

    @classmethod
    def empty(cls, cfg: Config, shard: tuple[int, int] = (0, 1)) -> "ParameterStore":
        """A store without a model (no model.name): it holds nothing until ``adopt``; as
        shard ``shard`` = (index, count) it then holds that range of the model it adopts."""
        store = cls.__new__(cls)
        store.shard_of = shard
        store.__init__(ParameterLayout([]), torch.empty(0), cfg)
        return store

    @property
    def has_model(self) -> bool:
        """False only for a store that has not yet adopted a model (``empty``)."""
        return len(self.layout) > 0

    def adopt(self, layout: ParameterLayout, init: torch.Tensor, cfg: Config,
              settings: dict | None = None, version: int = 0) -> None:
        """Take a model: the parameter list and the whole model's initial weights (of which a
        shard keeps its range, ``asgd.core.flat.shard_range``), the config to run it with (its
        optimizer), and the settings that config took from the worker (kept in checkpoints).
        The same object, so that everything holding the store sees the model."""
        from asgd.core.flat import shard_range

        index, count = self.shard_of
        span = shard_range(layout.numel, index, count) if count > 1 else None
        self.__init__(layout, init, cfg, version, span)
        self.settings = settings

    @property
    def specs(self) -> list[dict]:
        return self.layout.to_specs()

    @property
    def names(self) -> list[str]:
        return self.layout.names

    @property
    def offsets(self) -> list[int]:
        return self.layout.offsets

    @property
    def grad(self) -> torch.Tensor:
        return self.flat.grad

    @property
    def weights(self) -> torch.Tensor:
        """The live flat weights that replies carry (changes with every step)."""
        return self.flat.detach()

    @property
    def true_weights(self) -> torch.Tensor:
        """The weights the optimizer steps: ``weights`` but with look-ahead."""
        return self.param.detach()

    # ------------------------------------------------------------------------------------------

    def lend(self) -> tuple[np.ndarray, list]:
        """The live weights (float32) for a zero-copy reply, and the list to which the caller
        appends the trackers of the frames it sends from them. The weights are not copied:
        the next change moves them to another buffer first if ZeroMQ still holds these."""
        return self._live, self._lent

    def _own(self) -> None:
        """Before the weights change: if a reply still reads the live buffer, go on in
        another one (a free spare, else a new one) holding a copy of it."""
        lent = self._lent
        lent[:] = [t for t in lent if not t.done]
        if not lent:
            return
        live = self._live
        spare = next((e for e in self._spare if all(t.done for t in e[1])), None)
        if spare is not None:
            self._spare.remove(spare)
            new = spare[0]
        else:
            new = np.empty_like(live)
        np.copyto(new, live)
        if len(self._spare) < POOL_SIZE:   # beyond that, ZeroMQ's reference keeps it alive
            self._spare.append([live, lent])
        self._lent = []
        self.flat.data = torch.from_numpy(new)
        self._live = new
        if self.views is not None:
            self.views = self.layout.views(self.flat.data)
        self.moves += 1

    def staleness_of(self, base_version: int) -> int:
        return self.version - base_version

    def step(self, lr: float, grad=None, next_lr: float | None = None) -> None:
        """One optimizer step with the gradient in ``grad`` (a flat float32 tensor: a
        worker's shared-memory slot, read in place; or ``FlatChunks``: the frames it came in)
        or else already in ``self.grad``; version += 1. With look-ahead the served weights
        are then predicted at ``next_lr`` (the next update's rate; default ``lr``)."""
        self._own()
        g = self.flat.grad if grad is None else grad
        if self.reply_to is not None and self.numel >= FUSE_MIN and self.ahead is None \
                and torch.is_tensor(g) and self._blockwise(g, lr, self.reply_to):
            self._stepped(lr if next_lr is None else next_lr)
            self.filled = self.version
            return
        if isinstance(g, FlatChunks):
            if self._direct(g.spans(), lr):
                self._stepped(lr if next_lr is None else next_lr)
                return
            g = g.copy_into(self.flat.grad)
        if not self._direct([(0, self.numel, g)], lr):
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            own = self.param.grad
            self.param.grad = g
            try:
                self.optimizer.step()
            finally:
                self.param.grad = own
        self._stepped(lr if next_lr is None else next_lr)

    def _stepped(self, next_lr: float) -> None:
        self.version += 1
        if self.ahead is not None:        # the served weights: looked ahead from the true
            self.ahead.served(self.param.detach(), self.optimizer, self.param, next_lr,
                              out=self.flat.data)

    def _direct(self, grads: list[tuple[int, int, torch.Tensor]], lr: float) -> bool:
        """The step through torch.optim's functional form, on the optimizer's own state:
        the same kernels as ``optimizer.step()`` without its per-call machinery (hooks,
        profiler ranges, grad-mode switches: tens of microseconds, more than the update of a
        small model). ``grads``: (start, stop, gradient) pieces covering the weights, each
        stepped on the same slices of the weights and the state (the rules are elementwise:
        the same numbers as one step over the whole). False where it does not apply (before
        the state exists, other optimizers): the caller then steps the usual way."""
        opt = self.optimizer
        group = opt.param_groups[0]
        p = self.param.data
        if len(grads) == 1 and grads[0][0] == 0 and grads[0][1] == self.numel:
            ps, gs = [p], [grads[0][2]]           # the common case: no slicing
        else:
            ps = [p[a:b] for a, b, _ in grads]
            gs = [g for _, _, g in grads]
        name = type(opt).__name__
        fused = bool(group.get("fused"))
        if name == "SGD":
            if group["momentum"] == 0 and group["weight_decay"] == 0 and not group["maximize"]:
                for pv, g in zip(ps, gs):
                    pv.add_(g, alpha=-lr)      # what torch's SGD does in this case
                return True
            buf = opt.state.get(self.param, {}).get("momentum_buffer")
            if buf is None:
                return False
            from torch.optim.sgd import sgd

            sgd(ps, gs, [buf[a:b] for a, b, _ in grads], weight_decay=group["weight_decay"],
                momentum=group["momentum"], lr=lr, dampening=group["dampening"],
                nesterov=group["nesterov"], maximize=group["maximize"],
                fused=fused or None, foreach=None if fused else False)
            return True
        if name in ("Adam", "AdamW") and not group["amsgrad"]:
            st = opt.state.get(self.param)
            if not st or "exp_avg" not in st:
                return False
            from torch.optim.adam import adam
            from torch.optim.adamw import adamw

            step = st["step"]
            kernel = FUSED_ADAM.get(name) if fused and self._fast else None
            if kernel is not None:
                return self._fused_adam(kernel, group, st, ps, gs, grads, lr)
            # one step counter per piece, each advanced once by the kernel: the state's own
            # for the first, copies for the rest
            steps = [step] + [step.clone() for _ in grads[1:]]
            (adam if name == "Adam" else adamw)(
                ps, gs, [st["exp_avg"][a:b] for a, b, _ in grads],
                [st["exp_avg_sq"][a:b] for a, b, _ in grads], [], steps,
                fused=fused or None, foreach=None if fused else False, amsgrad=False,
                beta1=group["betas"][0], beta2=group["betas"][1], lr=lr,
                weight_decay=group["weight_decay"], eps=group["eps"],
                maximize=group["maximize"])
            return True
        return False

    def _blockwise(self, g: torch.Tensor, lr: float, dest) -> bool:
        """``_direct`` ``FUSE_BLOCK`` values at a time, each block of the new weights copied
        into ``dest`` (a float32 array of the store's size) right after its step. The same
        numbers as one step: the rules are elementwise, and the step counter (Adam's), which
        each call advances, is put back before every block but the first. False where
        ``_direct`` does not apply: nothing is stepped, the caller steps and copies."""
        out = torch.from_numpy(dest)
        step = (self.optimizer.state.get(self.param) or {}).get("step")
        for a in range(0, self.numel, FUSE_BLOCK):
            b = min(a + FUSE_BLOCK, self.numel)
            if a and torch.is_tensor(step):
                step -= 1
            if not self._direct([(a, b, g[a:b])], lr):
                return False         # only ever the first block: the rule does not change
            out[a:b].copy_(self.param.data[a:b])
        return True

    def _fused_adam(self, kernel, group, st, ps, gs, grads, lr: float) -> bool:
        """torch's fused Adam (AdamW) kernel called directly: what ``torch.optim.adam``
        calls, without its grouping of the tensors by device and dtype, its foreach step
        increment and its argument checks (each a dispatch: together three times the
        kernel's own time for a small model). The pieces share the state's step counter,
        advanced once: the kernel only reads it."""
        step = st["step"]
        m, v = st["exp_avg"], st["exp_avg_sq"]
        if len(ps) == 1 and ps[0].numel() == self.numel:
            ms, vs = [m], [v]
        else:
            ms = [m[a:b] for a, b, _ in grads]
            vs = [v[a:b] for a, b, _ in grads]
        step += 1
        try:
            kernel(ps, gs, ms, vs, [], [step] * len(ps), amsgrad=False, lr=lr,
                   beta1=group["betas"][0], beta2=group["betas"][1],
                   weight_decay=group["weight_decay"], eps=group["eps"],
                   maximize=group["maximize"], grad_scale=None, found_inf=None)
        except (TypeError, RuntimeError):    # another torch's signature: its own way from now
            step -= 1
            self._fast = False
            return self._direct(grads, lr)
        return True

    # ------------------------------------------------------------------------------------------
    # optimizer state, for checkpoints (tensors and plain scalars only: nothing pickled)

    def optimizer_state(self) -> tuple[dict, list[tuple[str, torch.Tensor]]]:
        state = self.optimizer.state.get(self.param, {})
        scalars, tensors = {}, []
        for k, v in state.items():
            if torch.is_tensor(v) and v.numel() == self.numel:
                tensors.append((f"optim.{k}", v))
            elif torch.is_tensor(v):
                scalars[k] = {"tensor": float(v.item())}
            else:
                scalars[k] = v
        return scalars, tensors

    def load_optimizer_state(self, scalars: dict, tensors: dict[str, torch.Tensor]) -> None:
        state = {}
        for k, v in scalars.items():
            state[k] = torch.tensor(v["tensor"], dtype=torch.float32) if isinstance(v, dict) \
                else v
        for k, t in tensors.items():
            if k.startswith("optim."):
                state[k[len("optim."):]] = t.clone().reshape(-1)
        if state:
            self.optimizer.state[self.param] = state

    def load_weights(self, flat: torch.Tensor, version: int) -> None:
        self._own()
        with torch.no_grad():
            self.flat.data.copy_(flat.reshape(-1))
            if self.param is not self.flat:
                self.param.data.copy_(flat.reshape(-1))
        self.version = version
        self.pool.invalidate()
