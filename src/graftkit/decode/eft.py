"""Emulated fine-tuning (EFT) up-scaling: a large base model steered at decode time by the
difference between a small fine-tuned model and its small base (Mitchell et al., 2023, "An
Emulator for Fine-Tuning Large Language Models using Small Language Models", arXiv:2310.12962).

No weights change. At every step ``t`` the three models see the same prefix and

    log p_eft(y | x, y_<t) = log p_large_base(y | .) + scale * (log p_small_ft(y | .) - log p_small_base(y | .)) - log Z

where each ``log p`` is that model's **log-softmax** (normalized next-token log-probabilities)
and ``Z`` renormalizes over the vocabulary. This is the paper's form: it reads the fine-tuned
model as the base model reweighted by an implicit reward ``r = log p_ft - log p_base`` (the
small pair's "behaviour delta") and applies that reward on top of the large base.
``scale`` is the coefficient on the reward (the paper's up-scaling is ``scale = 1``; other
values interpolate, 0, or extrapolate it; the paper's helpfulness/harmlessness trade-off
scales the reward in the same way).

Why log-softmax rather than raw logits: each model's log-softmax differs from its logits by a
per-step constant (``logsumexp`` of its logits), so after the renormalization both give the
same distribution, the same greedy token and the same samples; but log-softmax values are the
quantities the paper defines, they do not drift with a model's arbitrary logit offset, and the
combined row we record per step is a proper log-distribution that can be compared with a
single model's (the tests compare it with the large base's own log-softmax).

Temperature and top-p apply to the combined distribution (:mod:`.loop`), as they would to a
single model's. Every model keeps its own KV cache, so a step costs one token through each.

All three models must share one tokenizer (the arithmetic is per token id): their tokenizers'
vocabularies must be equal - the same strings at the same ids - and their output layers the
same size; otherwise :class:`EftError` says which differ.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .loop import Decoded, Sampling, decode, single


class EftError(ConfigError):
    """The models of an EFT cannot be combined token by token (different tokenizers or vocabularies)."""


def combine(large: torch.Tensor, small_ft: torch.Tensor, small_base: torch.Tensor, scale: float) -> torch.Tensor:
    """The EFT up-scaling of one step's log-softmax rows (unnormalized: a log-softmax of the
    result is the EFT distribution). A token that a small model rules out (log-probability -inf,
    as with a masked vocabulary entry) would make ``-inf - -inf = nan``: it is ruled out instead,
    so no NaN reaches the softmax. A token only the small base rules out gets ``+inf`` (an
    infinite ratio): such tokens then share all the mass."""
    out = large + scale * (small_ft - small_base)
    out = torch.where(torch.isnan(out), torch.full_like(out, float("-inf")), out)
    top = torch.isposinf(out)
    if top.any():
        out = torch.where(top, torch.zeros_like(out), torch.full_like(out, float("-inf")))
    return out


def output_size(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def check_same_tokenizer(tokenizers: dict[str, object], models: dict[str, nn.Module] | None = None) -> None:
    """One line naming the first difference when the tokenizers (and, given ``models``, the
    models' output sizes) are not one vocabulary."""
    names = list(tokenizers)
    first = names[0]
    ref = tokenizers[first].get_vocab()
    for name in names[1:]:
        other = tokenizers[name].get_vocab()
        if len(other) != len(ref):
            raise EftError(f"EFT needs one tokenizer for all three models, but {first}'s has {len(ref)} tokens and {name}'s "
                           f"{len(other)}; the log-probabilities are added per token id, so use models of one family "
                           "(the same tokenizer)")
        if other != ref:
            by_id = {i: s for s, i in ref.items()}
            other_by_id = {i: s for s, i in other.items()}
            diff = min(i for i in set(by_id) | set(other_by_id) if by_id.get(i) != other_by_id.get(i))
            raise EftError(f"EFT needs one tokenizer for all three models, but token {diff} is {by_id.get(diff)!r} in "
                           f"{first}'s and {other_by_id.get(diff)!r} in {name}'s; the log-probabilities are added per token "
                           "id, so use models of one family (the same tokenizer)")
    if models:
        sizes = {name: output_size(m) for name, m in models.items()}
        if len(set(sizes.values())) > 1:
            shown = ", ".join(f"{n} {s}" for n, s in sizes.items())
            raise EftError(f"EFT needs models with one output vocabulary, but their output layers have {shown} rows; "
                           "use models of one family (the same tokenizer and vocabulary size)")
        size = next(iter(sizes.values()))
        if size < len(ref):
            raise EftError(f"the models' output layers have {size} rows but the tokenizer has {len(ref)} tokens; "
                           "give models whose vocabulary matches their tokenizer")


@dataclass
class EftModels:
    large: nn.Module
    small_ft: nn.Module
    small_base: nn.Module


def eft_decode(models: EftModels, prompt: Sequence[int], *, scale: float = 1.0, max_new_tokens: int,
               sampling: Sampling = Sampling(), eos: Sequence[int] = (), cache: bool = True) -> Decoded:
    """Decode ``prompt`` (token ids of the shared tokenizer) with EFT up-scaling."""
    if not math.isfinite(scale):
        raise ConfigError(f"the EFT scale must be a finite number, not {scale}")
    return decode([models.large, models.small_ft, models.small_base], lambda lp: combine(*lp, scale), prompt,
                  max_new_tokens=max_new_tokens, sampling=sampling, eos=eos, cache=cache)


def plain_decode(model: nn.Module, prompt: Sequence[int], *, max_new_tokens: int, sampling: Sampling = Sampling(),
                 eos: Sequence[int] = (), cache: bool = True) -> Decoded:
    """Decode ``prompt`` with one model through the same loop (``graft generate`` without ``--eft``)."""
    return decode([model], single, prompt, max_new_tokens=max_new_tokens, sampling=sampling, eos=eos, cache=cache)
