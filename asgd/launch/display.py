"""What a launch shows while it runs: the monitor's figures and their display.

    mon = Monitor(cfg, t0); mon.update_stats(client.stats()); mon.update_losses(metrics_path)
    display = Display(cfg); display.update(mon); display.close(mon)

On a terminal the display is a rich progress bar; elsewhere (a pipe, a log file) a plain line
every few seconds on stderr.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from asgd.config import Config


@dataclass
class Monitor:
    """What the display shows, from the server's stats and the workers' metrics records."""
    cfg: Config
    t0: float
    updates: int = 0
    samples_per_s: float = 0.0
    staleness_mean: float = 0.0
    loss: float | None = None
    accuracy: float | None = None
    _last: tuple = (0.0, 0)
    _first: tuple | None = None     # (time, pushes) when pushes were first seen
    _losses: dict = field(default_factory=dict)
    _metrics_pos: int = 0

    def update_stats(self, stats: dict) -> None:
        now = time.time()
        self.updates = stats["version"]
        self.staleness_mean = stats["staleness_mean"]
        pushes = sum(w["pushes"] for w in stats["workers"].values())
        if pushes and self._first is None:
            self._first = (now, pushes)
        t_prev, p_prev = self._last
        if t_prev and now > t_prev:
            rate = (pushes - p_prev) * self.cfg.worker.batch_size / (now - t_prev)
            self.samples_per_s = rate if not self.samples_per_s else \
                0.5 * self.samples_per_s + 0.5 * rate
        self._last = (now, pushes)

    def update_losses(self, metrics_path: Path) -> None:
        try:
            with open(metrics_path, "rb") as f:
                f.seek(self._metrics_pos)
                chunk = f.read()
        except OSError:
            return
        end = chunk.rfind(b"\n") + 1
        self._metrics_pos += end
        for line in chunk[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("kind") == "worker_step" and rec.get("loss") is not None:
                self._losses[rec["worker"]] = rec["loss"]
        if self._losses:
            self.loss = sum(self._losses.values()) / len(self._losses)

    def finish(self) -> None:
        """Show the whole run's average rate instead of the last moment's."""
        if self._first is not None and self._last[0] > self._first[0]:
            self.samples_per_s = ((self._last[1] - self._first[1]) * self.cfg.worker.batch_size
                                  / (self._last[0] - self._first[0]))

    def line(self) -> str:
        loss = f"{self.loss:.4f}" if self.loss is not None else "-"
        acc = f"  acc {self.accuracy:.4f}" if self.accuracy is not None else ""
        return (f"updates {self.updates:>7d}  samples/s {self.samples_per_s:>9.0f}  "
                f"staleness {self.staleness_mean:5.2f}  loss {loss}{acc}  "
                f"elapsed {time.time() - self.t0:6.1f}s")


class Display:
    """A rich progress bar on a terminal; a plain line every few seconds elsewhere."""

    def __init__(self, cfg: Config, quiet: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.quiet = quiet
        self.live = self.console.is_terminal and not quiet
        self.total = cfg.run.max_updates or None
        self._last_plain = 0.0
        if self.live:
            from rich.progress import BarColumn, Progress, TextColumn

            self.progress = Progress(TextColumn("[bold]asgd"), BarColumn(),
                                     TextColumn("{task.description}"), console=self.console,
                                     transient=False)
            self.task = self.progress.add_task("", total=self.total)
            self.progress.start()

    def update(self, mon: Monitor) -> None:
        if self.live:
            self.progress.update(self.task, completed=mon.updates, description=mon.line())
        elif not self.quiet and time.monotonic() - self._last_plain >= 5.0:
            self._last_plain = time.monotonic()
            print(mon.line(), file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if not self.quiet or "died" in text:
            self.console.print(text, soft_wrap=True, highlight=False)

    def close(self, mon: Monitor) -> None:
        mon.finish()
        if self.live:
            self.update(mon)
            self.progress.stop()
        elif not self.quiet:
            print(mon.line(), file=sys.stderr, flush=True)
