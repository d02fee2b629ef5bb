"""Intruder dimensions of a fine-tuned weight matrix.

Shuttleworth, Andreas, Torralba and Sharma, "LoRA vs Full Fine-tuning: An Illusion of
Equivalence" (2024, arXiv:2410.21228), Algorithm 1: take the SVDs ``W0 = U0 S0 V0^T`` and
``Wt = Ut St Vt^T``; the j-th of the top-k left singular vectors of the fine-tuned matrix is an
*intruder* when ``max_i |cos(Ut[:, j], U0[:, i])| < epsilon`` over every singular vector of the
base. LoRA at low rank adds such new high-ranking directions; full fine-tuning mostly rotates
the existing ones a little.

Defaults ``k = 10`` and ``epsilon = 0.5`` follow the paper's setting as carried by the authors'
reference and by peft 0.21's ``reduce_intruder_dimension`` (``top_k=10, threshold_epsilon=0.5``);
the paper also sweeps epsilon, so both are parameters. Singular vectors are unit vectors, so
the cosine is the inner product; the sign of a singular vector is arbitrary, hence ``|.|``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TOP_K = 10
EPSILON = 0.5


def left_singular_vectors(w: "torch.Tensor") -> "torch.Tensor":
    """``U`` of the reduced SVD of ``w`` in float32 (columns sorted by decreasing singular value)."""
    import torch

    u, _, _ = torch.linalg.svd(w.float(), full_matrices=False)
    return u


def max_cosines(base_u: "torch.Tensor", tuned_w: "torch.Tensor", k: int = TOP_K) -> list[float]:
    """For each of the top-``k`` left singular vectors of ``tuned_w``: its largest ``|cos|`` to any
    column of ``base_u`` (the base's left singular vectors)."""
    if tuned_w.dim() != 2:
        raise ValueError(f"intruder dimensions are defined for matrices; got a tensor of shape {tuple(tuned_w.shape)}")
    tuned_u = left_singular_vectors(tuned_w)[:, :k]
    return (tuned_u.T @ base_u.float()).abs().max(dim=1).values.tolist()


def intruder_count(base_w: "torch.Tensor", tuned_w: "torch.Tensor", k: int = TOP_K, epsilon: float = EPSILON,
                   base_u: "torch.Tensor | None" = None) -> int:
    """Number of intruder dimensions among the top-``k`` singular vectors of ``tuned_w``.

    ``base_u`` may carry a precomputed :func:`left_singular_vectors` of ``base_w`` (one base SVD
    serves every fine-tune of the same matrix).
    """
    if tuple(base_w.shape) != tuple(tuned_w.shape):
        raise ValueError(f"base {tuple(base_w.shape)} and fine-tuned {tuple(tuned_w.shape)} matrices differ in shape")
    if base_u is None:
        base_u = left_singular_vectors(base_w)
    return sum(1 for c in max_cosines(base_u, tuned_w, k) if c < epsilon)
