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
CHUNK = 1 << 22  # entries ranked at a time: the sort's int64 indices stay at 32 MB


def _levels(m: int, density: float, epsilon: float) -> torch.Tensor:
    """The keep probability of ascending ranks 0..m-1 of a row of ``m`` entries."""
    if m < 2:
        return torch.full((m,), density, dtype=torch.float32)
    return torch.arange(m, dtype=torch.float32).mul_(2 * epsilon / (m - 1)).add_(density - epsilon)


def _rank_probs(rows: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Each entry's keep probability from its magnitude rank within its row (``rows`` is 2-D)."""
    mag = rows.abs()
    if mag.dtype == torch.float32:  # non-negative floats order as their bit patterns; an int sort is faster
        mag = mag.view(torch.int32)
    order = torch.argsort(mag, dim=1, stable=True)
    return torch.empty_like(rows, dtype=torch.float32).scatter_(1, order, levels.expand(order.shape))


def _as_rows(delta: torch.Tensor) -> torch.Tensor:
    """``delta`` as a 2-D (rows, ranked axis) tensor: a view for vectors and matrices, a copy with
    dimension 1 moved last for higher ranks."""
    if delta.dim() < 2:
        return delta.reshape(1, -1)
    if delta.dim() == 2:
        return delta
    return delta.movedim(1, -1).reshape(-1, delta.shape[1])


def keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """MAGPRUNE's per-entry keep probability for one model's delta (same shape as ``delta``)."""
    rows = _as_rows(delta)
    probs = _rank_probs(rows, _levels(rows.shape[1], density, epsilon))
    if delta.dim() > 2:
        moved = delta.movedim(1, -1).shape
        return probs.view(moved).movedim(-1, 1).contiguous()
    return probs.view(delta.shape)


def magprune_(row: torch.Tensor, density: float, epsilon: float, rescale: bool,
              generator: torch.Generator | None) -> torch.Tensor:
    """In place: MAGPRUNE one model's delta (``density < 1``), then the L1 rescale. Ranked and
    drawn in blocks of whole rows, so the temporaries stay small whatever the tensor's size."""
    before = float(row.abs().sum()) if rescale else 0.0
    if epsilon == 0:
        random_keep_(row, density, generator)
    else:
        rows = _as_rows(row)
        levels = _levels(rows.shape[1], density, epsilon)
        step = max(1, CHUNK // max(1, rows.shape[1]))
        for r0 in range(0, rows.shape[0], step):
            part = rows[r0:r0 + step]
            probs = _rank_probs(part, levels)
            draws = torch.rand(part.shape, generator=generator, dtype=torch.float32)
            part.mul_(draws.lt_(probs))  # a float 0/1 mask: a NaN delta stays NaN
        if row.dim() > 2:  # _as_rows copied: write the pruned rows back
            row.copy_(rows.view(row.movedim(1, -1).shape).movedim(-1, 1))
    if rescale:
        after = float(row.abs().sum())
        if before >= RESCALE_EPS and after >= RESCALE_EPS:
            row.mul_(before / after)
    return row


def magprune(deltas: torch.Tensor, density, epsilon, rescale: bool = True, seed: int | None = None,
             inplace: bool = False) -> torch.Tensor:
    n = deltas.shape[0]
    dens, eps = as_list(density, n, "density"), as_list(epsilon, n, "epsilon")
    gens = generators(seed, n)
    out = deltas if inplace else deltas.clone()
    for i in range(n):
        if dens[i] < 1:
            magprune_(out[i], dens[i], eps[i], rescale, gens[i])
    return out


@register("della", model_params=_PARAMS, global_params=_GLOBAL, **_CAPS)
def della(base: torch.Tensor, deltas: torch.Tensor, *, weight=1.0, density=1.0, epsilon=0.15, normalize: bool = True,
          rescale: bool = True, seed: int | None = None, inplace: bool = False, **kw) -> torch.Tensor:
    """MAGPRUNE drop and L1 rescale per model, then TIES sign election and disjoint (weighted) mean.
    ``inplace``: ``deltas`` may be overwritten (the engine's own buffer)."""
    return finish(base, magprune(deltas, density, epsilon, rescale, seed, inplace), weight, consensus=True,
                  normalize=normalize, lam=kw.get("lambda", 1.0), inplace=inplace)


@register("della_linear", model_params=_PARAMS, global_params=_GLOBAL, **_CAPS)
def della_linear(base: torch.Tensor, deltas: torch.Tensor, *, weight=1.0, density=1.0, epsilon=0.15,
                 normalize: bool = False, rescale: bool = True, seed: int | None = None, inplace: bool = False,
                 **kw) -> torch.Tensor:
    """MAGPRUNE drop and L1 rescale per model, then the weighted sum."""
    return finish(base, magprune(deltas, density, epsilon, rescale, seed, inplace), weight, consensus=False,
                  normalize=normalize, lam=kw.get("lambda", 1.0), inplace=inplace)
