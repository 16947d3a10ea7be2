"""Checkpoints of a parameter store (the file format is ``asgd.core.checkpoint``'s).

    save_store(store, "runs/x/checkpoint")       # atomic, checksummed
    resume_store(store, "runs/x/checkpoint")     # weights, optimizer state and version back
"""
from __future__ import annotations

from pathlib import Path

from asgd.core.checkpoint import CheckpointError, load_checkpoint, write_checkpoint


def save_store(store, directory, config: dict | None = None) -> Path:
    scalars, optim_tensors = store.optimizer_state()
    return write_checkpoint(directory, store.version, store.layout, store.weights,
                            config or store.cfg.to_dict(), store.cfg.optimizer.name, scalars,
                            optim_tensors, span=store.span)


def resume_store(store, directory) -> None:
    """Load a checkpoint into ``store``; CheckpointError when it is missing, damaged or of
    another model."""
    ckpt = load_checkpoint(directory)
    try:
        ckpt.layout.check_same(store.layout, "checkpoint's", "configured model's")
    except ValueError as e:
        raise CheckpointError(f"checkpoint {directory} holds a different model: {e}") from None
    if (ckpt.span or (0, ckpt.layout.numel)) != tuple(store.span):
        raise CheckpointError(f"checkpoint {directory} holds values {ckpt.span or 'all'}, this "
                              f"server serves {store.span} (a different server.shards?)")
    store.load_weights(ckpt.flat, ckpt.version)
    store.load_optimizer_state(ckpt.optimizer_scalars, ckpt.optimizer_tensors)
