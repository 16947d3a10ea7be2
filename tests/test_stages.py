"""Inside the node: a model split into stages (worker.stages.devices), the GPipe pipeline over
micro-batches, recompute and offload give the whole model's loss and gradient; a bad split is a
ConfigError naming the key; two workers, each with two stages, four micro-batches and bf16
autocast, train the default run (the acceptance run of docs/node.md)."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from asgd.config import ConfigError, load_config
from asgd.tasks.models import build_model
from asgd.tasks import devices, layers as lay
from worker import stages as st

torch.set_num_threads(1)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
SHAPES = {"mlp": (40,), "cnn1d": (40,), "cnn2d": (8, 8), "lstm": (40,)}


def worker_cfg(**keys):
    return load_config(None, [f"worker.{k}={json.dumps(v)}" for k, v in keys.items()]).worker


def batch(shape, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)


def whole(model, x, y):
    """The whole model's loss and flat gradient (in parameter order), the reference."""
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), flat_grad(model)


def flat_grad(model):
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return g


def piped(model, x, y, **keys):
    pipe = st.build_pipeline(worker_cfg(**keys), model, 0, example=x)
    model.zero_grad(set_to_none=True)
    loss = pipe.forward_backward(x, y)
    return pipe, loss, flat_grad(model)


def assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    assert torch.allclose(la, lb, rtol=1e-5, atol=1e-6), (la, lb)
    assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-6), (ga - gb).abs().max()


class Deep(nn.Sequential):
    """A user's model as an nn.Sequential, with a nested one (flattened into its layers)."""

    def __init__(self):
        super().__init__(nn.Flatten(1), nn.Linear(40, 32), nn.Tanh(),
                         nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)),
                         nn.ReLU(), nn.Linear(32, 10))


def models():
    for name, shape in SHAPES.items():
        yield name, (lambda n=name, s=shape: build_model(load_config(
            None, [f"model.name={n}"]).model, s, 10, seed=0)), shape
    yield "user-sequential", lambda: (torch.manual_seed(0), Deep())[1], (40,)


# ----------------------------------------------------------------------------------------------
# the split model computes the whole model's loss and gradient


@pytest.mark.parametrize("name,make,shape", list(models()), ids=[m[0] for m in models()])
@pytest.mark.parametrize("devices,microbatches", [(["cpu", "cpu"], 1), (["cpu", "cpu"], 4),
                                                  (["cpu"] * 3, 1), (["cpu"] * 3, 4)])
def test_split_model_matches_the_whole_model(name, make, shape, devices, microbatches):
    model = make()
    x, y = batch(shape)
    ref = whole(model, x, y)
    pipe, loss, grad = piped(model, x, y, devices=devices, microbatches=microbatches)
    assert len(pipe.stages) == len(devices)
    assert all(s.layers for s in pipe.stages)
    assert_same((loss, grad), ref)


def test_uneven_micro_batches_weigh_by_their_share():
    """25 samples in 4 micro-batches (7, 6, 6, 6): each loss weighted by its share."""
    model = build_model(load_config(None, ["model.name=mlp"]).model, (40,), 10)
    x, y = batch((40,), n=25)
    ref = whole(model, x, y)
    _, loss, grad = piped(model, x, y, devices=["cpu", "cpu"], microbatches=4)
    assert_same((loss, grad), ref)


def test_explicit_split_points_cut_there():
    torch.manual_seed(0)
    model = Deep()          # layers: Flatten Linear Tanh Linear ReLU Linear ReLU Linear
    x, y = batch((40,))
    ref = whole(model, x, y)
    pipe, loss, grad = piped(model, x, y, devices=["cpu"] * 3, split=[2, 5])
    assert [s.first for s in pipe.stages] == [0, 2, 5]
    assert [len(s.layers) for s in pipe.stages] == [2, 3, 3]
    assert_same((loss, grad), ref)


