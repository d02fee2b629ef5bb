"""Prefix tuning: trainable key/value prefixes in every attention layer.

Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation" (ACL,
arXiv:2101.00190). The language model is frozen; every layer ``l`` gets ``n`` trainable
activations ``P^l`` that act as keys and values of ``n`` virtual positions in front of the input:

    h_i = LM_phi(z_i, h_<i)   with  h_i = P_theta[i, :]  for the prefix positions i < n

i.e. at each layer attention reads ``softmax(Q [P_k^l; K]^T / sqrt(d)) [P_v^l; V]``. Optimising
``P_theta`` directly is unstable, so the paper reparameterises it during training,

    P_theta[i, :] = MLP_theta(P'_theta[i, :])

with a smaller table ``P'`` and a two-layer MLP, and keeps only ``P_theta`` after training. Here
that is ``prefix_projection: true`` (peft's name; ``encoder_hidden_size`` is the MLP's width): the
site trains ``P'`` and the MLP, and the saved adapter holds the folded ``P_theta`` - what peft's
PREFIX_TUNING folders hold too, with or without projection. Without projection (the default, as
in peft) the prefix itself is trained. ``init_weights: zero`` starts from zero keys and values.

The shared machinery (the cache, masks, positions, generation, peft's format) is in
:mod:`graftkit.methods.prefix`. Recipe::

    method: {method: prefix_tuning, num_virtual_tokens: 20, prefix_projection: true, encoder_hidden_size: 512}
"""
from __future__ import annotations

from ..registry import METHODS
from .activation import ModuleMethod
from .prefix import PEFT, PrefixConfig, PrefixMethod, check_saved


class PrefixTuningConfig(PrefixConfig):
    pass


@METHODS.register("prefix_tuning")
class PrefixTuning(PrefixMethod, ModuleMethod):
    name = "prefix_tuning"
    config_cls = PrefixTuningConfig
    peft = PEFT
    check_saved = staticmethod(check_saved)
