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
    """The configured model, initialised from ``seed`` (every process builds the same one)."""
    factory = model_factory(model_cfg.name)
    check_arguments(factory, model_cfg.args, f"model {model_cfg.name!r}", "model.args",
                    fixed=2)
    torch.manual_seed(seed)
    model = factory(tuple(input_shape), num_classes, **model_cfg.args)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {model_cfg.name!r} returned {type(model).__name__}, not nn.Module")
    return model


def model_factory(name: str) -> Callable[..., nn.Module]:
    return MODELS.get(name) or import_object(name, "model")
