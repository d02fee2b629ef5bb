"""IA3: learned rescaling vectors.

IA3 (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning") learns one vector per adapted layer and rescales activations
elementwise. On attention projections it scales the layer's output, ``y = l * (W x + b)``;
on feed-forward layers (the ``feedforward`` targets) it scales the input,
``y = W (l * x) + b``. Vectors start at one, so training starts from the base model.
Folded into the weights: output scaling gives ``W' = diag(l) W`` and ``b' = l * b``; input
scaling gives ``W' = W diag(l)``. The materialized delta is therefore ``W' - W`` (and
``b' - b`` for output-scaled layers with a bias).
"""
from __future__ import annotations

from typing import Any

import torch
from pydantic import AliasChoices, Field
from torch import nn

from ..errors import ConfigError
from ..layers import out_axis
from ..registry import METHODS
from ..targets import ParamInfo
from .base import MergeDelta, MethodConfig, PeftConverter, SavedTarget, Site, TuningMethod, first_input, layer_kind, matches_any


class IA3Config(MethodConfig):
    # patterns (a subset of targets) whose *input* is scaled instead of the output (peft's feedforward_modules)
    feedforward: list[str] = Field(default_factory=list, validation_alias=AliasChoices("feedforward", "feedforward_modules"))
    init_ia3_weights: bool = True


def ia3_view(kind: str, feedforward: bool, vec: torch.Tensor) -> torch.Tensor:
    """Shape the IA3 vector to broadcast against the stored weight along the scaled axis
    (outputs, or inputs for feed-forward targets; Conv1D and Embedding store (in, out))."""
    if kind == "conv2d":
        return vec.view(1, -1, 1, 1) if feedforward else vec.view(-1, 1, 1, 1)
    axis = out_axis(kind)
    if feedforward:
        axis = 1 - axis
    return vec.view(-1, 1) if axis == 0 else vec.view(1, -1)


