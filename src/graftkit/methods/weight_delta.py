"""The shared core of weight-space methods whose adapted weight is ``W + delta``.

Most weight-space methods differ only in how their trainable tensors make the delta of one base
weight: LoHa's Hadamard product, LoKr's Kronecker product, VeRA's scaled shared projections, OFT's
rotation ``W R - W``, FourierFT's inverse spectrum, FLoRA's Tucker product, a sparse delta's
scatter. Each such method writes ONE pure function, its *formula*::

    formula(kind, weight, slots, settings) -> the delta in the canonical (out, in) view, float32

(``kind`` and the canonical view: :mod:`graftkit.layers`; ``slots``: the method's tensors of this
target by slot name; ``settings``: the method config with this target's options laid over it). The
live site (:class:`WeightDeltaSite`) and the merge engine (:meth:`WeightDeltaMethod.merge_deltas`)
both call that one function, so ``graft merge`` of a saved adapter, ``materialize_delta``,
``merge_adapter`` and the unmerged forward can never disagree.

The unmerged forward adds ``x -> delta x`` to the base layer's output (a dense delta, formed once per
forward, as peft's LoHa/LoKr/OFT layers do); a method with a cheaper factored form overrides
:meth:`WeightDeltaSite.factored_output`. A formula that reads the base weight (``reads_base``, e.g.
OFT) keeps the delta it merged, so unmerging restores the weight exactly.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping

import torch
import torch.nn.functional as F

from ..errors import AdapterError, UnsupportedError
from ..layers import from_matrix, logical_shape, matrix_shape, to_matrix
from ..targets import ParamInfo
from .base import MergeDelta, MethodConfig, SavedTarget, Site, TuningMethod, first_input, install_property, layer_kind, remove_property

#: ``formula(kind, weight, slots, settings) -> (out, in) float32 delta``
Formula = Callable[[str, torch.Tensor, Mapping[str, torch.Tensor], Mapping[str, Any]], torch.Tensor]


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapter tensors stay float32 on a half-precision base (as LoRA's)."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) or not weight.is_floating_point() else weight.dtype


class WeightDeltaSite(Site):
    """One adapted weight whose effect is ``W -> W + formula(...)``.

    Subclasses declare ``slots``, create those tensors in ``__init__`` (after calling this one), and
    set ``formula`` (a staticmethod: the method's pure function). ``self.settings`` holds what the
    formula reads besides the slots (config and target options, plain values)."""

    formula: ClassVar[Formula]
    #: the formula reads the base weight (OFT's ``W R - W``): merging keeps the delta it added
    reads_base: ClassVar[bool] = False

    def __init__(self, info: ParamInfo, kind: str, settings: Mapping[str, Any]):
        super().__init__(info, kind)
        weight = info.param
        self.out_features, self.in_features = matrix_shape(kind, logical_shape(weight))
        self.dtype = adapter_dtype(weight)
        self.settings = dict(settings)
        # the delta a reads_base site added when it merged (not saved: rebuilt by merging again)
        self.register_buffer("merged_delta", torch.empty(0), persistent=False)

    # -- the math ---------------------------------------------------------------------------
    def delta_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The delta in the canonical (out, in) view, float32, differentiable in the slots;
        ``weight`` is the UNMERGED base weight in its stored layout."""
        return type(self).formula(self.kind, weight, self.slot_tensors(), self.settings)

    def dense_delta(self, weight: torch.Tensor) -> torch.Tensor:
        """The delta in the stored layout of ``weight`` (an unmerged base weight)."""
        return from_matrix(self.kind, self.delta_matrix(weight), weight.shape)

    def factored_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """The delta's contribution to the layer's output for input ``x`` without forming the dense
        delta, or None (the default) to use the dense delta. Override for a cheaper factored form."""
        return None

    # -- forward ----------------------------------------------------------------------------
    def attach(self) -> None:
        if self.kind == "param":
            install_property(self.owner, self.pname)
        else:
            self.owner.register_forward_hook(self._hook, with_kwargs=True)

    def detach(self) -> None:
        super().detach()
        if self.kind == "param":
            remove_property(self.owner, self.pname)

    def effective(self, param: torch.Tensor) -> torch.Tensor:
        """A bare parameter's adapted value (read through :func:`install_property`)."""
        if not self.enabled or self.merged:
            return param
        return param + self.dense_delta(param).to(param.dtype)

    def _delta_output(self, x: torch.Tensor) -> torch.Tensor:
        extra = self.factored_output(x)
        if extra is not None:
            return extra
        m = self.owner
        d = self.delta_matrix(self.base)
        if self.kind == "embedding":
            return F.embedding(x, d.t(), m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)
        if self.kind == "conv2d":
            k = d.reshape(self.base.shape)
            return F.conv2d(x.to(k.dtype), k, None, m.stride, m.padding, m.dilation, m.groups)
        return F.linear(x.to(d.dtype), d)

    def _hook(self, module, args, kwargs, output):
        if not self.enabled or self.merged:
            return None
        return output + self._delta_output(first_input(args, kwargs)).to(output.dtype)

    # -- merge ------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        w = self.base
        d = self.dense_delta(w)
        if self.reads_base:
            self.merged_delta = d.detach().clone()
        w.add_(d.to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base
        if self.reads_base:
            w.sub_(self.merged_delta.to(w.dtype))
            self.merged_delta = torch.empty(0, device=w.device)
        else:
            w.sub_(self.dense_delta(w).to(w.dtype))
        self.merged = False

    def delta(self) -> dict[str, torch.Tensor]:
        w = self.base
        if self.merged and self.reads_base:
            return {self.pname: self.merged_delta.clone()}
        return {self.pname: self.dense_delta(w).detach()}  # (a formula that ignores w: merged or not alike)


def saved_kind(t: SavedTarget) -> str:
    """How a saved target's delta lies on its base weight: adapter.json's ``target_kinds`` (graftkit
    writes them; peft readers set them), else the only answer a 4-D kernel allows."""
    if t.kind:
        return t.kind
    if len(t.base_shape) == 4:
        return "conv2d"
    raise UnsupportedError(f"{t.where}: cannot tell how the adapter of {t.name} {t.base_shape} lies on the weight (no "
                           "target_kinds in its adapter.json); re-save the adapter with this graftkit, or import it from peft again")


class WeightDeltaMethod(TuningMethod):
    """A registered method built on :class:`WeightDeltaSite`: the site class and its formula make the
    live adapter and the merge input alike. Methods set ``site_cls`` and ``config_cls`` and build
    sites in ``make_site``; ``shared_slots`` names tensors saved once for the whole adapter (under the
    first target, like Compacter's shared matrices) that every target's formula also reads."""

    site_cls: ClassVar[type[WeightDeltaSite]]
    kinds = ("linear", "conv1d")
    shared_slots: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def settings(cls, config: MethodConfig | Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
        """What the formula reads: the config's plain values with the target's options over them."""
        data = config.model_dump(mode="json") if isinstance(config, MethodConfig) else dict(config)
        return {**data, **dict(options)}

    @classmethod
    def saved_slots(cls, t: SavedTarget) -> dict[str, torch.Tensor]:
        """The slots a saved target's formula reads: its own, and the shared ones wherever they are saved."""
        slots = dict(t.slots)
        for slot in cls.shared_slots:
            if slot not in slots:
                found = [v for k, v in t.tensors.items() if k.endswith(f".{slot}")]
                if not found:
                    raise AdapterError(f"{t.where}: the adapter has no shared tensor *.{slot}; it is incomplete - re-save it")
                slots[slot] = found[0]
        return slots

    @classmethod
    def _merge_deltas(cls, t: SavedTarget) -> dict[str, MergeDelta]:
        kind = saved_kind(t)
        t.check_fits(kind)
        slots, settings, formula = cls.saved_slots(t), cls.settings(t.config, t.options), cls.site_cls.formula
        return {t.name: MergeDelta(kind, lambda w: from_matrix(kind, formula(kind, w, slots, settings), w.shape))}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # every subclass is a merge input through its formula (a classmethod bound to it, stored as the hook)
        if "merge_deltas" not in cls.__dict__:
            cls.merge_deltas = staticmethod(lambda t, _cls=cls: _cls._merge_deltas(t))

    @classmethod
    def make_site(cls, info: ParamInfo, config: MethodConfig, options: dict[str, Any]) -> Site:
        return cls.site_cls(info, layer_kind(info.module, info.pname), cls.settings(config, options))


def canonical(kind: str, weight: torch.Tensor) -> torch.Tensor:
    """The base weight in the canonical (out, in) view, float32 (what OFT-like formulas rotate)."""
    return to_matrix(kind, weight).float()
