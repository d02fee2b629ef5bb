"""Arcee Fusion - keep only the other model's most important changes (Arcee AI; mergekit's
``arcee_fusion``, no paper: arcee.ai's "Arcee Fusion" announcement, implemented in mergekit).

Per tensor, with ``a`` the base and ``b`` the other model:

1. importance ``I = |b - a| * KL``, where ``KL`` is, for each row (each vector along the last
   dimension; a 1-D tensor is one row), ``sum_j p_j log(p_j / q_j)`` with
   ``p = softmax(b_row) + 1e-8`` and ``q = softmax(a_row) + 1e-8``: a change counts more in a row
   whose values, read as logits, the fine-tune shifted more;
2. a dynamic threshold ``median(I) + 1.5 * (Q3(I) - Q1(I))`` (the upper Tukey fence), where the
   quantile ``q`` is the ascending order statistic at index ``floor(q * (numel - 1))``, no
   interpolation;
3. ``out = a + (b - a) * [I >= threshold]``: entries at or above the fence take ``b``, all others
   keep the base.

Differs from mergekit 0.1.5 in one place: for a tensor of more than 10^6 entries mergekit takes
the three quantiles from a random sample of 10^6 entries (with replacement, so its output changes
from run to run); graftkit uses the exact order statistics of the whole tensor, so the merge is
deterministic. On tensors up to 10^6 entries both compute the same thing.
"""
from __future__ import annotations

from ._common import torch, register

SOFTMAX_EPS = 1e-8
QUANTILES = (0.25, 0.5, 0.75)


def importance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|b - a|`` scaled by the KL divergence of each row's softmax (``b`` against ``a``)."""
    p = torch.softmax(b, dim=-1) + SOFTMAX_EPS
    q = torch.softmax(a, dim=-1) + SOFTMAX_EPS
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (b - a).abs() * kl


def order_statistic(flat: torch.Tensor, q: float) -> torch.Tensor:
    """The ascending order statistic at index ``floor(q * (n - 1))`` (0-based), with the index
    rounded through float32 as mergekit's float32 quantile tensor does."""
    n = flat.numel()
    index = int(torch.tensor(q, dtype=torch.float32) * (n - 1))
    return torch.kthvalue(flat, index + 1).values


@register("arcee_fusion", inputs="model", min_models=2, max_models=2, base_as_input=True, paper="arcee.ai (Arcee Fusion)")
def arcee_fusion(base: torch.Tensor, models: torch.Tensor) -> torch.Tensor:
    """``models`` is ``(2, *shape)``: ``models[0]`` the base, ``models[1]`` the other model."""
    a, b = models[0], models[1]
    score = importance(a, b)
    flat = score.reshape(-1)
    q1, median, q3 = (order_statistic(flat, q) for q in QUANTILES)
    keep = (score >= median + 1.5 * (q3 - q1)).to(a.dtype)
    return a + (b - a) * keep
