"""The examples (examples/*.py) run with a short budget: each alone, as the single-process
reference (asgd.Optimizer without a server is the plain torch optimizer), and each as two
asgd workers under `asgd launch --workers 2`, where both scripts end, the server applied their
pushes and every worker prints its final validation metric."""
from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest

from asgd.launch.processes import run_to_end
from tests.conftest import REPO

RUN_TIMEOUT_S = 240.0

pytestmark = pytest.mark.timeout(300)

EXAMPLES = REPO / "examples"
# a tiny budget each: enough to run every line of the script once
QUICK = {
    "lm.py": ["--steps", "4", "--batch-size", "2", "--seq-len", "32", "--eval-every", "2",
              "--eval-batches", "1", "--warmup", "2", "--data-mb", "0.2", "--threads", "1"],
    "image.py": ["--steps", "4", "--batch-size", "32", "--threads", "1"],
    "regression.py": ["--steps", "6", "--eval-every", "3", "--threads", "1"],
}
# the figure each prints last: name, and what it must be
FINAL = {"lm.py": "val_loss", "image.py": "val_accuracy", "regression.py": "val_mse"}
SIZE = {"lm.py": 2_000_000, "image.py": 500_000}      # at least this many parameters


def final_figure(text: str, name: str) -> float:
    found = re.findall(rf"^(?:\[rank \d+\] )?final: .*\b{name} ([-0-9.e+]+|nan|inf)", text,
                       re.M)
    assert found, text
    return float(found[-1])


def env_without_server(child_env: dict) -> dict:
    return {k: v for k, v in child_env.items() if not k.startswith("ASGD_") or
            k == "ASGD_CACHE"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(QUICK))
def test_example_runs_alone(name, tmp_path, child_env):
    res = run_to_end([str(EXAMPLES / name), *QUICK[name]], RUN_TIMEOUT_S,
                     env=env_without_server(child_env), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    value = final_figure(res.stdout, FINAL[name])
    assert math.isfinite(value)
    if name in SIZE:
        params = int(res.stdout.split(" parameters")[0].replace(",", ""))
        assert params >= SIZE[name]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name[:-3]}", EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lm_schedule_is_the_plain_versions():
    """asgd.Optimizer(schedule="cosine", ...) steps at the learning rates of with_cosine, the
    plain PyTorch version's schedule: warm-up, decay and floor."""
    import argparse

    import torch

    import asgd

    lm = load_example("lm.py")
    args = argparse.Namespace(lr=1e-3, min_lr=1e-4, warmup=3, steps=12)
    w = torch.nn.Parameter(torch.zeros(2))
    plain = lm.with_cosine(torch.optim.AdamW([w], lr=args.lr), args)
    v = torch.nn.Parameter(torch.zeros(2))
    opt = asgd.Optimizer([v], "adamw", lr=args.lr, schedule="cosine", warmup=args.warmup,
                         min_lr=args.min_lr, max_updates=args.steps, server=None)
    seen = []
    for _ in range(args.steps):
        seen.append((plain.param_groups[0]["lr"], opt.lr))
        for p, o in ((w, plain), (v, opt)):
            p.grad = torch.ones(2)
            o.step()
    opt.close()
    assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in seen), seen
    assert seen[0][0] == pytest.approx(args.lr / args.warmup)
    assert seen[-1][0] < seen[args.warmup][0]
    assert torch.equal(w, v)             # and the same AdamW steps


SERVER_LEARNS_MODEL = importlib.util.find_spec("server.adopt") is not None


@pytest.mark.slow
@pytest.mark.skipif(not SERVER_LEARNS_MODEL,
                    reason="the server learns its model from a script's hello (server.adopt) "
                           "on branch optimizer")
@pytest.mark.parametrize("name", sorted(QUICK))
def test_example_as_two_asgd_workers(name, tmp_path, child_env):
    res = run_to_end(["-m", "asgd.cli", "launch", "--workers", "2", "--quiet",
                      "--set", "run.name=ex", str(EXAMPLES / name), *QUICK[name]],
                     RUN_TIMEOUT_S, env=env_without_server(child_env), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "runs" / "ex" / "summary.json").read_text())
    assert summary["status"] == "ok"
    assert [e["exit_code"] for e in summary["worker_exits"]] == [0, 0]
    assert summary["updates_applied"] >= 1
    for rank in (0, 1):          # each worker's own final figure, prefixed with its rank
        lines = [line for line in res.stderr.splitlines()
                 if line.startswith(f"[rank {rank}] final:")]
        assert len(lines) == 1, res.stderr
        assert math.isfinite(final_figure(lines[0], FINAL[name]))
    if name == "lm.py":          # the server's budget (max_updates) ended both scripts
        assert summary["version"] >= int(QUICK[name][1])
