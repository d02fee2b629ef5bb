"""Stabilizers for fine-tuning BERT-style models: layer-wise learning-rate decay, freezing the
bottom layers, re-initializing the top layers.

* **Layer-wise LR decay** (Howard & Ruder, 2018, "discriminative fine-tuning"; Clark et al.,
  2020, ELECTRA): with ``L`` transformer blocks and decay ``d``, parameters outside the blocks
  that sit above them (head, pooler, final norm) train at ``lr``, block ``l`` (0 = bottom) at
  ``lr * d ** (L - l)`` and the embeddings at ``lr * d ** (L + 1)``.
* **Freeze the bottom k layers** (and the embeddings): their parameters get no gradient.
* **Re-initialize the top k layers** (Zhang et al., 2021, "Revisiting Few-sample BERT
  Fine-tuning"): those blocks restart from the model's own initializer before training.
  The re-initialization happens after injection, so the saved delta stays relative to the
  pretrained weights and the adapter loads onto the original base. Only parameters trained
  in place (method ``full``, or ``train_also``) can be re-initialized: a LoRA adapter cannot
  carry a changed base weight.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import ConfigError

LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
EMBED_RE = re.compile(r"(?:^|\.)(?:embeddings|embed_tokens|wte|wpe|embed_positions)(?:\.|$)")


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer blocks (the longest ``nn.ModuleList`` of blocks)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "layer", "h", "blocks", "block"):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ConfigError(f"{type(model).__name__} has no list of transformer blocks (layers / layer / h); layerwise options need one")
    return best


def layer_of(name: str) -> int | None:
    """Block index of a parameter name (adapter tensors inherit their base parameter's)."""
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def depth(name: str, num_layers: int) -> int:
    """0 for the head and anything above the blocks, ``L - l`` for block ``l``, ``L + 1`` for embeddings."""
    layer = layer_of(name)
    if layer is not None:
        return num_layers - layer
    if EMBED_RE.search(name):
        return num_layers + 1
    return 0


def layer_lrs(named_params: list[tuple[str, nn.Parameter]], lr: float, decay: float, num_layers: int) -> dict[str, float]:
    return {n: lr * decay ** depth(n, num_layers) for n, _ in named_params}


def freeze_bottom(model: nn.Module, k: int) -> list[str]:
    """Stop gradients to the embeddings and blocks 0..k-1; returns the frozen names."""
    _, blocks = find_blocks(model)
    if k > len(blocks):
        raise ConfigError(f"layerwise.freeze_bottom={k} but the model has {len(blocks)} layers")
    frozen = []
    for name, p in model.named_parameters():
        layer = layer_of(name)
        if p.requires_grad and ((layer is not None and layer < k) or (layer is None and EMBED_RE.search(name))):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


@torch.no_grad()
def reinit_top(model: nn.Module, k: int) -> list[str]:
    """Re-draw the parameters of the top k blocks with the model's initializer."""
    prefix, blocks = find_blocks(model)
    if k > len(blocks):
        raise ConfigError(f"layerwise.reinit_top={k} but the model has {len(blocks)} layers")
    std = float(getattr(getattr(model, "config", None), "initializer_range", 0.02))
    names = []
    for i in range(len(blocks) - k, len(blocks)):
        for pname, p in blocks[i].named_parameters():
            if "graft_adapter" in pname:
                continue
            if not p.requires_grad:
                raise ConfigError(f"layerwise.reinit_top: {prefix}.{i}.{pname} is not trained in place; re-initializing it would change "
                                  "the base under the adapter. Use method full (or add these layers to train_also)")
            names.append(f"{prefix}.{i}.{pname}")
        # the BERT / Llama initializer: normal(0, initializer_range) weights, zero biases, unit norms
        for mname, module in blocks[i].named_modules():
            if "graft_adapter" in mname:
                continue
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
                if getattr(module, "weight", None) is not None:
                    module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
    return names
