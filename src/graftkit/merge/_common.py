"""Shared per-tensor building blocks of the merge methods (all torch, float32, vectorized).

Conventions used by every method in this package:

* ``deltas`` is one float32 tensor of shape ``(n, *shape)``: the task vectors
  ``tau_i = theta_i - theta_0`` of the n non-base models, stacked.
* Per-model parameters (``weight``, ``density``, ``gamma``, ...) are sequences of length n;
  global ones are scalars.
* Trimming is **per tensor** (as mergekit does): "keep the top ``density`` share" means the
  ``k = max(1, int(density * numel))`` largest magnitudes of that model's delta for this tensor.
  The threshold is the exact k-th largest magnitude, found by a radix select on the float bits
  (linear counting passes, see :func:`kth_largest`), not a sort; entries that tie the threshold
  exactly are all kept.
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


EXACT_BELOW = 1 << 16
_TOP_BINS = 1 << 15  # the top 16 bits of a non-negative float32: sign (0), exponent, 7 mantissa bits


def _first_at_least(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """Scanning ``counts`` from its last bin down: the bin where the running total reaches ``k``
    and the total of the bins above it."""
    above = counts.flip(0).cumsum(0)
    j = int(torch.searchsorted(above, torch.tensor([k], dtype=above.dtype)))
    return counts.numel() - 1 - j, int(above[j - 1]) if j > 0 else 0


RADIX_SLICE = 1 << 22  # elements per counting step: the int32 temporaries stay at 16 MB
_GUESS_SAMPLE = 1 << 16
_MAX_WINDOW_BINS = 16


def _rank_bins(top: torch.Tensor, ranks: list[int]) -> list[int]:
    """For each rank r (1 = largest), the top-16-bit bin that holds the r-th largest entry."""
    above = top.flip(0).cumsum(0)
    js = torch.searchsorted(above, torch.tensor(ranks, dtype=above.dtype))
    return [top.numel() - 1 - min(int(j), top.numel() - 1) for j in js]


def _select_in_window(slices, k: int, b_lo: int, b_hi: int) -> float | None:
    """One counting pass over every value whose top 16 bits lie in ``[b_lo, b_hi]``, counting what
    lies below and above that window; the exact k-th largest if it lies inside, else ``None``."""
    nb = b_hi - b_lo + 1
    width = nb << 16
    counts = None
    for part in slices:  # 0: below the window, 1..width: its values, width + 1: above it
        c = torch.bincount(torch.sub(part, (b_lo << 16) - 1).clamp_(0, width + 1), minlength=width + 2)
        counts = c if counts is None else counts.add_(c)
    above = int(counts[-1])
    inside = counts[1:-1].view(nb, 1 << 16)
    if not above < k <= above + int(inside.sum()):
        return None
    b, higher = _first_at_least(inside.sum(dim=1), k - above)  # the bin, then the value inside it
    lo16, _ = _first_at_least(inside[b], k - above - higher)
    value = torch.tensor([((b_lo + b) << 16) | lo16], dtype=torch.int32).view(torch.float32)
    return float(value)


def _radix_kth_largest(mag: torch.Tensor, k: int) -> float | None:
    """Exact k-th largest of a non-negative float32 tensor by a radix select on its bit patterns
    (for non-negative floats the int32 bit pattern orders like the value).

    The top 16 bits (sign, exponent, 7 mantissa bits) split the values into 32768 ordered bins.
    A strided sample of 65536 entries guesses the few bins around the k-th value (its rank +-4
    sigma); one counting pass over the whole tensor then counts everything below and above those
    bins and histograms the exact values inside them, which gives the answer if it lies inside
    (it nearly always does). Otherwise two full passes: a histogram of the top 16 bits finds the
    bin, a histogram of the values inside it the value. Linear counting passes in slices (small
    temporaries whatever the tensor's size), no sort, no copy of the data. The callers pass
    magnitudes (``abs()``); ``None`` when the sample or the full histogram meets a negative
    value (the caller falls back to ``torch.kthvalue``)."""
    bits = mag.reshape(-1).view(torch.int32)
    n = bits.numel()
    slices = [bits[s:s + RADIX_SLICE] for s in range(0, n, RADIX_SLICE)]
    step = max(1, n // _GUESS_SAMPLE)
    sample = bits[::step] >> 16
    m = sample.numel()
    try:
        top = torch.bincount(sample, minlength=_TOP_BINS)
    except RuntimeError:  # negative values: bincount takes non-negative keys only
        return None
    q = k / n
    spread = 4 * (m * q * (1 - q)) ** 0.5 + 2
    b_hi, b_lo = _rank_bins(top, [max(1, int(q * m - spread)), min(m, int(q * m + spread) + 1)])
    if b_hi - b_lo + 1 <= _MAX_WINDOW_BINS:
        found = _select_in_window(slices, k, b_lo, b_hi)
        if found is not None:
            return found
    top = torch.zeros(_TOP_BINS, dtype=torch.int64)
    try:
        for part in slices:
            top += torch.bincount(part >> 16, minlength=_TOP_BINS)
    except RuntimeError:  # negative values: bincount takes non-negative keys only
        return None
    b = _rank_bins(top, [k])[0]
    return _select_in_window(slices, k, b, b)


def kth_largest(mag: torch.Tensor, k: int) -> float:
    """The exact k-th largest value (1-based) of a 1-D tensor of magnitudes.

    Small tensors use ``torch.kthvalue``; large non-negative float32 ones a two-level radix
    select on the bit patterns (two linear counting passes; see :func:`_radix_kth_largest`).
    Both give the same value.
    """
    n = mag.numel()
    if n > EXACT_BELOW and mag.dtype == torch.float32:
        found = _radix_kth_largest(mag, k)
        if found is not None:
            return found
    return float(torch.kthvalue(mag.reshape(-1), n - k + 1).values)


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


def keep_at_least_(row: torch.Tensor, threshold: float, mag: torch.Tensor | None = None) -> torch.Tensor:
    """In place: zero the entries of ``row`` with ``|row| < threshold`` (ties kept).

    Bit for bit ``row.mul_(row.abs() >= threshold)`` (a zero keeps the entry's sign, and a NaN
    stays NaN, so the executor still finds a broken input in the output), but the comparison
    writes a float 0/1 mask straight into ``mag`` and the multiply is float x float: a third of
    the cost of a boolean mask. ``mag`` (``row.abs()``, float32, same shape) may be passed in; it
    is overwritten.
    """
    if mag is None:
        mag = row.abs()
    if row.dtype != torch.float32 or mag.dtype != torch.float32:
        return row.mul_(mag >= threshold)
    return row.mul_(torch.ge(mag, threshold, out=mag))


def trim_(row: torch.Tensor, density: float) -> torch.Tensor:
    """In place: zero all but the top ``density`` share of ``|row|`` (see :func:`topk_mask`)."""
    numel = row.numel()
    if density >= 1 or numel == 0:
        return row
    k = max(1, int(density * numel))
    mag = row.abs()
    return keep_at_least_(row, kth_largest(mag.reshape(-1), k), mag)


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


def _draws(numel: int, density: float, generator: torch.Generator | None) -> tuple[torch.Tensor, int]:
    """``numel`` uniform integers and the bound below which an entry is kept with probability
    ``density``: raw 64-bit words from the generator read as ``b``-bit integers, ``b`` the smallest
    of 8, 16 and 32 for which ``density * 2**b`` is a whole number (else 32), so the keep
    probability is ``density`` exactly (to 2**-33 otherwise), and 8-bit draws cost a quarter of
    ``torch.rand``'s."""
    for bits in (8, 16, 32):
        if float(density * 2**bits).is_integer():
            break
    per_word = 64 // bits
    words = torch.empty((numel + per_word - 1) // per_word, dtype=torch.int64)
    words.random_(-2**63, None, generator=generator)  # the full 64-bit range: every bit random
    signed = {8: torch.int8, 16: torch.int16, 32: torch.int32}[bits]
    return words.view(signed)[:numel], round(density * 2**bits) - 2 ** (bits - 1)  # draws uniform on [-2**(b-1), 2**(b-1))


def random_mask(shape, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """Bernoulli(density) keep-mask (DARE); see :func:`_draws` for the random bits."""
    if density >= 1:
        return torch.ones(shape, dtype=torch.bool)
    numel = 1
    for d in shape:
        numel *= d
    draws, bound = _draws(numel, density, generator)
    return (draws < bound).view(shape)


def random_keep_(row: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """In place: ``row.mul_(random_mask(row.shape, density, generator))`` - the same mask, the same
    result (NaN stays NaN) - with the comparison written as a float 0/1 mask and a float multiply."""
    if density >= 1:
        return row
    draws, bound = _draws(row.numel(), density, generator)
    if row.dtype != torch.float32 or not row.is_contiguous():
        return row.mul_((draws < bound).view(row.shape))
    keep = torch.lt(draws, bound, out=torch.empty(row.shape, dtype=torch.float32).view(-1))
    return row.mul_(keep.view(row.shape))


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
from dataclasses import dataclass  # noqa: E402
from typing import Any, Callable  # noqa: E402


@dataclass(frozen=True)
class Fused:
    """Which fused kernel of :mod:`.kernels` runs a method (read by :mod:`.fused`, which never
    imports torch). ``kernel``: ``"weighted_average"`` (the models themselves, no base) or
    ``"merge_deltas"`` (task vectors); for ``merge_deltas``, ``keep`` is how each delta is sparsified -
    ``"all"``, ``"threshold"`` (per-model magnitude trim to ``density``, TIES) or ``"random"`` (DARE's
    drop and ``1/density`` rescale) - and ``consensus`` turns on TIES' sign election."""

    kernel: str
    keep: str = "all"
    consensus: bool = False

    def __post_init__(self):  # a misspelt kernel would otherwise fall through to another one at merge time
        if self.kernel not in ("weighted_average", "merge_deltas") or self.keep not in ("all", "threshold", "random"):
            raise ValueError(f"no fused kernel {self.kernel!r} with keep={self.keep!r}")


@dataclass(frozen=True)
class Param:
    """One declared parameter: its value kind (``bool``, ``int``, ``float``, ``str`` or ``object``
    for anything), default, whether it is given per model, and whether a config must set it."""

    name: str
    kind: type
    default: Any
    per_model: bool
    required: bool = False


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: the pure per-tensor function plus everything the executor,
    the config checks and the fused path need to know about it. Nothing outside the method's own
    file compares method names; they ask these fields.

    ``inputs``: ``"delta"`` - the function gets ``(base, deltas)`` with ``deltas = models - base``;
    ``"model"`` - it gets ``(base_or_None, models)`` (linear, slerp).
    ``params``: the typed parameters (see :func:`register`); ``model_params`` / ``global_params``
    are views of them: name -> default (``None`` = required or unset).

    Capabilities (each default is the safe choice, so a method that declares nothing is merged
    correctly, only more slowly):

    * ``chunkable``: elementwise once per-model thresholds are known, so a large tensor may be
      merged in row chunks (default: whole tensors only);
    * ``thresholded``: trims each delta to its top ``density`` share by magnitude and accepts
      per-model ``threshold`` values; a chunked tensor's thresholds are found over the whole tensor
      first, and ``scope: global`` computes them over the whole model;
    * ``base_as_input``: the base model is the first of the models handed in (slerp);
    * ``needs_all_inputs_at_once``: the function takes one float32 ``(n, *shape)`` stack; ``False``
      means it accepts a list of the raw tensors and widens them itself (linear: no stack);
    * ``nan_propagating``: a NaN/Inf input always reaches the output (masks multiply, never
      select), so the output check alone finds it (default: the inputs are checked first);
    * ``fused``: the fused kernel that computes it bit for bit, if any (:class:`Fused`);
    * ``data``: the method needs a statistics pre-pass of this kind over examples (``"gram"``,
      ``"fisher"``, see :mod:`graftkit.merge.data`); the config must then carry a ``data:`` block,
      and the per-key merge passes the per-model statistics of that key as a keyword
      (``grams=[...]``, ``fishers=[...]``, or ``None`` for a key without statistics);
    * ``check``: ``check(cfg)`` raises a one-line ConfigError for what only this method refuses
      (run by the config validation after the generic checks).

    ``base_as_input`` with ``needs_base=False`` makes the base optional (nuslerp, multislerp,
    karcher): with a ``base_model`` it is the first model handed in, without one ``base`` is
    ``None``; ``min_models`` / ``max_models`` then count the models besides the base.
    """

    name: str
    fn: Callable
    needs_base: bool
    inputs: str = "delta"
    params: tuple = ()
    min_models: int = 1
    max_models: int | None = None
    random: bool = False
    paper: str = ""
    chunkable: bool = False
    thresholded: bool = False
    base_as_input: bool = False
    needs_all_inputs_at_once: bool = True
    nan_propagating: bool = False
    fused: Fused | None = None
    data: str | None = None
    check: Callable | None = None

    @property
    def model_params(self) -> dict:
        return {p.name: p.default for p in self.params if p.per_model}

    @property
    def global_params(self) -> dict:
        return {p.name: p.default for p in self.params if not p.per_model}

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


_NO_DEFAULT = object()
_KINDS = (bool, int, float, str)


def _kind(annotation, default) -> type:
    """A parameter's value kind from its annotation (a string under ``from __future__ import
    annotations``), else from its default's type; ``object`` when neither says."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    for kind in _KINDS:
        if text == kind.__name__:
            return kind
    if default is not None and default is not _NO_DEFAULT:
        return next((k for k in _KINDS if type(default) is k), object)
    return object


def _params(name: str, fn: Callable, declared, per_model: bool) -> list[Param]:
    """Typed parameters of ``fn``: ``declared`` is a sequence of keyword names, whose kind and
    default come from ``fn``'s signature (declared once, in the function), and dicts name ->
    default for the names a signature cannot carry (``lambda``) or that the function ignores
    (mergekit's ``int8_mask``)."""
    import inspect

    sig = inspect.signature(fn).parameters
    out = []
    items = []
    for entry in [declared] if isinstance(declared, dict) else declared:
        items.extend(entry.items() if isinstance(entry, dict) else [(entry, _NO_DEFAULT)])
    for pname, default in items:
        p = sig.get(pname)
        if default is _NO_DEFAULT:
            if p is None or p.kind not in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
                raise RuntimeError(f"merge method {name!r}: parameter {pname!r} is not a keyword of {fn.__name__}; "
                                   "declare it with a default (a dict) or add it to the signature")
            required = p.default is inspect.Parameter.empty
            value = None if required else p.default
            out.append(Param(pname, _kind(p.annotation, None if required else value), value, per_model, required))
        else:
            out.append(Param(pname, _kind(p.annotation if p is not None else "", default), default, per_model))
    return out


def register(name: str, *, needs_base: bool = True, inputs: str = "delta", model_params=(), global_params=(),
             min_models: int = 1, max_models: int | None = None, random: bool = False, paper: str = "",
             chunkable: bool = False, thresholded: bool = False, base_as_input: bool = False,
             needs_all_inputs_at_once: bool = True, nan_propagating: bool = False, fused: Fused | None = None,
             data: str | None = None, check: Callable | None = None):
    """Register ``fn`` in :data:`graftkit.registry.MERGES` under ``name`` with its capabilities
    (see :class:`MergeMethod`). ``model_params`` / ``global_params``: the per-model and global
    parameters, as keyword names of ``fn`` (kind and default read from its signature) or a dict
    name -> default."""
    from ..registry import MERGES

    def decorate(fn):
        params = _params(name, fn, model_params, True)
        taken = {p.name for p in params}
        params += [p for p in _params(name, fn, global_params, False) if p.name not in taken]
        MERGES.register(name)(MergeMethod(name, fn, needs_base, inputs, tuple(params), min_models, max_models, random,
                                          paper, chunkable, thresholded, base_as_input, needs_all_inputs_at_once,
                                          nan_propagating, fused, data=data, check=check))
        return fn

    return decorate


def finish(base: torch.Tensor | None, deltas: torch.Tensor, weight, consensus: bool, normalize: bool,
           lam: float, inplace: bool = False, scale=None) -> torch.Tensor:
    """Weight the (already sparsified) deltas, optionally elect signs (TIES), sum and scale.

    ``inplace``: ``deltas`` may be overwritten (the executor's own buffer); same result.
    ``scale``: per-model factors applied to the deltas with the weights (DARE's ``1/density``
    rescale folded into the weighted sum instead of a pass of its own); the ``normalize``
    divisor still sums the plain weights.
    """
    n = deltas.shape[0]
    ws = as_list(weight, n, "weight")
    scales = as_list(scale if scale is not None else 1.0, n, "scale")
    if not inplace:
        if scale is not None:
            deltas = deltas * column(scales, deltas)
        w = column(ws, deltas)
        weighted = deltas * w
        mask = elect_sign_mask(weighted) if consensus else None
        return combine(base, weighted, w, mask, normalize, lam)
    # Same arithmetic with few full-size passes and no (n, ...) temporaries: in sign-normalised
    # space (multiply by the elected sign s) an entry agrees with the vote iff it is > 0, so the
    # disjoint sum is s * sum_i relu(s * w_i tau_i).
    total = torch.zeros_like(deltas[0])  # from +0: the sum is never -0, so copysign elects + for 0
    for i, w in enumerate(ws):
        if w != 0:
            total.add_(deltas[i], alpha=w * scales[i])
    if not consensus:
        mixed = total
        if normalize:
            d = sum(ws)
            if abs(d) >= 1e-8:
                mixed.div_(d)
    else:
        sign = torch.ones_like(total).copysign_(total)  # = where(total >= 0, 1, -1), in one cheap pass
        mixed = total.zero_()
        divisor = torch.zeros_like(mixed) if normalize else None
        for i, w in enumerate(ws):
            if w == 0:
                continue
            # x = s * tau_i; w x > 0 iff (w > 0 and x > 0) or (w < 0 and x < 0); relu(w x) = w * clamp(x)
            row = deltas[i].mul_(sign)
            row.clamp_(min=0) if w > 0 else row.clamp_(max=0)
            mixed.add_(row, alpha=w * scales[i])
            if normalize:  # + w where the entry agrees: sign(row) is +1 (w > 0) or -1 (w < 0) there, else 0
                divisor.add_(row.sign_(), alpha=abs(w))
        mixed.mul_(sign)
        del sign
        if normalize:
            positive = [w for w in ws if w > 0]
            if positive and all(w >= 0 for w in ws):  # a non-zero divisor is >= the smallest weight: clamp is exact
                divisor.clamp_(min=min(positive))
            else:
                divisor.masked_fill_(divisor == 0, 1.0)
            mixed.div_(divisor)
    if lam != 1:
        mixed.mul_(lam)
    return mixed if base is None else mixed.add_(base)
