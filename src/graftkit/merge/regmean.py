"""RegMean - Jin et al., 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models"
(arXiv:2212.09849).

Each linear layer is merged to the weight whose outputs are closest, in least squares, to every
model's own outputs on that model's inputs: with ``X_t`` the inputs layer ``W`` sees in model
``t`` and ``G_t = X_t^T X_t`` their Gram matrix,

    W* = argmin_W sum_t ||X_t W^T - X_t W_t^T||^2 = (sum_t G_t W_t^T)^T (sum_t G_t)^-1   (torch's (out, in) layout)

i.e. ``W*^T = (sum_t G_t)^-1 sum_t G_t W_t^T``, solved in float64 (least squares if ``sum_t G_t``
is singular). As the paper does, the off-diagonal entries of every ``G_t`` are scaled by ``alpha``
(its ``reduce_non_diagonal_ratio``; 1 is the plain closed form, 0 gives a per-input-feature
weighted average) - it regularises towards averaging and keeps the system well conditioned.

graftkit's choices (docs/merge.md): each ``G_t`` is the *mean* over model t's non-padding tokens
(``X_t^T X_t / N_t``; the paper's sums differ from it by the per-model factor ``N_t``, so that a
model with longer examples does not outweigh the others); a per-model ``weight`` (default 1)
multiplies ``G_t``; GPT-2's ``Conv1D`` layers (weights stored (in, out)) are solved in their own
orientation, ``W* = (sum_t G_t)^-1 sum_t G_t W_t``; every tensor that is not such a weight with statistics
(embeddings, norms, biases) is the weighted average
``sum_t w_t theta_t / sum_t w_t``, as in the paper. The Gram matrices come from
:mod:`graftkit.merge.data` (``data: {task: ..., examples: N}``). mergekit has no RegMean.
"""
from __future__ import annotations

from ._common import as_list, register, torch


def weighted_mean(models, ws: list[float]) -> torch.Tensor:
    out = torch.zeros(models[0].shape, dtype=torch.float32)
    for m, w in zip(models, ws):
        out.add_(m, alpha=w)
    total = sum(ws)
    return out.div_(total) if abs(total) >= 1e-8 else out


def reduce_non_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * G + (1 - alpha) * diag(G)``: the off-diagonal entries scaled by ``alpha``."""
    if alpha == 1:
        return gram
    return gram * alpha + torch.diag(torch.diagonal(gram) * (1 - alpha))


@register("regmean", needs_base=False, inputs="model", model_params=("weight",), global_params=("alpha",),
          paper="arXiv:2212.09849", data="gram")
def regmean(base, models: torch.Tensor, *, weight=1.0, alpha: float = 0.9, grams=None) -> torch.Tensor:
    """RegMean of one tensor: ``models`` (n, out, in) with ``grams`` [n x (in, in)] - (n, in, out)
    when ``grams.in_out`` (GPT-2's Conv1D, :class:`graftkit.merge.data.KeyStatistics`) - or a
    weighted average where there are no Gram matrices. ``base`` is ignored."""
    n = models.shape[0]
    ws = as_list(weight, n, "weight")
    if grams is None or models.dim() != 3:
        return weighted_mean(models, ws)
    in_out = getattr(grams, "in_out", False)  # GPT-2's Conv1D stores W^T: (in, out)
    in_features = models.shape[1] if in_out else models.shape[2]
    out_features = models.shape[2] if in_out else models.shape[1]
    if len(grams) != n or any(tuple(g.shape) != (in_features, in_features) for g in grams):
        raise ValueError(f"regmean: expected {n} Gram matrices of shape ({in_features}, {in_features}), "
                         f"got {[tuple(g.shape) for g in grams]}")
    lhs = torch.zeros((in_features, in_features), dtype=torch.float64)
    rhs = torch.zeros((in_features, out_features), dtype=torch.float64)
    for w, g, m in zip(ws, grams, models):
        g = reduce_non_diagonal(g.double(), float(alpha)) * w
        lhs += g
        rhs += g @ (m.double() if in_out else m.double().T)
    solved, info = torch.linalg.solve_ex(lhs, rhs)
    if int(info) != 0:  # a feature no example ever activates: the least-squares solution of smallest norm
        solved = torch.linalg.lstsq(lhs, rhs, driver="gelsd").solution
    return (solved if in_out else solved.T).float().contiguous()
