"""Sites for methods that train base tensors in place (BitFit, full fine-tuning, train_also).

The trained tensor *is* the base parameter, so the forward pass costs nothing extra and the
optimizer updates it directly. A frozen copy of the starting values (``theta0``, not part
of the state dict) makes the delta ``theta - theta0`` available at any time and lets the
adapter be disabled or unloaded back to the base.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import AdapterError
from ..layers import layer_kind
from ..targets import ParamInfo
from .base import MergeDelta, MethodConfig, SavedTarget, Site, TuningMethod


class DeltaSite(Site):
    """Saved as ``delta`` (theta - theta0) or, with ``absolute``, as ``value`` (theta itself:
    for parameters whose starting value is not reproducible, such as a freshly initialised
    classification head)."""

    inplace = True

    def __init__(self, info: ParamInfo, kind: str, absolute: bool = False):
        super().__init__(info, kind)
        self.absolute = absolute
        self.slots = ("value",) if absolute else ("delta",)
        self.register_buffer("theta0", info.param.detach().clone(), persistent=False)
        self.register_buffer("stash", torch.empty(0), persistent=False)
        self.merged = True  # the delta always lives in the weight

    def slot_tensors(self) -> dict[str, torch.Tensor]:
        w = self.base if self.enabled else self.stash
        if self.absolute:
            return {"value": w.detach()}
        # float32: the difference of two half-precision values is exact there, so theta0 + delta
        # reproduces theta bit for bit on load
        return {"delta": w.detach().float() - self.theta0.float()}

    def slot_shapes(self) -> dict[str, tuple[int, ...]]:
        return {self.slots[0]: tuple(self.theta0.shape)}

    @torch.no_grad()
    def load_slots(self, tensors: dict[str, torch.Tensor]) -> None:
        w = self.base
        if self.absolute:
            w.copy_(tensors["value"].to(w.dtype))
        else:
            w.copy_((self.theta0.float() + tensors["delta"].float()).to(w.dtype))
        if not self.enabled:  # keep the loaded values for when the adapter is enabled again
            self.stash = w.detach().clone()
            w.copy_(self.theta0)

    def merge(self) -> None:  # always merged
        pass

    def unmerge(self) -> None:
        pass

    @torch.no_grad()
    def set_enabled(self, enabled: bool) -> None:
        if enabled == self.enabled:
            return
        w = self.base
        if not enabled:
            self.stash = w.detach().clone()
            w.copy_(self.theta0)
        else:
            w.copy_(self.stash)
            self.stash = torch.empty(0, device=w.device)
        self.enabled = enabled

    def delta(self) -> dict[str, torch.Tensor]:
        w = self.base if self.enabled else self.stash
        return {self.pname: w.detach().float() - self.theta0.float()}

    @torch.no_grad()
    def restore_base(self) -> None:
        self.base.copy_(self.theta0)


def saved_inplace_deltas(t: SavedTarget, kind: str | None = None) -> dict[str, MergeDelta]:
    """A saved in-place target as a merge input: its ``delta`` as it is, or its ``value`` (a tensor
    saved whole) minus the base's."""
    slot = "value" if t.options.get("absolute") else "delta"
    saved = t.slots.get(slot)
    if saved is None:
        raise AdapterError(f"{t.where}: the adapter file has no tensor {t.name}.{slot}; it is incomplete - re-save it")
    if tuple(saved.shape) != tuple(t.base_shape):
        raise AdapterError(f"{t.where}: adapter tensor {t.name}.{slot} has shape {tuple(saved.shape)} but the base's {t.name} is "
                           f"{tuple(t.base_shape)}; the adapter was made for another base model (or is corrupt)")
    kind = kind or t.kind or "param"
    if slot == "value":
        return {t.name: MergeDelta(kind, lambda w: saved.float() - w.float())}
    return {t.name: MergeDelta(kind, lambda w: saved.float())}


class InplaceMethod(TuningMethod):
    """A method whose sites train the selected base tensors directly; its saved deltas are merge inputs
    as they are (dense ``theta - theta0``)."""

    kinds = ("any",)
    merge_deltas = staticmethod(saved_inplace_deltas)

    @classmethod
    def make_site(cls, info: ParamInfo, config: MethodConfig, options: dict[str, Any]) -> Site:
        return DeltaSite(info, layer_kind(info.module, info.pname))
