"""Which kernels a training run uses (``optim.kernels``), and ``torch.compile`` (``optim.compile``).

* ``torch``: the model's own modules, and for causal LMs the chunked cross-entropy through a frozen
  head of :mod:`.linear_ce` (the only path on a CPU).
* ``liger``: liger-kernel's Triton kernels (Hsu et al., 2024) - RMSNorm, RoPE and SwiGLU patched
  onto the model instance through liger's per-model-type apply function, and its fused linear
  cross-entropy in :class:`~graftkit.train.loop.WithLoss`, which never builds the
  ``(tokens, vocabulary)`` logits whether the head is frozen or trained. Triton needs CUDA.
* ``auto`` (the default): ``liger`` on CUDA when liger-kernel imports, else ``torch``.

The decision (:func:`choose`) is a pure function of the request, the device type and whether
liger-kernel imports, so it is tested on a CPU without liger pretending to run.
"""
from __future__ import annotations

import inspect

from torch import nn

from ..errors import ConfigError

INSTALL = "pip install 'graftkit[gpu]'"


def liger_importable() -> bool:
    """Whether liger-kernel (and the Triton it needs) import here."""
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:  # ImportError, or Triton failing to find its backend
        return False
    return True


def choose(requested: str, device_type: str, importable: bool) -> str:
    """``"liger"`` or ``"torch"`` for ``optim.kernels`` = ``requested`` on ``device_type``."""
    if requested == "torch":
        return "torch"
    on_cuda = device_type == "cuda"
    if requested == "liger":
        if not on_cuda:
            raise ConfigError(f"optim.kernels liger needs a CUDA GPU (liger-kernel's kernels are Triton) and this run is on "
                              f"{device_type}; use optim.kernels auto or torch")
        if not importable:
            raise ConfigError(f"optim.kernels liger: liger-kernel is not installed (or its Triton does not import); "
                              f"install it with {INSTALL}, or use optim.kernels auto or torch")
        return "liger"
    if requested != "auto":
        raise ConfigError(f"optim.kernels must be auto, liger or torch, not {requested!r}")
    return "liger" if on_cuda and importable else "torch"


def liger_apply_functions() -> dict:
    """liger's apply function of each model type it has kernels for."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return MODEL_TYPE_TO_APPLY_LIGER_FN


def apply_liger(model: nn.Module, explicit: bool, table: dict | None = None) -> str | None:
    """Patch liger's RMSNorm, RoPE and SwiGLU (GeGLU for Gemma) onto ``model``; returns a warning
    (and patches nothing) where liger has no kernels for its type. The loss stays graftkit's:
    liger's patched ``forward`` with its own loss is turned off, WithLoss calls the fused loss."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    apply = (liger_apply_functions() if table is None else table).get(model_type)
    if apply is None:
        if explicit:
            raise ConfigError(f"optim.kernels liger: liger-kernel has no kernels for model type {model_type!r}; "
                              "use optim.kernels auto or torch")
        return f"liger-kernel has no kernels for model type {model_type!r}; this run uses torch's (optim.kernels auto)"
    accepted = inspect.signature(apply).parameters
    wanted = {"cross_entropy": False, "fused_linear_cross_entropy": False}
    apply(model=model, **{k: v for k, v in wanted.items() if k in accepted})
    return None


def fused_linear_cross_entropy(hidden, linear: nn.Linear, targets, reduction: str):
    """liger's fused linear cross-entropy of ``linear(hidden)`` against ``targets``: the summed
    loss (``reduction="sum"``), or per-row losses (``"none"``, which liger recomputes in the
    backward pass, so only the task-balanced loss asks for it). The head may be frozen or trained."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    from .fsdp import whole

    # read outside linear's forward, so under FSDP2 the weight may still be a shard: gathered (a
    # differentiable collective; every process calls it in the step), as linear_ce does
    weight, bias = whole(linear.weight), None if linear.bias is None else whole(linear.bias)
    out = LigerFusedLinearCrossEntropyLoss(reduction=reduction)(weight, hidden, targets, bias)
    return getattr(out, "loss", out)


def compile_blocks(model: nn.Module) -> int:
    """``torch.compile`` the forward of each transformer block (or of the whole model where it
    has no list of blocks); returns how many forwards were compiled.

    Per block, not the whole step: the loss selects the target positions with a data-dependent
    mask, which would break the graph, and identical blocks share one compiled graph. Only the
    ``forward`` is compiled, so hooks set on the modules (FSDP2's, gradient checkpointing's) run
    outside the compiled region and parameter names stay as they are for checkpoints."""
    import torch

    from .layerwise import find_blocks

    try:
        _, blocks = find_blocks(model)
        targets = list(blocks)
    except ConfigError:
        targets = [model]
    for block in targets:
        block.forward = torch.compile(block.forward)
    return len(targets)
