"""What a launch shows while it runs: the monitor's figures and their display.

    mon = Monitor(cfg, t0)
    mon.update_stats(client.stats()); mon.update_losses(metrics_path)
    display = Display(cfg); display.update(mon); display.message("..."); display.close(mon)

On a terminal the display is one live line that fits the terminal's width: fields are dropped,
least important first, rather than cut (updates and progress, accuracy, loss, samples/s,
staleness, elapsed). Elsewhere (a pipe, a log file) it prints a plain line every few seconds on
stderr. Output that can no longer be written (a closed pipe: ``| head``, or ``| tee`` killed by
Ctrl-C) is given up silently: the run itself goes on to its summary.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from asgd.commandline import silence
from asgd.config import Config
from asgd.metrics import MetricsTail

PLAIN_EVERY_S = 5.0


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
    note: str = ""                  # a short state word: "evaluating", "diverged", ...
    restarts: int = 0               # processes restarted so far (run.max_restarts)
    trained_s: float | None = None  # frozen when training ends
    _last: tuple = (0.0, 0)
    _first: tuple | None = None     # (time, pushes) when pushes were first seen
    _losses: dict = field(default_factory=dict)
    _metrics_pos: int = 0           # where reading metrics.jsonl starts
    _tail: MetricsTail | None = None
    _pushes_before: int = 0         # pushes counted by servers that have since restarted
    new_steps: list = field(default_factory=list)   # worker_step records since last asked

    def skip_metrics(self, pos: int) -> None:
        """Read metrics.jsonl from byte ``pos`` on (a resumed run's earlier records)."""
        self._metrics_pos = pos

    @property
    def samples_per_push(self) -> int:
        """A push carries worker.exchange.local_steps steps of worker.batch_size samples each."""
        return self.cfg.worker.batch_size * self.cfg.worker.exchange.local_steps

    @property
    def training(self) -> bool:
        return self.trained_s is None

    def update_stats(self, stats: dict) -> None:
        self.updates = stats["version"]
        self.staleness_mean = stats["staleness_mean"]
        if not self.training:
            return          # the throughput clock stopped with training
        now = time.time()
        raw = sum(w["pushes"] for w in stats["workers"].values())
        pushes = raw + self._pushes_before
        if pushes < self._last[1]:      # a restarted server counts from zero again
            self._pushes_before = self._last[1]
            pushes = raw + self._pushes_before
        if pushes and self._first is None:
            self._first = (now, pushes)
        t_prev, p_prev = self._last
        if t_prev and now > t_prev:
            rate = (pushes - p_prev) * self.samples_per_push / (now - t_prev)
            self.samples_per_s = rate if not self.samples_per_s else \
                0.5 * self.samples_per_s + 0.5 * rate
        self._last = (now, pushes)

    def update_losses(self, metrics_path: Path) -> None:
        """The workers' ``worker_step`` records added to metrics.jsonl since the last call:
        the mean of each worker's last loss, and ``new_steps`` for the divergence guard."""
        if self._tail is None:
            self._tail = MetricsTail(metrics_path, self._metrics_pos)
        for rec in self._tail.read():
            if rec.get("kind") == "worker_step":
                self._losses[rec["worker"]] = rec.get("loss")
                self.new_steps.append(rec)
        finite = [v for v in self._losses.values() if v is not None]
        if finite:
            self.loss = sum(finite) / len(finite)

    def finish_training(self) -> None:
        """Stop the clock: the rate becomes the whole run's average, elapsed stays put."""
        if not self.training:
            return
        self.trained_s = time.time() - self.t0
        if self._first is not None and self._last[0] > self._first[0]:
            self.samples_per_s = ((self._last[1] - self._first[1]) * self.samples_per_push
                                  / (self._last[0] - self._first[0]))

    @property
    def elapsed_s(self) -> float:
        return self.trained_s if self.trained_s is not None else time.time() - self.t0

    def fields(self) -> list[str]:
        """The display's fields, most important first."""
        total = self.cfg.run.max_updates
        # pushes in flight when the budget is reached are still applied (3001/3000): the
        # budget is what was asked for, and what the display shows at most
        upd = f"updates {min(self.updates, total)}/{total}" if total else \
            f"updates {self.updates}"
        out = [upd]
        if self.accuracy is not None:
            out.append(f"acc {self.accuracy:.3f}")
        out.append(f"loss {self.loss:.4f}" if self.loss is not None else "loss -")
        out.append(f"{self.samples_per_s:,.0f} samples/s")
        out.append(f"staleness {self.staleness_mean:.2f}")
        out.append(f"{self.elapsed_s:.1f}s")
        if self.restarts:
            out.insert(1, f"restarts {self.restarts}")
        if self.note:
            out.insert(1, self.note)
        return out

    def line(self, width: int | None = None) -> str:
        return fit(self.fields(), width)


def fit(fields: list[str], width: int | None, sep: str = "  ") -> str:
    """The fields joined, dropping the least important (last) ones until the line fits
    ``width`` characters; the first field is always kept whole."""
    out = list(fields)
    while width is not None and len(out) > 1 and len(sep.join(out)) > width:
        out.pop()
    return sep.join(out)


def progress_bar(done: int, total: int, width: int) -> str:
    if width < 3 or total <= 0:
        return ""
    inner = width - 2
    filled = min(inner, int(inner * min(done, total) / total))
    return "[" + "#" * filled + "-" * (inner - filled) + "]"


class Display:
    """A live line on a terminal; a plain line every few seconds elsewhere; nothing when
    quiet (except deaths and divergence, which are always said)."""

    def __init__(self, cfg: Config, quiet: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        self.quiet = quiet
        self.broken = False
        self.live = self.console.is_terminal and not quiet
        self.total = cfg.run.max_updates
        self._last_plain = 0.0
        self._live = None
        if self.live:
            from rich.live import Live

            self._live = Live("", console=self.console, auto_refresh=False, transient=False)
            self._guard(self._live.start)

    def _guard(self, fn, *args) -> None:
        """Run one output call; a closed stream ends all further output, silently."""
        if self.broken:
            return
        try:
            fn(*args)
        except (OSError, ValueError, SystemExit):   # rich exits on a broken pipe: not here
            self.broken = True
            silence(sys.stderr)

    def render(self, mon: Monitor):
        """The live line as rich Text: plain characters, never markup (``[###---]`` would
        be read as a markup tag and vanish)."""
        from rich.text import Text

        width = self.console.width
        text = mon.line(width)
        room = width - len(text) - 2
        if self.total and room >= 12:
            text = progress_bar(mon.updates, self.total, min(room, 32)) + "  " + text
        return Text(text)

    def update(self, mon: Monitor) -> None:
        if self.live:
            self._guard(lambda: (self._live.update(self.render(mon)), self._live.refresh()))
        elif not self.quiet and time.monotonic() - self._last_plain >= PLAIN_EVERY_S:
            self._last_plain = time.monotonic()
            self._guard(self._plain, mon.line())

    def _plain(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def message(self, text: str, always: bool = False) -> None:
        if not self.quiet or always:
            self._guard(lambda: self.console.print(text))

    def close(self, mon: Monitor) -> None:
        mon.finish_training()
        if self.live:
            self._guard(lambda: (self._live.update(self.render(mon)), self._live.refresh(),
                                 self._live.stop()))
        elif not self.quiet:
            self._guard(self._plain, mon.line())
