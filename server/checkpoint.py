"""Checkpoints of a parameter store (the file format is asgd.checkpoint's).

    save_checkpoint(store, "runs/x/checkpoint")     # atomic: temp file, fsync, rename, fsync dir
    ckpt = load_checkpoint("runs/x/checkpoint")
"""
from __future__ import annotations

from pathlib import Path

from asgd import protocol
from asgd.checkpoint import (FILENAME, MAGIC, Checkpoint, load_checkpoint,  # noqa: F401
                             read_frames, write_frames)


def save_checkpoint(store, directory, config: dict | None = None) -> Path:
    scalars, optim_tensors = store.optimizer_state()
    header = {"kind": "asgd-checkpoint", "format": 1, "version": store.version,
              "layout": store.specs, "config": config or store.cfg.to_dict(),
              "optimizer": {"name": store.cfg.optimizer.name, "scalars": scalars}}
    tensors = [("weights", store.flat.detach())] + optim_tensors
    path = Path(directory) / FILENAME
    write_frames(path, protocol.encode(header, tensors))
    return path
