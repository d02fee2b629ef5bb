"""BitFit: train only the bias terms.

BitFit (Ben Zaken et al., 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models") freezes every weight matrix and updates only the
biases, ``b' = b + delta_b``: about 0.1% of a BERT model's parameters. The delta is the
change of each trained bias, stored dense.
"""
from __future__ import annotations

from typing import Any

from pydantic import Field

from ..layers import layer_kind
from ..registry import METHODS
from ..targets import ParamInfo
from .base import MethodConfig, Site, TuningMethod
from .inplace import DeltaSite


class BitFitConfig(MethodConfig):
    targets: list[str] = Field(default_factory=lambda: ["*"])


@METHODS.register("bitfit")
class BitFit(TuningMethod):
    name = "bitfit"
    config_cls = BitFitConfig
    kinds = ("any",)

    @classmethod
    def eligible(cls, info: ParamInfo) -> bool:
        return info.pname == "bias" or info.pname.endswith("_bias")

    @classmethod
    def make_site(cls, info: ParamInfo, config: BitFitConfig, options: dict[str, Any]) -> Site:
        return DeltaSite(info, layer_kind(info.module, info.pname))
