"""Where the parts of a transformer block are, per model family.

Activation-space methods attach to the *sublayers* of each block: the module whose output is
the attention sublayer's result before the residual add (``attn_out``), the feed-forward
sublayer's input (``ffn_in``) and its output before the residual add (``ffn_out``). Each role
is found by the first of a few names (relative to the block) that the block has, which
covers BERT/MiniLM, Llama/SmolLM2/Mistral/Qwen, GPT-2, T5, OPT, Falcon and GPT-NeoX style
models; a model outside these takes explicit module ``targets`` instead.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import TargetError

#: role -> names relative to a block, tried in order
ROLE_NAMES: dict[str, tuple[str, ...]] = {
    "attn_out": (
        "attention.output.dense",  # BERT: Linear before dropout + residual LayerNorm
        "self_attn.o_proj",  # Llama, Mistral, Qwen
        "attn.c_proj",  # GPT-2 (Conv1D)
        # T5 self-attention; the decoder's cross-attention (layer.1.EncDecAttention.o) is not
        # adapted by default (Houlsby et al. place adapters after self-attention and the FFN
        # only); name it in targets to adapt it
        "layer.0.SelfAttention.o",
        "self_attn.out_proj",  # OPT, BART
        "self_attention.dense",  # Falcon
        "attention.dense",  # GPT-NeoX
    ),
    "ffn_in": (
        "intermediate",  # BERT: the FFN's input enters here
        "mlp",  # Llama, GPT-2, GPT-NeoX
        "layer.2.DenseReluDense",  # T5 decoder
        "layer.1.DenseReluDense",  # T5 encoder
        "fc1",  # OPT
    ),
    "ffn_out": (
        "output.dense",  # BERT: Linear before dropout + residual LayerNorm
        "mlp",
        "layer.2.DenseReluDense",
        "layer.1.DenseReluDense",
        "fc2",
    ),
}

_BLOCK_LISTS = ("layers", "layer", "h", "blocks", "block")


@dataclass(frozen=True)
class Block:
    name: str  # e.g. model.layers.3
    index: int
    modules: dict[str, str]  # role -> module name (full)

    def role(self, role: str) -> str | None:
        return self.modules.get(role)


def transformer_blocks(model: nn.Module) -> list[Block]:
    """The outermost repeated blocks (children of a ModuleList named layers/layer/h/blocks/block),
    each with the module name of every role it has. T5's encoder and decoder both count, in order."""
    named = dict(model.named_modules())
    blocks: list[Block] = []
    taken: list[str] = []
    for name, module in named.items():
        if not isinstance(module, nn.ModuleList) or name.rsplit(".", 1)[-1] not in _BLOCK_LISTS:
            continue
        if any(name.startswith(t + ".") for t in taken):  # T5's block.N.layer list is inside a block
            continue
        for i, _ in enumerate(module):
            block = f"{name}.{i}" if name else str(i)
            roles = {}
            for role, candidates in ROLE_NAMES.items():
                for rel in candidates:
                    if f"{block}.{rel}" in named:
                        roles[role] = f"{block}.{rel}"
                        break
            blocks.append(Block(block, i, roles))
        taken.append(name)
    return blocks


def role_modules(model: nn.Module, role: str, what: str, layers=None) -> list[str]:
    """Every block's module for ``role``; refused in one line when the model's blocks lack it."""
    blocks = transformer_blocks(model)
    if layers is not None:
        blocks = [b for b in blocks if b.index in set(layers)]
    if not blocks:
        raise TargetError(f"{what}: found no transformer blocks in {type(model).__name__}; name the modules to adapt with targets")
    missing = [b.name for b in blocks if b.role(role) is None]
    if missing:
        raise TargetError(f"{what}: block {missing[0]} of {type(model).__name__} has no {role.replace('_', ' ')} module "
                          f"graftkit knows ({', '.join(ROLE_NAMES[role][:3])}, ...); name the modules to adapt with targets")
    return [b.role(role) for b in blocks]
