"""Fisher merging - Matena & Raffel, 2022, "Merging Models with Fisher-Weighted Averaging"
(arXiv:2111.09832).

Every parameter entry is the average of the models' entries weighted by each model's diagonal
Fisher information there (how sharply that model's likelihood depends on the entry):

    theta*_j = sum_i w_i F_ij theta_ij / sum_i w_i F_ij,     F_ij <- max(F_ij, epsilon)

``w_i`` is mergekit's per-model ``weight`` (default 1; the paper's lambda_i); ``epsilon`` (default
1e-10) is the floor the paper's code also applies, so an entry no model's Fisher sees (all
``F_ij`` below it) falls back to the weighted average ``sum_i w_i theta_ij / sum_i w_i``, and
so does every tensor without Fisher statistics (one no example sends a gradient to).

The diagonal Fishers are computed by :mod:`graftkit.merge.data` on each model's own examples
(``data: {task: ..., examples: N}``): for classifiers by default the paper's exact expectation
over the model's predictive distribution, ``fisher: empirical`` for the squared gradients of the
labels' log-likelihood; causal LMs use the latter (see :func:`graftkit.merge.data.fisher_diagonals`).
mergekit has no Fisher merging.
"""
from __future__ import annotations

from ._common import as_list, register, torch
from .regmean import weighted_mean


@register("fisher", needs_base=False, inputs="model", model_params=("weight",), global_params=("epsilon",),
          paper="arXiv:2111.09832", data="fisher")
def fisher(base, models: torch.Tensor, *, weight=1.0, epsilon: float = 1e-10, fishers=None) -> torch.Tensor:
    """Fisher-weighted average of one tensor: ``models`` (n, *shape), ``fishers`` [n x shape]
    (or ``None``: the weighted average). ``base`` is ignored."""
    n = models.shape[0]
    ws = as_list(weight, n, "weight")
    if fishers is None:
        return weighted_mean(models, ws)
    if len(fishers) != n or any(tuple(f.shape) != tuple(models.shape[1:]) for f in fishers):
        raise ValueError(f"fisher: expected {n} Fisher tensors of shape {tuple(models.shape[1:])}, "
                         f"got {[tuple(f.shape) for f in fishers]}")
    num = torch.zeros(models.shape[1:], dtype=torch.float64)
    den = torch.zeros(models.shape[1:], dtype=torch.float64)
    for w, f, m in zip(ws, fishers, models):
        fw = f.double().clamp(min=float(epsilon)) * w
        num += fw * m.double()
        den += fw
    return (num / den).float()
