"""Checkpoints of a parameter store (the file format is ``asgd.core.checkpoint``'s).

    save_store(store, "runs/x/checkpoint")       # atomic, checksummed
    resume_store(store, "runs/x/checkpoint")     # weights, optimizer state and version back
"""
from __future__ import annotations

from pathlib import Path

from asgd.core.checkpoint import CheckpointError, load_checkpoint, write_checkpoint


def save_store(store, directory, config: dict | None = None) -> Path:
    """A checkpoint of the store (the newest ``server.checkpoint_keep`` are kept)."""
    scalars, optim_tensors = store.optimizer_state()
    return write_checkpoint(directory, store.version, store.layout, store.true_weights,
                            config or store.cfg.to_dict(), store.cfg.optimizer.name, scalars,
                            optim_tensors, span=store.span,
                            keep=store.cfg.server.checkpoint_keep, settings=store.settings)


def resume_store(store, directory) -> list[str]:
    """Load the newest good checkpoint into ``store``; CheckpointError when there is none or
    it is of another model. Returns why newer ones were skipped (damaged). A store without
    a model (no model.name) takes the checkpoint's, with the settings of the worker it was
    adopted from (``store.cfg`` then holds them: server.adopt)."""
    ckpt = load_checkpoint(directory)
    if not store.has_model:
        import torch

        from server.adopt import SettingsError, apply_settings

        try:
            cfg = apply_settings(store.cfg, ckpt.settings)
            store.adopt(ckpt.layout, torch.empty(ckpt.layout.numel), cfg, ckpt.settings)
        except (SettingsError, ValueError) as e:
            raise CheckpointError(f"checkpoint {directory}: {e}") from None
    try:
        ckpt.layout.check_same(store.layout, "checkpoint's", "configured model's")
    except ValueError as e:
        raise CheckpointError(f"checkpoint {directory} holds a different model: {e}") from None
    if (ckpt.span or (0, ckpt.layout.numel)) != tuple(store.span):
        raise CheckpointError(f"checkpoint {directory} holds values {ckpt.span or 'all'}, this "
                              f"server serves {store.span} (a different server.shards?)")
    store.load_weights(ckpt.flat, ckpt.version)
    store.load_optimizer_state(ckpt.optimizer_scalars, ckpt.optimizer_tensors)
    return ckpt.skipped
