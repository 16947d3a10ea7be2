"""Evaluation of weights on a data set's held-out split.

    acc, loss = evaluate(model, ds.x_test, ds.y_test)
    result = evaluate_checkpoint("runs/x")       # the run's config and its last checkpoint
    result = evaluate_flat(task, flat)           # a flat weight buffer (a live pull)
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate(model, x, y, batch_size: int = 1000) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on (x, y)."""
    was_training = model.training
    model.eval()
    correct, total_loss = 0, 0.0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        logits = model(xb)
        total_loss += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    model.train(was_training)
    n = max(len(x), 1)
    return correct / n, total_loss / n


def evaluate_flat(task, flat: torch.Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """Load a flat weight buffer into the task's model and evaluate it on the test split."""
    task.layout.load_into(task.model, flat)
    return evaluate(task.model, task.dataset.x_test, task.dataset.y_test, batch_size)


def evaluate_checkpoint(run_dir, checkpoint_dir=None) -> dict:
    """Evaluate a run directory's checkpoint with the run's own config (on the CPU). The
    loss is None when it is not finite (JSON has no NaN)."""
    from asgd.config import from_dict
    from asgd import rundir
    from asgd.core.checkpoint import load_checkpoint
    from asgd.tasks.task import build_task

    run_dir = Path(run_dir)
    ckpt = load_checkpoint(rundir.checkpoint_dir(run_dir, checkpoint_dir))
    cfg = from_dict(ckpt.config)
    task = build_task(cfg)
    ckpt.layout.check_same(task.layout, "checkpoint's", "configured model's")
    acc, loss = evaluate_flat(task, ckpt.flat, cfg.run.eval_batch_size)
    return {"test_accuracy": acc, "test_loss": loss if math.isfinite(loss) else None,
            "version": ckpt.version, "test_samples": len(task.dataset.x_test)}
