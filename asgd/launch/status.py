"""``asgd status``: a running cluster's ``stats``, as a table, JSON, or a live view.

    asgd status --server tcp://10.0.0.5:5555              # one table
    asgd status --server tcp://a:5555,tcp://b:5556 --json  # a sharded server, merged, as JSON
    asgd status --server 127.0.0.1:5555 --watch 1          # refreshed every second, Ctrl-C ends

    stats = fetch("tcp://127.0.0.1:5555", timeout_s=5)
    print(render(stats))                                   # the table, as text

The table: version, updates/s (between two samples when watching, else the updates applied
over the server's uptime), applied and dropped, staleness mean and max, bytes in and out, then a
row per worker (rank, pushes, applied, dropped, repeats, last seen, alive, its staleness mean
and max) and, for a sharded server, a row per shard. ``stats`` asks nothing of the training:
the server answers it between pushes and keeps no record of the asker.
"""
from __future__ import annotations

import io
import json
import time

from rich import box
from rich.console import Console
from rich.table import Table


def fetch(endpoints, timeout_s: float = 5.0, worker: str = "status", curve=None) -> dict:
    """The server's (or the shards' merged) stats; ``ServerTimeout`` when it does not answer
    within ``timeout_s``."""
    from asgd.client import connect_client

    with connect_client(endpoints, worker, timeout_s=timeout_s, curve=curve) as client:
        return client.stats()


# ----------------------------------------------------------------------------------------------
# figures

def histogram_mean_max(hist: dict | None) -> tuple[float | None, int | None]:
    """Mean and max of a staleness histogram (``{"0": n0, "1": n1, ...}``); Nones if empty."""
    pairs = [(int(k), int(n)) for k, n in (hist or {}).items() if int(n) > 0]
    total = sum(n for _, n in pairs)
    if not total:
        return None, None
    return sum(k * n for k, n in pairs) / total, max(k for k, _ in pairs)


def updates_per_s(stats: dict, previous: tuple[float, dict] | None = None,
                  now: float | None = None) -> float | None:
    """Between ``previous`` (time, stats) and now when given (the version's change; a
    restarted server, whose version went back, gives None), else over the uptime."""
    if previous is not None:
        t_prev, s_prev = previous
        dt = (time.monotonic() if now is None else now) - t_prev
        dv = stats.get("version", 0) - s_prev.get("version", 0)
        return dv / dt if dt > 0 and dv >= 0 else None
    uptime = stats.get("uptime_s") or 0.0
    return stats.get("updates_applied", 0) / uptime if uptime > 0 else None


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _num(v, fmt: str = "{}") -> str:
    return "-" if v is None else fmt.format(v)


# ----------------------------------------------------------------------------------------------
# the table

