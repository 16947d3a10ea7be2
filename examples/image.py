"""An image classifier: a CNN on scikit-learn's 8x8 handwritten digits, with a DataLoader and
augmentation; a plain PyTorch script that is also an asgd worker.

    python examples/image.py                              # one process: the reference
    python examples/image.py --epochs 1                   # a quick look
    asgd launch --workers 2 examples/image.py             # two asynchronous workers

The data ship with scikit-learn (1,797 images of 8x8 pixels, 16 grey levels; no download); a
fixed 20% is held out. Training images are shifted by up to a pixel each way and slightly
rescaled in brightness, a fresh draw every time the DataLoader yields them. The CNN (three 3x3
convolution stages, batch norm, then two linear layers) has 0.63M parameters. Its batch-norm
statistics are buffers, not parameters: each worker keeps its own.

The five asgd statements are those of examples/lm.py (its docstring says what each does):
run alone, this file is the single-process reference; under ``asgd launch``, a worker.
"""
from __future__ import annotations

import argparse
import time

import asgd
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

# -----------------------------------------------------------------------------------------------
# data


def digits(seed: int = 0):
    """(train images, train labels, test images, test labels): images (N, 1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0    # (N, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.long)                           # (N,)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = len(x) // 5
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


class Augmented(Dataset):
    """Images shifted by up to ``shift`` pixels each way (zeros come in) and their brightness
    scaled by 1 +/- ``scale``."""

    def __init__(self, x, y, shift: int = 1, scale: float = 0.1):
        self.x, self.y, self.shift, self.scale = x, y, shift, scale

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        img, s = self.x[i], self.shift                                    # (1, 8, 8)
        if s:
            dx, dy = torch.randint(-s, s + 1, (2,)).tolist()
            img = F.pad(img, (s, s, s, s))[:, s + dy:s + dy + 8, s + dx:s + dx + 8]
        img = img * (1 + self.scale * (2 * torch.rand(()) - 1))
        return img, self.y[i]


# -----------------------------------------------------------------------------------------------
# model


def conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())


class CNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            conv(1, 64), conv(64, 128), nn.MaxPool2d(2),                   # (B, 128, 4, 4)
            conv(128, 256), nn.MaxPool2d(2))                               # (B, 256, 2, 2)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(1024, 256), nn.ReLU(),
                                        nn.Dropout(0.2), nn.Linear(256, classes))

    def forward(self, x):                                                  # (B, 1, 8, 8)
        return self.classifier(self.features(x))                           # (B, 10)


# -----------------------------------------------------------------------------------------------


def forever(loader):
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--steps", type=int, default=0, help="steps in all (0: --epochs' worth)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05, help="SGD's, with Nesterov momentum 0.9")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)             # the initial weights, the shuffle, the augmentation
    if args.threads:
        torch.set_num_threads(args.threads)

    x, y, x_test, y_test = digits(args.seed)
    loader = DataLoader(asgd.shard(Augmented(x, y)), batch_size=args.batch_size, shuffle=True,
                        drop_last=True)
    steps = args.steps or args.epochs * len(loader)
    model = CNN()
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters; "
          f"{len(x)} training images, {len(x_test)} test images")
    opt = asgd.Optimizer(model.named_parameters(), "sgd", lr=args.lr, momentum=0.9, nesterov=True,
                         weight_decay=5e-4)

    @torch.no_grad()
    def evaluate() -> tuple[float, float]:
        model.eval()
        logits = model(x_test)                                             # (N, 10)
        model.train()
        return (logits.argmax(1) == y_test).float().mean().item(), \
            F.cross_entropy(logits, y_test).item()

    t0 = time.time()
    for step, (xb, yb) in enumerate(forever(loader), 1):                  # (B, 1, 8, 8), (B,)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if opt.done: break
        if step % len(loader) == 0 and step < steps:                       # an epoch's end
            acc, val_loss = evaluate()
            print(f"epoch {step // len(loader)}: train loss {loss.item():.4f}, "
                  f"val loss {val_loss:.4f}, val accuracy {acc:.4f}", flush=True)
        if step == steps:
            break
    opt.close()
    acc, val_loss = evaluate()
    print(f"final: {step} steps, val_loss {val_loss:.4f}, val_accuracy {acc:.4f}, "
          f"{time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
