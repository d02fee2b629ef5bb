"""P-tuning: soft tokens produced by a prompt encoder.

Liu et al., 2021, "GPT Understands, Too" (arXiv:2103.10385): the virtual tokens are not trained
directly but computed by a small prompt encoder from trainable inputs ``u_1..u_P``,

    [p_1, ..., p_P] = f([u_1, ..., u_P]),    h^0 = [p_1, ..., p_P, e(x_1), ..., e(x_L)],

with ``f`` a bidirectional LSTM followed by a two-layer ReLU MLP (the paper), or an MLP alone
(peft's default and recommendation). As in peft's ``PromptEncoder`` (whose options these are:
``encoder_reparameterization_type``, ``encoder_hidden_size`` ``h`` (default: the embedding width
``d``), ``encoder_num_layers``, ``encoder_dropout``):

* ``MLP``:  ``f(u) = W_3 relu(W_2 relu(W_1 u + b_1) + b_2) + b_3`` (``d -> h -> h -> d``);
* ``LSTM``: ``f(u) = W_5 relu(W_4 BiLSTM(u) + b_4) + b_5`` (``encoder_num_layers`` layers of
  ``h`` units per direction, ``2h -> 2h -> d``).

The encoder is what trains, and the native adapter keeps it (``prompt_encoder.*``), so training
can go on. The model reads only its output: peft saves that output as ``prompt_embeddings``
(P_TUNING folders hold no encoder), and graftkit does the same when it writes a peft folder. A
peft P_TUNING folder therefore reads as a *folded* P-tuning adapter (``folded: true``): the
prompt is the saved output itself, to use or to export again, not to train the encoder further.
The soft-prompt machinery is :mod:`graftkit.methods.soft_prompt`.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import AliasChoices, Field, field_validator, model_validator
from torch import nn

from ..registry import METHODS
from .activation import ModuleInfo
from .base import PEFT_PROMPT_PREFIX, PeftConverter
from .soft_prompt import (SoftPromptConfig, SoftPromptMethod, SoftPromptSite, embedding_of,
                          read_peft_prompt, write_peft_prompt)


class PTuningConfig(SoftPromptConfig):
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = Field(
        "MLP", validation_alias=AliasChoices("encoder_reparameterization_type", "encoder"))
    encoder_hidden_size: int | None = Field(None, ge=1)
    encoder_num_layers: int = Field(2, ge=1)
    encoder_dropout: float = Field(0.0, ge=0, lt=1)
    #: the prompt is a saved encoder output (a peft P_TUNING folder): no encoder to train
    folded: bool = False

    @field_validator("encoder_reparameterization_type", mode="before")
    @classmethod
    def _upper(cls, value):
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _mlp_options(self):
        if self.encoder_reparameterization_type == "MLP" and (self.encoder_num_layers != 2 or self.encoder_dropout):
            raise ValueError("encoder_num_layers and encoder_dropout apply to the LSTM prompt encoder only (the MLP has its "
                             "fixed three layers); remove them or set encoder_reparameterization_type: LSTM")
        return self


class PromptEncoder(nn.Module):
    """peft's layout (``embedding``, ``mlp_head``, ``lstm_head``), so the tensor names read alike."""

    def __init__(self, config: PTuningConfig, width: int, start_scale: float):
        super().__init__()
        p, d = config.num_virtual_tokens, width
        h = config.encoder_hidden_size or d
        self.kind = config.encoder_reparameterization_type
        self.embedding = nn.Embedding(p, d)
        with torch.no_grad():  # the encoder's inputs on the scale of the model's token embeddings
            self.embedding.weight.normal_(0.0, start_scale)
        if self.kind == "LSTM":
            self.lstm_head = nn.LSTM(d, h, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))

    def forward(self) -> torch.Tensor:
        u = self.embedding.weight.unsqueeze(0)
        if self.kind == "LSTM":
            u = self.lstm_head(u)[0]
        return self.mlp_head(u)[0]


class PTuningSite(SoftPromptSite):
    def __init__(self, info: ModuleInfo, config: PTuningConfig):
        super().__init__(info, "p_tuning", config.num_virtual_tokens, config.pool)
        root = info.root if info.root is not None else info.module
        table = embedding_of(root).weight.detach()
        if config.folded:
            self.prompt_embeddings = nn.Parameter(torch.zeros(config.num_virtual_tokens, table.shape[1]))
            self.slots = ("prompt_embeddings",)
        else:
            self.prompt_encoder = PromptEncoder(config, table.shape[1], float(table.float().std()))
            self.slots = tuple(f"prompt_encoder.{n}" for n, _ in self.prompt_encoder.named_parameters())

    def slot_tensors(self) -> dict[str, torch.Tensor]:
        return {s: self.get_parameter(s) for s in self.slots}

    @torch.no_grad()
    def load_slots(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, value in tensors.items():
            target = self.get_parameter(name)
            target.copy_(value.to(target.dtype))

    def prompts(self) -> torch.Tensor:
        if "prompt_embeddings" in self.slots:
            return self.prompt_embeddings
        return self.prompt_encoder()

    def export_prompts(self) -> torch.Tensor:
        was = self.training
        self.eval()  # the encoder's dropout off: the prompt the model reads at inference
        try:
            return self.prompts()
        finally:
            self.train(was)


def _peft_read(cfg: dict, raw: dict, path):
    entries: dict[str, Any] = {"folded": True, "slot": "prompt_embeddings"}
    kind = str(cfg.get("encoder_reparameterization_type") or "MLP").upper()
    if kind in ("MLP", "LSTM"):
        entries["encoder_reparameterization_type"] = kind
        if kind == "LSTM":
            entries["encoder_num_layers"] = int(cfg.get("encoder_num_layers") or 2)
            entries["encoder_dropout"] = float(cfg.get("encoder_dropout") or 0.0)
    if isinstance(cfg.get("encoder_hidden_size"), int) and cfg["encoder_hidden_size"] > 0:
        entries["encoder_hidden_size"] = cfg["encoder_hidden_size"]
    return read_peft_prompt("p_tuning", cfg, raw, path, entries)


def _peft_write(model: nn.Module, state) -> tuple[dict, dict]:
    c = state.config
    tensors, cfg = write_peft_prompt(model, state, {
        "encoder_reparameterization_type": c.encoder_reparameterization_type, "encoder_num_layers": c.encoder_num_layers,
        "encoder_dropout": c.encoder_dropout})
    cfg["encoder_hidden_size"] = c.encoder_hidden_size or cfg["token_dim"]
    return tensors, cfg


@METHODS.register("p_tuning")
class PTuning(SoftPromptMethod):
    name = "p_tuning"
    config_cls = PTuningConfig
    peft = PeftConverter("P_TUNING", _peft_read, write_model=_peft_write, prefix=PEFT_PROMPT_PREFIX)

    @classmethod
    def make_site(cls, info: ModuleInfo, config: PTuningConfig, options: dict[str, Any]):  # type: ignore[override]
        return PTuningSite(info, config)
