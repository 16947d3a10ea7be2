"""The ``worker`` section and the sub-sections it owns: ``worker.exchange`` (the data path),
``worker.stages`` (inside the node), ``worker.straggler`` (slowed ranks, for experiments) and
``worker.auth`` (CURVE).

    cfg.worker.exchange.overlap      # False
    cfg.worker.stages.devices        # None: the whole model on worker.device
    cfg.worker.straggler.factor      # 1.0

Each dataclass owns its defaults and its ``check()``; the old flat keys (``worker.overlap``,
``worker.devices``, ``worker.slow_factor`` ...) are aliases (asgd.config.aliases).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from asgd.config.checks import check_resources, device_name_ok, need, need_one_of, section

SHARED_MEMORY = ("auto", "on", "off")
PRECISIONS = ("fp32", "fp16", "bf16")
SPLITS = ("params", "time")


@dataclass(frozen=True)
class ExchangeConfig:
    # The data path (asgd.client.exchange): shared memory with a server on the same host (auto:
    # for loopback and ipc endpoints), overlap of the exchange with the next step's compute,
    # the wire encodings of gradients and weights across machines, and local steps.
    local_steps: int = 1          # steps with the worker's own optimizer (cfg.optimizer) before
                                  # pushing the pseudo-gradient (pulled - now); 1 is A-SGD
    shared_memory: str = "auto"   # auto | on | off
    overlap: bool = False         # compute step k+1 while step k's push travels (+1 staleness)
    encoding: str = "none"        # gradient: asgd.core.encoding.ENCODINGS (lossy: error feedback)
    topk_ratio: float = 0.01      # topk: the share of values sent
    weights_encoding: str = "none"   # weights back: asgd.core.encoding.WEIGHT_ENCODINGS
    push_retries: int = 2         # a push whose reply is late is sent again this many times
                                  # (same sequence number: applied once) before a new hello

    def check(self) -> None:
        from asgd.core.encoding import ENCODINGS, WEIGHT_ENCODINGS

        need(self.local_steps >= 1, "worker.exchange.local_steps", "must be >= 1")
        need(self.shared_memory in SHARED_MEMORY, "worker.exchange.shared_memory",
             f"must be auto, on or off, got {self.shared_memory!r}")
        need_one_of(self.encoding, ENCODINGS, "worker.exchange.encoding")
        need(0 < self.topk_ratio <= 1, "worker.exchange.topk_ratio", "must be in (0, 1]")
        need_one_of(self.weights_encoding, WEIGHT_ENCODINGS,
                    "worker.exchange.weights_encoding")
        need(self.push_retries >= 0, "worker.exchange.push_retries", "must be >= 0")


@dataclass(frozen=True)
class StagesConfig:
    # Inside the node (worker/stages.py, worker/precision.py; docs/node.md): the model split
    # into consecutive stages, one per device, run as a pipeline over micro-batches, in mixed
    # precision, with recompute or offloaded activations. None of it is used when unset.
    devices: Optional[list] = None      # one stage per device, e.g. [cpu, cpu] or [cuda:0, cuda:1]
    split: Union[str, list] = "params"  # params | time | [i, j, ...]: stage boundaries
    microbatches: int = 1         # GPipe: micro-batches per batch (same gradient)
    precision: str = "fp32"       # fp32 | fp16 (with a loss scaler) | bf16: autocast forward
    recompute: bool = False       # activation checkpointing per stage
    offload_activations: bool = False   # saved activations in (pinned) host memory

    def check(self) -> None:
        """What can be checked without the model (asgd.tasks.layers.check_split does the rest)."""
        need(self.devices is None or (len(self.devices) >= 1 and
                                      all(device_name_ok(d) for d in self.devices)),
             "worker.stages.devices", "must be null or a non-empty list of devices (cpu, "
             f"cuda:N, cuda:{{local_rank}}), got {self.devices!r}")
        if isinstance(self.split, str):
            need(self.split in SPLITS, "worker.stages.split",
                 f"must be params, time or a list of split points, got {self.split!r}")
        else:
            points = self.split
            need(all(isinstance(i, int) and not isinstance(i, bool) for i in points),
                 "worker.stages.split", f"split points must be integers, got {points!r}")
            need(all(a < b for a, b in zip(points, points[1:])) and all(i > 0 for i in points),
                 "worker.stages.split", f"split points must be increasing and > 0, got {points!r}")
            stages = len(self.devices) if self.devices else 1
            need(len(points) == stages - 1, "worker.stages.split",
                 f"{len(points)} split points make {len(points) + 1} stages but "
                 f"worker.stages.devices names {stages}")
        need(self.microbatches >= 1, "worker.stages.microbatches", "must be >= 1")
        need_one_of(self.precision, PRECISIONS, "worker.stages.precision")


@dataclass(frozen=True)
class StragglerConfig:
    # Straggler simulation, for experiments (asgd.tasks.straggler): each step of a slowed rank
    # (gradient and exchange) takes factor times as long (by sleeping), plus delay_s seconds.
    factor: float = 1.0
    delay_s: float = 0.0
    ranks: Optional[list] = None  # ranks slowed (null = every rank)

    def check(self) -> None:
        need(self.factor >= 1.0, "worker.straggler.factor", "must be >= 1")
        need(self.delay_s >= 0, "worker.straggler.delay_s", "must be >= 0")
        need(self.ranks is None or all(isinstance(r, int) and not isinstance(r, bool) and r >= 0
                                       for r in self.ranks),
             "worker.straggler.ranks", "must be null or a list of ranks")


@dataclass(frozen=True)
class WorkerAuthConfig:
    # CURVE (server.auth.mode: curve): both set, or neither. {id} in the file name is the
    # worker id.
    secret_key_file: str = ""     # this worker's NAME.key_secret
    server_key: str = ""          # the server's public key: its .key file or the Z85 text

    def check(self) -> None:
        """Nothing to check without the files: both keys or neither, and whether they can be
        read, are checked where they are read (asgd.core.auth.client_keys), which a worker
        reports with exit 2 before it trains (docs/reliability.md)."""


@dataclass(frozen=True)
class WorkerConfig:
    batch_size: int = 100
    # the run's batch split among its built-in workers: each of n = run.workers takes
    # batch_size / (n - 1) a step, and the settings counted in updates are scaled to keep
    # counting the same samples (asgd.config.split_batch); false: batch_size each
    batch_split: bool = True
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    threads: int = 1              # torch.set_num_threads for each worker process
    request_timeout_s: float = 30.0   # longer than server.worker_timeout_s: ssp/sync hold replies
    reconnect_timeout_s: float = 30.0   # give up after the server is gone this long
    log_every: int = 10           # a worker_step record every N steps
    spin_us: float = 200.0        # poll for a reply this long before sleeping (no wake-up)
    max_steps: int = 0            # per-worker step budget (0 = none)
    exchange: ExchangeConfig = section(ExchangeConfig)
    stages: StagesConfig = section(StagesConfig)
    straggler: StragglerConfig = section(StragglerConfig)
    auth: WorkerAuthConfig = section(WorkerAuthConfig)
    # asgd launch --on ray: each worker's bundle in the workers' placement group, e.g.
    # {CPU: 2} or {GPU: 1, memory: 4000000000} (bytes; {} = one GPU for a CUDA device, else
    # one CPU)
    resources: dict = field(default_factory=dict)

    def check(self) -> None:
        need(self.batch_size >= 1, "worker.batch_size", "must be >= 1")
        need(device_name_ok(self.device, auto=True), "worker.device",
             f"must be auto, cpu, cuda, cuda:N or cuda:{{local_rank}}, got {self.device!r}")
        need(self.threads >= 1, "worker.threads", "must be >= 1")
        need(self.request_timeout_s > 0, "worker.request_timeout_s", "must be > 0")
        need(self.reconnect_timeout_s > 0, "worker.reconnect_timeout_s", "must be > 0")
        need(self.log_every >= 1, "worker.log_every", "must be >= 1")
        need(0 <= self.spin_us <= 100_000, "worker.spin_us", "must be in [0, 100000]")
        need(self.max_steps >= 0, "worker.max_steps", "must be >= 0")
        self.straggler.check()
        self.stages.check()
        self.exchange.check()
        self.auth.check()
        # across sub-sections
        s = self.stages
        need(s.microbatches <= self.batch_size, "worker.stages.microbatches",
             f"{s.microbatches} micro-batches need worker.batch_size >= {s.microbatches}")
        need(s.precision != "fp16" or self.exchange.local_steps == 1, "worker.stages.precision",
             "fp16 (with its loss scaler) needs worker.exchange.local_steps = 1")
        check_resources("worker.resources", self.resources)
        need(not self.resources or any(v > 0 for v in self.resources.values()),
             "worker.resources",
             f"a worker's bundle must ask for some resource > 0, got {self.resources!r}")
