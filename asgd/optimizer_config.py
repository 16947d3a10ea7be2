"""asgd.Optimizer's arguments: its keywords as a run configuration, the settings its hello
carries, and the parameters it trains.

    resolved = resolve({"optimizer": "adamw", "lr": 3e-4}, config=None, inner=False)
    resolved.cfg              # a Config: optimizer, schedule, run.max_updates, worker.*
    resolved.settings         # what the server is told it must use (HELLO.md's "settings")
    check_settings(resolved.settings, hello_reply["config"])   # ValueError naming the first
                                                              # setting the server differs in

The keywords are the config's keys by their last name (``lr`` is optimizer.lr, ``warmup``
schedule.warmup, ``encoding`` worker.exchange.encoding; docs/library.md lists them); ``config=`` a
YAML file (or Config) whose values stand where a keyword is not given. Without a config the
named optimizer takes torch.optim's defaults (AdamW's weight decay 0.01, Adagrad's eps 1e-10),
so ``optimizer="adamw"`` means exactly ``torch.optim.AdamW``.

What hello carries: the optimizer (always, in A-SGD mode); the schedule and the budget only
when the script gives them (a keyword or ``config=``): left out, they are the server's
config's. With local steps: ``local_steps`` and the outer rule when given. ``inner=`` with
``local_steps=1`` pushes deltas that the server adds (BytePS's asynchronous mode): the server's
rule is then plain SGD at ``outer_lr`` (default 1.0) with a constant rate.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from asgd.config import Config, ConfigError, apply_overrides, load_config

# torch.optim's own defaults for the optimizers the server has
TORCH_DEFAULTS = {
    "sgd": {"lr": 1e-3, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0},
    "adam": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
    "adamw": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 1e-2},
    "adagrad": {"lr": 1e-2, "eps": 1e-10, "weight_decay": 0.0},
    "rmsprop": {"lr": 1e-2, "momentum": 0.0, "eps": 1e-8, "weight_decay": 0.0},
}
# the keys of each that the update depends on (the rest are not compared)
OPTIMIZER_KEYS = {name: ("name", *d) for name, d in TORCH_DEFAULTS.items()}
SCHEDULE_KEYS = {"constant": ("kind", "warmup"), "cosine": ("kind", "warmup", "total", "min_lr"),
                 "step": ("kind", "warmup", "step_size", "gamma")}

# keyword -> config key
KEYS = {"optimizer": "optimizer.name", "lr": "optimizer.lr", "momentum": "optimizer.momentum",
        "nesterov": "optimizer.nesterov", "betas": "optimizer.betas", "eps": "optimizer.eps",
        "weight_decay": "optimizer.weight_decay",
        "schedule": "schedule.kind", "warmup": "schedule.warmup", "total": "schedule.total",
        "min_lr": "schedule.min_lr", "step_size": "schedule.step_size", "gamma": "schedule.gamma",
        "max_updates": "run.max_updates", "local_steps": "worker.exchange.local_steps",
        "outer": "server.outer.optimizer", "outer_lr": "server.outer.lr",
        "outer_momentum": "server.outer.momentum", "outer_nesterov": "server.outer.nesterov",
        "lookahead": "server.lookahead"}
LAUNCH_CONFIG = "ASGD_CONFIG"     # the run's config.yaml, given to a launched script
SCHEDULE = ("schedule", "warmup", "total", "min_lr", "step_size", "gamma")
OUTER = ("outer", "outer_lr", "outer_momentum", "outer_nesterov")
# the worker's data-path settings a script may give (worker.*, as asgd worker reads them)
WORKER_KEYS = {k: f"worker.exchange.{k}" for k in ("shared_memory", "overlap", "encoding",
                                                   "topk_ratio", "weights_encoding",
                                                   "push_retries")}
# (not log_every: the script calls opt.log() where it wants a record)
WORKER_KEYS.update({k: f"worker.{k}" for k in ("request_timeout_s", "reconnect_timeout_s",
                                               "spin_us")})
WORKER_KEYS.update({k: f"worker.auth.{k}" for k in ("secret_key_file", "server_key")})

# asgd.Optimizer's answer to a torch scheduler in A-SGD mode
SCHEDULER_HELP = (
    "asgd.Optimizer (A-SGD): the server owns the learning rate and its schedule, so a torch "
    "learning-rate scheduler cannot drive it ({what}). Give the schedule to the optimizer "
    "instead, e.g. asgd.Optimizer(params, lr=3e-4, schedule='cosine', warmup=100, "
    "max_updates=10000) (or the server's config: schedule.*), and drop the scheduler; or use "
    "local steps (inner=your optimizer, local_steps=H), where a scheduler on the inner "
    "optimizer works.")


def _get(cfg: Config, key: str):
    """The value at a dotted config key: _get(cfg, "worker.exchange.overlap")."""
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


for _key in WORKER_KEYS.values():       # each names a key that exists
    _get(Config(), _key)


@dataclass
class Resolved:
    cfg: Config
    settings: dict


def _base(config) -> Config | None:
    if config is None:
        return None
    if isinstance(config, Config):
        return config
    if isinstance(config, (str, Path)):
        return load_config(config)
    raise TypeError(f"config= takes a YAML file's path or an asgd.config.Config, got "
                    f"{type(config).__name__}")


def resolve(given: dict, config=None, inner: bool = False) -> Resolved:
    """``given``: the keywords the script gave (None ones left out). ValueError naming the
    keyword for a value the server cannot use."""
    given = {k: (list(v) if k == "betas" else v) for k, v in given.items()}
    unknown = sorted(set(given) - set(KEYS) - set(WORKER_KEYS))
    if unknown:
        raise TypeError(f"asgd.Optimizer got unknown keyword{'s' * (len(unknown) > 1)} "
                        f"{', '.join(unknown)}")
    base = _base(config)
    if base is None:      # a launched script: the data-path keys of the run's config
        given = {**launch_worker_settings(), **given}
    data = (base or Config()).to_dict()
    name = given.get("optimizer", base.optimizer.name if base else "adamw")
    if name not in TORCH_DEFAULTS:
        raise ValueError(f"asgd.Optimizer: optimizer={name!r} is not one the server has "
                         f"({', '.join(TORCH_DEFAULTS)}); for any other, give your own as "
                         "inner= with local_steps")
    if base is None or name != base.optimizer.name:      # torch.optim's defaults for it
        data["optimizer"] = {**Config().to_dict()["optimizer"], "name": name,
                             **TORCH_DEFAULTS[name]}
    if base is None:      # a torch optimizer: a constant rate, no warm-up, no budget; a
        # cosine asked for decays to 0 as torch's CosineAnnealingLR (eta_min=0)
        data["schedule"].update(kind="constant", warmup=0, min_lr=0.0)
        data["run"]["max_updates"] = 0
    if data["run"]["max_updates"] == 0 and not data["run"]["max_seconds"]:
        data["run"]["max_seconds"] = 1.0      # the config wants a budget; this one is unused
    pairs = [(KEYS.get(k) or WORKER_KEYS[k], v) for k, v in given.items()]
    try:
        cfg = apply_overrides(_from(data), pairs, parsed=True)
    except ConfigError as e:
        raise ValueError(f"asgd.Optimizer: {_keyword_names(str(e))}") from None
    return Resolved(cfg, _settings(cfg, given, base is not None, inner))


def launch_worker_settings(env=None) -> dict:
    """The worker.* data-path keys of the run's config that a launcher names in
    ``$ASGD_CONFIG`` (``asgd launch SCRIPT``), the ones ``asgd worker`` would read; its
    optimizer and schedule are the server's, which has the same config. {} without one."""
    import os

    path = (os.environ if env is None else env).get(LAUNCH_CONFIG, "").strip()
    if not path:
        return {}
    try:
        cfg = load_config(path)
    except ConfigError as e:
        raise ValueError(f"asgd.Optimizer: {LAUNCH_CONFIG}={path}: {e}") from None
    return {k: _get(cfg, key) for k, key in WORKER_KEYS.items()}


