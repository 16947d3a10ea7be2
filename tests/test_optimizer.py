"""asgd.Optimizer against a real server process on loopback: with one worker and no staleness
its steps are torch.optim's, number for number.

Each test starts the server (tests/conftest.py) without a model, policy none and a constant
rate without warm-up: it learns the model and the optimizer's settings from the script's first
hello. The reference copy is taken after the optimizer connected, so both start from the
server's weights. (tests/test_optimizer_input.py also runs against a server with a model
named by import path.)
"""
from __future__ import annotations

import copy
import logging

from pathlib import Path

import pytest
import torch
import yaml

import asgd
from asgd.client import Client
from asgd.config import load_config
from tests.plugins.custom import tiny_linear

STEPS = 50
INPUT, CLASSES = 8, 3


def server_config(tmp_path, optimizer: dict, adopt: bool = True, **sections) -> Path:
    """A server config: no model of its own (``adopt``: it learns the script's from the
    first hello, as under asgd launch SCRIPT), else tiny_linear on 8 inputs by import path;
    ``optimizer``, a constant rate, policy none, one worker, no budget; ``sections`` merged
    in."""
    cfg = {"model": {"name": "" if adopt else "tests.plugins.custom:tiny_linear"},
           "data": {"name": ""} if adopt else
           {"name": "synthetic", "args": {"shape": [INPUT], "num_classes": CLASSES}},
           "optimizer": optimizer,
           "schedule": {"kind": "constant", "warmup": 0},
           "server": {"policy": "none", "max_staleness": None, "checkpoint_every_s": 0},
           "run": {"workers": 1, "max_updates": 0, "max_seconds": 600}}
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    load_config(path)
    return path


def model():
    return tiny_linear((INPUT,), CLASSES)


def batches(n: int = STEPS, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, INPUT, generator=g), torch.randint(0, CLASSES, (16,), generator=g))
            for _ in range(n)]


def train(net, opt, data, clip: float | None = None, scaler=None):
    for x, y in data:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()


def server_weights(endpoint: str) -> list[torch.Tensor]:
    with Client(endpoint, "observer", timeout_s=10) as c:
        _, tensors = c.pull()
    return [t.to_torch().clone() for t in tensors]


def assert_same(net, ref, what: str):
    for (name, a), b in zip(net.named_parameters(), ref.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), \
            f"{what}: {name} differs by {(a - b).abs().max().item():.3g}"


# ----------------------------------------------------------------------------------------------
# A-SGD: the server's optimizer is torch.optim's

