"""Prompt tuning: trainable soft tokens in front of the input.

Lester, Al-Rfou and Constant, 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"
(EMNLP): the frozen model reads ``P`` trainable embeddings before the embedded input,

    h^0 = [p_1, ..., p_P, e(x_1), ..., e(x_L)],     p_i in R^d,  P = num_virtual_tokens,

and only ``p_1..p_P`` train (``P * d`` parameters). The paper initialises them randomly, from
embeddings of sampled vocabulary tokens, or from the embeddings of class-label words; peft's
``prompt_tuning_init`` offers ``RANDOM``, ``SAMPLE_VOCAB`` and ``TEXT``, and so does ``init``:

* ``random``: ``p_i ~ N(0, s^2)`` with ``s`` the standard deviation of the model's token
  embedding table (peft draws ``N(0, 1)``, which on most models lies far off the embeddings'
  scale; only the start differs, the saved prompt is the same kind of tensor);
* ``vocab``: the embeddings of ``P`` token ids drawn uniformly from the vocabulary;
* ``text``: the embeddings of ``init_text``'s tokens (``tokenizer``, peft's
  ``tokenizer_name_or_path``; default: the model's own folder). As in peft, a text of more
  than ``P`` tokens is cut to its first ``P`` and a shorter one repeated until it fills ``P``.

The soft-prompt machinery (masks, positions, pooling, the KV cache) is
:mod:`graftkit.methods.soft_prompt`. peft's ``PROMPT_TUNING`` folders are read and written
(``prompt_embeddings`` is exactly ``[p_1..p_P]``).
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import AliasChoices, Field, field_validator, model_validator
from torch import nn

from ..errors import ConfigError
from ..registry import METHODS
from .activation import ModuleInfo
from .base import PEFT_PROMPT_PREFIX, PeftConverter
from .soft_prompt import (SoftPromptConfig, SoftPromptMethod, SoftPromptSite, embedding_of,
                          read_peft_prompt, write_peft_prompt)

#: peft's PromptTuningInit names
PEFT_INIT = {"RANDOM": "random", "SAMPLE_VOCAB": "vocab", "TEXT": "text"}


class PromptTuningConfig(SoftPromptConfig):
    init: Literal["random", "vocab", "text"] = Field("random", validation_alias=AliasChoices("init", "prompt_tuning_init"))
    init_text: str | None = Field(None, validation_alias=AliasChoices("init_text", "prompt_tuning_init_text"))
    tokenizer: str | None = Field(None, validation_alias=AliasChoices("tokenizer", "tokenizer_name_or_path"))

    @field_validator("init", mode="before")
    @classmethod
    def _peft_names(cls, value):
        return PEFT_INIT.get(value, value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _text(self):
        if self.init == "text" and not (self.init_text or "").strip():
            raise ValueError("init: text needs init_text (the words whose embeddings start the prompt)")
        if self.init != "text" and self.init_text is not None:
            raise ValueError(f"init_text is only read with init: text (init is {self.init}); remove it or set init: text")
        return self


def text_token_ids(config: PromptTuningConfig, root: nn.Module) -> list[int]:
    """``init_text``'s token ids, cut or repeated to ``num_virtual_tokens`` (as peft does)."""
    from ..io.hf import load_tokenizer

    source = config.tokenizer or getattr(getattr(root, "config", None), "_name_or_path", None)
    if not source:
        raise ConfigError("prompt_tuning init: text needs a tokenizer for init_text; set tokenizer (peft's tokenizer_name_or_path) "
                          "to a model folder or name")
    ids = list(load_tokenizer(source)(config.init_text)["input_ids"])
    if not ids:
        raise ConfigError(f"prompt_tuning init_text {config.init_text!r} has no tokens; give a text")
    p = config.num_virtual_tokens
    return (ids * math.ceil(p / len(ids)))[:p]


def initial_prompt(config: PromptTuningConfig, root: nn.Module) -> torch.Tensor:
    embed = embedding_of(root)
    table = embed.weight.detach()
    p = config.num_virtual_tokens
    if config.init == "random":
        return torch.randn(p, table.shape[1]) * table.float().std()
    if config.init == "vocab":
        ids = torch.randint(0, table.shape[0], (p,))
    else:
        ids = torch.tensor(text_token_ids(config, root), dtype=torch.long)
        if int(ids.max()) >= table.shape[0]:
            raise ConfigError(f"prompt_tuning: the tokenizer gives token id {int(ids.max())} but the model has {table.shape[0]} "
                              "embeddings; use the model's own tokenizer")
    with torch.no_grad():
        return embed(ids.to(table.device)).float().cpu()


class PromptTuningSite(SoftPromptSite):
    slots = ("prompt_embeddings",)

    def __init__(self, info: ModuleInfo, config: PromptTuningConfig):
        super().__init__(info, "prompt_tuning", config.num_virtual_tokens, config.pool)
        self.prompt_embeddings = nn.Parameter(initial_prompt(config, info.root if info.root is not None else info.module))

    def prompts(self) -> torch.Tensor:
        return self.prompt_embeddings


def _peft_read(cfg: dict, raw: dict, path):
    init = PEFT_INIT.get(cfg.get("prompt_tuning_init") or "RANDOM", "random")
    # the start is history (the file holds the trained prompt); a text start would need its
    # tokenizer again to re-create the config, so it is recorded as a random one
    entries: dict[str, Any] = {"init": "random" if init == "text" else init}
    return read_peft_prompt("prompt_tuning", cfg, raw, path, entries)


def _peft_write(model: nn.Module, state) -> tuple[dict, dict]:
    c = state.config
    init = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}[c.init]
    tokenizer = c.tokenizer or state.base.get("name_or_path") if c.init == "text" else None
    if init == "TEXT" and not tokenizer:
        # peft refuses TEXT without a tokenizer even where it never reads them (loading a saved,
        # trained prompt); the start is history, so the file says RANDOM
        init = "RANDOM"
    return write_peft_prompt(model, state, {"prompt_tuning_init": init, "prompt_tuning_init_text": c.init_text if init == "TEXT" else None,
                                            "tokenizer_name_or_path": tokenizer if init == "TEXT" else None, "tokenizer_kwargs": None})


@METHODS.register("prompt_tuning")
class PromptTuning(SoftPromptMethod):
    name = "prompt_tuning"
    config_cls = PromptTuningConfig
    peft = PeftConverter("PROMPT_TUNING", _peft_read, write_model=_peft_write, prefix=PEFT_PROMPT_PREFIX)

    @classmethod
    def make_site(cls, info: ModuleInfo, config: PromptTuningConfig, options: dict[str, Any]):  # type: ignore[override]
        return PromptTuningSite(info, config)
