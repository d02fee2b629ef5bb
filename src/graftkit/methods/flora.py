"""FLoRA: a Tucker-decomposed weight delta that keeps the weight's own N-d shape.

FLoRA (Si et al., 2024, "FLoRA: Low-Rank Core Space for N-dimension", arXiv:2405.14739) models the
change of an N-dimensional parameter with a Tucker decomposition instead of flattening it to a
matrix first: a small core tensor ``G`` of the same order (r_1 x ... x r_N) and one factor matrix
``U_n`` (I_n x r_n) per mode::

    delta_W = s * G x_1 U_1 x_2 U_2 ... x_N U_N
    (G x_n U)[..., i_n, ...] = sum_{p} G[..., p, ...] U[i_n, p]          (the mode-n product)

A Conv2d kernel (out, in/groups, kh, kw) gets a 4-d core and four factors, so the spatial modes keep
their structure; a 2-d weight reduces to ``delta_W = s * U_1 G U_2^T``, a LoRA with an r_1 x r_2
core matrix between its two factors. Modes are taken in the canonical order of
:mod:`graftkit.layers`: (out, in) for Linear and GPT-2's Conv1D, (out, in/groups, kh, kw) for Conv2d.

Initialisation as the authors' code (github.com/SJTU-DeepVisionLab/FLoRA, ``FLoRALayer``): the core
starts at zero (so training starts from the base model) and every factor is He-normal with
``a = sqrt(3)``, i.e. N(0, 1 / (2 r_n)). ``s`` is a plain multiplier (``scale``; the authors' example
uses 4.0), not divided by the rank.

Ranks: ``r`` is an int (every channel mode, i.e. out and in; the spatial modes of a kernel keep
their full size unless ``kernel_r`` is set) or a list with one rank per mode. A rank larger than its
mode is refused in one line: it adds parameters without adding anything the mode can express.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from pydantic import AliasChoices, Field
from torch import nn

from ..errors import AdapterError, ConfigError, UnsupportedError
from ..layers import layer_kind, matrix_shape
from ..registry import METHODS
from ..targets import ParamInfo
from .base import MethodConfig
from .weight_delta import WeightDeltaMethod, WeightDeltaSite


class FLoRAConfig(MethodConfig):
    #: Tucker rank: an int for the channel modes, or one rank per mode ([out, in] or [out, in, kh, kw])
    r: int | list[int] = 8
    #: rank of a kernel's spatial modes when ``r`` is an int; None keeps their full size
    kernel_r: int | None = Field(None, ge=1)
    scale: float = Field(4.0, gt=0, validation_alias=AliasChoices("scale", "alpha"))
    #: True: the core starts at zero (identity at init); False: a random core (for tests)
    init_weights: bool = True


MODE_NAMES = {2: ("out", "in"), 4: ("out", "in", "kh", "kw")}


def modes(kind: str, shape) -> tuple[int, ...]:
    """The sizes of the Tucker modes of a stored weight: (out, in), or a kernel's own 4 axes."""
    if kind == "conv2d":
        return tuple(int(s) for s in shape)
    return tuple(int(s) for s in matrix_shape(kind, torch.Size(shape)))


def tucker_ranks(kind: str, shape, r: int | list[int], kernel_r: int | None, name: str) -> list[int]:
    """One rank per mode of ``name`` (stored ``shape``), refusing a rank larger than its mode."""
    sizes = modes(kind, shape)
    labels = MODE_NAMES[len(sizes)]
    if isinstance(r, list):
        if len(r) != len(sizes):
            raise ConfigError(f"flora: r={r} has {len(r)} ranks but {name} {tuple(shape)} has {len(sizes)} Tucker modes "
                              f"({', '.join(labels)}); give one rank per mode or a single int")
        ranks = [int(x) for x in r]
    else:
        ranks = [int(r)] * 2 + [int(kernel_r) if kernel_r is not None else s for s in sizes[2:]]
    for label, rank, size in zip(labels, ranks, sizes):
        if rank < 1:
            raise ConfigError(f"flora: Tucker rank {rank} for mode {label} of {name} must be at least 1")
        if rank > size:
            raise ConfigError(f"flora: Tucker rank {rank} for mode {label} of {name} {tuple(shape)} is larger than the mode's "
                              f"size {size}; use a rank <= {size} for that mode (r as a list sets one rank per mode)")
    return ranks


def mode_product(t: torch.Tensor, u: torch.Tensor, n: int) -> torch.Tensor:
    """``t x_n u``: contract mode ``n`` of ``t`` (size r) with the columns of ``u`` (I x r)."""
    return torch.movedim(torch.tensordot(u, t, dims=([1], [n])), 0, n)


