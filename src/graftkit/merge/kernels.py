"""Fused merge kernels: the executor's fast path for the elementwise methods (numba, no torch).

The per-tensor functions of this package (``ties.py``, ``dare.py``, ...) are the reference:
readable torch, ~20 full-size float32 passes per tensor for TIES. These kernels compute the same
thing in one pass over the raw input bytes (bf16 or float32, read straight from the memory-mapped
safetensors), keeping every intermediate in registers, and write the output dtype directly:

* :func:`kth_largest_deltas` - each model's exact k-th largest ``|theta_i - theta_0|`` (TIES'
  trimming threshold): a strided sample brackets the k-th value, one pass counts what lies above
  the bracket and collects the few values inside it, a partial sort of those gives the value.
* :func:`merge_deltas` - trim (``|tau| >= threshold``) or DARE's random drop, weighted sum, TIES
  sign election and disjoint (weighted) mean, ``lambda``, ``+ theta_0``, rounding to the output.
* :func:`weighted_average` - linear soups.

They are compiled on first use and cached on disk (``cache=True``), and release the GIL, so the
executor's worker threads run them in parallel. The arithmetic follows the torch reference
operation for operation in float32; bf16 rounding is round-to-nearest-even as in torch's ``.to``.
The tests check the kernels against the reference functions.

DARE's random keep-mask here comes from a SplitMix64 stream per (seed, model), indexed by
the entry's position (counter-based): reproducible for a seed whatever the threads or chunking, and each entry is kept with
probability ``round(density * 2**32) / 2**32``.
"""
from __future__ import annotations

import numba as nb
import numpy as np
from numba import types
from numba.extending import intrinsic, overload

from ..rawbits import as_f32, random_draws, to_raw

BLOCK = 4096
KEEP_ALL, KEEP_ABOVE, KEEP_RANDOM = 0, 1, 2
_SAMPLE = 1 << 15


def _store(values, out):
    """Write a block of float32 ``values`` into ``out`` (see :func:`to_raw`); return how many are not
    finite (the executor redoes such a tensor on the reference path)."""


@overload(_store, inline="always")
def _store_typed(values, out):
    def store(values, out):
        bits = values.view(np.uint32)
        bad = 0
        for j in range(out.size):
            bad += 1 if (bits[j] & np.uint32(0x7F800000)) == np.uint32(0x7F800000) else 0
            out[j] = to_raw(values[j], out)
        return bad
    return store


@intrinsic
def _fma(typingctx, a, b, c):
    """``a * b + c`` rounded once (float32), as torch's ``add_(x, alpha=w)`` computes it on CPU:
    the weighted sums then round exactly like the reference functions'."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return sig, codegen


@nb.njit(inline="always")
def _divisor(weights, normalize):
    """Whether to divide by the weights' sum (``normalize`` and not ~0, as mergekit), and the sum."""
    total = 0.0
    for i in range(weights.size):
        total += weights[i]
    return normalize and abs(total) >= 1e-8, np.float32(total)


