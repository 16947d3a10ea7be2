"""The sub-sections of ``server`` and ``worker`` (asgd.config: server.auth, server.spin,
server.outer, worker.exchange, worker.stages, worker.straggler, worker.auth) and the old flat
keys, which files, checkpoints and ``--set`` still use: each lands in its new place, a saved
configuration has only the new ones, and a misspelt key still gets "did you mean".

    python -m pytest -q tests/test_config_aliases.py
"""
from __future__ import annotations

import dataclasses
import functools

import pytest
import yaml

from asgd.config import (ALIASES, Config, ConfigError, apply_overrides, dump_config, from_dict,
                         load_config)

# a valid value other than the default for every key that has an old name
VALUES = {
    "server.spin.us": 50.0, "server.spin.spare_us": 100.0,
    "server.outer.optimizer": "adam", "server.outer.lr": 0.1, "server.outer.momentum": 0.5,
    "server.outer.nesterov": False,
    "server.auth.mode": "curve", "server.auth.secret_key_file": "keys/server.key_secret",
    "server.auth.allowed_keys": "keys/allowed",
    "worker.exchange.local_steps": 4, "worker.exchange.shared_memory": "off",
    "worker.exchange.overlap": True, "worker.exchange.encoding": "fp16",
    "worker.exchange.topk_ratio": 0.5, "worker.exchange.weights_encoding": "bf16",
    "worker.exchange.push_retries": 5,
    "worker.stages.devices": ["cpu", "cpu"], "worker.stages.split": "time",
    "worker.stages.microbatches": 2, "worker.stages.precision": "bf16",
    "worker.stages.recompute": True, "worker.stages.offload_activations": True,
    "worker.straggler.factor": 2.0, "worker.straggler.delay_s": 0.5, "worker.straggler.ranks": [1],
    "worker.auth.secret_key_file": "keys/{id}.key_secret", "worker.auth.server_key": "keys/s.key",
}


def get(cfg: Config, key: str):
    return functools.reduce(getattr, key.split("."), cfg)


def keys(cls=Config, prefix: str = "") -> set[str]:
    """Every dotted key of the configuration (sections are not keys)."""
    out = set()
    for f in dataclasses.fields(cls):
        tp = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if tp is not None and dataclasses.is_dataclass(tp):
            out |= keys(tp, prefix + f.name + ".")
        else:
            out.add(prefix + f.name)
    return out


def test_every_alias_names_a_key_that_exists_and_is_no_key_itself():
    known = keys()
    assert set(ALIASES.values()) <= known, set(ALIASES.values()) - known
    assert not set(ALIASES) & known                   # server.auth is a section now, not a key
    assert len(set(ALIASES.values())) == len(ALIASES)
    assert set(VALUES) == set(ALIASES.values())       # the tests below cover every alias
    assert all(get(Config(), k) != v for k, v in VALUES.items())


def test_old_keys_in_yaml_land_in_their_new_place(tmp_path):
    old = {"server": {}, "worker": {}}
    for o, new in ALIASES.items():
        section, name = o.split(".")
        old[section][name] = VALUES[new]
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(old))
    cfg = load_config(path)
    assert {k: get(cfg, k) for k in VALUES} == VALUES
    # what is saved has the new nesting only, and loads back the same
    saved = yaml.safe_load(dump_config(cfg))
    assert not any(name in saved[o.split(".")[0]] for o in ALIASES
                   for name in [o.split(".")[1]] if o != "server.auth")
    assert saved["server"]["auth"]["mode"] == "curve"
    assert saved["worker"]["exchange"]["overlap"] is True
    assert from_dict(saved) == cfg
    assert old == yaml.safe_load(path.read_text())    # the caller's mapping is left as it was


def test_old_keys_in_overrides_land_in_their_new_place():
    sets = [f"{o}={yaml.safe_dump(VALUES[n], default_flow_style=True).strip()}"
            .replace("\n...", "") for o, n in ALIASES.items()]
    cfg = load_config(None, sets)
    assert {k: get(cfg, k) for k in VALUES} == VALUES
    assert cfg == load_config(None, [s.replace(o, n, 1) for s, (o, n)
                                     in zip(sets, ALIASES.items())])
    assert Config().replace(**{"worker.overlap": True}).worker.exchange.overlap is True
    # server.auth given a mapping is the section itself
    cfg = apply_overrides(Config(), ["server.auth={mode: curve, allowed_keys: k}"])
    assert (cfg.server.auth.mode, cfg.server.auth.allowed_keys) == ("curve", "k")


def test_an_old_and_a_new_key_both_given_is_an_error():
    with pytest.raises(ConfigError, match="worker.overlap and worker.exchange.overlap both"):
        from_dict({"worker": {"overlap": True, "exchange": {"overlap": False}}})


@pytest.mark.parametrize("override, hint", [
    ("worker.exchange.overlapp=true", "did you mean worker.exchange.overlap?"),
    ("server.spin.uss=3", "did you mean server.spin.us?"),
    ("worker.straggler.ranx=[1]", "did you mean worker.straggler.ranks?"),
    ("worker.overlapp=true", "did you mean worker.exchange.overlap?"),      # an old key, misspelt
    ("worker.slow_factr=2", "did you mean worker.straggler.factor?"),
    ("worker.exchang.overlap=true", "did you mean worker.exchange"),   # the sub-section
])
def test_a_misspelt_nested_key_gets_did_you_mean(override, hint):
    with pytest.raises(ConfigError, match="unknown key") as e:
        load_config(None, [override])
    assert hint in str(e.value)
    section, rest = override.split("=")[0].split(".", 1)
    node = yaml.safe_load(override.split("=")[1])
    for part in reversed(rest.split(".")):
        node = {part: node}
    with pytest.raises(ConfigError, match="unknown key") as e:     # the same key in a file
        from_dict({section: node})
    assert hint in str(e.value)


@pytest.mark.parametrize("overrides, key", [
    (["server.spin.us=-1"], "server.spin.us"),
    (["server.spin_us=-1"], "server.spin.us"),          # by its old name: the new one named
    (["server.auth.mode=kerberos"], "server.auth.mode"),
    (["server.outer.optimizer=adagrad"], "server.outer.optimizer"),
    (["server.outer.momentum=0"], "server.outer.nesterov"),
    (["worker.exchange.encoding=zip"], "worker.exchange.encoding"),
    (["worker.exchange.local_steps=0"], "worker.exchange.local_steps"),
    (["worker.stages.microbatches=101"], "worker.stages.microbatches"),   # > batch_size
    (["worker.stages.precision=fp16", "worker.exchange.local_steps=2"],
     "worker.stages.precision"),
    (["worker.straggler.factor=0.5"], "worker.straggler.factor"),
    (["worker.straggler.ranks=[-1]"], "worker.straggler.ranks"),
])
def test_each_sub_section_checks_its_keys(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert key in str(e.value)
