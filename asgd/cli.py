"""The ``asgd`` command line.

    asgd launch                                  # configs/default.yaml: MNIST-1D, 2 workers
    asgd launch --workers 4 --set optimizer.lr=0.003
    asgd server --config c.yaml --bind tcp://0.0.0.0:5555
    asgd worker --config c.yaml --server tcp://host:5555 --rank 1
    asgd eval runs/<name>
    asgd experiment straggler
    asgd bench transport --params 1M --vs torch-rpc

Loading this module imports click and the configuration only: each command imports what it
needs when it runs, so ``asgd --help`` never pays for torch. ``asgd server`` and ``asgd worker``
hand over to the ``server`` and ``worker`` packages (also ``python -m server`` / ``-m worker``).
"""
from __future__ import annotations

import json
import sys

import click

from asgd.config import ConfigError, default_config_path, load_config


def echo(text: str, err: bool = False) -> None:
    """click.echo that survives a closed pipe (``asgd launch | head``): the run's result is
    in its run directory whatever became of the terminal."""
    try:
        click.echo(text, err=err)
    except (BrokenPipeError, OSError):
        from asgd.launch.display import silence

        silence(sys.stderr if err else sys.stdout)


def endpoint_or_exit(text: str, option: str, bind: bool = False) -> str:
    from asgd.core.endpoint import parse_endpoint

    try:
        return parse_endpoint(text, bind=bind)
    except ValueError as e:
        echo(f"Error: {option}: {e}", err=True)     # one line, the usage's exit code
        sys.exit(2)


def config_or_exit(path, overrides):
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        raise click.ClickException(str(e))


def fast_exit(code: int) -> None:
    """Exit a server or worker process once its work is written: streams and logs flushed,
    then ``os._exit``, skipping interpreter teardown (torch's takes most of a second, and the
    launcher waits for it)."""
    import logging
    import os

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="asgd")
def cli():
    """asgd: asynchronous SGD on a parameter-server cluster for PyTorch."""


@cli.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML run configuration (default: configs/default.yaml).")
@click.option("--workers", type=int, default=None, help="Number of local workers (run.workers).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override any config key, e.g. --set optimizer.lr=0.003 (repeatable).")
@click.option("--quiet", is_flag=True, help="No progress display.")
def launch(config_path, workers, overrides, quiet):
    """Run a server and N workers on this machine, evaluate, write runs/<name>/."""
    from asgd.launch.launcher import LaunchError
    from asgd.launch.launcher import launch as run_launch

    path = config_path or default_config_path()
    overrides = list(overrides) + ([f"run.workers={workers}"] if workers is not None else [])
    cfg = config_or_exit(path, overrides)
    try:
        summary = run_launch(cfg, quiet=quiet)
    except LaunchError as e:
        raise click.ClickException(str(e))
    keys = ("test_accuracy", "test_loss", "wall_s", "updates_applied", "updates_dropped",
            "staleness_mean", "staleness_max", "samples_per_s", "workers", "status")
    echo(json.dumps({k: summary.get(k) for k in keys}, indent=2, allow_nan=False))
    echo(f"run directory: {summary['run_dir']}", err=True)
    if summary["status"] != "ok":
        for f in summary["failures"]:
            echo(f"error: {f}", err=True)
        for d in summary.get("diverged", []):
            echo(f"diverged: {d}", err=True)
        sys.exit(1)


@cli.command("server")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), required=True,
              help="YAML run configuration.")
@click.option("--bind", default=None, help="ZeroMQ endpoint to bind (default: server.bind, "
              "loopback). Use tcp://0.0.0.0:5555 to serve other machines; port 0 picks one.")
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
@click.option("--shard", type=click.IntRange(0), default=0, show_default=True,
              help="With server.shards S > 1: serve the I-th of S ranges of the parameters.")
@click.option("--quiet", is_flag=True, help="No periodic status lines.")
def server_command(config_path, bind, overrides, run_dir, checkpoint_dir, resume, address_file,
                   extend, shard, quiet):
    """Run one parameter server (or one shard of a sharded server)."""
    cfg = config_or_exit(config_path, overrides)
    bind = endpoint_or_exit(bind, "--bind", bind=True) if bind else None
    from server.main import run_server

    if shard >= cfg.server.shards:
        raise click.UsageError(f"--shard {shard} is not in [0, server.shards="
                               f"{cfg.server.shards})")
    fast_exit(run_server(cfg, bind, run_dir, checkpoint_dir, resume, address_file,
                        extend or 0, quiet, shard))


@cli.command("worker")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), required=True,
              help="YAML run configuration.")
@click.option("--server", "endpoint", default=None, help="The server's endpoint, e.g. "
              "tcp://127.0.0.1:5555; for a sharded server every shard's, joined by commas.")
@click.option("--server-file", type=click.Path(dir_okay=False), multiple=True,
              help="Instead of --server: read the endpoint from this file once it appears "
                   "(asgd launch starts the server and workers together); repeat it for "
                   "each shard.")
@click.option("--rank", type=int, default=0, show_default=True,
              help="This worker's rank in [0, run.workers): picks its data shard.")
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
    training loss stayed NaN or Inf."""
    server_file = list(server_file) or None
    if (endpoint is None) == (server_file is None):
        raise click.UsageError("give the server's address: --server tcp://HOST:PORT "
                               "(or --server-file PATH)")
    cfg = config_or_exit(config_path, overrides)
    if endpoint is not None:
        parts = [endpoint_or_exit(e.strip(), "--server") for e in endpoint.split(",")]
        endpoint = parts[0] if len(parts) == 1 else parts
    from worker.main import run

    fast_exit(run(cfg, endpoint, rank, worker_id, run_dir, quiet, server_file))


@cli.command("eval")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False), default=None,
              help="A checkpoint folder other than <run_dir>/checkpoint.")
def eval_cmd(run_dir, checkpoint):
    """Evaluate a run's checkpoint on the held-out split."""
    from asgd.tasks.evaluate import evaluate_checkpoint

    try:
        result = evaluate_checkpoint(run_dir, checkpoint)
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e))
    click.echo(json.dumps(result, indent=2, allow_nan=False))


from asgd.bench.cli import bench  # noqa: E402  (click only)
from asgd.experiments.cli import experiment  # noqa: E402  (click and config only)

cli.add_command(experiment)
cli.add_command(bench)


def main():
    cli()


if __name__ == "__main__":
    main()
