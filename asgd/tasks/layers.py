"""A model as a sequence of layers, and where to cut it into stages: what the worker's pipeline
(worker/stages.py) runs and what a launcher checks before it starts any process.

    layers = model_layers(model, example)          # ConfigError naming what to do instead
    points = split_points(layers, 2, "params")     # or "time", or the config's split points
    check_split(cfg)                               # the configured split, on no device

A sequence: an ``nn.Sequential`` (nested ones flattened), the registry's models through the
adapters below, any model with a ``stage_layers()`` method, else its children in order if they
compute its forward; every sequence is checked against the model's forward.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from asgd.config import ConfigError
from asgd.tasks import models as registry


class Reshape(nn.Module):
    """(B, ...) -> (B, *shape); ``-1`` allowed. ``side=True``: (B, 1, S, S) with S the input's
    last size (CNN2D's square images)."""

    def __init__(self, *shape, square: bool = False):
        super().__init__()
        self.shape, self.square = shape, square

    def forward(self, x):
        if self.square:
            side = x.shape[-1]
            return x.reshape(x.shape[0], 1, side, side)
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self):
        return "square" if self.square else ", ".join(map(str, self.shape))


class FeatureAxis(nn.Module):
    """(B, T) -> (B, T, 1); (B, T, F) unchanged (LSTMClassifier's input)."""

    def forward(self, x):
        return x.unsqueeze(-1) if x.dim() == 2 else x


class SequenceOutput(nn.Module):
    """An ``nn.LSTM``/``nn.GRU``'s output sequence, without its final state."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0]


class LastStep(nn.Module):
    def forward(self, x):                   # (B, T, H) -> (B, H)
        return x[:, -1]


def _mlp(m):
    return [nn.Flatten(1), *m.net]


def _cnn1d(m):
    return [Reshape(1, -1), m.conv1, nn.ReLU(), m.conv2, nn.ReLU(), m.conv3, nn.ReLU(),
            nn.Flatten(1), m.linear]


def _cnn2d(m):
    return [Reshape(square=True), *m.features, nn.Flatten(1), m.head]


def _lstm(m):
    return [FeatureAxis(), SequenceOutput(m.lstm), LastStep(), m.head]


# The registry's models, each as the sequence of layers its forward runs (checked against the
# forward when a model is split, like every other sequence).
ADAPTERS = {registry.MLP: _mlp, registry.CNN1D: _cnn1d, registry.CNN2D: _cnn2d,
            registry.LSTMClassifier: _lstm}

HOW_TO_SPLIT = ("give an nn.Sequential, or a stage_layers() method returning the layers in "
                "the order its forward runs them (parameterless steps such as reshapes as "
                "modules too)")


def _flatten(modules) -> list[nn.Module]:
    out = []
    for m in modules:
        out.extend(_flatten(m) if isinstance(m, nn.Sequential) else [m])
    return out


def model_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """``model`` as a sequence of layers whose composition is its forward; ConfigError naming
    what to provide when there is none. ``example``: a few inputs to check it on."""
    name = type(model).__name__
    if hasattr(model, "stage_layers"):
        layers, how = _flatten(model.stage_layers()), "its stage_layers()"
    elif type(model) in ADAPTERS:
        layers, how = _flatten(ADAPTERS[type(model)](model)), "the registry's layer list"
    elif isinstance(model, nn.Sequential):
        layers, how = _flatten(model), "its layers"
    else:
        layers, how = _flatten(model.children()), "its children in order"
    if not layers:
        raise ConfigError(f"worker.stages.devices: model {name} has no layers to split; "
                          f"{HOW_TO_SPLIT}")
    _check_parameters(model, layers, name)
    _check_equivalent(model, layers, example, name, how)
    return layers


def _check_parameters(model, layers, name) -> None:
    """Every parameter of the model in exactly one layer."""
    owner = {}
    for i, layer in enumerate(layers):
        for p in layer.parameters():
            if id(p) in owner and owner[id(p)] != i:
                raise ConfigError(f"worker.stages.devices: a parameter of model {name} is used by "
                                  f"layers {owner[id(p)]} and {i}; shared weights cannot be "
                                  "split across stages")
            owner[id(p)] = i
    missing = [n for n, p in model.named_parameters() if id(p) not in owner]
    if missing:
        raise ConfigError(f"worker.stages.devices: the layers of model {name} do not hold "
                          f"{', '.join(missing[:3])}; {HOW_TO_SPLIT}")


def _check_equivalent(model, layers, example, name, how) -> None:
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            want = model(example)
            got = example
            try:
                for layer in layers:
                    got = layer(got)
            except Exception as e:   # noqa: BLE001 - any failure means "not its forward"
                raise ConfigError(f"worker.stages.devices: model {name} cannot be split: running "
                                  f"{how} one after another fails ({type(e).__name__}: {e}); "
                                  f"{HOW_TO_SPLIT}") from None
    finally:
        model.train(training)
    if not (isinstance(got, torch.Tensor) and got.shape == want.shape
            and torch.allclose(got, want, rtol=1e-4, atol=1e-5)):
        raise ConfigError(f"worker.stages.devices: model {name} cannot be split: {how} do not "
                          f"compute its forward; {HOW_TO_SPLIT}")


# ----------------------------------------------------------------------------------------------
# where to cut

def balance(costs: list[float], stages: int) -> list[int]:
    """Split points (increasing, in (0, len(costs))) cutting ``costs`` into ``stages``
    non-empty consecutive runs whose largest sum is as small as it can be (dynamic
    programming over prefix sums)."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot cut {n} layers into {stages} stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: the smallest largest sum cutting the first i layers into k runs
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n - (stages - k) + 1):
            for j in range(k - 1, i):
                v = max(best[k - 1][j], prefix[i] - prefix[j])
                if v < best[k][i]:
                    best[k][i], cut[k][i] = v, j
    points, i = [], n
    for k in range(stages, 1, -1):
        i = cut[k][i]
        points.append(i)
    return points[::-1]


