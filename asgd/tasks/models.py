"""Model registry: small classifiers for the data sets asgd ships, plus any user model.

    model = build_model(cfg.model, input_shape=(40,), num_classes=10)

A user model is named by import path, ``package.module:factory``; the factory is called with
``input_shape``, ``num_classes`` and the config's ``args`` and returns an ``nn.Module``.
Every worker and the server build the model with the same seed, so they agree on its
parameters; the server's copy is the one that counts.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from asgd.tasks.imports import check_arguments, import_object


class MLP(nn.Module):
    def __init__(self, input_shape, num_classes, hidden=(256, 256)):
        super().__init__()
        dims = [math.prod(input_shape), *hidden]
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):                 # (B, *input_shape)
        return self.net(x.flatten(1))     # (B, classes)


class CNN1D(nn.Module):
    """The MNIST-1D paper's CNN (Greydanus 2020): three strided convolutions and a linear
    layer. ``channels=25`` is the paper's 5K-parameter model; the default is wider."""

    def __init__(self, input_shape, num_classes, channels=64):
        super().__init__()
        (length,) = input_shape[-1:]
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        out = length
        for k in (5, 3, 3):
            out = (out + 2 - k) // 2 + 1
        self.linear = nn.Linear(channels * out, num_classes)

    def forward(self, x):                       # (B, L)
        h = x.reshape(x.shape[0], 1, -1)        # (B, 1, L)
        h = self.conv1(h).relu()                # (B, C, L/2)
        h = self.conv2(h).relu()                # (B, C, L/4)
        h = self.conv3(h).relu()                # (B, C, L/8)
        return self.linear(h.flatten(1))        # (B, classes)


