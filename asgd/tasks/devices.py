"""The device a setting names for one process: ``auto``, ``cpu``, ``cuda:N``, a bare N, or
``cuda:{local_rank}`` with the rank modulo the visible CUDA devices filled in (the workers',
the reference trainers' and a user script's alike).

    resolve_device("cuda:{local_rank}", local_rank=3)     # cuda:3 (of 4 visible: 3)
    resolve_device("auto")                                # cuda where there is one, else cpu
"""
from __future__ import annotations

import torch


def local_rank(rank: int) -> int:
    """The worker's rank modulo the visible CUDA devices (its rank where there are none)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return rank % count if count else rank


def device_name(name: str, rank: int = 0) -> str:
    """``name`` with ``{local_rank}`` filled in; a bare device number N means ``cuda:N``."""
    name = name.replace("{local_rank}", str(local_rank(rank)))
    return f"cuda:{name}" if name.isdigit() else name


def resolve_device(name: str, rank: int = 0) -> torch.device:
    """The device ``name`` means for this rank: ``auto`` is CUDA where there is one, else the
    CPU; ValueError for CUDA without one, or a device number beyond those visible."""
    name = device_name(name, rank)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for but CUDA is not available here")
        index = torch.device(name).index
        if index is not None and index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA "
                             "device(s) are visible")
    return torch.device(name)
