"""LN tuning: train only the normalisation layers' gains and biases.

Qi et al., 2022 ("Parameter-Efficient Tuning on Layer Normalization for Pre-trained Language
Models", arXiv:2211.08682) freeze every weight matrix and update only the affine parameters of
the layer norms. A LayerNorm computes

    y = g * (x - mean(x)) / sqrt(var(x) + eps) + b

and an RMSNorm (Llama, T5's ``T5LayerNorm``) ``y = g * x / sqrt(mean(x^2) + eps)``; LN tuning
trains ``g`` and ``b`` (``g' = g + delta_g``, ``b' = b + delta_b``): about 0.01-0.05% of a
transformer's parameters. peft implements it as ``LN_TUNING`` (after Zhao et al., 2023,
arXiv:2312.11420, who tune the LayerNorms of multi-modal LLMs).

Which modules count as normalisation layers: every module whose class, or a base class, is
named ``*LayerNorm`` or ``*RMSNorm`` - ``torch.nn.LayerNorm``, ``torch.nn.RMSNorm``,
``T5LayerNorm``, ``LlamaRMSNorm`` and the other per-model RMSNorm copies in transformers. Batch
and group norms are not layer norms and are left out. By default all of them are targets;
``targets``/``exclude``/``layers`` narrow the choice like any method's.

Like BitFit this is an in-place weight-space method: the norm parameters themselves train,
the saved delta is ``theta - theta0`` (:class:`~graftkit.methods.inplace.DeltaSite`), so the
adapter is always merged, costs nothing in the forward pass and exports merged. An adapter
imported from peft holds absolute values (peft saves a trained copy of each norm layer) and is
saved as ``value`` instead of ``delta``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import AliasChoices, Field
from torch import nn

from ..errors import FileFormatError
from ..registry import METHODS
from ..targets import ParamInfo
from .base import HOLDER, MergeDelta, MethodConfig, PeftConverter, SavedTarget, Site
from .inplace import DeltaSite, InplaceMethod, saved_inplace_deltas

#: class-name endings that mark a normalisation layer (checked along the class's MRO)
NORM_CLASS_SUFFIXES = ("LayerNorm", "RMSNorm")
#: the kind recorded for a norm parameter (adapter.json ``target_kinds``)
KIND = "norm"
#: peft's key infix: ``<module>.ln_tuning_layers.<param>`` holds the trained copy's value
PEFT_INFIX = ".ln_tuning_layers."


def is_norm(module: nn.Module) -> bool:
    return any(c.__name__.endswith(NORM_CLASS_SUFFIXES) for c in type(module).__mro__)


class LNTuningConfig(MethodConfig):
    targets: list[str] = Field(default_factory=lambda: ["*"], validation_alias=AliasChoices("targets", "target_modules"))


def _slot(options: dict) -> str:
    return "value" if options.get("absolute") else "delta"


def _merge_deltas(t: SavedTarget) -> dict[str, MergeDelta]:
    return saved_inplace_deltas(t, KIND)  # a norm's kind: no layout to re-factor


def _check_saved(adapter, name: str, options: dict, where: str) -> None:
    from ..validate import saved_tensor

    saved_tensor(adapter, f"{name}.{_slot(options)}", where)


def _saved_shapes(adapter, name: str, kind: str, base_shape: tuple, feedforward: bool = False) -> dict[str, tuple]:
    options = (adapter.meta.get("target_options") or {}).get(name) or {}
    return {f"{name}.{_slot(options)}": tuple(base_shape)}


# -- peft's LN_TUNING format ----------------------------------------------------------------------

def _peft_read(cfg: dict, raw: dict, path: Path):
    from ..io.native import AdapterFile
    from ..io.peft import _common_config, _heads, _meta

    values: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if PEFT_INFIX in key:
            module, _, pname = key.partition(PEFT_INFIX)
            if not module or not pname or "." in pname:
                raise FileFormatError(f"{path}: peft LN tuning key {key!r} is not <module>{PEFT_INFIX}<parameter>; the file is corrupt")
            values[f"{module}.{pname}"] = value
    if not values:
        raise FileFormatError(f"{path} holds no LN tuning tensors (keys with {PEFT_INFIX.strip('.')})")
    heads, tensors = _heads(raw, {k for k in raw if PEFT_INFIX in k})
    targets = sorted(values)
    for name in targets:
        tensors[f"{name}.value"] = values[name].contiguous()
    config = _common_config(cfg, heads)
    if not config["targets"]:  # peft chose its per-architecture defaults; the saved keys say which
        config["targets"] = sorted({n.rsplit(".", 1)[0] for n in targets})
    meta = _meta("ln_tuning", config, targets, {n: {"absolute": True} for n in targets}, heads, cfg, path)
    meta["target_kinds"] = {n: KIND for n in targets}
    return AdapterFile(meta, tensors)


def _peft_write_site(site: Site, key: str, tensors: dict, acc: dict) -> None:
    """peft keeps a whole trained copy of each norm layer, so every parameter of the module is
    written: the adapted ones with their trained value, any other (a bias left out of the
    targets) with its base value."""
    t = site.slot_tensors()
    value = t["value"] if "value" in t else (site.theta0.float() + t["delta"]).to(site.theta0.dtype)
    tensors[f"{key}{PEFT_INFIX}{site.pname}"] = value.detach().cpu()
    holder = site.owner._modules[HOLDER]
    for pname, param in site.owner._parameters.items():
        if param is not None and pname not in holder:
            tensors.setdefault(f"{key}{PEFT_INFIX}{pname}", param.detach().cpu().clone())


def _peft_write_config(state, acc: dict) -> dict:
    return {"exclude_modules": None}


@dataclass(frozen=True)
class NormPeftConverter(PeftConverter):
    """peft's LN_TUNING adapts whole modules: any of a norm's parameters (not only ``weight``)
    can be written (io/peft.py reads ``parameters``)."""

    parameters: tuple[str, ...] = ("weight", "bias")


@METHODS.register("ln_tuning")
class LNTuning(InplaceMethod):
    name = "ln_tuning"
    config_cls = LNTuningConfig
    merge_deltas = staticmethod(_merge_deltas)
    check_saved = staticmethod(_check_saved)
    saved_shapes = staticmethod(_saved_shapes)
    peft = NormPeftConverter("LN_TUNING", _peft_read, _peft_write_site, _peft_write_config)

    @classmethod
    def eligible(cls, info: ParamInfo) -> bool:
        return is_norm(info.module) and info.param.is_floating_point()

    @classmethod
    def make_site(cls, info: ParamInfo, config: MethodConfig, options: dict[str, Any]) -> Site:
        return DeltaSite(info, KIND, absolute=bool(options.get("absolute", False)))