CASES = {
    "sgd": ({"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True},
            dict(optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True),
            lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True)),
    "adam": ({"name": "adam", "lr": 0.01},
             dict(optimizer="adam", lr=0.01),
             lambda ps: torch.optim.Adam(ps, lr=0.01)),
    "adamw": ({"name": "adamw", "lr": 0.01, "weight_decay": 0.05},
              dict(optimizer="adamw", lr=0.01, weight_decay=0.05),
              lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.05)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_asgd_steps_equal_torch_optim(name, start_server, tmp_path):
    server_opt, kw, reference = CASES[name]
    server = start_server(server_config(tmp_path, server_opt))
    net = model()
    data = batches()
    with asgd.Optimizer(net.named_parameters(), server=server.endpoint, schedule="constant",
                        warmup=0, **kw) as opt:
        ref = copy.deepcopy(net)          # the server's weights, as the optimizer loaded them
        train(net, opt, data)
        assert opt.version == STEPS and opt.staleness == 0 and opt.applied
        assert opt.lr == pytest.approx(kw["lr"]) and not opt.done
        assert opt.param_groups[0]["lr"] == pytest.approx(kw["lr"])
    train(ref, reference(ref.parameters()), data)
    assert_same(net, ref, name)
    for a, b in zip(server_weights(server.endpoint), net.parameters()):
        assert torch.equal(a, b.detach()), "the parameters are not the server's weights"


# ----------------------------------------------------------------------------------------------
# local steps: the inner optimizer steps, the server's outer rule applies the pseudo-gradient

@pytest.mark.parametrize("h", [1, 4])
def test_local_steps_with_unit_outer_sgd_equal_the_inner_optimizer(h, start_server,
                                                                     tmp_path):
    """local_steps=1 pushes deltas the server adds (SGD at rate 1: BytePS's asynchronous
    mode); local_steps=4 pushes pseudo-gradients to an outer SGD of rate 1 without momentum.
    Either way one worker's weights are the inner optimizer's alone. A scheduler on the inner
    optimizer drives it as in any torch loop."""
    if h == 1:
        sections = {"optimizer": {"name": "sgd", "lr": 1.0}}
    else:
        sections = {"optimizer": {"name": "adam", "lr": 0.01},
                    "server": {"policy": "none", "max_staleness": None,
                               "outer_optimizer": "sgd", "outer_lr": 1.0,
                               "outer_momentum": 0.0, "outer_nesterov": False},
                    "worker": {"local_steps": h}}
    server = start_server(server_config(tmp_path, sections.pop("optimizer"), **sections))
    net, data = model(), batches(48)
    inner = torch.optim.AdamW(net.parameters(), lr=0.02)
    sched = torch.optim.lr_scheduler.StepLR(inner, step_size=10, gamma=0.5)
    outer = {} if h == 1 else dict(outer="sgd", outer_lr=1.0, outer_momentum=0.0,
                                   outer_nesterov=False)
    with asgd.Optimizer(net.named_parameters(), inner=inner, local_steps=h,
                        server=server.endpoint, **outer) as opt:
        ref = copy.deepcopy(net)
        for batch in data:
            train(net, opt, [batch])
            sched.step()
        assert opt.version == len(data) // h and opt.steps == len(data)
        assert opt.lr == pytest.approx(1.0)
    ref_inner = torch.optim.AdamW(ref.parameters(), lr=0.02)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_inner, step_size=10, gamma=0.5)
    for batch in data:
        train(ref, ref_inner, [batch])
        ref_sched.step()
    assert_same(net, ref, f"local_steps={h}")


def test_close_pushes_the_trailing_local_steps(start_server, tmp_path, caplog):
    """23 steps with local_steps=10: two pushes in the loop, the last 3 steps pushed by
    close(), so the server's weights are the 23rd step's (outer SGD at rate 1: exactly the
    inner optimizer's). A budget already spent pushes nothing more."""
    sections = {"server": {"policy": "none", "max_staleness": None, "outer_optimizer": "sgd",
                           "outer_lr": 1.0, "outer_momentum": 0.0, "outer_nesterov": False},
                "worker": {"local_steps": 10}}
    server = start_server(server_config(tmp_path, {"name": "adam", "lr": 0.01}, **sections))
    net, data = model(), batches(23)
    opt = asgd.Optimizer(net.named_parameters(), inner=torch.optim.SGD(net.parameters(),
                                                                       lr=0.1),
                         local_steps=10, server=server.endpoint)
    ref = copy.deepcopy(net)
    train(net, opt, data)
    assert opt.version == 2 and opt.steps == 23
    opt.close()
    assert opt.version == 3
    train(ref, torch.optim.SGD(ref.parameters(), lr=0.1), data)
    assert_same(net, ref, "23 local steps")
    for a, b in zip(server_weights(server.endpoint), ref.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), "the trailing steps are lost"
    opt.close()                                   # idempotent: nothing pushed again
    assert opt.version == 3

    # a script that ends without close(): the finalizer at exit says what was not pushed
    before = server_weights(server.endpoint)
    again = asgd.Optimizer(net.named_parameters(), inner=torch.optim.SGD(net.parameters(),
                                                                         lr=0.1),
                           local_steps=10, server=server.endpoint)
    train(net, again, data[:3])
    with caplog.at_level(logging.WARNING, logger="asgd.optimizer"):
        again._finalizer()                        # what runs at exit
    assert "the last 3 local steps were not pushed" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(server_weights(server.endpoint), before))

    # a budget of 2 updates, spent by the loop: close() pushes nothing
    server = start_server(server_config(tmp_path, {"name": "adam", "lr": 0.01},
                                        run={"max_updates": 2}, **sections))
    net = model()
    with asgd.Optimizer(net.named_parameters(), inner=torch.optim.SGD(net.parameters(),
                                                                      lr=0.1),
                        local_steps=10, server=server.endpoint) as opt:
        train(net, opt, data)
        assert opt.done and opt.version == 2
    assert opt.version == 2
    with Client(server.endpoint, "observer", timeout_s=10) as c:
        version, _ = c.pull()
    assert version == 2


