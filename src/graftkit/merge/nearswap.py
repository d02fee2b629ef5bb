"""NearSwap - take the other model's value wherever it is already close to the base's.

No paper: the method comes from the QuartetAnemoi-70B merges (huggingface.co/alchemonaut/
QuartetAnemoi-70B-t0.0001, the model card's "NearSwap" algorithm) and is mergekit's ``nearswap``.

Per entry, with ``a`` the base and ``b`` the other model::

    w   = clamp(t / max(|a - b|, 1e-6), 0, 1)
    out = w * b + (1 - w) * a

so an entry whose two values differ by at most ``t`` is swapped to ``b`` entirely, and one that
differs by more moves towards ``b`` by ``t`` (its distance to ``a`` is ``t`` whatever the gap):
``t`` is an absolute distance in weight units, not an interpolation fraction. ``t = 0`` returns
the base; entries equal in both models stay as they are. Elementwise, so it runs on row chunks.

Same arithmetic as mergekit 0.1.5; graftkit checks ``0 <= t <= 1`` (mergekit takes any number:
a negative ``t`` returns the base, and ``t >= 1`` already swaps every entry whose gap is at most 1).
"""
from __future__ import annotations

from ._common import torch, register

MIN_GAP = 1e-6  # mergekit's floor on |a - b|: equal entries get w = 1 (b == a there anyway), never 0/0


@register("nearswap", inputs="model", global_params=("t",), min_models=2, max_models=2, base_as_input=True,
          chunkable=True, paper="huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001")
def nearswap(base: torch.Tensor, models: torch.Tensor, *, t: float) -> torch.Tensor:
    """``models`` is ``(2, *shape)``: ``models[0]`` the base, ``models[1]`` the other model."""
    a, b = models[0], models[1]
    w = (t / (a - b).abs().clamp(min=MIN_GAP)).clamp(0, 1)
    return w * b + (1 - w) * a
