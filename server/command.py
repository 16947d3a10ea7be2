"""``asgd server`` (and ``python -m server``): the server process's command line. The ``asgd``
command (asgd/cli.py) lists it by name and loads it only when it is asked for, so that nothing
under asgd/ imports this side.

Click, the configuration and asgd.commandline only until the command runs: no torch.
"""
from __future__ import annotations

import click

from asgd.commandline import config_or_exit, split_or_exit, endpoint_or_exit, fast_exit


@click.command("server")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), required=True,
              help="YAML run configuration.")
@click.option("--bind", default=None, help="ZeroMQ endpoint to bind (default: $ASGD_BIND, else "
              "server.bind, loopback). Use tcp://0.0.0.0:5555 to serve other machines; port 0 "
              "picks one.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (repeatable).")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Write metrics.jsonl and the checkpoint here.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None,
              help="Where the checkpoint lives (default: <run-dir>/checkpoint).")
@click.option("--resume", is_flag=True, help="Start from the checkpoint, keeping its version.")
@click.option("--address-file", type=click.Path(dir_okay=False), default=None,
              help="Write the bound endpoint to this file once listening.")
@click.option("--extend", type=click.IntRange(1), default=None, metavar="N",
              help="Train N more updates from where it starts (with --resume: from the "
              "checkpoint's version); workers take this budget from the server.")
@click.option("--shard", type=click.IntRange(0), default=None,
              help="With server.shards S > 1: serve the I-th of S ranges of the parameters "
                   "(default: $ASGD_SHARD, else 0).")
@click.option("--quiet", is_flag=True, help="No periodic status lines.")
def server_command(config_path, bind, overrides, run_dir, checkpoint_dir, resume, address_file,
                   extend, shard, quiet):
    """Run one parameter server (or one shard of a sharded server).

    Options not given come from the environment: ASGD_BIND, ASGD_SHARD, ASGD_WORKERS
    (run.workers); see docs/deploy.md."""
    from asgd.config import env as envlib

    environ = envlib.environ()
    try:
        overrides = envlib.with_workers(overrides, envlib.workers(overrides, environ, None))
        cfg = config_or_exit(config_path, overrides)
        cfg = split_or_exit(cfg)   # as asgd launch does: both sides derive the same numbers
        where = envlib.bind(bind, environ)
        shard = envlib.shard(shard, environ, cfg.server.shards)
    except envlib.EnvError as e:
        raise click.UsageError(str(e))
    bind = endpoint_or_exit(where.value, where.source, bind=True) if where else None
    from server.main import run_server

    fast_exit(run_server(cfg, bind, run_dir, checkpoint_dir, resume, address_file,
                        extend or 0, quiet, shard))
