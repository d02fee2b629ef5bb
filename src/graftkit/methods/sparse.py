"""Sparse deltas: stored compactly, trained through a mask (LT-SFT, diff pruning, APET).

A sparse fine-tuning method changes few entries of the selected base tensors. Its delta is saved as
two 1-D tensors per target, never as a dense tensor::

    <parameter>.indices   int32 (int64 for tensors of 2**31 entries or more), strictly increasing
                          positions in the flattened parameter (row-major, the stored layout)
    <parameter>.values    float32, the delta at those positions

so ``theta = theta0 + scatter(indices, values)``. Two such deltas of the same base compose by
addition (Ansell et al.'s task + language vectors), which ``graft merge`` with ``task_arithmetic``
does through :func:`sparse_merge_deltas` (each delta is scattered into a dense tensor only while the
merge computes that key).

Why the trained sites build on :mod:`graftkit.methods.inplace` (``DeltaSite``) and not on
``weight_delta``: LT-SFT and APET train entries of the base tensors themselves, so the forward pass
costs nothing extra and no second dense tensor is held; ``theta0`` (which the training loop maps to
disk) gives the delta. The trainable set is a mask: a gradient hook on the base parameter zeroes the
gradient outside it (so gradient clipping sees only trained entries) and, in ``graft train``,
:meth:`SparseSite.enforce` puts the frozen entries back to ``theta0`` after every optimizer step
(AdamW's decoupled weight decay moves every entry, gradient or not). Diff pruning cannot train in
place: its delta is ``z * w`` with gates ``z``, so its site is a ``WeightDeltaSite`` with dense
``w`` and ``log_alpha`` during training (methods/diff_pruning.py) that saves the same compact form.

What is saved is always exactly ``theta - theta0`` on its support: the union of the mask and every
entry that differs from ``theta0`` (an entry changed outside the mask, e.g. by a user's own optimizer
with weight decay, is kept rather than dropped, so a saved adapter reproduces the live model). A
reloaded adapter's support becomes the site's mask.
"""
from __future__ import annotations

import math
import zlib
from typing import Any

import torch
from torch import nn

from ..errors import AdapterError, ConfigError
from ..layers import layer_kind
from ..targets import ParamInfo
from .base import MergeDelta, MethodConfig, SavedTarget, Site
from .inplace import DeltaSite, InplaceMethod

