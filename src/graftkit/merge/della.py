"""DELLA-Merging - Deep, Tam, Pappas, Patel, Sra, 2024, "DELLA-Merging: Reducing Interference in
Model Merging through Magnitude-Based Sampling" (arXiv:2406.11617).

Per model, each task vector ``tau_i = theta_i - theta_0`` is pruned by MAGPRUNE, then merged:

1. **Drop (MAGPRUNE)**: entries are ranked by ``|tau_i|`` along a row - for a matrix each row
   (``dim 1``) separately, a vector as one row, a higher-rank tensor along its dimension 1, as
   mergekit does. With ``r`` the 0-based ascending rank and ``m`` the row length, an entry is kept
   with probability ``p = (density - epsilon) + 2 * epsilon * r / (m - 1)``: the smallest entry
   of a row is kept with ``density - epsilon``, the largest with ``density + epsilon``, so the
   expected kept share is ``density``. ``epsilon`` is per model (default 0.15); a config needs
   ``0 < density - epsilon`` and ``density + epsilon < 1`` wherever ``density < 1``.
2. **Rescale** (``rescale: true``, default): the survivors are scaled so the pruned delta has the
   L1 norm of the unpruned one (skipped when either norm is below ``1e-7``) - mergekit's rule;
   the paper rescales each survivor by ``1 / p`` instead (equal in expectation for the norm).
3. **Merge**: ``della`` weights the pruned deltas, elects a sign per entry (the sign of
   ``sum_i w_i tau_i``, TIES) and sums the agreeing ones, divided by their summed weight when
   ``normalize`` (default on for ``della``); ``della_linear`` is the weighted sum (``normalize``
   off by default, then divided by ``sum_i w_i``). ``theta = theta_0 + lambda * merged``.

``density >= 1`` skips the drop, so ``della`` at density 1 is TIES at density 1 and
``della_linear`` at density 1 is task arithmetic, bit for bit what mergekit computes.

Randomness: one generator per (seed, tensor, model), as DARE (a seeded merge is reproducible
whatever the thread order). With ``epsilon = 0`` the keep probability is ``density`` everywhere
and the mask is DARE's own (the same random bits); otherwise an entry is kept when a uniform
float32 draw falls below its ``p``. mergekit draws from torch's global generator, so the two
agree in distribution (kept share per rank, L1 norm), never mask for mask.

Differences from mergekit: a row of one entry (an ``(n, 1)`` matrix or a one-element vector)
has no ranks; it is kept with probability ``density`` here, where mergekit stops with a
probability error. Ties in magnitude are ranked in index order (mergekit's unstable sort may order
them differently; only zero deltas tie in practice, and dropping a zero changes nothing).
"""
from __future__ import annotations

from ._common import torch, as_list, finish, generators, random_keep_, register

_PARAMS = ("weight", "density", "epsilon")
_GLOBAL = ("normalize", "rescale", "seed", {"lambda": 1.0, "int8_mask": False})
_CAPS = {"random": True, "paper": "arXiv:2406.11617"}

RESCALE_EPS = 1e-7


def keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """MAGPRUNE's per-entry keep probability for one model's delta (same shape as ``delta``)."""
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    moved = rows.movedim(1, -1)  # rank along dimension 1, as mergekit does
    flat = moved.reshape(-1, moved.shape[-1])
    m = flat.shape[1]
    if m < 2:
        return torch.full_like(delta, density)
    order = torch.argsort(flat.abs(), dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(m, dtype=order.dtype).expand_as(order))
    probs = ranks.to(torch.float32).mul_(2 * epsilon / (m - 1)).add_(density - epsilon)
    return probs.view(moved.shape).movedim(-1, 1).reshape(delta.shape)


def magprune_(row: torch.Tensor, density: float, epsilon: float, rescale: bool,
              generator: torch.Generator | None) -> torch.Tensor:
    """In place: MAGPRUNE one model's delta (``density < 1``), then the L1 rescale."""
    before = float(row.abs().sum()) if rescale else 0.0
    if epsilon == 0:
        random_keep_(row, density, generator)
    else:
        probs = keep_probabilities(row, density, epsilon)
        draws = torch.rand(row.shape, generator=generator, dtype=torch.float32)
        row.mul_(draws < probs)
    if rescale:
        after = float(row.abs().sum())
        if before >= RESCALE_EPS and after >= RESCALE_EPS:
            row.mul_(before / after)
    return row


def magprune(deltas: torch.Tensor, density, epsilon, rescale: bool = True, seed: int | None = None) -> torch.Tensor:
    n = deltas.shape[0]
    dens, eps = as_list(density, n, "density"), as_list(epsilon, n, "epsilon")
    gens = generators(seed, n)
    out = deltas.clone()
    for i in range(n):
        if dens[i] < 1:
            magprune_(out[i], dens[i], eps[i], rescale, gens[i])
    return out


@register("della", model_params=_PARAMS, global_params=_GLOBAL, **_CAPS)
def della(base: torch.Tensor, deltas: torch.Tensor, *, weight=1.0, density=1.0, epsilon=0.15, normalize: bool = True,
          rescale: bool = True, seed: int | None = None, **kw) -> torch.Tensor:
    """MAGPRUNE drop and L1 rescale per model, then TIES sign election and disjoint (weighted) mean."""
    return finish(base, magprune(deltas, density, epsilon, rescale, seed), weight, consensus=True, normalize=normalize,
                  lam=kw.get("lambda", 1.0))


@register("della_linear", model_params=_PARAMS, global_params=_GLOBAL, **_CAPS)
def della_linear(base: torch.Tensor, deltas: torch.Tensor, *, weight=1.0, density=1.0, epsilon=0.15,
                 normalize: bool = False, rescale: bool = True, seed: int | None = None, **kw) -> torch.Tensor:
    """MAGPRUNE drop and L1 rescale per model, then the weighted sum."""
    return finish(base, magprune(deltas, density, epsilon, rescale, seed), weight, consensus=False, normalize=normalize,
                  lam=kw.get("lambda", 1.0))