def _from(data: dict) -> Config:
    from asgd.config import from_dict

    return from_dict(data)


def _keyword_names(message: str) -> str:
    """A config error in the keywords' names: ``optimizer.lr: must be > 0`` ->
    ``lr (optimizer.lr): must be > 0``."""
    for kw, key in KEYS.items():
        if message.startswith(key + ":"):
            return f"{kw} ({key}){message[len(key):]}"
    for kw, key in WORKER_KEYS.items():
        if message.startswith(key + ":"):
            return f"{kw} ({key}){message[len(key):]}"
    return message


def _settings(cfg: Config, given: dict, from_config: bool, inner: bool) -> dict:
    s, sv = cfg.schedule, cfg.server
    h = cfg.worker.exchange.local_steps
    out: dict = {"local_steps": h}
    if not inner:
        out["optimizer"] = optimizer_settings(cfg)
    elif h == 1:     # deltas, added by the server's A-SGD rule: SGD at the outer rate
        out["optimizer"] = {"name": "sgd", "lr": sv.outer.lr if "outer_lr" in given else 1.0,
                            "momentum": sv.outer.momentum if "outer_momentum" in given else 0.0,
                            "nesterov": bool(sv.outer.nesterov and "outer_nesterov" in given),
                            "weight_decay": 0.0}
        if given.get("outer", "sgd") != "sgd":
            raise ValueError("asgd.Optimizer: inner= with local_steps=1 pushes deltas that the "
                             "server adds by SGD: outer must be sgd")
        out["schedule"] = {"kind": "constant", "warmup": 0}
    elif from_config or any(k in given for k in OUTER):
        out["outer"] = {"optimizer": sv.outer.optimizer, "lr": sv.outer.lr,
                        "momentum": sv.outer.momentum, "nesterov": sv.outer.nesterov}
    if not inner and (from_config or any(k in given for k in SCHEDULE)):
        out["schedule"] = {k: getattr(s, k) for k in SCHEDULE_KEYS[s.kind]}
    if from_config or "max_updates" in given:
        out["max_updates"] = cfg.run.max_updates
    if "lookahead" in given:        # A-SGD's served weights (server/lookahead.py)
        out["lookahead"] = cfg.server.lookahead
    return out


