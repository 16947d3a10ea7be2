"""The literature's results, reproduced on the simulator: each paper's experiment as runs of
``asgd experiment``.

    asgd experiment reproduce dai                  # samples to a target against staleness s
    asgd experiment reproduce ringmaster           # time to accuracy against the threshold R
    asgd experiment reproduce mishchenko --budget tiny --out /tmp/m   # a smoke run

    exp = reproduction("dai", Path("experiments/reproduce-dai"))   # its Experiment, RunSpecs
    records = run_reproduction(exp)            # results.json, summary.md, literature.md, plots

| name | paper | what is varied | measure |
| --- | --- | --- | --- |
| ``dai`` | Dai et al., ICLR 2019 | staleness s in {0,1,2,4,8,16} x SGD, momentum, Adam, RMSProp x two MLP depths | samples to a target accuracy, over s = 0's |
| ``mishchenko`` | Mishchenko et al., NeurIPS 2022 | plain ASGD, delay-adaptive ASGD, minibatch SGD (``sync``) at 16, 64, 256 workers, Pareto delays | simulated time to a target |
| ``liu`` | Liu et al., 2024 | synchronous Local SGD, asynchronous with naive outer Nesterov, Delayed Nesterov, + DyLU; half the workers 3x slower | accuracy at the same samples, and against time |
| ``ringmaster`` | Maranjyan et al., ICML 2025 | ``server.max_staleness`` R at 64 workers, speeds 1/(i+1), two depths, every run the same simulated time | simulated time to a target |

Every run is simulated (``simulator``: virtual workers in simulated time, bitwise
reproducible), so a result does not depend on the machine's load. The model is an MLP and the
data MNIST-1D generated with 42,000 samples (39,900 training, 2,100 test; offline, by the
mnist1d package's ``make_dataset``): the 4,000 training samples of the default data set make
a shard smaller than a batch at 256 workers. ``--budget tiny`` runs each reproduction's specs
on a synthetic data set for a few updates: a check that they run, not a result.

Each record has, besides the experiments' usual fields, ``samples_to_target`` (training
samples applied when the target was first reached, from the evaluation curve),
``updates_dropped``, the run's ``lr`` (and ``outer_lr`` with local steps). The tables against each paper's claim are
``asgd.experiments.literature_report``'s.
"""
from __future__ import annotations

import heapq
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

from asgd.config import Config
from asgd.experiments.spec import Experiment, RunSpec

# MNIST-1D with ten times the default's samples: shards of 156 at 256 workers
DATA = {"data.name": "mnist1d", "data.args": {"num_samples": 42000, "train_split": 0.95}}
TINY_DATA = {"data.name": "synthetic", "data.args": {"n_train": 4096, "n_test": 256,
                                                     "shape": [40]}}
BASE = {"model.name": "mlp", "model.args": {"hidden": [128]}, "worker.batch_size": 32,
        "worker.threads": 1, "schedule.kind": "constant", "schedule.warmup": 0,
        "server.policy": "none", "server.max_staleness": None, "run.seed": 0,
        "run.max_seconds": 1e9, "worker.batch_split": False}
EVALS = 60     # evaluations a run: samples to a target to within 1/60 of the budget

# Dai et al.: the optimizers (name, momentum, lr: each SGD variant at its usual rate) and two
# depths of the same width
DAI_OPTIMIZERS = {"sgd": ("sgd", 0.0, 0.1), "momentum": ("sgd", 0.9, 0.01),
                  "adam": ("adam", 0.0, 0.001), "rmsprop": ("rmsprop", 0.0, 0.001)}
DAI_DEPTHS = {"mlp1": [128], "mlp4": [128, 128, 128, 128]}
DAI_STALENESS = (0, 1, 2, 4, 8, 16)
RINGMASTER_R = (1, 2, 4, 8, 16, 32, 64, 128, None)      # None: no bound (plain ASGD)
RINGMASTER_HORIZON = 2000.0   # simulated time of every run: the fastest worker's 2,000 steps
MISHCHENKO_WORKERS = (16, 64, 256)


@dataclass(frozen=True)
class Budget:
    updates: int          # server updates of an asynchronous run (H=1): its samples' budget
    repeats: int          # seeds 0..repeats-1
    tiny: bool            # a smoke run: a synthetic data set, tiny models, fewer runs


BUDGETS = {"full": None, "tiny": Budget(12, 1, True)}     # full: each reproduction's own


def _spec(policy: str, workers: int, delay: str, label: str, repeat: int = 0,
          local_steps: int = 1, **keys) -> RunSpec:
    return RunSpec(policy, workers, repeat=repeat, local_steps=local_steps, delay_model=delay,
                   label=label, overrides=tuple(sorted(keys.items(), key=lambda kv: kv[0])))


def _opt(name: str, momentum: float, lr: float, nesterov: bool = False) -> dict:
    return {"optimizer.name": name, "optimizer.momentum": momentum, "optimizer.lr": lr,
            "optimizer.nesterov": nesterov}


# ----------------------------------------------------------------------------------------------
# the four reproductions: their runs

