"""A byte-level transformer language model on Python's own standard library: a plain PyTorch
script (nanoGPT in miniature) that is also an asgd worker.

    python examples/lm.py                                # one process: the reference
    python examples/lm.py --steps 20 --batch-size 4 --seq-len 64     # a quick look
    asgd launch --workers 2 examples/lm.py --steps 600   # two asynchronous workers

The text is the ``*.py`` files at the top of the standard library's folder, sorted by name and
read as bytes (a vocabulary of 256): on every machine with this Python, no download. The last
10% is held out for the validation loss, which is measured on the same fixed windows every
time. The model is a GPT (pre-norm blocks of causal self-attention and an MLP, tied input and
output embeddings): 4 layers of width 256 make 3.2M parameters. AdamW, a linear warm-up then a
cosine decay of the learning rate (nanoGPT's schedule).

Five statements make the plain PyTorch script an asgd worker: ``import asgd``; ``asgd.shard``
of the training data (this worker's part); ``asgd.Optimizer`` in place of the torch
optimizer; ``if opt.done: break`` (the server's budget is spent); ``opt.close()``. Run alone
(no ``$ASGD_SERVER``), asgd.Optimizer is that torch optimizer, stepping in this process, and
``asgd.shard`` gives back all the data: the same file is the single-process reference.
In A-SGD the server owns the learning rate: ``schedule="cosine"`` with the warm-up, floor
and ``max_updates`` runs on the server's clock what ``with_cosine`` (the plain version's
schedule, kept as the reference; tests/test_examples.py checks that they agree) runs here;
``lookahead=True`` has the server send each worker the weights AdamW's momentum predicts for
when its gradient will be applied (with several workers a gradient lands an update or more
after the weights it was computed at; alone, it changes nothing).
With ``--local-steps H`` the other mode: AdamW and ``with_cosine`` step here and every H steps
the progress goes to the server's outer rule (each worker then runs ``--steps`` steps). Each
validation loss also goes to ``opt.log`` with the tokens behind the weights (the run's
metrics.jsonl under asgd launch; bench/lm.py reads it).
"""
from __future__ import annotations

import argparse
import glob
import math
import sysconfig
import time

import asgd
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------------------------
# data


def stdlib_bytes(max_mb: float) -> torch.Tensor:
    """The standard library's top-level sources, sorted by name, as one tensor of bytes."""
    files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))
    chunks, size = [], 0
    for path in files:
        with open(path, "rb") as f:
            chunks.append(f.read())
        size += len(chunks[-1])
        if size >= max_mb * 1e6:
            break
    data = b"".join(chunks)[:int(max_mb * 1e6)]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()     # (N,)


def batch(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int):
    """Windows of ``seq_len`` tokens from each start, and the same shifted by one."""
    idx = starts[:, None] + torch.arange(seq_len + 1)                      # (B, T+1)
    w = tokens[idx]
    return w[:, :-1], w[:, 1:]                                             # (B, T), (B, T)


# -----------------------------------------------------------------------------------------------
# model


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):                                                  # (B, T, C)
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)                    # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for t in (q, k, v))                                     # (B, H, T, C/H)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, seq_len: int, layers: int = 4, d: int = 256, heads: int = 4,
                 vocab: int = 256):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight                                 # tied embeddings
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx, targets):                                       # (B, T), (B, T)
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))           # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x))                                     # (B, T, 256)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# -----------------------------------------------------------------------------------------------


def with_cosine(opt, args):
    """The plain PyTorch version's optimizer schedule: ``opt`` with nanoGPT's schedule, set after each of its steps: a linear warm-up over
    ``args.warmup`` steps, then a cosine decay to ``args.min_lr`` at ``args.steps``."""
    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
        return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * frac))

    def after_step(opt, *_):
        opt.steps_done = getattr(opt, "steps_done", 0) + 1
        for group in opt.param_groups:
            group["lr"] = lr_at(opt.steps_done)

    for group in opt.param_groups:
        group["lr"] = lr_at(0)
    opt.register_step_post_hook(after_step)
    return opt


def options() -> argparse.ArgumentParser:
    """The script's options (bench/lm_stale.py takes them too)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--data-mb", type=float, default=4.0, help="MB of text (10%% held out)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local-steps", type=int, default=0,
                   help="asgd: AdamW steps here between pushes (0: A-SGD, the server steps)")
    p.add_argument("--lookahead", type=int, default=1, choices=(0, 1),
                   help="asgd, A-SGD: the weights looked ahead to where the gradient lands")
    return p


def main():
    args = options().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    tokens = stdlib_bytes(args.data_mb)
    n_val = len(tokens) // 10
    train, val = asgd.shard(tokens[:-n_val]), tokens[-n_val:]
    T = args.seq_len
    # fixed validation windows, evenly spaced over the held-out text
    val_starts = torch.linspace(0, len(val) - T - 2, args.eval_batches * args.batch_size).long()

    model = GPT(T, args.layers, args.width)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters; "
          f"{len(train):,} training bytes, {len(val):,} validation bytes")
    if args.local_steps:         # local steps: the plain version's optimizer as the inner one
        opt = asgd.Optimizer(inner=with_cosine(torch.optim.AdamW(
            model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay),
            args), local_steps=args.local_steps)
    else:
        opt = asgd.Optimizer(model.named_parameters(), "adamw", lr=args.lr, betas=(0.9, 0.95),
                             weight_decay=args.weight_decay, schedule="cosine",
                             warmup=args.warmup, min_lr=args.min_lr, max_updates=args.steps,
                             lookahead=bool(args.lookahead))

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        losses = [model(*batch(val, s, T)).item()
                  for s in val_starts.split(args.batch_size)]
        model.train()
        loss = sum(losses) / len(losses)    # logged with the tokens behind these weights
        opt.log(val_loss=loss, tokens=opt.version * opt.local_steps * args.batch_size * T)
        return loss

    gen = torch.Generator().manual_seed(args.seed)
    t0, loss = time.time(), float("nan")
    for step in range(args.steps):
        x, y = batch(train, torch.randint(len(train) - T - 1, (args.batch_size,),
                                          generator=gen), T)             # (B, T), (B, T)
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if opt.done: break
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            tok_s = (step + 1) * args.batch_size * T / (time.time() - t0)
            print(f"step {step + 1}: train loss {loss.item():.4f}, val loss {val_loss():.4f}, "
                  f"{tok_s:,.0f} tokens/s", flush=True)
    print(f"final: step {step + 1}, train loss {loss.item():.4f}, "
          f"val_loss {val_loss():.4f}, {time.time() - t0:.1f} s")
    opt.close()


if __name__ == "__main__":
    main()
