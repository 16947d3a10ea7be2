"""The worker process's command line.

    python -m worker --config configs/default.yaml --server tcp://127.0.0.1:5555 --rank 0
    asgd worker --config configs/default.yaml --server tcp://server:5555 --rank 1

Exit codes: 0 when a budget ends the run, 2 for a configuration or model that cannot train,
3 when the server stayed away longer than worker.reconnect_timeout_s.
"""
from __future__ import annotations

import logging
import sys

import click

from asgd.config import ConfigError, load_config
from worker.train import ServerGone, WorkerError, run_worker


@click.command("worker")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), required=True,
              help="YAML run configuration.")
@click.option("--server", "endpoint", required=True, help="The server's endpoint, e.g. "
              "tcp://127.0.0.1:5555.")
@click.option("--rank", type=int, default=0, show_default=True,
              help="This worker's rank in [0, run.workers): picks its data shard.")
@click.option("--id", "worker_id", default=None, help="Worker id on the wire (default w<rank>).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (repeatable).")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Append worker_step records to <run-dir>/metrics.jsonl.")
def main(config_path, endpoint, rank, worker_id, overrides, run_dir):
    """Run one worker against a parameter server."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as e:
        raise click.ClickException(str(e))
    log = logging.getLogger("asgd.worker")
    try:
        res = run_worker(cfg, endpoint, rank, run_dir, worker_id)
    except ServerGone as e:
        log.error("%s", e)
        sys.exit(3)
    except (WorkerError, ValueError) as e:
        log.error("%s", e)
        sys.exit(2)
    log.info("rank %d done (%s): %d steps, %d samples, version %d, %.1f s",
             rank, res.reason, res.steps, res.samples, res.version, res.elapsed_s)