def dai_specs(b: Budget) -> list[RunSpec]:
    """Constant staleness s: s + 1 workers of equal speed, each push exactly s stale once
    all have pushed (``constant``); every optimizer at every s, at two depths."""
    depths = DAI_DEPTHS if not b.tiny else {"mlp1": [8], "mlp4": [8, 8]}
    stale = DAI_STALENESS if not b.tiny else (0, 2)
    specs = []
    for r in range(b.repeats):
        for depth, hidden in depths.items():
            for opt, (name, momentum, lr) in DAI_OPTIMIZERS.items():
                for s in stale:
                    specs.append(_spec("none", s + 1, "constant", f"{depth}-{opt}-s{s}", r,
                                       **{"model.args": {"hidden": hidden}},
                                       **_opt(name, momentum, lr)))
    return specs


def updates_within(horizon: float, workers: int, bound: int | None, step=lambda r: r + 1.0
                   ) -> int:
    """The updates a run of ``workers`` whose worker r's steps take ``step(r)`` (``inverse``:
    r + 1) applies by simulated time ``horizon`` when pushes staler than ``bound`` are
    dropped: the simulator's order of events without its gradients (whether a push is
    dropped depends only on the order of pushes). Ties go to the lower rank, as there."""
    heap = [(step(r), r) for r in range(workers)]
    heapq.heapify(heap)
    base, version = [0] * workers, 0
    while heap[0][0] <= horizon:
        t, r = heapq.heappop(heap)
        if bound is None or version - base[r] <= bound:
            version += 1
        base[r] = version                  # applied or dropped: the reply's weights
        heapq.heappush(heap, (t + step(r), r))
    return version


def ringmaster_specs(b: Budget) -> list[RunSpec]:
    """64 workers, worker i's step (i + 1) times the fastest's (``inverse``); pushes staler
    than R dropped (the worker computes afresh from the reply's weights), plain SGD; at both
    of Dai's depths (staleness costs the deeper model more). Every run lasts the same
    simulated time (RINGMASTER_HORIZON, so the same gradients are computed whatever R drops):
    its updates are those R lets through by then (``updates_within``)."""
    n = 64 if not b.tiny else 8
    bounds = RINGMASTER_R if not b.tiny else (2, None)
    depths = DAI_DEPTHS if not b.tiny else {"mlp1": [8]}
    horizon = RINGMASTER_HORIZON if not b.tiny else 10.0
    return [_spec("none", n, "inverse", f"{depth}-R{'inf' if R is None else R}", r,
                  **{"server.max_staleness": R, "model.args": {"hidden": hidden},
                     "run.max_updates": updates_within(horizon, n, R)},
                  **_opt("sgd", 0.0, 0.1))
            for r in range(b.repeats) for depth, hidden in depths.items() for R in bounds]


def mishchenko_specs(b: Budget, adaptive: str = "adaptive") -> list[RunSpec]:
    """Heavy-tailed delays (``pareto:1.5``, mean 1) at each worker count n. Asynchronous SGD
    at the one-worker rate 0.1 as it is (``none``), at the rate of Mishchenko et al.'s
    analysis, proportional to 1/n (0.1 x 16 / n: the same at 16 workers), plain (``none``)
    and delay-adaptive (``adaptive``: the full rate up to staleness n, then the rate over
    the staleness); and minibatch SGD (``sync``: a round waits for every worker and applies
    the mean of n gradients) at 0.1."""
    counts = MISHCHENKO_WORKERS if not b.tiny else (4,)
    specs = []
    for r in range(b.repeats):
        for n in counts:
            scaled = round(0.1 * min(1.0, 16 / n), 6)
            runs = [("none", "none", 0.1), ("none", f"none-lr{scaled:g}", scaled),
                    (adaptive, f"{adaptive.replace('+', '_')}-lr{scaled:g}", scaled),
                    ("sync", "sync", 0.1)]
            if scaled == 0.1:       # at 16 workers the 1/n rate is the one-worker rate
                runs = [x for x in runs if x[1] != f"none-lr{scaled:g}"]
            specs += [_spec(p, n, "pareto:1.5", label, r, **_opt("sgd", 0.0, lr))
                      for p, label, lr in runs]
    return specs


