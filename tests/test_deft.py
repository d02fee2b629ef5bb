"""DEFT (methods/deft.py): the density loss by hand and its gradient, the FFN activation hooks,
a short run where the density loss falls and the measured activation density with it, the adapter
being a LoRA (merge, peft LORA export), and bad input in one line."""
from __future__ import annotations

import json

import pytest
import torch

import graftkit as gk
from graftkit.errors import ConfigError, TargetError
from graftkit.methods.deft import DEFTConfig, DensityTraining, activation_modules, density_loss
from conftest import logits, tiny_bert, tiny_gpt2, tiny_inputs, tiny_llama
from test_train import assets, cls_recipe, losses  # noqa: F401  (assets is a fixture)


def test_density_loss_by_hand():
    eps = 1e-2
    a = torch.tensor([[0.0, 0.1, -1.0], [2.0, 0.0, -0.1]])
    b = torch.tensor([[[0.0, 0.5]]])
    # per entry a^2 / (a^2 + eps): 0, 0.5, 1/1.01, 4/4.01, 0, 0.5; mean 0.4988...; b: 0, 0.25/0.26
    want_a = (0 + 0.5 + 1 / 1.01 + 4 / 4.01 + 0 + 0.5) / 6
    want_b = (0 + 0.25 / 0.26) / 2
    got = density_loss([a, b], eps)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx((want_a + want_b) / 2, abs=1e-6)  # the mean over layers, each layer's own mean


def test_density_loss_gradient():
    eps = 1e-2
    a = torch.tensor([0.0, 0.05, -0.3, 2.0], requires_grad=True)
    density_loss([a], eps).backward()
    x = a.detach()
    # d/da a^2 / (a^2 + eps) = 2 a eps / (a^2 + eps)^2, over the 4 entries of the mean
    want = 2 * x * eps / (x.pow(2) + eps).pow(2) / 4
    torch.testing.assert_close(a.grad, want, atol=1e-6, rtol=1e-5)
    assert a.grad[0] == 0 and a.grad[1] > 0 and a.grad[2] < 0  # pushes every entry toward zero


@pytest.mark.parametrize("build, name", [(tiny_bert, "bert.encoder.layer.0.intermediate.intermediate_act_fn"),
                                         (tiny_llama, "model.layers.0.mlp.act_fn"), (tiny_gpt2, "transformer.h.0.mlp.act")])
def test_the_ffn_activation_of_every_block(build, name):
    names = activation_modules(build())
    assert len(names) == 2 and names[0] == name


def test_extra_loss_reads_the_last_forward_only():
    model = gk.inject(tiny_bert(), {"method": "deft", "r": 2, "targets": ["query", "value"]})
    t = DensityTraining(DEFTConfig(r=2, targets=["query"], density_weight=2.0, density_eps=1e-3))
    ids = tiny_inputs()
    t.start(model, lambda batch: model(**batch).logits.sum(), [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], 1)
    captured = []
    hooks = [dict(model.named_modules())[n].register_forward_hook(lambda m, a, o: captured.append(o)) for n in t.names]
    model.train()
    model(input_ids=ids)
    with torch.no_grad():
        model.eval()
        model(input_ids=ids)  # an evaluation forward is not part of the loss
        model.train()
    model(input_ids=ids)
    for h in hooks:
        h.remove()
    got = t.extra_loss(model)
    want = 2.0 * density_loss(captured[-2:], 1e-3)
    torch.testing.assert_close(got, want)
    assert got.requires_grad and t.outputs == [] and t.extra_loss(model) is None
    rep = t.report(model)
    assert rep["layers"] == 2 and 0 < rep["activation_density_before"] <= 1 and rep["threshold"] == pytest.approx(1e-3 ** 0.5)
    assert all(h is not None for h in [rep["nonzero_before"], rep["nonzero_after"]]) and not t.handles


def test_padding_is_left_out_of_the_measured_density():
    t = DensityTraining(DEFTConfig(r=2, targets=["query"], density_threshold=0.5))
    t.names = ["layer"]
    a = torch.tensor([[[1.0, 0.2], [-2.0, 3.0], [0.0, 0.0], [0.0, 0.0]]])  # tokens 2 and 3 are padding
    for mask, want_active, want_nonzero in ((torch.tensor([[1, 1, 0, 0]]), 3 / 4, 4 / 4), (None, 3 / 8, 4 / 8)):
        t.counts, t.mask = [[0, 0, 0]], mask
        t._count(0, a)
        active, nonzero, total = t.counts[0]
        assert (active / total, nonzero / total) == (want_active, want_nonzero)


def test_deft_is_a_lora_adapter(tmp_path):
    model = gk.inject(tiny_llama(), {"method": "deft", "r": 2, "targets": ["q_proj", "v_proj"], "init_lora_weights": False})
    out = logits(model, tiny_inputs())
    gk.save_adapter(model, tmp_path / "peft", format="peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    back = gk.load_adapter(tiny_llama(), tmp_path / "peft")
    assert gk.get_state(back).method == "lora"
    torch.testing.assert_close(logits(back, tiny_inputs()), out, atol=1e-6, rtol=0)
    gk.merge_adapter(model)
    torch.testing.assert_close(logits(model, tiny_inputs()), out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("over, needle", [
    ({"density_weight": 0}, "density_weight"),
    ({"density_eps": -1.0}, "density_eps"),
    ({"density_batches": 0}, "density_batches"),
])
def test_bad_config_is_one_line(over, needle):
    with pytest.raises(ConfigError) as exc:
        gk.inject(tiny_bert(), {"method": "deft", "targets": ["query"], **over})
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_unknown_activation_module_is_one_line():
    with pytest.raises(TargetError, match="activation_modules entry 'mlp.gelu' matches no module"):
        activation_modules(tiny_llama(), ["mlp.gelu"])


def test_cli_run_with_unknown_activation_module_is_one_line(assets, tmp_path, capsys):
    import yaml

    from graftkit.cli import main as graft_main

    rec = cls_recipe(assets, tmp_path / "run", method={"method": "deft", "r": 2, "targets": ["query"], "activation_modules": ["nope"]},
                     optim={"max_steps": 1}, eval={"every": None})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(rec))
    code = graft_main(["train", str(tmp_path / "r.yaml"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("graft: error: ") and "'nope'" in err[0]
    assert not (tmp_path / "run").exists()


def test_a_run_lowers_the_loss_and_the_density(assets, tmp_path):
    from graftkit.train import parse_recipe, train

    rec = cls_recipe(assets, tmp_path / "run",
                     method={"method": "deft", "r": 4, "lora_alpha": 8, "targets": ["query", "value", "intermediate.dense", "output.dense"],
                             "train_also": ["classifier"], "density_weight": 1.0, "density_eps": 1e-3, "density_batches": 2},
                     optim={"lr": 1e-2, "epochs": 2, "warmup_steps": 0}, eval={"every": None})
    summary = train(parse_recipe(rec))
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    density = [r["method_loss"] for r in rows if "method_loss" in r]
    task = losses(tmp_path / "run")
    assert sum(density[-4:]) < sum(density[:4]), density
    assert sum(task[-4:]) < sum(task[:4]), task
    report = summary["method_report"]
    assert report["activation_density_after"] < report["activation_density_before"], report
    assert report["layers"] == 2 and report["batches"] == 2
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["summary"]["method_report"] == report
    # the saved adapter is a LoRA's tensors: it loads without any hook
    saved = gk.read_adapter(tmp_path / "run" / "adapter")
    assert saved.method == "deft" and all(k.endswith(("lora_A", "lora_B", ".value")) for k in saved.tensors)