class CNN2D(nn.Module):
    """A small image CNN for 8x8 digits or 28x28 images (one channel)."""

    def __init__(self, input_shape, num_classes, channels=32):
        super().__init__()
        side = input_shape[-1]
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(2 * channels * (side // 4) ** 2, num_classes)

    def forward(self, x):                          # (B, H, W) or (B, 1, H, W)
        side = x.shape[-1]
        h = x.reshape(x.shape[0], 1, side, side)   # (B, 1, H, W)
        return self.head(self.features(h).flatten(1))


class LSTMClassifier(nn.Module):
    """Reads a sequence (B, T) or (B, T, F) and classifies it from the last hidden state."""

    def __init__(self, input_shape, num_classes, hidden=64, layers=1):
        super().__init__()
        features = input_shape[1] if len(input_shape) > 1 else 1
        self.lstm = nn.LSTM(features, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        if x.dim() == 2:
            x = x.unsqueeze(-1)                 # (B, T, 1)
        out, _ = self.lstm(x)                   # (B, T, H)
        return self.head(out[:, -1])            # (B, classes)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn1d": CNN1D,
    "cnn2d": CNN2D,
    "lstm": LSTMClassifier,
}


def build_model(model_cfg, input_shape, num_classes: int, seed: int = 0) -> nn.Module:
    """The configured model, initialised from ``seed`` (every process builds the same one),
    then from ``model.init_from`` when set, with the ``model.freeze`` prefixes frozen."""
    factory = model_factory(model_cfg.name)
    check_arguments(factory, model_cfg.args, f"model {model_cfg.name!r}", "model.args",
                    fixed=2)
    torch.manual_seed(seed)
    model = factory(tuple(input_shape), num_classes, **model_cfg.args)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {model_cfg.name!r} returned {type(model).__name__}, not nn.Module")
    if getattr(model_cfg, "init_from", ""):
        init_from(model, model_cfg.init_from, strict=model_cfg.init_strict)
    freeze(model, getattr(model_cfg, "freeze", ()))
    return model


# ----------------------------------------------------------------------------------------------
# transfer learning: start from another run's weights, keep some of them fixed

MAX_INIT_DEPTH = 8      # init_from chains (a run started from a run started from ...)


def source_weights(path, depth: int = 0) -> dict[str, torch.Tensor]:
    """name -> tensor of every parameter and buffer of the model in a run directory or
    checkpoint folder (or ``state.asgd`` file). A checkpoint of a run that froze layers holds
    only its trainable tensors: its model is rebuilt from its own config (its ``init_from``
    and ``freeze``) to get the frozen ones too. ConfigError when it cannot be read."""
    from pathlib import Path

    from asgd.config import ConfigError, from_dict
    from asgd.core.checkpoint import FILENAME, CheckpointError, load_checkpoint

    p = Path(path)
    if p.is_dir() and not (p / FILENAME).exists() and not (p / "shard-0").is_dir() \
            and (p / "checkpoint").is_dir():
        p = p / "checkpoint"      # a run directory
    try:
        ckpt = load_checkpoint(p)
    except CheckpointError as e:
        raise ConfigError(f"model.init_from: {e}") from None
    cfg = ckpt.config if isinstance(ckpt.config, dict) else {}
    if not (cfg.get("model") or {}).get("freeze"):
        return {k: v.clone() for k, v in ckpt.weights().items()}
    if depth >= MAX_INIT_DEPTH:
        raise ConfigError(f"model.init_from: {path} starts a chain of more than "
                          f"{MAX_INIT_DEPTH} runs, each started from the next")
    from asgd.tasks.data import dataset_shape

    src = from_dict(cfg)
    shape, classes = dataset_shape(src.data, seed=src.run.seed)
    torch.manual_seed(src.run.seed)
    model = model_factory(src.model.name)(tuple(shape), classes, **src.model.args)
    if src.model.init_from:
        _load_named(model, source_weights(src.model.init_from, depth + 1),
                    src.model.init_strict, src.model.init_from)
    from asgd.core.layout import ParameterLayout

    freeze(model, src.model.freeze)
    ckpt.layout.check_same(ParameterLayout.from_model(model), f"{path}'s checkpoint",
                           "rebuilt model's")
    ckpt.layout.load_into(model, ckpt.flat)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def init_from(model: nn.Module, path: str, strict: bool = True) -> list[str]:
    """Load the tensors of another run (``source_weights``) into ``model`` by name; returns
    the names loaded. ``strict``: every tensor of the source must exist in the model with the
    same shape and every one of the model must be in the source (ConfigError naming them);
    otherwise those that do not match are skipped."""
    return _load_named(model, source_weights(path), strict, path)


def _load_named(model: nn.Module, weights: dict, strict: bool, path) -> list[str]:
    from asgd.config import ConfigError

    own = model.state_dict()
    unknown = [k for k in weights if k not in own]             # in their models' order
    missing = [k for k in own if k not in weights]
    mismatched = [k for k in own if k in weights
                  and tuple(weights[k].shape) != tuple(own[k].shape)]
    if strict and (unknown or missing or mismatched):
        parts = []
        if mismatched:
            parts.append("shapes differ: " + ", ".join(
                f"{k} {list(weights[k].shape)} (model {list(own[k].shape)})"
                for k in mismatched))
        if unknown:
            parts.append("not in the model: " + ", ".join(unknown))
        if missing:
            parts.append("not in the source: " + ", ".join(missing))
        raise ConfigError(f"model.init_from: {path} does not match the model ("
                          + "; ".join(parts) + "); set model.init_strict: false to load "
                          "only the tensors that match")
    loaded = [k for k in own if k in weights and k not in mismatched]
    with torch.no_grad():
        for k in loaded:
            own[k].copy_(weights[k])
    return loaded


def freeze(model: nn.Module, prefixes) -> list[str]:
    """Mark the parameters whose names start with one of ``prefixes`` ``requires_grad=False``
    (they stay in the model, off the parameter layout); returns their names. ConfigError
    for a prefix that names no parameter, or when nothing would be left to train."""
    from asgd.config import ConfigError

    prefixes = list(prefixes or ())
    if not prefixes:
        return []
    names = [n for n, _ in model.named_parameters()]
    for pre in prefixes:
        if not any(n.startswith(pre) for n in names):
            raise ConfigError(f"model.freeze: {pre!r} is not the start of any parameter's "
                              f"name (the model's: {', '.join(names)})")
    frozen = []
    for n, p in model.named_parameters():
        if any(n.startswith(pre) for pre in prefixes):
            p.requires_grad_(False)
            frozen.append(n)
    if len(frozen) == len(names):
        raise ConfigError(f"model.freeze: {prefixes} freezes every parameter; nothing would "
                          "train")
    return frozen


def model_factory(name: str) -> Callable[..., nn.Module]:
    return MODELS.get(name) or import_object(name, "model")