def tucker(core: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """``core x_1 U_1 ... x_N U_N``: the full tensor (I_1 x ... x I_N)."""
    out = core
    for n, u in enumerate(factors):
        out = mode_product(out, u, n)
    return out


def factor_slots(n: int) -> tuple[str, ...]:
    return tuple(f"flora_U{i}" for i in range(n))


def flora_formula(kind: str, weight: torch.Tensor, slots: Mapping[str, torch.Tensor], settings: Mapping[str, Any]) -> torch.Tensor:
    """``s * G x_1 U_1 ... x_N U_N`` in the canonical (out, in) view (a kernel's delta flattened), float32."""
    core = slots["flora_core"].float()
    full = tucker(core, [slots[s].float() for s in factor_slots(core.dim())]) * float(settings["scale"])
    return full.flatten(1) if kind == "conv2d" else full


class FLoRASite(WeightDeltaSite):
    formula = staticmethod(flora_formula)

    def __init__(self, info: ParamInfo, kind: str, settings: Mapping[str, Any]):
        super().__init__(info, kind, settings)
        weight = info.param
        if kind == "conv2d" and weight.dim() != 4:
            raise UnsupportedError(f"{info.name}: a Conv2d weight must be 4-D, this one is {tuple(weight.shape)}")
        ranks = list(self.settings["r"])
        sizes = modes(kind, weight.shape)
        self.slots = ("flora_core", *factor_slots(len(ranks)))
        dev = weight.device
        self.flora_core = nn.Parameter(torch.zeros(ranks, dtype=self.dtype, device=dev))
        for i, (size, rank) in enumerate(zip(sizes, ranks)):
            # the authors' He-normal with a = sqrt(3) on an (I, r) factor: std = sqrt(2 / (1 + 3)) / sqrt(r)
            u = torch.randn(size, rank, dtype=self.dtype, device=dev) * math.sqrt(0.5 / rank)
            setattr(self, f"flora_U{i}", nn.Parameter(u))
        if not self.settings.get("init_weights", True):
            with torch.no_grad():
                self.flora_core.normal_()

    def factored_output(self, x: torch.Tensor) -> torch.Tensor | None:
        # a matrix delta U0 G U1^T applied right to left: never forms the (out, in) matrix
        if self.kind not in ("linear", "conv1d"):
            return None
        h = F.linear(x.to(self.flora_U1.dtype), self.flora_U1.t())
        h = F.linear(h, self.flora_core)
        return F.linear(h, self.flora_U0) * float(self.settings["scale"])


def _check_saved(adapter, name: str, options: dict, where: str) -> None:
    from ..validate import saved_tensor

    core = saved_tensor(adapter, f"{name}.flora_core", where)
    if core.dim() not in MODE_NAMES:
        raise AdapterError(f"{where}: {name}.flora_core has shape {tuple(core.shape)}; a FLoRA core is 2-D or 4-D - the file is corrupt")
    for i, slot in enumerate(factor_slots(core.dim())):
        u = saved_tensor(adapter, f"{name}.{slot}", where)
        if u.dim() != 2 or u.shape[1] != core.shape[i]:
            raise AdapterError(f"{where}: {name}.{slot} has shape {tuple(u.shape)} but {name}.flora_core is {tuple(core.shape)} "
                               f"(rank {core.shape[i]} in mode {i}); the file is corrupt or mixes two adapters")
    r = options.get("r")
    if r is not None and list(r) != list(core.shape):
        raise AdapterError(f"{where}: adapter.json says r={r} for {name} but {name}.flora_core has shape {tuple(core.shape)}; "
                           "the file is corrupt or mixes two adapters")


def _saved_shapes(adapter, name: str, kind: str, base_shape: tuple, feedforward: bool = False) -> dict[str, tuple]:
    ranks = tuple(adapter.tensors[f"{name}.flora_core"].shape)
    sizes = modes(kind, base_shape)
    want = {f"{name}.flora_core": ranks}
    if len(sizes) == len(ranks):
        want.update({f"{name}.{slot}": (size, rank) for slot, size, rank in zip(factor_slots(len(ranks)), sizes, ranks)})
    else:  # a 2-D core on a kernel (or the reverse): the core's order is what cannot fit
        want[f"{name}.flora_core"] = tuple(sizes)
    return want


@METHODS.register("flora")
class FLoRA(WeightDeltaMethod):
    name = "flora"
    config_cls = FLoRAConfig
    site_cls = FLoRASite
    kinds = ("linear", "conv1d", "conv2d")
    check_saved = staticmethod(_check_saved)
    saved_shapes = staticmethod(_saved_shapes)

    @classmethod
    def site_options(cls, config: FLoRAConfig, info: ParamInfo) -> dict[str, Any]:
        # resolved per target (and saved): a kernel and a matrix get different numbers of modes
        kind = layer_kind(info.module, info.pname)
        return {"r": tucker_ranks(kind, info.param.shape, config.r, config.kernel_r, info.name)}
