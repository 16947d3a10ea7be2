"""Reference trainers without a parameter server, for experiments to measure against.

    summary = run_reference(cfg, kind="single")   # the same model and data in one plain process
    summary = run_reference(cfg, kind="ddp")      # DistributedDataParallel, gloo, on loopback

``single`` trains with torch.optim in one process: the same model, data, optimizer and
schedule (by step) as the cluster, no server. ``ddp`` is what a user would otherwise run for
synchronous data parallelism: run.workers processes, each on its own shard (asgd's sharding)
with the same straggler simulation, gradients averaged by DistributedDataParallel over gloo on
127.0.0.1 (their rendezvous a file store in the run directory: no port to pick). Either writes a run directory like ``asgd launch`` (config.yaml, metrics.jsonl with
worker_step and eval records, summary.json); rank 0 evaluates every run.eval_every_s.

    python -m asgd.experiments.reference --config runs/x/config.yaml --run-dir runs/x \
        [--rank R --world W --init file:///path/to/rendezvous]
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

from asgd.config import Config, load_config, save_config
from asgd.launch.processes import child_env, spawn, wait_all


def run_reference(cfg: Config, kind: str = "single", quiet: bool = True) -> dict:
    """Run the reference trainer as subprocesses; returns its summary (also summary.json)."""
    from asgd.launch.launcher import make_run_dir

    if kind not in ("single", "ddp"):
        raise ValueError(f"unknown reference {kind!r}")
    world = 1 if kind == "single" else cfg.run.workers
    cfg = cfg.replace(**{"run.workers": world})
    run_dir = make_run_dir(cfg)
    save_config(cfg, run_dir / "config.yaml")
    t0 = time.time()
    env = child_env(ASGD_T0=repr(t0), OMP_NUM_THREADS="1")
    init = (run_dir / "rendezvous").resolve().as_uri()
    procs = []
    for r in range(world):
        args = ["-m", "asgd.experiments.reference", "--config", str(run_dir / "config.yaml"),
                "--run-dir", str(run_dir), "--rank", str(r), "--world", str(world)]
        if kind == "ddp":
            args += ["--init", init]
        procs.append(spawn(f"{kind} rank {r}", args, run_dir / "logs" / f"{kind}-{r}.log", env,
                           new_session=False))
    codes = wait_all(procs, (cfg.run.max_seconds or 3600) + 120)
    failures = [f"{kind} rank {r} exited {rc}" for r, rc in enumerate(codes) if rc != 0]
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {
        "run_dir": str(run_dir), "test_accuracy": None, "workers": world}
    summary["failures"] = failures + summary.get("failures", [])
    summary["status"] = "ok" if not summary["failures"] else "failed"
    summary["wall_s"] = round(time.time() - t0, 3)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ----------------------------------------------------------------------------------------------
# one process of the reference

def train_local(cfg: Config, run_dir: Path, rank: int = 0, world: int = 1,
                init: str | None = None) -> dict | None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from asgd.core.layout import trainable_parameters
    from asgd.core.optim import make_optimizer, scheduled_lr
    from asgd.tasks.straggler import Straggler
    from asgd.metrics import MetricsWriter
    from asgd.tasks.data import ShardLoader
    from asgd.tasks.evaluate import evaluate
    from asgd.tasks.devices import resolve_device
    from asgd.tasks.task import build_task

    torch.set_num_threads(cfg.worker.threads)
    device = resolve_device(cfg.worker.device, rank)
    metrics = MetricsWriter(run_dir / "metrics.jsonl")
    task = build_task(cfg)
    ds, model = task.dataset, task.model.to(device)
    ddp = init is not None
    if ddp:   # init: a file:// URL, a FileStore every rank opens
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = make_optimizer(cfg, trainable_parameters(model))   # model.freeze stays fixed
    loader = ShardLoader.for_config(cfg, ds, rank, world, device)
    straggler = Straggler.for_rank(cfg.worker, rank)
    name = f"{'ddp' if ddp else 'single'}{rank}"
    x_test, y_test = ds.x_test.to(device), ds.y_test.to(device)
    eval_every = cfg.run.eval_every_s
    next_eval = time.monotonic() + eval_every if eval_every else float("inf")
    started = time.monotonic()
    step, samples, window_loss = 0, 0, 0.0
    flag = torch.zeros(1)
    while True:
        stop = (cfg.run.max_updates and step >= cfg.run.max_updates) or \
               (cfg.run.max_seconds and time.time() - metrics.t0 >= cfg.run.max_seconds) or \
               (cfg.worker.max_steps and step >= cfg.worker.max_steps)
        if ddp:   # every rank stops at the same step, or the all-reduce would hang
            flag.fill_(1.0 if stop else 0.0)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            break
        for g in opt.param_groups:
            g["lr"] = scheduled_lr(cfg, step)
        t = time.perf_counter()
        x, y = loader.next()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()   # DDP averages the gradients across ranks here
        opt.step()
        straggler.after_step(time.perf_counter() - t)
        step += 1
        samples += len(x)
        window_loss += loss.item()
        if step % cfg.worker.log_every == 0:
            metrics.write("worker_step", worker=name, rank=rank, step=step,
                          loss=window_loss / cfg.worker.log_every, staleness=0, version=step,
                          samples=samples,
                          samples_per_s=samples / max(time.monotonic() - started, 1e-9))
            window_loss = 0.0
        if rank == 0 and time.monotonic() >= next_eval:
            next_eval = time.monotonic() + eval_every
            acc, tl = evaluate(model, x_test, y_test, cfg.run.eval_batch_size)
            metrics.write("eval", version=step, accuracy=acc, loss=tl)
    elapsed = time.monotonic() - started
    metrics.write("worker_done", worker=name, rank=rank, step=step, samples=samples,
                  version=step, elapsed_s=elapsed, samples_per_s=samples / max(elapsed, 1e-9),
                  reason="budget")
    total = samples
    if ddp:
        s = torch.tensor([float(samples)])
        dist.all_reduce(s)
        total = int(s.item())
    summary = None
    if rank == 0:
        acc, tl = evaluate(model, x_test, y_test, cfg.run.eval_batch_size)
        metrics.write("eval", version=step, accuracy=acc, loss=tl, final=True)
        summary = {"run_dir": str(run_dir), "test_accuracy": acc, "test_loss": tl,
                   "train_s": round(elapsed, 3), "updates_applied": step, "updates_dropped": 0,
                   "staleness_mean": 0.0, "staleness_max": 0, "staleness_histogram": {"0": step},
                   "samples": total, "samples_per_s": total / max(elapsed, 1e-9),
                   "workers": world, "policy": "ddp" if ddp else "single", "failures": []}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    metrics.close()
    return summary


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), required=True)
@click.option("--run-dir", type=click.Path(file_okay=False), required=True)
@click.option("--rank", type=int, default=0)
@click.option("--world", type=int, default=1)
@click.option("--init", default=None, help="torch.distributed init URL (ddp only).")
def main(config_path, run_dir, rank, world, init):
    """One process of a reference trainer (used by experiments)."""
    cfg = load_config(config_path)
    train_local(cfg, Path(run_dir), rank, world, init)


if __name__ == "__main__":
    main()