def tables(stats: dict, rate: float | None, endpoint: str = "") -> list[Table]:
    """The overview, the workers and (sharded) the shards, as rich tables."""
    head = Table(box=box.SIMPLE, show_header=False, title=f"asgd server {endpoint}".strip(),
                 title_justify="left")
    head.add_column("key", style="bold")
    head.add_column("value")
    rows = [
        ("version", str(stats.get("version", "-"))),
        ("updates/s", _num(rate, "{:.1f}")),
        ("applied / dropped", f"{stats.get('updates_applied', 0)} / "
                              f"{stats.get('updates_dropped', 0)}"),
        ("staleness mean / max", f"{stats.get('staleness_mean', 0.0):.2f} / "
                                 f"{stats.get('staleness_max', 0)}"),
        ("workers alive / known", f"{_num(stats.get('workers_alive'))} / "
                                  f"{_num(stats.get('workers_known'))}"),
        ("bytes in / out", f"{human_bytes(stats.get('bytes_in'))} / "
                           f"{human_bytes(stats.get('bytes_out'))}"),
        ("uptime", _num(stats.get("uptime_s"), "{:.1f} s")),
    ]
    if stats.get("waiting"):
        rows.append(("waiting", json.dumps(stats["waiting"])))
    for k, v in rows:
        head.add_row(k, v)
    out = [head]

    workers = Table(box=box.SIMPLE, title="workers", title_justify="left")
    for col in ("worker", "rank", "pushes", "applied", "dropped", "repeats", "last seen",
                "alive", "staleness mean/max"):
        workers.add_column(col, justify="left" if col in ("worker", "alive") else "right")
    by_rank = sorted((stats.get("workers") or {}).items(),
                     key=lambda kv: (kv[1].get("rank") is None, kv[1].get("rank") or 0, kv[0]))
    for name, w in by_rank:
        mean, mx = histogram_mean_max(w.get("staleness_histogram"))
        workers.add_row(name, _num(w.get("rank")), str(w.get("pushes", 0)),
                        str(w.get("applied", 0)), str(w.get("dropped", 0)),
                        str(w.get("repeats", 0)), _num(w.get("last_seen_ago_s"), "{:.1f} s ago"),
                        "yes" if w.get("alive") else "no",
                        f"{_num(mean, '{:.2f}')}/{_num(mx)}")
    if not by_rank:
        workers.caption, workers.caption_justify = "no worker has said hello", "left"
    out.append(workers)

    shards = stats.get("shards")
    if shards:
        t = Table(box=box.SIMPLE, title="shards", title_justify="left")
        for col in ("shard", "range", "version", "applied", "dropped", "staleness mean",
                    "bytes in", "bytes out"):
            t.add_column(col, justify="right")
        for i, s in enumerate(shards):
            sh = s.get("shard") or {}
            t.add_row(_num(sh.get("index", i)), f"[{sh.get('start', '?')}, {sh.get('stop', '?')})",
                      str(s.get("version", "-")), str(s.get("updates_applied", 0)),
                      str(s.get("updates_dropped", 0)), f"{s.get('staleness_mean', 0.0):.2f}",
                      human_bytes(s.get("bytes_in")), human_bytes(s.get("bytes_out")))
        out.append(t)
    return out


def render(stats: dict, rate: float | None = None, endpoint: str = "",
           width: int = 100) -> str:
    """The tables as plain text (no colour), ``width`` columns wide at most."""
    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None, highlight=False)
    for t in tables(stats, updates_per_s(stats) if rate is None else rate, endpoint):
        console.print(t)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"


# ----------------------------------------------------------------------------------------------
# the command

def run_status(endpoints, as_json: bool, watch_s: float | None, count: int | None,
               timeout_s: float, out, worker: str = "status", curve=None) -> int:
    """Print the stats once, or every ``watch_s`` seconds (``count`` times at most); the exit
    code. ``out(text)`` prints; ``ServerTimeout`` and ``ServerError`` reach the caller."""
    from asgd.client import connect_client

    endpoint = endpoints if isinstance(endpoints, str) else ",".join(endpoints)
    console = Console(highlight=False)
    live = watch_s is not None and console.is_terminal and not as_json
    previous = None
    shown = 0
    with connect_client(endpoints, worker, timeout_s=timeout_s, curve=curve) as client:
        while True:
            stats = client.stats()
            now = time.monotonic()
            if as_json:
                out(json.dumps(stats))
            else:
                rate = updates_per_s(stats, previous, now)
                if rate is None:
                    rate = updates_per_s(stats)
                if live:
                    console.clear()
                    for t in tables(stats, rate, endpoint):
                        console.print(t)
                    console.print(f"every {watch_s:g} s, Ctrl-C to stop", style="dim")
                else:
                    stamp = time.strftime("%H:%M:%S") if watch_s is not None else ""
                    out((f"-- {stamp}\n" if stamp else "") +
                        render(stats, rate, endpoint, width=max(console.width, 100)).rstrip())
            previous = (now, stats)
            shown += 1
            if watch_s is None or (count is not None and shown >= count):
                return 0
            time.sleep(max(watch_s, 0.05))
