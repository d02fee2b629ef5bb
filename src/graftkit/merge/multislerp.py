"""Multi-SLERP - barycentric interpolation of several models on a hypersphere (Goddard, 2025,
"Multi-SLERP", goddard.blog/posts/multislerp-wow-what-a-cool-idea; mergekit's ``multislerp``).

Per tensor, each of the n models (or, with a ``base_model``, each task vector ``x_i - base``) is
one flattened vector ``v_i`` with weight ``w_i`` (divided by ``sum w`` when ``normalize_weights``,
the default):

1. onto the unit sphere: ``u_i = v_i / (|v_i| + eps)``;
2. the weighted Euclidean mean ``m = sum w_i u_i``, normalised (``m / |m|``);
3. into the tangent space at ``m``: ``g_i = u_i - (u_i . m) m``, and ``g = sum w_i g_i``;
4. back along the sphere by the exponential map, with ``a = |g| + eps``:
   ``r = m cos(a) + g sin(a) / a``;
5. scaled by the weighted mean norm ``sum w_i |v_i|`` (and the base added back).

Since ``g = sum w_i u_i - (sum w_i u_i . m) m`` and ``m`` is the direction of ``sum w_i u_i``, ``g``
is zero up to rounding: the result is the normalised weighted mean of the unit vectors, scaled by
the weighted mean norm (for two models not the same point as ``nuslerp``'s geodesic fraction).
The exp-map step is kept so the rounding matches mergekit's.

One model returns that model unchanged. When ``|m| < eps`` (antipodal vectors whose weights cancel)
two models fall back to the linear ``w0 v0 + w1 v1``; three or more have no defined direction and
the merge stops with an error naming the tensor.

Same arithmetic as mergekit 0.1.5; weights are required per model (as in mergekit). Weights
summing to zero with ``normalize_weights: true`` (a division by zero) and all-zero weights (the
output would be the base, or zeros) are ConfigErrors.
"""
from __future__ import annotations

from ._common import torch, as_list, register


def _check(cfg) -> None:
    from ..errors import ConfigError

    eps = cfg.parameters.get("eps", 1e-8)
    if isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps <= 0:
        raise ConfigError(f"multislerp eps {eps} must be > 0 (it keeps a zero tensor from dividing by zero); "
                          "leave it unset for 1e-8")
    weights = [m.parameters.get("weight", cfg.parameters.get("weight")) for m in cfg.models if m.model != cfg.base_model]
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        return
    if weights and all(w == 0 for w in weights):
        raise ConfigError("every multislerp weight is 0, so the merge would write "
                          f"{'base_model unchanged' if cfg.base_model else 'all zeros'}; give at least one model a nonzero weight")
    if cfg.parameters.get("normalize_weights", True) and abs(sum(weights)) < 1e-12:
        raise ConfigError(f"the multislerp weights sum to {sum(weights)} and normalize_weights is on, so the merge would "
                          "divide by zero; change the weights or set normalize_weights: false")


@register("multislerp", needs_base=False, inputs="model", model_params=("weight",),
          global_params=("normalize_weights", "eps"), min_models=1, base_as_input=True, check=_check,
          paper="goddard.blog/posts/multislerp-wow-what-a-cool-idea")
def multislerp(base: torch.Tensor | None, models: torch.Tensor, *, weight, normalize_weights: bool = True,
               eps: float = 1e-8) -> torch.Tensor:
    """``models``: the n models ``(n, *shape)``, or ``(n + 1, *shape)`` with the base first when
    ``base`` is given (then their task vectors are interpolated)."""
    x = models[1:] if base is not None else models
    n = x.shape[0]
    if n == 1:
        return x[0].clone()
    v = x - base if base is not None else x
    flat = v.reshape(n, -1)
    w = torch.tensor(as_list(weight, n, "weight"), dtype=flat.dtype)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if n == 2:
            out = (v[0] * w[0] + v[1] * w[1])
            return out if base is None else out + base
        from .plan import MergeError

        raise MergeError(f"multislerp: the weighted mean of the unit vectors of a {tuple(x.shape[1:])} tensor is zero (antipodal "
                         "inputs whose weights cancel), so the interpolation has no direction; change the weights")
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    g = (tangents * w.view(-1, 1)).sum(0)
    a = torch.linalg.vector_norm(g) + eps
    out = mean * torch.cos(a) + g * (torch.sin(a) / a)
    out = (out * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])
    return out if base is None else out + base
