"""What every section shares: the error, the one-line tests, the field of a sub-section, the
names of devices and of Ray's resources. No torch, no other section.

    need(cfg.lr > 0, "optimizer.lr", f"must be > 0, got {cfg.lr}")   # ConfigError naming the key
    need_one_of(cfg.name, OPTIMIZERS, "optimizer.name")   # "optimizer.name: 'x' is not one of ..."
    exchange: ExchangeConfig = section(ExchangeConfig)    # a sub-section, with its own defaults
"""
from __future__ import annotations

from dataclasses import field


class ConfigError(ValueError):
    pass


def need(ok: bool, key: str, msg: str) -> None:
    """ConfigError ``"<key>: <msg>"`` unless ``ok``: every check names the key a user sets."""
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def need_one_of(value, choices, key: str) -> None:
    """ConfigError ``"<key>: 'x' is not one of a, b, c"`` unless ``value`` is in ``choices``."""
    need(value in choices, key, f"{value!r} is not one of {', '.join(choices)}")


def section(cls):
    """The field of a sub-section: a frozen dataclass of its own, built from its defaults, that
    owns its ``check()`` (the section holding it calls that)."""
    return field(default_factory=cls)


RAY_RESOURCES = ("CPU", "GPU", "memory")     # asgd launch --on ray: worker/server.resources


def device_name_ok(name, auto: bool = False) -> bool:
    """cpu, cuda, cuda:N, N, with ``{local_rank}`` allowed in place of N (and auto)."""
    if not isinstance(name, str):
        return False
    if auto and name == "auto":
        return True
    name = name.replace("{local_rank}", "0")
    return name in ("cpu", "cuda") or name.isdigit() or (
        name.startswith("cuda:") and name[5:].isdigit())


def check_resources(key: str, res: dict) -> None:
    """``server.resources`` / ``worker.resources``: Ray resource names to amounts >= 0."""
    need(all(isinstance(k, str) and k and isinstance(v, (int, float))
             and not isinstance(v, bool) and v >= 0 for k, v in res.items()), key,
         f"must map resource names to amounts >= 0, e.g. {{CPU: 1}}, got {res!r}")
    for name in res:    # a custom resource no node has would leave the run waiting
        need(name in RAY_RESOURCES or name.lower() not in [r.lower() for r in RAY_RESOURCES],
             key, f"{name!r}: Ray's built-in resources are spelt {', '.join(RAY_RESOURCES)}")
