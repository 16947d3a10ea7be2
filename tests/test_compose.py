"""The compose files: every service's command is one the CLI accepts, the workers' ranks are
those of run.workers, and in the sharded file every shard is started once and every worker
lists every shard. A service's rank, shard, bind address and server endpoints may be options
or environment variables (ASGD_RANK, ASGD_SHARD, ASGD_BIND, ASGD_SERVER): they are resolved
as the commands resolve them, through asgd.config.env."""
from __future__ import annotations

import shlex
from pathlib import Path

import click
import pytest
import yaml

from asgd.cli import cli
from asgd.config import load_config
from asgd.config import env as envlib

REPO = Path(__file__).resolve().parents[1]


def services(name: str) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Each service's command, split, and its environment (values as strings)."""
    doc = yaml.safe_load((REPO / name).read_text())
    return {k: (shlex.split(v["command"]), {e: str(x) for e, x in
                                               (v.get("environment") or {}).items()})
            for k, v in doc["services"].items()}


def parsed(argv: list[str]) -> tuple[str, dict]:
    """The subcommand and its parameters, as click parses them (nothing runs)."""
    assert argv[0] == "asgd"
    sub = cli.get_command(None, argv[1])
    ctx = sub.make_context(argv[1], argv[2:])
    return argv[1], ctx.params


def config_of(params: dict, env: dict, rank_source: str | None = None):
    overrides = envlib.with_workers(params["overrides"],
                                    envlib.workers(params["overrides"], env, rank_source))
    return load_config(REPO / params["config_path"], overrides)


def resolved(kind: str, params: dict, env: dict) -> dict:
    """What the command would run with: its options, else its environment (no Slurm here)."""
    if kind == "server":
        cfg = config_of(params, env)
        bind = envlib.bind(params["bind"], env)
        return {"cfg": cfg, "shard": envlib.shard(params["shard"], env, cfg.server.shards),
                "bind": bind.value if bind else cfg.server.bind}
    rank = envlib.rank(params["rank"], env)
    cfg = config_of(params, env, rank.source)
    return {"cfg": cfg, "rank": envlib.check_rank(rank, cfg.run.workers),
            "endpoint": envlib.server_endpoints(params["endpoint"], env).value}


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.shards.yml"])
def test_every_service_runs_a_command_the_cli_accepts(name):
    kinds = {}
    for service, (argv, env) in services(name).items():
        kind, params = parsed(argv)
        kinds.setdefault(kind, []).append((service, resolved(kind, params, env)))
    servers, workers = kinds["server"], kinds["worker"]
    cfg = workers[0][1]["cfg"]
    assert sorted(p["rank"] for _, p in workers) == list(range(cfg.run.workers))
    assert all(p["cfg"].run.workers == cfg.run.workers for _, p in servers + workers)
    assert len(servers) == cfg.server.shards
    assert sorted(p["shard"] for _, p in servers) == list(range(cfg.server.shards))
    names = {s for s, _ in servers}
    for _, p in workers:
        hosts = {e.split("//")[1].split(":")[0] for e in p["endpoint"].split(",")}
        assert hosts == names
    for _, p in servers:
        assert p["cfg"].server.shards == cfg.server.shards
        assert p["bind"].startswith("tcp://0.0.0.0:")


def test_a_bad_command_is_caught_by_the_same_parse():
    with pytest.raises(click.UsageError):
        parsed(["asgd", "server", "--config", "configs/default.yaml", "--no-such-flag"])


def test_the_dockerfile_imports_what_exists():
    """The image's build steps run Python; every name they import must exist."""
    import importlib
    import re

    text = (REPO / "Dockerfile").read_text()
    found = re.findall(r"from ([\w.]+) import (\w+)", text)
    assert found, "the Dockerfile runs no Python import: update this test"
    for module, name in found:
        assert hasattr(importlib.import_module(module), name), f"{module}.{name}"
