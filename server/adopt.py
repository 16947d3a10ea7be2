"""A server that learns its model from its first worker, and the hello checks of every later one.

    admit(core, request)                  # in ServerCore._hello, before anything else changes
    need_model(store, request)            # pull, push: "no model yet" while there is none
    settings = server_settings(cfg)       # what hello's "settings" stands for, from a config
    config = hello_config(cfg)            # hello reply's "config": what a worker depends on
    cfg = apply_settings(cfg, given)      # a config with a worker's settings (SettingsError)
    check_settings(cfg, given)            # SettingsError naming the first that differs

A server started without ``model.name`` holds nothing (``ParameterStore.empty``). The first
``hello`` that carries ``tensors`` (the worker's parameter list, with its initial weights as
frames) gives it its model: the parameter list, the weights (a shard keeps its range), and for
each of the worker's ``settings`` that value, the rest from the server's config. Every later
hello, and every hello to a server that has a model (``model.name``, adopted, or resumed from
a checkpoint), is checked instead: ``tensors`` must be the server's parameter list exactly
(``bad_tensor`` naming the first parameter that differs), each setting given must be the
server's (``bad_request`` naming the first that differs, both values and what to change).
A refused hello changes nothing: no model, no worker record, no version.

``settings`` are the server-side settings a worker's behaviour depends on:

    {"optimizer": {"name", "lr", "momentum", "nesterov", "betas", "eps", "weight_decay"},
     "schedule": {"kind", "warmup", "total", "min_lr", "step_size", "gamma"},
     "max_updates": int, "local_steps": int,
     "outer": {"optimizer", "lr", "momentum", "nesterov"}, "lookahead": bool, "dylu": bool}

``local_steps`` is the server's update rule: 1, the optimizer above on each gradient (A-SGD);
H > 1, each push is a pseudo-gradient of H local steps, applied by the ``outer`` optimizer.
``dylu`` is whether ``server.policy`` has ``dylu``: the worker then runs the local steps each
push's reply gives (``local_steps``), not always its own H.
"""
from __future__ import annotations

import logging

import torch

from asgd.config import Config, ConfigError
from asgd.core.flat import FiniteCheck, copy_checked, shard_range
from asgd.core.layout import ParameterLayout
from asgd.core.protocol import ProtocolError, Request

log = logging.getLogger("asgd.server")

# hello's "settings": each key (or sub-key) and the config key that holds it on the server
SETTINGS: dict = {
    "optimizer": {k: f"optimizer.{k}" for k in ("name", "lr", "momentum", "nesterov", "betas",
                                                 "eps", "weight_decay")},
    "schedule": {k: f"schedule.{k}" for k in ("kind", "warmup", "total", "min_lr",
                                               "step_size", "gamma")},
    "max_updates": "run.max_updates",
    "local_steps": "worker.exchange.local_steps",
    "outer": {"optimizer": "server.outer.optimizer", "lr": "server.outer.lr",
              "momentum": "server.outer.momentum", "nesterov": "server.outer.nesterov"},
    "lookahead": "server.lookahead",
    "dylu": "server.policy",          # a bool: whether the policy has dylu (_dylu)
}

NO_MODEL_HELLO = ("the server has no model yet: the first worker's hello must carry its "
                  "parameters (asgd.Optimizer does)")
NO_MODEL = ("no model yet: the server learns it from the first worker's hello (with its "
            "parameters, as asgd.Optimizer sends them)")


class SettingsError(ValueError):
    """Settings that are not known, not valid, or not the server's."""


def _value(data: dict, key: str):
    for part in key.split("."):
        data = data[part]
    return data


def _dylu(policy: str) -> bool:
    from asgd.core.policies import parse_policy

    try:
        return "dylu" in parse_policy(policy)
    except ValueError:
        return False


def _with_dylu(policy: str, on: bool) -> str:
    """``policy`` with ``dylu`` added or taken out."""
    names = [p.strip() for p in policy.split("+") if p.strip() and p.strip() != "dylu"]
    names = [p for p in names if p != "none" or not on]
    return "+".join(names + ["dylu"] if on else names) or "none"