def liu_specs(b: Budget, delayed: str = "delayed_nesterov+dylu") -> list[RunSpec]:
    """Local SGD, H local steps of Adam a push, outer Nesterov (momentum 0.9), 16 workers of
    unequal speed: ranks 0-7 three times slower than ranks 8-15, each step's time
    uniform in [0.8, 1.2] besides. Synchronous Local SGD (``sync``, DiLoCo's outer rate
    0.7) against asynchronous with naive outer Nesterov (at 0.7, and at 0.7 / 16, the rate
    of one push under Delayed Nesterov), Delayed Nesterov alone and with DyLU
    (``delayed``)."""
    n, h = (16, 8) if not b.tiny else (4, 2)
    outer = {"server.outer.optimizer": "sgd", "server.outer.momentum": 0.9,
             "server.outer.nesterov": True, "worker.straggler.factor": 3.0,
             "worker.straggler.ranks": list(range(n // 2))}
    inner = _opt("adam", 0.0, 0.001)
    runs = [("sync", "sync", 0.7), ("naive", "none", 0.7),
            (f"naive-lr{0.7 / n:.3g}", "none", 0.7 / n), ("delayed_nesterov",
                                                          "delayed_nesterov", 0.7)]
    if delayed != "delayed_nesterov":
        runs.append((delayed.replace("+", "_"), delayed, 0.7))
    return [_spec(p, n, "uniform:0.8:1.2", label, r, local_steps=h,
                  **{"server.outer.lr": lr}, **outer, **inner)
            for r in range(b.repeats) for label, p, lr in runs]


REPRODUCTIONS = {
    # name: (its runs, target accuracy, server updates (H=1) and seeds of the full budget, what
    # the paper's experiment is)
    "dai": (dai_specs, 0.5, 4000, 2, "Dai et al. 2019: samples to a target against injected "
            "staleness"),
    "mishchenko": (mishchenko_specs, 0.55, 12000, 1, "Mishchenko et al. 2022: delay-adaptive "
                   "ASGD against plain ASGD and minibatch SGD under Pareto delays"),
    "liu": (liu_specs, 0.55, 12000, 1, "Liu et al. 2024: asynchronous Local SGD, naive outer "
            "Nesterov against synchronous"),
    "ringmaster": (ringmaster_specs, 0.55, 3000, 1, "Maranjyan et al. 2025 (Ringmaster ASGD): "
                   "time to accuracy against the drop threshold R, speeds 1/(i+1)"),
}


def reproduction(name: str, out: Path, budget: str = "full", repeats: int | None = None,
                 target: float | None = None, policy: str | None = None) -> Experiment:
    """The Experiment of reproduction ``name``: its base config, every RunSpec and its
    target. ``policy``: another policy for Mishchenko's and Liu's reproductions to compare
    in place of ``adaptive`` / ``delayed_nesterov+dylu``."""
    if name not in REPRODUCTIONS:
        raise ValueError(f"unknown reproduction {name!r} (known: {', '.join(REPRODUCTIONS)})")
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r} (known: {', '.join(BUDGETS)})")
    make, default_target, updates, seeds, _ = REPRODUCTIONS[name]
    b = BUDGETS[budget] if budget == "tiny" else Budget(updates, seeds, False)
    if repeats:
        b = replace(b, repeats=repeats)
    specs = make(b, policy) if policy else make(b)
    base = Config().replace(**BASE, **(TINY_DATA if b.tiny else DATA))
    return Experiment(f"reproduce-{name}", base, specs, out,
                      b.updates * base.worker.batch_size,
                      default_target if target is None else target, max_seconds=1e9)


# ----------------------------------------------------------------------------------------------
# running them

def samples_to_target(record: dict, target: float, batch: int) -> int | None:
    """Training samples applied when the evaluation curve first reached ``target``: the
    version times the samples of an update (a synchronous update averages one push of
    each worker; with local steps a push is H batches)."""
    per_update = batch * record.get("local_steps", 1)
    if record["policy"] == "sync":
        per_update *= record["workers"]
    for p in record.get("curve") or []:
        if p["accuracy"] >= target:
            return p["version"] * per_update
    return None


def run_simulated(exp: Experiment, spec: RunSpec) -> dict:
    """One spec, simulated with ``EVALS`` evaluations: the record of
    ``simulator.runs.run_one`` with ``samples_to_target``, ``updates_dropped`` and ``lr``."""
    from asgd.experiments.runner import base_record, finish_record
    # the simulator is a side of its own: handed over to when a run runs (as --simulate)
    from simulator.delays import parse_delay
    from simulator.runs import simulate

    record = {**base_record(exp, spec), "simulated": True, "delay_model": spec.delay_model}
    try:
        cfg = exp.config_for(spec)
        record["lr"] = cfg.optimizer.lr
        if spec.local_steps > 1:
            record["outer_lr"] = cfg.server.outer.lr
        summary = simulate(cfg, parse_delay(spec.delay_model),
                           eval_every=max(1, cfg.run.max_updates // EVALS))
    except Exception as e:  # recorded, not dropped: the other runs go on
        record.update(status="failed", error=f"{type(e).__name__}: {e}",
                      traceback=traceback.format_exc())
        return record
    record = finish_record(record, exp, summary)
    record.update(bytes_moved=None, updates_dropped=summary.get("updates_dropped"),
                  samples_to_target=samples_to_target(record, exp.target_accuracy,
                                                      cfg.worker.batch_size))
    return record


def run_reproduction(exp: Experiment, quiet: bool = False) -> list[dict]:
    """Every run of ``exp`` on the simulator: results.json, results.csv, summary.md and
    the usual plots, then the reproduction's own table (``literature.md``) and plot."""
    from asgd.experiments.literature_report import write_literature
    from asgd.experiments.runner import run_experiment

    records = run_experiment(exp, quiet=quiet, run=run_simulated)
    write_literature(exp, records)
    return records