def ia3_delta(kind: str, feedforward: bool, weight: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """Dense delta of an IA3 vector on an unmerged weight: ``W * (l - 1)`` along the scaled axis
    (float32). The bias of an output-scaled layer changes by ``b * (l - 1)``. Shared by the live
    site and the merge engine."""
    return weight.float() * (ia3_view(kind, feedforward, vec.float()) - 1)


class IA3Site(Site):
    slots = ("ia3_l",)

    def __init__(self, info: ParamInfo, kind: str, feedforward: bool, init: bool):
        super().__init__(info, kind)
        module = info.module
        self.feedforward = feedforward
        if kind == "conv2d":
            size = module.in_channels if feedforward else module.out_channels
        else:
            axis = out_axis(kind)
            size = info.param.shape[1 - axis] if feedforward else info.param.shape[axis]
        dtype = torch.float32 if info.param.dtype in (torch.float16, torch.bfloat16) else info.param.dtype
        self.ia3_l = nn.Parameter(torch.ones(size, dtype=dtype, device=info.param.device))
        if not init:
            with torch.no_grad():
                self.ia3_l.normal_(1.0, 0.2)

    def _weight_view(self, vec: torch.Tensor) -> torch.Tensor:
        """Shape the vector to broadcast against the stored weight along the scaled axis."""
        return ia3_view(self.kind, self.feedforward, vec)

    def _act_view(self, vec: torch.Tensor) -> torch.Tensor:
        return vec.view(1, -1, 1, 1) if self.kind == "conv2d" else vec

    def attach(self) -> None:
        if self.feedforward:
            self.owner.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        else:
            self.owner.register_forward_hook(self._hook, with_kwargs=True)

    def _pre_hook(self, module, args, kwargs):
        if not self.enabled or self.merged:
            return None
        x = first_input(args, kwargs)
        scaled = x * self._act_view(self.ia3_l).to(x.dtype)
        if args:
            return (scaled, *args[1:]), kwargs
        key = next(iter(kwargs))
        return args, {**kwargs, key: scaled}

    def _hook(self, module, args, kwargs, output):
        if not self.enabled or self.merged:
            return None
        return output * self._act_view(self.ia3_l).to(output.dtype)

    def _bias(self):
        return None if self.feedforward else getattr(self.owner, "bias", None)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        l = self.ia3_l.float()
        self.base.mul_(self._weight_view(l).to(self.base.dtype))
        if self._bias() is not None:
            self._bias().mul_(l.to(self._bias().dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        l = self.ia3_l.float()
        self.base.div_(self._weight_view(l).to(self.base.dtype))
        if self._bias() is not None:
            self._bias().div_(l.to(self._bias().dtype))
        self.merged = False

    def delta(self) -> dict[str, torch.Tensor]:
        l = self.ia3_l.detach().float()
        w = self.base.detach().float()
        if self.merged:  # w holds W * l
            w = w / self._weight_view(l)
        out = {self.pname: ia3_delta(self.kind, self.feedforward, w, l)}
        bias = self._bias()
        if bias is not None:
            b = bias.detach().float()
            b = b / l if self.merged else b
            out["bias"] = b * (l - 1)
        return out


def _infer_kind(t: SavedTarget, size: int, ff: bool) -> str:
    """How the vector lies on a base weight when adapter.json has no ``target_kinds``."""
    from ..errors import UnsupportedError

    shape = t.base_shape
    if len(shape) == 4:
        return "conv2d"
    if len(shape) == 2 and shape[0] != shape[1]:
        scaled_axis = 1 if ff else 0  # in the (out, in) layout of a linear layer
        return "linear" if shape[scaled_axis] == size else "conv1d"
    raise UnsupportedError(f"{t.where}: cannot tell how the IA3 vector of {t.name} {shape} lies on the weight (no target_kinds "
                           "in its adapter.json); re-save the adapter with this graftkit, or import it from peft again")


def _merge_deltas(t: SavedTarget) -> dict[str, MergeDelta]:
    vec = t.slots["ia3_l"]
    ff = bool(t.options.get("feedforward", False))
    kind = t.kind or _infer_kind(t, vec.numel(), ff)
    t.check_fits(kind, feedforward=ff)
    out = {t.name: MergeDelta(kind, lambda w: ia3_delta(kind, ff, w, vec))}
    bias = t.name[: -len("weight")] + "bias"
    # an output-scaled layer scales its bias too (as the live site does)
    if not ff and t.name.endswith(".weight") and bias in t.base_keys:
        out[bias] = MergeDelta(kind, lambda b: b.float() * (vec.float() - 1))
    return out


def _peft_read(cfg, raw, path):
    from ..io.peft import ia3_from_peft

    return ia3_from_peft(cfg, raw, path)


def _peft_write_site(site, key, tensors, acc):
    from ..io.peft import ia3_site_to_peft

    ia3_site_to_peft(site, key, tensors, acc)


def _peft_write_config(state, acc):
    return {"feedforward_modules": sorted(acc.get("ff", [])), "init_ia3_weights": True}


def _check_saved(adapter, name: str, options: dict, where: str) -> None:
    from ..errors import AdapterError
    from ..validate import saved_tensor

    vec = saved_tensor(adapter, f"{name}.ia3_l", where)
    if vec.dim() != 1:
        raise AdapterError(f"{where}: adapter tensor {name}.ia3_l has shape {tuple(vec.shape)}; IA3 vectors are 1-D - the file is corrupt")


def _saved_shapes(adapter, name: str, kind: str, base_shape: tuple, feedforward: bool = False) -> dict[str, tuple]:
    if kind == "conv2d":
        size = base_shape[1] if feedforward else base_shape[0]
    else:
        axis = out_axis(kind)
        size = base_shape[1 - axis] if feedforward else base_shape[axis]
    return {f"{name}.ia3_l": (size,)}


@METHODS.register("ia3")
class IA3(TuningMethod):
    name = "ia3"
    config_cls = IA3Config
    kinds = ("linear", "conv1d", "conv2d")
    merge_deltas = staticmethod(_merge_deltas)
    check_saved = staticmethod(_check_saved)
    saved_shapes = staticmethod(_saved_shapes)
    peft = PeftConverter("IA3", _peft_read, _peft_write_site, _peft_write_config)

    @classmethod
    def resolve(cls, model, config: IA3Config, skip=()):
        infos, options = super().resolve(model, config, skip)
        for pattern in config.feedforward:
            if not any(matches_any([pattern], i.name, i.module_name) for i in infos):
                raise ConfigError(f"IA3Config: feedforward pattern {pattern!r} matches none of the targets; feedforward must be a subset of targets")
        return infos, options

    @classmethod
    def site_options(cls, config: IA3Config, info: ParamInfo) -> dict[str, Any]:
        return {"feedforward": matches_any(config.feedforward, info.name, info.module_name)}

    @classmethod
    def make_site(cls, info: ParamInfo, config: IA3Config, options: dict[str, Any]) -> Site:
        return IA3Site(info, layer_kind(info.module, info.pname), options["feedforward"], config.init_ia3_weights)
