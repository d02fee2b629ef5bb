"""Pfeiffer adapters: one sequential bottleneck after the feed-forward sublayer.

Pfeiffer et al., 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer
Learning": the Houlsby adapter kept only after the feed-forward sublayer,
``h + W_up relu(W_down h + b_down) + b_up``, which matches it in accuracy at half the
parameters and adds one adapter per block to the forward pass.
See :mod:`graftkit.methods.bottleneck` for the shared machinery.
"""
from __future__ import annotations

from ..registry import METHODS
from .bottleneck import BottleneckConfig, BottleneckMethod


class PfeifferConfig(BottleneckConfig):
    pass


@METHODS.register("pfeiffer")
class Pfeiffer(BottleneckMethod):
    name = "pfeiffer"
    config_cls = PfeifferConfig
    roles = ("ffn_out",)
