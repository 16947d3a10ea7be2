"""The task every process of a run builds alike: its data set and its model.

    task = build_task(cfg)                 # data set, model (seeded), layout
    task = build_task(cfg, data=False)     # the model only (the server): no data is loaded
    check_task(cfg)                        # imports and arguments, before any process starts

The model is initialised from ``run.seed`` in every process, then from ``model.init_from``
when set, so the server's initial weights and every worker's first model agree; the server's
copy is the one that counts. Parameters under ``model.freeze`` are left out of the layout
(asgd.core.layout): only the trainable ones go on the wire (docs/models.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from asgd.config import Config
from asgd.core.layout import ParameterLayout
from asgd.tasks.data import Dataset, dataset_factory, dataset_shape, load_dataset
from asgd.tasks.models import build_model, model_factory


@dataclass
class Task:
    model: nn.Module
    layout: ParameterLayout
    input_shape: tuple
    num_classes: int
    dataset: Dataset | None = None


def build_task(cfg: Config, data: bool = True) -> Task:
    """The run's model, with its data set unless ``data`` is False (then a built-in data set
    is not loaded at all: its shape is known)."""
    if data:
        ds = load_dataset(cfg.data, seed=cfg.run.seed)
        shape, classes = ds.input_shape, ds.num_classes
    else:
        ds = None
        shape, classes = dataset_shape(cfg.data, seed=cfg.run.seed)
    model = build_model(cfg.model, shape, classes, seed=cfg.run.seed)
    return Task(model, ParameterLayout.from_model(model), tuple(shape), classes, ds)


def check_task(cfg: Config) -> None:
    """ValueError unless the model and data set named by ``cfg`` import and take their
    arguments: what a launch checks before it starts any process."""
    model_factory(cfg.model.name)
    dataset_factory(cfg.data.name)
    build_task(cfg, data=False)