# Every loop below runs over block slices indexed from 0: indexing a whole array at
# ``start + j`` keeps LLVM from vectorizing the loop (about 10x slower).
@nb.njit(nogil=True, cache=True)
def kth_largest_deltas(base, models, ks):
    """Per model i with ``ks[i] > 0``: the exact ``ks[i]``-th largest ``|models[i] - base|`` in
    float32 (``nan`` for ``ks[i] <= 0``). ``base`` and every model: flat arrays of raw bits
    (uint16 = bf16, uint32 = float32), one dtype."""
    n = base.size
    m = len(models)
    out = np.full(m, np.nan, dtype=np.float32)
    mag_block = np.empty(BLOCK, dtype=np.float32)
    for i in range(m):
        k = ks[i]
        if k <= 0:
            continue
        src = models[i]
        found = False
        if n > 4 * _SAMPLE:
            step = n // _SAMPLE
            sample = np.empty(_SAMPLE, dtype=np.float32)
            for t in range(_SAMPLE):
                sample[t] = abs(as_f32(src[t * step]) - as_f32(base[t * step]))
            # the k-th largest of n sits near ascending rank (1 - k/n) * size of the sample; the
            # bracket is that rank +- 4 standard deviations (binomial)
            q = 1.0 - k / n
            spread = 4.0 * np.sqrt(_SAMPLE * q * (1.0 - q)) + 2.0
            lo_rank = max(0, int(q * _SAMPLE - spread))
            hi_rank = min(_SAMPLE - 1, int(q * _SAMPLE + spread) + 1)
            lower = np.partition(sample, lo_rank)[lo_rank]
            upper = np.partition(sample, hi_rank)[hi_rank]
            capacity = int(1.5 * (hi_rank - lo_rank + 2) * (n / _SAMPLE)) + BLOCK
            inside = np.empty(capacity + BLOCK, dtype=np.float32)
            count, above = 0, 0
            for start in range(0, n, BLOCK):
                bs = base[start:start + BLOCK]
                ms = src[start:start + BLOCK]
                mag = mag_block[:bs.size]
                block_above = 0
                for j in range(bs.size):
                    v = abs(as_f32(ms[j]) - as_f32(bs[j]))
                    mag[j] = v
                    block_above += 1 if v > upper else 0
                above += block_above
                if count <= capacity:  # branch-free compaction of the values inside the bracket
                    for j in range(mag.size):
                        v = mag[j]
                        inside[count] = v
                        count += (v >= lower) & (v <= upper)
            if count <= capacity and above < k <= above + count:
                r = count - (k - above)  # ascending index of the (k - above)-th largest inside
                out[i] = np.partition(inside[:count], r)[r]
                found = True
        if not found:  # small tensor, or the bracket missed (NaN inputs, odd distributions)
            mags = np.empty(n, dtype=np.float32)
            for j in range(n):
                mags[j] = abs(as_f32(src[j]) - as_f32(base[j]))
            out[i] = np.partition(mags, n - k)[n - k]
    return out


