"""SLERP - spherical linear interpolation of two models (Shoemake, 1985, "Animating rotation with
quaternion curves"; popularised for model merging by mergekit).

Per tensor, both tensors are flattened to vectors ``a`` (the base) and ``b`` (the other model);
with unit directions ``a/|a|``, ``b/|b|`` (a norm <= 1e-8 counts as 1), ``cos(theta)`` is their dot
product clamped to [-1, 1] and
``slerp = sin((1-t) theta)/sin(theta) * a + sin(t theta)/sin(theta) * b``, falling back to the
linear ``(1-t) a + t b`` when ``|cos(theta)| > 0.9995`` (nearly parallel or antiparallel).
The interpolation coefficients apply to the un-normalised tensors, as in mergekit.
``t = 0`` gives the base, ``t = 1`` the other model.
"""
from __future__ import annotations

import math

from ._common import torch, register

DOT_THRESHOLD = 0.9995
EPS = 1e-8


@register("slerp", inputs="model", global_params=("t",), min_models=2, max_models=2, base_as_input=True)
def slerp(base: torch.Tensor, models: torch.Tensor, *, t: float) -> torch.Tensor:
    """``models`` is ``(2, *shape)``: ``models[0]`` the base, ``models[1]`` the other model."""
    a, b = models[0].reshape(-1), models[1].reshape(-1)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na = na if na > EPS else torch.ones_like(na)
    nb = nb if nb > EPS else torch.ones_like(nb)
    dot = float(torch.dot(a / na, b / nb).clamp(-1, 1))
    if abs(dot) > DOT_THRESHOLD:
        ca, cb = 1 - t, t
    else:
        theta = math.acos(dot)
        s = math.sin(theta)
        ca, cb = math.sin((1 - t) * theta) / s, math.sin(t * theta) / s
    return (ca * models[0] + cb * models[1])
