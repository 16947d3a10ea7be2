"""Run configuration: frozen dataclasses with defaults, loaded from YAML, overridden by key=value.

The defaults are the default run (configs/default.yaml spells them out): MNIST-1D, the 1D CNN,
two workers, Adam with a cosine schedule over 3,000 updates of 100 samples.

    cfg = load_config("configs/default.yaml", overrides=["optimizer.lr=0.003", "run.workers=4"])
    cfg.optimizer.lr                 # 0.003
    cfg.worker.exchange.overlap      # the big sections have sub-sections: server.auth,
    cfg.server.spin.us               # server.spin, server.outer, worker.exchange,
                                     # worker.stages, worker.straggler, worker.auth
    save_config(cfg, "runs/x/config.yaml")

Every section owns its defaults and its ``check()``. A key that does not exist, or a value of
the wrong type, is an error that names the key (``ConfigError``). Values in overrides are
parsed as YAML scalars. The flat keys from before the sub-sections (``worker.overlap``,
``server.spin_us``) are still read, in files and overrides, at their new place (aliases.py).

    checks.py    ConfigError, need(), what the checks share
    sections.py  model, data, optimizer, schedule, run; Config; validate
    server.py    server and server.auth / .spin / .outer
    worker.py    worker and worker.exchange / .stages / .straggler / .auth
    aliases.py   the old flat keys and their new places
    load.py      YAML and overrides to a checked Config, and back
    env.py       a cluster process's place (rank, workers, server, bind, shard) from its
                 options, ASGD_* and Slurm variables
"""
from asgd.config.aliases import ALIASES
from asgd.config.checks import RAY_RESOURCES, ConfigError
from asgd.config.load import (apply_overrides, default_config_path, did_you_mean, dump_config,
                              from_dict, load_config, resolve_workers, save_config,
                              split_batch)
from asgd.config.sections import (OPTIMIZERS, SCHEDULES, AugmentConfig, Config, DataConfig,
                                  ModelConfig, OptimizerConfig, RunConfig, ScheduleConfig,
                                  validate)
from asgd.config.server import OuterConfig, ServerAuthConfig, ServerConfig, SpinConfig
from asgd.config.worker import (PRECISIONS, SPLITS, ExchangeConfig, StagesConfig,
                                StragglerConfig, WorkerAuthConfig, WorkerConfig)

__all__ = [
    "ALIASES", "RAY_RESOURCES", "ConfigError", "apply_overrides", "default_config_path",
    "did_you_mean", "dump_config", "from_dict", "load_config", "resolve_workers", "save_config",
    "split_batch",
    "OPTIMIZERS", "SCHEDULES", "AugmentConfig", "Config", "DataConfig", "ModelConfig",
    "OptimizerConfig", "RunConfig", "ScheduleConfig", "validate", "OuterConfig",
    "ServerAuthConfig", "ServerConfig", "SpinConfig", "PRECISIONS", "SPLITS", "ExchangeConfig",
    "StagesConfig", "StragglerConfig", "WorkerAuthConfig", "WorkerConfig",
]
