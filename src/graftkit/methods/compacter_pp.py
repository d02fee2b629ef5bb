"""Compacter++: Compacter with only the adapter after the feed-forward sublayer.

Karimi Mahabadi, Henderson and Ruder, 2021, "Compacter: Efficient Low-Rank Hypercomplex
Adapter Layers" (NeurIPS 2021, arXiv:2106.04647), the "++" variant: as Pfeiffer et al. keep
Houlsby's adapter after the feed-forward sublayer only, Compacter++ keeps one Compacter per
block, ``h + W_up f(W_down h + b_down) + b_up`` on the feed-forward output, with each projection
a PHM layer

    W = sum_{i=1..n} A_i (x) B_i,      A_i in R^{n x n} shared by all layers,   B_i = s_i t_i^T

so ``L`` blocks cost ``2L(k + d) + n^3`` parameters without biases. The paper's 0.047% of
T5-base counts these, the PHM biases and the layer norms it also trains (reduction factor 32);
see :func:`graftkit.train.params.t5_base_share`. The machinery is
:mod:`graftkit.methods.compacter`.
"""
from __future__ import annotations

from ..registry import METHODS
from .compacter import Compacter, CompacterConfig


class CompacterPPConfig(CompacterConfig):
    pass


@METHODS.register("compacter_pp")
class CompacterPP(Compacter):
    name = "compacter_pp"
    config_cls = CompacterPPConfig
    roles = ("ffn_out",)
