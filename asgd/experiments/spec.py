"""What an experiment runs: its runs (``RunSpec``) and how each becomes a configuration.

    exp = Experiment("straggler", base_cfg, [RunSpec("sync", 4, 4.0)], Path("out"), 300_000,
                     target_accuracy=0.9, max_seconds=240)
    cfg = exp.config_for(exp.specs[0])

Runs get the same budget of training samples, so a synchronous update (one gradient from each
of W workers) counts W pushes' worth of samples.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from asgd.config import Config, split_batch

FIELDS = ("experiment", "label", "policy", "workers", "local_steps", "slow_factor", "delay_s", "repeat",
          "delay_model", "simulated", "status", "bytes_moved",
          "test_accuracy", "test_loss", "time_to_target_s", "samples_per_s", "updates_per_s",
          "updates_applied", "samples", "staleness_mean", "staleness_max", "train_s", "wall_s",
          "run_dir", "error")
SYNCHRONOUS = ("sync", "ddp", "single")


@dataclass(frozen=True)
class RunSpec:
    policy: str          # a server policy, or "ddp" / "single" for the reference trainers
    workers: int
    slow_factor: float = 1.0
    delay_s: float = 0.0
    repeat: int = 0
    local_steps: int = 1     # worker.exchange.local_steps: H steps per push (same samples)
    delay_model: str = ""    # simulated: the step durations' model (simulator.delays); "" real
    label: str = ""          # what sets this run apart beyond the fields above (e.g. "adam-s4")
    overrides: tuple = ()    # (key, value) pairs of config overrides of this run alone

    @property
    def name(self) -> str:
        slow = f"-f{self.slow_factor:g}" if self.slow_factor != 1 else ""
        delay = f"-d{self.delay_s:g}" if self.delay_s else ""
        local = f"-h{self.local_steps}" if self.local_steps != 1 else ""
        model = ""
        if self.delay_model:
            kind, _, args = self.delay_model.partition(":")
            # a trace's path is not part of the name: its run's folder is enough
            args = Path(args).name if kind == "trace" else args.replace(":", "_")
            model = f"-sim-{kind}{'_' + args if args else ''}"
        label = f"-{self.label}" if self.label else ""
        return (f"{self.policy.replace('+', '_')}-w{self.workers}{local}{slow}{delay}{model}"
                f"{label}-r{self.repeat}")


@dataclass
class Experiment:
    name: str
    base: Config
    specs: list
    out: Path
    samples: int
    target_accuracy: float
    max_seconds: float
    slow_ranks: list = field(default_factory=lambda: [0])
    eval_every_s: float = 0.5

    def config_for(self, spec: RunSpec) -> Config:
        b = self.base.worker.batch_size
        pushes = max(1, self.samples // b)
        per_update = spec.workers if spec.policy in ("sync", "ddp") else 1
        per_update *= spec.local_steps
        overrides = {
            "run.name": spec.name, "run.out_dir": str(self.out / "runs"),
            "run.workers": spec.workers, "run.max_updates": max(1, pushes // per_update),
            "worker.exchange.local_steps": spec.local_steps,
            "run.max_seconds": self.max_seconds, "run.eval_every_s": self.eval_every_s,
            "run.seed": self.base.run.seed + spec.repeat,
            "worker.straggler.factor": spec.slow_factor, "worker.straggler.delay_s": spec.delay_s,
            "worker.straggler.ranks": self.slow_ranks if spec.slow_factor != 1 or spec.delay_s
            else None,
        }
        if spec.policy not in ("ddp", "single"):
            overrides["server.policy"] = spec.policy
        if spec.policy in ("sync", "ddp", "single"):
            # their updates above count rounds of whole batches per worker, as measured
            overrides["worker.batch_split"] = False
        overrides.update(dict(spec.overrides))
        # with worker.batch_split (configs/default.yaml's, not experiments.yaml's) the budget
        # above, in pushes of the whole batch, is scaled to the split batch's pushes
        return split_batch(self.base.replace(**overrides))
