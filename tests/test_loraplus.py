"""LoRA+ (``optim.loraplus_ratio``): the learning-rate groups equal real peft's
``create_loraplus_optimizer`` tensor by tensor, and a run trains with them."""
from __future__ import annotations

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer

import graftkit as gk
from graftkit.train.loop import param_groups
from graftkit.train.recipe import parse_recipe
from conftest import tiny_bert
from test_train import assets, cls_recipe  # noqa: F401  (assets is a fixture)

TARGETS = ["query", "value", "word_embeddings"]


def _recipe(ratio, **optim):
    return parse_recipe({"model": "unused", "task": "classification", "data": {"train": "unused.jsonl"},
                         "method": {"method": "lora", "r": 2}, "output": {"dir": "unused"},
                         "optim": {"lr": 1e-3, "loraplus_ratio": ratio, **optim}})


def _graft_name(peft_name: str) -> str:
    """peft's parameter name -> graftkit's (``X.lora_A.default.weight`` -> ``X.graft_adapter.weight.lora_A``)."""
    name = peft_name.removeprefix("base_model.model.")
    for suffix, slot in ((".lora_A.default.weight", "lora_A"), (".lora_B.default.weight", "lora_B"),
                         (".lora_embedding_A.default", "lora_A"), (".lora_embedding_B.default", "lora_B")):
        if name.endswith(suffix):
            return f"{name[: -len(suffix)]}.graft_adapter.weight.{slot}"
    return name.replace(".modules_to_save.default", "")


@pytest.mark.parametrize("ratio", [16.0, 2.5])
def test_groups_equal_peft_create_loraplus_optimizer(ratio):
    ours = tiny_bert()
    gk.inject(ours, {"method": "lora", "r": 2, "targets": TARGETS, "train_also": ["classifier"]})
    named = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    want_lr = {}
    theirs = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=TARGETS, modules_to_save=["classifier"]))
    opt = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=ratio)
    ids = {id(p): n for n, p in theirs.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            want_lr[_graft_name(ids[id(p)])] = group["lr"]
    got_lr = {n: g["lr"] for g in param_groups(_recipe(ratio), ours, named) for n in g["names"]}
    assert got_lr == pytest.approx(want_lr)
    # what the test pins: B faster than A, the embedding's LoRA at 1e-6, 1-D tensors (the head's bias) with B
    assert got_lr["bert.encoder.layer.0.attention.self.query.graft_adapter.weight.lora_B"] == pytest.approx(1e-3 * ratio)
    assert got_lr["bert.encoder.layer.0.attention.self.query.graft_adapter.weight.lora_A"] == pytest.approx(1e-3)
    assert got_lr["bert.embeddings.word_embeddings.graft_adapter.weight.lora_B"] == pytest.approx(1e-6)
    assert got_lr["classifier.bias"] == pytest.approx(1e-3 * ratio)


def test_no_ratio_is_one_rate():
    model = tiny_bert()
    gk.inject(model, {"method": "lora", "r": 2, "targets": TARGETS})
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert {g["lr"] for g in param_groups(_recipe(None), model, named)} == {1e-3}


def test_bad_ratio_is_one_line():
    from graftkit.errors import ConfigError

    with pytest.raises(ConfigError, match="loraplus_ratio"):
        _recipe(0)


def test_a_run_steps_b_at_the_loraplus_rate(assets, tmp_path):
    """One AdamW step from B = 0 moves each B entry by lr x ratio (Adam's first step is lr per entry whose
    gradient is not zero): the recipe key reaches the optimizer the run really uses."""
    from graftkit.io import read_adapter
    from graftkit.train import parse_recipe as parse, train

    lr, ratio = 1e-3, 8.0
    rec = cls_recipe(assets, tmp_path / "run", method={"method": "lora", "r": 2, "targets": ["query", "value"]},
                     optim={"lr": lr, "max_steps": 1, "warmup_steps": 0, "schedule": "constant", "loraplus_ratio": ratio,
                            "max_grad_norm": None},
                     eval={"every": None})
    train(parse(rec), progress=False)
    tensors = read_adapter(tmp_path / "run" / "adapter").tensors
    b = [t for k, t in tensors.items() if k.endswith("lora_B")]
    assert b and max(float(t.abs().max()) for t in b) == pytest.approx(lr * ratio, rel=1e-3)
