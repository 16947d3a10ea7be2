"""The parameter-server process: a ROUTER socket around ServerCore.

    python -m server --config configs/default.yaml --bind tcp://127.0.0.1:5555
    asgd server --config configs/default.yaml [--resume]

Binds to loopback unless told otherwise. Every receive is under a poll timeout, so signals and
periodic work (a ``server`` record in metrics.jsonl, periodic checkpoints) are never starved.
SIGINT/SIGTERM stop the loop; the server then writes its checkpoint (atomically) and exits 0.
``--resume`` starts from that checkpoint with its version, weights and optimizer state.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

import click
import torch
import zmq

from asgd.config import Config, ConfigError, load_config
from asgd.metrics import MetricsWriter
from server.checkpoint import load_checkpoint, save_checkpoint
from server.core import ServerCore
from server.store import ParameterStore

log = logging.getLogger("asgd.server")

POLL_MS = 100
MAX_BATCH = 256   # requests handled per wake-up before periodic work gets a turn


def build_store(cfg: Config) -> ParameterStore:
    """The store with the model's initial weights (same seed as every worker)."""
    from asgd.data import load_dataset
    from asgd.models import build_model

    ds = load_dataset(cfg.data, seed=cfg.run.seed)
    model = build_model(cfg.model, ds.input_shape, ds.num_classes, seed=cfg.run.seed)
    return ParameterStore.from_model(model, cfg)


def resume_store(store: ParameterStore, checkpoint_dir: Path) -> None:
    ckpt = load_checkpoint(checkpoint_dir)
    if [(s["name"], list(s["shape"])) for s in ckpt.specs] != \
            [(s["name"], list(s["shape"])) for s in store.specs]:
        raise click.ClickException(f"checkpoint {checkpoint_dir} holds a different model")
    store.load_weights(ckpt.flat, ckpt.version)
    store.load_optimizer_state(ckpt.optimizer_scalars, ckpt.optimizer_tensors)


class Server:
    def __init__(self, cfg: Config, bind: str, run_dir: Path | None = None,
                 checkpoint_dir: Path | None = None, resume: bool = False):
        self.cfg = cfg
        self.run_dir = run_dir
        self.checkpoint_dir = Path(checkpoint_dir or cfg.server.checkpoint_dir or
                                   (run_dir / "checkpoint" if run_dir else "checkpoint"))
        self.store = build_store(cfg)
        if resume:
            resume_store(self.store, self.checkpoint_dir)
            log.info("resumed from %s at version %d", self.checkpoint_dir, self.store.version)
        self.metrics = MetricsWriter(run_dir / "metrics.jsonl" if run_dir else None)
        self.core = ServerCore(self.store, cfg, metrics=self.metrics)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.bind(bind)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.stopping = False
        self._last_checkpoint_version = self.store.version

    def request_stop(self, *_):
        self.stopping = True

    def serve(self, max_seconds: float | None = None) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        every = self.cfg.server.stats_every_s
        next_stats = time.monotonic() + every
        deadline = time.monotonic() + max_seconds if max_seconds else None
        while not self.stopping:
            if deadline and time.monotonic() > deadline:
                break
            if poller.poll(POLL_MS):
                for _ in range(MAX_BATCH):
                    try:
                        frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._serve_one(frames)
            for identity, reply in self.core.tick():
                self._send(identity, reply)
            now = time.monotonic()
            if now >= next_stats:
                next_stats = now + every
                self._record_stats()
            ce = self.cfg.server.checkpoint_every
            if ce and self.store.version - self._last_checkpoint_version >= ce:
                self.checkpoint()

    def _serve_one(self, frames) -> None:
        identity, request = frames[0].bytes, frames[1:]
        for peer, reply in self.core.handle(identity, request):
            self._send(peer, reply)

    def _send(self, identity: bytes, reply: list) -> None:
        try:
            self.sock.send_multipart([identity, *reply], copy=False)
        except zmq.ZMQError as e:  # the peer is gone: nothing to do
            log.warning("reply not sent: %s", e)

    def _record_stats(self) -> None:
        s = self.core.stats()
        self.metrics.write("server", version=s["version"], updates_applied=s["updates_applied"],
                           updates_dropped=s["updates_dropped"],
                           staleness_mean=s["staleness_mean"], staleness_max=s["staleness_max"],
                           bytes_in=s["bytes_in"], bytes_out=s["bytes_out"],
                           workers=len(s["workers"]))

    def checkpoint(self) -> Path:
        path = save_checkpoint(self.store, self.checkpoint_dir)
        self._last_checkpoint_version = self.store.version
        return path

    def close(self) -> None:
        try:
            path = self.checkpoint()
            log.info("checkpoint at version %d written to %s", self.store.version, path)
        finally:
            self._record_stats()
            self.metrics.close()
            self.sock.close(0)
            self.ctx.term()


def write_address(path: Path, endpoint: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(endpoint + "\n")
    os.replace(tmp, path)


@click.command("server")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), required=True,
              help="YAML run configuration.")
@click.option("--bind", default=None, help="ZeroMQ endpoint to bind (default: server.bind, "
              "loopback). Use tcp://0.0.0.0:5555 to serve other machines; port 0 picks one.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key (repeatable).")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Write metrics.jsonl and the checkpoint here.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None,
              help="Where the checkpoint lives (default: <run-dir>/checkpoint).")
@click.option("--resume", is_flag=True, help="Start from the checkpoint, keeping its version.")
@click.option("--address-file", type=click.Path(dir_okay=False), default=None,
              help="Write the bound endpoint to this file once listening.")
def main(config_path, bind, overrides, run_dir, checkpoint_dir, resume, address_file):
    """Run one parameter server."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s server %(levelname)s %(message)s")
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as e:
        raise click.ClickException(str(e))
    torch.set_num_threads(cfg.server.threads)
    bind = bind or cfg.server.bind
    if bind.startswith("tcp://") and bind.endswith(":0"):
        bind = bind[:-2] + ":*"   # ZeroMQ's spelling of "any free port"
    try:
        server = Server(cfg, bind, Path(run_dir) if run_dir else None,
                        Path(checkpoint_dir) if checkpoint_dir else None, resume)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e))
    except zmq.ZMQError as e:
        raise click.ClickException(f"cannot bind {bind}: {e}")
    signal.signal(signal.SIGTERM, server.request_stop)
    signal.signal(signal.SIGINT, server.request_stop)
    if address_file:
        write_address(Path(address_file), server.endpoint)
    log.info("serving %d parameters (%d tensors) at %s, version %d",
             server.store.numel, len(server.store.specs), server.endpoint, server.store.version)
    try:
        server.serve()
    finally:
        server.close()
    sys.exit(0)
