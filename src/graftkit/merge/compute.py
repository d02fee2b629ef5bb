"""The per-key merge: one output tensor from the same tensor of every input.

:func:`merge_key` chooses the path from the method's declared capabilities (see
:class:`~graftkit.merge._common.MergeMethod`): the fused numba kernels (:mod:`.fused`) when the
method names one and the inputs are plain bf16/float32 safetensors, else the method's torch
function over float32 stacks (:func:`merge_rows`), in row chunks for elementwise methods. Every
input tensor is read through a memory map of just its bytes (:meth:`Checkpoint.read`).
"""
from __future__ import annotations

from typing import Any

from ..tensors import Checkpoint
from .plan import MergeError, Plan, chunk_elements, key_params
from ..tensors import ST_TO_TORCH


def read_input(plan: Plan, path: str, key: str, rows: tuple[int, int] | None = None):
    """One tensor (or rows ``[r0, r1)`` of it) of one input: a view over a memory map of just those
    bytes for a safetensors model, the tensor an adapter source builds otherwise."""
    ckpt = plan.ckpts[path]
    if isinstance(ckpt, Checkpoint):
        return ckpt.read(key, rows)
    t = ckpt.get(key)
    return t if rows is None else t[rows[0]:rows[1]]


def merge_rows(plan: Plan, key: str, params: dict, rows: tuple[int, int] | None = None):
    """Merge tensor ``key`` (or its rows) with the method's torch function: float32, not yet cast."""
    import torch

    spec = plan.spec
    names = plan.inputs
    base = None
    if plan.base and spec.inputs == "delta":
        base = read_input(plan, plan.base, key, rows).float()
        if not spec.nan_propagating:
            _check_finite(base.reshape(1, -1), key, [plan.base])
    shape = plan.shapes[key] if rows is None else (rows[1] - rows[0], *plan.shapes[key][1:])
    if not spec.needs_all_inputs_at_once:  # accumulates the raw tensors itself (linear): no float32 stack
        raw = [read_input(plan, p, key, rows) for p in names]
        out = spec.fn(None, raw, **params)
        if not bool(torch.isfinite(out.sum())):
            _check_finite(torch.stack([r.float().reshape(-1) for r in raw]), key, names)
        return out
    stack = torch.empty((len(names), *shape), dtype=torch.float32)
    for i, p in enumerate(names):
        if spec.inputs == "delta":
            stack[i].copy_(read_input(plan, p, key, rows)).sub_(base)  # widen, then subtract: 3x faster than a mixed-dtype sub
        else:
            stack[i].copy_(read_input(plan, p, key, rows))
    if not spec.nan_propagating:
        _check_finite(stack.reshape(len(names), -1), key, names)
    if spec.inputs == "delta":
        if _takes_inplace(spec.fn):
            params = {**params, "inplace": True}  # the stack is ours: let the method reuse it
        out = spec.fn(base, stack, **params)
    else:
        out = spec.fn(stack[0] if spec.base_as_input and plan.base else None, stack, **params)
    del stack
    if not bool(torch.isfinite(out.sum())) and not bool(torch.isfinite(out).all()):
        for p in [*([plan.base] if plan.base else []), *names]:  # name the input that brought the NaN/Inf
            if not bool(torch.isfinite(read_input(plan, p, key, rows).float()).all()):
                raise MergeError(f"{key} in {p} has NaN or Inf values; that input is broken - re-create or re-download it")
        raise MergeError(f"{key}: the merged tensor has NaN/Inf values (the inputs are finite); check the weights and lambda")
    return out


