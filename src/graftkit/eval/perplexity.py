"""Perplexity of a causal LM on raw text, in windows of at most ``max_length`` tokens.

Each text is tokenized (with the tokenizer's special tokens, e.g. a BOS) into ``x_1..x_T``
and cut into windows ``x[s : s + L]`` with ``s = 0, L-1, 2(L-1), ...``: consecutive windows
share one token, so every token after the first is predicted exactly once, from the context
inside its window (at most ``L - 1`` tokens back). Per example we keep the summed negative
log-likelihood ``nll = -sum_t log p(x_t | x_<t)`` and the number of predicted tokens
``T - 1``; the task's perplexity is ``exp(sum nll / sum tokens)`` over all examples (lower is
better), and an example's ``score`` is its mean token NLL.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .classify import length_batches, right_pad


def windows(ids: list[int], max_length: int) -> list[list[int]]:
    if len(ids) < 2:
        return []
    step = max_length - 1
    return [ids[s:s + max_length] for s in range(0, len(ids) - 1, step)]


def count_windows(encoded: list[list[int]], max_length: int) -> int:
    return sum(len(windows(ids, max_length)) for ids in encoded)


def _plain_head(model: nn.Module) -> nn.Linear | None:
    """The vocabulary projection, when logits are exactly ``head(hidden)`` (no soft-capping or
    scaling): then it is applied one row at a time, so the (batch, length, vocab) logits tensor
    (0.8 GB for 8 x 512 tokens of a 49k vocabulary) is never built."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    cfg = model.config
    if (isinstance(head, nn.Linear) and getattr(cfg, "final_logit_softcapping", None) is None
            and getattr(cfg, "logit_scale", None) is None and getattr(model, "base_model", model) is not model):
        return head
    return None


def _window_nll(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[list[float], list[int]]:
    target = ids[:, 1:]
    keep = mask[:, 1:].bool()
    counts = keep.sum(dim=1).tolist()
    head = _plain_head(model)
    if head is None:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        ce = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
        return (ce.view(target.shape) * keep).sum(dim=1).double().cpu().tolist(), counts
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    out = []
    for j, n in enumerate(counts):
        logits = head(hidden[j, :n]).float()
        out.append(float(nn.functional.cross_entropy(logits, target[j, :n], reduction="sum").double()))
    return out, counts


@torch.inference_mode()
def token_nll(model: nn.Module, encoded: list[list[int]], *, max_length: int, batch_size: int, pad: int,
              advance: Callable[[int], None] | None = None) -> tuple[list[float], list[int]]:
    """(summed NLL, predicted tokens) per example."""
    device = next(model.parameters()).device
    flat: list[tuple[int, list[int]]] = [(i, w) for i, ids in enumerate(encoded) for w in windows(ids, max_length)]
    nll = [0.0] * len(encoded)
    tokens = [0] * len(encoded)
    for batch in length_batches([len(w) for _, w in flat], batch_size):
        ids, mask = right_pad([flat[k][1] for k in batch], pad, device)
        ce, counts = _window_nll(model, ids, mask)
        for j, k in enumerate(batch):
            i = flat[k][0]
            nll[i] += ce[j]
            tokens[i] += counts[j]
        if advance is not None:
            advance(1)
    return nll, tokens
