"""PCB-merging - Du et al., 2024, "Parameter Competition Balancing for Model Merging" (NeurIPS).

Follows the official implementation (github.com/duguodong7/pcb-merging), applied per tensor to
the stacked task vectors ``T`` (n x d) after weighting (``w_i tau_i``, weights default to 1):

1. clamp ``|T|`` per task to its [0.01%, 99.99%] quantile range (outliers), keep the signs: ``T'``;
2. intra-balancing ``intra = exp(n * minmax_d(|T'|)^2)`` (normalised squared magnitudes);
3. inter-balancing ``inter = tanh(T * sum_j T_j)`` (similarity to the other tasks);
4. ``score = intra * inter``; per task, values below its ``1 - density`` quantile are raised
   to it and the row is min-max normalised, so the dropped share scores 0;
5. ``tau_m = sum_i score_i T'_i / max(sum_i score_i, 1e-12)``, ``theta = theta_0 + lambda * tau_m``.

The paper flattens the whole model; here the statistics are per tensor (like TIES' default
trimming in mergekit). ``density`` is the paper's ``ratio`` (the kept share).
"""
from __future__ import annotations

from ._common import torch, as_list, column, register


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo = x.min(dim=1, keepdim=True).values
    hi = x.max(dim=1, keepdim=True).values
    return (x - lo) / (hi - lo).clamp_min(1e-30)


def _kth(x: torch.Tensor, index: int) -> torch.Tensor:
    """``sorted(x, dim=1)[:, index]`` without sorting."""
    return torch.kthvalue(x, index + 1, dim=1, keepdim=True).values


@register("pcb", model_params=("weight",), global_params=("density", {"lambda": 1.0}), paper="arXiv:2410.02396")
def pcb(base: torch.Tensor, deltas: torch.Tensor, *, weight=1.0, density: float = 0.1, **kw) -> torch.Tensor:
    """PCB-merging per tensor; ``density`` = share of scores kept per task, ``lambda`` = scale."""
    n = deltas.shape[0]
    t = (deltas * column(as_list(weight, n, "weight"), deltas)).reshape(n, -1)
    d = t.shape[1]
    mag = t.abs()
    lo, hi = _kth(mag, int(d * 0.0001)), _kth(mag, int(d * (1 - 0.0001)) - 1 if d > 1 else 0)
    mag = torch.minimum(torch.maximum(mag, lo), hi)
    clamped = torch.sign(t) * mag
    intra = torch.exp(n * _minmax(mag) ** 2)
    inter = torch.tanh(t * t.sum(dim=0, keepdim=True))
    score = intra * inter
    if density < 1:
        floor = _kth(score, min(d - 1, int(d * (1 - density))))
        score = torch.maximum(score, floor)
    scale = _minmax(score)
    merged = (clamped * scale).sum(dim=0) / scale.sum(dim=0).clamp_min(1e-12)
    return base + kw.get("lambda", 1.0) * merged.view_as(base)
