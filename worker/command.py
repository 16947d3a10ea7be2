"""The worker's command line, as ``asgd worker --config c.yaml --server tcp://host:5555``
or ``python -m worker ...``: the server's endpoints, this worker's rank and the number of
workers from options or the environment (asgd.config.env), the CURVE keys, then the training
loop (worker/main.py, imported when the command runs: loading this module costs no torch).
asgd/cli.py names this command in its table, so the library never imports the worker.
"""
from __future__ import annotations

import sys

import click

from asgd.commandline import config_or_exit, split_or_exit, echo, endpoint_or_exit, fast_exit


@click.command("worker")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), required=True,
              help="YAML run configuration.")
@click.option("--server", "endpoint", default=None, help="The server's endpoint, e.g. "
              "tcp://127.0.0.1:5555; for a sharded server every shard's, joined by commas "
              "(default: $ASGD_SERVER).")
@click.option("--server-file", type=click.Path(dir_okay=False), multiple=True,
              help="Instead of --server: read the endpoint from this file once it appears "
                   "(asgd launch starts the server and workers together); repeat it for "
                   "each shard.")
@click.option("--rank", type=int, default=None,
              help="This worker's rank in [0, run.workers): picks its data shard (default: "
                   "$ASGD_RANK, the host name's ordinal with ASGD_RANK_FROM_HOSTNAME=1, "
                   "$SLURM_PROCID, else 0).")
@click.option("--id", "worker_id", default=None, help="Worker id on the wire (default w<rank>).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (repeatable).")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Append worker_step records to <run-dir>/metrics.jsonl.")
@click.option("--quiet", is_flag=True, help="No periodic status lines.")
def worker_command(config_path, endpoint, server_file, rank, worker_id, overrides, run_dir,
                   quiet):
    """Run one worker against a parameter server.

    Exit codes: 0 when a budget ends the run, 2 for a configuration or model that cannot
    train, 3 when the server stayed away longer than worker.reconnect_timeout_s, 4 when the
    training loss stayed NaN or Inf.

    Options not given come from the environment: ASGD_SERVER, ASGD_RANK (or
    ASGD_RANK_FROM_HOSTNAME=1, or SLURM_PROCID), ASGD_WORKERS (or SLURM_NTASKS) for
    run.workers; see docs/deploy.md."""
    from asgd.config import env as envlib

    environ = envlib.environ()
    server_file = list(server_file) or None
    if endpoint is not None and server_file is not None:
        raise click.UsageError("give either --server or --server-file, not both")
    where = envlib.server_endpoints(endpoint, environ) if server_file is None else None
    if where is None and server_file is None:
        raise click.UsageError("give the server's address: --server tcp://HOST:PORT "
                               "(or --server-file PATH, or $ASGD_SERVER)")
    try:
        placed = envlib.rank(rank, environ)
        world = envlib.workers(overrides, environ, placed.source)
        overrides = envlib.with_workers(overrides, world)
        cfg = config_or_exit(config_path, overrides)
        cfg = split_or_exit(cfg)   # as asgd launch does: both sides derive the same numbers
        rank = envlib.check_rank(placed, cfg.run.workers, world)
    except envlib.EnvError as e:
        raise click.UsageError(str(e))
    endpoint = None
    if where is not None:
        parts = [endpoint_or_exit(e.strip(), where.source) for e in where.value.split(",")]
        endpoint = parts[0] if len(parts) == 1 else parts
    from asgd.core import auth

    try:   # CURVE keys (worker.auth.secret_key_file, .server_key) for every client it makes
        auth.use_client_keys(auth.client_keys(cfg.worker, worker_id or f"w{rank}"))
    except auth.AuthError as e:
        echo(f"Error: {e}", err=True)
        sys.exit(2)
    from worker.main import run

    fast_exit(run(cfg, endpoint, rank, worker_id, run_dir, quiet, server_file))
