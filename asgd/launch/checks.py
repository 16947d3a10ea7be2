"""What a launch checks before anything starts, and the run directory it makes.

    check_imports(cfg)               # a user's model or data set imports; a split it can take
    task = check_before_start(cfg)   # the devices, and a user's model and data the built-in
                                     # loop can train (asgd.tasks.contract); the task if built
    cfg, run_dir = resume_config("runs/x", ["run.max_updates=6000"])   # a run to go on with
    run_dir = make_run_dir(cfg)

Each fails with a one-line LaunchError, before any process starts and with no run directory
left behind. A launch of a user's script (asgd.launch.scripts) checks only what it uses:
``builtin_workers=False`` (the scripts bring their own model; the server learns it).
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

from asgd.config import Config, ConfigError, load_config
from asgd.rundir import checkpoint_dirs


class LaunchError(RuntimeError):
    pass


def make_run_dir(cfg: Config) -> Path:
    name = cfg.run.name or datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.run.out_dir) / name
    run_dir, k = base, 1
    while run_dir.exists() and any(run_dir.iterdir()):
        run_dir = base.with_name(f"{name}-{k}")
        k += 1
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    return run_dir


def checkpoint_state(directory: Path) -> tuple[int | None, str]:
    """(version, "") of the checkpoint a server would resume from in ``directory``; (None, "")
    when there is none yet; (None, why) when it cannot be read."""
    from asgd.core.checkpoint import CheckpointError, load_checkpoint

    if not any(Path(directory).glob("*.asgd")):
        return None, ""
    try:
        return load_checkpoint(directory).version, ""
    except CheckpointError as e:
        return None, str(e)


def check_imports(cfg: Config, builtin_workers: bool = True) -> None:
    """A user's model or data set given by import path must import, and a model split into
    stages (worker.devices) must be one that can be cut so: checked before any process starts
    (the built-ins always import; their arguments are checked with the task). The built-in
    workers need a model: without ``model.name`` only workers that bring their own (scripts
    with asgd.Optimizer: ``builtin_workers`` False) can run."""
    from asgd.tasks.imports import import_object

    if builtin_workers and not cfg.model.name:
        raise LaunchError("model.name is empty: the built-in workers build their model from "
                          "it (a server without a model learns it from the first script "
                          "worker's asgd.Optimizer)")

    for what, name in (("model", cfg.model.name), ("data set", cfg.data.name)):
        if ":" in name:
            try:
                import_object(name, what)
            except (ValueError, TypeError) as e:
                raise LaunchError(str(e)) from None
    if cfg.worker.stages.devices and len(cfg.worker.stages.devices) > 1:   # a split the model cannot take
        from asgd.tasks.layers import check_split

        try:
            check_split(cfg)
        except (ValueError, TypeError) as e:
            raise LaunchError(str(e)) from None


def prepare_task(cfg: Config):
    """The run's task in this process (CPU, one thread) for evaluations: a model or data set
    that cannot be built fails here, and the launch with it."""
    import torch

    from asgd.tasks.task import build_task

    torch.set_num_threads(1)
    try:
        return build_task(cfg)
    except (ValueError, TypeError) as e:
        raise LaunchError(str(e)) from None


def check_before_start(cfg: Config):
    """The devices (CUDA asked for where there is none) and a user's model or data set (what
    the built-in loop can train: asgd.tasks.contract), each a one-line LaunchError; returns
    the task when it was built (with a user's data set, loaded to check its labels), else
    None. Built-in models and data sets on the CPU hold the contract by construction: torch
    is not even imported for them, so the processes start at once."""
    from asgd.tasks.contract import cuda_names

    user_code = ":" in cfg.model.name or ":" in cfg.data.name
    if not user_code and not cuda_names(cfg):
        return None
    import torch

    from asgd.tasks.task import check_devices, check_task

    torch.set_num_threads(1)
    try:
        check_devices(cfg)
        return check_task(cfg) if user_code else None
    except (ValueError, TypeError) as e:
        raise LaunchError(str(e)) from None


def whole_batches(run_dir: Path) -> list[str]:
    """A run made before ``worker.batch_split`` existed trained each worker on the whole
    batch: its config.yaml, which lacks the key, goes on that way (the default would split)."""
    import yaml

    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []          # load_config says what is wrong with it
    worker = saved.get("worker") if isinstance(saved, dict) else None
    return [] if isinstance(worker, dict) and "batch_split" in worker else \
        ["worker.batch_split=false"]


def resume_config(run_dir, overrides=(), builtin_workers: bool = True
                  ) -> tuple[Config, Path]:
    """The config of a run to go on with (its config.yaml with ``overrides``), checked: it
    has a checkpoint to resume from (``builtin_workers``: as ``check_imports``)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise LaunchError(f"{run_dir} is not a run directory: it has no config.yaml")
    try:
        cfg = load_config(run_dir / "config.yaml", whole_batches(run_dir) + list(overrides))
    except ConfigError as e:
        raise LaunchError(str(e)) from None
    check_imports(cfg, builtin_workers)
    for d in checkpoint_dirs(cfg, run_dir):
        if not any(d.glob("*.asgd")):
            raise LaunchError(f"nothing to resume in {run_dir}: no checkpoint in {d}")
    return cfg, run_dir
