"""The ``asgd`` command line.

    asgd launch                                  # configs/default.yaml: MNIST-1D, 2 workers
    asgd launch --workers 4 --set optimizer.lr=0.003
    asgd launch --resume runs/<name> --set run.max_updates=6000   # go on with a run
    asgd launch --on ray [--address head:6379]  # the same run as Ray actors (asgd[ray])
    asgd launch --on ray --num-cpus 2           # ... on a local Ray instance of two CPUs
    asgd launch --workers 2 train.py --lr 3e-4   # your own script as each worker
    asgd server --config c.yaml --bind tcp://0.0.0.0:5555
    asgd worker --config c.yaml --server tcp://host:5555 --rank 1
    asgd eval runs/<name>
    asgd status --server tcp://host:5555 --watch  # a running cluster's stats, live
    asgd keys w0 --out keys                      # CURVE key pair: keys/w0.key, w0.key_secret
    asgd export runs/<name> --int8 --report      # INT8 model file, size/latency/accuracy
    asgd predict runs/<name>/model-int8.asgd inputs.npy
    asgd experiment straggler
    asgd bench transport --params 1M --vs torch-rpc

Loading this module imports click and the configuration only: each command imports what it
needs when it runs, so ``asgd --help`` never pays for torch. ``asgd server`` and ``asgd worker``
are the ``server`` and ``worker`` packages' own commands (server/command.py, worker/command.py;
also ``python -m server`` / ``-m worker``), which this group names and loads when asked for.
``asgd eval``, ``export`` and ``predict`` are defined in asgd.tasks.commands, ``asgd experiment``
in asgd.experiments.cli, and registered at the end; ``asgd bench`` (asgd.bench.cli, whose
options list the encodings, and so load numpy) is named and loaded when asked for, as the sides are.
"""
from __future__ import annotations

import json
import sys

import click

from asgd.commandline import config_or_exit, echo, endpoint_or_exit  # noqa: F401 (re-exported)
from asgd.config import ConfigError, default_config_path


def workers_overrides(value: str, cfg, gpus: int | None = None) -> list[str]:
    """The overrides ``--workers N|auto`` stands for (asgd.config.resolve_workers); with
    ``auto`` on a machine with GPUs (``gpus``: torch's count unless given) each worker also
    runs on its own, ``cuda:{local_rank}``."""
    from asgd.config import resolve_workers

    auto = str(value).strip().lower() == "auto"
    try:
        if auto and gpus is None:
            import torch

            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        n = resolve_workers(value, cfg, gpus)
    except ConfigError as e:
        raise click.BadParameter(str(e).removeprefix("--workers: "),
                                 param_hint="'--workers'") from None
    out = [f"run.workers={n}"]
    if auto and gpus:
        out.append("worker.device=cuda:{local_rank}")
    return out


class Commands(click.Group):
    """The group, plus the server's and worker's commands, named here and defined in their own
    packages (server/command.py, worker/command.py): loaded when asked for, by name, as an
    entry point is, so that nothing under asgd/ imports a side."""

    SIDES = {"server": "server.command:server_command",
             "worker": "worker.command:worker_command",
             "bench": "asgd.bench.cli:bench"}      # not a side: its imports cost 0.2 s

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *self.SIDES})

    def get_command(self, ctx, name):
        if name in self.SIDES and name not in self.commands:
            import importlib

            module, attr = self.SIDES[name].split(":")
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="asgd")
def cli():
    """asgd: asynchronous SGD on a parameter-server cluster for PyTorch."""


@cli.command(context_settings={"allow_interspersed_args": False})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML run configuration (default: configs/default.yaml; with a SCRIPT, "
                   "a server that learns its model from the script, with no budget).")
@click.option("--workers", default=None, metavar="N|auto",
              help="Number of local workers (run.workers); auto: one per GPU (worker r on "
                   "cuda:r), or run.workers without a GPU.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override any config key, e.g. --set optimizer.lr=0.003 (repeatable).")
@click.option("--quiet", is_flag=True, help="No progress display.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None,
              metavar="RUN_DIR",
              help="Go on with an existing run: its config.yaml (with --set), the server "
                   "resumed from its checkpoint, the same run directory.")
@click.option("--on", "on", type=click.Choice(["local", "ray"]), default="local",
              show_default=True,
              help="local: processes on this machine; ray: Ray actors (pip install "
                   "'asgd[ray]'), on a local Ray instance or the cluster at --address.")
@click.option("--address", default=None, metavar="ADDR",
              help="With --on ray: a running Ray cluster (e.g. head:6379, or auto); "
                   "default: a local Ray instance for the run.")
@click.option("--num-cpus", type=click.IntRange(min=1), default=None, metavar="N",
              help="With --on ray and no --address: the local Ray instance's CPUs "
                   "(default: this machine's cores, or what the run's bundles need if more).")
