"""The parameter store: every weight in one flat buffer, the optimizer beside it, a version.

    store = ParameterStore.from_model(model, cfg)
    result = store.push(grads, base_version=3)   # grads: list of arrays in layout order
    result.applied, result.staleness, store.version

The flat buffer is one float32 allocation; ``views`` are per-tensor views into it in the
model's parameter order. The optimizer is torch.optim's, run on the flat buffer as a single
parameter (its update rules are elementwise, so this is the same arithmetic as per tensor).
The learning rate of each update is the schedule at the current version times the policy's
factor. A push that fails validation changes nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from asgd.config import Config
from asgd.optim import make_optimizer, scheduled_lr  # noqa: F401 (re-exported)
from asgd.policies import decide, parse_policy


# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PushResult:
    applied: bool
    staleness: int
    version: int          # the version after this push
    lr: float = 0.0
    reason: str = ""


class ParameterStore:
    def __init__(self, specs: list[dict], init: torch.Tensor, cfg: Config, version: int = 0):
        self.cfg = cfg
        self.specs = [dict(s) for s in specs]
        for s in self.specs:
            if s["dtype"] != "float32":
                raise ValueError(f"parameter {s['name']}: only float32 parameters are served")
        sizes = [math.prod(s["shape"]) for s in self.specs]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
        self.numel = self.offsets[-1]
        if init.numel() != self.numel:
            raise ValueError(f"initial weights have {init.numel()} values, layout needs {self.numel}")
        self.flat = torch.nn.Parameter(init.detach().to(torch.float32).clone().reshape(-1))
        self.flat.grad = torch.zeros_like(self.flat)
        self.views = [self.flat.data[a:b].view(s["shape"])
                      for s, a, b in zip(self.specs, self.offsets[:-1], self.offsets[1:])]
        self.grad_np = self.flat.grad.numpy()
        self.optimizer = make_optimizer(cfg, [self.flat])
        self.version = version
        self._snapshot = None   # (version, flat copy) shared by replies at the same version
        self.policy = parse_policy(cfg.server.policy)
        self.dc_fallbacks = 0   # dc pushes older than the kept history
        if "dc" in self.policy:
            # DC needs the weights each gradient was computed from: a ring of the last
            # dc_history versions (dc_history x 4 bytes x parameters of server memory), and
            # for the adaptive variant the running mean square of the gradient.
            k = cfg.server.dc_history
            self._ring = torch.empty(k, self.numel)
            self._ring_versions = [-1] * k
            self._mean_square = torch.zeros(self.numel) if cfg.server.dc_adaptive else None
            self._remember()

    @classmethod
    def from_model(cls, model: torch.nn.Module, cfg: Config) -> "ParameterStore":
        from asgd.models import parameter_specs

        with torch.no_grad():
            init = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        return cls(parameter_specs(model), init, cfg)

    @property
    def names(self) -> list[str]:
        return [s["name"] for s in self.specs]

    # ------------------------------------------------------------------------------------------

    def staleness_of(self, base_version: int) -> int:
        return self.version - base_version

    def load_grad(self, grads) -> None:
        """Copy a gradient (arrays in layout order) into ``flat.grad``."""
        for (a, b), g in zip(zip(self.offsets[:-1], self.offsets[1:]), grads):
            np.copyto(self.grad_np[a:b], np.asarray(g).reshape(-1), casting="same_kind")

    def add_grad(self, grads, into: torch.Tensor) -> None:
        """Add a gradient (arrays in layout order) to a flat accumulator."""
        acc = into.numpy()
        for (a, b), g in zip(zip(self.offsets[:-1], self.offsets[1:]), grads):
            acc[a:b] += np.asarray(g).reshape(-1)

    def push(self, grads, base_version: int, lr_scale: float = 1.0) -> PushResult:
        """Apply one gradient (arrays in layout order, already validated) computed from
        ``base_version``, subject to the staleness policy."""
        staleness = self.staleness_of(base_version)
        sv = self.cfg.server
        decision = decide(self.policy, staleness, sv.max_staleness)
        if not decision.apply:
            return PushResult(False, staleness, self.version, 0.0, decision.reason)
        self.load_grad(grads)
        if "dc" in self.policy:
            self._compensate(base_version)
        lr = scheduled_lr(self.cfg, self.version) * decision.lr_scale * lr_scale
        self.apply_flat_grad(lr)
        return PushResult(True, staleness, self.version, lr)

    def apply_flat_grad(self, lr: float) -> None:
        """One optimizer step with the gradient already in ``flat.grad``; version += 1."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.version += 1
        if "dc" in self.policy:
            self._remember()

    # ------------------------------------------------------------------------------------------
    # delay compensation

    def _remember(self) -> None:
        slot = self.version % len(self._ring_versions)
        self._ring[slot].copy_(self.flat.detach())
        self._ring_versions[slot] = self.version

    def weights_at(self, version: int) -> torch.Tensor:
        """The weights of ``version`` if kept, else the oldest kept (counted in dc_fallbacks)."""
        slot = version % len(self._ring_versions)
        if self._ring_versions[slot] == version:
            return self._ring[slot]
        self.dc_fallbacks += 1
        kept = [v for v in self._ring_versions if v >= 0]
        oldest = min(kept)
        return self._ring[oldest % len(self._ring_versions)]

    def _compensate(self, base_version: int) -> None:
        """flat.grad <- g + λ g⊙g⊙(w_now − w_base) (DC-ASGD; adaptive λ by default)."""
        from asgd.policies import dc_compensate

        sv = self.cfg.server
        g = self.flat.grad
        if sv.dc_adaptive:   # DC-ASGD-a: λ_t = λ0 / sqrt(MeanSquare(g)), momentum 0.95
            self._mean_square.mul_(0.95).addcmul_(g, g, value=0.05)
            lam = sv.dc_lambda / (self._mean_square.sqrt() + 1e-7)
        else:
            lam = sv.dc_lambda
        if base_version == self.version:
            return
        w_base = self.weights_at(base_version)
        g.copy_(dc_compensate(g, self.flat.detach(), w_base, lam))

    def snapshot(self) -> torch.Tensor:
        """A copy of the weights at the current version, safe to send without copying again
        (the live buffer changes under zero-copy frames still queued for sending)."""
        if self._snapshot is None or self._snapshot[0] != self.version:
            self._snapshot = (self.version, self.flat.detach().clone())
        return self._snapshot[1]

    def weight_tensors(self) -> list[tuple[str, torch.Tensor]]:
        snap = self.snapshot()
        return [(s["name"], snap[a:b].view(s["shape"]))
                for s, a, b in zip(self.specs, self.offsets[:-1], self.offsets[1:])]

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
            state[k] = torch.tensor(v["tensor"], dtype=torch.float32) if isinstance(v, dict) else v
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
        if "dc" in self.policy:
            self._ring_versions = [-1] * len(self._ring_versions)
            self._remember()
