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

import torch

CHUNK_ROWS = 256  # (256, 49152) float32 logits = 50 MB at a time


class _FrozenLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:
        n = hidden.shape[0]
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            h, t = hidden[start:stop], targets[start:stop]
            logits = torch.nn.functional.linear(h.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype)).float()
            lse = torch.logsumexp(logits, dim=-1)
            losses[start:stop] = lse - logits.gather(1, t[:, None]).squeeze(1)
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            probs[torch.arange(stop - start, device=probs.device), t] -= 1.0
            grad_hidden[start:stop] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_losses[:, None].to(grad_hidden.dtype), None, None, None, None


def frozen_linear_cross_entropy(hidden: torch.Tensor, linear: torch.nn.Linear, targets: torch.Tensor,
                                chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Per-row cross-entropy of ``linear(hidden)`` against ``targets`` (``(N, H)``, ``(N,)``) for a
    ``linear`` whose weight and bias do not require grad; the gradient flows to ``hidden`` only."""
    if linear.weight.requires_grad or (linear.bias is not None and linear.bias.requires_grad):
        raise ValueError("frozen_linear_cross_entropy needs a frozen projection; use F.cross_entropy(linear(h), t)")
    return _FrozenLinearCrossEntropy.apply(hidden, linear.weight, linear.bias, targets, chunk)
