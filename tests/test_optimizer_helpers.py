"""What a script gets from asgd without a server: the optimizer standalone (the script's own
single-process reference), its settings, the helpers (rank, workers, shard, load), and a
package whose public names load lazily."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import asgd
from asgd.api import local_rank, rank, workers
from asgd.core.checkpoint import write_checkpoint
from asgd.core.layout import ParameterLayout, TensorSpec
from asgd.core.optim import scheduled_lr
from asgd.optimizer_config import first_difference, resolve


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))


def loss_of(model, seed):
    g = torch.Generator().manual_seed(seed)
    return model(torch.randn(8, 6, generator=g)).pow(2).mean()


def test_public_names_load_lazily():
    code = ("import sys, asgd, asgd.cli; assert 'torch' not in sys.modules, 'torch loaded'; "
            "asgd.Optimizer; asgd.shard; assert 'torch' in sys.modules; print(asgd.__all__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Optimizer" in out.stdout and "load" in out.stdout
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        asgd.nope


def test_standalone_is_the_named_optimizer_with_its_schedule(monkeypatch):
    """No server: AdamW with a cosine schedule and a budget steps in this process, as
    torch.optim.AdamW with the same rates set by hand."""
    monkeypatch.delenv("ASGD_SERVER", raising=False)
    monkeypatch.delenv("ASGD_RUN_DIR", raising=False)
    a, b = net(), net()
    opt = asgd.Optimizer(a.parameters(), optimizer="adamw", lr=0.01, schedule="cosine",
                         warmup=3, max_updates=12, min_lr=0.001)
    ref = torch.optim.AdamW(b.parameters(), lr=0.01)
    assert opt.transport == "standalone" and opt.lr == pytest.approx(0.01 / 3)
    step = 0
    while not opt.done:
        for g in ref.param_groups:
            g["lr"] = scheduled_lr(opt.server_cfg, step)
        for model, o in ((a, opt), (b, ref)):
            o.zero_grad()
            loss_of(model, step).backward()
            o.step()
        step += 1
    assert step == 12 and opt.version == 12
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-7)
    opt.close()


def test_standalone_local_steps_is_the_inner_optimizer_and_state_round_trips(monkeypatch):
    monkeypatch.delenv("ASGD_SERVER", raising=False)
    a = net()
    inner = torch.optim.Adam(a.parameters(), lr=0.01)
    opt = asgd.Optimizer(a.parameters(), inner=inner, local_steps=4)
    assert opt.param_groups is inner.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for i in range(8):
        opt.zero_grad()
        loss_of(a, i).backward()
        opt.step()
        sched.step()
    assert opt.version == 2 and opt.steps == 8
    assert inner.param_groups[0]["lr"] == pytest.approx(0.01 / 16)
    state = opt.state_dict()
    b = net()
    again = asgd.Optimizer(b.parameters(), inner=torch.optim.Adam(b.parameters(), lr=0.01),
                           local_steps=4)
    again.load_state_dict(state)
    assert again.steps == 8 and again.inner.state_dict()["state"][0]["step"] == 8
    with pytest.raises(ValueError, match="a state of local mode, this optimizer is in asgd"):
        asgd.Optimizer(b.parameters(), optimizer="sgd").load_state_dict(state)


def test_standalone_refuses_a_scheduler_and_skips_a_nonfinite_gradient(monkeypatch):
    monkeypatch.delenv("ASGD_SERVER", raising=False)
    a = net()
    opt = asgd.Optimizer(a.parameters(), optimizer="sgd", lr=0.1)
    opt.param_groups[0]["lr"] = 0.5            # what a scheduler or a hand-made decay does
    with pytest.raises(RuntimeError, match=r"changed from 0.1 to 0.5.*schedule="):
        opt.step()
    opt.param_groups[0]["lr"] = 0.1
    before = [p.detach().clone() for p in a.parameters()]
    opt.zero_grad()
    (loss_of(a, 0) * float("nan")).backward()
    opt.step()
    assert opt.version == 0
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))


def test_settings_say_what_the_script_gave():
    asgd_mode = resolve({"optimizer": "adamw", "lr": 3e-4}).settings
    assert asgd_mode == {"local_steps": 1, "optimizer": {
        "name": "adamw", "lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8,
        "weight_decay": 0.01}}                  # torch's AdamW defaults; no schedule given
    given = resolve({"optimizer": "sgd", "schedule": "cosine", "max_updates": 100}).settings
    # a cosine decays to 0, as torch's CosineAnnealingLR (not the built-in loop's floor)
    assert given["schedule"] == {"kind": "cosine", "warmup": 0, "total": 0, "min_lr": 0.0}
    assert given["max_updates"] == 100
    deltas = resolve({"local_steps": 1}, inner=True).settings
    assert deltas["optimizer"]["name"] == "sgd" and deltas["optimizer"]["lr"] == 1.0
    diloco = resolve({"local_steps": 8, "outer_lr": 0.7}, inner=True).settings
    assert diloco["local_steps"] == 8 and diloco["outer"]["lr"] == 0.7
    assert "optimizer" not in diloco
    assert first_difference(asgd_mode, {"optimizer": {"lr": 3e-4, "betas": [0.9, 0.999]},
                                        "schedule": {"kind": "cosine"}}) is None
    assert first_difference(asgd_mode, {"optimizer": {"name": "adam"}}) == \
        ("optimizer.name", "adamw", "adam")
    with pytest.raises(TypeError, match="unknown keyword lrr"):
        resolve({"lrr": 0.1})
    with pytest.raises(TypeError, match="unknown keyword log_every"):   # opt.log() is the call
        resolve({"log_every": 10})


def test_the_server_and_its_address_files_from_the_environment(tmp_path):
    """asgd launch sets both $ASGD_SERVER and $ASGD_SERVER_FILE: the files come back too, to
    follow a server restarted elsewhere; server= given is that server alone."""
    from asgd.api import server

    addr = tmp_path / "server.addr"
    addr.write_text("tcp://127.0.0.1:6001\n")
    both = {"ASGD_SERVER": "tcp://127.0.0.1:6000", "ASGD_SERVER_FILE": str(addr)}
    assert server(None, 1.0, both) == ("tcp://127.0.0.1:6000", [str(addr)])
    assert server(None, 1.0, {"ASGD_SERVER_FILE": str(addr)}) == \
        ("tcp://127.0.0.1:6001", [str(addr)])
    assert server("tcp://h:1", 1.0, both) == ("tcp://h:1", [])
    assert server(None, 1.0, {}) == (None, [])


def test_rank_workers_and_shard_from_the_environment():
    assert (rank({}), workers({}), local_rank({})) == (0, 1, 0)
    assert (rank({"ASGD_RANK": "2"}), workers({"ASGD_WORKERS": "3"})) == (2, 3)
    slurm = {"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1"}
    assert (rank(slurm), workers(slurm), local_rank(slurm)) == (1, 4, 1)
    torchrun = {"RANK": "3", "WORLD_SIZE": "5", "LOCAL_RANK": "0"}
    assert (rank(torchrun), workers(torchrun), local_rank(torchrun)) == (3, 5, 0)
    assert rank({"ASGD_RANK": "1", "RANK": "3"}) == 1
    parts = [asgd.shard(list(range(10)), r, 3) for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    ds = torch.utils.data.TensorDataset(torch.arange(10.0))
    sub = asgd.shard(ds, 1, 2)
    assert isinstance(sub, torch.utils.data.Subset) and [x.item() for (x,) in sub] == \
        [5.0, 6.0, 7.0, 8.0, 9.0]
    t = torch.arange(7)
    assert torch.equal(asgd.shard(t, 0, 2), t[:3])
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, 2\)"):
        asgd.shard(t, 2, 2)


def test_load_by_name_and_by_position(tmp_path):
    src = net()
    named = ParameterLayout.from_model(src)
    flat = named.flatten(list(src.parameters()))
    write_checkpoint(tmp_path / "run" / "checkpoint", 7, named, flat, {}, "adam")
    dst = net()
    for p in dst.parameters():
        torch.nn.init.zeros_(p)
    assert asgd.load(tmp_path / "run", dst) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert all(torch.equal(p, q) for p, q in zip(src.parameters(), dst.parameters()))
    # given as model.parameters(), the optimizer names them by position
    positional = ParameterLayout(TensorSpec(f"param.{i}", s.dtype, s.shape)
                                 for i, s in enumerate(named.specs))
    write_checkpoint(tmp_path / "pos", 7, positional, flat, {}, "adam")
    dst2 = net()
    asgd.load(tmp_path / "pos", dst2)
    assert all(torch.equal(p, q) for p, q in zip(src.parameters(), dst2.parameters()))
    other = torch.nn.Linear(6, 2)
    with pytest.raises(ValueError, match="does not fit this model.*not in the model"):
        asgd.load(tmp_path / "run", other)
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        asgd.load(tmp_path, other)


def test_a_launched_script_takes_the_data_path_keys_of_the_run_config(tmp_path, monkeypatch):
    """$ASGD_CONFIG (asgd launch SCRIPT) gives the worker.* keys their defaults; a keyword
    still wins, and the config's optimizer and schedule are not sent (they are the
    server's own)."""
    path = tmp_path / "config.yaml"
    path.write_text("worker:\n  encoding: fp16\n  overlap: true\nschedule:\n  kind: step\n")
    monkeypatch.setenv("ASGD_CONFIG", str(path))
    r = resolve({"optimizer": "sgd", "overlap": False})
    assert (r.cfg.worker.exchange.encoding, r.cfg.worker.exchange.overlap) == ("fp16", False)
    assert "schedule" not in r.settings
    path.write_text("worker:\n  encoding: zip\n")
    with pytest.raises(ValueError, match="ASGD_CONFIG=.*worker.exchange.encoding"):
        resolve({})
