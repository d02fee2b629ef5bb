"""``passthrough`` - copy one model's tensor unchanged (mergekit's method for layer stacking).

With ``slices:`` (merge/slices.py) it builds frankenmerges: each slice names one source and its
layers are copied into the output in slice order. The optional per-model ``scale`` multiplies the
copied tensor (mergekit's ``scale``, e.g. to damp a duplicated layer's output projection).
Passthrough takes exactly one model per slice (one model in ``models:``).
"""
from __future__ import annotations

from ._common import register, torch


@register("passthrough", needs_base=False, inputs="model", model_params=("scale",), max_models=1, chunkable=True,
          needs_all_inputs_at_once=False, nan_propagating=True)
def passthrough(base, models, *, scale=None) -> torch.Tensor:
    """``models`` holds one tensor (any float dtype): returned as float32, times ``scale[0]`` when set."""
    value = scale[0] if isinstance(scale, (list, tuple)) else scale
    out = models[0].to(torch.float32, copy=True)
    if value is not None:
        out.mul_(float(value))
    return out