def parameter_costs(layers) -> list[float]:
    return [float(sum(p.numel() for p in layer.parameters())) for layer in layers]


def time_costs(layers, example: torch.Tensor, device: torch.device,
               repeats: int = 3) -> list[float]:
    """Each layer's forward+backward seconds (the median of ``repeats``) on ``example``, on
    ``device``; the layers go back where they were, their gradients are cleared."""
    homes = [next(iter(layer.parameters()), None) for layer in layers]
    homes = [p.device if p is not None else None for p in homes]
    inputs, h = [], example.to(device)
    with torch.no_grad():
        for layer in layers:
            layer.to(device)
            inputs.append(h)
            h = layer(h)
    costs = []
    for layer, x in zip(layers, inputs):
        x = x.detach().requires_grad_(x.is_floating_point())
        runs = []
        for _ in range(repeats + 1):            # the first run warms up
            t = time.perf_counter()
            out = layer(x)
            if out.requires_grad:
                out.backward(torch.ones_like(out))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            runs.append(time.perf_counter() - t)
        costs.append(statistics.median(runs[1:]))
    for layer, home in zip(layers, homes):
        for p in layer.parameters():
            p.grad = None
        if home is not None:
            layer.to(home)
    return costs


def split_points(layers, stages: int, split, example=None, device=None) -> list[int]:
    """Where to cut ``layers`` into ``stages``: ``split`` is params, time or the points."""
    n = len(layers)
    if stages > n:
        raise ConfigError(f"worker.stages.devices: {stages} stages but the model has only {n} "
                          "layers")
    if isinstance(split, (list, tuple)):
        points = [int(i) for i in split]
        if len(points) != stages - 1:
            raise ConfigError(f"worker.stages.split: {len(points)} split points for {stages} "
                              "stages")
        if any(not 0 < i < n for i in points) or points != sorted(set(points)):
            raise ConfigError(f"worker.stages.split: split points {points} out of range: they must "
                              f"increase within 1..{n - 1} (the model has {n} layers)")
        return points
    if split == "params":
        return balance(parameter_costs(layers), stages)
    if split == "time":
        return balance(time_costs(layers, example, device or torch.device("cpu")), stages)
    raise ConfigError(f"worker.stages.split: {split!r} is not params, time or a list of split "
                      "points")


def check_split(cfg) -> None:
    """ConfigError unless the configured model can be cut as ``worker.stages.devices`` and
    ``worker.stages.split`` say: what a launcher can check before it starts any process. Nothing is
    placed on a device (no CUDA is initialised) and ``split: time`` is not timed."""
    w = cfg.worker
    if not w.stages.devices or len(w.stages.devices) < 2:
        return
    from asgd.tasks.task import build_task

    task = build_task(cfg, data=False)
    example = torch.randn(2, *task.input_shape, generator=torch.Generator().manual_seed(0))
    layers = model_layers(task.model, example)
    split_points(layers, len(w.stages.devices),
                 w.stages.split if w.stages.split != "time" else "params")
