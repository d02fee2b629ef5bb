"""An adapter injected into (or loaded onto) a model follows the model's train/eval mode: a LoRA with
dropout on a model in eval mode is deterministic and equals its merged form at once, without calling
``model.eval()`` again."""
from __future__ import annotations

import torch

import graftkit as gk
from conftest import logits, tiny_inputs, tiny_llama


def test_dropout_is_off_in_a_model_in_eval_mode(tmp_path):
    ids = tiny_inputs()
    model = tiny_llama()  # conftest returns it in eval mode
    gk.inject(model, {"method": "lora", "r": 4, "lora_dropout": 0.5, "init_lora_weights": False, "targets": ["q_proj", "v_proj"]})
    first, second = logits(model, ids), logits(model, ids)
    assert torch.equal(first, second)
    gk.save_adapter(model, tmp_path / "a")
    gk.merge_adapter(model)
    assert torch.allclose(logits(model, ids), first, atol=1e-5)
    loaded = gk.load_adapter(tiny_llama(), tmp_path / "a")
    assert torch.allclose(logits(loaded, ids), first, atol=1e-6)
    train_mode = tiny_llama().train()
    gk.inject(train_mode, {"method": "lora", "r": 4, "lora_dropout": 0.5, "targets": ["q_proj"]})
    assert all(m.training for m in train_mode.modules())
