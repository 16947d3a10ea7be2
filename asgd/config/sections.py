"""The top-level sections of a run's configuration and ``Config`` that holds them; ``server``
and ``worker`` with their sub-sections are in asgd/config/server.py and worker.py.

    Config().optimizer.lr              # 0.01
    Config().replace(**{"run.workers": 4})
    validate(cfg)                      # every section's check(), then what spans sections
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from asgd.config.checks import need, need_one_of, section
from asgd.config.server import ServerConfig
from asgd.config.worker import WorkerConfig

OPTIMIZERS = ("sgd", "adam", "adamw", "adagrad", "rmsprop")
SCHEDULES = ("constant", "cosine", "step")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "cnn1d"           # a registry name (asgd.tasks.models) or "package.module:factory"
                                  # ("" = no model: the server learns it from its first
                                  # worker's hello, asgd.Optimizer in a script; server.adopt)
    args: dict = field(default_factory=dict)
    # Transfer learning (docs/models.md): start from another run's weights, keep some fixed.
    init_from: str = ""           # a run directory or checkpoint folder whose tensors of the
                                  # same names are loaded into the built model ("" = none)
    init_strict: bool = True      # false: skip tensors whose name or shape does not match
    freeze: list = field(default_factory=list)   # parameter-name prefixes kept fixed and off
                                                 # the wire (the server holds the rest)

    def check(self) -> None:
        need(all(isinstance(f, str) and f for f in self.freeze), "model.freeze",
             f"must be a list of parameter-name prefixes, got {self.freeze!r}")


@dataclass(frozen=True)
class AugmentConfig:
    # Training-time augmentation on the worker's device (asgd.tasks.augment).
    shift: Optional[int] = None   # random roll by up to this many samples per spatial axis
                                  # (null = the data set's default: 3 for mnist1d, else 0)
    scale: float = 0.0            # multiply each sample by 1 + scale * N(0, 1)
    noise: float = 0.0            # add noise * N(0, 1)

    def check(self) -> None:
        need(self.shift is None or self.shift >= 0, "data.augment.shift", "must be >= 0 or null")
        need(self.scale >= 0, "data.augment.scale", "must be >= 0")
        need(self.noise >= 0, "data.augment.noise", "must be >= 0")


@dataclass(frozen=True)
class DataConfig:
    name: str = "mnist1d"         # mnist1d | digits | synthetic | "package.module:factory"
    args: dict = field(default_factory=dict)
    cache_dir: str = ""           # where generated data sets are cached ("" = ~/.cache/asgd)
    augment: AugmentConfig = section(AugmentConfig)
    # The input pipeline (asgd.tasks.data.ShardLoader, docs/models.md).
    prefetch: int = 0             # batches prepared ahead in a thread (0 = none: faster here)
    pin_memory: bool = False      # CUDA: keep the data on the host, pinned, and copy each batch
                                  # with non_blocking=True (false: the data set on the device)

    def check(self) -> None:
        need(self.prefetch >= 0, "data.prefetch", "must be >= 0")
        self.augment.check()


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adam"            # sgd | adam | adamw | adagrad | rmsprop
    lr: float = 0.01
    momentum: float = 0.0         # sgd, rmsprop
    nesterov: bool = False        # sgd
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # adam, adamw
    eps: float = 1e-8
    weight_decay: float = 0.0

    def check(self) -> None:
        need_one_of(self.name, OPTIMIZERS, "optimizer.name")
        need(self.lr > 0, "optimizer.lr", f"must be > 0, got {self.lr}")
        need(0 <= self.momentum < 1, "optimizer.momentum",
             f"must be in [0, 1), got {self.momentum}")
        need(not self.nesterov or self.momentum > 0, "optimizer.nesterov", "needs momentum > 0")
        need(len(self.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1
                                          for b in self.betas),
             "optimizer.betas", f"must be two numbers in [0, 1), got {self.betas}")
        need(self.eps > 0, "optimizer.eps", "must be > 0")
        need(self.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")


@dataclass(frozen=True)
class ScheduleConfig:
    kind: str = "cosine"          # constant | cosine | step; driven by the server's version
    warmup: int = 50              # updates of linear warm-up from 0
    total: int = 0                # cosine: updates to reach min_lr (0 = run.max_updates)
    min_lr: float = 0.0005        # cosine floor
    step_size: int = 1000         # step: multiply by gamma every step_size updates
    gamma: float = 0.1

    def check(self) -> None:
        need_one_of(self.kind, SCHEDULES, "schedule.kind")
        need(self.warmup >= 0, "schedule.warmup", "must be >= 0")
        need(self.total >= 0, "schedule.total", "must be >= 0")
        need(self.step_size > 0, "schedule.step_size", "must be > 0")
        need(0 < self.gamma <= 1, "schedule.gamma", "must be in (0, 1]")
        need(self.min_lr >= 0, "schedule.min_lr", "must be >= 0")


@dataclass(frozen=True)
class RunConfig:
    name: str = ""                # run directory name ("" = a timestamp)
    out_dir: str = "runs"
    seed: int = 0
    workers: int = 2
    max_updates: int = 3000       # stop once the server's version reaches this (0 = none)
    max_seconds: float = 300.0    # stop the workers after this long (0 = none)
    eval_every_s: float = 2.0     # evaluate the live weights this often during a launch (0 = never)
    eval_batch_size: int = 1000
    max_restarts: int = 3         # asgd launch: dead workers and servers restarted, in all per run
    tensorboard: bool = False     # asgd launch: write scalars to <run_dir>/tensorboard/

    def check(self) -> None:
        need(self.workers >= 1, "run.workers", "must be >= 1")
        need(self.max_updates >= 0, "run.max_updates", "must be >= 0")
        need(self.max_seconds >= 0, "run.max_seconds", "must be >= 0")
        need(self.eval_every_s >= 0, "run.eval_every_s", "must be >= 0")
        need(self.eval_batch_size >= 1, "run.eval_batch_size", "must be >= 1")
        need(self.max_restarts >= 0, "run.max_restarts", "must be >= 0")
        need("/" not in self.name and self.name not in (".", ".."), "run.name",
             "must be a plain name")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = section(ModelConfig)
    data: DataConfig = section(DataConfig)
    optimizer: OptimizerConfig = section(OptimizerConfig)
    schedule: ScheduleConfig = section(ScheduleConfig)
    server: ServerConfig = section(ServerConfig)
    worker: WorkerConfig = section(WorkerConfig)
    run: RunConfig = section(RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> "Config":
        """A copy with dotted keys replaced: cfg.replace(**{"run.workers": 4}) (old flat keys
        such as ``worker.overlap`` are taken too: asgd.config.aliases)."""
        from asgd.config.load import apply_overrides

        return apply_overrides(self, [(k, v) for k, v in overrides.items()], parsed=True)


def validate(cfg: Config) -> None:
    """Every section's own check(), then what spans sections. ConfigError naming the key."""
    for section in (cfg.model, cfg.data, cfg.optimizer, cfg.schedule, cfg.server, cfg.worker,
                    cfg.run):
        section.check()
    r, w = cfg.run, cfg.worker
    local_only = sorted({"delayed_nesterov", "dylu"} & set(cfg.server.policy.replace(
        " ", "").split("+")))
    need(not local_only or w.exchange.local_steps > 1 or not cfg.model.name, "server.policy",
         f"{' and '.join(local_only)} are rules of local steps: they need "
         "worker.exchange.local_steps > 1")
    need(r.max_updates > 0 or r.max_seconds > 0 or w.max_steps > 0 or not cfg.model.name,
         "run.max_updates", "a run needs a budget: run.max_updates, run.max_seconds or "
         "worker.max_steps (only a server that learns its model from a script may have none)")