def _given(given: dict) -> list[tuple[str, str, object]]:
    """(setting, config key, value) for each setting given, in SETTINGS' order;
    SettingsError for a key that is not a setting."""
    if not isinstance(given, dict):
        raise SettingsError(f"'settings' must be a map, got {type(given).__name__}")
    out = []
    for name in given:
        if name not in SETTINGS:
            raise SettingsError(f"unknown setting {name!r} (known: {', '.join(SETTINGS)})")
    for name, where in SETTINGS.items():
        if name not in given:
            continue
        value = given[name]
        if isinstance(where, str):
            out.append((name, where, value))
            continue
        if not isinstance(value, dict):
            raise SettingsError(f"setting {name!r} must be a map of {', '.join(where)}")
        for sub in value:
            if sub not in where:
                raise SettingsError(f"unknown setting {name}.{sub} (known: "
                                    f"{', '.join(f'{name}.{k}' for k in where)})")
        out += [(f"{name}.{sub}", where[sub], value[sub]) for sub in where if sub in value]
    return out


def server_settings(cfg: Config) -> dict:
    """The settings ``cfg`` gives a server, in hello's form."""
    data = cfg.to_dict()
    out = {name: _value(data, where) if isinstance(where, str) else
           {sub: _value(data, key) for sub, key in where.items()}
           for name, where in SETTINGS.items()}
    out["dylu"] = _dylu(cfg.server.policy)
    return out


def hello_config(cfg: Config) -> dict:
    """hello's "config": every server-side setting a worker's behaviour depends on (the
    update rule: local_steps and the outer optimizer among them)."""
    c, own = cfg.to_dict(), server_settings(cfg)
    return {"optimizer": c["optimizer"], "schedule": c["schedule"],
            "policy": c["server"]["policy"], "max_staleness": c["server"]["max_staleness"],
            "model": c["model"], "data": c["data"], "seed": c["run"]["seed"],
            "max_updates": c["run"]["max_updates"], "local_steps": own["local_steps"],
            "outer": own["outer"], "dylu": own["dylu"]}


def apply_settings(cfg: Config, given: dict | None) -> Config:
    """``cfg`` with the settings given (each checked as the config key it stands for)."""
    pairs = {key: value for name, key, value in _given(given or {}) if name != "dylu"}
    if "dylu" in (given or {}):
        on = given["dylu"]
        if not isinstance(on, bool):
            raise SettingsError(f"setting 'dylu' must be true or false, got {on!r}")
        pairs["server.policy"] = _with_dylu(pairs.get("server.policy", cfg.server.policy), on)
    if not pairs:
        return cfg
    try:
        return cfg.replace(**pairs)
    except ConfigError as e:
        raise SettingsError(f"settings: {e}") from None


def check_settings(cfg: Config, given: dict | None) -> None:
    """SettingsError naming the first setting given that is not ``cfg``'s, both values and
    what to change."""
    if not given:
        return
    mine = apply_settings(cfg, given).to_dict()
    theirs = cfg.to_dict()
    for name, key, _ in _given(given):
        a, b = _value(mine, key), _value(theirs, key)
        if name == "dylu":
            a, b = _dylu(a), _dylu(b)
        if a == b:
            continue
        if name == "dylu":
            raise SettingsError(
                f"setting dylu differs: this worker has {a}, the server {b}. With dylu the "
                "server tells each worker its local steps in every push's reply (by its "
                "speed); a worker that does not follow them, or follows a server that sends "
                "none, runs rounds of the wrong length. Give the worker the server's "
                "server.policy, or start the server with dylu "
                f"{'in' if a else 'out of'} server.policy")
        if name == "local_steps":
            raise SettingsError(
                f"setting local_steps differs: this worker has {a}, the server {b}. With "
                "local_steps 1 a push is a gradient that the server's optimizer applies "
                "(A-SGD); with H > 1 it is a pseudo-gradient of H local steps that the outer "
                "optimizer applies: the server would apply this worker's pushes with the wrong "
                f"rule. Give the worker local_steps={b}, or start the server with {key}={a}")
        raise SettingsError(f"setting {name} differs: this worker has {a!r}, the server "
                            f"{b!r}. Give the worker the server's value, or start the server "
                            f"with {key}={a!r}")