@click.argument("script", required=False)
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED, metavar="[ARGS]...")
def launch(config_path, workers, overrides, quiet, resume_dir, on, address, num_cpus, script,
           script_args):
    """Run a server and N workers on this machine (or on Ray), evaluate, write
    runs/<name>/.

    With SCRIPT, each worker is `python SCRIPT [ARGS...]` (asgd's options come before SCRIPT,
    everything after it goes to the script), told its place by ASGD_SERVER, ASGD_RANK,
    ASGD_WORKERS, ASGD_LOCAL_RANK and ASGD_RUN_DIR; the run ends when every script has
    exited."""
    from pathlib import Path

    from asgd.launch.launcher import LaunchError, resume_launch
    from asgd.launch.launcher import launch as run_launch

    if resume_dir is not None and config_path is not None:
        raise click.UsageError("--resume uses the run's own config.yaml: give no --config")
    if address is not None and on != "ray":
        raise click.UsageError("--address is the Ray cluster's: give it with --on ray")
    if num_cpus is not None and (on != "ray" or address is not None):
        raise click.UsageError("--num-cpus sizes the local Ray instance of --on ray; a cluster "
                               "at --address has its own" if address is not None else
                               "--num-cpus sizes a local Ray instance: give it with --on ray")
    if script is not None:
        from asgd.launch.scripts import launch_script_command

        launch_script_command(config_path, workers, overrides, quiet, resume_dir, on, address,
                              num_cpus, script, script_args)
        return
    path = Path(resume_dir) / "config.yaml" if resume_dir is not None else \
        config_path or default_config_path()
    overrides = list(overrides)
    if workers is not None:
        overrides += workers_overrides(workers, config_or_exit(path, overrides))
    try:
        if on == "ray":
            from asgd.launch.onray import launch_on_ray

            cfg = None if resume_dir is not None else config_or_exit(path, overrides)
            summary = launch_on_ray(cfg, quiet=quiet, address=address,
                                    resume_dir=resume_dir, overrides=overrides,
                                    num_cpus=num_cpus)
        elif resume_dir is not None:
            summary = resume_launch(resume_dir, overrides, quiet=quiet)
        else:
            summary = run_launch(config_or_exit(path, overrides), quiet=quiet)
    except LaunchError as e:
        raise click.ClickException(str(e))
    report_launch(summary)


def report_launch(summary: dict, keys=()) -> None:
    """A launch's result: its main figures as JSON, the run directory, why it failed (exit
    1 unless it ended ok)."""
    keys = ("test_accuracy", "test_loss", "wall_s", "updates_applied", "updates_dropped",
            "staleness_mean", "staleness_max", "samples_per_s", "workers", *keys, "status")
    echo(json.dumps({k: summary.get(k) for k in keys}, indent=2, allow_nan=False))
    echo(f"run directory: {summary['run_dir']}", err=True)
    if summary["status"] != "ok":
        for f in summary["failures"]:
            echo(f"error: {f}", err=True)
        for d in summary.get("diverged", []):
            echo(f"diverged: {d}", err=True)
        sys.exit(1)


@cli.command("keys")
@click.argument("name")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=".",
              show_default=True, help="Folder to write NAME.key and NAME.key_secret into.")
@click.option("--force", is_flag=True, help="Replace existing files of that name.")
def keys_command(name, out_dir, force):
    """Generate a CURVE key pair: NAME.key (public: give it to the other side) and
    NAME.key_secret (secret, mode 0600: keep it where it is used).

    For a worker, NAME is the worker id the key lets in (w0, w1, ...): copy NAME.key into the
    server's server.auth.allowed_keys folder. For the server, the workers set
    worker.auth.server_key to its NAME.key. See README, Across machines."""
    from asgd.core.auth import AuthError, generate

    try:
        public, secret = generate(name, out_dir, force=force)
    except (AuthError, OSError) as e:
        raise click.ClickException(str(e))
    echo(f"public key: {public}")
    echo(f"secret key: {secret} (mode 0600)")


@cli.command("status")
@click.option("--server", "endpoint", required=True, metavar="ADDR",
              help="The server's endpoint (tcp://HOST:PORT or HOST:PORT); a sharded server's "
                   "endpoints comma-separated.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the raw stats as one JSON object (one a line with --watch).")
@click.option("--watch", "watch_s", type=click.FloatRange(min=0.1), is_flag=False,
              flag_value=2.0, default=None, metavar="[SECONDS]",
              help="Refresh every SECONDS (default 2) until Ctrl-C.")
@click.option("--count", type=click.IntRange(min=1), default=None, metavar="K",
              help="With --watch: stop after K snapshots.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.1), default=5.0,
              show_default=True, metavar="SECONDS",
              help="Seconds to wait for the server's answer.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Only for a CURVE server: the configuration whose worker.auth.secret_key_file "
                   "and worker.auth.server_key to use.")
@click.option("--id", "worker_id", default="status", show_default=True,
              help="The name to ask as (and, with --config, the {id} of the key file).")
def status_command(endpoint, as_json, watch_s, count, timeout_s, config_path, worker_id):
    """Show a running cluster's stats: version, updates/s, staleness, each worker's pushes and
    last contact, bytes in and out. Exit 1 when the server does not answer."""
    parts = [endpoint_or_exit(e.strip(), "--server") for e in endpoint.split(",") if e.strip()]
    curve = None
    if config_path is not None:
        from asgd.core import auth

        try:
            curve = auth.client_keys(config_or_exit(config_path, ()).worker, worker_id)
        except auth.AuthError as e:
            raise click.ClickException(str(e))
    from asgd.client import ServerError, ServerTimeout
    from asgd.launch.status import run_status

    try:
        code = run_status(parts[0] if len(parts) == 1 else parts, as_json, watch_s, count,
                          timeout_s, echo, worker_id, curve)
    except (ServerTimeout, ServerError, ValueError) as e:
        echo(f"Error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        code = 0
    sys.exit(code)


# Commands defined beside what they run, one registration each (their modules load click and
# the configuration only).
from asgd.experiments.cli import experiment  # noqa: E402
from asgd.tasks.commands import eval_cmd, export_cmd, predict_cmd  # noqa: E402

cli.add_command(eval_cmd)
cli.add_command(export_cmd)
cli.add_command(predict_cmd)
cli.add_command(experiment)


def main():
    cli()


if __name__ == "__main__":
    main()
