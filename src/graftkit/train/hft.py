"""Half Fine-Tuning (HFT; Hui et al., 2024): each stage trains a random half of the parameter
blocks and freezes the rest, a regularizer against forgetting.

Following the paper, the choice is made per category inside each transformer block: in
block ``l`` the attention matrices form one group and the feed-forward (and other) matrices
another, and ``fraction`` (0.5) of each group is frozen, drawn at random anew every
``stage_steps`` optimizer steps. A "matrix" is one adapted base parameter together with all
its adapter tensors (LoRA's A and B freeze together). Parameters outside the blocks (the
embeddings, a new head) always train.

Freezing is done by dropping the frozen parameters' gradients before the optimizer step
(AdamW skips a parameter whose gradient is ``None``), not by toggling ``requires_grad``:
the gradient graph, and so DDP's bucket layout, stays the same in every stage. The draw is a
pure function of (seed, stage), so a resumed run freezes exactly what an uninterrupted one did.
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch import nn

from .layerwise import layer_of

# attention matrices (Llama/GPT-2/BERT names); everything else in a block (MLP, norms) is the other group
ATTN_RE = re.compile(r"(self_attn\.|\.attn\.|attention\.(self|output)\.|q_proj|k_proj|v_proj|o_proj|c_attn)")


def unit_of(name: str) -> str:
    """The base parameter an adapter tensor belongs to (``...q_proj.graft_adapter.weight.lora_A`` -> ``...q_proj.weight``)."""
    if ".graft_adapter." in name:
        owner, rest = name.split(".graft_adapter.", 1)
        return f"{owner}.{rest.split('.', 1)[0]}"
    return name


def groups(names: list[str]) -> dict[tuple[int, str], list[str]]:
    """(block, category) -> units inside the blocks, in a stable order."""
    out: dict[tuple[int, str], list[str]] = defaultdict(list)
    for name in names:
        unit = unit_of(name)
        layer = layer_of(unit)
        if layer is None:
            continue
        key = (layer, "attention" if ATTN_RE.search(unit) else "mlp")
        if unit not in out[key]:
            out[key].append(unit)
    return dict(sorted(out.items()))


class HalfFineTuning:
    def __init__(self, named_params: list[tuple[str, nn.Parameter]], stage_steps: int, fraction: float, seed: int):
        self.params = named_params
        self.stage_steps, self.fraction, self.seed = stage_steps, fraction, seed
        self.groups = groups([n for n, _ in named_params])
        self._stage: tuple[int, set[str]] | None = None

    def frozen_units(self, step: int) -> set[str]:
        """Units frozen during optimizer step ``step`` (0-based)."""
        stage = step // self.stage_steps
        if self._stage is None or self._stage[0] != stage:
            g = torch.Generator().manual_seed(self.seed * 7919 + stage + 1)
            frozen: set[str] = set()
            for units in self.groups.values():
                k = int(round(self.fraction * len(units)))
                frozen.update(units[i] for i in torch.randperm(len(units), generator=g)[:k].tolist())
            self._stage = (stage, frozen)
        return self._stage[1]

    def drop_frozen_grads(self, step: int) -> None:
        frozen = self.frozen_units(step)
        for name, p in self.params:
            if unit_of(name) in frozen:
                p.grad = None
