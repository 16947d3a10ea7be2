"""A-SGD's delay in one process, without asgd: examples/lm.py's model, data and schedule, with
each gradient computed at the weights of ``--tau`` updates before the one it is applied to,
and the batches taken in turn from the two workers' shards (as 2 asgd workers in A-SGD do:
each worker's gradient, computed at version v - 1, lands at version v). The server's rule is
AdamW, optionally with one of the remedies for the delay. What bench/lm.py's asgd system
does to the loss, isolated from processes, transport and timing.

    python bench/lm_stale.py --tau 1                        # AdamW on 1-step-old gradients
    python bench/lm_stale.py --tau 0 --data all             # the plain process exactly
    python bench/lm_stale.py --tau 1 --rule lookahead       # the server's look-ahead
    python bench/lm_stale.py --tau 1 --beta1 0.5            # less explicit momentum
    python bench/lm_stale.py --tau 1 --rule lookahead --cautious   # and the cautious mask

Prints one JSON object a validation (step, validation loss) and the last line is the whole
curve. ``--data all``: one generator over all the training text, as the plain process (with
``--tau 0`` its numbers are the example's to float rounding); ``shards``: two generators,
one per worker's contiguous half, used in turn.

Rules: ``adamw`` (torch's, on one flat parameter); ``lookahead`` (the gradient computed at the
weights predicted for when it lands: w - tau x the update AdamW would make from its moments
alone, DANA's idea for Adam); ``dc`` (DC-ASGD-a's compensation g + lambda g*g*(w_now -
w_then) / sqrt(mean g^2) before AdamW, as the server's ``dc`` policy); ``scale`` (the rate
times 1 / (1 + tau)). ``--cautious`` (with any rule): AdamW's step only where it agrees in sign
with the gradient, rescaled by the share kept (C-AdamW, Liang et al. 2024), written out here
on the same state as torch's AdamW.
"""
from __future__ import annotations

import collections
import json
import time
from types import SimpleNamespace

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import asgd

from lm_ddp import load_example  # noqa: E402  (bench/ is the script's folder: on its path)


