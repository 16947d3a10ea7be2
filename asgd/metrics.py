"""metrics.jsonl: one JSON object a line, appended by every process of a run.

    m = MetricsWriter("runs/x/metrics.jsonl")        # t0 from $ASGD_T0 (set by the launcher)
    m.write("worker_step", worker="w0", step=10, loss=0.41)

Each record is written with a single ``write`` on a file opened in append mode, so lines from
several processes interleave whole. ``t`` is seconds since the run started. A ``buffered``
writer (the server's, which records every push) keeps records and writes them together, in
one ``write``, on ``flush()``, when many have gathered, and on ``close()``.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path


def run_t0() -> float:
    try:
        return float(os.environ["ASGD_T0"])
    except (KeyError, ValueError):
        return time.time()


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN
    return v


class MetricsWriter:
    MAX_BUFFERED = 512          # records held before a buffered writer writes anyway

    def __init__(self, path: str | Path | None, t0: float | None = None,
                 buffered: bool = False):
        self.path = Path(path) if path else None
        self.t0 = run_t0() if t0 is None else t0
        self.buffered = buffered
        self._pending: list[dict] = []
        self._fd = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, kind: str, **fields) -> dict:
        record = {"t": round(time.time() - self.t0, 4), "kind": kind}
        record.update({k: _clean(v) for k, v in fields.items()})
        if self._fd is not None:
            if self.buffered:        # serialized when flushed, off the caller's path
                self._pending.append(record)
                if len(self._pending) >= self.MAX_BUFFERED:
                    self.flush()
            else:
                os.write(self._fd, (json.dumps(record) + "\n").encode())
        return record

    def flush(self) -> None:
        if self._pending and self._fd is not None:
            data = "".join(json.dumps(r) + "\n" for r in self._pending).encode()
            self._pending = []
            while data:   # a regular file takes it all at once; loop only on a short write
                data = data[os.write(self._fd, data):]

    def close(self):
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_metrics(path: str | Path) -> list[dict]:
    """All whole records of a metrics file (a torn last line is skipped)."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return out
