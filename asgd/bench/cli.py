"""``asgd bench``: measurements of the data path against references run in the same session.

    asgd bench transport --params 1M --transport shm --vs torch-rpc --repeats 5
    asgd bench step --config configs/default.yaml

Progress goes to stderr; the last line on stdout is one JSON object.
"""
from __future__ import annotations

import json
import statistics
import sys

import click

from asgd.core.encoding import ENCODINGS


def parse_count(text: str) -> int:
    """18000, 18K, 1M, 10m, 2.5M -> an int."""
    t = str(text).strip().lower().replace("_", "").replace(",", "")
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a count (e.g. 18000, 80K, 1M)") from None
    if value < 1 or value != int(value):
        raise click.BadParameter(f"{text!r} must be a positive whole number")
    return int(value)


@click.group()
def bench():
    """Benchmarks of the data path (each measures its reference in the same run)."""


@bench.command()
@click.option("--params", "params", required=True, help="Float32 parameters: 18000, 80K, 1M.")
@click.option("--transport", type=click.Choice(["tcp", "ipc", "shm"]), default="shm",
              show_default=True, help="shm: the tensors through shared memory, the header "
                                      "over ipc (what asgd launch uses on one host).")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Client processes pushing at once.")
@click.option("--shards", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Server shards (server.shards), each a range of the parameters.")
@click.option("--encoding", type=click.Choice(ENCODINGS),
              default="none", show_default=True, help="Gradient encoding (tcp, ipc).")
@click.option("--seconds", type=click.FloatRange(0.2, 600), default=3.0, show_default=True,
              help="Measured time per repeat and per system.")
@click.option("--repeats", type=click.IntRange(1, 50), default=1, show_default=True,
              help="Repeats, interleaved across the systems; medians are reported.")
@click.option("--vs", "vs", type=click.Choice(["torch-rpc"]), multiple=True,
              help="Also measure torch.distributed.rpc's parameter server.")
@click.option("--curve", is_flag=True, help="Also measure the server with ZeroMQ CURVE "
              "(server.auth.mode: curve, throwaway keys) right after the plain one in each repeat.")
@click.option("--spin-us", type=click.FloatRange(0, 100_000), default=None,
              help="Poll for a reply this long before sleeping, in asgd's clients and the raw "
                   "echo's (default: worker.spin_us's default, 200).")
def transport(params, transport, workers, shards, encoding, seconds, repeats, vs, curve,
              spin_us):
    """push_pull round trips/s through real server processes, against a raw ZeroMQ echo of
    the same bytes (and torch RPC with --vs torch-rpc)."""
    from asgd.bench.transport import run

    numel = parse_count(params)
    if transport == "shm" and encoding != "none":
        raise click.BadParameter("shared memory moves float32; encodings are for tcp and ipc",
                                 param_hint="--encoding")
    runs = []
    for k in range(repeats):
        r = run(numel, transport, workers, seconds, encoding, shards, vs=vs, curve=curve,
                spin_us=spin_us)
        runs.append(r)
        click.echo(f"repeat {k + 1}/{repeats}: asgd {r['round_trips_per_s']:.1f} rt/s, "
                   + (f"with CURVE {r['asgd_curve']['round_trips_per_s']:.1f}, "
                      if curve else "")
                   + f"raw {r['raw_echo']['round_trips_per_s']:.1f}"
                   + (f", torch rpc {r['torch_rpc']['round_trips_per_s']:.1f}"
                      if "torch_rpc" in r else ""), err=True)
    click.echo(json.dumps(summarize(runs)))


@bench.command()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              default=None, help="Run configuration (default: configs/default.yaml).")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option("--steps", type=click.IntRange(20, 10**6), default=600, show_default=True,
              help="Steps per worker in each of the two runs.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a configuration key (repeatable).")
def step(config_path, workers, steps, overrides):
    """Per worker step: time computing, communicating and waiting, and how much of the
    communication overlap hides."""
    from asgd.bench.step import run as run_step
    from asgd.config import ConfigError, default_config_path, load_config

    try:
        cfg = load_config(config_path or default_config_path(), list(overrides))
        cfg = cfg.replace(**{"run.workers": workers, "worker.max_steps": steps,
                             "run.max_updates": 0, "worker.batch_split": False})
    except ConfigError as e:
        raise click.ClickException(str(e))
    click.echo(json.dumps(run_step(cfg)))


def summarize(runs: list[dict]) -> dict:
    """One result from repeats: each system's median round trips/s and latency, and the
    ratios of the medians."""
    def med(system: str, key: str):
        vals = [r[system][key] for r in runs if system in r]
        return statistics.median(vals) if vals else None

    first = runs[0]
    out = {k: first[k] for k in ("benchmark", "params", "transport", "workers", "shards",
                                 "encoding", "seconds")}
    out["repeats"] = len(runs)
    for system in ("asgd", "asgd_curve", "raw_echo", "torch_rpc"):
        if system not in first:
            continue
        out[system] = {
            "round_trips_per_s": med(system, "round_trips_per_s"),
            "gb_per_s": med(system, "gb_per_s"),
            "latency_ms": {q: statistics.median(r[system]["latency_ms"][q] for r in runs)
                           for q in ("p50", "p90", "p99")},
            "peak_rss_mb": {k: max((r[system]["peak_rss_mb"][k] or 0) for r in runs)
                            for k in ("server", "clients")},
            "all_round_trips_per_s": [r[system]["round_trips_per_s"] for r in runs],
        }
    for system in ("asgd", "asgd_curve"):     # cores busy while measured, where /proc tells
        if system in first and "cpu_cores" in first[system]:
            out[system]["cpu_cores"] = {
                k: (statistics.median(v) if (v := [r[system]["cpu_cores"][k] for r in runs
                                                    if r[system]["cpu_cores"][k] is not None])
                    else None) for k in ("server", "clients")}
    if "wire_bytes_per_round_trip" in first["asgd"]:
        out["asgd"]["wire_bytes_per_round_trip"] = first["asgd"]["wire_bytes_per_round_trip"]
    a = out["asgd"]["round_trips_per_s"]
    out["round_trips_per_s"] = a
    out["gb_per_s"] = out["asgd"]["gb_per_s"]
    out["ratio_vs_raw"] = round(a / out["raw_echo"]["round_trips_per_s"], 3)
    if "torch_rpc" in out:
        out["ratio_vs_torch_rpc"] = round(a / out["torch_rpc"]["round_trips_per_s"], 3)
    if "asgd_curve" in out:   # the median of each repeat's ratio, and the ratio of the medians
        out["ratio_curve_vs_plain"] = round(statistics.median(
            r["ratio_curve_vs_plain"] for r in runs), 3)
        out["ratio_curve_vs_plain_of_medians"] = round(
            out["asgd_curve"]["round_trips_per_s"] / a, 3)
    return out


if __name__ == "__main__":   # pragma: no cover
    sys.exit(bench())
