"""DEFT: LoRA trained with a density loss that makes the frozen model's FFN activations sparse.

Runwal, Pedapati and Chen, 2024 ("From PEFT to DEFT: Parameter Efficient Finetuning for Reducing
Activation Density in Transformers", AAAI 2024, arXiv:2402.01911) keep the pretrained model frozen,
train a PEFT module, and add to the task loss a differentiable stand-in for the share of non-zero
entries in the output ``a`` of each block's MLP activation function (the FFN's intermediate output)::

    L = L_task + w * D,     D = 1/L sum_l mean_{tokens, features} a_l^2 / (a_l^2 + eps)

``a^2 / (a^2 + eps)`` is about 1 where ``|a| >> sqrt(eps)`` and 0 at ``a = 0``: the mean counts the
non-zero activations smoothly. This is the form of the authors' code (github.com/IBM/DEFT,
``compute_l0_penalty``: per layer the mean over tokens and features, then the mean over layers and the
batch; ``eps`` 1e-7, weight 1.0 by default, hooks on BERT's ``intermediate_act_fn``); the paper's text
names the loss without this detail. The PEFT module here is LoRA (the paper also uses adapters and
prompts): a DEFT adapter IS a LoRA (same sites, saved tensors, merge, peft LORA export); only training
differs, through :class:`~graftkit.methods.base.MethodTraining`.

Measured (``method_report``): the activation density before training (the base model: adapter off)
and after, on the same first training batches (real tokens only, padding left out), as the share of
entries with ``|a| > density_threshold`` (default ``sqrt(eps)``, where the surrogate is 1/2) and as the
exact non-zero share the authors' evaluation counts (which a GELU, non-zero almost everywhere, barely
moves; a ReLU model's does). Per layer too.

Left out: ADA-DEFT's learned layer weights that skip MLP blocks at inference.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from pydantic import Field
from torch import nn

from ..errors import TargetError
from ..registry import METHODS
from .base import MethodTraining
from .blocks import transformer_blocks
from .lora import LoRA, LoRAConfig

#: the MLP activation module relative to a block, per model family (the first the block has)
ACTIVATION_NAMES = (
    "intermediate.intermediate_act_fn",  # BERT / MiniLM / RoBERTa
    "mlp.act_fn",  # Llama, Mistral, Qwen
    "mlp.act",  # GPT-2, GPT-NeoX, Falcon
    "layer.1.DenseReluDense.act",  # T5 encoder
    "layer.2.DenseReluDense.act",  # T5 decoder
    "ffn.activation",  # DistilBERT
    "activation_fn",  # OPT
)


class DEFTConfig(LoRAConfig):
    #: w, the density loss's weight (the authors' code: weight_l, default 1.0)
    density_weight: float = Field(1.0, gt=0.0)
    #: eps of a^2 / (a^2 + eps) (the authors' default)
    density_eps: float = Field(1e-7, gt=0.0)
    #: |a| above this counts as active in the report; None: sqrt(density_eps)
    density_threshold: float | None = Field(None, ge=0.0)
    #: training micro-batches the density is measured on, before and after
    density_batches: int = Field(4, ge=1)
    #: the activation modules to read (name suffixes, e.g. ["mlp.act_fn"]); empty: each block's MLP activation
    activation_modules: list[str] = Field(default_factory=list)


def density_loss(outputs: list[torch.Tensor], eps: float) -> torch.Tensor:
    """``1/L sum_l mean(a_l^2 / (a_l^2 + eps))`` over the activation outputs ``a_l`` (float32 scalar)."""
    if not outputs:
        raise ValueError("density_loss needs at least one activation output")
    terms = []
    for a in outputs:
        sq = a.float().pow(2)
        terms.append((sq / (sq + eps)).mean())
    return torch.stack(terms).mean()


def activation_modules(model: nn.Module, patterns: list[str] | None = None) -> list[str]:
    """The MLP activation module of every transformer block (or the modules named by ``patterns``)."""
    named = dict(model.named_modules())
    if patterns:
        found = [n for n in named if any(n == p or n.endswith("." + p) for p in patterns)]
        missing = [p for p in patterns if not any(n == p or n.endswith("." + p) for n in found)]
        if missing:
            raise TargetError(f"deft: activation_modules entry {missing[0]!r} matches no module of {type(model).__name__}; "
                              "give the name (or its end) of a module whose output is the FFN activation, e.g. mlp.act_fn")
        return found
    blocks = transformer_blocks(model)
    if not blocks:
        raise TargetError(f"deft: found no transformer blocks in {type(model).__name__}; name the FFN activation modules "
                          "with activation_modules")
    out = []
    for block in blocks:
        name = next((f"{block.name}.{rel}" for rel in ACTIVATION_NAMES if f"{block.name}.{rel}" in named), None)
        if name is None:
            raise TargetError(f"deft: block {block.name} of {type(model).__name__} has no FFN activation module graftkit knows "
                              f"({', '.join(ACTIVATION_NAMES[:3])}, ...); name it with activation_modules")
        out.append(name)
    return out


class DensityTraining(MethodTraining):
    """Hooks on the FFN activations: their outputs of each training forward feed the density loss; the
    same hooks count active entries when the density is measured (start: base model; report: adapted)."""

    changes_what_trains = False  # a loss on the activations only: an FSDP2-sharded run may use it

    def __init__(self, config: DEFTConfig):
        self.weight = config.density_weight
        self.eps = config.density_eps
        self.threshold = config.density_threshold if config.density_threshold is not None else math.sqrt(config.density_eps)
        self.batches_needed = config.density_batches
        self.patterns = list(config.activation_modules)
        self.names: list[str] = []
        self.handles: list[Any] = []
        self.outputs: list[torch.Tensor] = []
        self.counts: list[list[float]] | None = None  # per layer [active, non-zero, total] while measuring
        self.mask: torch.Tensor | None = None
        self.forward: Callable[[dict], torch.Tensor] | None = None
        self.batches: list[dict] = []
        self.before: dict[str, Any] = {}

    # -- hooks --------------------------------------------------------------------------------
    def _hook(self, index: int):
        def hook(module, args, output):
            if not isinstance(output, torch.Tensor):
                return None
            if self.counts is not None:
                self._count(index, output.detach())
            elif module.training and torch.is_grad_enabled():
                self.outputs.append(output)
            return None

        return hook

    def _count(self, index: int, a: torch.Tensor) -> None:
        active, nonzero = (a.abs() > self.threshold), (a != 0)
        mask = self.mask
        if mask is not None and a.dim() == 3 and tuple(mask.shape) == tuple(a.shape[:2]):
            m = mask.to(a.device).bool()[..., None]
            active, nonzero = active & m, nonzero & m
            total = int(m.sum()) * a.shape[-1]
        else:  # (an activation that does not line up with the batch's tokens: every entry counts)
            total = a.numel()
        c = self.counts[index]
        c[0] += int(active.sum())
        c[1] += int(nonzero.sum())
        c[2] += total

    @torch.no_grad()
    def measure(self, model: nn.Module) -> dict[str, Any]:
        """Activation density over the kept batches, with the model as it is now (eval mode)."""
        was_training = model.training
        model.eval()
        self.counts = [[0, 0, 0] for _ in self.names]
        try:
            for batch in self.batches:
                self.mask = batch.get("attention_mask") if isinstance(batch, dict) else None
                self.forward(batch)
        finally:
            counts, self.counts, self.mask = self.counts, None, None
            model.train(was_training)
        layers = [c[0] / c[2] if c[2] else 0.0 for c in counts]
        total = sum(c[2] for c in counts) or 1
        return {"density": sum(c[0] for c in counts) / total, "nonzero": sum(c[1] for c in counts) / total, "per_layer": layers}

    # -- the MethodTraining hooks ------------------------------------------------------------------
    def start(self, model: nn.Module, forward, batches: list[dict], total_steps: int) -> None:
        from ..adapter import disabled

        self.names = activation_modules(model, self.patterns)
        modules = dict(model.named_modules())
        self.handles = [modules[n].register_forward_hook(self._hook(i)) for i, n in enumerate(self.names)]
        self.forward, self.batches = forward, list(batches)
        with disabled(model):  # before = the base model's density (also when a run resumes)
            self.before = self.measure(model)

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        # the last forward's outputs (a recomputation under gradient checkpointing may have added more before them)
        got = self.outputs[-len(self.names):] if self.names else []
        self.outputs.clear()
        if not got:
            return None
        return self.weight * density_loss(got, self.eps)

    def report(self, model: nn.Module) -> dict[str, Any]:
        if not self.names:
            return {}
        after = self.measure(model)
        for h in self.handles:  # training is over: the hooks go (the saved adapter is a plain LoRA)
            h.remove()
        self.handles, self.outputs = [], []
        b, a = self.before, after

        def r(x):
            return round(float(x), 4)

        return {"activation_density_before": r(b["density"]), "activation_density_after": r(a["density"]),
                "density_reduction": r(1 - a["density"] / b["density"]) if b["density"] else None,
                "nonzero_before": r(b["nonzero"]), "nonzero_after": r(a["nonzero"]), "threshold": self.threshold,
                "layers": len(self.names), "per_layer_before": [r(x) for x in b["per_layer"]],
                "per_layer_after": [r(x) for x in a["per_layer"]], "batches": len(self.batches)}


@METHODS.register("deft")
class DEFT(LoRA):
    """LoRA's sites, tensors, merge and peft format; the density loss and the density report in training."""

    name = "deft"
    config_cls = DEFTConfig

    @classmethod
    def training(cls, config: Any) -> DensityTraining:
        from ..config import parse_config

        cfg = config if isinstance(config, DEFTConfig) else parse_config(DEFTConfig, dict(config or {}))
        return DensityTraining(cfg)
