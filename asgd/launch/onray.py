"""``asgd launch --on ray``: the run's server(s) and workers as Ray actors.

    summary = launch_on_ray(cfg)                          # a local Ray instance for the run
    summary = launch_on_ray(cfg, num_cpus=2)              # ... of two CPUs
    summary = launch_on_ray(cfg, address="head:6379")     # a running Ray cluster

Each process of a run is one actor, ``ProcessActor`` (asgd.launch.rayproc), which starts it
on its node (``python -m server`` / ``python -m worker``, with the same arguments as a local
launch) and watches it. A server or worker that dies takes its actor down with it, and Ray
restarts the actor (``max_restarts``: run.max_restarts per actor): a server actor starts its
server again with ``--resume`` from its checkpoint, on its old port if that is free, and a
worker actor its worker with the same rank and data shard (without ``$ASGD_FAULT``: an injected
crash fires once).
A worker that exits 0 (done) or 4 (diverged) is not restarted.

The workers are placed in one placement group, a bundle per worker: ``worker.resources``, by
default one GPU for a CUDA worker (Ray gives the actor that GPU as its ``cuda:0``) and one CPU
otherwise. The servers take ``server.resources`` (by default none). A server binds its node's
address; a worker on the same node as its server moves tensors through shared memory, as in a
local launch (``asgd.core.endpoint.is_local``), and one elsewhere uses tcp.

This process stays the launcher of a local launch (``asgd.launch.launcher.Launch``): the same
run directory, display, live evaluation, divergence guard and summary. It sees each actor's
process through ``RayProc``, which answers as a local ``Proc`` does. Every node must see the
run directory at the same path (a shared file system on a cluster of several machines): the
address files, logs, metrics and checkpoints live there, as in a local launch. Ray's calls
between this process and the actors carry only names, paths, numbers and exit codes;
gradients and weights never travel through Ray.

A local instance has ``num_cpus`` CPUs (``asgd launch --num-cpus``), by default this
machine's cores or as many as the run's bundles need, whichever is more; a run that cannot fit
in it fails before anything starts. A cluster's address is tried with a plain TCP connection
first (``CONNECT_TIMEOUT_S``), so an address nobody answers at fails at once rather than in
Ray's own connection retries.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from asgd.config import Config
from asgd.core.endpoint import read_address
from asgd.launch.launcher import POLL_S, STARTUP_TIMEOUT_S, Launch, LaunchError, checkpoint_dirs
from asgd.launch.rayproc import ProcessActor, RayProc
from asgd.launch.restarts import resume_how

PLACEMENT_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 5.0


def import_ray():
    try:
        import ray
    except ImportError:
        raise LaunchError("asgd launch --on ray needs Ray: pip install 'asgd[ray]' "
                          "(or pip install ray)") from None
    return ray


def gcs_host_port(address: str) -> tuple[str, int]:
    """The host and port that ``--address`` points at: ``HOST:PORT``, ``ray://HOST:PORT``
    (Ray Client), or ``auto`` (``$RAY_ADDRESS``, else the cluster ``ray start`` started on
    this machine)."""
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address_or_die

        try:
            address = canonicalize_bootstrap_address_or_die("auto")
        except (ConnectionError, ValueError) as e:
            raise LaunchError(f"--address auto: {e}".splitlines()[0]) from None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise LaunchError(f"--address {address!r}: expected HOST:PORT (e.g. head:6379), "
                          "ray://HOST:PORT or auto")
    return host.strip("[]"), int(port)


def check_reachable(address: str) -> None:
    """A TCP connection to the cluster's address within CONNECT_TIMEOUT_S, else LaunchError
    (Ray's own client would retry for many minutes)."""
    host, port = gcs_host_port(address)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        why = "no answer" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise LaunchError(f"cannot reach the Ray cluster at {address}: {why} "
                          f"(within {CONNECT_TIMEOUT_S:g} s)") from None


def local_cpus_needed(cfg: Config) -> float:
    """The CPUs a local Ray instance needs for the run: every worker's bundle and every
    server's resources."""
    return cfg.run.workers * float(worker_bundle(cfg, 0).get("CPU", 0)) + \
        cfg.server.shards * float(cfg.server.resources.get("CPU", 0))


def worker_bundle(cfg: Config, cluster_gpus: float) -> dict:
    """A worker's bundle: worker.resources, else a GPU for a CUDA worker (``auto`` with GPUs
    in the cluster), else a CPU."""
    if cfg.worker.resources:
        return dict(cfg.worker.resources)
    device = cfg.worker.device
    if device.startswith("cuda") or (device == "auto" and cluster_gpus >= 1):
        return {"GPU": 1}
    return {"CPU": 1}


def actor_options(resources: dict) -> dict:
    """Ray's actor options for a bundle or a resource dict."""
    res = dict(resources)
    opts = {"num_cpus": res.pop("CPU", 0), "num_gpus": res.pop("GPU", 0)}
    if "memory" in res:
        opts["memory"] = res.pop("memory")
    if res:
        opts["resources"] = res
    return opts


class RayLaunch(Launch):
    """A launch whose processes are Ray actors (see the module's text)."""

    def __init__(self, cfg: Config, run_dir: Path, quiet: bool, resume: bool = False,
                 address: str | None = None, num_cpus: int | None = None):
        self.ray = import_ray()
        run_dir = Path(run_dir).resolve()
        super().__init__(cfg, run_dir, quiet, resume)
        self.address = address
        self.num_cpus = num_cpus
        self.started_ray = False
        self.pg = None
        self.bundle: dict = {}
        self.actor_class = None

    # ------------------------------------------------------------------------------------------

    def _start_ray(self) -> None:
        ray, cfg = self.ray, self.cfg
        from ray.util.placement_group import placement_group

        kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level="WARNING",
                      configure_logging=True)
        if self.address:
            check_reachable(self.address)
        else:
            need = local_cpus_needed(cfg)
            if self.num_cpus is not None and self.num_cpus < need:
                raise LaunchError(f"the run needs {need:g} CPUs of Ray (run.workers × "
                                  "worker.resources + server.shards × server.resources); "
                                  f"--num-cpus is {self.num_cpus}")
        try:
            if self.address:
                ray.init(address=self.address, **kwargs)
            else:        # a local instance for the run (never $RAY_ADDRESS's cluster)
                cpus = self.num_cpus or max(os.cpu_count() or 1, int(need + 0.999))
                ray.init(address="local", num_cpus=cpus, **kwargs)
                self.started_ray = True
        except (ConnectionError, RuntimeError, ValueError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            if self.address and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
                why += (" (a cluster with token authentication, Ray's default, needs "
                        "RAY_AUTH_MODE=token here and its token in ~/.ray/auth_token or "
                        "$RAY_AUTH_TOKEN)")
            raise LaunchError(f"cannot start or reach Ray"
                              f"{' at ' + self.address if self.address else ''}: {why}"
                              ) from None
        self.bundle = worker_bundle(cfg, ray.cluster_resources().get("GPU", 0))
        if self.started_ray:     # nothing will join a local instance: what it lacks, it lacks
            total = ray.cluster_resources()
            short = {k: v * cfg.run.workers for k, v in self.bundle.items()
                     if v * cfg.run.workers > total.get(k, 0)}
            if short:
                has = {k: total.get(k, 0) for k in short}
                raise LaunchError(f"the local Ray instance cannot place {cfg.run.workers} "
                                  f"workers of {self.bundle} each (worker.resources): they "
                                  f"need {short}, it has {has}")
        self.pg = placement_group([dict(self.bundle) for _ in range(cfg.run.workers)],
                                  strategy="PACK")
        ready, _ = ray.wait([self.pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            raise LaunchError(f"the Ray cluster cannot place {cfg.run.workers} workers of "
                              f"{self.bundle} each (worker.resources) within "
                              f"{PLACEMENT_TIMEOUT_S:g} s; it has "
                              f"{ray.available_resources()} free")
        self.actor_class = ray.remote(ProcessActor)
        self.metrics.write("ray_started", address=self.address or "local",
                           bundle=self.bundle,
                           resources={k: v for k, v in ray.cluster_resources().items()
                                      if "node:" not in k})

    def _stop_ray(self) -> None:
        ray = self.ray
        if not ray.is_initialized():
            return
        for p in self.servers + self.workers:
            if isinstance(p, RayProc):
                p.kill()
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self.pg)
            except ray.exceptions.RayError:
                pass
        ray.shutdown()        # a local instance started for the run ends with it

    def run(self) -> dict:
        try:
            self._start_ray()
        except LaunchError:
            self._stop_ray()
            self.start_failed = True
            raise
        try:
            return super().run()
        finally:
            self._stop_ray()

    def _summarize(self) -> dict:
        summary = super()._summarize()
        summary["on"] = "ray"
        summary["nodes"] = sorted({p.node for p in self.servers + self.workers
                                   if getattr(p, "node", None)})
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    # ------------------------------------------------------------------------------------------
    # processes: actors

    def _actor(self, spec: dict, options: dict) -> RayProc:
        exit_file = Path(spec["log"]).with_suffix(".exit")
        exit_file.unlink(missing_ok=True)
        extra = spec.pop("extra_env", {})      # a script worker's own variables
        spec = dict(spec, exit_file=str(exit_file), cwd=os.getcwd(),
                    env=dict(self.env, **extra), restart_env=dict(self.restart_env, **extra),
                    diverged_exit=self.diverged_exit)
        actor = self.actor_class.options(name=None, max_restarts=self.cfg.run.max_restarts,
                                         max_task_retries=-1, **options).remote(spec)
        return RayProc(self.ray, actor, spec["name"], Path(spec["log"]), exit_file)

    def _spawn_server(self, shard: int, resume: bool, bind: str = "") -> RayProc:
        """The actor binds (its node's address) and adds --resume itself."""
        name, log = self._server_name(shard)
        self.addr_files[shard].unlink(missing_ok=True)
        spec = {"kind": "server", "name": name, "log": str(self.run_dir / "logs" / log),
                "args": self._server_args(shard),
                "addr_file": str(self.addr_files[shard]),
                "checkpoint_dir": str(checkpoint_dirs(self.cfg, self.run_dir)[shard]),
                "resume": bool(resume),
                # a local instance's processes share this machine: loopback only
                "host": "127.0.0.1" if self.started_ray else ""}
        return self._actor(spec, actor_options(self.cfg.server.resources))

    def _worker_spec(self, rank: int) -> dict:
        return {"kind": "worker", "name": f"worker {rank}",
                "log": str(self.run_dir / "logs" / f"worker-{rank}.log"),
                "args": self._worker_args(rank)}

    def _spawn_worker(self, rank: int, env: dict) -> RayProc:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        spec = self._worker_spec(rank)
        strategy = PlacementGroupSchedulingStrategy(placement_group=self.pg,
                                                    placement_group_bundle_index=rank)
        return self._actor(spec, dict(actor_options(self.bundle),
                                      scheduling_strategy=strategy))

    # ------------------------------------------------------------------------------------------
    # deaths: Ray restarts; the launcher records what it sees

    def _rest(self) -> None:        # each poll of an actor is a call to Ray: a turn's sleep
        time.sleep(POLL_S)

    def _tick(self) -> None:
        for kind, procs in (("server", self.servers), ("worker", self.workers)):
            for i, p in enumerate(procs):
                while p.restarts:
                    self._ray_restarted(kind, i, p, *p.restarts.pop(0))

    def _ray_restarted(self, kind: str, index: int, p: RayProc, code: int | None,
                       state: dict) -> None:
        rec = self._death(kind, index, p, code)
        fields: dict = {"by": "ray", "node": state.get("node")}
        if kind == "worker":
            fields["worker"] = f"w{index}"
        else:        # the actor waited for it to listen before it answered
            endpoint = state.get("endpoint") or read_address(self.addr_files[index],
                                                             STARTUP_TIMEOUT_S)
            if endpoint:
                self.endpoints[index] = endpoint
                fields["endpoint"] = endpoint
                self._connect()
            fields["resumed_version"] = state.get("resumed_version")
            fields["resume"] = bool(state.get("resume"))
        self._restarted(kind, index, p.name, **fields)
        how = " " + resume_how(fields["resumed_version"], fields["resume"]) \
            if kind == "server" else ""
        self.display.message(f"[red]{p.name} died[/red] ({self._exit_text(p, rec)}):\n"
                             f"{p.tail()}\n[yellow]Ray restarted {p.name}[/yellow]{how} "
                             f"(restart {len(self.restarts)})", always=True)

    def _worker_died(self, rank: int) -> None:
        """Ray gave up on it (its restarts are spent), or it diverged."""
        p = self.workers[rank]
        p.reported = True
        if p.returncode == self.diverged_exit:
            self._judge(f"{p.name}: its training loss stayed non-finite")
            return
        self._out_of_restarts(p, self._death("worker", rank, p))

    def _server_died(self, shard: int) -> bool:
        p = self.servers[shard]
        p.reported = True
        self._out_of_restarts(p, self._death("server", shard, p))
        return False


def launch_on_ray(cfg: Config, quiet: bool = False, address: str | None = None,
                  resume_dir=None, overrides=(), num_cpus: int | None = None) -> dict:
    """``launch`` / ``resume_launch`` (asgd.launch.launcher) with the processes as Ray
    actors: on the cluster at ``address``, else on a local instance of ``num_cpus`` CPUs."""
    import shutil

    from asgd.config import ConfigError, split_batch
    from asgd.launch.launcher import check_imports, make_run_dir, resume_config

    import_ray()
    if resume_dir is not None:
        cfg, run_dir = resume_config(resume_dir, overrides)
        return RayLaunch(cfg, run_dir, quiet, resume=True, address=address,
                         num_cpus=num_cpus).run()
    try:
        cfg = split_batch(cfg)
    except ConfigError as e:
        raise LaunchError(str(e)) from None
    check_imports(cfg)
    run_dir = make_run_dir(cfg)
    try:
        return RayLaunch(cfg, run_dir, quiet, address=address, num_cpus=num_cpus).run()
    except LaunchError:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
