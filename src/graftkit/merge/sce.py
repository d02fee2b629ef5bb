"""SCE - Wan et al., 2024, "FuseChat: Knowledge Fusion of Chat Models" (arXiv:2408.07990), the
Select, Calculate, Erase merge of its target models.

Per tensor, on the task vectors ``tau_i = theta_i - theta_0`` of the n models:

1. **Select** (``select_topk < 1``): the variance across the models of each entry,
   ``var = mean_i (tau_i - mean tau)^2``; of the entries with a nonzero variance keep the
   ``k = int(count_nonzero(var) * select_topk)`` with the largest variance in every task vector
   and zero the rest (``k = 0`` zeroes everything: the base). Entries tying the k-th variance
   exactly are all kept (the trimming rule of the other methods; mergekit's ``topk`` keeps
   exactly k, so only exact float ties could differ).
2. **Calculate**: per model the weight ``w_i = mean(tau_i^2)`` over the selected task vector,
   normalised to sum 1; when ``sum_i mean(tau_i^2) < 1e-6`` the weights are uniform ``1/n``
   (mergekit's rule: with deltas around 1e-3 that threshold is met, and the merge turns into a
   plain sign-elected mean).
3. **Erase**: elect the sign of ``sum_i tau_i`` per entry (a zero sum elects +) and drop the
   entries of the other sign (and zeros);
   ``theta = theta_0 + sum_i w_i m_i tau_i / max(sum_i w_i m_i, 1e-6)``.

This is mergekit's ``sce`` (0.1.5): same parameters (``select_topk``; ``int8_mask`` only changes
mergekit's memory use), no per-model weights. With one model the variance is zero everywhere,
so ``select_topk < 1`` returns the base (as mergekit); ``select_topk: 1`` returns that model.
"""
from __future__ import annotations

from ._common import torch, column, elect_sign_mask, kth_largest, register

WEIGHT_FLOOR = 1e-6
DIVISOR_FLOOR = 1e-6


def select_mask(deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    """The entries kept by the variance top-k selection (bool, the shape of one delta)."""
    if select_topk <= 0:
        return torch.zeros_like(deltas[0], dtype=torch.bool)
    var = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * select_topk)  # a float32 product, as mergekit rounds it
    if k == 0:
        return torch.zeros_like(var, dtype=torch.bool)
    return var >= kth_largest(var.reshape(-1), k)


def sce_weights(deltas: torch.Tensor) -> torch.Tensor:
    n = deltas.shape[0]
    weights = deltas.square().reshape(n, -1).mean(dim=1)
    total = float(weights.sum())
    if abs(total) < WEIGHT_FLOOR:
        return torch.full((n,), 1.0 / n, dtype=deltas.dtype)
    return weights / total


@register("sce", global_params=("select_topk", {"int8_mask": False}), paper="arXiv:2408.07990")
def sce(base: torch.Tensor, deltas: torch.Tensor, *, select_topk: float = 1.0) -> torch.Tensor:
    """Variance top-k select, squared-magnitude weights, sign-elected weighted mean."""
    if select_topk < 1:
        deltas = deltas * select_mask(deltas, select_topk)
    erase = elect_sign_mask(deltas)
    w = column(sce_weights(deltas).tolist(), deltas) * erase
    merged = (deltas * w).sum(dim=0) / w.sum(dim=0).clamp(min=DIVISOR_FLOOR)
    return base + merged
