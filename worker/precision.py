"""Mixed precision for the worker: autocast around the forward, and fp16's loss scaler.

    with autocast(device, "bf16"):          # a no-op context for fp32
        out = model(x)
    scaler = LossScaler()                   # fp16 only
    (scaler.scale * loss).backward()
    if scaler.unscale_and_update(flat_grad):   # False: inf/nan, skip the step, push nothing
        push(flat_grad)

bf16 keeps float32's range, so its gradients need no scaling. fp16 does: small gradients
underflow to zero, so the loss is multiplied by a large scale before backward and the gradient
divided by it after; a gradient that overflowed (inf or nan) is not pushed, the scale shrinks,
and it grows again after ``growth_interval`` good steps in a row. These are
``torch.amp.GradScaler``'s semantics, on the worker's one flat gradient rather than on an
optimizer's parameters (the optimizer is on the server), so the same code runs, and is tested,
on the CPU.
"""
from __future__ import annotations

import contextlib
import math

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(device: torch.device, precision: str):
    """``torch.autocast`` for ``device``'s type in ``precision``'s dtype; a null context for
    fp32 (no autocast state is touched)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])


class LossScaler:
    """The dynamic loss scale of fp16 training (GradScaler's defaults).

    ``scale``: what the loss is multiplied by before backward. ``unscale_and_update(grad)``
    divides the flat gradient by it in place and says whether every value is finite; an
    overflow halves the scale (``backoff_factor``), ``growth_interval`` finite steps in a row
    double it (``growth_factor``). ``exhausted``: the scale has shrunk below ``min_scale``, so
    the overflows are the model's own (a diverged run), not the scale's."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000,
                 min_scale: float = 2.0 ** -16):
        if not (init_scale > 0 and growth_factor > 1 and 0 < backoff_factor < 1
                and growth_interval >= 1):
            raise ValueError("LossScaler: need init_scale > 0, growth_factor > 1, "
                             "0 < backoff_factor < 1, growth_interval >= 1")
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval, self.min_scale = growth_interval, min_scale
        self.good_steps = 0          # finite steps since the last overflow or growth
        self.overflows = 0           # steps skipped so far

    def unscale_(self, grad: torch.Tensor) -> bool:
        """``grad /= scale`` in place; True when every value is finite."""
        grad.mul_(1.0 / self.scale)
        return bool(torch.isfinite(grad).all())

    def update(self, finite: bool) -> None:
        if not finite:
            self.overflows += 1
            self.good_steps = 0
            self.scale *= self.backoff_factor
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.good_steps = 0
            grown = self.scale * self.growth_factor
            if math.isfinite(grown) and grown <= torch.finfo(torch.float32).max:
                self.scale = grown

    def unscale_and_update(self, grad: torch.Tensor) -> bool:
        """Unscale the flat gradient, update the scale; False means: skip this step."""
        finite = self.unscale_(grad)
        self.update(finite)
        return finite

    @property
    def exhausted(self) -> bool:
        return self.scale < self.min_scale

    def state(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps,
                "overflows": self.overflows}
