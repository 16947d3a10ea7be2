"""Inside the node: the worker's model split into stages, one per device, run as a pipeline.

    pipe = build_pipeline(cfg.worker, model, rank, example=x[:2])   # None: the plain path
    loss = pipe.forward_backward(x, y)        # gradients accumulate in the parameters' .grad

* Stages: the model as a sequence of layers (asgd/tasks/layers.py: an ``nn.Sequential``, nested
  ones flattened; the registry's models through adapters; any model with a ``stage_layers()``
  method; else its children in order, if they compute its forward), cut into
  ``len(worker.stages.devices)`` consecutive stages, balanced by parameter count, by measured
  forward+backward time, or at the split points the config names. The stages hold the model's
  own modules, so the model's parameters (what the exchange flattens and pushes) are the
  stages' parameters.
* Pipeline (GPipe, Huang et al. 2019): the batch is cut into ``worker.stages.microbatches``
  micro-batches, each goes forward through every stage (fill: at clock t stage s runs
  micro-batch t - s), the loss of each is weighted by its share of the batch, and one backward
  over all of them (drain: autograd runs the last micro-batch's nodes first) accumulates the
  whole batch's gradient. Activations cross devices with ``.to(device, non_blocking=True)``
  (blocking into the CPU, which reads them at once);
  kernel launches are asynchronous on CUDA and autograd runs one thread per device, so stages
  on different GPUs overlap. On the CPU the same schedule runs sequentially, with the same
  maths.
* Recompute (``worker.stages.recompute``): each stage runs as about sqrt(L) checkpointed segments of
  its L layers (``torch.utils.checkpoint``, non-reentrant): only segment inputs are kept, the
  rest is recomputed in backward (Chen et al. 2016).
* Offload (``worker.stages.offload_activations``): every activation autograd saves is copied to
  host memory (pinned on CUDA) when saved and brought back when backward needs it
  (``saved_tensors_hooks``, as TensorFlow Large Model Support does); weights stay put.
* Precision: every stage's forward under ``torch.autocast`` (``worker.stages.precision``); the loss
  in float32.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.weak import WeakIdKeyDictionary

from asgd.config import ConfigError
from asgd.tasks.devices import resolve_device
from asgd.tasks.layers import model_layers, split_points
from worker.precision import autocast

log = logging.getLogger("asgd.worker")

# ----------------------------------------------------------------------------------------------
# stages and the pipeline

def move(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``: asynchronously into a CUDA device (ordered on its stream); into
    the CPU the copy must be finished before the CPU reads it, so it blocks."""
    return t.to(device, non_blocking=device.type == "cuda")


class Stage:
    """Consecutive layers on one device. With ``recompute`` they run as about sqrt(L)
    checkpointed segments."""

    def __init__(self, layers, device: torch.device, precision: str = "fp32",
                 recompute: bool = False, first: int = 0):
        self.layers = list(layers) if isinstance(layers, (list, tuple)) else [layers]
        self.device, self.precision, self.first = torch.device(device), precision, first
        self.module = (self.layers[0] if len(self.layers) == 1
                       else nn.Sequential(*self.layers))
        self.module.to(self.device)
        self.segments = None
        if recompute:
            k = max(1, math.isqrt(len(self.layers) - 1) + 1) if len(self.layers) > 1 else 1
            bounds = [round(i * len(self.layers) / k) for i in range(k + 1)]
            self.segments = [nn.Sequential(*self.layers[a:b])
                             for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        h = move(h, self.device)
        with autocast(self.device, self.precision):
            if self.segments is None:
                return self.module(h)
            for seg in self.segments:
                h = checkpoint(seg, h, use_reentrant=False)
            return h

    @property
    def parameters(self) -> int:
        return sum(p.numel() for layer in self.layers for p in layer.parameters())

    def describe(self) -> str:
        last = self.first + len(self.layers) - 1
        names = ", ".join(type(m).__name__ for m in self.layers)
        seg = f", {len(self.segments)} recomputed segments" if self.segments else ""
        return (f"{self.device}: layers {self.first}-{last} ({names}), "
                f"{self.parameters:,} parameters{seg}")


def _is_weight(t: torch.Tensor) -> bool:
    """A parameter, or a view of one (what Linear saves of its weight), frozen or not."""
    base = t._base if t._base is not None else t
    return isinstance(base, nn.Parameter)


class Offload:
    """saved_tensors_hooks that keep every saved activation in host memory: copied out when
    autograd saves it (into pinned memory, asynchronously, on CUDA; a plain copy on the CPU)
    and back to its device when backward unpacks it. A tensor saved twice (a ReLU's output is
    also the next Linear's input) is copied once: the copy is found by the tensor itself, held
    weakly, so it is forgotten when the tensor is freed. ``bytes``: copied out since the last
    ``reset``."""

    def __init__(self):
        self.bytes = 0
        self._copies = WeakIdKeyDictionary()      # tensor -> (its version, its host copy)

    def reset(self):
        self.bytes = 0
        self._copies = WeakIdKeyDictionary()

    def pack(self, t: torch.Tensor):
        if _is_weight(t):
            return t
        known = self._copies.get(t)
        if known is not None and known[0] == t._version:
            return t.device, known[1]
        cuda = t.device.type == "cuda"
        host = torch.empty_like(t, device="cpu", pin_memory=cuda)
        host.copy_(t, non_blocking=cuda)
        self._copies[t] = (t._version, host)
        self.bytes += t.numel() * t.element_size()
        return t.device, host

    @staticmethod
    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=True)

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class Pipeline:
    """The stages run GPipe-style over micro-batches. ``forward_backward(x, y, scale)``:
    the batch's mean cross-entropy (float32, detached) after accumulating ``scale`` times its
    gradient into the parameters' ``.grad``."""

    def __init__(self, stages: list[Stage], microbatches: int = 1, offload: bool = False):
        self.stages, self.microbatches = stages, microbatches
        self.device = stages[0].device          # where batches go in
        self.out_device = stages[-1].device     # where the loss is computed
        self.offload = Offload() if offload else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor,
                         scale: float = 1.0) -> torch.Tensor:
        if self.offload is None:
            losses = self._fill(x, y)
        else:
            self.offload.reset()
            with self.offload.hooks():
                losses = self._fill(x, y)
        # drain: one backward over every micro-batch's loss; autograd takes the latest nodes
        # first, i.e. the last micro-batch, and on CUDA runs each device's part in its thread
        roots = losses if scale == 1.0 else [loss * scale for loss in losses]
        torch.autograd.backward(roots)
        total = losses[0].detach()
        for loss in losses[1:]:
            total = total + loss.detach()
        return total

    def _fill(self, x, y) -> list[torch.Tensor]:
        """Forward every micro-batch through every stage in GPipe's order; each micro-batch's
        loss weighted by its share of the batch, so their sum is the batch's mean loss."""
        if self.microbatches == 1:
            return [F.cross_entropy(self.forward(x).float(), move(y, self.out_device))]
        xs = [c for c in torch.tensor_split(x, self.microbatches) if len(c)]
        ys = [move(c, self.out_device) for c in torch.tensor_split(y, self.microbatches)
              if len(c)]
        m, s_count, n = len(xs), len(self.stages), len(x)
        acts, losses = list(xs), [None] * m
        for clock in range(m + s_count - 1):     # at clock t, stage s runs micro-batch t - s
            for s in range(s_count):
                i = clock - s
                if 0 <= i < m:
                    acts[i] = self.stages[s](acts[i])
                    if s == s_count - 1:
                        losses[i] = F.cross_entropy(acts[i].float(), ys[i]) * (len(xs[i]) / n)
                        acts[i] = None
        return losses

    def describe(self) -> str:
        return "; ".join(f"stage {i} on {s.describe()}" for i, s in enumerate(self.stages))


