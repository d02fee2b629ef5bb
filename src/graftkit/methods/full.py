"""Full fine-tuning and layer-selective fine-tuning.

Every selected parameter is trained directly, ``theta = theta0 + delta`` with a dense
``delta`` (the classic recipe of Howard & Ruder, 2018, and Devlin et al., 2019). With
``layers`` it becomes the freezing preset of partial fine-tuning: ``layers="top:2"`` trains
only the two highest transformer blocks, ``"bottom:k"`` the lowest k, or an explicit list of
block indices; everything else stays frozen. The delta is ``theta - theta0`` per parameter,
stored dense, so a fully fine-tuned model can be merged, inspected and exported like any
adapter.
"""
from __future__ import annotations

from pydantic import AliasChoices, Field

from ..registry import METHODS
from ..targets import ParamInfo
from .base import MethodConfig
from .inplace import InplaceMethod


class FullConfig(MethodConfig):
    targets: list[str] = Field(default_factory=lambda: ["*"], validation_alias=AliasChoices("targets", "target_modules"))


@METHODS.register("full")
class Full(InplaceMethod):
    name = "full"
    config_cls = FullConfig

    @classmethod
    def eligible(cls, info: ParamInfo) -> bool:
        return info.param.is_floating_point()
