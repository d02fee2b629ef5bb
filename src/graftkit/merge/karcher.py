"""Karcher mean - the Riemannian (Frechet) mean of the models' directions on the unit sphere,
scaled by their mean norm (Karcher, 1977, "Riemannian center of mass and mollifier smoothing";
for model merging mergekit's ``karcher``, which cites arXiv:2603.04972).

Per tensor, every input - the listed models and, when a ``base_model`` is given, the base too
(mergekit adds it as one more input; here it comes first) - is one flattened vector ``x_i``, all
with the same weight ``alpha = 1/N``:

1. ``u_i = x_i / |x_i|``; inputs with ``|x_i| <= tol`` take no part in the direction (all of
   them tiny: the output is zero), and the others' weights are renormalised to sum to 1;
2. start from the normalised weighted mean of the ``u_i`` (the first direction when that mean is
   shorter than ``tol``);
3. up to ``max_iter`` times: the weighted mean of the log maps
   ``theta_i / sin(theta_i) * (u_i - cos(theta_i) m)`` with ``cos(theta_i) = clamp(m . u_i, -1, 1)``
   (inputs within ``theta_i < tol`` of ``m`` add nothing) is the tangent step ``g``; stop when
   ``|g| < tol``, else move along the sphere ``m <- cos|g| m + sin|g| g/|g|`` and renormalise;
4. the output is ``m * sum_i alpha_i |x_i|`` (the mean norm over all N inputs, tiny ones included).

One input returns it unchanged. Same arithmetic as mergekit 0.1.5 (float32); the base's place in
the input order matters only in step 2's fallback.
"""
from __future__ import annotations

from ._common import torch, register


def _check(cfg) -> None:
    from ..errors import ConfigError

    for name, floor in (("max_iter", 0), ("tol", 0)):
        value = cfg.parameters.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < floor:
            raise ConfigError(f"karcher {name} {value} must be >= {floor} ({'the number of Riemannian steps' if name == 'max_iter' else 'the stopping tolerance'})")


@register("karcher", needs_base=False, inputs="model", global_params=("max_iter", "tol"), min_models=1,
          base_as_input=True, check=_check, paper="arXiv:2603.04972 (mergekit karcher)")
def karcher(base: torch.Tensor | None, models: torch.Tensor, *, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """``models``: every input ``(N, *shape)`` (the base among them when given); ``base`` is not
    treated specially."""
    n = models.shape[0]
    if n == 1:
        return models[0].clone()
    shape = models.shape[1:]
    flat = models.reshape(n, -1)
    norms = [torch.linalg.vector_norm(flat[i]) for i in range(n)]
    alphas = [1.0 / n] * n
    valid = [i for i in range(n) if norms[i].item() > tol]
    if not valid:
        return torch.zeros(shape, dtype=models.dtype)
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    units = [flat[i] / norms[i] for i in valid]
    mean = torch.zeros_like(units[0])
    for w, u in zip(weights, units):
        mean += w * u
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for w, u in zip(weights, units):
            cos = torch.clamp(torch.dot(mean, u), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            step += w * (theta / torch.sin(theta)) * (u - cos * mean)
        step_norm = torch.linalg.vector_norm(step)
        if step_norm.item() < tol:
            break
        mean = torch.cos(step_norm) * mean + torch.sin(step_norm) * (step / step_norm)
        length = torch.linalg.vector_norm(mean)
        if length.item() > tol:
            mean = mean / length
    scale = sum(a * r for a, r in zip(alphas, norms))
    return (scale * mean).view(shape)
