"""The worker's side of the data path (asgd.client.exchange) against a real server: flat gradient
buffers that autograd fills in place, shared memory or frames, the staged (GPU) code path run
on the CPU, overlap with one more step of staleness, and encodings with error feedback."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from asgd.config import load_config
from asgd.tasks.task import build_task
from asgd.client.exchange import Exchange

SGD = {"optimizer": {"name": "sgd", "lr": 0.1},
       "schedule": {"kind": "constant", "warmup": 0}}


def reference_gradient(model, x, y) -> torch.Tensor:
    m = copy.deepcopy(model)
    for p in m.parameters():
        p.grad = None
    F.cross_entropy(m(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in m.parameters()])


@pytest.mark.parametrize("shared_memory", ["on", "off"])
@pytest.mark.parametrize("staged", [False, True])
@pytest.mark.parametrize("overlap", [False, True])
def test_steps_push_autograds_gradient_and_load_the_servers_weights(
        start_server, make_config, clients, tmp_path, shared_memory, staged, overlap):
    config = make_config(**SGD)
    server = start_server(config, bind=f"ipc://{tmp_path}/s.sock")
    cfg = load_config(config)
    task = build_task(cfg)
    client = clients(server.endpoint, "w0")
    ex = Exchange(task.model, task.layout, client, torch.device("cpu"),
                  shared_memory=shared_memory, overlap=overlap, staged=staged)
    observer = clients(server.endpoint, "observer")
    try:
        ex.connect(lambda: client.hello(rank=0))
        assert ex.transport == ("shm" if shared_memory == "on" else "frames")
        if shared_memory == "on":      # mapped by both: its name is gone from /dev/shm
            assert ex.segment.unlinked and not ex.segment.path.exists()
        x, y = task.dataset.x_train[:32], task.dataset.y_train[:32]
        replies = []
        for step in range(4):
            expected = reference_gradient(task.model, x, y)
            ex.zero_grad()
            F.cross_entropy(task.model(x), y).backward()
            grad = ex.gradient()
            assert ex.finite(grad)
            assert torch.allclose(grad, expected, atol=1e-6)
            replies.append(ex.exchange(grad))
        ex.drain()
        direct = shared_memory == "on" and not staged and not overlap
        if direct:   # the parameters live where the server writes the weights: no copy
            seg_w = ex.segment.weights.ctypes.data
            assert all(seg_w <= p.data_ptr() < seg_w + 4 * task.layout.numel
                       for p in task.model.parameters())
        if shared_memory == "on":      # a hello again (a restarted server) offers a new one
            old = ex.segment.path
            ex.connect(lambda: client.hello(rank=0))
            assert ex.transport == "shm" and ex.segment.path != old
            if direct:                 # ... and the parameters moved into the new one
                assert task.model.parameters().__next__().data_ptr() == \
                    ex.segment.weights.ctypes.data
        server_w = np.empty(task.layout.numel, np.float32)
        version = observer.pull_flat(server_w)
        assert version == 4 and ex.version == 4
        mine = torch.cat([p.detach().reshape(-1) for p in task.model.parameters()])
        assert np.array_equal(mine.numpy(), server_w)        # the parameters hold them
        if overlap:   # each gradient was computed before the previous push came back
            assert replies[0] is None
            assert [r["staleness"] for r in replies[1:]] == [0, 1, 1]
        else:
            assert [r["staleness"] for r in replies] == [0, 0, 0, 0]
    finally:
        ex.close()
    # closed: the parameters are in the worker's own memory again, with the same values
    after = torch.cat([p.detach().reshape(-1) for p in task.model.parameters()])
    assert np.array_equal(after.numpy(), server_w)


@pytest.mark.slow
def test_topk_with_error_feedback_sends_a_fraction_and_loses_nothing(
        start_server, make_config, clients, tmp_path):
    config = make_config(**SGD, model={"name": "cnn1d", "args": {"channels": 48}})
    server = start_server(config)
    cfg = load_config(config)
    task = build_task(cfg)
    client = clients(server.endpoint, "w0")
    ex = Exchange(task.model, task.layout, client, torch.device("cpu"), encoding="topk",
                  encoding_args={"topk_ratio": 0.05}, shared_memory="off")
    try:
        ex.connect(lambda: client.hello(rank=0))
        assert ex.transport == "frames"
        g = torch.linspace(-1, 1, task.layout.numel)
        start = torch.cat([p.detach().reshape(-1) for p in task.model.parameters()]).clone()
        sent = client.bytes_sent
        for _ in range(30):
            ex.exchange(g.clone())
        per_push = (client.bytes_sent - sent) / 30
        assert per_push < task.layout.numel * 4 * 0.12, per_push
        moved = start - torch.cat([p.detach().reshape(-1) for p in task.model.parameters()])
        # what was applied plus what is still owed adds up to every gradient sent (lr 0.1)
        owed = ex.feedback[0].residual
        assert torch.allclose(moved / 0.1 + owed, 30 * g, atol=1e-3)
    finally:
        ex.close()


@pytest.mark.slow
def test_local_steps_push_the_distance_travelled(start_server, make_config, clients):
    """With local steps the worker's own optimizer moves its weights for H steps; what it
    pushes is the weights it pulled minus its weights now, and the server (outer SGD at rate
    1, no momentum) then lands exactly where the worker got to."""
    from worker.train import Worker

    config = make_config(worker={"local_steps": 3},
                         server={"policy": "none", "max_staleness": None, "outer_lr": 1.0,
                                 "outer_momentum": 0.0, "outer_nesterov": False},
                         run={"workers": 1, "max_updates": 5})
    server = start_server(config)
    cfg = load_config(config)
    w = Worker(cfg, server.endpoint, rank=0)
    try:
        w.connect()
        start = w.ex.weights.clone()
        loss, samples, delta = w.step()
        assert samples == 3 * cfg.worker.batch_size
        moved = w.ex.weights.clone()
        assert torch.allclose(delta, start - moved) and delta.abs().sum() > 0
        reply = w.ex.exchange(delta)
        assert reply["version"] == 1 and reply["applied"]
        assert torch.allclose(w.ex.weights, moved, atol=1e-6)
    finally:
        w.close()


def test_an_unused_parameter_pushes_zeros_and_gradients_keep_their_shapes():
    """No server needed: the flat buffers and the views autograd fills."""
    from asgd.client import Client
    from asgd.core.layout import ParameterLayout

    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(1, 3, 3)
            self.unused = torch.nn.Linear(4, 2)
            self.head = torch.nn.Linear(3 * 6, 2)

        def forward(self, x):
            return self.head(self.conv(x[:, None]).relu().flatten(1))

    torch.manual_seed(0)
    model = TwoHeads()
    layout = ParameterLayout.from_model(model)
    with Client("tcp://10.255.255.1:9", "w0") as client:     # never contacted
        ex = Exchange(model, layout, client, torch.device("cpu"), shared_memory="off",
                      staged=True)
        x, y = torch.randn(5, 8), torch.tensor([0, 1, 0, 1, 1])
        expected = []
        ref = copy.deepcopy(model)
        F.cross_entropy(ref(x), y).backward()
        for p in ref.parameters():
            expected.append(torch.zeros_like(p) if p.grad is None else p.grad)
        for _ in range(2):                                   # the second step reuses buffers
            ex.zero_grad()
            F.cross_entropy(model(x), y).backward()
            grad = ex.gradient()
            assert torch.allclose(grad, torch.cat([e.reshape(-1) for e in expected]))
            for p in model.parameters():
                assert p.grad.shape == p.shape
            ex.slot ^= 1
        ex.close()


@pytest.mark.slow
@pytest.mark.parametrize("shared_memory", ["on", "off"])
def test_a_push_whose_reply_is_late_is_sent_again_and_applied_once(
        start_server, make_config, clients, tmp_path, shared_memory):
    """The server stops (SIGSTOP) for longer than the worker's timeout: the worker sends the
    same push again on a fresh socket; once the server goes on it applies the first copy and
    answers the second from memory."""
    import os
    import signal
    import threading

    config = make_config(**SGD)
    server = start_server(config, bind=f"ipc://{tmp_path}/s.sock")
    task = build_task(load_config(config))
    client = clients(server.endpoint, "w0", timeout_s=1.0)
    ex = Exchange(task.model, task.layout, client, torch.device("cpu"),
                  shared_memory=shared_memory, retries=3)
    observer = clients(server.endpoint, "observer")
    try:
        ex.connect(lambda: client.hello(rank=0))
        x, y = task.dataset.x_train[:32], task.dataset.y_train[:32]
        ex.zero_grad()
        F.cross_entropy(task.model(x), y).backward()
        grad = ex.gradient()
        os.kill(server.popen.pid, signal.SIGSTOP)
        timer = threading.Timer(1.6, os.kill, (server.popen.pid, signal.SIGCONT))
        timer.start()
        try:
            reply = ex.exchange(grad)
        finally:
            timer.join()
            os.kill(server.popen.pid, signal.SIGCONT)
        assert ex.resent >= 1
        assert reply["version"] == 1 and reply["applied"] is True
        stats = observer.stats()
        assert stats["version"] == 1 and stats["updates_applied"] == 1
        assert stats["workers"]["w0"]["pushes"] == 1
        # Over ZeroMQ the first copy waits in the server's socket and is applied, the second
        # answered from memory. Over the local socket the worker's reconnect closes that
        # connection: the first copy goes with it unless the server read it first.
        assert stats["repeats"] in ((1,) if shared_memory == "off" else (0, 1))
        server_w = np.empty(task.layout.numel, np.float32)
        observer.pull_flat(server_w)
        mine = torch.cat([p.detach().reshape(-1) for p in task.model.parameters()])
        assert np.array_equal(mine.numpy(), server_w)
    finally:
        ex.close()


@pytest.mark.slow
@pytest.mark.parametrize("shared_memory", ["on", "off"])
def test_a_model_in_parts_exchanges_like_a_whole_one(start_server, make_config, clients,
                                                     tmp_path, shared_memory):
    """The buffers of a model split over devices (one part per stage's run of parameters),
    run on the CPU: gradients and weights are those of the whole model, and the local-steps
    delta is taken part by part."""
    from asgd.client.buffers import Spread

    config = make_config(**SGD)
    server = start_server(config, bind=f"ipc://{tmp_path}/s.sock")
    task = build_task(load_config(config))
    n = len(list(task.model.parameters()))
    client = clients(server.endpoint, "w0")
    ex = Exchange(task.model, task.layout, client, torch.device("cpu"),
                  shared_memory=shared_memory, staged=True, parts=[3, n - 5, 2])
    observer = clients(server.endpoint, "observer")
    try:
        assert isinstance(ex.weights, Spread) and len(ex.weights.parts) == 3
        ex.connect(lambda: client.hello(rank=0))
        x, y = task.dataset.x_train[:32], task.dataset.y_train[:32]
        for _ in range(3):
            expected = reference_gradient(task.model, x, y)
            ex.zero_grad()
            F.cross_entropy(task.model(x), y).backward()
            grad = ex.gradient()
            assert torch.allclose(grad, expected, atol=1e-6)
            ex.exchange(grad)
        server_w = np.empty(task.layout.numel, np.float32)
        assert observer.pull_flat(server_w) == 3 == ex.version
        mine = torch.cat([p.detach().reshape(-1) for p in task.model.parameters()])
        assert np.array_equal(mine.numpy(), server_w)
        anchor = ex.weights.clone()
        with torch.no_grad():
            for p in task.model.parameters():
                p.add_(0.5)
        assert torch.allclose(ex.delta(anchor), torch.full((task.layout.numel,), -0.5))
    finally:
        ex.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: stages on a GPU and "
                    "the CPU in one worker")
def test_a_worker_with_stages_on_a_gpu_and_the_cpu_trains(processes, make_config, tmp_path):
    import json

    cfg = make_config(worker={"devices": ["cuda:0", "cpu"], "microbatches": 2},
                      run={"max_updates": 300, "eval_every_s": 0, "name": "gpu-cpu",
                           "out_dir": str(tmp_path / "runs")})
    r = processes.run(["-m", "asgd.cli", "launch", "--config", str(cfg), "--quiet"],
                      timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((tmp_path / "runs" / "gpu-cpu" / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["test_accuracy"] > 0.3
