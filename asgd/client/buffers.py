"""A flat vector held in parts, each on its own device: the flat buffers of a model split into
stages over several devices (worker.stages.devices), so that the server still sees one flat vector.

    runs = device_runs(params, layout)            # [(device, lo, hi), ...]
    weights = Spread(runs)                        # one tensor a part
    views = weights.views(layout)                 # each parameter's view, on its device
    weights.copy_(host_flat); weights.copy_to(host_flat)
"""
from __future__ import annotations

import torch


class Spread:
    """One flat vector held in parts: each a contiguous range ``[lo, hi)`` of it on its own
    device (the parameters of one stage of a split model view their part). What the exchange
    does to a flat device buffer, done part by part."""

    def __init__(self, parts: list[tuple[torch.device, int, int]]):
        self.parts = [(lo, hi, torch.zeros(hi - lo, device=d)) for d, lo, hi in parts]
        self.numel = parts[-1][2] if parts else 0
        self.cuda = sorted({t.device for _, _, t in self.parts if t.device.type == "cuda"},
                           key=str)

    def views(self, layout) -> list[torch.Tensor]:
        out = []
        for spec, (a, b) in zip(layout.specs, layout.spans()):
            lo, hi, t = next(p for p in self.parts if p[0] <= a and b <= p[1])
            out.append(t[a - lo:b - lo].view(spec.shape))
        return out

    def zero_(self) -> "Spread":
        for _, _, t in self.parts:
            t.zero_()
        return self

    def copy_(self, src, non_blocking: bool = False) -> "Spread":
        """From a host flat tensor, or from another Spread of the same parts."""
        for k, (lo, hi, t) in enumerate(self.parts):
            t.copy_(src.parts[k][2] if isinstance(src, Spread) else src[lo:hi],
                    non_blocking=non_blocking)
        return self

    def copy_to(self, host: torch.Tensor) -> None:
        """Into a host flat tensor; every device done when this returns."""
        for lo, hi, t in self.parts:
            host[lo:hi].copy_(t, non_blocking=True)
        for d in self.cuda:
            torch.cuda.synchronize(d)

    def clone(self) -> "Spread":
        out = Spread([(t.device, lo, hi) for lo, hi, t in self.parts])
        return out.copy_(self)

    def set_difference(self, a: "Spread", b: "Spread") -> "Spread":
        """self = a - b, part by part."""
        for (_, _, t), (_, _, x), (_, _, y) in zip(self.parts, a.parts, b.parts):
            torch.sub(x, y, out=t)
        return self


def device_runs(params, layout, counts: list[int] | None = None
                ) -> list[tuple[torch.device, int, int]]:
    """The parts of a Spread: maximal runs of consecutive parameters on one device (or, with
    ``counts``, runs of that many parameters each), as (device, lo, hi) flat ranges."""
    spans = layout.spans()
    cuts = []
    if counts:
        k = 0
        for n in counts[:-1]:
            k += n
            cuts.append(k)
    else:
        cuts = [i for i in range(1, len(params)) if params[i].device != params[i - 1].device]
    edges = [0, *cuts, len(params)]
    return [(params[i].device, spans[i][0], spans[j - 1][1])
            for i, j in zip(edges, edges[1:]) if j > i]
