"""BitFit: train only the bias terms.

BitFit (Ben Zaken et al., 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models") freezes every weight matrix and updates only the
biases, ``b' = b + delta_b``: about 0.1% of a BERT model's parameters. The delta is the
change of each trained bias, stored dense.
"""
from __future__ import annotations

from pydantic import AliasChoices, Field

from ..registry import METHODS
from ..targets import ParamInfo
from .base import MethodConfig
from .inplace import InplaceMethod


class BitFitConfig(MethodConfig):
    targets: list[str] = Field(default_factory=lambda: ["*"], validation_alias=AliasChoices("targets", "target_modules"))


@METHODS.register("bitfit")
class BitFit(InplaceMethod):
    name = "bitfit"
    config_cls = BitFitConfig

    @classmethod
    def eligible(cls, info: ParamInfo) -> bool:
        return info.pname == "bias" or info.pname.endswith("_bias")