@pytest.mark.parametrize("split", ["params", "time"])
def test_balanced_splits_are_valid(split):
    model = build_model(load_config(None, ["model.name=cnn1d"]).model, (40,), 10)
    layers = lay.model_layers(model, batch((40,))[0][:2])
    x, y = batch((40,))
    ref = whole(model, x, y)
    pipe, loss, grad = piped(model, x, y, devices=["cpu"] * 3, split=split)
    firsts = [s.first for s in pipe.stages]
    assert firsts[0] == 0 and firsts == sorted(set(firsts)) and firsts[-1] < len(layers)
    assert sum(len(s.layers) for s in pipe.stages) == len(layers)
    assert_same((loss, grad), ref)
    if split == "params":   # no other cut has a smaller largest stage
        costs = lay.parameter_costs(layers)
        best = min(max(sum(costs[a:b]) for a, b in zip((0, i, j), (i, j, len(costs))))
                   for i, j in itertools.combinations(range(1, len(costs)), 2))
        assert max(s.parameters for s in pipe.stages) == best


def test_balance_is_optimal_against_every_cut():
    g = torch.Generator().manual_seed(1)
    for trial in range(30):
        n = int(torch.randint(2, 9, (1,), generator=g))
        costs = torch.randint(0, 20, (n,), generator=g).tolist()
        for k in range(1, min(n, 4) + 1):
            points = lay.balance(costs, k)
            bounds = [0, *points, n]
            assert len(points) == k - 1 and all(a < b for a, b in zip(bounds, bounds[1:]))
            got = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
            best = min(max(sum(costs[a:b]) for a, b in zip((0, *c), (*c, n)))
                       for c in itertools.combinations(range(1, n), k - 1))
            assert got == best, (costs, k, points)


# ----------------------------------------------------------------------------------------------
# what cannot be split, and bad keys


def test_more_stages_than_layers_is_a_config_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(1), nn.Linear(40, 10))
    x, _ = batch((40,))
    with pytest.raises(ConfigError, match="worker.stages.devices: 3 stages but the model has "
                                          "only 2"):
        st.build_pipeline(worker_cfg(devices=["cpu"] * 3), model, 0, example=x)


def test_split_points_out_of_range_are_a_config_error():
    model = build_model(load_config(None, ["model.name=cnn1d"]).model, (40,), 10)
    x, _ = batch((40,))
    with pytest.raises(ConfigError, match="worker.stages.split: split points \\[9\\] out of range"):
        st.build_pipeline(worker_cfg(devices=["cpu", "cpu"], split=[9]), model, 0, example=x)
    # the same check before any process starts, from the config alone (cnn1d: 9 layers)
    with pytest.raises(ConfigError, match="worker.stages.split: split points \\[9\\] out of range"):
        lay.check_split(load_config(None, ["worker.stages.devices=[cpu, cpu]",
                                           "worker.stages.split=[9]"]))
    lay.check_split(load_config(None, ["worker.stages.devices=[cpu, cpu]",
                                       "worker.stages.split=[8]"]))


