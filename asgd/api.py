"""What a training script asks of asgd besides its optimizer: where it is, its share of the
data, the run's final weights.

    import asgd
    asgd.rank(), asgd.workers(), asgd.local_rank()   # 1, 4, 1 (from the environment)
    train = asgd.shard(train_set)                    # this worker's contiguous part (a Subset)
    asgd.load("runs/lm", model)                      # the run's final weights, by name

The place of a process comes from the environment, as ``asgd worker`` takes it
(asgd.config.env): ``ASGD_RANK`` (or ``ASGD_RANK_FROM_HOSTNAME=1``, or Slurm's
``SLURM_PROCID``), ``ASGD_WORKERS`` (or ``SLURM_NTASKS`` with ``SLURM_PROCID``), and as the
last fall-backs torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; with none of them a
script is rank 0 of 1, which is what it is when it runs alone. ``ASGD_RUN_DIR`` is the run
directory ``asgd launch`` gives its script workers (``opt.log`` writes its metrics.jsonl).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

RUN_DIR = "ASGD_RUN_DIR"          # the run directory of a launched script
SERVER_FILE = "ASGD_SERVER_FILE"  # files announcing the server's endpoints (a launcher's)
LOCAL_RANK = "ASGD_LOCAL_RANK"    # the worker's index on its machine
# torchrun's and Slurm's names, the fall-backs after asgd's own (and Slurm's rank and count)
TORCHRUN_RANK, TORCHRUN_WORLD, TORCHRUN_LOCAL = "RANK", "WORLD_SIZE", "LOCAL_RANK"
SLURM_LOCAL = "SLURM_LOCALID"
POSITIONAL = re.compile(r"param\.(\d+)\Z")   # the name of a parameter given without one


def _rank_setting(env=None):
    from asgd.config import env as envlib

    env = os.environ if env is None else env
    got = envlib.rank(None, env)
    if got.source == "default":
        value = envlib.env_int(env, TORCHRUN_RANK)
        if value is not None:
            return envlib.Setting(value, TORCHRUN_RANK)
    return got


def rank(env=None) -> int:
    """This worker's rank: ``ASGD_RANK``, the host name's ordinal with
    ``ASGD_RANK_FROM_HOSTNAME=1``, ``SLURM_PROCID``, torchrun's ``RANK``, else 0."""
    return _rank_setting(env).value


def workers(env=None) -> int:
    """The number of workers: ``ASGD_WORKERS``, ``SLURM_NTASKS`` (with ``SLURM_PROCID``),
    torchrun's ``WORLD_SIZE``, else 1."""
    from asgd.config import env as envlib

    env = os.environ if env is None else env
    got = envlib.workers((), env, _rank_setting(env).source)
    if got is not None:
        return got.value
    value = envlib.env_int(env, TORCHRUN_WORLD, minimum=1)
    return value if value is not None else 1


def local_rank(env=None) -> int:
    """This worker's index on its machine (e.g. its GPU): ``ASGD_LOCAL_RANK``,
    ``SLURM_LOCALID``, torchrun's ``LOCAL_RANK``, else 0."""
    from asgd.config import env as envlib

    env = os.environ if env is None else env
    for name in (LOCAL_RANK, SLURM_LOCAL, TORCHRUN_LOCAL):
        value = envlib.env_int(env, name)
        if value is not None:
            return value
    return 0


_this_rank, _all_workers = rank, workers     # shard() takes arguments of these names


def run_dir(env=None) -> Path | None:
    """The run directory a launcher gave this process (``ASGD_RUN_DIR``), or None."""
    text = ((os.environ if env is None else env).get(RUN_DIR) or "").strip()
    return Path(text) if text else None


def server(option: str | None = None, wait_s: float = 30.0, env=None
           ) -> tuple[str | None, list[str]]:
    """(the server's endpoints, its address files): ``server=``, else ``ASGD_SERVER``, else
    the endpoints announced in the files of ``ASGD_SERVER_FILE`` (comma-separated, one per
    shard: a launcher that restarts its server on a new port announces it there), waiting
    up to ``wait_s`` for them; (None, []) when none is given: the script runs standalone.
    Without ``server=`` the files come back with ``ASGD_SERVER`` too (asgd launch sets
    both), so that a server restarted elsewhere is followed."""
    from asgd.config import env as envlib

    env = os.environ if env is None else env
    given = envlib.server_endpoints(option, env)
    files = [f.strip() for f in (env.get(SERVER_FILE) or "").split(",") if f.strip()]
    if given is not None:     # asgd launch sets both: the files say where a restart went
        return given.value, files if option is None else []
    if not files:
        return None, []
    from asgd.launch.processes import read_address

    found = []
    for f in files:
        address = read_address(Path(f), wait_s)
        if address is None:
            raise ConnectionError(f"no server address in {f} ({SERVER_FILE}) after "
                                  f"{wait_s:g} s")
        found.append(address)
    return ",".join(found), files