def main() -> None:
    lm = load_example()
    ap = lm.options()       # the example's own options, with this emulation's defaults and rules
    ap.description = __doc__.splitlines()[0]
    ap.set_defaults(steps=100, eval_every=20, eval_batches=4, threads=1)
    ap.add_argument("--tau", type=int, default=1)
    ap.add_argument("--data", choices=("shards", "all"), default="shards")
    ap.add_argument("--rule", choices=("adamw", "lookahead", "dc", "scale"), default="adamw")
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.95)
    ap.add_argument("--dc-lambda", type=float, default=2.0)
    ap.add_argument("--cautious", action="store_true",
                    help="AdamW's step only where it agrees in sign with the gradient")
    ap.add_argument("--ahead", type=float, default=None,
                    help="with --rule lookahead: how many updates ahead to look (default: tau)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    tokens = lm.stdlib_bytes(a.data_mb)
    n_val = len(tokens) // 10
    train, val = tokens[:-n_val], tokens[-n_val:]
    T, B = a.seq_len, a.batch_size
    val_starts = torch.linspace(0, len(val) - T - 2, a.eval_batches * B).long()
    model = lm.GPT(T)
    params = list(model.parameters())
    w = torch.nn.Parameter(parameters_to_vector(params).detach().clone())   # the server's
    opt = torch.optim.AdamW([w], lr=a.lr, betas=(a.beta1, a.beta2),
                            weight_decay=a.weight_decay)
    sched = SimpleNamespace(steps=a.steps, warmup=a.warmup, lr=a.lr, min_lr=a.min_lr)
    lm.with_cosine(opt, sched)                   # the example's schedule, by update
    if a.data == "all":
        sources = [(train, torch.Generator().manual_seed(a.seed))]
    else:                                        # each worker its shard, the same seed
        sources = [(asgd.shard(train, r, 2), torch.Generator().manual_seed(a.seed))
                   for r in range(2)]
    sent = collections.deque(maxlen=a.tau + 1)   # the weights sent after each update
    mean_sq = torch.zeros_like(w)                # dc's running mean square of g
    ahead = a.tau if a.ahead is None else a.ahead

    def reply() -> torch.Tensor:
        """The weights a worker gets: the live ones, or looked ahead."""
        out = w.detach().clone()
        st = opt.state.get(w)
        if a.rule == "lookahead" and st and ahead:
            b1, b2 = opt.param_groups[0]["betas"]
            k = float(st["step"])
            lr = opt.param_groups[0]["lr"]
            m_hat = st["exp_avg"] / (1 - b1 ** k)
            v_hat = st["exp_avg_sq"] / (1 - b2 ** k)
            step = m_hat / (v_hat.sqrt() + opt.param_groups[0]["eps"])
            out -= ahead * lr * (step + a.weight_decay * w.detach())
        return out

    @torch.no_grad()
    def val_loss() -> float:
        vector_to_parameters(w.detach(), params)
        model.eval()
        losses = [model(*lm.batch(val, s, T)).item() for s in val_starts.split(B)]
        model.train()
        return sum(losses) / len(losses)

    sent.append((w.detach().clone(), reply()))
    curve, t0 = [], time.time()
    for step in range(a.steps):
        w_then, at = sent[0]                     # tau updates ago (fewer at the start)
        data, gen = sources[step % len(sources)]
        x, y = lm.batch(data, torch.randint(len(data) - T - 1, (B,), generator=gen), T)
        with torch.no_grad():
            vector_to_parameters(at, params)
        model.zero_grad(set_to_none=True)
        model(x, y).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        g = parameters_to_vector([p.grad for p in params])
        if a.rule == "dc":
            mean_sq.mul_(0.95).addcmul_(g, g, value=0.05)
            g = g + a.dc_lambda / (mean_sq.sqrt() + 1e-7) * g * g * (w.detach() - w_then)
        if a.rule == "scale":
            for group in opt.param_groups:
                group["lr"] /= 1 + a.tau
        w.grad = g
        if a.cautious:
            cautious_step(opt, w, g)
        else:
            opt.step()                           # the schedule's hook sets the next rate
        sent.append((w.detach().clone(), reply()))
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            rec = {"step": step + 1, "val_loss": round(val_loss(), 4),
                   "s": round(time.time() - t0, 1)}
            curve.append(rec)
            print(json.dumps(rec), flush=True)
    print(json.dumps({"args": vars(a), "curve": curve}))


@torch.no_grad()
def cautious_step(opt, w, g) -> None:
    """One AdamW step on ``w`` (the state torch's AdamW keeps, so that look-ahead reads it)
    with the update masked where it disagrees in sign with ``g``, then the optimizer's step
    hooks (the example's schedule)."""
    group, st = opt.param_groups[0], opt.state[w]
    if "exp_avg" not in st:
        st.update(exp_avg=torch.zeros_like(w), exp_avg_sq=torch.zeros_like(w),
                  step=torch.tensor(0.0))
    b1, b2 = group["betas"]
    st["step"] += 1
    k = float(st["step"])
    st["exp_avg"].lerp_(g, 1 - b1)
    st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
    u = (st["exp_avg"] / (1 - b1 ** k)) / ((st["exp_avg_sq"] / (1 - b2 ** k)).sqrt()
                                         + group["eps"])
    mask = (u * g > 0).to(u.dtype)
    u.mul_(mask / mask.mean().clamp(min=1e-3))
    w.mul_(1 - group["lr"] * group["weight_decay"]).add_(u, alpha=-group["lr"])
    for hook in list(opt._optimizer_step_post_hooks.values()):
        hook(opt, (), {})


if __name__ == "__main__":
    main()
