"""How a worker ends when it cannot train on: its errors (each an exit code in worker.main),
and a fault switch for tests of what happens when a worker dies.

    ASGD_FAULT=exit:3 asgd launch ...          # every worker exits (code 5) after 3 steps
    ASGD_FAULT=exit:3:1 asgd launch ...        # ... rank 1 only
"""
from __future__ import annotations

import os


class WorkerError(Exception):
    """A condition the worker cannot train through (exit code 2)."""


class ServerGone(WorkerError):
    """The server did not come back within the reconnect budget (exit code 3)."""


class Diverged(WorkerError):
    """The training loss stayed NaN or Inf (exit code 4)."""


# A fault switch for tests of what happens when a worker dies: ASGD_FAULT="exit:STEP" makes
# every worker, and "exit:STEP:R1,R2" the listed ranks, exit at once with FAULT_EXIT_CODE after
# STEP training steps, as a crash would (no bye, no final record).
FAULT_ENV = "ASGD_FAULT"
FAULT_EXIT_CODE = 5


def fault_exit_step(rank: int, spec: str | None = None) -> int | None:
    """The step after which this rank is to crash, from $ASGD_FAULT; None for no fault."""
    spec = os.environ.get(FAULT_ENV, "") if spec is None else spec
    if not spec:
        return None
    parts = spec.split(":")
    if parts[0] != "exit" or len(parts) not in (2, 3):
        raise WorkerError(f"{FAULT_ENV}={spec!r}: expected exit:STEP or exit:STEP:RANKS")
    try:
        step = int(parts[1])
        ranks = [int(r) for r in parts[2].split(",")] if len(parts) == 3 else None
    except ValueError:
        raise WorkerError(f"{FAULT_ENV}={spec!r}: STEP and RANKS must be integers") from None
    if step < 1:
        raise WorkerError(f"{FAULT_ENV}={spec!r}: STEP must be >= 1")
    return step if ranks is None or rank in ranks else None
