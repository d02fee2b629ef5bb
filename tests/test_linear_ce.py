"""The chunked cross-entropy through a frozen output projection equals F.cross_entropy of the
full logits (losses and gradient to the hidden states), and bf16 LoRA runs hold the frozen
Linear weights in bf16 without changing what is saved."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from graftkit.train.linear_ce import frozen_linear_cross_entropy


def _case(bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(16, 50, bias=bias)
    head.requires_grad_(False)
    hidden = torch.randn(37, 16, generator=g).requires_grad_(True)
    targets = torch.randint(0, 50, (37,), generator=g)
    upstream = torch.rand(37, generator=g)  # per-row weights, as a task-balanced loss gives
    return head, hidden, targets, upstream


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 8, 256])
def test_equals_cross_entropy_of_the_full_logits(bias, chunk):
    head, hidden, targets, upstream = _case(bias)
    want = nn.functional.cross_entropy(head(hidden), targets, reduction="none")
    (want * upstream).sum().backward()
    want_grad, hidden.grad = hidden.grad.clone(), None
    got = frozen_linear_cross_entropy(hidden, head, targets, chunk=chunk)
    (got * upstream).sum().backward()
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(hidden.grad, want_grad, atol=1e-6)


def test_under_bf16_autocast_with_a_bf16_head():
    head, hidden, targets, upstream = _case(False)
    ref_head = nn.Linear(16, 50, bias=False)
    ref_head.weight.data = head.weight.data.to(torch.bfloat16).float()
    ref_head.requires_grad_(False)
    head.weight.data = head.weight.data.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = nn.functional.cross_entropy(ref_head(hidden).float(), targets, reduction="none")
        got = frozen_linear_cross_entropy(hidden, head, targets, chunk=8)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-5)
    g_want = torch.autograd.grad((want * upstream).sum(), hidden)[0]
    g_got = torch.autograd.grad((got * upstream).sum(), hidden)[0]
    assert g_got.dtype == hidden.dtype
    assert torch.allclose(g_got, g_want, rtol=0.02, atol=2e-3)  # bf16 matmuls on both sides


def test_float32_head_under_bf16_autocast_is_cast_once_and_recast_after_a_change():
    """A float32 frozen head under autocast: the same loss as autocast's own path, the bf16 copy
    reused across calls, and made again once the weight changes in place."""
    from graftkit.train.linear_ce import frozen_cast

    head, hidden, targets, _ = _case(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = nn.functional.cross_entropy(head(hidden).float(), targets, reduction="none")
        got = frozen_linear_cross_entropy(hidden, head, targets, chunk=8)
        first = frozen_cast(head.weight, torch.bfloat16)
        assert frozen_cast(head.weight, torch.bfloat16) is first
        with torch.no_grad():
            head.weight.mul_(2)
        again = frozen_cast(head.weight, torch.bfloat16)
    assert torch.allclose(got, want, atol=1e-5)
    assert again is not first and torch.equal(again, head.weight.detach().to(torch.bfloat16))


def test_a_trained_head_is_refused():
    head, hidden, targets, _ = _case(False)
    head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen projection"):
        frozen_linear_cross_entropy(hidden, head, targets)


def test_bf16_lora_run_holds_frozen_linears_in_bf16_and_saves_the_same_adapter(tmp_path):
    """Tiny Llama with a tied embedding: frozen Linear weights become bf16, the tied head and the
    embedding stay float32, LoRA factors stay float32, and training + saving work."""
    import transformers

    import graftkit as gk
    from graftkit.train.loop import hold_frozen_linears_in_bf16

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    gk.inject(model, gk.LoRAConfig(r=4, targets=["q_proj", "v_proj"], init_lora_weights=False))
    reference = {k: v.clone() for k, v in gk.materialize_delta(model).items()}
    n = hold_frozen_linears_in_bf16(model)
    assert n == 2 * 7  # q, k, v, o, gate, up, down per layer; not the tied lm_head
    assert model.lm_head.weight.dtype == torch.float32 and model.model.embed_tokens.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    delta = gk.materialize_delta(model)
    assert set(delta) == set(reference) and all(torch.equal(delta[k], reference[k]) for k in delta)
    gk.save_adapter(model, tmp_path / "a")
    assert (tmp_path / "a" / "adapter.safetensors").exists()
