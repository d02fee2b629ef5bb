"""The engine's fast path: merge a tensor with the fused kernels of :mod:`.kernels`.

Used when the method declares a kernel (``MergeMethod.fused``: linear, task_arithmetic, ties with
per-tensor trimming, dare_linear and dare_ties do) and every input is a safetensors file whose tensors are bf16 or float32,
output bf16 or float32. Everything else - adapters, pickled checkpoints, float16, the other
methods - goes through the torch reference functions. This path never imports torch (1.5 s of a
merge that otherwise takes a few seconds): it reads the raw bits through memory maps, runs the
kernel on ~1M-element chunks and writes each chunk straight into the output shard.

``GRAFT_MERGE_KERNELS=torch`` forces the reference path (for comparisons and debugging).
"""
from __future__ import annotations

import mmap
import os
import secrets

import numpy as np

from ..tensors import Checkpoint

RAW = {"BF16": np.uint16, "F32": np.uint32}  # the kernels read and write raw bits
CHUNK = 1 << 20  # elements per kernel call: the mapped input pages are released after each chunk
_MASK64 = (1 << 64) - 1


def unsupported(plan) -> str | None:
    """Why ``plan`` cannot use the fused kernels (``None`` when it can)."""
    if os.environ.get("GRAFT_MERGE_KERNELS", "") == "torch":
        return "GRAFT_MERGE_KERNELS=torch"
    if plan.spec.fused is None:
        return f"{plan.spec.name} has no fused kernel"
    if plan.config.parameters.get("scope", "tensor") != "tensor":
        return "scope: global"
    used = [p for p in dict.fromkeys([plan.base, *plan.inputs]) if p]
    for p in used:
        ckpt = plan.ckpts[p]
        if not isinstance(ckpt, Checkpoint) or not ckpt.is_safetensors:  # RemappedCheckpoint (slices, vocab) reads by byte range too
            return f"{p} is not a safetensors model"
    for key in plan.keys:
        if not plan.merged(key):
            continue
        dtypes = {plan.ckpts[p].dtype(key) for p in used}
        if len(dtypes) != 1 or not dtypes <= RAW.keys() or plan.out_dtypes[key] not in RAW:
            return f"{key}: dtypes {sorted(dtypes)} -> {plan.out_dtypes[key]} (the kernels take bf16/float32, one per tensor)"
    return None


def _stream_seed(seed: int, model: int) -> np.uint64:
    """The DARE mask stream of ``model`` for a merge ``seed``: one SplitMix64 step from the pair."""
    from ..rawbits import GOLDEN, splitmix64

    return splitmix64(np.uint64((seed * 1_000_003 + model + int(GOLDEN)) & _MASK64))


def _unmap(mapping: mmap.mmap) -> None:
    try:
        mapping.close()
    except BufferError:  # an array still views it (an exception's traceback): unmapped when that goes
        pass


class _Mapped:
    """One input tensor as a flat array of raw bits over a memory map of its bytes."""

    def __init__(self, ckpt: Checkpoint, key: str):
        _, lo, hi = ckpt.byte_range(key)
        self.map, start = ckpt.map_range(key)
        self.start = start
        dtype = np.dtype(RAW[ckpt.dtype(key)])
        self.array = np.frombuffer(self.map, dtype=dtype, count=(hi - lo) // dtype.itemsize, offset=start)

    def release(self, lo: int = 0, hi: int | None = None) -> None:
        """Drop the process's pages of elements ``[lo, hi)`` (the page cache keeps them): the
        mapped inputs then never add more than a chunk each to the resident memory."""
        size = self.array.itemsize
        first = self.start + lo * size
        last = self.start + (self.array.size if hi is None else hi) * size
        first -= first % mmap.PAGESIZE
        last -= last % mmap.PAGESIZE if hi is not None else 0
        if last > first and hasattr(self.map, "madvise"):
            self.map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def close(self) -> None:
        del self.array
        _unmap(self.map)


def copy_key(plan, key: str, writer) -> None:
    """A tensor that is not merged (integer buffers): the reference input's bytes, as they are."""
    ckpt = plan.ckpts[plan.reference]
    _, lo, hi = ckpt.byte_range(key)
    if hi > lo:
        mapped, start = ckpt.map_range(key)
        try:
            writer.write_part(key, memoryview(mapped)[start:start + hi - lo], 0)
        finally:
            _unmap(mapped)
    writer.finish(key)


def merge_key(plan, key: str, params: dict, writer) -> int:
    """Merge tensor ``key`` into ``writer``; returns the number of non-finite outputs (a NaN/Inf
    input, or an overflow: the caller redoes the tensor on the reference path, which names the
    broken input). When it is not 0, what was written for ``key`` must be rewritten."""
    from . import kernels

    kernel = plan.spec.fused
    numel = 1
    for d in plan.shapes[key]:
        numel *= d
    out = np.empty(min(numel, CHUNK), dtype=RAW[plan.out_dtypes[key]])
    models = [_Mapped(plan.ckpts[p], key) for p in plan.inputs]
    base = _Mapped(plan.ckpts[plan.base], key) if kernel.kernel == "merge_deltas" else None
    mapped = [*([base] if base else []), *models]

    def chunked(kernel) -> int:
        """``kernel(lo, hi, out_part)`` over the tensor chunk by chunk; each output chunk goes
        to the shard, each input chunk's pages are released."""
        bad = 0
        for lo in range(0, numel, CHUNK):
            hi = min(numel, lo + CHUNK)
            part = out[:hi - lo]
            bad += kernel(lo, hi, part)
            writer.write_part(key, part, lo * out.itemsize)
            for m in mapped:
                m.release(lo, hi)
        return bad

    try:
        weights = np.asarray(params["weight"], dtype=np.float64)
        if kernel.kernel == "weighted_average":
            normalize = bool(params["normalize"])
            return chunked(lambda lo, hi, part: kernels.weighted_average(tuple(m.array[lo:hi] for m in models), weights,
                                                                         normalize, part))
        n = len(models)
        density = [float(d) for d in params.get("density", [1.0] * n)]
        thresholds = np.full(n, np.nan, dtype=np.float32)
        bounds = np.full(n, 1 << 32, dtype=np.uint64)
        seeds = np.zeros(n, dtype=np.uint64)
        coefs = weights.copy()
        mode = kernels.KEEP_ALL
        if kernel.keep == "threshold":
            mode = kernels.KEEP_ABOVE
            for i, (m, d) in enumerate(zip(models, density)):
                if d < 1:  # one model at a time: the mapped pages of one model and the base at most
                    k = np.array([max(1, int(d * numel))], dtype=np.int64)
                    thresholds[i] = kernels.kth_largest_deltas(base.array, (m.array,), k)[0]
                    m.release()
            base.release()
        elif kernel.keep == "random":
            mode = kernels.KEEP_RANDOM
            seed = params.get("seed")
            seed = secrets.randbits(62) if seed is None else int(seed)
            for i, d in enumerate(density):
                seeds[i] = _stream_seed(seed, i)
                if d < 1:
                    bounds[i] = round(d * 2**32)
                    if params.get("rescale", True):
                        coefs[i] = weights[i] / d
        consensus = kernel.consensus
        normalize, lam = bool(params.get("normalize", False)), float(params.get("lambda", 1.0))
        return chunked(lambda lo, hi, part: kernels.merge_deltas(
            base.array[lo:hi], tuple(m.array[lo:hi] for m in models), weights, coefs, mode, thresholds, bounds, seeds, lo,
            consensus, normalize, lam, part))
    finally:
        for m in mapped:
            m.close()
