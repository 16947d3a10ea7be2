"""`asgd launch --workers auto`: one worker per GPU, each on its own device; without a GPU the
configured run.workers. A count is taken as it is; anything else is refused by name."""
from __future__ import annotations

import json

import pytest
import torch

from asgd.cli import workers_overrides
from asgd.config import ConfigError, from_dict, resolve_workers

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="one worker per GPU needs CUDA; this machine has no GPU")


def test_resolution():
    cfg = from_dict({"run": {"workers": 3}})
    assert resolve_workers("auto", cfg, gpus=0) == 3          # no GPU: the config's count
    assert resolve_workers("AUTO", cfg, gpus=4) == 4          # one per GPU
    assert resolve_workers("5", cfg, gpus=4) == 5 == resolve_workers(5, cfg)
    for bad in ("0", "-2", "many", "1.5"):
        with pytest.raises(ConfigError, match="--workers"):
            resolve_workers(bad, cfg, gpus=0)
    assert resolve_workers("auto", cfg) == (torch.cuda.device_count()
                                            if torch.cuda.is_available() else 3)


def test_overrides_place_one_worker_on_each_gpu():
    cfg = from_dict({"run": {"workers": 3}})
    assert workers_overrides("auto", cfg, gpus=0) == ["run.workers=3"]
    assert workers_overrides("auto", cfg, gpus=2) == ["run.workers=2",
                                                      "worker.device=cuda:{local_rank}"]
    assert workers_overrides("4", cfg, gpus=2) == ["run.workers=4"]   # a count: devices as set
    assert from_dict({"worker": {"device": "cuda:{local_rank}"}}).worker.device \
        == "cuda:{local_rank}"


def test_launch_workers_auto_on_the_cpu(processes, tmp_path, mnist1d_cached):
    out = tmp_path / "runs"
    r = processes.run(["-m", "asgd.cli", "launch", "--workers", "auto", "--quiet",
                       "--set", "model.args.channels=8", "--set", "run.workers=1",
                       "--set", "run.max_updates=200", "--set", "run.eval_every_s=0",
                       "--set", f"run.out_dir={out}"], timeout=90, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["workers"] == 1
    r = processes.run(["-m", "asgd.cli", "launch", "--workers", "lots", "--quiet"],
                      timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and "--workers" in r.stderr and "lots" in r.stderr, r.stderr
    assert not out.exists() or len(list(out.iterdir())) == 1      # nothing more started


@needs_cuda
def test_launch_workers_auto_puts_one_worker_on_each_gpu(processes, tmp_path, mnist1d_cached):
    out = tmp_path / "runs"
    r = processes.run(["-m", "asgd.cli", "launch", "--workers", "auto", "--quiet",
                       "--set", "run.max_updates=200", "--set", "run.eval_every_s=0",
                       "--set", f"run.out_dir={out}"], timeout=180, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["workers"] == torch.cuda.device_count()
    (run_dir,) = list(out.iterdir())
    from asgd.config import load_config

    assert load_config(run_dir / "config.yaml").worker.device == "cuda:{local_rank}"
