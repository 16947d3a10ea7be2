"""The ``asgd`` command line.

    asgd launch                                  # configs/default.yaml: MNIST-1D, 2 workers
    asgd launch --workers 4 --set optimizer.lr=0.003
    asgd server --config c.yaml --bind tcp://0.0.0.0:5555
    asgd worker --config c.yaml --server tcp://host:5555 --rank 1
    asgd eval runs/<name>
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from asgd.config import ConfigError, load_config


def default_config_path() -> Path | None:
    """configs/default.yaml of the current folder or the source checkout; None (the built-in
    defaults, which are the same run) when neither is there."""
    for path in (Path.cwd() / "configs" / "default.yaml",
                 Path(__file__).resolve().parent.parent / "configs" / "default.yaml"):
        if path.exists():
            return path
    return None


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
    from asgd.launch import LaunchError
    from asgd.launch import launch as run_launch

    path = config_path or default_config_path()
    overrides = list(overrides) + ([f"run.workers={workers}"] if workers is not None else [])
    try:
        cfg = load_config(path, overrides)
    except ConfigError as e:
        raise click.ClickException(str(e))
    try:
        summary = run_launch(cfg, quiet=quiet)
    except LaunchError as e:
        raise click.ClickException(str(e))
    keys = ("test_accuracy", "test_loss", "wall_s", "updates_applied", "updates_dropped",
            "staleness_mean", "staleness_max", "samples_per_s", "workers", "status")
    click.echo(json.dumps({k: summary.get(k) for k in keys}, indent=2))
    click.echo(f"run directory: {summary['run_dir']}", err=True)
    if summary["status"] != "ok":
        for f in summary["failures"]:
            click.echo(f"error: {f}", err=True)
        sys.exit(1)


@cli.command("eval")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False), default=None,
              help="A checkpoint folder other than <run_dir>/checkpoint.")
def eval_cmd(run_dir, checkpoint):
    """Evaluate a run's checkpoint on the held-out split."""
    from asgd.evaluate import evaluate_checkpoint

    try:
        result = evaluate_checkpoint(run_dir, checkpoint)
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e))
    click.echo(json.dumps(result, indent=2))


def _add_process_commands():
    from server.main import main as server_main
    from worker.main import main as worker_main

    cli.add_command(server_main, "server")
    cli.add_command(worker_main, "worker")


_add_process_commands()


def main():
    cli()


if __name__ == "__main__":
    main()
