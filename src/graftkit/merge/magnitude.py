"""Magnitude pruning of task vectors, then task arithmetic (the "trim" step of TIES without the
sign election; Yadav et al., 2023, ablation; also the sparsification used before merging in
Yu et al., 2024, DARE, as the deterministic baseline).

``theta = theta_0 + lambda * sum_i w_i m_i tau_i`` where ``m_i`` keeps the top ``density`` share
of ``|tau_i|`` in the tensor (``k = max(1, int(density*numel))``); divided by ``sum_i w_i``
when ``normalize``.
"""
from __future__ import annotations

from ._common import torch, finish, register
from .ties import trim


@register("magnitude_prune", model_params=("weight", "density"), global_params=("normalize", "rescale", {"lambda": 1.0}),
          chunkable=True, thresholded=True, nan_propagating=True)
def magnitude_prune(base: torch.Tensor, deltas: torch.Tensor, *, weight=1.0, density=1.0, normalize: bool = False,
                    rescale: bool = False, inplace: bool = False, threshold=None, **kw) -> torch.Tensor:
    """Per-model top-``density`` magnitude trim, weighted sum; ``rescale`` multiplies survivors
    by ``1/density`` (as DARE does)."""
    trimmed = trim(deltas, density, threshold, inplace=inplace)
    if rescale:
        from ._common import as_list, column

        trimmed = trimmed / column(as_list(density, deltas.shape[0], "density"), trimmed)
    return finish(base, trimmed, weight, consensus=False, normalize=normalize, lam=kw.get("lambda", 1.0), inplace=inplace)
