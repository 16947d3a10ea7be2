"""Run configuration: frozen dataclasses with defaults, loaded from YAML, overridden by key=value.

The defaults are the default run (configs/default.yaml spells them out): MNIST-1D, the 1D CNN,
two workers, Adam with a cosine schedule over 3,000 updates of 100 samples.

    cfg = load_config("configs/default.yaml", overrides=["optimizer.lr=0.003", "run.workers=4"])
    cfg.optimizer.lr        # 0.003
    save_config(cfg, "runs/x/config.yaml")

Every section owns its defaults. A key that does not exist, or a value of the wrong type, is an
error that names the key (``ConfigError``). Values in overrides are parsed as YAML scalars.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    pass


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


@dataclass(frozen=True)
class AugmentConfig:
    # Training-time augmentation on the worker's device (asgd.tasks.augment).
    shift: Optional[int] = None   # random roll by up to this many samples per spatial axis
                                  # (null = the data set's default: 3 for mnist1d, else 0)
    scale: float = 0.0            # multiply each sample by 1 + scale * N(0, 1)
    noise: float = 0.0            # add noise * N(0, 1)


@dataclass(frozen=True)
class DataConfig:
    name: str = "mnist1d"         # mnist1d | digits | synthetic | "package.module:factory"
    args: dict = field(default_factory=dict)
    cache_dir: str = ""           # where generated data sets are cached ("" = ~/.cache/asgd)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # The input pipeline (asgd.tasks.data.ShardLoader, docs/models.md).
    prefetch: int = 0             # batches prepared ahead in a thread (0 = none: faster here)
    pin_memory: bool = False      # CUDA: keep the data on the host, pinned, and copy each batch
                                  # with non_blocking=True (false: the data set on the device)


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adam"            # sgd | adam | adamw | adagrad
    lr: float = 0.01
    momentum: float = 0.0         # sgd
    nesterov: bool = False        # sgd
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # adam, adamw
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass(frozen=True)
class ScheduleConfig:
    kind: str = "cosine"          # constant | cosine | step; driven by the server's version
    warmup: int = 50              # updates of linear warm-up from 0
    total: int = 0                # cosine: updates to reach min_lr (0 = run.max_updates)
    min_lr: float = 0.0005        # cosine floor
    step_size: int = 1000         # step: multiply by gamma every step_size updates
    gamma: float = 0.1


@dataclass(frozen=True)
class ServerConfig:
    bind: str = "tcp://127.0.0.1:5555"
    # The default is robust to the number of workers (docs/experiments.md): the learning rate
    # scaled by 1/staleness, and pushes staler than 3 updates dropped (the worker pulls afresh).
    policy: str = "scale"         # none | max_staleness | scale | dc | ssp | sync, '+'-joined
    max_staleness: Optional[int] = 3      # drop pushes staler than this (null = no bound;
                                          # sync takes every gradient and ignores it)
    dc_lambda: float = 2.0        # dc: λ (λ0 of DC-ASGD-a when dc_adaptive)
    dc_adaptive: bool = True      # dc: λ / sqrt(mean square of g), DC-ASGD's adaptive variant
    dc_history: int = 64          # dc: versions of weights kept to compensate against
    ssp_slack: int = 2            # ssp: S, pushes a worker may run ahead of the slowest
    worker_timeout_s: float = 10.0   # ssp/sync: a silent worker stops counting after this
    max_message_mb: float = 512.0
    checkpoint_dir: str = ""      # "" = <run dir>/checkpoint, or ./checkpoint without a run dir
    checkpoint_every: int = 0     # also checkpoint every N updates (0 = only on shutdown)
    checkpoint_every_s: float = 10.0  # ... and every T seconds when the version moved (0 = no)
    checkpoint_keep: int = 3      # checkpoints kept (state-<version>.asgd); --resume takes the
                                  # newest good one
    stats_every_s: float = 1.0    # how often a "server" record goes to metrics.jsonl
    threads: int = 1
    # After a reply, poll for the next request this long before sleeping, but only when the
    # client just answered came back that fast last time: a client waiting on the server in
    # a loop then costs no wake-up, and workers that compute between pushes no spinning.
    # A shard of several without a core to spare does not poll at all (Server._spin_window).
    spin_us: float = 500.0
    # ... and this long instead while the host has a core to spare for the server (the
    # workers on it, by shared memory, and the shards, no more than its cores): a worker's
    # step then finds the server awake, its caches warm, instead of waking it. 0: only spin_us.
    spin_spare_us: float = 5000.0
    # Workers on this host (their shared-memory segment mapped) send their shared-memory
    # requests over a unix socket instead of ZeroMQ: no I/O threads between the two
    # processes (server/local.py). false: everything over ZeroMQ.
    local: bool = True
    # Sharded parameter server: the flat parameters split into this many balanced contiguous
    # ranges, each served by its own process (`asgd server --shard I`) with its own version;
    # workers talk to every shard at once. `asgd launch` starts them all.
    shards: int = 1
    max_workers: int = 1024       # workers' records kept (from hello); the longest silent go first
    resources: dict = field(default_factory=dict)   # asgd launch --on ray: each server
                                  # (shard) actor's Ray resources, e.g. {CPU: 1} ({} = none)
    # The outer optimizer of local steps (worker.local_steps > 1, DiLoCo): applied to each
    # pushed pseudo-gradient, at a constant rate (times the staleness policy's scale).
    # DiLoCo's Nesterov SGD; its synchronous rate 0.7 diverges when every worker's
    # pseudo-gradient is applied on its own, 0.05 does not (docs/experiments.md).
    outer_optimizer: str = "sgd"  # sgd | adam | adamw
    outer_lr: float = 0.05
    outer_momentum: float = 0.9   # sgd
    outer_nesterov: bool = True   # sgd
    # Authentication and encryption (asgd.core.auth, docs/reliability.md): curve = ZeroMQ
    # CURVE with this secret key, letting in only the public keys of allowed_keys (a NAME.key
    # file or a folder of them; NAME is the worker id the key may use).
    auth: str = "none"            # none | curve
    secret_key_file: str = ""     # the server's NAME.key_secret (asgd keys server)
    allowed_keys: str = ""        # the workers' public keys: a .key file or a folder


@dataclass(frozen=True)
class WorkerConfig:
    batch_size: int = 100
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    threads: int = 1              # torch.set_num_threads for each worker process
    request_timeout_s: float = 30.0   # longer than server.worker_timeout_s: ssp/sync hold replies
    reconnect_timeout_s: float = 30.0   # give up after the server is gone this long
    log_every: int = 10           # a worker_step record every N steps
    spin_us: float = 200.0        # poll for a reply this long before sleeping (no wake-up)
    push_retries: int = 2         # a push whose reply is late is sent again this many times
                                  # (same sequence number: applied once) before a new hello
    # The data path (worker.exchange): shared memory with a server on the same host (auto: for
    # loopback and ipc endpoints), overlap of the exchange with the next step's compute, and
    # the wire encodings of gradients and weights across machines.
    local_steps: int = 1          # steps with the worker's own optimizer (cfg.optimizer) before
                                  # pushing the pseudo-gradient (pulled - now); 1 is A-SGD
    shared_memory: str = "auto"   # auto | on | off
    overlap: bool = False         # compute step k+1 while step k's push travels (+1 staleness)
    encoding: str = "none"        # gradient: none | fp16 | bf16 | int8 | topk (error feedback)
    topk_ratio: float = 0.01      # topk: the share of values sent
    weights_encoding: str = "none"   # weights back from the server: none | fp16 | bf16
    max_steps: int = 0            # per-worker step budget (0 = none)
    # Straggler simulation, for experiments: each step of a slowed rank (gradient and
    # exchange) takes slow_factor times as long (by sleeping), plus delay_s seconds.
    slow_factor: float = 1.0
    delay_s: float = 0.0
    slow_ranks: Optional[list] = None   # ranks slowed (null = every rank)
    # Inside the node (worker.stages, worker.precision; docs/node.md): the model split into
    # consecutive stages, one per device, run as a pipeline over micro-batches, in mixed
    # precision, with recompute or offloaded activations. None of it is used when unset.
    devices: Optional[list] = None      # one stage per device, e.g. [cpu, cpu] or [cuda:0, cuda:1]
    split: Union[str, list] = "params"  # params | time | [i, j, ...]: stage boundaries
    microbatches: int = 1         # GPipe: micro-batches per batch (same gradient)
    precision: str = "fp32"       # fp32 | fp16 (with a loss scaler) | bf16: autocast forward
    recompute: bool = False       # activation checkpointing per stage
    offload_activations: bool = False   # saved activations in (pinned) host memory
    # CURVE (server.auth: curve): both set, or neither. {id} in the file name is the worker id.
    secret_key_file: str = ""     # this worker's NAME.key_secret
    server_key: str = ""          # the server's public key: its .key file or the Z85 text
    # asgd launch --on ray: each worker's bundle in the workers' placement group, e.g.
    # {CPU: 2} or {GPU: 1, memory: 4000000000} (bytes; {} = one GPU for a CUDA device, else
    # one CPU)
    resources: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RunConfig:
    name: str = ""                # run directory name ("" = a timestamp)
    out_dir: str = "runs"
    seed: int = 0
    workers: int = 2
    max_updates: int = 3000       # stop once the server's version reaches this (0 = none)
    max_seconds: float = 75.0     # stop the workers after this long (0 = none)
    eval_every_s: float = 2.0     # evaluate the live weights this often during a launch (0 = never)
    eval_batch_size: int = 1000
    max_restarts: int = 3         # asgd launch: dead workers and servers restarted, in all per run
    tensorboard: bool = False     # asgd launch: write scalars to <run_dir>/tensorboard/


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> "Config":
        """A copy with dotted keys replaced: cfg.replace(**{"run.workers": 4})."""
        return apply_overrides(self, [(k, v) for k, v in overrides.items()], parsed=True)


# ----------------------------------------------------------------------------------------------
# type checking

def _check(key: str, value: Any, tp: Any) -> Any:
    """``value`` coerced to the annotated type ``tp``, or ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        alternatives = [a for a in args if a is not type(None)]
        for alt in alternatives[:-1]:       # Union[str, list]: the first that takes the value
            try:
                return _check(key, value, alt)
            except ConfigError:
                pass
        tp = alternatives[-1]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):   # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):   # YAML 1.1 reads on/off (yes/no) as booleans
            return "on" if value else "off"
    elif tp is list or tp is dict:
        if isinstance(value, tp):
            return value
    else:
        raise ConfigError(f"{key}: unsupported type {tp}")
    want = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{key}: expected {want}, got {type(value).__name__} {value!r}")


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''}{where}: "
                          + ", ".join(f"{prefix}.{k}" if prefix else k for k in unknown)
                          + f" (known: {', '.join(sorted(names))})")
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v, key)
        else:
            kwargs[k] = _check(key, v, tp)
    return cls(**kwargs)