# ----------------------------------------------------------------------------------------------
# the model a hello carries

def model_of(req: Request, shards: int = 1) -> tuple[ParameterLayout, torch.Tensor]:
    """The parameter list and the flat initial weights of a hello's tensors; ProtocolError
    (bad_tensor) for a list that cannot be served: not float32, a name twice, no values,
    values that are not finite, too few values for the server's shards."""
    def bad(problem: str):
        raise ProtocolError("bad_tensor", problem, req.id)

    if not req.tensors:
        bad("the parameter list is empty: a model needs parameters that train")
    seen = set()
    for t in req.tensors:
        if t.dtype != "float32":
            bad(f"parameter {t.name!r} is {t.dtype}: parameters go on the wire as float32")
        if t.name in seen:
            bad(f"parameter {t.name!r} is in the list twice")
        seen.add(t.name)
    layout = ParameterLayout.from_specs([t.spec for t in req.tensors])
    if layout.numel == 0:
        bad("the parameters hold no values")
    if shards > 1:
        try:
            shard_range(layout.numel, 0, shards)
        except ValueError as e:
            bad(str(e))
    flat = torch.empty(layout.numel, dtype=torch.float32)
    out, check = flat.numpy(), FiniteCheck()
    for t, (a, b) in zip(req.tensors, layout.spans()):
        if not copy_checked(out[a:b], t.array.reshape(-1), check):
            bad(f"parameter {t.name!r} has non-finite values")
    return layout, flat


def check_tensors(layout: ParameterLayout, req: Request) -> None:
    """ProtocolError (bad_tensor) naming the first parameter in which a hello's list differs
    from the server's (its name, dtype and shape on both sides)."""
    theirs = ParameterLayout.from_specs([t.spec for t in req.tensors])
    if theirs == layout:
        return

    def show(specs, i: int) -> str:
        return f"{specs[i].name} {specs[i].dtype}{list(specs[i].shape)}" \
            if i < len(specs) else "none"

    i = next(i for i in range(max(len(layout), len(theirs)))
             if i >= len(layout) or i >= len(theirs) or layout.specs[i] != theirs.specs[i])
    raise ProtocolError("bad_tensor", f"this worker's model is not the server's: parameter "
                        f"{i} is {show(theirs.specs, i)} here, {show(layout.specs, i)} on the "
                        f"server (this worker has {len(theirs)} parameters, the server "
                        f"{len(layout)})", req.id)


def need_model(store, req: Request) -> None:
    """pull and push before a model exists: ProtocolError (bad_request, "no model yet")."""
    if not store.has_model:
        raise ProtocolError("bad_request", NO_MODEL, req.id)


def admit(core, req: Request) -> None:
    """A hello's model and settings: adopted by a server without a model, checked by one
    with (ProtocolError, and nothing changed, when they do not match)."""
    store = core.store
    given = req.get("settings")
    try:
        if store.has_model:
            if req.tensors:
                check_tensors(store.layout, req)
            check_settings(core.cfg, given)
            return
        if not req.tensors:
            raise ProtocolError("bad_request", NO_MODEL_HELLO, req.id)
        cfg = apply_settings(core.cfg, given)
        layout, flat = model_of(req, store.shard_of[1])
    except SettingsError as e:
        raise ProtocolError("bad_request", str(e), req.id) from None
    store.adopt(layout, flat, cfg, dict(given or {}))
    core.model_changed(cfg)
    log.info("adopted the model of worker %s: %d parameters in %d tensors%s; settings from "
             "it: %s", req.worker, layout.numel, len(layout),
             "" if store.whole else f" (values {store.span[0]}-{store.span[1]} here)",
             ", ".join(name for name, _, _ in _given(given or {})) or "none")
