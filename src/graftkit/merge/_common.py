"""Shared per-tensor building blocks of the merge methods (all torch, float32, vectorized).

Conventions used by every method in this package:

* ``deltas`` is one float32 tensor of shape ``(n, *shape)``: the task vectors
  ``tau_i = theta_i - theta_0`` of the n non-base models, stacked.
* Per-model parameters (``weight``, ``density``, ``gamma``, ...) are sequences of length n;
  global ones are scalars.
* Trimming is **per tensor** (as mergekit does): "keep the top ``density`` share" means the
  ``k = max(1, int(density * numel))`` largest magnitudes of that model's delta for this tensor.
  The threshold is found with ``torch.kthvalue`` (linear-time selection), not a full sort;
  entries that tie the threshold exactly are all kept.
"""
from __future__ import annotations

from typing import Sequence


class _LazyTorch:
    """``torch``, imported on first use: the method registry (and ``graft merge --dry-run``) must
    not pay torch's 1-2 s import."""

    def __getattr__(self, name: str):
        import torch as _torch

        return getattr(_torch, name)


torch = _LazyTorch()


def as_list(value, n: int, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{name}: expected {n} values (one per model), got {len(values)}")
    return values


def column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-model values shaped to broadcast against a stacked ``(n, *shape)`` tensor."""
    t = torch.tensor(list(values), dtype=like.dtype, device=like.device)
    return t.view(-1, *([1] * (like.dim() - 1)))


def kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value (1-based) of each row of a 2-D tensor, shape (rows, 1)."""
    return torch.kthvalue(flat, k, dim=1, keepdim=True).values


SAMPLE = 1 << 16
EXACT_BELOW = 1 << 20


def kth_largest(mag: torch.Tensor, k: int) -> float:
    """The exact k-th largest value of a 1-D tensor, in a few linear passes.

    Small tensors use ``torch.kthvalue``. Large ones first bracket the answer with the order
    statistics of a fixed-seed random sample (+-6 sigma), count what lies above the bracket, and
    select inside the (small) bracket; if the bracket misses - very unlikely - they fall back to
    ``torch.kthvalue`` on everything. The result is exact either way.
    """
    n = mag.numel()
    if n <= EXACT_BELOW:
        return float(torch.kthvalue(mag, n - k + 1).values)
    g = torch.Generator().manual_seed(n)
    sample = mag[torch.randint(0, n, (SAMPLE,), generator=g)].sort().values
    q = 1.0 - k / n
    sigma = (q * (1 - q) / SAMPLE) ** 0.5
    lo_i = max(0, int((q - 6 * sigma - 2 / SAMPLE) * SAMPLE))
    hi_i = min(SAMPLE - 1, int((q + 6 * sigma + 2 / SAMPLE) * SAMPLE) + 1)
    lo, hi = sample[lo_i], sample[hi_i]
    # in slices, so the boolean temporaries stay small whatever the tensor's size
    above, parts = 0, []
    for s in range(0, n, EXACT_BELOW * 2):
        part = mag[s:s + EXACT_BELOW * 2]
        above += int((part > hi).sum())
        parts.append(part[(part >= lo) & (part <= hi)])
    if above < k:
        band = torch.cat(parts)
        need = k - above  # the need-th largest inside the band
        if 0 < need <= band.numel():
            return float(torch.kthvalue(band, band.numel() - need + 1).values)
    return float(torch.kthvalue(mag, n - k + 1).values)


def topk_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask keeping the ``max(1, int(density*numel))`` largest ``|delta|`` (one model)."""
    numel = delta.numel()
    if density >= 1 or numel == 0:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    k = max(1, int(density * numel))
    mag = delta.abs()
    return mag >= kth_largest(mag.reshape(-1), k)


def trim_(row: torch.Tensor, density: float) -> torch.Tensor:
    """In place: zero all but the top ``density`` share of ``|row|`` (see :func:`topk_mask`)."""
    numel = row.numel()
    if density >= 1 or numel == 0:
        return row
    k = max(1, int(density * numel))
    mag = row.abs()
    thr = kth_largest(mag.reshape(-1), k)
    row.mul_(mag >= thr)
    return row


def band_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs mask: drop the ``gamma`` share of largest magnitudes, then the smallest ones,
    keeping ``int(density*numel)`` entries: ascending ranks ``[n_bot, n_bot + target)`` with
    ``target = int(density*numel)``, ``n_top = int(gamma*numel)``,
    ``n_bot = max(0, numel - target - n_top)`` (when density + gamma > 1 fewer outliers go)."""
    numel = delta.numel()
    if density >= 1 or numel == 0:
        return torch.ones_like(delta, dtype=torch.bool)
    target = int(density * numel)
    if target <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    n_top = int(gamma * numel)
    n_bot = max(0, numel - target - n_top)
    mag = delta.abs()
    flat = mag.reshape(-1)
    keep = torch.ones_like(mag, dtype=torch.bool)
    if n_bot > 0:  # the n_bot-th smallest is the (numel - n_bot + 1)-th largest
        keep &= mag > kth_largest(flat, numel - n_bot + 1)
    if n_bot + target < numel:
        keep &= mag <= kth_largest(flat, numel - n_bot - target + 1)
    return keep


def random_mask(shape, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """Bernoulli(density) keep-mask (DARE)."""
    if density >= 1:
        return torch.ones(shape, dtype=torch.bool)
    return torch.rand(shape, generator=generator) < density


def elect_sign_mask(weighted: torch.Tensor) -> torch.Tensor:
    """TIES sign election on weighted deltas (n, ...): the elected sign is the sign of the sum
    (the sign with the larger total mass; a zero sum elects +). An entry is kept when its own sign
    equals the elected sign, so zeros (trimmed or dropped entries) never count."""
    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
    return weighted.sign() == elected


def combine(base: torch.Tensor | None, weighted: torch.Tensor, weights: torch.Tensor,
            mask: torch.Tensor | None, normalize: bool, lam: float) -> torch.Tensor:
    """``base + lam * sum_i(mask_i w_i tau_i) / D`` where ``D = sum_i(mask_i w_i)`` when
    ``normalize`` (an entry with ``D == 0`` - nobody kept, or weights cancel - divides by 1)."""
    if mask is not None:
        mixed = torch.where(mask, weighted, 0.0).sum(dim=0)
    else:
        mixed = weighted.sum(dim=0)
    if normalize:
        w = weights.expand_as(weighted)
        divisor = torch.where(mask, w, 0.0).sum(dim=0) if mask is not None else w.sum(dim=0)
        if mask is not None:
            divisor = torch.where(divisor == 0, 1.0, divisor)
        else:
            divisor = torch.where(divisor.abs() < 1e-8, 1.0, divisor)
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return mixed if base is None else base + mixed


def generators(seed: int | None, n: int) -> list[torch.Generator | None]:
    if seed is None:
        return [None] * n
    return [torch.Generator().manual_seed(int(seed) * 1_000_003 + i) for i in range(n)]


# -- registration -----------------------------------------------------------------------------
from dataclasses import dataclass, field  # noqa: E402
from typing import Callable  # noqa: E402


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: the pure per-tensor function plus what the executor needs.

    ``inputs``: ``"delta"`` - the function gets ``(base, deltas)`` with ``deltas = models - base``;
    ``"model"`` - it gets ``(base_or_None, models)`` (linear, slerp).
    ``model_params`` / ``global_params``: parameter name -> default (``None`` = required).
    """

    name: str
    fn: Callable
    needs_base: bool
    inputs: str = "delta"
    model_params: dict = field(default_factory=dict)
    global_params: dict = field(default_factory=dict)
    min_models: int = 1
    max_models: int | None = None
    random: bool = False
    paper: str = ""


def register(name: str, *, needs_base: bool = True, inputs: str = "delta", model_params=None, global_params=None,
             min_models: int = 1, max_models: int | None = None, random: bool = False, paper: str = ""):
    from ..registry import MERGES

    def decorate(fn):
        MERGES.register(name)(MergeMethod(name, fn, needs_base, inputs, dict(model_params or {}), dict(global_params or {}),
                                          min_models, max_models, random, paper))
        return fn

    return decorate


def finish(base: torch.Tensor | None, deltas: torch.Tensor, weight, consensus: bool, normalize: bool,
           lam: float, inplace: bool = False) -> torch.Tensor:
    """Weight the (already sparsified) deltas, optionally elect signs (TIES), sum and scale.

    ``inplace``: ``deltas`` may be overwritten (the executor's own buffer); same result.
    """
    n = deltas.shape[0]
    ws = as_list(weight, n, "weight")
    if not inplace:
        w = column(ws, deltas)
        weighted = deltas * w
        mask = elect_sign_mask(weighted) if consensus else None
        return combine(base, weighted, w, mask, normalize, lam)
    # Same arithmetic with few full-size passes and no (n, ...) temporaries: in sign-normalised
    # space (multiply by the elected sign s) an entry agrees with the vote iff it is > 0, so the
    # disjoint sum is s * sum_i relu(s * w_i tau_i).
    total = torch.zeros_like(deltas[0])
    for i, w in enumerate(ws):
        if w != 0:
            total.add_(deltas[i], alpha=w)
    if not consensus:
        mixed = total
        if normalize:
            d = sum(ws)
            if abs(d) >= 1e-8:
                mixed.div_(d)
    else:
        sign = torch.where(total >= 0, 1.0, -1.0)
        mixed = total.zero_()
        divisor = torch.zeros_like(mixed) if normalize else None
        for i, w in enumerate(ws):
            if w == 0:
                continue
            # x = s * tau_i; w x > 0 iff (w > 0 and x > 0) or (w < 0 and x < 0); relu(w x) = w * clamp(x)
            row = deltas[i].mul_(sign)
            row.clamp_(min=0) if w > 0 else row.clamp_(max=0)
            mixed.add_(row, alpha=w)
            if normalize:
                divisor.add_(row != 0, alpha=w)
        mixed.mul_(sign)
        if normalize:
            divisor.masked_fill_(divisor == 0, 1.0)
            mixed.div_(divisor)
    if lam != 1:
        mixed.mul_(lam)
    return mixed if base is None else mixed.add_(base)
