"""The compose files: every service's command is one the CLI accepts, the workers' ranks are
those of run.workers, and in the sharded file every shard is started once and every worker
lists every shard."""
from __future__ import annotations

import shlex
from pathlib import Path

import click
import pytest
import yaml

from asgd.cli import cli
from asgd.config import load_config

REPO = Path(__file__).resolve().parents[1]


def services(name: str) -> dict[str, list[str]]:
    doc = yaml.safe_load((REPO / name).read_text())
    return {k: shlex.split(v["command"]) for k, v in doc["services"].items()}


def parsed(argv: list[str]) -> tuple[str, dict]:
    """The subcommand and its parameters, as click parses them (nothing runs)."""
    assert argv[0] == "asgd"
    sub = cli.commands[argv[1]]
    ctx = sub.make_context(argv[1], argv[2:])
    return argv[1], ctx.params


def config_of(params: dict):
    return load_config(REPO / params["config_path"], params["overrides"])


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.shards.yml"])
def test_every_service_runs_a_command_the_cli_accepts(name):
    kinds = {}
    for service, argv in services(name).items():
        kind, params = parsed(argv)
        kinds.setdefault(kind, []).append((service, params))
    servers, workers = kinds["server"], kinds["worker"]
    cfg = config_of(workers[0][1])
    assert sorted(p["rank"] for _, p in workers) == list(range(cfg.run.workers))
    assert len(servers) == cfg.server.shards
    assert sorted(p["shard"] for _, p in servers) == list(range(cfg.server.shards))
    names = {s for s, _ in servers}
    for _, p in workers:
        hosts = {e.split("//")[1].split(":")[0] for e in p["endpoint"].split(",")}
        assert hosts == names
    for _, p in servers:
        assert config_of(p).server.shards == cfg.server.shards
        assert p["bind"].startswith("tcp://0.0.0.0:")


def test_a_bad_command_is_caught_by_the_same_parse():
    with pytest.raises(click.UsageError):
        parsed(["asgd", "server", "--config", "configs/default.yaml", "--no-such-flag"])