def _thresholds(plan: Plan, key: str, density: list) -> list:
    """Per-model magnitude thresholds over the whole tensor, one model at a time."""
    import torch

    from ._common import kth_largest

    shape = plan.shapes[key]
    numel = 1
    for d in shape:
        numel *= d
    step = max(1, chunk_elements(plan.spec) // max(1, numel // shape[0]))
    mag = torch.empty(shape, dtype=torch.float32)  # the only full-size buffer, reused per model
    out = []
    for p, d in zip(plan.inputs, density):
        if d >= 1:
            out.append(None)
            continue
        for r0 in range(0, shape[0], step):
            rows = (r0, min(shape[0], r0 + step))
            part = mag[rows[0]:rows[1]]
            part.copy_(read_input(plan, p, key, rows)).sub_(read_input(plan, plan.base, key, rows).float()).abs_()
        out.append(kth_largest(mag.reshape(-1), max(1, int(d * numel))))
    return out


HIST_BINS, HIST_LO, HIST_HI = 1 << 16, -80.0, 16.0


def global_thresholds(plan: Plan) -> list:
    """``scope: global`` TIES: per model, the exact magnitude of its k-th largest delta entry over
    the whole model (k = density x all float entries), in two streaming passes per model: a
    histogram of log2|delta| finds the bin holding the k-th value, a second pass collects that
    bin's few values and selects inside it. One tensor of one model in memory at a time."""
    import torch

    from ._common import kth_largest

    keys = [k for k in plan.keys if plan.merged(k)]
    out = []
    base_path = plan.base
    width = (HIST_HI - HIST_LO) / HIST_BINS
    for i, p in enumerate(plan.inputs):
        density = key_params(plan, keys[0])["density"][i]
        if density >= 1:
            out.append(None)
            continue

        def logs(key):
            mag = torch.sub(plan.ckpts[p].get(key), plan.ckpts[base_path].get(key).float()).abs_().reshape(-1)
            return mag, torch.log2(mag).clamp_(HIST_LO, HIST_HI - width / 2)

        counts = torch.zeros(HIST_BINS, dtype=torch.float64)
        total = 0
        for key in keys:
            mag, lg = logs(key)
            counts += torch.histc(lg, HIST_BINS, HIST_LO, HIST_HI).double()
            total += mag.numel()
        k = max(1, int(density * total))
        above = torch.flip(counts, [0]).cumsum(0)  # above[j] = entries in the top j+1 bins
        j = int(torch.searchsorted(above, torch.tensor([float(k)], dtype=torch.float64)))
        b = HIST_BINS - 1 - j
        higher = int(above[j - 1]) if j > 0 else 0
        lo, hi = HIST_LO + b * width, HIST_LO + (b + 1) * width
        band = []
        for key in keys:
            mag, lg = logs(key)
            sel = (lg >= lo) & (lg < hi) if b < HIST_BINS - 1 else lg >= lo
            band.append(mag[sel])
        band = torch.cat(band)
        need = k - higher
        out.append(kth_largest(band, need) if 0 < need <= band.numel() else float(band.max()))
    return out


def merge_tensor(plan: Plan, key: str) -> Any:
    """Tensor ``key`` of the output in its output dtype: merged (in row chunks when the method is
    elementwise and the tensor large), or copied from the reference input when it is not a float."""
    import torch

    spec = plan.spec
    if not plan.merged(key):
        return plan.ckpts[plan.reference].get(key)
    out_dtype = getattr(torch, ST_TO_TORCH[plan.out_dtypes[key]])
    params = key_params(plan, key)
    if plan.global_thresholds is not None:
        params["threshold"] = plan.global_thresholds
    if spec.data is not None:  # data-aware: this key's per-model statistics from the pre-pass (merge/data.py)
        stats = getattr(plan, "statistics", None)
        if stats is None:
            raise MergeError(f"merge_method {spec.name} needs its {spec.data} statistics, computed by the front door "
                             "(graftkit.merge.merge / graft merge) before the merge; run it from there")
        params[stats.keyword] = stats.for_key(key)
    shape = plan.shapes[key]
    numel = 1
    for d in shape:
        numel *= d
    limit = chunk_elements(spec)
    if numel <= limit or not spec.chunkable or len(shape) < 1 or shape[0] < 2:
        return merge_rows(plan, key, params, None).to(out_dtype)
    if spec.thresholded and "threshold" not in params:
        params = {**params, "threshold": _thresholds(plan, key, params["density"])}
    step = max(1, limit // max(1, numel // shape[0]))
    out = torch.empty(shape, dtype=out_dtype)
    for c, r0 in enumerate(range(0, shape[0], step)):
        chunk = dict(params)
        if chunk.get("seed") is not None:
            chunk["seed"] = (chunk["seed"] * 31 + c) % (2**62)  # DARE: a fresh, reproducible mask per chunk
        out[r0:r0 + step] = merge_rows(plan, key, chunk, (r0, min(shape[0], r0 + step)))
    return out


def _takes_inplace(fn) -> bool:
    import inspect

    return "inplace" in inspect.signature(fn).parameters


def _check_finite(rows, key: str, names: list[str]) -> None:
    import torch

    sums = rows.sum(dim=1)
    if bool(torch.isfinite(sums).all()):
        return
    for i, name in enumerate(names):
        if not bool(torch.isfinite(sums[i])) and not bool(torch.isfinite(rows[i]).all()):
            raise MergeError(f"{key} in {name} has NaN or Inf values; that input is broken - re-create or re-download it")


def merge_key(plan: Plan, key: str, writer, fused_kernels: bool) -> None:
    """Merge tensor ``key`` into ``writer``: with the fused kernels when the method declares one and
    the inputs allow it (``fused_kernels``: :func:`.fused.unsupported` found no reason against; then
    torch is not imported), else with the method's torch function."""
    if not fused_kernels:
        writer.write(key, merge_tensor(plan, key))
        return
    from . import fused

    if not plan.merged(key):
        fused.copy_key(plan, key, writer)
        return
    if fused.merge_key(plan, key, key_params(plan, key), writer):
        writer.write(key, merge_tensor(plan, key))  # a NaN/Inf: the torch path names the input that brought it, and raises
    writer.finish(key)
