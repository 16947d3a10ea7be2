"""INT8 against fp32 inference: file size, per-batch latency and test accuracy of the registry's
MLP and LSTM (and the 1D CNN, whose convolutions dynamic quantization leaves in fp32).

    python bench/int8.py [--models mlp,lstm,cnn1d] [--steps 1500] [--repeats 5] [--out DIR]

Each model is trained briefly in this process with the project's task (its data set, shard
loader, augmentation, optimizer and schedule, one worker's worth of plain SGD steps with
``torch.optim``), written as a real run directory (``config.yaml`` and a checkpoint), then
exported with ``asgd export`` in both precisions and compared by ``asgd.tasks.export.compare``
on the test split (one torch thread; latency the median of ``--repeats`` passes, fp32 and
INT8 measured alternately in the same run). Prints one JSON object; docs/models.md quotes it.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from asgd.config import Config, from_dict, save_config
from asgd.core.checkpoint import write_checkpoint
from asgd.core.layout import trainable_parameters
from asgd.core.optim import make_optimizer, scheduled_lr
from asgd.tasks.data import ShardLoader
from asgd.tasks.export import compare, export_run
from asgd.tasks.task import build_task

MODELS = {   # the registry's models as the benchmark trains them on MNIST-1D
    "mlp": {"name": "mlp", "args": {}},
    "lstm": {"name": "lstm", "args": {"hidden": 128}},
    "cnn1d": {"name": "cnn1d", "args": {}},
}


def train_run(cfg: Config, run_dir: Path, steps: int) -> Path:
    """Train ``cfg``'s model for ``steps`` steps in this process and write a run directory
    (config.yaml, checkpoint/) as a launch would; returns it."""
    task = build_task(cfg)
    loader = ShardLoader.for_config(cfg, task.dataset, 0, 1)
    opt = make_optimizer(cfg, trainable_parameters(task.model))
    task.model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = scheduled_lr(cfg, step)
        x, y = loader.next()
        loss = F.cross_entropy(task.model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    flat = task.layout.flatten(trainable_parameters(task.model))
    write_checkpoint(run_dir / "checkpoint", steps, task.layout, flat, cfg.to_dict(),
                     cfg.optimizer.name)
    return run_dir


def model_config(name: str, steps: int) -> Config:
    return from_dict({"model": MODELS[name], "optimizer": {"name": "adam", "lr": 0.003},
                      "run": {"max_updates": steps, "workers": 1}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,lstm,cnn1d")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--out", default=None, help="where the runs go (default: a temp folder)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out or tempfile.mkdtemp(prefix="asgd-int8-"))
    results = {}
    for name in args.models.split(","):
        t = time.perf_counter()
        run = train_run(model_config(name, args.steps), out / name, args.steps)
        train_s = time.perf_counter() - t
        fp32, int8 = export_run(run), export_run(run, int8=True)
        cfg = model_config(name, args.steps)
        ds = build_task(cfg).dataset
        r = compare(fp32, int8, ds.x_test, ds.y_test, args.batch_size, args.repeats)
        r["train_s"], r["steps"] = train_s, args.steps
        results[name] = r
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
