"""TIES-merging - Yadav et al., 2023, "TIES-Merging: Resolving Interference When Merging Models".

Three steps on the task vectors ``tau_i = theta_i - theta_0``:

1. **Trim**: keep the top ``density`` share of each ``|tau_i|`` (``k = max(1, int(density*numel))``),
   zero the rest. Per tensor by default, as mergekit does; ``scope: global`` in the merge config
   uses one threshold per model over the whole model (the paper's choice; two streaming passes,
   done by the executor, which passes the thresholds in ``threshold``).
2. **Elect**: ``gamma = sign(sum_i w_i tau_i_trimmed)`` per entry (a zero sum elects +).
3. **Disjoint merge**: average over the models whose weighted trimmed delta has the elected
   sign, weighted: ``sum_{i in A} w_i tau_i / sum_{i in A} w_i`` (``normalize: true``, default),
   or their weighted sum (``normalize: false``); entries nobody keeps stay at the base.

``theta = theta_0 + lambda * merged``. With density 1 and no sign conflicts this equals
task arithmetic with ``normalize: true``.
"""
from __future__ import annotations

from ._common import Fused, torch, as_list, finish, keep_at_least_, register, trim_


def trim(deltas: torch.Tensor, density, threshold=None, inplace: bool = False) -> torch.Tensor:
    n = deltas.shape[0]
    dens = as_list(density, n, "density")
    out = deltas if inplace else deltas.clone()
    for i in range(n):
        if threshold is not None and threshold[i] is not None:
            keep_at_least_(out[i], threshold[i])
        elif dens[i] < 1:
            trim_(out[i], dens[i])
    return out


@register("ties", model_params=("weight", "density"),
          global_params=("normalize", {"lambda": 1.0, "int8_mask": False, "scope": "tensor"}),
          paper="arXiv:2306.01708", chunkable=True, thresholded=True, nan_propagating=True,
          fused=Fused("merge_deltas", keep="threshold", consensus=True))
def ties(base: torch.Tensor, deltas: torch.Tensor, *, weight=1.0, density=1.0, normalize: bool = True,
         threshold=None, inplace: bool = False, **kw) -> torch.Tensor:
    """TIES: per-model magnitude trim to ``density``, sign election, disjoint (weighted) mean.

    ``threshold``: optional per-model magnitude thresholds (global scope) replacing ``density``.
    ``int8_mask`` is accepted for mergekit compatibility (it only changes mergekit's memory use).
    """
    return finish(base, trim(deltas, density, threshold, inplace), weight, consensus=True, normalize=normalize,
                  lam=kw.get("lambda", 1.0), inplace=inplace)
