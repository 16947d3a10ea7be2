"""A script on asgd.Optimizer under `asgd launch SCRIPT` with no config of its own, as a new user
first runs one: the server trains at the script's rate from the first update (a constant
rate without warm-up unless the script gives a schedule), whatever the script logs reaches
TensorBoard under its own name, and the summary does not claim a sample rate the script
never counted."""
from __future__ import annotations

import json
import math

import pytest
import yaml

from asgd.launch.processes import run_to_end
from asgd.metrics import read_metrics
from asgd.tensorboard import read_scalars
from tests.test_examples import env_without_server

RUN_TIMEOUT_S = 120.0

pytestmark = pytest.mark.timeout(180)

SCRIPT = """
import torch, asgd
torch.manual_seed(0)
net = torch.nn.Linear(4, 1)
opt = asgd.Optimizer(net.named_parameters(), optimizer="sgd", lr=0.1)
print(f"lr {opt.lr} version {opt.version}", flush=True)
g = torch.Generator().manual_seed(1)
x, y = torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g)
for step in range(1, 13):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(net(x), y)
    loss.backward()
    opt.step()
    if step % 4 == 0:
        with torch.no_grad():
            val = torch.nn.functional.mse_loss(net(x[:8]), y[:8])
        opt.log(loss=loss, val_loss=val, note="text is not a scalar")
print(f"lr {opt.lr} version {opt.version}", flush=True)
opt.close()
"""


@pytest.mark.slow
def test_script_run_defaults_tensorboard_scalars_and_honest_rates(tmp_path, child_env):
    (tmp_path / "train.py").write_text(SCRIPT)
    res = run_to_end(["-m", "asgd.cli", "launch", "--workers", "1", "--quiet",
                      "--set", "run.name=t", "--set", "run.tensorboard=true", "train.py"],
                     RUN_TIMEOUT_S, env=env_without_server(child_env), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    run_dir = tmp_path / "runs" / "t"

    # a constant rate without warm-up: the script's lr from version 0 (warm-up would give
    # lr/warmup there), as torch.optim.SGD(lr=0.1)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["schedule"]["kind"] == "constant" and cfg["schedule"]["warmup"] == 0
    assert "[rank 0] lr 0.1 version 0" in res.stderr, res.stderr
    assert "[rank 0] lr 0.1 version 12" in res.stderr, res.stderr

    # no samples counted: null ("n/a") rather than 0; the server's update rate instead
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["updates_applied"] == 12
    assert summary["samples_per_s"] is None and summary["samples"] is None
    assert "opt.log(samples=" in summary["samples_note"]
    assert summary["updates_per_s"] > 0
    printed = json.loads(res.stdout)
    assert printed["samples_per_s"] is None and printed["updates_per_s"] > 0

    # every number the script logged is a TensorBoard scalar at its step; text is not
    scalars = read_scalars(run_dir / "tensorboard")
    logged = [r for r in read_metrics(run_dir / "metrics.jsonl")
              if r["kind"] == "worker_step"]
    assert [r["step"] for r in logged] == [4, 8, 12]
    for tag, key in (("val_loss/w0", "val_loss"), ("train/loss/w0", "loss")):
        assert [s for s, _ in scalars[tag]] == [4, 8, 12], scalars.keys()
        assert all(math.isclose(v, r[key], rel_tol=1e-6)
                   for (_, v), r in zip(scalars[tag], logged))
    assert not any("note" in tag for tag in scalars)
    (done,) = [r for r in read_metrics(run_dir / "metrics.jsonl")
               if r["kind"] == "worker_done"]
    assert done["samples"] == 0 and done["samples_per_s"] is None and done["version"] == 12
