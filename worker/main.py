"""The worker process: ``asgd worker`` (or ``python -m worker``) hands over here.

    asgd worker --config configs/default.yaml --server tcp://server:5555 --rank 1

Exit codes: 0 when a budget ends the run, 2 for a configuration or model that cannot train,
3 when the server stayed away longer than worker.reconnect_timeout_s, 4 when the training
loss stayed NaN or Inf (the model diverged).
"""
from __future__ import annotations

import logging

from asgd.config import Config
from worker.faults import Diverged, ServerGone, WorkerError
from worker.train import run_worker


def run(cfg: Config, endpoint: str | None, rank: int, worker_id: str | None = None,
        run_dir=None, quiet: bool = False, server_file=None) -> int:
    """``endpoint``: the server's, or every shard's joined by commas. ``server_file``: read
    the server's endpoint from this file once it appears (a list of files: one per shard; the
    worker builds its model and data meanwhile), waiting at most
    worker.reconnect_timeout_s; when the server stops answering, the files are read again (a
    restarted server announces its new endpoint there)."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s worker %(levelname)s %(message)s")
    log = logging.getLogger("asgd.worker")
    if server_file is not None:
        from asgd.core.endpoint import read_address

        budget = cfg.worker.reconnect_timeout_s

        files = [server_file] if isinstance(server_file, str) else list(server_file)

        def endpoint(stop):
            # the worker re-reads these files when the server stops answering: a server that
            # asgd launch restarted listens on a new port (worker.connect.follow_server_files)
            stop.server_files = files
            found = []
            for f in files:
                address = read_address(f, budget, lambda: stop.set)
                if address is None:
                    raise ServerGone(f"no server address in {f} after {budget:g} s")
                found.append(address)
            return found[0] if len(found) == 1 else found
    try:
        res = run_worker(cfg, endpoint, rank, run_dir, worker_id)
    except ServerGone as e:
        log.error("%s", e)
        return 3
    except Diverged as e:
        log.error("%s", e)
        return 4
    except (WorkerError, ValueError) as e:
        log.error("%s", e)
        return 2
    log.info("rank %d done (%s): %d steps, %d samples, version %d, %.1f s",
             rank, res.reason, res.steps, res.samples, res.version, res.elapsed_s)
    return 0
