"""The task every process of a run builds alike: its data set and its model.

    task = build_task(cfg)                 # data set, model (seeded), layout
    task = build_task(cfg, data=False)     # the model only (the server): no data is loaded
    check_task(cfg)     # imports, arguments, labels and outputs, before any process starts
    check_devices(cfg)  # CUDA asked for where there is none: one line

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
from asgd.tasks.contract import check_outputs, cuda_names
from asgd.tasks.data import DATASETS, Dataset, dataset_factory, dataset_shape, load_dataset
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
    # one logit per class, or the built-in loop cannot train it (asgd.tasks.contract)
    sample = ds.x_train[:2] if ds is not None else torch.zeros(2, *shape)
    check_outputs(model, cfg.model.name, sample, classes)
    return Task(model, ParameterLayout.from_model(model), tuple(shape), classes, ds)


def check_task(cfg: Config) -> Task:
    """The task, or ValueError unless the model and data set named by ``cfg`` import, take
    their arguments and are what the built-in loop can train (asgd.tasks.contract): what a
    launch checks before it starts any process. A user's data set is loaded to check its
    labels (the task returned holds it); a built-in one is not (its labels are known)."""
    model_factory(cfg.model.name)
    dataset_factory(cfg.data.name)
    return build_task(cfg, data=cfg.data.name not in DATASETS)


def check_devices(cfg: Config) -> None:
    """ValueError, one line, when the workers are asked to run on CUDA that this machine does
    not have (none at all, or not that index). Only asks torch whether CUDA is there and how
    many devices it has: CUDA is never initialised in this process."""
    asked = cuda_names(cfg)
    if not asked:
        return
    key, name = asked[0]
    if not torch.cuda.is_available():
        build = "" if torch.version.cuda else ", a CPU-only build"
        raise ValueError(f"{key} asks for {name!r} but CUDA is not available on this machine "
                         f"(torch {torch.__version__}{build}); use worker.device=cpu, or auto "
                         "(CUDA where there is one)")
    count = torch.cuda.device_count()
    for key, name in asked:
        index = name.split(":")[-1] if ":" in name else name if name.isdigit() else "0"
        if index.isdigit() and int(index) >= count:    # {local_rank} wraps around: always ok
            raise ValueError(f"{key} asks for {name!r} but this machine has {count} CUDA "
                             f"device{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})")

