"""Wire benchmark: push_pull round trips through a real server against raw ZeroMQ.

    python bench/wire.py [--params 4000000] [--tensors 8] [--rounds 30] [--repeats 5]

Starts a real server process (``python -m server``, SGD, policy none) on loopback with a model
of the given size (an MLP sized to about --params float32 parameters), and measures, in the
same run:
  * ``asgd``: Client.push_pull of a full gradient and the weights back (codec, validation,
    optimizer step, snapshot, reply), seconds a round trip;
  * ``raw_zmq``: the reference, a DEALER/ROUTER echo of the same bytes (same frame count)
    between two processes, no codec and no optimizer.
Prints one JSON object: medians over repeats, MB/s of payload each way, and the ratio
asgd / raw_zmq (how much the protocol and the update add to moving the bytes).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
import zmq

from asgd.client import Client
from asgd.launch.processes import spawn, stop, wait_for_address

ECHO = r"""
import sys, zmq
from asgd.launch.processes import write_address
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.linger = 0
s.bind("tcp://127.0.0.1:*"); write_address(sys.argv[1], s.getsockopt_string(zmq.LAST_ENDPOINT))
while True:
    frames = s.recv_multipart(copy=False)
    if len(frames) == 2 and frames[1].bytes == b"stop":
        break
    s.send_multipart(frames, copy=False)
"""


def start_server(cfg: dict, tmp: Path):
    path = tmp / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    addr = tmp / "addr"
    p = spawn("server", ["-m", "server", "--config", str(path), "--bind", "tcp://127.0.0.1:0",
                         "--address-file", str(addr), "--checkpoint-dir", str(tmp / "ckpt")],
              tmp / "server.log")
    return p, wait_for_address(addr, p, 120)


def start_echo(tmp: Path, k: int):
    addr = tmp / f"echo-{k}.addr"
    p = spawn("echo", ["-c", ECHO, str(addr)], None)
    return p, wait_for_address(addr, p, 60)


def time_asgd(endpoint: str, rounds: int) -> float:
    client = Client(endpoint, "bench", timeout_s=60)
    info, weights = client.hello()
    grads = [(t.name, np.full(t.array.shape, 1e-4, np.float32)) for t in weights]
    version = info["version"]
    head, _ = client.push_pull(version, grads)  # warm-up
    version = head["version"]
    t = time.perf_counter()
    for _ in range(rounds):
        head, weights = client.push_pull(version, grads)
        version = head["version"]
    elapsed = (time.perf_counter() - t) / rounds
    client.close()
    return elapsed


def time_raw(endpoint: str, arrays: list, rounds: int) -> float:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.linger = 0
    s.connect(endpoint)
    frames = [b"header"] + [memoryview(a).cast("B") for a in arrays]
    s.send_multipart(frames, copy=False)
    assert s.poll(60000)
    s.recv_multipart(copy=False)
    t = time.perf_counter()
    for _ in range(rounds):
        s.send_multipart(frames, copy=False)
        assert s.poll(60000)
        s.recv_multipart(copy=False)
    elapsed = (time.perf_counter() - t) / rounds
    s.send_multipart([b"stop"])
    s.close(0)
    return elapsed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=int, default=4_000_000)
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    # an MLP whose hidden layers make up about --params parameters; input 64, 10 classes
    layers = max(1, args.tensors // 2 - 1)
    hidden = int((args.params / max(layers - 1, 1)) ** 0.5)   # (layers - 1) h x h matrices
    cfg = {"model": {"name": "mlp", "args": {"hidden": [hidden] * layers}},
           "data": {"name": "synthetic", "args": {"n_train": 256, "n_test": 64,
                                                  "shape": [64]}},
           "optimizer": {"name": "sgd", "lr": 0.01},
           "schedule": {"kind": "constant", "warmup": 0},
           "server": {"max_message_mb": 4096}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        server, endpoint = start_server(cfg, tmp)
        echo, echo_endpoint = start_echo(tmp, 0)
        try:
            probe = Client(endpoint, "probe", timeout_s=60)
            info, weights = probe.hello()
            arrays = [np.ascontiguousarray(t.array) for t in weights]
            probe.close()
            nbytes = sum(a.nbytes for a in arrays)
            asgd_t, raw_t = [], []
            for k in range(args.repeats):   # interleaved, so both see the same machine load
                asgd_t.append(time_asgd(endpoint, args.rounds))
                raw_t.append(time_raw(echo_endpoint, arrays, args.rounds))
                # the echo server handles one client at a time; restart it for the next repeat
                stop([echo], grace_s=30)
                echo, echo_endpoint = start_echo(tmp, k + 1)
        finally:
            stop([server], grace_s=60)
            stop([echo], grace_s=5)
    a, r = statistics.median(asgd_t), statistics.median(raw_t)
    print(json.dumps({
        "benchmark": "wire_push_pull", "parameters": nbytes // 4, "tensors": len(arrays),
        "payload_mb_each_way": round(nbytes / 2**20, 2), "rounds": args.rounds,
        "repeats": args.repeats,
        "asgd_push_pull_s": {"median": round(a, 5), "all": [round(x, 5) for x in asgd_t]},
        "raw_zmq_echo_s": {"median": round(r, 5), "all": [round(x, 5) for x in raw_t]},
        "asgd_mb_per_s_each_way": round(nbytes / 2**20 / a, 1),
        "raw_mb_per_s_each_way": round(nbytes / 2**20 / r, 1),
        "ratio_asgd_over_raw": round(a / r, 3),
    }, indent=1))


if __name__ == "__main__":
    main()
