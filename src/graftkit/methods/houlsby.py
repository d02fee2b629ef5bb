"""Houlsby adapters: a sequential bottleneck after attention and after the feed-forward sublayer.

Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP": in every block, the
output ``h`` of the attention sublayer and of the feed-forward sublayer (before the residual
connection) becomes ``h + W_up f(W_down h + b_down) + b_up``, with a bottleneck of ``m``
units (``m = d / reduction_factor``); the up-projection starts near zero so training starts
from the base model. The paper also trains the layer norms (``train_layer_norm``).
See :mod:`graftkit.methods.bottleneck` for the shared machinery.
"""
from __future__ import annotations

from typing import Literal

from ..registry import METHODS
from .bottleneck import BottleneckConfig, BottleneckMethod


class HoulsbyConfig(BottleneckConfig):
    non_linearity: Literal["relu", "gelu", "swish", "silu", "tanh", "identity"] = "swish"


@METHODS.register("houlsby")
class Houlsby(BottleneckMethod):
    name = "houlsby"
    config_cls = HoulsbyConfig
    roles = ("attn_out", "ffn_out")
