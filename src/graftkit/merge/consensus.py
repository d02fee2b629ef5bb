"""Consensus merging with TALL masks - Wang et al., 2024, "Localizing Task Information for
Improved Model Merging and Compression" (ICML; code github.com/nik-dim/tall_masks).

1. the multi-task vector ``tau_MTL``: task arithmetic ``sum_i w_i tau_i`` (``consensus_ta``) or
   the TIES-merged delta with the given ``density`` (``consensus_ties``);
2. per task a TALL mask ``m_i = |tau_i| >= tall_lambda_i * |tau_MTL - tau_i|`` (``tall_lambda``
   per model, default 0.4 - the paper picks it per task on validation data in 0.2-0.6);
3. consensus: keep the entries that at least ``k`` tasks select (default 2), which removes the
   "selfish" weights (one task only) and the "catastrophic" ones (no task);
4. ``theta = theta_0 + lambda * (m_cons * tau_MTL)``.

All of it is elementwise, so one streaming pass suffices.
"""
from __future__ import annotations

from ._common import torch, as_list, column, register
from .ties import ties


def tall_mask(tau_t: torch.Tensor, tau_mtl: torch.Tensor, tall_lambda) -> torch.Tensor:
    """The TALL mask ``|tau_t| >= lambda_t * |tau_MTL - tau_t|``: the entries where task ``t``'s own
    change outweighs what the other tasks add there. ``tau_t`` may be stacked (n, ...) with a
    broadcastable ``tall_lambda``; analysis/tall.py (TALL compression) uses it too."""
    return tau_t.abs() >= tall_lambda * (tau_mtl - tau_t).abs()


def _consensus(base, deltas, tau_mtl, tall_lambda, k: int, lam: float) -> torch.Tensor:
    n = deltas.shape[0]
    lam_t = column(as_list(tall_lambda, n, "tall_lambda"), deltas)
    masks = tall_mask(deltas, tau_mtl.unsqueeze(0), lam_t)
    keep = masks.sum(dim=0) >= k
    return base + lam * torch.where(keep, tau_mtl, 0.0)


@register("consensus_ta", model_params=("weight", "tall_lambda"), global_params=("k", {"lambda": 1.0}))
def consensus_ta(base: torch.Tensor, deltas: torch.Tensor, *, weight=1.0, tall_lambda=0.4, k: int = 2,
                 **kw) -> torch.Tensor:
    """TALL-mask consensus on the task-arithmetic vector ``sum_i w_i tau_i``."""
    n = deltas.shape[0]
    tau = (deltas * column(as_list(weight, n, "weight"), deltas)).sum(dim=0)
    return _consensus(base, deltas, tau, tall_lambda, k, kw.get("lambda", 1.0))


@register("consensus_ties", model_params=("weight", "density", "tall_lambda"), global_params=("k", "normalize", {"lambda": 1.0}))
def consensus_ties(base: torch.Tensor, deltas: torch.Tensor, *, weight=1.0, density=1.0, tall_lambda=0.4, k: int = 2,
                   normalize: bool = True, **kw) -> torch.Tensor:
    """TALL-mask consensus on the TIES-merged vector (trim to ``density``, elect, disjoint mean)."""
    tau = ties(torch.zeros_like(base), deltas, weight=weight, density=density, normalize=normalize)
    return _consensus(base, deltas, tau, tall_lambda, k, kw.get("lambda", 1.0))
