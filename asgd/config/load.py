"""Reading a configuration: YAML and ``key=value`` overrides into a checked ``Config``, typed
field by field, unknown keys named with a "did you mean"; and writing it back.

    cfg = load_config("configs/default.yaml", overrides=["optimizer.lr=0.003"])
    cfg = apply_overrides(cfg, ["worker.overlap=true"])   # an old key: worker.exchange.overlap
    save_config(cfg, "runs/x/config.yaml")                # the new nesting only
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml

from asgd.config.aliases import aliases_under, new_key, normalize
from asgd.config.checks import ConfigError
from asgd.config.sections import Config, validate

# ----------------------------------------------------------------------------------------------
# building the dataclasses, typed

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
                          + did_you_mean(unknown, {**aliases_under(prefix),
                                                   **{n: n for n in names}}, prefix)
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


def did_you_mean(unknown, known, prefix: str = "", rest: str = "") -> str:
    """"; did you mean optimizer.lr?" for the known keys closest to the misspelt ones (""
    when none is close); ``prefix`` and ``rest`` are the key's parts before and after.
    ``known`` may map a name to what to offer for it (an old key to its new place)."""
    shown = known if isinstance(known, dict) else {n: n for n in known}
    names = {str(n): v for n, v in shown.items()}
    close = []
    for k in unknown:
        for m in difflib.get_close_matches(str(k), list(names), n=1, cutoff=0.6):
            close.append(".".join(p for p in (prefix, names[m], rest) if p))
    return f"; did you mean {' or '.join(close)}?" if close else ""


def from_dict(data: dict | None) -> Config:
    cfg = _build(Config, normalize(data or {}), "")
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
        key = new_key(key, value)
        parts = key.split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node:
                hint = did_you_mean([part], _known(node, parts[:i]), ".".join(parts[:i]),
                                    ".".join(parts[i + 1:])) if isinstance(node, dict) else ""
                raise ConfigError(f"unknown key: {'.'.join(parts[:i + 1])} (in override "
                                  f"{key}){hint}")
            node = node[part]
        if not isinstance(node, dict) or (parts[-1] not in node and len(parts) < 3):
            hint = did_you_mean(parts[-1:], _known(node, parts[:-1]), ".".join(parts[:-1])) \
                if isinstance(node, dict) else ""
            raise ConfigError(f"unknown key: {key}{hint}")
        node[parts[-1]] = value
    return from_dict(data)


def _known(node: dict, parts: list) -> dict:
    """The keys of ``node`` (the section ``parts`` names) and its old keys, for "did you mean"."""
    return {**aliases_under(".".join(parts)), **{k: k for k in node}}



# ----------------------------------------------------------------------------------------------
# files

def default_config_path(name: str = "default.yaml") -> Path | None:
    """configs/<name> of the current folder or the source checkout; None (the built-in
    defaults, which are the default run) when neither is there."""
    for path in (Path.cwd() / "configs" / name,
                 Path(__file__).resolve().parents[2] / "configs" / name):
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


def split_batch(cfg: Config) -> Config:
    """The run as its built-in workers train it. With ``worker.batch_split`` (the default
    run's), each of the n = ``run.workers`` workers takes b = round(batch_size / (n - 1))
    samples a step, and the settings counted in server versions (``run.max_updates``,
    ``schedule.warmup``, ``schedule.total``, ``schedule.step_size``, ``server.max_staleness``,
    ``server.checkpoint_every``) are multiplied by batch_size / b, so that they keep counting
    the samples they count at one worker. A push is about n - 1 versions old with n workers;
    split so, those versions hold one batch of samples in all, as at two workers (where
    nothing changes): the staleness measured in samples stays one batch whatever the number
    of workers, and nothing needs to be dropped (docs/experiments.md, "Every push counts: the
    batch split"). Under ``sync`` a version is a round of every worker's b: the batch is split
    and nothing scaled.

    Returns the config with those numbers made explicit and ``batch_split`` false, so that
    applying it again (every process of a launch reads the run directory's config.yaml)
    changes nothing. A run without a built-in model (a server for scripts, which own their
    batches) or of one worker keeps its numbers."""
    if not cfg.worker.batch_split:
        return cfg
    n, batch = cfg.run.workers, cfg.worker.batch_size
    if n <= 1 or not cfg.model.name:
        return cfg.replace(**{"worker.batch_split": False})
    from asgd.core.policies import parse_policy

    b = max(1, round(batch / (n - 1)))
    f = 1.0 if "sync" in parse_policy(cfg.server.policy) else batch / b

    def scaled(v):          # 0 and null mean "none": they stay so
        return v if not v else max(1, round(v * f))

    s = cfg.schedule
    try:
        return cfg.replace(**{
            "worker.batch_split": False, "worker.batch_size": b,
            "run.max_updates": scaled(cfg.run.max_updates),
            "schedule.warmup": round(s.warmup * f), "schedule.total": scaled(s.total),
            "schedule.step_size": scaled(s.step_size),
            "server.max_staleness": scaled(cfg.server.max_staleness),
            "server.checkpoint_every": scaled(cfg.server.checkpoint_every)})
    except ConfigError as e:     # a setting the whole batch allows and a share does not
        raise ConfigError(f"worker.batch_split: {n} workers take {b} samples a step each "
                          f"(worker.batch_size {batch} / {n - 1}), and then {e}; give a "
                          "larger worker.batch_size, or worker.batch_split=false") from None


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