def _probe(pipe: Pipeline, model: nn.Module, example: torch.Tensor, precision: str) -> None:
    """One forward and backward of a few inputs through the pipeline, so that what cannot run
    (an op without a kernel in this precision on this device: oneDNN's LSTM in fp16 on the CPU)
    fails at start-up, naming the key, rather than at the first step. The gradients it leaves
    are cleared."""
    training = model.training
    model.eval()
    try:
        labels = torch.zeros(len(example), dtype=torch.long, device=pipe.device)
        pipe.forward_backward(example.to(pipe.device), labels)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        key = "worker.stages.precision" if precision != "fp32" else "worker.stages.devices"
        raise ConfigError(f"{key}: model {type(model).__name__} does not run in "
                          f"{precision} on {pipe.device.type}: {first}") from None
    finally:
        model.train(training)
        for p in model.parameters():
            p.grad = None


# ----------------------------------------------------------------------------------------------

def is_plain(wcfg) -> bool:
    """No key of this module set: the worker's plain path (no pipeline object at all)."""
    return (wcfg.stages.devices is None and wcfg.stages.microbatches == 1
            and wcfg.stages.precision == "fp32" and not wcfg.stages.recompute
            and not wcfg.stages.offload_activations)


def build_pipeline(wcfg, model: nn.Module, rank: int, example: torch.Tensor,
                   default_device: torch.device | None = None) -> Pipeline | None:
    """The worker's pipeline from its config (None when none of its keys is set): the model
    split and every stage moved to its device. ``example``: a few training inputs (on the
    CPU), to check the split and, with ``split: time``, to time the layers."""
    if is_plain(wcfg):
        return None
    if wcfg.stages.devices:
        try:
            devices = [resolve_device(d, rank) for d in wcfg.stages.devices]
        except ValueError as e:
            raise ConfigError(f"worker.stages.devices: {e}") from None
    else:
        devices = [default_device or resolve_device(wcfg.device, rank)]
    precision = wcfg.stages.precision
    if precision == "bf16" and any(d.type == "cuda" and not torch.cuda.is_bf16_supported()
                                   for d in devices):
        raise ConfigError("worker.stages.precision: bf16 is not supported by this GPU")
    if len(devices) == 1 and not wcfg.stages.recompute:
        stages = [Stage(model, devices[0], precision)]        # the model's own forward
    else:
        try:
            layers = model_layers(model, example[:2])
        except ConfigError:
            if len(devices) > 1:
                raise
            log.warning("worker.stages.recompute: model %s is not a sequence of layers (%s): it is "
                        "recomputed as one segment", type(model).__name__, HOW_TO_SPLIT)
            layers = [model]
        micro = example[:max(1, len(example) // wcfg.stages.microbatches)]
        points = split_points(layers, len(devices), wcfg.stages.split, micro, devices[0])
        bounds = [0, *points, len(layers)]
        stages = [Stage(layers[a:b], d, precision, wcfg.stages.recompute, first=a)
                  for a, b, d in zip(bounds[:-1], bounds[1:], devices)]
    pipe = Pipeline(stages, wcfg.stages.microbatches, offload=wcfg.stages.offload_activations)
    _probe(pipe, model, example[:2], precision)
    log.info("pipeline: %d micro-batch(es), %s%s%s; %s", wcfg.stages.microbatches, precision,
             ", recompute" if wcfg.stages.recompute else "",
             ", offloaded activations" if wcfg.stages.offload_activations else "", pipe.describe())
    return pipe
