"""A regression with a loss that is not cross-entropy: an MLP predicting disease progression
from scikit-learn's diabetes data set, trained on the Huber loss; a plain PyTorch script that
is also an asgd worker.

    python examples/regression.py                         # one process: the reference
    python examples/regression.py --steps 50              # a quick look
    asgd launch --workers 2 examples/regression.py        # two asynchronous workers

The data ship with scikit-learn (442 patients, 10 standardised measurements; the target is a
measure of progression a year later; no download). A fixed 20% is held out; the features and
the target are standardised with the training split's mean and deviation. The model is an
MLP (10 -> 64 -> 64 -> 1) trained with Adam on the Huber (smooth L1) loss, which a few outlying
patients sway less than the squared error; the held-out mean squared error and R^2 are
reported in the target's own units.

As in examples/lm.py, five asgd statements (import, shard, Optimizer, done, close) make
this plain script a worker; run alone it is its own single-process reference.
"""
from __future__ import annotations

import argparse
import time

import asgd
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

# -----------------------------------------------------------------------------------------------
# data


def diabetes(seed: int = 0):
    """(train x, train y, test x, test y, target scale): x (N, 10) and y (N,) standardised."""
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    x = torch.tensor(d.data, dtype=torch.float32)                          # (442, 10)
    y = torch.tensor(d.target, dtype=torch.float32)                        # (442,)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = len(x) // 5
    test, train = perm[:n_test], perm[n_test:]
    mx, sx = x[train].mean(0), x[train].std(0)
    my, sy = y[train].mean(), y[train].std()
    x, y = (x - mx) / sx, (y - my) / sy
    return x[train], y[train], x[test], y[test], sy.item()


# -----------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    x, y, x_test, y_test, scale = diabetes(args.seed)
    loader = DataLoader(asgd.shard(TensorDataset(x, y)), batch_size=args.batch_size, shuffle=True,
                        drop_last=True)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 64),
                          nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 1))
    opt = asgd.Optimizer(model.named_parameters(), "adam", lr=args.lr, weight_decay=1e-2)

    @torch.no_grad()
    def evaluate() -> tuple[float, float]:
        """The held-out mean squared error (in the target's units squared) and R^2."""
        model.eval()
        err = model(x_test).squeeze(1) - y_test                            # (N,)
        model.train()
        mse = err.pow(2).mean()
        return mse.item() * scale ** 2, 1 - (mse / y_test.var(unbiased=False)).item()

    def batches():                       # the loader's batches, epoch after epoch
        while True:
            yield from loader

    t0 = time.time()
    for step, (xb, yb) in enumerate(batches(), 1):                         # (B, 10), (B,)
        loss = F.smooth_l1_loss(model(xb).squeeze(1), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if opt.done: break
        if step % args.eval_every == 0 and step < args.steps:
            mse, r2 = evaluate()
            print(f"step {step}: train loss {loss.item():.4f}, val mse {mse:.1f}, "
                  f"val r2 {r2:.3f}", flush=True)
        if step == args.steps:
            break
    opt.close()
    mse, r2 = evaluate()
    print(f"final: {step} steps, val_mse {mse:.1f}, val_r2 {r2:.3f}, {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
