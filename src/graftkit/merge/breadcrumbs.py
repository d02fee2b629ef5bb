"""Model Breadcrumbs - Davari & Belilovsky, 2023, "Model Breadcrumbs: Scaling Multi-Task Model
Merging with Sparse Masks".

Per tensor and per model, drop both tails of ``|tau_i|``: the ``gamma`` share of largest
magnitudes (outliers) and the smallest ones, keeping ``int(density*numel)`` entries - exactly
mergekit's ``magnitude_outliers`` ranks: ascending ranks ``[n_bot, n_bot + target)`` with
``n_top = int(gamma*numel)``, ``n_bot = max(0, numel - target - n_top)``.

* ``breadcrumbs``: ``theta_0 + lambda * sum_i w_i m_i tau_i`` (``normalize`` off by default).
* ``breadcrumbs_ties``: the same masks, then TIES' sign election and disjoint merge
  (``normalize`` off by default, as in mergekit).
"""
from __future__ import annotations

from ._common import torch, as_list, band_mask, finish, register

_PARAMS = ("weight", "density", "gamma")
_GLOBAL = ("normalize", {"lambda": 1.0, "int8_mask": False})


def crumbs(deltas: torch.Tensor, density, gamma, inplace: bool = False) -> torch.Tensor:
    n = deltas.shape[0]
    dens, gam = as_list(density, n, "density"), as_list(gamma, n, "gamma")
    out = deltas if inplace else deltas.clone()
    for i in range(n):
        if dens[i] < 1:
            out[i].mul_(band_mask(out[i], dens[i], gam[i]))
    return out


@register("breadcrumbs", model_params=_PARAMS, global_params=_GLOBAL, paper="arXiv:2312.06795", nan_propagating=True)
def breadcrumbs(base: torch.Tensor, deltas: torch.Tensor, *, weight=1.0, density=1.0, gamma=0.01,
                normalize: bool = False, inplace: bool = False, **kw) -> torch.Tensor:
    """Two-tailed magnitude mask per model, weighted sum."""
    return finish(base, crumbs(deltas, density, gamma, inplace), weight, consensus=False, normalize=normalize,
                  lam=kw.get("lambda", 1.0), inplace=inplace)


@register("breadcrumbs_ties", model_params=_PARAMS, global_params=_GLOBAL, paper="arXiv:2312.06795", nan_propagating=True)
def breadcrumbs_ties(base: torch.Tensor, deltas: torch.Tensor, *, weight=1.0, density=1.0, gamma=0.01,
                     normalize: bool = False, inplace: bool = False, **kw) -> torch.Tensor:
    """Two-tailed magnitude mask per model, then TIES sign election and disjoint merge."""
    return finish(base, crumbs(deltas, density, gamma, inplace), weight, consensus=True, normalize=normalize,
                  lam=kw.get("lambda", 1.0), inplace=inplace)
