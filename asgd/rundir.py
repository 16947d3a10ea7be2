"""Where a run keeps its checkpoint, worked out in one place for the server, the launcher and
every command that reads a run (``asgd eval``, ``asgd export``).

    checkpoint_dir(run_dir)                          # <run dir>/checkpoint
    checkpoint_dir(run_dir, "/ckpt", shard=1, shards=2)   # /ckpt/shard-1 (server.checkpoint_dir)
    checkpoint_dirs(cfg, run_dir)                    # every shard's, in shard order

Loading ``checkpoint_dir(run_dir)`` of a sharded run assembles the whole model from its
``shard-I`` folders (asgd.core.checkpoint.load_checkpoint).
"""
from __future__ import annotations

from pathlib import Path


def checkpoint_dir(run_dir=None, configured=None, shard: int = 0, shards: int = 1) -> Path:
    """The folder of shard ``shard`` of ``shards``: ``configured`` (server.checkpoint_dir, or
    a --checkpoint option) if given, else ``<run_dir>/checkpoint`` (``./checkpoint`` without a
    run directory); ``shard-I`` inside it when there are several shards."""
    base = Path(configured) if configured else Path(run_dir or ".") / "checkpoint"
    return base if shards == 1 else base / f"shard-{shard}"


def checkpoint_dirs(cfg, run_dir) -> list[Path]:
    """Where each server (each shard) of the run keeps its checkpoint."""
    n = cfg.server.shards
    return [checkpoint_dir(run_dir, cfg.server.checkpoint_dir, i, n) for i in range(n)]