# ----------------------------------------------------------------------------------------------
# clipping, GradScaler, frozen parameters, non-finite gradients

def test_clipping_and_grad_scaler_as_with_torch(start_server, tmp_path):
    """clip_grad_norm_ after scaler.unscale_(opt), then scaler.step(opt): the same weights as
    torch's SGD under the same scaler; a step whose gradient overflowed is skipped by the
    scaler and pushes nothing."""
    server = start_server(server_config(tmp_path, {"name": "sgd", "lr": 0.1,
                                                      "momentum": 0.9}))
    net, data = model(), batches(20)
    opt = asgd.Optimizer(net.named_parameters(), optimizer="sgd", lr=0.1, momentum=0.9,
                         server=server.endpoint)
    ref = copy.deepcopy(net)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    train(net, opt, data, clip=0.5, scaler=scaler)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    train(ref, torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), data, clip=0.5,
          scaler=ref_scaler)
    assert opt.version == len(data)
    assert_same(net, ref, "clipped and scaled")

    before = [p.detach().clone() for p in net.parameters()]
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(net(data[0][0]), data[0][1])
    scaler.scale(loss * float("inf")).backward()
    scaler.step(opt)           # found inf: opt.step() is not called
    scaler.update()
    assert opt.version == len(data)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    opt.close()


def test_frozen_parameters_stay_off_the_wire_and_nonfinite_is_not_pushed(
        start_server, tmp_path, caplog):
    server = start_server(server_config(tmp_path, {"name": "sgd", "lr": 0.1}))
    net = model()
    net[1].bias.requires_grad_(False)
    bias = net[1].bias.detach().clone()
    opt = asgd.Optimizer(net.named_parameters(), optimizer="sgd", lr=0.1,
                         server=server.endpoint)
    assert [t["name"] for t in opt.link.info["tensors"]] == ["1.weight"]
    x, y = batches(1)[0]
    train(net, opt, [(x, y)])
    assert opt.version == 1 and torch.equal(net[1].bias, bias)

    with caplog.at_level(logging.WARNING, logger="asgd.optimizer"):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        net[1].weight.grad[0, 0] = float("nan")
        opt.step()
    assert "non-finite gradient" in caplog.text
    assert opt.version == 1
    assert torch.equal(server_weights(server.endpoint)[0], net[1].weight.detach())
    train(net, opt, [(x, y)])
    assert opt.version == 2 and torch.isfinite(net[1].weight).all()
    opt.close()


def test_any_call_order_accumulation_and_closure(start_server, tmp_path):
    """backward before any zero_grad, zero_grad after step, two backward passes accumulated
    into one step, and step(closure): the same weights as torch's SGD in the same order, and
    the gradients still there after each step, as torch leaves them."""
    server = start_server(server_config(tmp_path, {"name": "sgd", "lr": 0.1, "momentum": 0.5}))
    net, data = model(), batches(12)
    opt = asgd.Optimizer(net.named_parameters(), optimizer="sgd", lr=0.1, momentum=0.5,
                         server=server.endpoint)
    ref = copy.deepcopy(net)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.5)

    def loop(m, o):
        losses = []
        for i in range(0, len(data), 2):
            for x, y in data[i:i + 2]:                    # accumulate two micro-batches
                torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
            losses.append([p.grad.clone() for p in m.parameters()])   # kept by the step
            o.zero_grad()                                  # after the step, not before
        x, y = data[0]

        def closure():
            o.zero_grad()
            loss = torch.nn.functional.cross_entropy(m(x), y)
            loss.backward()
            return loss
        losses.append(o.step(closure))
        return losses

    *grads, loss = loop(net, opt)
    *ref_grads, ref_loss = loop(ref, ref_opt)
    for a, b in zip(grads, ref_grads):
        assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in zip(a, b))
    assert opt.version == len(data) // 2 + 1
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    assert_same(net, ref, "call orders")
    opt.close()
