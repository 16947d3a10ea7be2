"""The parameter store: every weight in one flat buffer, the optimizer beside it, a version.

    store = ParameterStore.from_model(model, cfg)
    store.load_grad(arrays)            # a gradient, arrays in layout order, into store.grad
    store.step(lr)                     # one optimizer step; version += 1
    store.weight_tensors()             # (name, tensor) pairs of the current weights, to send

The flat buffer is one float32 allocation laid out by ``asgd.core.layout.ParameterLayout``;
``views`` are per-tensor views into it in the model's parameter order. The optimizer is
torch.optim's, run on the flat buffer as a single parameter (its update rules are elementwise,
so this is the same arithmetic as per tensor). What a push does to the store (the learning
rate, whether it is applied at all, delay compensation, synchronous rounds) is decided by
``server.staleness``; the store only holds state and steps.
"""
from __future__ import annotations

import torch

from asgd.config import Config
from asgd.core.layout import ParameterLayout
from asgd.core.optim import make_optimizer


class ParameterStore:
    def __init__(self, layout: ParameterLayout, init: torch.Tensor, cfg: Config,
                 version: int = 0):
        self.cfg = cfg
        self.layout = layout
        for s in layout.specs:
            if s.dtype != "float32":
                raise ValueError(f"parameter {s.name}: only float32 parameters are served")
        self.numel = layout.numel
        if init.numel() != self.numel:
            raise ValueError(f"initial weights have {init.numel()} values, layout needs "
                             f"{self.numel}")
        self.flat = torch.nn.Parameter(init.detach().to(torch.float32).clone().reshape(-1))
        self.flat.grad = torch.zeros_like(self.flat)
        self.views = layout.views(self.flat.data)
        self.grad_np = self.flat.grad.numpy()
        self.optimizer = make_optimizer(cfg, [self.flat])
        self.version = version
        self._snapshot = None   # (version, flat copy) shared by replies at the same version

    @classmethod
    def from_model(cls, model: torch.nn.Module, cfg: Config) -> "ParameterStore":
        layout = ParameterLayout.from_model(model)
        with torch.no_grad():
            init = layout.flatten(model.parameters())
        return cls(layout, init, cfg)

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

    def step(self, lr: float) -> None:
        """One optimizer step with the gradient already in ``grad``; version += 1."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.version += 1

    def snapshot(self) -> torch.Tensor:
        """A copy of the weights at the current version, safe to send without copying again
        (the live buffer changes under zero-copy frames still queued for sending)."""
        if self._snapshot is None or self._snapshot[0] != self.version:
            self._snapshot = (self.version, self.flat.detach().clone())
        return self._snapshot[1]

    def weight_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return self.layout.named_views(self.snapshot())

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
        self._snapshot = None
