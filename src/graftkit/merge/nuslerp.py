"""NuSLERP - spherical interpolation of two models by weights, optionally row by row and
optionally of task vectors (mergekit's ``nuslerp``; SLERP is Shoemake, 1985, "Animating rotation
with quaternion curves").

Two models ``x0``, ``x1`` with weights ``w0``, ``w1`` give the interpolation fraction
``t = w1 / (w0 + w1)`` (``t = 0.5`` when ``|w0 + w1| < 1e-6``; negative or unnormalised weights
extrapolate as the fraction says). With a ``base_model`` the two task vectors ``v_i = x_i - base``
are interpolated and the base is added back (``base + slerp(t, v0, v1)``); without one the models
themselves (``v_i = x_i``).

``slerp(t, v0, v1)`` over vectors: ``u_i = v_i / max(|v_i|, 1e-7)``, ``cos = clamp(u0 . u1, -1, 1)``,
``theta = acos(cos)`` and ``(sin((1 - t) theta) v0 + sin(t theta) v1) / sin(theta)``; where the
two are colinear (``1 - cos^2 <= 1e-16``, i.e. ``|cos| = 1`` in float32) the linear
``(1 - t) v0 + t v1``. The coefficients apply to the unnormalised vectors, so norms interpolate too.
Which vectors:

* ``nuslerp_flatten: true`` (the default): the whole tensor is one vector (as ``slerp``);
* ``nuslerp_flatten: false``: every vector along the last dimension separately - for a
  ``(out, in)`` weight, each row;
* ``nuslerp_flatten: false`` with ``nuslerp_row_wise: true``: every vector along the first
  dimension - for an ``(out, in)`` weight, each column ``W[:, j]``. (mergekit's names: "row-wise"
  slerps dim 0.) A 1-D tensor is one vector either way.

Same arithmetic as mergekit 0.1.5. ``nuslerp_row_wise: true`` with ``nuslerp_flatten: true`` is a
ConfigError here (mergekit silently flattens, ignoring the row-wise request), and both weights
must be given (mergekit also requires them).
"""
from __future__ import annotations

from ._common import torch, as_list, register

NORM_FLOOR = 1e-7
COLINEAR_EPS = 1e-8


def spherical(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int | None) -> torch.Tensor:
    """SLERP of ``v0`` towards ``v1`` by ``t``; ``dim=None``: the whole tensors as one vector each,
    else every vector along ``dim`` separately."""
    shape = v0.shape
    if dim is None:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1 and v0.dim() > 1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= COLINEAR_EPS ** 2
    theta = torch.acos(torch.where(colinear, 0.0, cos))  # the colinear rows' angle is replaced below
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if dim is not None and dim != -1 and out.dim() > 1:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def fraction(w0: float, w1: float) -> float:
    total = w0 + w1
    return 0.5 if abs(total) < 1e-6 else w1 / total


def _check(cfg) -> None:
    from ..errors import ConfigError

    flatten = cfg.parameters.get("nuslerp_flatten", True)
    if cfg.parameters.get("nuslerp_row_wise", False) and (flatten is None or flatten):
        raise ConfigError("nuslerp_row_wise: true has no effect while nuslerp_flatten is true (its default: the whole "
                          "tensor is one vector); add 'nuslerp_flatten: false' to slerp vectors along dim 0")


@register("nuslerp", needs_base=False, inputs="model", model_params=("weight",),
          global_params=("nuslerp_flatten", "nuslerp_row_wise"), min_models=2, max_models=2, base_as_input=True,
          check=_check, paper="mergekit nuslerp (SLERP: Shoemake 1985)")
def nuslerp(base: torch.Tensor | None, models: torch.Tensor, *, weight, nuslerp_flatten: bool = True,
            nuslerp_row_wise: bool = False) -> torch.Tensor:
    """``models``: the two models ``(2, *shape)``, or ``(3, *shape)`` with the base first when
    ``base`` is given (then their task vectors are interpolated)."""
    x = models[1:] if base is not None else models
    if x.shape[0] != 2:
        raise ValueError(f"nuslerp takes exactly two models besides the base; got {x.shape[0]}")
    w0, w1 = as_list(weight, 2, "weight")
    t = fraction(w0, w1)
    dim = None if nuslerp_flatten else (0 if nuslerp_row_wise else -1)
    if base is None:
        return spherical(t, x[0], x[1], dim)
    return base + spherical(t, x[0] - base, x[1] - base, dim)
