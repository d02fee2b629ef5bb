"""RAM - Reinforced Agent Merging (arXiv:2601.13572), as mergekit 0.1.5 implements it per tensor.

Meant for models fine-tuned from one base by reinforcement learning, whose task vectors are
sparse: most entries do not move at all. On the task vectors ``tau_i = theta_i - theta_0``:

* an entry *contributes* for model i when ``|tau_i| > epsilon`` (default ``1e-5``); ``c`` is the
  number of models that contribute to it;
* ``ram``: entries one model changed (``c = 1``) take that model's change whole, entries several
  changed take the mean of their changes, nobody's changes stay at the base:
  ``theta = theta_0 + sum_i [|tau_i| > eps] tau_i / max(c, 1)`` (an average over the
  contributors that does not dilute a change by the models that left the entry alone);
* ``ramplus_tl`` (RAM+, tensor-local): a model whose changes mostly overlap with others' has its
  unique changes amplified. Per model and tensor,
  ``rho_i = #(contributing entries with c > 1) / max(#(contributing entries with c = 1), epsilon)``
  and ``lambda_i = 1 + r * clamp(rho_i, 0, alpha)`` (``r`` default 0.1, ``alpha`` 0.2); unique
  entries take ``lambda_i tau_i``, shared ones the mean as in ``ram``.

Same parameters and defaults as mergekit; ``theta`` agrees with mergekit to float32 rounding
(same arithmetic, same order). The counts are over the whole tensor (``ramplus_tl``), so it is
merged whole; RAM itself is elementwise.
"""
from __future__ import annotations

from ._common import torch, register


def _contributions(deltas: torch.Tensor, epsilon: float, inplace: bool):
    """The deltas zeroed where they do not count (``abs(tau_i) <= epsilon``) and divided by the
    number of models that change each entry (1 where it is unique, so those stay whole), which
    models count where, and the count per entry."""
    flat = deltas.reshape(deltas.shape[0], -1)
    contributes = flat.abs() > epsilon
    counts = contributes.sum(dim=0, keepdim=True)
    kept = flat.mul_(contributes) if inplace else flat * contributes
    return kept.div_(counts.clamp(min=1)), contributes, counts


@register("ram", global_params=("epsilon",), paper="arXiv:2601.13572")
def ram(base: torch.Tensor, deltas: torch.Tensor, *, epsilon: float = 1e-5, inplace: bool = False) -> torch.Tensor:
    """Changes a single model made are kept whole; changes several made are averaged.
    ``inplace``: ``deltas`` may be overwritten (the engine's own buffer)."""
    shares, _, _ = _contributions(deltas, epsilon, inplace)
    return base + shares.sum(dim=0).view_as(base)


@register("ramplus_tl", global_params=("r", "alpha", "epsilon"), paper="arXiv:2601.13572")
def ramplus_tl(base: torch.Tensor, deltas: torch.Tensor, *, r: float = 0.1, alpha: float = 0.2,
               epsilon: float = 1e-5, inplace: bool = False) -> torch.Tensor:
    """RAM with each model's unique changes scaled by ``1 + r * clamp(shared / unique, 0, alpha)``."""
    shares, contributes, counts = _contributions(deltas, epsilon, inplace)
    shared = counts > 1
    unique = (counts == 1)[0]
    n_shared = (contributes & shared).sum(dim=1)
    n_unique = (contributes & unique).sum(dim=1)
    rho = n_shared / n_unique.clamp(min=epsilon)
    scale = 1 + r * rho.clamp(min=0, max=alpha)
    for i, factor in enumerate(scale.tolist()):  # unique entries (divided by 1 above) times lambda_i
        shares[i].mul_(torch.where(unique, factor, 1.0))
    return base + shares.sum(dim=0).view_as(base)
