"""Linear merging (model soups) and task arithmetic.

``linear`` - Wortsman et al., 2022, "Model soups: averaging weights of multiple fine-tuned models
improves accuracy without increasing inference time": ``theta = sum_i w_i theta_i / sum_i w_i``
(``normalize: true``, the default) or the plain weighted sum (``normalize: false``). Works on the
models themselves; a base model is not needed (nor used unless it is listed among the models).

``task_arithmetic`` - Ilharco et al., 2023, "Editing Models with Task Arithmetic":
``theta = theta_0 + lambda * sum_i w_i tau_i`` with ``tau_i = theta_i - theta_0``; with
``normalize: true`` the sum is divided by ``sum_i w_i`` (mergekit's option; off by default).
"""
from __future__ import annotations

from ._common import Fused, torch, as_list, finish, register


@register("linear", needs_base=False, inputs="model", model_params=("weight",), global_params=("normalize",),
          paper="arXiv:2203.05482", chunkable=True, needs_all_inputs_at_once=False, fused=Fused("weighted_average"))
def linear(base: torch.Tensor | None, models, *, weight=1.0, normalize: bool = True) -> torch.Tensor:
    """Weighted average of the models: ``sum_i w_i theta_i / sum_i w_i`` in float32.

    ``models`` is a stacked ``(n, *shape)`` tensor or a list of n tensors of any float dtype (each
    is widened while it is accumulated, so no float32 copies are made). With
    ``normalize=False`` the weighted sum is returned as is. A weight sum within 1e-8 of zero is
    not divided by (as in mergekit). ``base`` is ignored.
    """
    ws = as_list(weight, len(models), "weight")
    out = torch.zeros(models[0].shape, dtype=torch.float32)
    for m, w in zip(models, ws):
        out.add_(m, alpha=w)
    if normalize:
        total = sum(ws)
        if abs(total) >= 1e-8:
            out.div_(total)
    return out


@register("task_arithmetic", model_params=("weight",), global_params=("normalize", {"lambda": 1.0}),
          paper="arXiv:2212.04089", chunkable=True, nan_propagating=True, fused=Fused("merge_deltas"))
def task_arithmetic(base: torch.Tensor, deltas: torch.Tensor, *, weight=1.0, normalize: bool = False,
                    inplace: bool = False, **kw) -> torch.Tensor:
    """``theta_0 + lambda * sum_i w_i tau_i`` (divided by ``sum_i w_i`` when ``normalize``)."""
    return finish(base, deltas, weight, consensus=False, normalize=normalize, lam=kw.get("lambda", 1.0), inplace=inplace)
