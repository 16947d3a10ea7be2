"""The data path's public face (asgd.client.Exchange) as a user's own script holds it: built
from a model's parameters alone (the layout taken from the module), hello without arguments,
the same-host link asked of the client through methods, and a client that follows a server
to a new endpoint without being replaced."""
from __future__ import annotations

import pytest

import numpy as np
import torch
import torch.nn.functional as F

from asgd.client import Exchange, connect_client
from asgd.config import load_config
from asgd.tasks.task import build_task

SGD = {"optimizer": {"name": "sgd", "lr": 0.1},
       "schedule": {"kind": "constant", "warmup": 0}}


@pytest.mark.slow
def test_an_exchange_from_the_parameters_alone(start_server, make_config, clients, tmp_path):
    config = make_config(**SGD)
    server = start_server(config, bind=f"ipc://{tmp_path}/s.sock")
    task = build_task(load_config(config))
    client = connect_client(server.endpoint, "w0")
    observer = clients(server.endpoint, "observer")
    try:
        ex = Exchange(task.model, None, client, torch.device("cpu"))   # the module's layout
        assert client.memory() is ex.segment is not None     # offered before the hello
        info = ex.connect()
        assert client.transport == ex.transport == "shm" and info["version"] == 0
        assert client.base() == 0 and client.parts(task.layout.numel) == [(0, task.layout.numel)]
        x, y = task.dataset.x_train[:16], task.dataset.y_train[:16]
        for _ in range(2):
            ex.zero_grad()
            F.cross_entropy(task.model(x), y).backward()
            ex.exchange(ex.gradient())
        assert ex.version == client.base() == 2
        server_w = np.empty(task.layout.numel, np.float32)
        assert observer.pull_flat(server_w) == 2
        mine = torch.cat([p.detach().reshape(-1) for p in task.model.parameters()])
        assert np.array_equal(mine.numpy(), server_w)
        # the same client moves to "another" endpoint (here the same server under another
        # spelling): the next request is a hello, and the segment is offered anew
        old = ex.segment
        client.reconnect(f"ipc://{tmp_path}/./s.sock")     # short: a unix path has 107 bytes
        ex.connect()
        assert ex.transport == "shm" and ex.segment is not old and ex.version == 2
        ex.close()
        assert client.memory() is None and client.transport == "frames"
    finally:
        client.close()