SLOTS = ("indices", "values")
#: the option ``bind_saved`` sets on each target of a saved adapter being loaded: how many entries it
#: holds (the site's slot shapes must be known before its tensors are loaded); removed after injection
STORED = "stored"


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def to_sparse(delta: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices, values)`` of ``delta`` on the union of its nonzero entries and ``keep`` (flat positions)."""
    flat = delta.reshape(-1)
    support = torch.nonzero(flat).squeeze(1)
    if keep is not None and keep.numel():
        support = torch.unique(torch.cat([keep.to(support.device, torch.int64), support]))  # sorted
    return support.to(index_dtype(flat.numel())), flat[support].float()


def scatter(indices: torch.Tensor, values: torch.Tensor, shape, device=None) -> torch.Tensor:
    """The dense float32 delta of ``(indices, values)`` on a tensor of ``shape``."""
    out = torch.zeros(math.prod(shape), dtype=torch.float32, device=device if device is not None else values.device)
    out[indices.to(out.device, torch.int64)] = values.to(out.device, torch.float32)
    return out.view(tuple(shape))


def check_sparse(indices: torch.Tensor | None, values: torch.Tensor | None, name: str, where: str, numel: int | None = None) -> None:
    """One line for a saved sparse delta that is incomplete, malformed or does not fit ``numel`` entries."""
    for slot, t in zip(SLOTS, (indices, values)):
        if t is None:
            raise AdapterError(f"{where}: the adapter file has no tensor {name}.{slot}; it is incomplete - re-save it")
        if t.dim() != 1:
            raise AdapterError(f"{where}: tensor {name}.{slot} has shape {tuple(t.shape)}; a sparse delta's {slot} are 1-D - "
                               "the file is corrupt")
    if indices.dtype not in (torch.int32, torch.int64) or not values.is_floating_point():
        raise AdapterError(f"{where}: {name}.indices must be int32/int64 and {name}.values floating point (got {indices.dtype}, "
                           f"{values.dtype}); the file is corrupt")
    if indices.numel() != values.numel():
        raise AdapterError(f"{where}: {name} has {indices.numel()} indices but {values.numel()} values; the file is corrupt "
                           "or mixes two adapters")
    if not indices.numel():
        return
    idx = indices.to(torch.int64)
    if int(idx[0]) < 0 or (idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all())):
        raise AdapterError(f"{where}: {name}.indices are not strictly increasing non-negative positions; the file is corrupt")
    if numel is not None and int(idx[-1]) >= numel:
        raise AdapterError(f"{where}: {name}.indices reach position {int(idx[-1])} but the base's {name} has {numel} entries; "
                           "the adapter was made for another base model")


def check_saved(adapter, name: str, options: dict, where: str) -> None:
    check_sparse(adapter.tensors.get(f"{name}.indices"), adapter.tensors.get(f"{name}.values"), name, where)


def saved_shapes(adapter, name: str, kind: str, base_shape: tuple, feedforward: bool = False) -> dict[str, tuple]:
    """A sparse delta fits any base tensor with at least as many entries as its last index; its own
    length is whatever it stored."""
    indices, values = adapter.tensors.get(f"{name}.indices"), adapter.tensors.get(f"{name}.values")
    check_sparse(indices, values, name, str(adapter.path or "the adapter"), math.prod(base_shape))
    return {f"{name}.indices": tuple(indices.shape), f"{name}.values": tuple(values.shape)}


def sparse_merge_deltas(t: SavedTarget) -> dict[str, MergeDelta]:
    """A saved sparse target as a merge input: its scattered delta, made when the merge reads that key."""
    indices, values = t.slots.get("indices"), t.slots.get("values")
    check_sparse(indices, values, t.name, t.where, math.prod(t.base_shape))
    return {t.name: MergeDelta(t.kind or "param", lambda w: scatter(indices, values, w.shape, w.device))}


def bind_saved(model: nn.Module, adapter):
    """The adapter with each target's stored entry count in its options (:data:`STORED`), so the
    sites are built with slots of the saved length before the tensors are loaded."""
    from ..io.native import AdapterFile

    from ..errors import GraftError
    from ..targets import find_param

    options = {k: dict(v or {}) for k, v in (adapter.meta.get("target_options") or {}).items()}
    where = str(adapter.path or "the adapter")
    for name in adapter.targets:
        try:
            numel = find_param(model, name).param.numel()
        except GraftError:  # a missing parameter is named by apply_adapter's own check
            numel = None
        indices = adapter.tensors.get(f"{name}.indices")
        check_sparse(indices, adapter.tensors.get(f"{name}.values"), name, where, numel)
        options.setdefault(name, {})[STORED] = int(indices.numel())
    return AdapterFile({**adapter.meta, "target_options": options}, adapter.tensors, adapter.path)


def seeded_generator(seed: int, name: str) -> torch.Generator:
    """A generator fixed by the seed and the parameter's name (the same mask on every load and process)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def random_positions(numel: int, count: int, g: torch.Generator) -> torch.Tensor:
    """``count`` distinct positions out of ``numel``, uniformly at random, sorted (int64)."""
    if count >= numel:
        return torch.arange(numel)
    if count * 8 >= numel:  # dense enough: a permutation's prefix
        return torch.randperm(numel, generator=g)[:count].sort().values
    chosen = torch.empty(0, dtype=torch.int64)
    while chosen.numel() < count:  # few positions of a large tensor: draw, drop repeats, draw again
        draw = torch.randint(numel, (2 * (count - chosen.numel()) + 16,), generator=g)
        chosen = torch.unique(torch.cat([chosen, draw]))
    keep = torch.randperm(chosen.numel(), generator=g)[:count]  # an unbiased subset of the distinct draws
    return chosen[keep].sort().values


def split_count(total: int, sizes: list[int]) -> list[int]:
    """``total`` split over parts of ``sizes`` in proportion (largest remainders), each at most its size."""
    whole = sum(sizes)
    raw = [total * s / whole for s in sizes]
    out = [min(int(math.floor(r)), s) for r, s in zip(raw, sizes)]
    order = sorted(range(len(sizes)), key=lambda i: raw[i] - out[i], reverse=True)
    left = total - sum(out)
    while left > 0:
        for i in order:
            if left and out[i] < sizes[i]:
                out[i] += 1
                left -= 1
    return out


def entries_wanted(what: str, num_trainable: int | None, fraction: float | None, total: int) -> int:
    """The number of entries out of ``total`` that ``num_trainable`` or ``fraction`` asks for (one line if impossible)."""
    if num_trainable is not None and fraction is not None:
        raise ConfigError(f"{what}: give num_trainable or fraction, not both")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ConfigError(f"{what}: fraction {fraction} is outside (0, 1]; give the share of the selected entries to train, "
                              "e.g. 0.01")
        return max(1, int(round(fraction * total)))
    if num_trainable is not None:
        if num_trainable < 1:
            raise ConfigError(f"{what}: num_trainable {num_trainable} must be at least 1")
        if num_trainable > total:
            raise ConfigError(f"{what}: num_trainable {num_trainable:,} is larger than the {total:,} entries of the selected "
                              "parameters; lower it or select more parameters")
        return num_trainable
    raise ConfigError(f"{what}: give num_trainable or fraction")


