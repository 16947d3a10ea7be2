"""Evaluation of weights on a data set's held-out split.

    acc, loss = evaluate(model, ds.x_test, ds.y_test)
    result = evaluate_checkpoint("runs/x")       # the run's config and its last checkpoint
"""
from __future__ import annotations

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


def load_weights(model, tensors) -> None:
    """Copy (name, tensor) pairs or a name->tensor dict into ``model``'s parameters."""
    items = dict(tensors) if not isinstance(tensors, dict) else tensors
    params = dict(model.named_parameters())
    missing = set(params) - set(items)
    if missing:
        raise ValueError(f"weights lack parameters {sorted(missing)}")
    with torch.no_grad():
        for name, p in params.items():
            src = items[name]
            if tuple(src.shape) != tuple(p.shape):
                raise ValueError(f"parameter {name}: shape {tuple(src.shape)}, model has "
                                 f"{tuple(p.shape)}")
            p.copy_(src)


def evaluate_checkpoint(run_dir, checkpoint_dir=None) -> dict:
    """Evaluate a run directory's checkpoint with the run's own config (on the CPU)."""
    from asgd.config import from_dict
    from asgd.data import load_dataset
    from asgd.models import build_model
    from asgd.checkpoint import load_checkpoint

    run_dir = Path(run_dir)
    ckpt = load_checkpoint(Path(checkpoint_dir) if checkpoint_dir else run_dir / "checkpoint")
    cfg = from_dict(ckpt.config)
    ds = load_dataset(cfg.data, seed=cfg.run.seed)
    model = build_model(cfg.model, ds.input_shape, ds.num_classes, seed=cfg.run.seed)
    load_weights(model, ckpt.weights())
    acc, loss = evaluate(model, ds.x_test, ds.y_test, cfg.run.eval_batch_size)
    return {"test_accuracy": acc, "test_loss": loss, "version": ckpt.version,
            "test_samples": len(ds.x_test)}
