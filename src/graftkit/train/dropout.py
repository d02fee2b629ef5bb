"""Dropout with a recomputed mask, for training on CPU.

``torch.nn.functional.dropout`` draws one Bernoulli sample per element from the generator and
keeps the mask for the backward pass; with attention-probability dropout (``(batch, heads,
length, length)`` per layer) that is about a fifth of a full fine-tuning step of a small
encoder on CPU. Here the keep decision of element ``e`` is a pure function of ``(seed, e)``
(SplitMix64, counter-based, computed in a vectorized numba kernel), so the backward pass
recomputes the mask instead of storing it, and one 64-bit hash serves two elements.
Semantics are dropout's: each element is zeroed with probability ``p`` (exactly
``round(p * 2**32) / 2**32``) and survivors are scaled by ``1 / (1 - p)``. The seed of every call
is drawn from torch's default generator, so ``torch.manual_seed`` and the RNG state saved in a
checkpoint fix the masks (exact resume holds).

:func:`use_fast_dropout` switches a transformers model to it: its ``nn.Dropout`` modules and its
attention's probability dropout (through an attention function registered with transformers).
"""
from __future__ import annotations

import numba as nb
import numpy as np
import torch
from torch import nn

from ..rawbits import as_f32, random_draws, to_raw

_BLOCK = 1 << 14
ATTENTION = "graft_sdpa"
# The kernel is single-threaded on purpose. With numba's parallel (OpenMP) runtime loaded next to
# torch's, the same training step gave slightly different activations in a 2-thread process than
# in a 1-thread one, which broke bit-exact resume across processes (tests/test_train.py); split
# over Python threads instead it was slower (torch's OpenMP workers still spin on the cores).


@nb.njit(nogil=True, cache=True)
def _dropout(x, out, seed, bound, scale):
    """``out = x * keep / (1 - p)`` over raw bits (uint32: float32, uint16: bf16 - widened, multiplied
    in float32 and rounded to nearest even, as torch's bf16 multiply); keep where draw >= bound."""
    n = x.size
    draw_block = np.empty(_BLOCK + 1, dtype=np.uint64)
    zero = np.float32(0.0)
    for start in range(0, n, _BLOCK):
        xs = x[start:start + _BLOCK]
        os_ = out[start:start + _BLOCK]
        c = xs.size
        draws = random_draws(draw_block, seed, start, c)
        for j in range(c):
            os_[j] = to_raw(as_f32(xs[j]) * (scale if draws[j] >= bound else zero), os_)


def apply_mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``x`` with the mask of ``(seed, p)`` applied and survivors scaled by ``1/(1-p)`` (a new tensor)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    bound = np.uint64(min(round(p * 2**32), 2**32))
    scale = np.float32(1.0 / (1.0 - p))
    bits = (torch.int32, np.uint32) if x.dtype == torch.float32 else (torch.int16, np.uint16)  # else bf16 (the caller checks)
    _dropout(x.view(-1).view(bits[0]).numpy().view(bits[1]), out.view(-1).view(bits[0]).numpy().view(bits[1]),
             np.uint64(seed), bound, scale)
    return out


class _RecomputedDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, seed):
        ctx.p, ctx.seed = p, seed
        return apply_mask(x, p, seed)

    @staticmethod
    def backward(ctx, grad):
        return apply_mask(grad, ctx.p, ctx.seed), None, None


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Functional dropout with a recomputed mask (CPU float32 / bfloat16; anything else, and
    ``p`` of 0 or 1, goes to ``torch.nn.functional.dropout``)."""
    if not training or p == 0.0:
        return x
    if p >= 1.0 or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return nn.functional.dropout(x, p, training)
    seed = int(torch.randint(0, 2**62, (1,)))  # from torch's generator: seeded runs and resumes repeat it
    return _RecomputedDropout.apply(x, p, seed)


class FastDropout(nn.Dropout):
    """``nn.Dropout`` with the recomputed mask of :func:`fast_dropout` (same ``p``, same module API)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return nn.functional.dropout(x, self.p, self.training, inplace=True)
        return fast_dropout(x, self.p, self.training)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' SDPA attention, except that in training with dropout the probabilities are
    computed explicitly and dropped by :func:`fast_dropout` (with dropout torch's SDPA on CPU runs
    the same explicit math path, with its own dropout). Without dropout: SDPA itself."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if dropout == 0.0 or not module.training or query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    elif is_causal and query.shape[2] > 1:
        q_len, k_len = query.shape[2], key.shape[2]
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = fast_dropout(probs, dropout, True)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


def use_fast_dropout(model: nn.Module) -> int:
    """Switch ``model`` (a transformers model on CPU) to recomputed-mask dropout: every
    ``nn.Dropout`` module with ``p > 0`` and, when the model uses SDPA attention, the attention
    probabilities. Returns how many modules were switched. The weights, the state dict and the
    saved model are unchanged."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Dropout and module.p > 0:
            module.__class__ = FastDropout  # same attributes, same state (none): only forward differs
            count += 1
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) == "sdpa":
        _register()
        model.set_attn_implementation(ATTENTION)
    return count