class SparseSite(DeltaSite):
    """An in-place site whose trainable entries are ``mask`` (flat positions; None: every entry)."""

    def __init__(self, info: ParamInfo, kind: str, mask: torch.Tensor | None = None, stored: int | None = None):
        super().__init__(info, kind)
        self.slots = SLOTS
        self.register_buffer("mask", torch.empty(0, dtype=torch.int64) if mask is None else mask.to(torch.int64), persistent=False)
        self.masked = mask is not None
        self.stored = stored  # the length of a saved adapter about to be loaded
        self._grad_hook = None

    # -- the mask -----------------------------------------------------------------------------
    def set_mask(self, mask: torch.Tensor | None) -> None:
        self.masked = mask is not None
        self.mask = torch.empty(0, dtype=torch.int64, device=self.base.device) if mask is None else mask.to(self.base.device, torch.int64)

    def attach(self) -> None:
        # the gradient hook needs requires_grad, which injection sets after attaching: it is added on the
        # first forward pass that can produce a gradient
        self.owner.register_forward_pre_hook(self._ensure_grad_hook)

    def __getstate__(self):
        # a copy (deepcopy, pickle) holds another parameter: it hooks that one on its first forward pass, and must
        # not carry this handle (removing it would unhook the original)
        state = dict(self.__dict__)
        state["_grad_hook"] = None
        return state

    def _ensure_grad_hook(self, module, args) -> None:
        if self._grad_hook is None and self.base.requires_grad:
            self._grad_hook = self.base.register_hook(self._mask_grad)

    def detach(self) -> None:
        super().detach()
        if self._grad_hook is not None:
            self._grad_hook.remove()
            self._grad_hook = None

    def _mask_grad(self, grad: torch.Tensor) -> torch.Tensor | None:
        if not self.masked:
            return None
        idx = self.mask.to(grad.device)
        out = torch.zeros(grad.numel(), dtype=grad.dtype, device=grad.device)
        out[idx] = grad.reshape(-1)[idx]
        return out.view(grad.shape)

    @torch.no_grad()
    def enforce(self) -> None:
        """Put every entry outside the mask back to ``theta0`` (undoes weight decay on frozen entries)."""
        if not self.masked or not self.enabled:
            return
        w = self.base
        idx = self.mask.to(w.device)
        new = self.theta0.to(w.device, w.dtype).reshape(-1).clone()
        new[idx] = w.detach().reshape(-1)[idx]
        w.copy_(new.view(w.shape))

    # -- saved form ---------------------------------------------------------------------------
    def slot_tensors(self) -> dict[str, torch.Tensor]:
        w = self.base if self.enabled else self.stash
        indices, values = to_sparse(w.detach().float() - self.theta0.float(), self.mask if self.masked else None)
        return {"indices": indices, "values": values}

    def slot_shapes(self) -> dict[str, tuple[int, ...]]:
        if self.stored is not None:
            return {"indices": (self.stored,), "values": (self.stored,)}
        return {k: tuple(v.shape) for k, v in self.slot_tensors().items()}

    @torch.no_grad()
    def load_slots(self, tensors: dict[str, torch.Tensor]) -> None:
        w = self.base
        indices = tensors["indices"].to(w.device, torch.int64)
        flat = self.theta0.float().reshape(-1).clone()
        flat[indices] += tensors["values"].to(w.device, torch.float32)
        w.copy_(flat.view(w.shape).to(w.dtype))
        self.set_mask(indices)
        self.stored = None
        if not self.enabled:
            self.stash = w.detach().clone()
            w.copy_(self.theta0)


class SparseMethod(InplaceMethod):
    """LT-SFT and APET: in-place sparse sites, saved compactly, merged by scatter."""

    merge_deltas = staticmethod(sparse_merge_deltas)
    check_saved = staticmethod(check_saved)
    saved_shapes = staticmethod(saved_shapes)

    @classmethod
    def eligible(cls, info: ParamInfo) -> bool:
        return info.param.is_floating_point()

    @classmethod
    def bind_saved(cls, model: nn.Module, adapter):
        return bind_saved(model, adapter)

    @classmethod
    def initial_mask(cls, info: ParamInfo, config: MethodConfig, options: dict[str, Any]) -> torch.Tensor | None:
        """The trainable entries at injection (None: all of them)."""
        return None

    @classmethod
    def make_site(cls, info: ParamInfo, config: MethodConfig, options: dict[str, Any]) -> Site:
        stored = options.get(STORED)
        mask = None if stored is not None else cls.initial_mask(info, config, options)
        return SparseSite(info, layer_kind(info.module, info.pname), mask, stored)

    @classmethod
    def make_sites(cls, infos: list, config: MethodConfig, options: dict[str, dict[str, Any]]) -> list[Site]:
        built = super().make_sites(infos, config, options)
        for opts in options.values():  # a load-time detail, not an option to save again
            if isinstance(opts, dict):
                opts.pop(STORED, None)
        return built


def sparse_sites(model: nn.Module) -> dict[str, SparseSite]:
    from ..adapter import sites

    return {n: s for n, s in sites(model).items() if isinstance(s, SparseSite)}
