"""The default run's batch split among its workers (asgd.config.split_batch): each of n
workers takes round(batch / (n - 1)) a step and the settings counted in server versions are
scaled so that they keep counting the same samples; applied once, by every process alike."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from asgd.config import Config, load_config, split_batch
from asgd.experiments.spec import Experiment, RunSpec

REPO = Path(__file__).resolve().parent.parent
DEFAULT = REPO / "configs" / "default.yaml"


def with_workers(n: int, **more) -> Config:
    return load_config(DEFAULT).replace(**{"run.workers": n, **more})


@pytest.mark.parametrize("n", [3, 4, 8, 16, 64])
def test_the_split_keeps_the_samples_the_warmup_and_the_bound(n):
    cfg = with_workers(n)
    run = split_batch(cfg)
    b = run.worker.batch_size
    assert b == max(1, round(100 / (n - 1))) and not run.worker.batch_split
    # the n - 1 pushes between a worker's pull and its push hold about one batch
    assert abs((n - 1) * b - 100) <= n - 1
    # the budget, warm-up and bound count the samples they counted at batch 100
    assert abs(run.run.max_updates * b - 3000 * 100) <= b
    assert abs(run.schedule.warmup * b - 50 * 100) <= b
    assert abs(run.server.max_staleness * b - 3 * 100) <= b
    assert abs(run.schedule.step_size * b - 1000 * 100) <= b
    # everything else as it was
    assert run.replace(**{"worker.batch_size": 100, "worker.batch_split": True,
                          "run.max_updates": 3000, "schedule.warmup": 50,
                          "schedule.step_size": 1000, "server.max_staleness": 3}) == cfg


def test_applying_it_again_changes_nothing():
    """Every process of a launch reads the run directory's config.yaml: split once."""
    run = split_batch(with_workers(8))
    assert split_batch(run) == run
    assert load_config(None, []).worker.batch_split      # the built-in default splits


@pytest.mark.parametrize("cfg", [
    with_workers(1),                                      # nothing to split
    with_workers(2),                                      # one other worker: one batch
    with_workers(8, **{"model.name": ""}),                # a server for scripts
    with_workers(8, **{"worker.batch_split": False}),     # asked not to
], ids=["one-worker", "two-workers", "no-model", "off"])
def test_runs_it_does_not_apply_to_keep_their_numbers(cfg):
    run = split_batch(cfg)
    assert not run.worker.batch_split
    assert run.replace(**{"worker.batch_split": cfg.worker.batch_split}) == cfg


def test_sync_splits_the_batch_and_counts_rounds_as_before():
    """A sync round is one push from every worker: n x (100 / n) samples, one batch."""
    run = split_batch(with_workers(4, **{"server.policy": "sync"}))
    assert run.worker.batch_size == 33
    assert (run.run.max_updates, run.schedule.warmup, run.server.max_staleness) == (3000, 50, 3)


def test_none_and_zero_stay_none_and_zero():
    run = split_batch(with_workers(4, **{"server.max_staleness": None, "run.max_updates": 0,
                                         "schedule.warmup": 0, "run.max_seconds": 30}))
    assert run.server.max_staleness is None and run.run.max_updates == 0
    assert run.schedule.warmup == 0 and run.worker.batch_size == 33


def test_experiments_keep_their_samples_under_the_split(tmp_path):
    """An experiment on configs/default.yaml: the budget in pushes of the whole batch becomes
    pushes of the split batch; sync, ddp and single keep whole batches per worker."""
    spec = Experiment("staleness", load_config(DEFAULT), [], tmp_path, samples=300_000,
                      target_accuracy=0.9, max_seconds=60)
    cfg = spec.config_for(RunSpec("scale", 8))
    assert cfg.worker.batch_size == 14 and cfg.run.max_updates == round(3000 * 100 / 14)
    sync = spec.config_for(RunSpec("sync", 8))
    assert sync.worker.batch_size == 100 and sync.run.max_updates == 3000 // 8
    # experiments.yaml measures each worker at its own batch, as the tables were
    base = load_config(REPO / "configs" / "experiments.yaml")
    plain = Experiment("staleness", base, [], tmp_path, samples=300_000, target_accuracy=0.9,
                       max_seconds=60).config_for(RunSpec("none", 8))
    assert plain.worker.batch_size == 50 and plain.run.max_updates == 6000


@pytest.mark.slow
def test_a_launch_trains_each_worker_on_its_part_of_the_batch(tmp_path):
    """asgd launch --workers 4: the run directory's config holds the split numbers, the
    server stops at the scaled budget, and the workers' samples are 33 a push."""
    out = subprocess.run(
        [sys.executable, "-m", "asgd.cli", "launch", "--quiet", "--workers", "4",
         "--set", "run.max_updates=20", "--set", f"run.out_dir={tmp_path}",
         "--set", "run.name=split", "--set", "run.eval_every_s=0"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    run_dir = tmp_path / "split"
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["worker"]["batch_size"] == 33 and cfg["worker"]["batch_split"] is False
    assert cfg["run"]["max_updates"] == 61 and cfg["server"]["max_staleness"] == 9
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["updates_applied"] >= 61
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    done = [r for r in records if r.get("kind") == "worker_done"]
    assert len(done) == 4 and all(r["step"] > 0 for r in done)
    assert all(r["samples"] == 33 * r["step"] for r in done)     # 33 samples a step


def test_a_run_made_before_the_split_is_resumed_with_whole_batches(tmp_path):
    """A run directory whose config.yaml has no worker.batch_split trained whole batches; the
    default (split) must not change that when it goes on."""
    from asgd.config import dump_config
    from asgd.launch.checks import resume_config

    old = yaml.safe_load(dump_config(load_config(DEFAULT)))
    del old["worker"]["batch_split"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.asgd").write_bytes(b"")
    cfg, _ = resume_config(tmp_path, ["run.max_updates=6000"])
    assert cfg.worker.batch_split is False and cfg.run.max_updates == 6000
    assert split_batch(cfg).worker.batch_size == 100
    # a run made since keeps what it says
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(
        yaml.safe_load(dump_config(split_batch(with_workers(4))))))
    cfg, _ = resume_config(tmp_path)
    assert cfg.worker.batch_size == 33 and cfg.run.max_updates == 9091


def test_a_setting_the_share_cannot_take_is_one_clear_error(tmp_path):
    """20 micro-batches fit the whole batch of 100, not 16 workers' 7 each: refused before
    anything starts, naming the split and the way out, and no run directory is left."""
    from asgd.config import ConfigError

    cfg = with_workers(16, **{"worker.stages.microbatches": 20})
    with pytest.raises(ConfigError, match="worker.batch_split: 16 workers take 7 samples"):
        split_batch(cfg)
    out = subprocess.run(
        [sys.executable, "-m", "asgd.cli", "launch", "--quiet", "--workers", "16",
         "--set", "worker.stages.microbatches=20", "--set", f"run.out_dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "worker.batch_split=false" in out.stderr and "micro-batches" in out.stderr
    assert not any(tmp_path.iterdir())
