"""Mixed precision (worker.stages.precision): the fp16 loss scaler skips an overflowing step, pushes
nothing and shrinks its scale, then grows it back; fp16 and bf16 autocast give the fp32
gradient to their precision; bf16 trains a real cluster on the CPU; fp16 on CUDA where there is
one."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from asgd.config import ConfigError, load_config
from asgd.metrics import MetricsWriter, read_metrics
from asgd.tasks.models import build_model
from worker import stages as st
from worker.precision import LossScaler, autocast

torch.set_num_threads(1)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def worker_cfg(**keys):
    return load_config(None, [f"worker.{k}={json.dumps(v)}" for k, v in keys.items()]).worker


# ----------------------------------------------------------------------------------------------
# the scaler on a flat gradient


def test_a_finite_gradient_is_unscaled_and_counts_toward_growth():
    s = LossScaler(init_scale=8.0, growth_interval=3)
    g = torch.tensor([8.0, -4.0, 0.5])
    assert s.unscale_and_update(g)
    assert torch.equal(g, torch.tensor([1.0, -0.5, 0.0625]))
    assert s.scale == 8.0 and s.good_steps == 1 and s.overflows == 0


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_an_overflow_is_skipped_halves_the_scale_and_growth_waits_the_interval(bad):
    s = LossScaler(init_scale=2.0 ** 10, growth_interval=3)
    assert s.unscale_and_update(torch.ones(5))
    g = torch.ones(1000)
    g[417] = bad                                   # the injected overflow
    assert not s.unscale_and_update(g)             # skip this step
    assert s.scale == 2.0 ** 9 and s.overflows == 1 and s.good_steps == 0
    for i in range(2):                             # not yet: the interval restarted
        assert s.unscale_and_update(torch.ones(5))
        assert s.scale == 2.0 ** 9
    assert s.unscale_and_update(torch.ones(5))     # the third good step in a row
    assert s.scale == 2.0 ** 10 and s.good_steps == 0


def test_the_scale_is_exhausted_only_below_its_floor():
    s = LossScaler(init_scale=4.0, min_scale=1.0)
    for _ in range(2):
        assert not s.unscale_and_update(torch.tensor([float("inf")]))
    assert s.scale == 1.0 and not s.exhausted
    s.unscale_and_update(torch.tensor([float("nan")]))
    assert s.exhausted


def test_fp32_autocast_is_no_autocast():
    with autocast(torch.device("cpu"), "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# autocast through the pipeline


def batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 40, generator=g), torch.randint(0, 10, (n,), generator=g)


def grads(model, x, y, scale=1.0, **keys):
    """The loss and flat gradient (divided by ``scale``) with the worker keys given."""
    model.zero_grad(set_to_none=True)
    if keys:
        pipe = st.build_pipeline(worker_cfg(**keys), model, 0, example=x.cpu())
        loss = pipe.forward_backward(x, y, scale)
    else:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]) / scale
    model.zero_grad(set_to_none=True)
    return loss.detach().float(), g


@pytest.mark.parametrize("precision,tol", [("bf16", 0.05), ("fp16", 0.01)])
@pytest.mark.parametrize("name", ["mlp", "cnn1d"])
def test_autocast_gives_the_fp32_gradient_to_its_precision(name, precision, tol):
    model = build_model(load_config(None, [f"model.name={name}"]).model, (40,), 10)
    x, y = batch()
    loss32, g32 = grads(model, x, y)
    pipe = st.build_pipeline(worker_cfg(precision=precision), model, 0, example=x)
    assert pipe.forward(x).dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    loss, g = grads(model, x, y, scale=2.0 ** 16 if precision == "fp16" else 1.0,
                    precision=precision, devices=["cpu", "cpu"], microbatches=2)
    assert abs(loss - loss32) < tol * abs(loss32)
    assert (g - g32).norm() < tol * 4 * g32.norm(), ((g - g32).norm(), g32.norm())


def test_a_model_that_cannot_run_in_a_precision_fails_at_start_naming_the_key():
    """oneDNN has no fp16 LSTM on the CPU: the worker says so before it trains."""
    model = build_model(load_config(None, ["model.name=lstm"]).model, (40,), 10)
    if torch.cuda.is_available():
        pytest.skip("the CPU's limitation")
    with pytest.raises(ConfigError, match="worker.stages.precision: model LSTMClassifier does not "
                                          "run in fp16 on cpu"):
        st.build_pipeline(worker_cfg(precision="fp16"), model, 0, example=batch()[0])


def test_the_plain_configuration_builds_no_pipeline():
    assert st.build_pipeline(load_config(DEFAULT_CONFIG).worker, None, 0, None) is None


# ----------------------------------------------------------------------------------------------
# a worker against a real server


@pytest.mark.slow
def test_an_overflowing_fp16_step_is_skipped_and_never_pushed(start_server, make_config,
                                                               tmp_path):
    """The scale starts where the scaled loss overflows float32: those steps are skipped (an
    fp16_overflow record each, the scale halved each time), the server's version counts only
    the pushed steps, and training goes on."""
    from worker.train import Worker

    config = make_config(worker={"precision": "fp16", "max_steps": 6},
                         run={"workers": 1, "max_updates": 0})
    server = start_server(config)
    cfg = load_config(config)
    metrics = MetricsWriter(tmp_path / "metrics.jsonl")
    w = Worker(cfg, server.endpoint, rank=0, metrics=metrics)
    try:
        w.scaler.scale = 2.0 ** 127        # the injected overflow: loss * scale is inf
        res = w.run()
    finally:
        w.close()
        metrics.close()
    overflows = [r for r in read_metrics(tmp_path / "metrics.jsonl")
                 if r["kind"] == "fp16_overflow"]
    assert res.steps == 6 and res.reason == "max_steps"
    assert w.scaler.overflows >= 1 and len(overflows) == w.scaler.overflows
    assert w.scaler.scale == 2.0 ** (127 - w.scaler.overflows)
    assert [r["overflows"] for r in overflows] == list(range(1, len(overflows) + 1))
    assert overflows[0]["version"] == 0                 # the first step was not pushed
    # between overflows only the pushed steps moved the server's version
    assert all(a["version"] <= b["version"] for a, b in zip(overflows, overflows[1:]))
    assert w.version == res.steps == 6                  # only the good steps reached the server


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: fp16 autocast on a GPU")
def test_fp16_autocast_on_cuda_with_the_scaler():
    model = build_model(load_config(None, ["model.name=cnn1d"]).model, (40,), 10)
    x, y = batch()
    loss32, g32 = grads(model, x, y)
    model.cuda()
    scaler = LossScaler()
    loss, g = grads(model, x.cuda(), y.cuda(), scale=scaler.scale, precision="fp16",
                    device="cuda", microbatches=2)
    assert scaler.unscale_and_update(g * scaler.scale)
    assert abs(loss.cpu() - loss32) < 0.01 * abs(loss32)
    assert (g.cpu() - g32).norm() < 0.04 * g32.norm()


# ----------------------------------------------------------------------------------------------
# bf16 trains a cluster on the CPU


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bf16_trains_two_workers_on_the_cpu(processes, tmp_path, mnist1d_cached):
    out = tmp_path / "runs"
    result = processes.run(["-m", "asgd.cli", "launch", "--config", str(DEFAULT_CONFIG),
                            "--set", f"run.out_dir={out}", "--set", "worker.stages.precision=bf16",
                            "--set", "run.max_updates=1500", "--set", "run.eval_every_s=0",
                            "--set", "run.max_seconds=0", "--quiet"], timeout=540, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "ok" and summary["updates_applied"] >= 1500
    assert summary["test_accuracy"] >= 0.85, summary
