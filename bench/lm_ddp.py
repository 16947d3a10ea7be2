"""torch DDP (gloo) of examples/lm.py's model, data and schedule: one process of bench/lm.py's
DDP system (not run by hand).

    RANK=r WORLD_SIZE=2 MASTER_PORT=p ASGD_T0=t python bench/lm_ddp.py SETTINGS_JSON OUT

SETTINGS_JSON holds the example's settings by their argparse names (steps, batch_size, ...).
The model, the batches and the plain version's schedule are the example's own, imported
from it. Strong scaling, as DDP is compared: the global batch is the example's
``batch_size``, each rank computing ``batch_size / WORLD_SIZE`` of it on its contiguous
share of the training text (``asgd.shard``, as the example's asgd workers do), so every
step is one update of the plain process's batch, and ``steps`` and ``eval_every`` count
those updates as the example's do. The validation windows are the example's, split over the
ranks. Rank 0 appends one JSON object a line to OUT: ``t`` (seconds since $ASGD_T0),
``val_loss`` and ``tokens`` (trained by all ranks).
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import asgd

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lm.py"


def load_example():
    spec = importlib.util.spec_from_file_location("example_lm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    a = SimpleNamespace(**json.loads(sys.argv[1]))
    out = Path(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    t0 = float(os.environ["ASGD_T0"])
    torch.set_num_threads(a.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=a.collective_timeout_s))
    lm = load_example()
    torch.manual_seed(a.seed)
    data = lm.stdlib_bytes(a.data_mb)
    held_out = len(data) // 10
    shard, val = asgd.shard(data[:-held_out], rank, world), data[-held_out:]
    T, B = a.seq_len, a.batch_size
    if B % world:
        raise SystemExit(f"bench/lm_ddp.py: batch_size {B} must divide by the {world} ranks")
    local = B // world                                # this rank's part of each batch
    windows = torch.linspace(0, len(val) - T - 2, a.eval_batches * B).long()
    mine = windows.tensor_split(world)[rank]          # this rank's part of the validation
    model = DistributedDataParallel(lm.GPT(T, a.layers, a.width))
    opt = lm.with_cosine(torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95),
                                           weight_decay=a.weight_decay), a)

    @torch.no_grad()
    def evaluate(done: int) -> None:
        net = model.module.eval()
        total = torch.zeros(2)                        # (sum of losses, windows)
        for starts in mine.split(B):
            total += torch.tensor([net(*lm.batch(val, starts, T)).item() * len(starts),
                                   len(starts)])
        net.train()
        dist.all_reduce(total)
        if rank == 0:
            rec = {"t": round(time.time() - t0, 4), "val_loss": (total[0] / total[1]).item(),
                   "tokens": done * B * T}
            with open(out, "a") as f:
                f.write(json.dumps(rec) + "\n")

    gen = torch.Generator().manual_seed(a.seed)
    for step in range(1, a.steps + 1):
        starts = torch.randint(len(shard) - T - 1, (local,), generator=gen)
        opt.zero_grad(set_to_none=True)
        model(*lm.batch(shard, starts, T)).backward()    # DDP averages the ranks' gradients
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % a.eval_every == 0 or step == a.steps:
            evaluate(step)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
