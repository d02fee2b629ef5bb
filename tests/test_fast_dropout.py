"""Recomputed-mask dropout (graftkit.train.dropout) against what dropout must do."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from graftkit.train import dropout as D
from conftest import tiny_bert, tiny_llama


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drops_p_and_scales_the_survivors(p):
    x = torch.randn(300_001)
    y = D.fast_dropout(x, p)
    dropped = y == 0
    sigma = (p * (1 - p) / x.numel()) ** 0.5
    assert abs(dropped.float().mean().item() - p) < 5 * sigma
    assert torch.equal(y[~dropped], x[~dropped] * torch.tensor(1 / (1 - p), dtype=torch.float32))


def test_gradient_uses_the_forward_mask():
    x = torch.randn(4, 50_000, requires_grad=True)
    y = D.fast_dropout(x, 0.3)
    g = torch.randn_like(y)
    y.backward(g)
    kept = y != 0
    scale = torch.tensor(1 / 0.7, dtype=torch.float32)
    assert torch.equal(x.grad[kept], g[kept] * scale)
    assert torch.equal(x.grad[~kept], torch.zeros_like(x.grad[~kept]))


def test_masks_follow_torch_seed_and_differ_between_calls():
    x = torch.ones(10_000)
    torch.manual_seed(3)
    a, b = D.fast_dropout(x, 0.2), D.fast_dropout(x, 0.2)
    torch.manual_seed(3)
    assert torch.equal(a, D.fast_dropout(x, 0.2)) and not torch.equal(a, b)


def test_bf16_matches_the_float32_mask_rounded():
    x = torch.randn(20_000).to(torch.bfloat16)
    got = D.apply_mask(x, 0.25, seed=99)
    want = D.apply_mask(x.float(), 0.25, seed=99).to(torch.bfloat16)
    assert torch.equal(got, want)


def test_identity_when_not_training_and_torch_fallback_elsewhere():
    x = torch.randn(100)
    assert D.fast_dropout(x, 0.5, training=False) is x
    assert torch.equal(D.fast_dropout(x, 1.0), torch.zeros_like(x))  # p = 1: torch's dropout
    assert torch.equal(D.fast_dropout(x.double(), 0.0), x.double())


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama], ids=["bert-padding-mask", "llama-causal"])
def test_attention_path_equals_sdpa_when_nothing_is_dropped(build):
    """The explicit attention path (taken only in training with dropout) computes what SDPA does:
    a dropout probability too small to drop anything (and whose 1/(1-p) rounds to 1) must give
    the outputs of the untouched model."""
    model = build(0)
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    want = model(input_ids=ids, attention_mask=mask).logits  # eval: SDPA, no dropout
    D.use_fast_dropout(model)
    assert model.config._attn_implementation == D.ATTENTION
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 1e-12  # bert's attention passes its dropout module's p
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 1e-12  # llama's attention passes this attribute
    model.train()
    got = model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool() if got.dim() == 3 else slice(None)
    assert torch.allclose(got[keep], want[keep], atol=1e-5, rtol=1e-4)


def test_switched_model_trains_saves_and_evaluates_as_before(tmp_path):
    torch.manual_seed(0)
    model = tiny_bert(0)
    ids = torch.randint(3, 90, (2, 10))
    model.eval()
    before = model(input_ids=ids).logits
    n = D.use_fast_dropout(model)
    assert n > 0 and all(type(m) is not nn.Dropout or m.p == 0 for m in model.modules())
    assert torch.equal(model(input_ids=ids).logits, before)  # eval: no dropout, same function
    model.train()
    loss = model(input_ids=ids).logits.square().mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() > 1)
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert D.ATTENTION not in json.dumps(cfg)  # the saved model loads anywhere