def optimizer_settings(cfg: Config) -> dict:
    o = cfg.optimizer
    return {k: (list(getattr(o, k)) if k == "betas" else getattr(o, k))
            for k in OPTIMIZER_KEYS[o.name]}


# ----------------------------------------------------------------------------------------------
# the parameters

def _parse_params(params):
    """[(name or None, parameter)] and the groups' extra keys, from parameters, (name,
    parameter) pairs, or param-group dicts of either."""
    import torch

    items = list(params)
    if not items:
        raise ValueError("asgd.Optimizer got an empty parameter list")
    groups = items if isinstance(items[0], dict) else [{"params": items}]
    named, extra = [], {}
    for g in groups:
        if not isinstance(g, dict):
            raise TypeError("asgd.Optimizer: give parameters or parameter groups, not both")
        ps = g["params"]
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        for p in ps:
            name, p = p if isinstance(p, tuple) else (None, p)
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"asgd.Optimizer: {type(p).__name__} is not a parameter")
            named.append((name, p))
        extra.update({k: v for k, v in g.items() if k not in ("params", "param_names")})
    return named, extra


def parameters(params, groups: bool = False):
    """(every parameter named, the trainable ones named, whether the names are made up):
    names from ``named_parameters()``, else ``param.<i>``, the i-th given. ValueError for
    what the server cannot train: no trainable parameter, several devices, other dtypes
    than float32, and (unless ``groups``: local steps) groups with settings of their own."""
    import torch

    named, extra = _parse_params(params)
    if not groups and extra:
        raise ValueError(f"asgd.Optimizer: parameter groups with their own settings "
                         f"({', '.join(sorted(extra))}): the server applies one optimizer "
                         "to every parameter; use inner= with local steps for more")
    positional = any(n is None for n, _ in named)
    named = [(f"param.{i}" if positional else n, p) for i, (n, p) in enumerate(named)]
    trainable = [(n, p) for n, p in named if p.requires_grad]
    if not trainable:
        raise ValueError("asgd.Optimizer: none of the parameters requires a gradient")
    devices = sorted({str(p.device) for _, p in trainable})
    if len(devices) > 1:
        raise ValueError(f"asgd.Optimizer: the parameters are on {', '.join(devices)}: put "
                         "the model on one device (a model split over devices is the "
                         "built-in worker's worker.devices)")
    odd = [f"{n} ({p.dtype})" for n, p in trainable if p.dtype != torch.float32]
    if odd:
        raise ValueError(f"asgd.Optimizer trains float32 parameters; {odd[0]} is not "
                         "(keep float32 weights and use torch.autocast for lower precision)")
    return named, trainable, positional


# ----------------------------------------------------------------------------------------------
# the server's answer

def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (a == b and type(a) is type(b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def first_difference(mine: dict, server: dict) -> tuple[str, object, object] | None:
    """(key, this optimizer's value, the server's) of the first setting both give that
    differs; None when none does. A key the server does not report is not compared (a
    server that predates it)."""
    for key, value in mine.items():
        if key not in server:
            continue
        theirs = server[key]
        if isinstance(value, dict) and isinstance(theirs, dict):
            for sub, v in value.items():
                if sub in theirs and not _same(v, theirs[sub]):
                    return f"{key}.{sub}", v, theirs[sub]
        elif not _same(value, theirs):
            return key, value, theirs
    return None


def check_settings(mine: dict, server: dict | None, endpoint: str) -> None:
    """ValueError naming the first setting the server uses differently from this
    optimizer, both values and what to change."""
    found = first_difference(mine, server or {})
    if found is None:
        return
    key, value, theirs = found
    raise ValueError(f"the server at {endpoint} trains with {key} = {theirs!r}, this "
                     f"optimizer with {value!r}: give asgd.Optimizer the server's value, or "
                     f"start the server with {key} = {value!r} (one run, one setting)")


def server_config(cfg: Config, server: dict | None) -> Config:
    """``cfg`` with the optimizer, schedule, budget and outer rule the server reported."""
    server = server or {}
    pairs = []
    for section in ("optimizer", "schedule"):
        for k, v in (server.get(section) or {}).items():
            if k in {f.name for f in dataclasses.fields(getattr(cfg, section))}:
                pairs.append((f"{section}.{k}", v))
    if isinstance(server.get("max_updates"), int):
        pairs.append(("run.max_updates", server["max_updates"]))
    outer = server.get("outer") or {}
    for k in ("optimizer", "lr", "momentum", "nesterov"):
        if k in outer:
            pairs.append((f"server.outer.{k}", outer[k]))
    if isinstance(server.get("local_steps"), int):
        pairs.append(("worker.exchange.local_steps", server["local_steps"]))
    try:
        return apply_overrides(cfg, pairs, parsed=True)
    except ConfigError:
        return cfg
