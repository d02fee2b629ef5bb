"""Cross-entropy through a frozen output projection, one chunk of rows at a time.

For a causal LM the last step of the forward pass is ``logits = h W^T`` over the whole
vocabulary (49,152 entries for SmolLM2) followed by ``log_softmax`` and the negative
log-likelihood of the targets. Autograd keeps the ``(N, V)`` logits and builds two more tensors
of that size in the backward pass (the NLL gradient, then the log-softmax gradient): on a CPU
that is 15% of a LoRA step. Since ``d loss_i / d logits_i = softmax(logits_i) - onehot(t_i)``,
the gradient with respect to ``h`` can be formed in the forward pass itself, chunk by chunk, and
only ``(chunk, V)`` is ever alive; the backward pass scales the stored rows by the incoming
per-row gradient. The same idea as the fused linear cross-entropy of Liger-Kernel (Hsu et al.,
2024), written for a frozen ``W`` (LoRA, IA3, prompt methods): a ``W`` that is trained needs
``sum_i g_i (p_i - y_i)^T h_i`` with the upstream ``g_i`` not known in the forward pass, so the
caller uses the plain path then.

Per-row losses equal ``F.cross_entropy(h @ W^T + b, t, reduction="none")`` (the logits are
computed in the ambient autocast dtype and the softmax in float32, as that path does).
"""
from __future__ import annotations

import weakref

import torch

CHUNK_ROWS = 128  # (128, 49152) float32 logits = 25 MB at a time


_casts: dict[int, tuple[weakref.ref, tuple, torch.Tensor]] = {}  # id(weight) -> (weight, its state, the cast)


def frozen_cast(weight: torch.Tensor, dtype: torch.dtype, cache: bool = True) -> torch.Tensor:
    """``weight.to(dtype)``, kept between calls while the weight's storage and version stay the
    same: a frozen head is cast once per run instead of twice per chunk of every step (for
    SmolLM2's tied 49,152 x 576 embedding under bf16 autocast that was 29% of a LoRA step, each
    cast a fresh 56 MB allocation).

    ``cache=False`` for a weight FSDP gathers: its gathered storage is freed after each step and
    refilled on the next gather without a version bump, possibly at the same address, so the
    key could not tell a changed shard from an unchanged one."""
    if weight.dtype == dtype:
        return weight
    if not cache:
        return weight.detach().to(dtype)
    state = (weight.data_ptr(), weight._version, dtype)
    hit = _casts.get(id(weight))
    if hit is None or hit[0]() is not weight or hit[1] != state:
        ident = id(weight)
        hit = (weakref.ref(weight, lambda _: _casts.pop(ident, None)), state, weight.detach().to(dtype))
        _casts[ident] = hit
    return hit[2]


class _FrozenLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                chunk: int, cache: bool = True) -> torch.Tensor:
        ctx.cache = cache
        n = hidden.shape[0]
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        # autocast would cast the (vocab, hidden) weight again for every matmul of every chunk
        w = frozen_cast(weight, dtype, cache=ctx.cache)
        b = None if bias is None else bias.to(dtype)
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        with torch.autocast(device, enabled=False):
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                h, t = hidden[start:stop], targets[start:stop]
                logits = torch.nn.functional.linear(h.to(dtype), w, b).float()
                lse = torch.logsumexp(logits, dim=-1)
                losses[start:stop] = lse - logits.gather(1, t[:, None]).squeeze(1)
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(stop - start, device=probs.device), t] -= 1.0
                grad_hidden[start:stop] = probs.to(dtype) @ w
        ctx.save_for_backward(grad_hidden)
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_losses[:, None].to(grad_hidden.dtype), None, None, None, None, None


def frozen_linear_cross_entropy(hidden: torch.Tensor, linear: torch.nn.Linear, targets: torch.Tensor,
                                chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Per-row cross-entropy of ``linear(hidden)`` against ``targets`` (``(N, H)``, ``(N,)``) for a
    ``linear`` whose weight and bias do not require grad; the gradient flows to ``hidden`` only."""
    if linear.weight.requires_grad or (linear.bias is not None and linear.bias.requires_grad):
        raise ValueError("frozen_linear_cross_entropy needs a frozen projection; use F.cross_entropy(linear(h), t)")
    from .fsdp import GATHERED, whole

    # the weight is read here, not through linear's forward, so FSDP's pre-forward gather of
    # linear's unit may not have run: a shard is gathered (every process calls this in step),
    # else the matmul mixes a Tensor with a DTensor (how FSDP2 failed under accelerate's layout)
    weight, bias = whole(linear.weight), None if linear.bias is None else whole(linear.bias)
    return _FrozenLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk, not getattr(linear, GATHERED, False))
