"""metrics.jsonl: one JSON object a line, appended by every process of a run.

    m = MetricsWriter("runs/x/metrics.jsonl")        # t0 from $ASGD_T0 (set by the launcher)
    m.write("worker_step", worker="w0", step=10, loss=0.41)
    tail = MetricsTail("runs/x/metrics.jsonl")       # tail.read(): the records added since

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


class MetricsTail:
    """Follows a metrics file from byte ``start`` on: each ``read()`` returns the whole
    records added since the last (a line still being written waits for the next read; a line
    that is not a JSON object is skipped). ``pos``: the byte read up to."""

    def __init__(self, path: str | Path, start: int = 0):
        self.path, self.pos = Path(path), start

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                chunk = f.read()
        except OSError:
            return []
        end = chunk.rfind(b"\n") + 1
        self.pos += end
        out = []
        for line in chunk[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out


def read_metrics(path: str | Path, start: int = 0) -> list[dict]:
    """All whole records of a metrics file from byte ``start`` on (a torn last line is
    skipped)."""
    return MetricsTail(path, start).read()
