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


def default_config_path(name: str = "default.yaml") -> Path | None:
    """configs/<name> of the current folder or the source checkout; None (the built-in
    defaults, which are the default run) when neither is there."""
    for path in (Path.cwd() / "configs" / name,
                 Path(__file__).resolve().parent.parent / "configs" / name):
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


# ----------------------------------------------------------------------------------------------
# experiments

EXPERIMENT_DEFAULTS = {
    "staleness": {"workers": "1,8", "policies": "none,scale,dc"},
    "straggler": {"workers": "4", "policies": "none,scale,sync", "slow_factor": 4.0},
    "throughput": {"workers": "1,2,4", "policies": "none"},
}


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{what} must be comma-separated integers, got {text!r}")
    if not vals or any(v < 1 for v in vals):
        raise click.BadParameter(f"{what} must be positive integers, got {text!r}")
    return vals


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{what} must be comma-separated numbers, got {text!r}")
    return vals


def _experiment_command(kind: str):
    d = EXPERIMENT_DEFAULTS[kind]

    @click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                  help="Base run configuration (default: configs/experiments.yaml).")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a base config key (repeatable).")
    @click.option("--workers", default=d["workers"], show_default=True,
                  help="Worker counts, comma-separated.")
    @click.option("--policies", default=d["policies"], show_default=True,
                  help="Server policies, comma-separated (a policy may be '+'-joined).")
    @click.option("--slow-factor", type=float, default=d.get("slow_factor", 1.0),
                  show_default=True, help="Slowdown of the slowed rank (straggler simulation).")
    @click.option("--slow-ranks", default="0", show_default=True,
                  help="Ranks that the slow factor and delay apply to.")
    @click.option("--delays", default="0", show_default=True,
                  help="Injected delay per step of the slowed ranks, seconds, comma-separated.")
    @click.option("--vs", "versus", type=click.Choice(["none", "ddp"]), default="none",
                  show_default=True, help="Also run torch DDP (gloo, loopback) on the same "
                  "shards and slowdown.")
    @click.option("--repeats", type=click.IntRange(1, 100), default=1, show_default=True,
                  help="Runs of each configuration (seeds seed..seed+R-1).")
    @click.option("--samples", type=click.IntRange(1), default=300_000, show_default=True,
                  help="Training samples a run (its budget).")
    @click.option("--target-accuracy", type=click.FloatRange(0, 1), default=0.9,
                  show_default=True, help="Accuracy for time-to-target.")
    @click.option("--max-seconds", type=click.FloatRange(1), default=240.0, show_default=True,
                  help="Wall-time cap of each run.")
    @click.option("--out", type=click.Path(file_okay=False), default=None,
                  help=f"Output folder (default: experiments/{kind}).")
    @click.option("--quiet", is_flag=True, help="No progress display.")
    def command(config_path, overrides, workers, policies, slow_factor, slow_ranks, delays,
                versus, repeats, samples, target_accuracy, max_seconds, out, quiet):
        from asgd.experiments import Experiment, RunSpec, run_experiment
        from asgd.policies import parse_policy

        try:
            base = load_config(config_path or default_config_path("experiments.yaml"),
                               overrides)
        except ConfigError as e:
            raise click.ClickException(str(e))
        counts = _ints(workers, "--workers")
        pols = [p.strip() for p in policies.split(",") if p.strip()]
        for p in pols:
            try:
                parse_policy(p)
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint="--policies")
        if slow_factor < 1:
            raise click.BadParameter("must be >= 1", param_hint="--slow-factor")
        delay_list = _floats(delays, "--delays")
        if any(x < 0 for x in delay_list):
            raise click.BadParameter("delays must be >= 0", param_hint="--delays")
        try:
            ranks = [int(r) for r in slow_ranks.split(",") if r.strip()]
        except ValueError:
            raise click.BadParameter(f"must be comma-separated ranks, got {slow_ranks!r}",
                                     param_hint="--slow-ranks")
        if not ranks or min(ranks) < 0:
            raise click.BadParameter("must be ranks >= 0", param_hint="--slow-ranks")
        specs = []
        for r in range(repeats):
            if kind == "throughput":
                specs.append(RunSpec("single", 1, 1.0, 0.0, r))
            for w in counts:
                for delay in delay_list:
                    factor = slow_factor
                    run_pols = pols if w > 1 or kind != "staleness" else pols[:1]
                    for p in run_pols:
                        specs.append(RunSpec(p, w, factor, delay, r))
                    if versus == "ddp" and w > 1:
                        specs.append(RunSpec("ddp", w, factor, delay, r))
        exp = Experiment(kind, base, specs, Path(out or f"experiments/{kind}"), samples,
                         target_accuracy, max_seconds, slow_ranks=ranks)
        records = run_experiment(exp, quiet=quiet)
        click.echo((exp.out / "summary.md").read_text())
        click.echo(f"results: {exp.out}/results.json, results.csv, *.png", err=True)
        if any(r["status"] != "ok" for r in records):
            click.echo(f"{sum(r['status'] != 'ok' for r in records)} run(s) failed", err=True)

    command.__doc__ = {
        "staleness": "Policies against worker counts or injected delays: accuracy against "
                     "time and updates, staleness distributions.",
        "straggler": "N workers with one slowed by a factor: async policies against sync "
                     "(and DDP with --vs ddp): samples/s and time to a target accuracy.",
        "throughput": "Samples/s, updates/s and time to target against the number of "
                      "workers, with one plain process as the reference in the same run.",
    }[kind]
    return click.command(kind)(command)


@cli.group()
def experiment():
    """Run the staleness, straggler and throughput experiments."""


for _kind in EXPERIMENT_DEFAULTS:
    experiment.add_command(_experiment_command(_kind))


@experiment.command("report")
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.option("--target-accuracy", type=click.FloatRange(0, 1), default=None,
              help="Recompute time to target for another accuracy (default: as run).")
def experiment_report(out, target_accuracy):
    """Redraw an experiment's summary.md and plots from its results.json."""
    from asgd.experiments import rereport

    try:
        text = rereport(Path(out), target_accuracy)
    except (OSError, ValueError, KeyError) as e:
        raise click.ClickException(f"cannot report {out}: {e}")
    click.echo(text)


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