@pytest.mark.parametrize("overrides,message", [
    (["worker.stages.precision=fp8"], "worker.stages.precision"),
    (["worker.stages.devices=[cpu, cpu]", "worker.stages.split=[0]"], "worker.stages.split"),
    (["worker.stages.devices=[cpu, cpu]", "worker.stages.split=[3, 2]"], "worker.stages.split"),
    (["worker.stages.devices=[cpu, cpu]", "worker.stages.split=[2, 4]"],
     "worker.stages.split: 2 split points"),
    (["worker.stages.split=balanced"], "worker.stages.split"),
    (["worker.stages.devices=[]"], "worker.stages.devices"),
    (["worker.stages.devices=[tpu]"], "worker.stages.devices"),
    (["worker.stages.microbatches=0"], "worker.stages.microbatches"),
    (["worker.stages.microbatches=101"], "worker.stages.microbatches"),
    (["worker.device=cuda:{rank}"], "worker.device"),
])
def test_bad_keys_name_themselves(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", "\\[")):
        load_config(DEFAULT_CONFIG, overrides)


class Residual(nn.Module):
    """Not a sequence: its forward adds its input back."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(40, 40), nn.Linear(40, 10)

    def forward(self, x):
        return self.b(x + self.a(x))


class ResidualWithLayers(Residual):
    def stage_layers(self):
        return [Skip(self.a), self.b]


class Skip(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return x + self.inner(x)


def test_a_model_that_is_not_a_sequence_says_what_to_provide():
    torch.manual_seed(0)
    x, _ = batch((40,))
    with pytest.raises(ConfigError, match="do not compute its forward.*stage_layers"):
        st.build_pipeline(worker_cfg(devices=["cpu", "cpu"]), Residual(), 0, example=x)


def test_stage_layers_lets_any_model_split():
    torch.manual_seed(0)
    model = ResidualWithLayers()
    x, y = batch((40,))
    ref = whole(model, x, y)
    _, loss, grad = piped(model, x, y, devices=["cpu", "cpu"], microbatches=3)
    assert_same((loss, grad), ref)


def test_device_templates_use_the_local_rank():
    if torch.cuda.is_available():
        pytest.skip("the CPU's naming: no CUDA devices visible")
    assert devices.local_rank(5) == 5
    assert devices.device_name("cuda:{local_rank}", 3) == "cuda:3"
    assert devices.device_name("{local_rank}", 2) == "cuda:2"
    assert devices.resolve_device("auto", 7) == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        devices.resolve_device("cuda:{local_rank}", 1)
    cfg = load_config(None, ["worker.device=cuda:{local_rank}",
                             "worker.stages.devices=['cuda:{local_rank}', cpu]"])   # quoted: YAML
    assert cfg.worker.stages.devices == ["cuda:{local_rank}", "cpu"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_templates_on_cuda():
    count = torch.cuda.device_count()
    assert devices.resolve_device("cuda:{local_rank}", count + 1) == torch.device(f"cuda:{1 % count}")


# ----------------------------------------------------------------------------------------------
# recompute and offload


@pytest.mark.parametrize("keys", [
    {"recompute": True},
    {"offload_activations": True},
    {"recompute": True, "offload_activations": True},
    {"devices": ["cpu", "cpu"], "microbatches": 4, "recompute": True},
    {"devices": ["cpu", "cpu"], "microbatches": 4, "offload_activations": True},
], ids=lambda k: "+".join(f"{a}={b}" for a, b in k.items()))
@pytest.mark.parametrize("name", ["mlp", "cnn1d", "lstm"])
def test_recompute_and_offload_give_the_same_gradient(name, keys):
    model = build_model(load_config(None, [f"model.name={name}"]).model, SHAPES[name], 10)
    x, y = batch(SHAPES[name])
    ref = whole(model, x, y)
    pipe, loss, grad = piped(model, x, y, **keys)
    assert_same((loss, grad), ref)
    if keys.get("recompute"):
        assert all(s.segments for s in pipe.stages)
    if keys.get("offload_activations") and not keys.get("recompute"):
        assert pipe.offload.bytes > 0      # the activations went through the host copy


def saved_bytes(pipe, x, y):
    """Bytes of the tensors autograd keeps from the forward for backward, by storage
    (parameters excluded): counted by a saved_tensors_hooks around the pipeline's forward."""
    seen = {}

    def pack(t):
        if not st._is_weight(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = pipe._fill(x, y)
    torch.autograd.backward(losses)
    return sum(seen.values())


def test_recompute_keeps_fewer_activations():
    torch.manual_seed(0)
    layers = [nn.Flatten(1)]
    for _ in range(16):
        layers += [nn.Linear(40, 40), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(40, 10))
    x, y = batch((40,), n=64)
    plain = st.build_pipeline(worker_cfg(microbatches=2), model, 0, example=x)
    recomputed = st.build_pipeline(worker_cfg(microbatches=2, recompute=True), model, 0,
                                   example=x)
    kept, kept_recompute = saved_bytes(plain, x, y), saved_bytes(recomputed, x, y)
    # 34 layers in 6 segments: only the segments' inputs are kept (6 activations of each
    # micro-batch instead of 17)
    assert kept_recompute * 2.5 < kept, (kept_recompute, kept)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: pinned host memory")
def test_offload_on_cuda_keeps_activations_in_pinned_host_memory():
    model = build_model(load_config(None, ["model.name=mlp"]).model, (40,), 10)
    x, y = batch((40,))
    ref = whole(model, x, y)
    model.cuda()
    off = st.Offload()
    packed = off.pack(torch.randn(4, 4, device="cuda", requires_grad=True) * 2)
    assert packed[1].is_pinned() and packed[1].device.type == "cpu"
    assert off.unpack(packed).device.type == "cuda"
    pipe, loss, grad = piped(model, x.cuda(), y.cuda(), device="cuda", offload_activations=True)
    assert pipe.offload.bytes > 0
    assert_same((loss.cpu(), grad.cpu()), ref)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_stages_on_two_gpus_match_the_whole_model():
    model = build_model(load_config(None, ["model.name=cnn1d"]).model, (40,), 10)
    x, y = batch((40,))
    ref = whole(model, x, y)
    pipe, loss, grad = piped(model, x, y, devices=["cuda:0", "cuda:1"], microbatches=4)
    assert [s.device for s in pipe.stages] == [torch.device("cuda:0"), torch.device("cuda:1")]
    assert_same((loss.cpu(), grad.cpu()), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: non-blocking copies")
def test_stages_on_cuda_and_cpu_with_non_blocking_copies():
    model = build_model(load_config(None, ["model.name=mlp"]).model, (40,), 10)
    x, y = batch((40,))
    ref = whole(model, x, y)
    pipe, loss, grad = piped(model, x, y, devices=["cuda:0", "cpu"], microbatches=4)
    assert_same((loss.cpu(), grad.cpu()), ref)


# ----------------------------------------------------------------------------------------------
# the acceptance run


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_workers_with_two_stages_four_microbatches_and_bf16_train_the_default_run(
        processes, tmp_path, mnist1d_cached):
    out = tmp_path / "runs"
    result = processes.run(["-m", "asgd.cli", "launch", "--config", str(DEFAULT_CONFIG),
                            "--set", f"run.out_dir={out}",
                            "--set", "worker.stages.devices=[cpu, cpu]",
                            "--set", "worker.stages.microbatches=4",
                            "--set", "worker.stages.precision=bf16",
                            "--set", "run.eval_every_s=0", "--set", "run.max_seconds=0",
                            "--quiet"], timeout=540, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "ok" and summary["workers"] == 2
    assert summary["updates_applied"] >= 3000
    assert summary["test_accuracy"] >= 0.90, summary
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    logs = "".join(p.read_text() for p in (run_dir / "logs").glob("w*.log"))
    assert logs.count("pipeline: 4 micro-batch(es), bf16; stage 0 on cpu") == 2, logs[-2000:]


def test_a_split_the_model_cannot_take_stops_the_launch_before_it_starts(processes, tmp_path):
    out = tmp_path / "runs"
    r = processes.run(["-m", "asgd.cli", "launch", "--quiet", "--set", f"run.out_dir={out}",
                       "--set", "worker.stages.devices=[cpu,cpu]",
                       "--set", "worker.stages.split=[999]"],
                      timeout=60)
    assert r.returncode == 1
    assert "split" in r.stderr and "999" in r.stderr
    assert not out.exists() or not any(out.iterdir())      # nothing ran: no run directory
