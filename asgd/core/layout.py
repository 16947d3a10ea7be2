"""The parameter layout: the model's tensors in order, and where each lives in one flat buffer.

    layout = ParameterLayout.from_model(model)        # or .from_specs(hello_reply["tensors"])
    flat = layout.flatten(trainable_parameters(model))   # (numel,) float32, layout order
    for name, view in layout.named_views(flat): ...   # per-tensor views into ``flat``
    layout.load_into(model, flat)                     # copy a flat buffer into a model
    layout.check_same(other, "worker", "server")      # ValueError naming the difference

The server keeps its weights, gradients and optimizer state as flat buffers in this order; the
wire carries one frame per tensor in the same order; checkpoints store the flat buffer with
the spec list. Every place that needs offsets asks this object, so they agree by construction.

Only trainable parameters (``requires_grad``) are in a layout: a frozen parameter
(``model.freeze``, docs/models.md) stays in the model but never goes on the wire, into the
server's store or into a checkpoint. ``trainable_parameters(model)`` lists the parameters a
layout describes, in its order; every place that pairs parameters with a layout uses it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch


def trainable_named_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every parameter that trains, in the model's order: a layout's."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters a layout of ``model`` describes, in its order (frozen ones left out)."""
    return [p for _, p in trainable_named_parameters(model)]


@dataclass(frozen=True)
class TensorSpec:
    """One parameter as it goes on the wire."""

    name: str
    dtype: str
    shape: tuple

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


class ParameterLayout:
    def __init__(self, specs: Iterable[TensorSpec]):
        self.specs = tuple(specs)
        sizes = [s.numel for s in self.specs]
        self.offsets = [0, *np.cumsum(sizes, dtype=np.int64).tolist()] if sizes else [0]
        self.numel = int(self.offsets[-1])

    @classmethod
    def from_specs(cls, specs: Iterable[dict]) -> "ParameterLayout":
        """From the wire's parameter list (``{"name", "dtype", "shape"}`` maps)."""
        return cls(TensorSpec(s["name"], s["dtype"], tuple(s["shape"])) for s in specs)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "ParameterLayout":
        return cls(TensorSpec(n, str(p.dtype).replace("torch.", ""), tuple(p.shape))
                   for n, p in trainable_named_parameters(model))

    # ------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.specs)

    def __eq__(self, other) -> bool:
        return isinstance(other, ParameterLayout) and self.specs == other.specs

    __hash__ = None

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def to_specs(self) -> list[dict]:
        return [s.to_dict() for s in self.specs]

    def spans(self) -> list[tuple[int, int]]:
        """(start, end) of each tensor in the flat buffer."""
        return list(zip(self.offsets[:-1], self.offsets[1:]))

    def check_same(self, other: "ParameterLayout", mine: str = "this",
                   theirs: str = "that") -> None:
        """ValueError naming the first difference between two layouts."""
        if self == other:
            return
        for i, (a, b) in enumerate(zip(self.specs, other.specs)):
            if a != b:
                raise ValueError(f"the {mine} and {theirs} parameters differ at tensor {i}: "
                                 f"{mine} {a.name} {a.dtype}{list(a.shape)}, "
                                 f"{theirs} {b.name} {b.dtype}{list(b.shape)}")
        raise ValueError(f"the {mine} model has {len(self)} tensors, the {theirs} "
                         f"{len(other)}")

    # ------------------------------------------------------------------------------------------
    # flat buffers

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-tensor views into ``flat`` (no copies), in layout order."""
        if flat.numel() != self.numel:
            raise ValueError(f"a flat buffer of {flat.numel()} values, the layout needs "
                             f"{self.numel}")
        return [flat[a:b].view(s.shape) for s, (a, b) in zip(self.specs, self.spans())]

    def named_views(self, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return list(zip(self.names, self.views(flat)))

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """name -> view, for ``load_state_dict``-style use."""
        return dict(self.named_views(flat))

    def flatten(self, tensors: Iterable, out: torch.Tensor | None = None) -> torch.Tensor:
        """One flat float32 buffer from tensors or arrays in layout order (into ``out`` when
        given). ValueError when a count or shape does not match. Frozen parameters
        (``nn.Parameter`` with ``requires_grad`` False) are skipped, so ``model.parameters()``
        gives the same buffer as ``trainable_parameters(model)``."""
        tensors = [t for t in tensors
                   if not (isinstance(t, torch.nn.Parameter) and not t.requires_grad)]
        if len(tensors) != len(self.specs):
            raise ValueError(f"{len(tensors)} tensors, the layout has {len(self.specs)}")
        if out is None:
            out = torch.empty(self.numel, dtype=torch.float32)
        for t, s, (a, b) in zip(tensors, self.specs, self.spans()):
            t = torch.as_tensor(t)
            if tuple(t.shape) != s.shape:
                raise ValueError(f"tensor {s.name}: shape {list(t.shape)}, expected "
                                 f"{list(s.shape)}")
            out[a:b].copy_(t.detach().reshape(-1))
        return out

    def parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """``model``'s parameters that this layout describes, in its order (its trainable
        ones); ValueError when they do not match the layout."""
        ParameterLayout.from_model(model).check_same(self, "model's", "layout's")
        return trainable_parameters(model)

    def load_into(self, model: torch.nn.Module, flat: torch.Tensor) -> None:
        """Copy a flat buffer into ``model``'s trainable parameters (any device); frozen ones
        are left as they are."""
        params = trainable_parameters(model)
        self.check_same(ParameterLayout.from_model(model), "stored", "model's")
        with torch.no_grad():
            for p, v in zip(params, self.views(flat)):
                p.copy_(v, non_blocking=True)
