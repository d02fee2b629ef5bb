"""Masked Thought (Chen et al., 2024): during SFT on chain-of-thought data, replace a random
fraction of the response (reasoning) tokens *in the input* with a mask token, keeping the
loss targets unchanged. The model must predict each next token of the true reasoning while
parts of what it has "written so far" are hidden: a data-side regularizer.

Applied per micro-batch: each response token (label != -100) of the input is replaced with
probability ``ratio``; prompt tokens and padding are never touched and ``labels`` are the
original ids. The draw comes from a generator seeded by (seed, micro-batch index, rank), so it
is reproducible and a resumed run masks exactly as an uninterrupted one.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .data import IGNORE


def mask_token_id(tokenizer, name: str | None) -> int:
    if name is not None:
        ids = tokenizer(name, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ConfigError(f"masked_thought.mask_token {name!r} is {len(ids)} tokens for this tokenizer; give a single-token string")
        return ids[0]
    for attr in ("mask_token_id", "unk_token_id", "pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return v
    raise ConfigError("the tokenizer has no mask, unk, pad or eos token; set masked_thought.mask_token")


def mask_thought(batch: dict[str, torch.Tensor], ratio: float, mask_id: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A copy of ``batch`` whose response input tokens are masked with probability ``ratio``."""
    ids = batch["input_ids"]
    response = batch["labels"] != IGNORE
    draw = torch.rand(ids.shape, generator=generator) < ratio
    out = dict(batch)
    out["input_ids"] = torch.where(response & draw, torch.full_like(ids, mask_id), ids)
    return out