def check_place(rank_: int, workers_: int) -> None:
    if not 0 <= rank_ < workers_:
        raise ValueError(f"rank {rank_} is not in [0, {workers_}): check ASGD_RANK and "
                         "ASGD_WORKERS (or the Slurm / torchrun variables)")


def shard(data, rank: int | None = None, workers: int | None = None):
    """This worker's contiguous part of ``data``: items ``[n*r//w, n*(r+1)//w)`` of ``n``.
    A torch ``Dataset`` becomes a ``torch.utils.data.Subset``; a tensor, array, list or
    other sliceable sequence is sliced (a view where slicing makes one). With one worker
    (a script run alone) this is all of ``data``."""
    r = _this_rank() if rank is None else rank
    w = _all_workers() if workers is None else workers
    check_place(r, w)
    try:
        n = len(data)
    except TypeError:
        raise TypeError(f"asgd.shard: {type(data).__name__} has no length; give a Dataset "
                        "with __len__, a tensor or a sequence") from None
    lo, hi = n * r // w, n * (r + 1) // w
    import torch.utils.data as tud

    if isinstance(data, tud.Dataset) and not hasattr(data, "shape"):
        return tud.Subset(data, range(lo, hi))
    return data[lo:hi]


# ----------------------------------------------------------------------------------------------
# the run's weights

def checkpoint_path(path) -> Path:
    """The checkpoint of a run directory (its ``checkpoint/``, or the folder its config.yaml
    names in server.checkpoint_dir), or ``path`` itself: a checkpoint folder, a sharded
    server's folder of ``shard-I``, or a ``state.asgd`` file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"asgd.load: {p} does not exist")
    if p.is_file() or any(p.glob("*.asgd")) or (p / "shard-0").is_dir():
        return p
    if (p / "checkpoint").is_dir():
        return p / "checkpoint"
    config = p / "config.yaml"
    if config.is_file():
        import yaml

        data = yaml.safe_load(config.read_text()) or {}
        named = ((data.get("server") or {}).get("checkpoint_dir") or "").strip()
        if named and Path(named).exists():
            return Path(named)
    raise FileNotFoundError(f"asgd.load: no checkpoint in {p} (a run directory holds one in "
                            "checkpoint/ once its server has stopped or checkpointed)")


def load(path, model, strict: bool = True) -> list[str]:
    """Copy a run's final weights (the server's checkpoint, sharded or not) into ``model``'s
    parameters by name; returns the names loaded. ``path``: a run directory, a checkpoint
    folder or file. Parameters the optimizer was given without names (``model.parameters()``)
    are stored as ``param.<i>``, the i-th of the parameters it was given: they load into
    ``model.parameters()`` in that order. ``strict``: every stored tensor must have a
    parameter of the same shape and every trainable parameter a stored tensor (ValueError
    naming them); otherwise those that do not match are left as they are."""
    import torch

    from asgd.core.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint_path(path))
    stored = ckpt.weights()
    params = list(model.named_parameters())
    if stored and all(POSITIONAL.match(k) for k in stored):
        own = {f"param.{i}": p for i, (_, p) in enumerate(params)}
        trainable = [f"param.{i}" for i, (_, p) in enumerate(params) if p.requires_grad]
    else:
        own = dict(params)
        trainable = [n for n, p in params if p.requires_grad]
    unknown = [k for k in stored if k not in own]
    missing = [k for k in trainable if k not in stored]
    shapes = [k for k in stored if k in own and tuple(own[k].shape) != tuple(stored[k].shape)]
    if strict and (unknown or missing or shapes):
        parts = []
        if shapes:
            parts.append("shapes differ: " + ", ".join(
                f"{k} {list(stored[k].shape)} (model {list(own[k].shape)})" for k in shapes))
        if unknown:
            parts.append("not in the model: " + ", ".join(unknown))
        if missing:
            parts.append("not in the checkpoint: " + ", ".join(missing))
        raise ValueError(f"asgd.load: {path} (version {ckpt.version}) does not fit this "
                         f"model: {'; '.join(parts)} (strict=False loads what fits)")
    loaded = [k for k in stored if k in own and k not in shapes]
    with torch.no_grad():
        for k in loaded:
            own[k].copy_(stored[k].to(own[k].dtype))
    return loaded