@nb.njit(nogil=True, cache=True)
def merge_deltas(base, models, weights, coefs, mode, thresholds, bounds, seeds, offset, consensus, normalize, lam, out):
    """``out = base + lam * merge_i(tau_i)`` over flat raw-bit arrays, ``tau_i = models[i] - base``.

    Per model: ``weights[i]`` (election and ``normalize`` divisor) and ``coefs[i]`` (the factor in
    the sums: the weight times DARE's 1/density rescale). ``mode``: KEEP_ALL, KEEP_ABOVE (TIES:
    keep ``|tau_i| >= thresholds[i]``; a NaN threshold keeps all) or KEEP_RANDOM (DARE: keep
    entry e where the 32-bit draw e of the SplitMix64 stream seeded ``seeds[i]`` is
    ``< bounds[i]``; ``bounds[i] >= 2**32`` keeps all; ``offset``, even, is the position of
    element 0 in the whole tensor, so a tensor merged in chunks gets the masks of one call).
    ``consensus``: TIES sign election + disjoint mean (divisor: sum of the agreeing models'
    weights, 1 where it is 0), else the plain sum (divided by ``sum(weights)`` when ``normalize``
    and it is not ~0).

    Returns the number of non-finite outputs. As in the reference, masks multiply (``tau * 0``)
    and clamps keep NaN, so a NaN/Inf in an input with a non-zero weight always reaches the
    output and is counted there; no separate pass checks the inputs.

    Works block by block on float32 scratch rows that stay in L1, each step a branch-free loop
    over the block that the compiler vectorizes."""
    n = base.size
    m = len(models)
    divide_all, total_w32 = _divisor(weights, normalize)
    lam32 = np.float32(lam)
    zero, one = np.float32(0.0), np.float32(1.0)
    b_block = np.empty(BLOCK, dtype=np.float32)
    tau_block = np.empty((m, BLOCK), dtype=np.float32)
    sum_block = np.empty(BLOCK, dtype=np.float32)
    sign_block = np.empty(BLOCK, dtype=np.float32)
    div_block = np.empty(BLOCK, dtype=np.float32)
    draw_block = np.empty(BLOCK + 1, dtype=np.uint64)
    bad = 0
    for start in range(0, n, BLOCK):
        bs = base[start:start + BLOCK]
        c = bs.size
        b, total, sign, divisor = b_block[:c], sum_block[:c], sign_block[:c], div_block[:c]
        for j in range(c):
            b[j] = as_f32(bs[j])
            total[j] = zero
        for i in range(m):
            ms = models[i][start:start + BLOCK]
            tau = tau_block[i, :c]
            for j in range(c):
                tau[j] = as_f32(ms[j]) - b[j]
            if mode == KEEP_ABOVE and not np.isnan(thresholds[i]):
                t = thresholds[i]
                for j in range(c):
                    tau[j] = tau[j] * (one if abs(tau[j]) >= t else zero)
            elif mode == KEEP_RANDOM and bounds[i] < np.uint64(1 << 32):
                draws = random_draws(draw_block, np.uint64(seeds[i]), offset + start, c)
                bound = bounds[i]
                for j in range(c):
                    tau[j] = tau[j] * (one if draws[j] < bound else zero)
            if weights[i] != 0:
                coef = np.float32(coefs[i])
                for j in range(c):
                    total[j] = _fma(coef, tau[j], total[j])
        if consensus:
            for j in range(c):
                sign[j] = one if total[j] >= 0 else -one
                total[j] = zero
                divisor[j] = zero
            for i in range(m):
                w = weights[i]
                if w == 0:
                    continue
                tau = tau_block[i, :c]
                coef = np.float32(coefs[i])
                w32 = np.float32(w)
                # x = s * tau agrees with the vote iff w x > 0; the clamps keep a NaN (as torch's)
                if w > 0:
                    for j in range(c):
                        x = tau[j] * sign[j]
                        x = zero if x < 0 else x
                        total[j] = _fma(coef, x, total[j])
                        divisor[j] = divisor[j] + (w32 if x != 0 else zero)
                else:
                    for j in range(c):
                        x = tau[j] * sign[j]
                        x = zero if x > 0 else x
                        total[j] = _fma(coef, x, total[j])
                        divisor[j] = divisor[j] + (w32 if x != 0 else zero)
            for j in range(c):
                total[j] = total[j] * sign[j]
            if normalize:
                for j in range(c):
                    total[j] = total[j] / (divisor[j] if divisor[j] != 0 else one)
        elif divide_all:
            for j in range(c):
                total[j] = total[j] / total_w32
        if lam != 1.0:
            for j in range(c):
                total[j] = total[j] * lam32
        for j in range(c):
            total[j] = total[j] + b[j]
        bad += _store(total, out[start:start + BLOCK])
    return bad


@nb.njit(nogil=True, cache=True)
def weighted_average(models, weights, normalize, out):
    """``out = sum_i w_i models[i] / sum_i w_i`` (the plain sum when not ``normalize`` or when the
    weights sum to ~0), accumulated in float32 in model order. Returns the number of non-finite
    outputs (a NaN/Inf input always makes one)."""
    n = out.size
    m = len(models)
    divide, total_w32 = _divisor(weights, normalize)
    acc_block = np.empty(BLOCK, dtype=np.float32)
    bad = 0
    for start in range(0, n, BLOCK):
        os_ = out[start:start + BLOCK]
        c = os_.size
        acc = acc_block[:c]
        acc[:] = 0.0
        for i in range(m):
            ms = models[i][start:start + BLOCK]
            w = np.float32(weights[i])
            for j in range(c):
                acc[j] = _fma(w, as_f32(ms[j]), acc[j])
        if divide:
            for j in range(c):
                acc[j] = acc[j] / total_w32
        bad += _store(acc, os_)
    return bad


