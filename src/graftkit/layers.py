"""What kind of layer owns a parameter, and how its weight maps to an (out, in) matrix.

Every weight-space method works on one canonical view of a weight: a 2-D matrix ``M`` of
shape (out, in) such that the layer computes ``y = M x`` per position. The layouts differ:

=========  =====================  ==========================================
kind       stored weight          canonical (out, in) view
=========  =====================  ==========================================
linear     (out, in)              the weight itself
conv1d     (in, out)              transpose (transformers' GPT-2 ``Conv1D``)
embedding  (num, dim)             transpose: one "input" per vocabulary row
conv2d     (out, in/g, kh, kw)    flatten the kernel: (out, in*kh*kw)
param      (out, in) bare tensor  the tensor itself (parametrization fallback)
=========  =====================  ==========================================

A delta computed in the canonical view is turned back into the stored layout by
:func:`from_matrix`, so a materialized delta always has the base parameter's shape.
"""
from __future__ import annotations

import torch
from torch import nn

def is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D without importing transformers
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_quantized(param: torch.Tensor | None) -> bool:
    """A bitsandbytes 4-bit weight (QLoRA, see graftkit.io.quantize): packed bytes plus a quant_state."""
    return param is not None and getattr(param, "quant_state", None) is not None and not param.is_floating_point()


def logical_shape(param: torch.Tensor) -> torch.Size:
    """The shape a weight stands for: a packed 4-bit weight's is its quant_state's (out, in)."""
    return torch.Size(param.quant_state.shape) if is_quantized(param) else param.shape


def layer_kind(module: nn.Module, pname: str) -> str:
    """Kind of the weight ``module.<pname>``; ``param`` for anything without a known forward."""
    if pname == "weight":
        if isinstance(module, nn.Linear):
            return "linear"
        if is_conv1d(module):
            return "conv1d"
        if isinstance(module, nn.Embedding):
            return "embedding"
        if isinstance(module, nn.Conv2d):
            return "conv2d"
    return "param"


def matrix_shape(kind: str, shape: torch.Size) -> tuple[int, int]:
    if kind == "linear" or kind == "param":
        return shape[0], shape[1]
    if kind in ("conv1d", "embedding"):
        return shape[1], shape[0]
    if kind == "conv2d":
        return shape[0], int(torch.Size(shape[1:]).numel())
    raise ValueError(kind)


def to_matrix(kind: str, weight: torch.Tensor) -> torch.Tensor:
    if kind in ("linear", "param"):
        return weight
    if kind in ("conv1d", "embedding"):
        return weight.t()
    if kind == "conv2d":
        return weight.flatten(1)
    raise ValueError(kind)


def from_matrix(kind: str, matrix: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if kind in ("linear", "param"):
        return matrix
    if kind in ("conv1d", "embedding"):
        return matrix.t()
    if kind == "conv2d":
        return matrix.reshape(shape)
    raise ValueError(kind)


def out_axis(kind: str) -> int:
    """Axis of the stored weight that indexes outputs (DoRA's magnitude, IA3's output scale)."""
    return 1 if kind in ("conv1d", "embedding") else 0
