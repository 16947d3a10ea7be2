"""``asgd experiment ...``: the staleness, straggler and throughput experiments' commands.

    asgd experiment straggler --vs ddp
    asgd experiment report experiments/straggler --target-accuracy 0.92

Imported by ``asgd.cli`` when it loads: nothing here imports torch until a command runs.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from asgd.config import ConfigError, load_config, default_config_path

EXPERIMENT_DEFAULTS = {
    "staleness": {"workers": "1,8", "policies": "none,scale,dc"},
    "straggler": {"workers": "4", "policies": "none,scale,sync", "slow_factor": 4.0},
    "throughput": {"workers": "1,2,4", "policies": "none"},
    "local-steps": {"workers": "2", "policies": "none", "local_steps": "1,4,16"},
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


def _delay_models(text: str) -> list[str]:
    """The delay models of --delay-model, checked (a trace's run is read here)."""
    try:
        from simulator.delays import parse_delay
    except ImportError as e:     # an install without the simulator package
        raise click.ClickException(f"--simulate needs the simulator package beside asgd: {e}")

    specs = [m.strip() for m in text.split(",") if m.strip()]
    if not specs:
        raise click.BadParameter("name at least one delay model", param_hint="--delay-model")
    for m in specs:
        try:
            parse_delay(m)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--delay-model")
    return specs


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
    @click.option("--local-steps", "local_steps", default=d.get("local_steps", "1"),
                  show_default=True, help="Local steps H per push (worker.exchange.local_steps), "
                  "comma-separated; every H gets the same training samples.")
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
    @click.option("--simulate", is_flag=True, help="Simulate every run in this process "
                  "(the simulator: virtual workers, the server's update code, simulated "
                  "time; bitwise reproducible) instead of starting a cluster.")
    @click.option("--delay-model", "delay_models", default="constant", show_default=True,
                  help="With --simulate: how long each virtual worker's steps take, "
                  "comma-separated to compare several: constant[:d], uniform[:lo:hi], "
                  "exponential[:mean], pareto[:alpha[:xm]], inverse[:d] (speeds 1/(i+1)), "
                  "trace:RUN_DIR (a real run's).")
    def command(config_path, overrides, workers, policies, slow_factor, slow_ranks, delays,
                versus, local_steps, repeats, samples, target_accuracy, max_seconds, out,
                quiet, simulate, delay_models):
        from asgd.experiments.runner import Experiment, RunSpec, run_experiment
        from asgd.core.policies import parse_policy

        try:
            base = load_config(config_path or default_config_path("experiments.yaml"),
                               overrides)
        except ConfigError as e:
            raise click.ClickException(str(e))
        counts = _ints(workers, "--workers")
        hs = _ints(local_steps, "--local-steps")
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
                        for h in hs:
                            specs.append(RunSpec(p, w, factor, delay, r, local_steps=h))
                    if versus == "ddp" and w > 1:
                        specs.append(RunSpec("ddp", w, factor, delay, r))
        run = None
        if simulate:
            models = _delay_models(delay_models)
            specs = [replace(s, delay_model=m) for s in specs for m in models]
            # the simulator is a side of its own (it runs the server's update code): this
            # command hands over to it when it runs, as `asgd server` hands over to server
            from simulator.runs import run_one as run
        exp = Experiment(kind, base, specs, Path(out or f"experiments/{kind}"), samples,
                         target_accuracy, max_seconds, slow_ranks=ranks)
        records = run_experiment(exp, quiet=quiet, run=run)
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
        "local-steps": "Asynchronous Local SGD (DiLoCo): H local steps per push against H=1 "
                       "at the same samples: accuracy, bytes moved, time to target.",
    }[kind]
    return click.command(kind)(command)


@click.group()
def experiment():
    """Run an experiment, or redraw one's report."""


for _kind in EXPERIMENT_DEFAULTS:
    experiment.add_command(_experiment_command(_kind))


@experiment.command("reproduce")
@click.argument("name", type=click.Choice(["dai", "mishchenko", "liu", "ringmaster"]))
@click.option("--budget", type=click.Choice(["full", "tiny"]), default="full", show_default=True,
              help="full: the documented runs; tiny: a few updates on a synthetic data set "
              "(a check that the runs run, not a result).")
@click.option("--repeats", type=click.IntRange(1, 100), default=None,
              help="Seeds of each configuration (default: the budget's).")
@click.option("--target-accuracy", type=click.FloatRange(0, 1), default=None,
              help="Accuracy of samples and time to target (default: the reproduction's).")
@click.option("--policy", default=None, help="mishchenko, liu: another server policy to "
              "compare in place of adaptive / delayed_nesterov+dylu.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: experiments/reproduce-NAME).")
@click.option("--quiet", is_flag=True, help="No progress display.")
def experiment_reproduce(name, budget, repeats, target_accuracy, policy, out, quiet):
    """A paper's experiment on the simulator (asgd.experiments.literature): dai (staleness
    against optimizers and depth), mishchenko (delay-adaptive ASGD under heavy-tailed delays),
    liu (asynchronous Local SGD), ringmaster (dropping pushes staler than R)."""
    from asgd.experiments.literature import reproduction, run_reproduction

    if policy:
        from asgd.core.policies import parse_policy

        try:
            parse_policy(policy)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--policy")
    exp = reproduction(name, Path(out or f"experiments/reproduce-{name}"), budget, repeats,
                       target_accuracy, policy)
    records = run_reproduction(exp, quiet=quiet)
    click.echo((exp.out / "literature.md").read_text())
    click.echo(f"results: {exp.out}/results.json, summary.md, literature.md, *.png", err=True)
    if any(r["status"] != "ok" for r in records):
        click.echo(f"{sum(r['status'] != 'ok' for r in records)} run(s) failed", err=True)


@experiment.command("report")
@click.argument("out", type=click.Path(exists=True, file_okay=False))
@click.option("--target-accuracy", type=click.FloatRange(0, 1), default=None,
              help="Recompute time to target for another accuracy (default: as run).")
def experiment_report(out, target_accuracy):
    """Redraw an experiment's summary.md and plots from its results.json."""
    from asgd.experiments.report import rereport

    try:
        text = rereport(Path(out), target_accuracy)
    except (OSError, ValueError, KeyError) as e:
        raise click.ClickException(f"cannot report {out}: {e}")
    click.echo(text)


def _name_the_commands(group: click.Group, report: click.Command) -> None:
    """The group's help names every command it has (``asgd --help`` shows the short form), so
    a new experiment cannot be left out of it."""
    names = ", ".join(n for n in group.commands if n not in (report.name, "reproduce"))
    # one line of asgd --help: its commands, nothing else fits
    group.short_help = f"{names}, reproduce, {report.name}"
    group.help = (f"Run an experiment ({names}), reproduce a paper's (reproduce), or redraw "
                  f"one's {report.name}.")


_name_the_commands(experiment, experiment_report)
