"""The old flat keys of ``server`` and ``worker``, before their sub-sections, and where each now
lives: users' files, deploy files and ``--set worker.overlap=true`` keep working.

    ALIASES["worker.overlap"]            # "worker.exchange.overlap"
    normalize({"worker": {"overlap": True}})   # {"worker": {"exchange": {"overlap": True}}}
    new_key("server.auth", "curve")      # "server.auth.mode" (a mapping is the section itself)

A saved configuration uses the new places only (Config.to_dict).
"""
from __future__ import annotations

import copy

from asgd.config.checks import ConfigError

ALIASES = {
    "server.spin_us": "server.spin.us",
    "server.spin_spare_us": "server.spin.spare_us",
    "server.outer_optimizer": "server.outer.optimizer",
    "server.outer_lr": "server.outer.lr",
    "server.outer_momentum": "server.outer.momentum",
    "server.outer_nesterov": "server.outer.nesterov",
    "server.auth": "server.auth.mode",              # when it is a word, not the section
    "server.secret_key_file": "server.auth.secret_key_file",
    "server.allowed_keys": "server.auth.allowed_keys",
    "worker.local_steps": "worker.exchange.local_steps",
    "worker.shared_memory": "worker.exchange.shared_memory",
    "worker.overlap": "worker.exchange.overlap",
    "worker.encoding": "worker.exchange.encoding",
    "worker.topk_ratio": "worker.exchange.topk_ratio",
    "worker.weights_encoding": "worker.exchange.weights_encoding",
    "worker.push_retries": "worker.exchange.push_retries",
    "worker.devices": "worker.stages.devices",
    "worker.split": "worker.stages.split",
    "worker.microbatches": "worker.stages.microbatches",
    "worker.precision": "worker.stages.precision",
    "worker.recompute": "worker.stages.recompute",
    "worker.offload_activations": "worker.stages.offload_activations",
    "worker.slow_factor": "worker.straggler.factor",
    "worker.delay_s": "worker.straggler.delay_s",
    "worker.slow_ranks": "worker.straggler.ranks",
    "worker.secret_key_file": "worker.auth.secret_key_file",
    "worker.server_key": "worker.auth.server_key",
}


def new_key(key: str, value=None) -> str:
    """Where ``key`` lives now (itself when it is no alias). An old key that names a section
    now (``server.auth``) is an alias only for a value that is not a mapping."""
    new = ALIASES.get(key)
    if new is None or (new.startswith(key + ".") and isinstance(value, dict)):
        return key
    return new


def aliases_under(prefix: str) -> dict[str, str]:
    """{old last part: new key relative to ``prefix``} for the aliases in section ``prefix``:
    what "did you mean" offers for a misspelt old key."""
    out = {}
    for old, new in ALIASES.items():
        head, _, leaf = old.rpartition(".")
        if head == prefix:
            out[leaf] = new[len(prefix) + 1:]
    return out


def normalize(data):
    """A configuration mapping (as read from YAML) with every old key moved to its new place.
    Both the old and the new key given: ConfigError naming both."""
    if not isinstance(data, dict):
        return data
    data = copy.deepcopy(data)              # the caller's mapping stays as it was
    for section in ("server", "worker"):
        sec = data.get(section)
        if not isinstance(sec, dict):
            continue
        moved = []          # taken out first: server.auth the word makes room for the section
        for old in list(sec):
            key = f"{section}.{old}"
            new = new_key(key, sec[old])
            if new != key:
                moved.append((key, new, sec.pop(old)))
        for key, new, value in moved:
            node = data
            parts = new.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):      # the section given as a non-mapping:
                    break                           # asgd.config.load names it
            else:
                if parts[-1] in node:
                    raise ConfigError(f"{key} and {new} both given: {key} is the old name "
                                      f"of {new}; keep {new}")
                node[parts[-1]] = value
    return data