# -- ahead-of-time warming of the on-disk cache ---------------------------------------------------------------
# numba compiles one machine-code version per argument types, and the models' count is part of
# them (the inputs are a tuple of arrays), as are the input and output dtypes. ``make install``
# runs ``python -m graftkit.merge.kernels --warm``, which compiles every version a merge of up to
# WARM_MODELS models can ask for into the on-disk cache (``cache=True``: __pycache__ beside this
# file, or $NUMBA_CACHE_DIR), so the first ``graft merge`` loads machine code instead of spending
# seconds compiling. numba's ahead-of-time compiler (pycc) is deprecated; the cache is its
# supported replacement. A merge of more models compiles its version once, on first use.

WARM_MODELS = 8
WARM_DTYPES = {"bf16": np.uint16, "f32": np.uint32}


def warm(models=range(1, WARM_MODELS + 1), dtypes=tuple(WARM_DTYPES), log=None) -> int:
    """Compile (or load from the cache) every kernel version for ``models`` input models and
    every pair of input/output dtypes in ``dtypes``; return how many were compiled now.

    The arguments are built with the exact types :mod:`.fused` passes (writable C-contiguous
    raw-bit arrays, a tuple of them, float64 weights, int64 scalars, Python bools): a different
    type would compile a version the merge never looks up."""
    before = sum(len(f.stats.cache_misses) for f in (kth_largest_deltas, merge_deltas, weighted_average))
    size = 2 * BLOCK + 3  # more than a block, and a ragged tail: every loop of the kernels runs
    for src_name in dtypes:
        src = WARM_DTYPES[src_name]
        base = np.zeros(size, dtype=src)
        kth_largest_deltas(base, (np.zeros(size, dtype=src),), np.ones(1, dtype=np.int64))
        for out_name in dtypes:
            out = np.empty(size, dtype=WARM_DTYPES[out_name])
            for n in models:
                inputs = tuple(np.zeros(size, dtype=src) for _ in range(n))
                weights = np.ones(n, dtype=np.float64)
                merge_deltas(base, inputs, weights, weights.copy(), KEEP_ALL, np.full(n, np.nan, dtype=np.float32),
                             np.full(n, 1 << 32, dtype=np.uint64), np.zeros(n, dtype=np.uint64), 0, False, False, 1.0, out)
                weighted_average(inputs, weights, False, out)
                if log is not None:
                    log(f"{src_name} -> {out_name}, {n} model{'s' if n > 1 else ''}")
    return sum(len(f.stats.cache_misses) for f in (kth_largest_deltas, merge_deltas, weighted_average)) - before


def _main(argv=None) -> int:
    import argparse
    import sys
    import time

    p = argparse.ArgumentParser(prog="python -m graftkit.merge.kernels",
                                description="compile the fused merge kernels into numba's on-disk cache")
    p.add_argument("--warm", action="store_true", help="compile every version a merge can ask for (make install runs this)")
    p.add_argument("--models", default=f"1-{WARM_MODELS}", help=f"model counts: N, N-M or a comma list (default 1-{WARM_MODELS})")
    p.add_argument("--dtypes", default=",".join(WARM_DTYPES), help="input/output dtypes (default bf16,f32: all four pairs)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if not args.warm:
        p.error("nothing to do: pass --warm")
    try:
        counts = sorted({n for part in args.models.split(",") for n in (
            range(int(part.split("-")[0]), int(part.split("-")[1]) + 1) if "-" in part else [int(part)])})
    except ValueError:
        p.error(f"--models {args.models!r}: give N, N-M or a comma list of whole numbers")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not counts or min(counts) < 1 or not dtypes or any(d not in WARM_DTYPES for d in dtypes):
        p.error(f"--models needs counts of 1 or more and --dtypes names from {', '.join(WARM_DTYPES)}")
    start = time.perf_counter()
    compiled = warm(counts, dtypes, log=None if args.quiet else lambda line: print(f"  {line}", file=sys.stderr))
    where = merge_deltas.stats.cache_path
    print(f"merge kernels: {compiled} version{'' if compiled == 1 else 's'} compiled, the rest loaded, in {time.perf_counter() - start:.1f} s "
          f"(cache: {where})")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
