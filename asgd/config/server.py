"""The ``server`` section and the sub-sections it owns: ``server.auth`` (CURVE),
``server.spin`` (polling after a reply) and ``server.outer`` (the rule of local steps).

    cfg.server.spin.us          # 500.0
    cfg.server.auth.mode        # "none" | "curve"
    cfg.server.outer.lr         # 0.05: pseudo-gradients' rate (worker.exchange.local_steps > 1)

Each dataclass owns its defaults and its ``check()``; the old flat keys (``server.spin_us``,
``server.outer_lr``, ``server.auth: curve`` ...) are aliases (asgd.config.aliases).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from asgd.config.checks import check_resources, need, need_one_of, section

OUTER_OPTIMIZERS = ("sgd", "adam", "adamw")
AUTH_MODES = ("none", "curve")


@dataclass(frozen=True)
class ServerAuthConfig:
    # Authentication and encryption (asgd.core.auth, docs/reliability.md): curve = ZeroMQ
    # CURVE with this secret key, letting in only the public keys of allowed_keys (a NAME.key
    # file or a folder of them; NAME is the worker id the key may use).
    mode: str = "none"            # none | curve
    secret_key_file: str = ""     # the server's NAME.key_secret (asgd keys server)
    allowed_keys: str = ""        # the workers' public keys: a .key file or a folder

    def check(self) -> None:
        need_one_of(self.mode, AUTH_MODES, "server.auth.mode")


@dataclass(frozen=True)
class SpinConfig:
    # After a reply, poll for the next request this long before sleeping, but only when the
    # client just answered came back that fast last time: a client waiting on the server in
    # a loop then costs no wake-up, and workers that compute between pushes no spinning.
    # A shard of several without a core to spare does not poll at all (Server._spin_window).
    us: float = 500.0
    # ... and this long instead while the host has a core to spare for the server (the
    # workers on it, by shared memory, and the shards, no more than its cores): a worker's
    # step then finds the server awake, its caches warm, instead of waking it. 0: only us.
    spare_us: float = 5000.0

    def check(self) -> None:
        need(0 <= self.us <= 100_000, "server.spin.us", "must be in [0, 100000]")
        need(0 <= self.spare_us <= 100_000, "server.spin.spare_us", "must be in [0, 100000]")


@dataclass(frozen=True)
class OuterConfig:
    # The outer optimizer of local steps (worker.exchange.local_steps > 1, DiLoCo): applied to
    # each pushed pseudo-gradient, at a constant rate (times the staleness policy's scale).
    # DiLoCo's Nesterov SGD; its synchronous rate 0.7 diverges when every worker's
    # pseudo-gradient is applied on its own, 0.05 does not (docs/experiments.md).
    optimizer: str = "sgd"        # sgd | adam | adamw
    lr: float = 0.05
    momentum: float = 0.9         # sgd
    nesterov: bool = True         # sgd

    def check(self) -> None:
        need_one_of(self.optimizer, OUTER_OPTIMIZERS, "server.outer.optimizer")
        need(self.lr > 0, "server.outer.lr", "must be > 0")
        need(0 <= self.momentum < 1, "server.outer.momentum", "must be in [0, 1)")
        need(not self.nesterov or self.momentum > 0 or self.optimizer != "sgd",
             "server.outer.nesterov", "needs server.outer.momentum > 0")


@dataclass(frozen=True)
class ServerConfig:
    bind: str = "tcp://127.0.0.1:5555"
    # The default is robust to the number of workers (docs/experiments.md): the learning rate
    # scaled by 1/staleness, and pushes staler than 3 updates dropped (the worker pulls afresh).
    policy: str = "scale"         # none | max_staleness | scale | dc | ssp | sync | adaptive |
                                  # age | delayed_nesterov | dylu | kbatch, '+'-joined
                                  # (policies.py)
    max_staleness: Optional[int] = 3      # drop pushes staler than this (null = no bound;
                                          # sync takes every gradient and ignores it)
    dc_lambda: float = 2.0        # dc: λ (λ0 of DC-ASGD-a when dc_adaptive)
    dc_adaptive: bool = True      # dc: λ / sqrt(mean square of g), DC-ASGD's adaptive variant
    dc_history: int = 64          # dc: versions of weights kept to compensate against
    ssp_slack: int = 2            # ssp: S, pushes a worker may run ahead of the slowest
    # adaptive (Koloskova et al. 2022, Mishchenko et al. 2022): the full rate while a push's
    # staleness is at most K = adaptive_threshold x n, n the live workers (or
    # adaptive_workers); past K the rate times 1/staleness (inverse), K/staleness (ratio), or
    # the push dropped (drop)
    adaptive_threshold: float = 1.0
    adaptive_decay: str = "inverse"       # inverse | ratio | drop
    adaptive_workers: Optional[int] = None  # n fixed (null: the live workers, server-counted)
    # age: each push times exp(-age_alpha x staleness), and 0 from age_cutoff on (0: no cutoff)
    age_alpha: float = 0.1
    age_cutoff: int = 0
    # delayed_nesterov (local steps): the outer momentum moves every dn_buffer pushes (null:
    # run.workers), with their mean; each push is applied at server.outer.lr / dn_buffer
    dn_buffer: Optional[int] = None
    # kbatch (K-batch async SGD, Dutta et al. 2018): the mean of every K pushes is one update
    # (no reply waits); K = kbatch, or null: ceil(kbatch_fraction x the live workers). The
    # version moves by the K pushes it applied, so run.max_updates and the schedule count
    # pushes (samples) at any K; a push's staleness counts K-push updates (server/kbatch.py)
    kbatch: Optional[int] = None
    kbatch_fraction: float = 0.5
    # ... and an update's rate times 1 (none), sqrt(K) or K (linear): fewer, larger steps
    kbatch_lr: str = "none"
    # A-SGD with momentum (adam, adamw, sgd with momentum): each worker gets the weights
    # predicted for when its gradient lands, w - tau x the optimizer's next step from its
    # state, tau the running mean of the measured staleness (DANA; server/lookahead.py).
    # The server keeps the true weights for its steps, checkpoints and the final model.
    lookahead: bool = False
    worker_timeout_s: float = 10.0   # ssp/sync: a silent worker stops counting after this
    max_message_mb: float = 512.0
    checkpoint_dir: str = ""      # "" = <run dir>/checkpoint, or ./checkpoint without a run dir
    checkpoint_every: int = 0     # also checkpoint every N updates (0 = only on shutdown)
    checkpoint_every_s: float = 10.0  # ... and every T seconds when the version moved (0 = no)
    checkpoint_keep: int = 3      # checkpoints kept (state-<version>.asgd); --resume takes the
                                  # newest good one
    stats_every_s: float = 1.0    # how often a "server" record goes to metrics.jsonl
    threads: int = 1
    spin: SpinConfig = section(SpinConfig)
    # Workers on this host (their shared-memory segment mapped) send their shared-memory
    # requests over a unix socket instead of ZeroMQ: no I/O threads between the two
    # processes (server/local.py). false: everything over ZeroMQ.
    local: bool = True
    # Sharded parameter server: the flat parameters split into this many balanced contiguous
    # ranges, each served by its own process (`asgd server --shard I`) with its own version;
    # workers talk to every shard at once. `asgd launch` starts them all.
    shards: int = 1
    max_workers: int = 1024       # workers' records kept (from hello); the longest silent go first
    resources: dict = field(default_factory=dict)   # asgd launch --on ray: each server
                                  # (shard) actor's Ray resources, e.g. {CPU: 1} ({} = none)
    outer: OuterConfig = section(OuterConfig)
    auth: ServerAuthConfig = section(ServerAuthConfig)

    def check(self) -> None:
        from asgd.config.checks import ConfigError
        from asgd.core.endpoint import parse_endpoint
        from asgd.core.policies import parse_policy

        from asgd.core.policies import ADAPTIVE_DECAYS, KBATCH_LR_RULES

        try:
            parse_policy(self.policy)
        except ValueError as e:
            raise ConfigError(f"server.policy: {e}") from None
        try:
            parse_endpoint(self.bind, bind=True)
        except ValueError as e:
            raise ConfigError(f"server.bind: {e}") from None
        need(self.dc_lambda >= 0, "server.dc_lambda", "must be >= 0")
        need(self.dc_history >= 1, "server.dc_history", "must be >= 1")
        need(self.ssp_slack >= 0, "server.ssp_slack", "must be >= 0")
        need(self.adaptive_threshold > 0, "server.adaptive_threshold", "must be > 0")
        need_one_of(self.adaptive_decay, ADAPTIVE_DECAYS, "server.adaptive_decay")
        need(self.adaptive_workers is None or self.adaptive_workers >= 1,
             "server.adaptive_workers", "must be >= 1 or null (the live workers)")
        need(self.kbatch is None or self.kbatch >= 1, "server.kbatch",
             "must be >= 1 or null (ceil(server.kbatch_fraction x the live workers))")
        need(0 < self.kbatch_fraction <= 1, "server.kbatch_fraction", "must be in (0, 1]")
        need_one_of(self.kbatch_lr, KBATCH_LR_RULES, "server.kbatch_lr")
        need(self.age_alpha >= 0, "server.age_alpha", "must be >= 0")
        need(self.age_cutoff >= 0, "server.age_cutoff", "must be >= 0 (0: no cutoff)")
        need(self.dn_buffer is None or self.dn_buffer >= 1, "server.dn_buffer",
             "must be >= 1 or null (run.workers)")
        names = parse_policy(self.policy)
        need("delayed_nesterov" not in names or (self.outer.optimizer == "sgd" and
                                                 self.outer.momentum > 0),
             "server.policy", "delayed_nesterov is a rule of outer momentum: it needs "
             "server.outer.optimizer sgd with server.outer.momentum > 0")
        need("dylu" not in names or self.shards == 1, "server.policy",
             "dylu needs one server (server.shards 1): each shard would time the workers "
             "on its own")
        need(self.worker_timeout_s > 0, "server.worker_timeout_s", "must be > 0")
        need(self.max_staleness is None or self.max_staleness >= 0, "server.max_staleness",
             "must be >= 0 or null")
        need("max_staleness" not in self.policy or self.max_staleness is not None,
             "server.max_staleness", "policy max_staleness needs a bound K")
        need(self.max_message_mb > 0, "server.max_message_mb", "must be > 0")
        need(self.checkpoint_every >= 0, "server.checkpoint_every", "must be >= 0")
        need(self.checkpoint_every_s >= 0, "server.checkpoint_every_s", "must be >= 0")
        need(self.checkpoint_keep >= 1, "server.checkpoint_keep", "must be >= 1")
        need(self.stats_every_s > 0, "server.stats_every_s", "must be > 0")
        need(self.threads >= 1, "server.threads", "must be >= 1")
        need(1 <= self.shards <= 64, "server.shards", f"must be in [1, 64], got {self.shards}")
        need(self.max_workers >= 1, "server.max_workers", "must be >= 1")
        check_resources("server.resources", self.resources)
        self.spin.check()
        self.outer.check()
        self.auth.check()
