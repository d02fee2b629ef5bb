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

from ._common import torch, kth_largest, register

WEIGHT_FLOOR = 1e-6
DIVISOR_FLOOR = 1e-6


BLOCK = 1 << 20  # entries per variance step: the float64 temporaries stay at 8 MB


def variance(deltas: torch.Tensor) -> torch.Tensor:
    """``torch.var(deltas, dim=0, unbiased=False)`` bit for bit on float32, 2-3x faster: torch's CPU
    kernel runs Welford's update in float64 one entry at a time; the same update, vectorised over
    blocks of entries, rounds to the same float32 (the selection's threshold must not move by an ulp,
    or a near-tie picks another entry than mergekit does)."""
    if deltas.dtype != torch.float32:
        return torch.var(deltas, dim=0, unbiased=False)
    n = deltas.shape[0]
    flat = deltas.reshape(n, -1)
    out = torch.empty(flat.shape[1], dtype=torch.float32)
    for c0 in range(0, flat.shape[1], BLOCK):
        block = flat[:, c0:c0 + BLOCK]
        mean = block[0].double()
        m2 = torch.zeros_like(mean)
        for k in range(1, n):
            x = block[k].double()
            delta = x - mean
            mean += delta / (k + 1)
            m2 += delta * (x - mean)
        out[c0:c0 + BLOCK] = m2.div_(n)
    return out.view(deltas.shape[1:])


def select_mask(deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    """The entries kept by the variance top-k selection (bool, the shape of one delta)."""
    if select_topk <= 0:
        return torch.zeros_like(deltas[0], dtype=torch.bool)
    var = variance(deltas)
    k = int(torch.count_nonzero(var) * select_topk)  # a float32 product, as mergekit rounds it
    if k == 0:
        return torch.zeros_like(var, dtype=torch.bool)
    return var >= kth_largest(var.reshape(-1), k)


def sce_weights(deltas: torch.Tensor) -> list[float]:
    n = deltas.shape[0]
    means = torch.stack([deltas[i].square().mean() for i in range(n)])  # one model's square at a time
    total = float(means.sum())
    if abs(total) < WEIGHT_FLOOR:
        return [1.0 / n] * n
    return (means / total).tolist()


@register("sce", global_params=("select_topk", {"int8_mask": False}), paper="arXiv:2408.07990")
def sce(base: torch.Tensor, deltas: torch.Tensor, *, select_topk: float = 1.0, inplace: bool = False) -> torch.Tensor:
    """Variance top-k select, squared-magnitude weights, sign-elected weighted mean.
    ``inplace``: ``deltas`` may be overwritten (the engine's own buffer)."""
    if select_topk < 1:
        mask = select_mask(deltas, select_topk)
        deltas = deltas.mul_(mask) if inplace else deltas * mask
        del mask
    elif not inplace:
        deltas = deltas.clone()
    weights = sce_weights(deltas)
    # In sign-normalised space (times the elected sign s) an entry agrees iff it is > 0, so the
    # weighted sum of the agreeing entries is s * sum_i w_i relu(s tau_i): no (n, ...) temporaries.
    sign = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0)
    merged = torch.zeros_like(sign)
    divisor = torch.zeros_like(sign)
    for i, w in enumerate(weights):
        row = deltas[i].mul_(sign).clamp_(min=0)
        merged.add_(row, alpha=w)
        divisor.add_(row.sign_(), alpha=w)
    merged.mul_(sign).div_(divisor.clamp_(min=DIVISOR_FLOOR))
    return merged.add_(base)
