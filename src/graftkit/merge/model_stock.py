"""Model Stock - Jang, Yun, Han, 2024, "Model Stock: All we need is just a few fine-tuned models"
(arXiv:2403.19522).

The fine-tuned weights of k >= 2 models lie on a thin shell around their centre; Model Stock
pulls their average back toward the pretrained base by the ratio the shell's geometry gives.
Per tensor, with offsets ``tau_i = theta_i - theta_0``:

* ``cos`` is the mean, over all pairs ``i < j``, of ``<tau_i, tau_j> / max(|tau_i| |tau_j|, 1e-6)``
  clamped to [-1, 1];
* ``t = k cos / (1 + (k - 1) cos)``; where ``|1 + (k - 1) cos| < 1e-6`` there is no finite
  estimate and ``t = 0`` (the base);
* ``theta = t * mean_i(theta_i) + (1 - t) * theta_0 = theta_0 + t * mean_i(tau_i)``.

``filter_wise: true`` takes the angle and ``t`` per filter instead of per tensor: per row of a
matrix (each output unit), per vector along the last dimension of a higher-rank tensor; a 1-D
tensor stays one vector. This is mergekit's ``model_stock`` (0.1.5) exactly; the only difference
is the order of the float32 arithmetic (``theta_0 + t * mean(tau)`` here), so results agree to
float32 rounding. Identical offsets give ``cos = 1``, ``t = 1``: the plain average.
"""
from __future__ import annotations

from ._common import torch, register

NORM_FLOOR = 1e-6
SINGULAR = 1e-6


@register("model_stock", global_params=("filter_wise",), min_models=2, paper="arXiv:2403.19522")
def model_stock(base: torch.Tensor, deltas: torch.Tensor, *, filter_wise: bool = False) -> torch.Tensor:
    """``deltas`` is ``(k, *shape)`` with ``k >= 2``."""
    k = deltas.shape[0]
    if k < 2:
        raise ValueError(f"model_stock needs at least 2 fine-tuned models, got {k}")
    if filter_wise:
        vecs = deltas.reshape(k, 1, -1) if deltas.dim() <= 2 else deltas  # (k, filters..., length)
    else:
        vecs = deltas.reshape(k, -1)
    norms = torch.linalg.vector_norm(vecs, dim=-1)
    rows = vecs.reshape(k, -1, 1, vecs.shape[-1])  # dot products as batched matmuls: no full-size product temporaries
    cos = torch.zeros_like(norms[0])
    for i in range(k):
        for j in range(i + 1, k):
            dot = torch.matmul(rows[i], rows[j].transpose(-1, -2)).view(norms[0].shape)
            cos += (dot / (norms[i] * norms[j]).clamp(min=NORM_FLOOR)).clamp(-1, 1)
    cos /= k * (k - 1) // 2
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < SINGULAR
    t = torch.where(singular, torch.zeros_like(cos), k * cos / torch.where(singular, torch.ones_like(cos), denominator))
    merged = deltas.sum(dim=0)  # the one full-size buffer: sum, then t / k, then the base
    if filter_wise:
        shaped = merged.view(vecs.shape[1:])
        shaped.mul_(t.unsqueeze(-1) / k)
    else:
        merged.mul_(float(t) / k)
    return merged.add_(base)