def from_dict(data: dict | None) -> Config:
    cfg = _build(Config, data or {}, "")
    validate(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides, parsed: bool = False) -> Config:
    """Apply ``key=value`` strings (or (key, value) pairs when ``parsed``) to ``cfg``."""
    data = cfg.to_dict()
    for item in overrides:
        if parsed:
            key, value = item
        else:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            key, text = item.split("=", 1)
            key = key.strip()
            try:
                value = yaml.safe_load(text) if text.strip() else ""
            except yaml.YAMLError as e:
                raise ConfigError(f"{key}: cannot parse value {text!r}: {e}") from None
        parts = key.split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"unknown key: {'.'.join(parts[:i + 1])} (in override {key})")
            node = node[part]
        if not isinstance(node, dict) or (parts[-1] not in node and len(parts) < 3):
            raise ConfigError(f"unknown key: {key}")
        node[parts[-1]] = value
    return from_dict(data)


# ----------------------------------------------------------------------------------------------
# semantic checks

OPTIMIZERS = ("sgd", "adam", "adamw", "adagrad")
SCHEDULES = ("constant", "cosine", "step")


def validate(cfg: Config) -> None:
    def need(ok: bool, key: str, msg: str):
        if not ok:
            raise ConfigError(f"{key}: {msg}")

    from asgd.core.endpoint import parse_endpoint
    from asgd.core.policies import parse_policy

    o, s, sv, w, r = cfg.optimizer, cfg.schedule, cfg.server, cfg.worker, cfg.run
    need(o.name in OPTIMIZERS, "optimizer.name", f"{o.name!r} is not one of {', '.join(OPTIMIZERS)}")
    need(o.lr > 0, "optimizer.lr", f"must be > 0, got {o.lr}")
    need(0 <= o.momentum < 1, "optimizer.momentum", f"must be in [0, 1), got {o.momentum}")
    need(not o.nesterov or o.momentum > 0, "optimizer.nesterov", "needs momentum > 0")
    need(len(o.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas),
         "optimizer.betas", f"must be two numbers in [0, 1), got {o.betas}")
    need(o.eps > 0, "optimizer.eps", "must be > 0")
    need(o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    need(s.kind in SCHEDULES, "schedule.kind", f"{s.kind!r} is not one of {', '.join(SCHEDULES)}")
    need(s.warmup >= 0, "schedule.warmup", "must be >= 0")
    need(s.total >= 0, "schedule.total", "must be >= 0")
    need(s.step_size > 0, "schedule.step_size", "must be > 0")
    need(0 < s.gamma <= 1, "schedule.gamma", "must be in (0, 1]")
    need(s.min_lr >= 0, "schedule.min_lr", "must be >= 0")
    try:
        parse_policy(sv.policy)
    except ValueError as e:
        raise ConfigError(f"server.policy: {e}") from None
    try:
        parse_endpoint(sv.bind, bind=True)
    except ValueError as e:
        raise ConfigError(f"server.bind: {e}") from None
    need(all(isinstance(f, str) and f for f in cfg.model.freeze), "model.freeze",
         f"must be a list of parameter-name prefixes, got {cfg.model.freeze!r}")
    need(cfg.data.prefetch >= 0, "data.prefetch", "must be >= 0")
    a = cfg.data.augment
    need(a.shift is None or a.shift >= 0, "data.augment.shift", "must be >= 0 or null")
    need(a.scale >= 0, "data.augment.scale", "must be >= 0")
    need(a.noise >= 0, "data.augment.noise", "must be >= 0")
    need(sv.dc_lambda >= 0, "server.dc_lambda", "must be >= 0")
    need(sv.dc_history >= 1, "server.dc_history", "must be >= 1")
    need(sv.ssp_slack >= 0, "server.ssp_slack", "must be >= 0")
    need(sv.worker_timeout_s > 0, "server.worker_timeout_s", "must be > 0")
    need(w.slow_factor >= 1.0, "worker.slow_factor", "must be >= 1")
    need(w.delay_s >= 0, "worker.delay_s", "must be >= 0")
    need(w.slow_ranks is None or all(isinstance(r, int) and r >= 0 for r in w.slow_ranks),
         "worker.slow_ranks", "must be null or a list of ranks")
    need(sv.max_staleness is None or sv.max_staleness >= 0, "server.max_staleness",
         "must be >= 0 or null")
    need("max_staleness" not in sv.policy or sv.max_staleness is not None, "server.max_staleness",
         "policy max_staleness needs a bound K")
    need(sv.max_message_mb > 0, "server.max_message_mb", "must be > 0")
    need(sv.auth in ("none", "curve"), "server.auth", f"must be none or curve, got {sv.auth!r}")
    need(sv.checkpoint_every >= 0, "server.checkpoint_every", "must be >= 0")
    need(sv.checkpoint_every_s >= 0, "server.checkpoint_every_s", "must be >= 0")
    need(sv.checkpoint_keep >= 1, "server.checkpoint_keep", "must be >= 1")
    need(sv.stats_every_s > 0, "server.stats_every_s", "must be > 0")
    need(sv.threads >= 1, "server.threads", "must be >= 1")
    need(0 <= sv.spin_us <= 100_000, "server.spin_us", "must be in [0, 100000]")
    need(0 <= sv.spin_spare_us <= 100_000, "server.spin_spare_us", "must be in [0, 100000]")
    need(1 <= sv.shards <= 64, "server.shards", f"must be in [1, 64], got {sv.shards}")
    need(sv.max_workers >= 1, "server.max_workers", "must be >= 1")
    need(w.batch_size >= 1, "worker.batch_size", "must be >= 1")
    need(_device_name_ok(w.device, auto=True), "worker.device",
         f"must be auto, cpu, cuda, cuda:N or cuda:{{local_rank}}, got {w.device!r}")
    _validate_stages(w, need)
    need(w.threads >= 1, "worker.threads", "must be >= 1")
    need(w.request_timeout_s > 0, "worker.request_timeout_s", "must be > 0")
    need(w.reconnect_timeout_s > 0, "worker.reconnect_timeout_s", "must be > 0")
    need(w.log_every >= 1, "worker.log_every", "must be >= 1")
    need(w.push_retries >= 0, "worker.push_retries", "must be >= 0")
    need(0 <= w.spin_us <= 100_000, "worker.spin_us", "must be in [0, 100000]")
    need(w.max_steps >= 0, "worker.max_steps", "must be >= 0")
    need(w.shared_memory in ("auto", "on", "off"), "worker.shared_memory",
         f"must be auto, on or off, got {w.shared_memory!r}")
    from asgd.core.protocol import ENCODINGS, WEIGHT_ENCODINGS
    need(w.encoding in ENCODINGS, "worker.encoding",
         f"{w.encoding!r} is not one of {', '.join(ENCODINGS)}")
    need(w.weights_encoding in WEIGHT_ENCODINGS, "worker.weights_encoding",
         f"{w.weights_encoding!r} is not one of {', '.join(WEIGHT_ENCODINGS)}")
    need(0 < w.topk_ratio <= 1, "worker.topk_ratio", "must be in (0, 1]")
    need(w.local_steps >= 1, "worker.local_steps", "must be >= 1")
    need(sv.outer_optimizer in ("sgd", "adam", "adamw"), "server.outer_optimizer",
         f"{sv.outer_optimizer!r} is not one of sgd, adam, adamw")
    need(sv.outer_lr > 0, "server.outer_lr", "must be > 0")
    need(0 <= sv.outer_momentum < 1, "server.outer_momentum", "must be in [0, 1)")
    need(not sv.outer_nesterov or sv.outer_momentum > 0 or sv.outer_optimizer != "sgd",
         "server.outer_nesterov", "needs server.outer_momentum > 0")
    need(r.workers >= 1, "run.workers", "must be >= 1")
    need(r.max_updates >= 0, "run.max_updates", "must be >= 0")
    need(r.max_seconds >= 0, "run.max_seconds", "must be >= 0")
    need(r.max_updates > 0 or r.max_seconds > 0 or w.max_steps > 0 or not cfg.model.name,
         "run.max_updates", "a run needs a budget: run.max_updates, run.max_seconds or "
         "worker.max_steps (only a server that learns its model from a script may have none)")
    need(r.eval_every_s >= 0, "run.eval_every_s", "must be >= 0")
    need(r.eval_batch_size >= 1, "run.eval_batch_size", "must be >= 1")
    need(r.max_restarts >= 0, "run.max_restarts", "must be >= 0")
    for key, res in (("worker.resources", w.resources), ("server.resources", sv.resources)):
        need(all(isinstance(k, str) and k and isinstance(v, (int, float))
                 and not isinstance(v, bool) and v >= 0 for k, v in res.items()), key,
             f"must map resource names to amounts >= 0, e.g. {{CPU: 1}}, got {res!r}")
        for name in res:    # a custom resource no node has would leave the run waiting
            need(name in RAY_RESOURCES or name.lower() not in
                 [r.lower() for r in RAY_RESOURCES], key,
                 f"{name!r}: Ray's built-in resources are spelt {', '.join(RAY_RESOURCES)}")
    need(not w.resources or any(v > 0 for v in w.resources.values()), "worker.resources",
         f"a worker's bundle must ask for some resource > 0, got {w.resources!r}")
    need("/" not in r.name and r.name not in (".", ".."), "run.name", "must be a plain name")


RAY_RESOURCES = ("CPU", "GPU", "memory")     # asgd launch --on ray: worker/server.resources
PRECISIONS = ("fp32", "fp16", "bf16")
SPLITS = ("params", "time")


def _device_name_ok(name, auto: bool = False) -> bool:
    """cpu, cuda, cuda:N, N, with ``{local_rank}`` allowed in place of N (and auto)."""
    if not isinstance(name, str):
        return False
    if auto and name == "auto":
        return True
    name = name.replace("{local_rank}", "0")
    return name in ("cpu", "cuda") or name.isdigit() or (
        name.startswith("cuda:") and name[5:].isdigit())


def _validate_stages(w: WorkerConfig, need) -> None:
    """The inside-the-node keys (worker.stages): what can be checked without the model."""
    need(w.devices is None or (len(w.devices) >= 1 and
                               all(_device_name_ok(d) for d in w.devices)),
         "worker.devices", "must be null or a non-empty list of devices (cpu, cuda:N, "
         f"cuda:{{local_rank}}), got {w.devices!r}")
    if isinstance(w.split, str):
        need(w.split in SPLITS, "worker.split",
             f"must be params, time or a list of split points, got {w.split!r}")
    else:
        points = w.split
        need(all(isinstance(i, int) and not isinstance(i, bool) for i in points),
             "worker.split", f"split points must be integers, got {points!r}")
        need(all(a < b for a, b in zip(points, points[1:])) and all(i > 0 for i in points),
             "worker.split", f"split points must be increasing and > 0, got {points!r}")
        stages = len(w.devices) if w.devices else 1
        need(len(points) == stages - 1, "worker.split",
             f"{len(points)} split points make {len(points) + 1} stages but worker.devices "
             f"names {stages}")
    need(w.microbatches >= 1, "worker.microbatches", "must be >= 1")
    need(w.microbatches <= w.batch_size, "worker.microbatches",
         f"{w.microbatches} micro-batches need worker.batch_size >= {w.microbatches}")
    need(w.precision in PRECISIONS, "worker.precision",
         f"{w.precision!r} is not one of {', '.join(PRECISIONS)}")
    need(w.precision != "fp16" or w.local_steps == 1, "worker.precision",
         "fp16 (with its loss scaler) needs worker.local_steps = 1")


# ----------------------------------------------------------------------------------------------
# files

def default_config_path(name: str = "default.yaml") -> Path | None:
    """configs/<name> of the current folder or the source checkout; None (the built-in
    defaults, which are the default run) when neither is there."""
    for path in (Path.cwd() / "configs" / name,
                 Path(__file__).resolve().parent.parent / "configs" / name):
        if path.exists():
            return path
    return None


def load_config(path: str | Path | None = None, overrides=()) -> Config:
    data = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    cfg = from_dict(data)
    return apply_overrides(cfg, overrides) if overrides else cfg


def resolve_workers(value, cfg: Config, gpus: int | None = None) -> int:
    """The number of workers ``--workers VALUE`` asks for: a count as it is, or ``auto``:
    one worker per GPU on a machine with GPUs (worker r then runs on ``cuda:r``), else the
    configured ``run.workers`` (the CPU workers share the cores: the config knows best).
    ``gpus`` defaults to ``torch.cuda.device_count()``. ConfigError for anything else."""
    text = str(value).strip().lower()
    if text != "auto":
        try:
            n = int(text)
        except ValueError:
            raise ConfigError(f"--workers: expected a number or auto, got {value!r}") from None
        if n < 1:
            raise ConfigError(f"--workers: must be >= 1, got {n}")
        return n
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return gpus if gpus > 0 else cfg.run.workers


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(dump_config(cfg))
