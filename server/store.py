"""The parameter store: every weight in one flat buffer, the optimizer beside it, a version.

    store = ParameterStore.from_model(model, cfg)
    store.load_grad(arrays)            # a gradient, arrays in layout order, into store.grad
    store.step(lr)                     # one optimizer step; version += 1
    store.step(lr, grad=flat_tensor)   # ... or with a gradient held elsewhere (shared memory)
    buf, release = store.pool.take(store.version, "float32")   # a reused snapshot buffer

The flat buffer is one float32 allocation laid out by ``asgd.core.layout.ParameterLayout``;
``views`` are per-tensor views into it in the model's parameter order. The optimizer is
torch.optim's, run on the flat buffer as a single parameter (its update rules are elementwise,
so this is the same arithmetic as per tensor), with torch's fused kernel where there is one.
Replies that must not change under ZeroMQ's feet (zero-copy sends of large weights) come from
``SnapshotPool``: a few reused buffers, each taken back once ZeroMQ reports it sent them.
What a push does to the store (the learning
rate, whether it is applied at all, delay compensation, synchronous rounds) is decided by
``server.staleness``; the store only holds state and steps.
"""
from __future__ import annotations

import torch

import numpy as np

from asgd.config import Config
from asgd.core.flat import f32_to_bf16
from asgd.core.layout import ParameterLayout
from asgd.core.optim import make_optimizer, outer_config

POOL_SIZE = 4          # snapshot buffers kept per wire dtype


class SnapshotPool:
    """Reused buffers holding the weights at some version, for zero-copy replies.

    ``take(version, dtype)`` returns a buffer holding the current weights (in the wire dtype
    asked for) and the list to which the caller appends the ZeroMQ trackers of the frames it
    sends from it. A buffer is reused for a later version once every tracker is done (ZeroMQ
    let go of it); replies at the same version share one buffer. At most ``size`` buffers per
    dtype are kept; past that a busy pool hands out a fresh buffer that is not kept."""

    def __init__(self, weights: torch.Tensor, size: int = POOL_SIZE):
        self.weights = weights         # the live flat weights
        self.size = size
        self.entries: dict[str, list[list]] = {}   # dtype -> [[version, array, trackers]]
        self.fills = 0

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
            np_dtype = {"float32": np.float32, "float16": np.float16,
                        "bfloat16": np.uint16}[dtype]
            entry = [version, np.empty(self.weights.numel(), dtype=np_dtype), []]
            if len(entries) < self.size:
                entries.append(entry)
        self._fill(entry[1], dtype)
        entry[0] = version
        self.fills += 1
        return entry[1], entry[2]

    def _fill(self, out: np.ndarray, dtype: str) -> None:
        src = self.weights.detach().numpy()
        if dtype == "bfloat16":
            f32_to_bf16(src, out)
        else:
            np.copyto(out, src, casting="unsafe")   # float16 saturates to inf past 65504

    def invalidate(self) -> None:
        for entries in self.entries.values():
            for e in entries:
                e[0] = -1


class ParameterStore:
    """``span``: the [start, stop) range of the model's flat parameters this store holds (a
    server shard's; the whole model by default). ``init`` is the whole model's flat weights.
    Per-tensor views exist only for a store of the whole model."""

    def __init__(self, layout: ParameterLayout, init: torch.Tensor, cfg: Config,
                 version: int = 0, span: tuple[int, int] | None = None):
        self.cfg = cfg
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
        self.grad_np = self.flat.grad.numpy()
        self.optimizer = make_optimizer(outer_config(cfg), [self.flat], fused=True)
        self.version = version
        self.pool = SnapshotPool(self.flat.detach())

    @classmethod
    def from_model(cls, model: torch.nn.Module, cfg: Config,
                   span: tuple[int, int] | None = None) -> "ParameterStore":
        layout = ParameterLayout.from_model(model)
        with torch.no_grad():
            init = layout.flatten(model.parameters())
        return cls(layout, init, cfg, span=span)

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
        """The live flat weights (changes with every step)."""
        return self.flat.detach()

    # ------------------------------------------------------------------------------------------

    def staleness_of(self, base_version: int) -> int:
        return self.version - base_version

    def load_grad(self, grads) -> None:
        """Copy a gradient (arrays in layout order) into ``grad``."""
        for (a, b), g in zip(self.layout.spans(), grads):
            self.grad_np[a:b] = g.reshape(-1)

    def add_grad(self, grads, into: torch.Tensor) -> None:
        """Add a gradient (arrays in layout order) to a flat accumulator."""
        acc = into.numpy()
        for (a, b), g in zip(self.layout.spans(), grads):
            acc[a:b] += g.reshape(-1)

    def step(self, lr: float, grad: torch.Tensor | None = None) -> None:
        """One optimizer step with the gradient in ``grad`` (a flat float32 tensor: a
        worker's shared-memory slot, read in place) or else already in ``self.grad``;
        version += 1."""
        g = self.flat.grad if grad is None else grad
        if not self._direct(g, lr):
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            own = self.flat.grad
            self.flat.grad = g
            try:
                self.optimizer.step()
            finally:
                self.flat.grad = own
        self.version += 1

    def _direct(self, g: torch.Tensor, lr: float) -> bool:
        """The step through torch.optim's functional form, on the optimizer's own state:
        the same kernels as ``optimizer.step()`` without its per-call machinery (hooks,
        profiler ranges, grad-mode switches: tens of microseconds, more than the update of a
        small model). False where it does not apply (before the state exists, other
        optimizers): the caller then steps the usual way."""
        opt = self.optimizer
        group = opt.param_groups[0]
        p = self.flat.data
        name = type(opt).__name__
        fused = bool(group.get("fused"))
        if name == "SGD":
            if group["momentum"] == 0 and group["weight_decay"] == 0 and not group["maximize"]:
                p.add_(g, alpha=-lr)      # what torch's SGD does in this case
                return True
            buf = opt.state.get(self.flat, {}).get("momentum_buffer")
            if buf is None:
                return False
            from torch.optim.sgd import sgd

            sgd([p], [g], [buf], weight_decay=group["weight_decay"],
                momentum=group["momentum"], lr=lr, dampening=group["dampening"],
                nesterov=group["nesterov"], maximize=group["maximize"],
                fused=fused or None, foreach=None if fused else False)
            return True
        if name in ("Adam", "AdamW") and not group["amsgrad"]:
            st = opt.state.get(self.flat)
            if not st or "exp_avg" not in st:
                return False
            from torch.optim.adam import adam
            from torch.optim.adamw import adamw

            (adam if name == "Adam" else adamw)(
                [p], [g], [st["exp_avg"]], [st["exp_avg_sq"]], [], [st["step"]],
                fused=fused or None, foreach=None if fused else False, amsgrad=False,
                beta1=group["betas"][0], beta2=group["betas"][1], lr=lr,
                weight_decay=group["weight_decay"], eps=group["eps"],
                maximize=group["maximize"])
            return True
        return False

    # ------------------------------------------------------------------------------------------
    # optimizer state, for checkpoints (tensors and plain scalars only: nothing pickled)

    def optimizer_state(self) -> tuple[dict, list[tuple[str, torch.Tensor]]]:
        state = self.optimizer.state.get(self.flat, {})
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
            self.optimizer.state[self.flat] = state

    def load_weights(self, flat: torch.Tensor, version: int) -> None:
        with torch.no_grad():
            self.flat.data.copy_(flat.reshape(-1))
        self.version = version
        self.pool.invalidate()
