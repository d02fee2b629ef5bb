"""P-tuning v2: deep prompts, i.e. prefix tuning in every layer for understanding tasks.

Liu et al., 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally Across
Scales and Tasks" (ACL short papers, arXiv:2110.07602). Prompts are added at every layer as
prefix keys and values, the same equation as prefix tuning:

    Attn^l(Q, K, V) = softmax(Q [P_k^l; K]^T / sqrt(d)) [P_v^l; V],   l = 1..L

with the paper's choices for natural-language understanding (its Section 3.2):

* **reparameterisation off** by default (an MLP helps on some tasks and hurts on others; the
  paper treats it as a per-task choice): ``prefix_projection: false``, which can be turned on;
* **prompt length per task**: simple classification prefers short prompts (under 20 tokens),
  hard sequence labelling long ones (around 100). ``preset: simple`` sets 20 virtual tokens,
  ``preset: hard`` 100; ``num_virtual_tokens`` sets it directly (it wins over a preset);
* **a classification head on the tokens** instead of a verbalizer: a randomly initialised linear
  head (BERT's [CLS] pooler and classifier, a decoder's last-token ``score``) trained with the
  prompts - ``graft train`` with ``task: classification`` adds the head to ``train_also``;
* dropout on the prompts in training, as the paper's code does (``prefix_dropout``: its
  ``hidden_dropout_prob``, 0.1 here).

How it differs from ``prefix_tuning`` in graftkit: the site, the saved format and peft's
PREFIX_TUNING export are the same (peft implements P-tuning v2 as prefix tuning without
projection; a peft folder is read back as ``prefix_tuning``). Only the defaults differ: 20-token
prompts with dropout 0.1 and the task presets here; prefix_tuning keeps peft's defaults (no
dropout) and is the one to use with Li & Liang's MLP. The paper's "prompt depth" ablation
(prompts in some layers only) is not offered: every layer reads one attention mask, so a layer
without the prefix cannot be expressed through the cache (``layers`` is refused in one line).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..registry import METHODS
from .activation import ModuleMethod
from .prefix import PEFT, PrefixConfig, PrefixMethod, check_saved

#: the paper's prompt lengths: simple classification under 20, hard sequence labelling ~100
PRESETS = {"simple": 20, "hard": 100}


class PTuningV2Config(PrefixConfig):
    preset: Literal["simple", "hard"] | None = None
    prefix_dropout: float = Field(0.1, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _preset(self):
        if self.preset is not None and "num_virtual_tokens" not in self.model_fields_set:
            self.num_virtual_tokens = PRESETS[self.preset]
        return self


@METHODS.register("p_tuning_v2")
class PTuningV2(PrefixMethod, ModuleMethod):
    name = "p_tuning_v2"
    config_cls = PTuningV2Config
    peft = PEFT
    check_saved = staticmethod(check_saved)
