"""Delay models: how long each virtual worker's steps take, in simulated seconds.

    model = parse_delay("pareto:1.5")                 # ValueError on a bad spec
    step = model.sampler(rank=3, workers=16, seed=0)  # step() -> the next step's duration
    describe_delays()                                 # the table below, for --help and errors

| spec | a step of worker i (0-based) of N takes |
| --- | --- |
| ``constant[:d]`` | d (default 1): every push N - 1 versions stale once all have pushed (constant staleness tau: tau + 1 workers) |
| ``uniform[:lo:hi]`` | uniform in [lo, hi] (default 0.5, 1.5) |
| ``exponential[:mean]`` | exponential with this mean (default 1) |
| ``pareto[:alpha[:xm]]`` | xm / U^(1/alpha): heavy-tailed (default alpha 1.5, xm (alpha-1)/alpha: mean 1) |
| ``inverse[:d]`` | (i + 1) * d: speeds proportional to 1/(i+1) (Ringmaster ASGD's setting) |
| ``trace:PATH`` | a real run's intervals between its worker i's pushes (PATH: a run directory or its metrics.jsonl), cycled; worker i plays the trace's i mod its count |

One straggler is any model with ``worker.straggler`` set (``--slow-factor``, ``--slow-ranks``,
``--delays`` of ``asgd experiment``): a slowed rank's step takes factor times as long plus
delay_s, as ``asgd.tasks.straggler`` stretches a real worker's. Every draw comes from the
worker's own generator, seeded by (seed, rank): the same seed gives the same durations, step
for step, whatever the policy.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DELAYS = {
    "constant": "d (default 1) every step",
    "uniform": "uniform in [lo, hi] (default 0.5:1.5)",
    "exponential": "exponential with mean m (default 1)",
    "pareto": "Pareto alpha[:xm] (default 1.5, mean 1): heavy-tailed",
    "inverse": "worker i takes (i+1)*d (speeds proportional to 1/(i+1))",
    "trace": "trace:RUN_DIR: a real run's intervals between each worker's pushes",
}


def describe_delays() -> str:
    return "; ".join(f"{k}: {v}" for k, v in DELAYS.items())


@dataclass(frozen=True)
class DelayModel:
    name: str
    args: tuple = ()
    trace: tuple = ()      # trace: each traced worker's step durations

    @property
    def spec(self) -> str:
        if self.name == "trace":
            return f"trace:{self.args[0]}"
        return ":".join([self.name, *(f"{a:g}" for a in self.args)])

    def sampler(self, rank: int, workers: int, seed: int) -> Callable[[], float]:
        """The step durations of worker ``rank`` of ``workers``: a function returning the
        next one each call."""
        rng = random.Random(seed * 1_000_003 + rank * 7919 + 104_729)
        a = self.args
        if self.name == "constant":
            return lambda: a[0]
        if self.name == "uniform":
            return lambda: rng.uniform(a[0], a[1])
        if self.name == "exponential":
            return lambda: rng.expovariate(1.0 / a[0])
        if self.name == "pareto":
            # 1 - random() is in (0, 1]: no division by zero
            return lambda: a[1] / (1.0 - rng.random()) ** (1.0 / a[0])
        if self.name == "inverse":
            return lambda: (rank + 1) * a[0]
        durations = self.trace[rank % len(self.trace)]
        it = iter(())

        def replay() -> float:
            nonlocal it
            for d in it:
                return d
            it = iter(durations)      # cycled: a run may need more steps than the trace holds
            return next(it)
        return replay


def _numbers(name: str, parts: list[str], defaults: tuple) -> tuple:
    if len(parts) > len(defaults):
        raise ValueError(f"delay model {name} takes at most {len(defaults)} number(s), "
                         f"got {':'.join(parts)}")
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"delay model {name}: not a number in {':'.join(parts)!r}") from None
    return tuple(vals) + defaults[len(vals):]


def parse_delay(spec: str) -> DelayModel:
    """A delay model from its spec (``name[:arg[:arg]]``); ValueError with the known ones."""
    name, _, rest = spec.strip().partition(":")
    if name not in DELAYS:
        raise ValueError(f"unknown delay model {name!r} (known: {describe_delays()})")
    if name == "trace":
        if not rest:
            raise ValueError("delay model trace needs a run: trace:RUN_DIR")
        return DelayModel("trace", (rest,), read_trace(Path(rest)))
    parts = [p for p in rest.split(":")] if rest else []
    if name == "constant":
        args = _numbers(name, parts, (1.0,))
    elif name == "uniform":
        args = _numbers(name, parts, (0.5, 1.5))
        if not 0 <= args[0] <= args[1]:
            raise ValueError(f"delay model uniform needs 0 <= lo <= hi, got {spec!r}")
    elif name == "exponential":
        args = _numbers(name, parts, (1.0,))
    elif name == "pareto":
        alpha = _numbers(name, parts[:1], (1.5,))[0]
        if alpha <= 0:
            raise ValueError(f"delay model pareto needs alpha > 0, got {spec!r}")
        args = _numbers(name, parts, (alpha, (alpha - 1) / alpha if alpha > 1 else 1.0))
    else:   # inverse
        args = _numbers(name, parts, (1.0,))
    if any(v <= 0 for v in args if name != "uniform") or (name == "uniform" and args[1] <= 0):
        raise ValueError(f"delay model {spec!r}: durations must be > 0")
    return DelayModel(name, args)


def read_trace(path: Path) -> tuple:
    """Each worker's step durations in a real run: the intervals between its pushes (the
    server's ``push`` records in metrics.jsonl), its first from the first push of the run,
    its last the one in flight at the end. Workers in the order of their names."""
    f = path / "metrics.jsonl" if path.is_dir() else path
    try:
        lines = f.read_text().splitlines()
    except OSError as e:
        raise ValueError(f"delay model trace: cannot read {f}: {e}") from None
    times: dict[str, list[float]] = {}
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and r.get("kind") == "push" and "worker" in r and "t" in r:
            times.setdefault(str(r["worker"]), []).append(float(r["t"]))
    if not times:
        raise ValueError(f"delay model trace: no push records in {f} (the server's, one a "
                         "push: a run of asgd launch)")
    start = min(min(ts) for ts in times.values())
    end = max(max(ts) for ts in times.values())
    out = []
    for w in sorted(times, key=lambda n: (len(n), n)):     # w2 before w10
        ts = sorted(times[w])
        steps = [b - a for a, b in zip([start, *ts[:-1]], ts)]
        # the step in flight when the run ended: at least until the end, guessed as long
        # again as the worker's last one (so replaying the run ends where it ended)
        steps.append(end - ts[-1] + steps[-1])
        out.append(tuple(max(d, 1e-6) for d in steps))
    return tuple(out)
