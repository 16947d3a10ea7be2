"""Configuration (asgd.config): defaults, the shipped YAML, typed overrides, named errors."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from asgd.config import (Config, ConfigError, apply_overrides, from_dict, load_config,
                         save_config)
from asgd.core.layout import ParameterLayout
from asgd.tasks.models import build_model

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def test_defaults():
    cfg = Config()
    assert from_dict({}) == cfg
    assert load_config() == cfg
    assert cfg.model.name == "cnn1d" and cfg.data.name == "mnist1d"
    assert cfg.optimizer.name in ("sgd", "adam", "adamw", "adagrad")
    assert cfg.server.policy == "scale" and cfg.server.max_staleness == 3   # see experiments.md
    assert cfg.server.bind.startswith("tcp://127.0.0.1:")   # loopback unless told otherwise
    assert cfg.run.workers >= 1
    assert cfg.run.max_updates > 0 or cfg.run.max_seconds > 0 or cfg.worker.max_steps > 0


def test_builtin_defaults_are_the_default_run():
    """`asgd launch` without configs/default.yaml at hand runs the built-in defaults: the
    same run as the file."""
    assert Config() == load_config(DEFAULT_CONFIG)


def test_configs_default_yaml_loads():
    cfg = load_config(DEFAULT_CONFIG)
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert cfg.model.name == raw["model"]["name"] == "cnn1d"
    assert cfg.model.args == raw["model"].get("args", {}) == {}   # --set model.name=mlp works
    assert cfg.optimizer.name == raw["optimizer"]["name"]
    assert cfg.optimizer.lr == raw["optimizer"]["lr"]
    assert cfg.schedule.kind == raw["schedule"]["kind"]
    assert cfg.schedule.warmup == raw["schedule"]["warmup"]
    assert cfg.run.workers == raw["run"]["workers"]
    assert cfg.run.max_updates == raw["run"]["max_updates"]
    # keys the file leaves out keep their defaults
    assert cfg.worker.request_timeout_s == Config().worker.request_timeout_s


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run.workers = 3  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------
# overrides keep types

@pytest.mark.parametrize("override, get, value, tp", [
    ("optimizer.lr=0.003", lambda c: c.optimizer.lr, 0.003, float),
    ("optimizer.lr=1", lambda c: c.optimizer.lr, 1.0, float),      # an int is a float
    ("run.workers=4", lambda c: c.run.workers, 4, int),
    ("run.seed=7", lambda c: c.run.seed, 7, int),
    ("run.name=exp-1", lambda c: c.run.name, "exp-1", str),
    ("server.max_staleness=3", lambda c: c.server.max_staleness, 3, int),
    ("server.max_staleness=null", lambda c: c.server.max_staleness, None, type(None)),
    ("optimizer.betas=[0.8, 0.95]", lambda c: c.optimizer.betas, [0.8, 0.95], list),
    ("worker.device=cpu", lambda c: c.worker.device, "cpu", str),
    ("schedule.kind=step", lambda c: c.schedule.kind, "step", str),
])
def test_override_keeps_type(override, get, value, tp):
    cfg = load_config(DEFAULT_CONFIG, [override])
    assert get(cfg) == value
    assert type(get(cfg)) is tp


def test_bool_override():
    cfg = load_config(None, ["optimizer.name=sgd", "optimizer.momentum=0.9",
                             "optimizer.nesterov=true"])
    assert cfg.optimizer.nesterov is True and cfg.optimizer.momentum == 0.9


def test_overrides_apply_in_order_and_leave_the_rest():
    base = load_config(DEFAULT_CONFIG)
    cfg = apply_overrides(base, ["run.workers=3", "run.workers=5"])
    assert cfg.run.workers == 5
    assert cfg.replace(**{"run.workers": 2}) == base
    assert dataclasses.replace(cfg, run=base.run) == base


@pytest.mark.parametrize("override, key", [
    ("optimizer.lr=abc", "optimizer.lr"),
    ("optimizer.lr=true", "optimizer.lr"),
    ("run.workers=2.5", "run.workers"),
    ("run.workers=two", "run.workers"),
    ("run.workers=true", "run.workers"),
    ("optimizer.nesterov=1", "optimizer.nesterov"),
    ("run.name=3", "run.name"),
    ("optimizer.betas=0.9", "optimizer.betas"),
    ("model.args=5", "model.args"),
    ("optimizer=3", "optimizer"),
])
def test_override_of_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(DEFAULT_CONFIG, [override])
    assert key in str(e.value)


@pytest.mark.parametrize("override, key", [
    ("optimizer.lrr=0.1", "optimizer.lrr"),
    ("foo.bar=1", "foo.bar"),
    ("foo=1", "foo"),
    ("run.worker=2", "run.worker"),
    ("server.bind.port=5", "server.bind.port"),
    ("runs.workers=2", "runs.workers"),
])
def test_unknown_override_key_is_named(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(DEFAULT_CONFIG, [override])
    assert key in str(e.value)


def test_override_without_equals_sign():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["run.workers"])
    assert "run.workers" in str(e.value)


def test_unknown_key_in_yaml_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"optimizer": {"name": "sgd", "lrate": 0.1}}))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "optimizer.lrate" in str(e.value)
    path.write_text(yaml.safe_dump({"optimiser": {"name": "sgd"}}))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "optimiser" in str(e.value)


def test_wrong_type_in_yaml_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"worker": {"batch_size": "big"}}))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "worker.batch_size" in str(e.value)


def test_missing_file_and_bad_yaml_are_config_errors(tmp_path):
    with pytest.raises(ConfigError):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError):
        load_config(bad)


# ----------------------------------------------------------------------------------------------
# semantic validation

@pytest.mark.parametrize("overrides, key", [
    (["optimizer.name=foo"], "optimizer.name"),
    (["run.workers=0"], "run.workers"),
    (["optimizer.lr=0"], "optimizer.lr"),
    (["optimizer.lr=-0.1"], "optimizer.lr"),
    (["optimizer.momentum=1.0"], "optimizer.momentum"),
    (["optimizer.nesterov=true"], "optimizer.nesterov"),          # without momentum
    (["optimizer.betas=[0.9]"], "optimizer.betas"),
    (["optimizer.betas=[0.9, 1.0]"], "optimizer.betas"),
    (["schedule.kind=linear"], "schedule.kind"),
    (["schedule.gamma=0"], "schedule.gamma"),
    (["server.policy=ssp9"], "server.policy"),
    (["server.policy=max_staleness", "server.max_staleness=null"],
     "server.max_staleness"),                                       # the bound is required
    (["server.bind=localhost"], "server.bind"),                    # no port
    (["server.max_staleness=-1"], "server.max_staleness"),
    (["server.max_message_mb=0"], "server.max_message_mb"),
    (["worker.batch_size=0"], "worker.batch_size"),
    (["worker.device=tpu"], "worker.device"),
    (["worker.reconnect_timeout_s=0"], "worker.reconnect_timeout_s"),
    (["run.max_updates=0", "run.max_seconds=0"], "run.max_updates"),   # no budget at all
    (["run.name=a/b"], "run.name"),
])
def test_semantic_validation_names_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(DEFAULT_CONFIG, overrides)
    assert key in str(e.value)


def test_max_staleness_policy_with_a_bound_is_valid():
    cfg = load_config(None, ["server.policy=max_staleness", "server.max_staleness=0"])
    assert cfg.server.policy == "max_staleness" and cfg.server.max_staleness == 0


def test_model_args_channels_override_builds_that_model():
    cfg = load_config(DEFAULT_CONFIG, ["model.args.channels=32"])
    assert cfg.model.args == {"channels": 32}
    model = build_model(cfg.model, (40,), 10, seed=0)
    assert model.conv1.out_channels == 32 and model.conv3.out_channels == 32
    # a key inside model.args that the file does not have may be added too
    cfg = load_config(None, ["model.name=mlp", "model.args.hidden=[16]"])
    assert cfg.model.args == {"hidden": [16]}
    assert [m.out_features for m in build_model(cfg.model, (40,), 10).net
            if hasattr(m, "out_features")] == [16, 10]


def test_save_and_load_round_trip(tmp_path):
    cfg = load_config(DEFAULT_CONFIG, ["optimizer.lr=0.5", "model.args.channels=16",
                                       "server.max_staleness=4", "run.name=x"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_on_and_off_stay_words_for_a_word_valued_key():
    """YAML 1.1 reads `off` as false; a key whose values are words takes it back as "off"."""
    cfg = load_config(None, ["worker.exchange.shared_memory=off"])
    assert cfg.worker.exchange.shared_memory == "off"
    cfg = load_config(None, ["worker.exchange.shared_memory=on"])
    assert cfg.worker.exchange.shared_memory == "on"
    with pytest.raises(ConfigError, match="worker.exchange.encoding"):
        load_config(None, ["worker.exchange.encoding=off"])
