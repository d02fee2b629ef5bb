"""Adapters as merge inputs: LoRA / rsLoRA / DoRA folders (native and peft) enter as per-key
deltas computed from their factors, and give the same merge as their materialized models."""
from __future__ import annotations

import pytest
import torch

import graftkit as gk
from conftest import tiny_gpt2, tiny_llama
from merge_helpers import load_folder


def make_adapter(base_dir, out, seed, fmt="native", model_fn=tiny_llama, **cfg):
    model = model_fn(0)
    torch.manual_seed(seed)
    config = gk.LoRAConfig(init_lora_weights=False, **{"r": 4, "lora_alpha": 8, "targets": ["q_proj", "v_proj", "up_proj"], **cfg})
    gk.inject(model, config)
    with torch.no_grad():
        for site in gk.sites(model).values():
            site.lora_B.mul_(0.05)
    gk.save_adapter(model, out, format=fmt)
    return out


@pytest.mark.parametrize("variant", [{}, {"use_rslora": True, "r": 2}, {"use_dora": True}])
def test_lora_inputs_equal_merging_their_materialized_models(tmp_path, variant):
    tiny_llama(0).save_pretrained(tmp_path / "base")
    adapters, full = [], []
    for i, fmt in enumerate(["native", "peft", "native"]):
        a = make_adapter(tmp_path / "base", tmp_path / f"a{i}", seed=i, fmt=fmt, **variant)
        adapters.append(str(a))
        full.append(str(gk.export_merged(a, tmp_path / "base", tmp_path / f"full{i}")))
    def cfg(inputs):
        return {"merge_method": "ties", "base_model": str(tmp_path / "base"), "dtype": "float32",
                "models": [{"model": m, "parameters": {"weight": w, "density": 0.5}} for m, w in zip(inputs, [1.0, 0.7, 0.4])]}
    a = load_folder(gk.merge(cfg(adapters), tmp_path / "from_adapters"))
    b = load_folder(gk.merge(cfg(full), tmp_path / "from_full"))
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    base = load_folder(tmp_path / "base")
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(a["model.layers.0.self_attn.k_proj.weight"], base["model.layers.0.self_attn.k_proj.weight"])


def test_gpt2_conv1d_lora_from_peft_and_native(tmp_path):
    """Conv1D stores (in, out): the LoRA delta must be transposed; c_proj is square, so the kind
    recorded in adapter.json (native) or derived from fan_in_fan_out (peft) decides."""
    tiny_gpt2(0).save_pretrained(tmp_path / "base")
    inputs, full = [], []
    for i, fmt in enumerate(["native", "peft"]):
        a = make_adapter(tmp_path / "base", tmp_path / f"a{i}", seed=i, fmt=fmt, model_fn=tiny_gpt2, targets=["c_attn", "c_proj"])
        inputs.append(str(a))
        full.append(str(gk.export_merged(a, tmp_path / "base", tmp_path / f"full{i}")))
    def cfg(inputs):
        return {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"), "dtype": "float32",
                "models": [{"model": m, "parameters": {"weight": 0.5}} for m in inputs]}
    a = load_folder(gk.merge(cfg(inputs), tmp_path / "m1"))
    b = load_folder(gk.merge(cfg(full), tmp_path / "m2"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def _adapter_cfg(tmp_path, adapters, method, rank, **params):
    return {"merge_method": method, "base_model": str(tmp_path / "base"), "dtype": "float32", "output": "adapter", "rank": rank,
            "models": [{"model": str(a), "parameters": {"weight": w, **params}} for a, w in zip(adapters, [1.0, 0.7, 0.4])]}


def test_adapter_output_is_exact_when_the_rank_suffices(tmp_path, capsys):
    import json

    import yaml

    from graftkit.cli import main

    tiny_llama(0).save_pretrained(tmp_path / "base")
    adapters = [make_adapter(tmp_path / "base", tmp_path / f"a{i}", seed=i, fmt=["native", "peft", "native"][i]) for i in range(3)]
    full = load_folder(gk.merge({**_adapter_cfg(tmp_path, adapters, "task_arithmetic", 12), "output": "model"}, tmp_path / "full"))
    path = tmp_path / "m.yml"
    path.write_text(yaml.safe_dump(_adapter_cfg(tmp_path, adapters, "task_arithmetic", 12)))
    assert main(["merge", str(path), str(tmp_path / "lora")]) == 0
    assert "relative error" in capsys.readouterr().out
    meta = json.loads((tmp_path / "lora" / "adapter.json").read_text())
    assert meta["merge"]["relative_error"]["overall"] < 1e-5  # three rank-4 deltas: rank 12 suffices
    model = tiny_llama(0)
    gk.load_adapter(model, tmp_path / "lora")
    gk.unload(model, merge=True)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, full[k], atol=1e-5), k


def test_adapter_space_ties_of_three_loras_loads_in_peft(tmp_path, ids):
    import json

    from peft import PeftModel

    tiny_llama(0).save_pretrained(tmp_path / "base")
    adapters = [make_adapter(tmp_path / "base", tmp_path / f"a{i}", seed=i, use_rslora=(i == 1), r=2 + 2 * i) for i in range(3)]
    out = gk.merge(_adapter_cfg(tmp_path, adapters, "ties", 4, density=0.5), tmp_path / "lora")
    err = json.loads((out / "adapter.json").read_text())["merge"]["relative_error"]
    assert 0 < err["overall"] < 1 and set(err["per_key"]) == set(json.loads((out / "adapter.json").read_text())["targets"])
    # graftkit applies it; its peft export loads in the real peft with the same logits
    model = tiny_llama(0)
    gk.load_adapter(model, out)
    ours = model(input_ids=ids).logits
    gk.save_adapter(model, tmp_path / "peft", format="peft")
    peft_model = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "peft").eval()
    assert torch.allclose(peft_model(input_ids=ids).logits, ours, atol=1e-5)
    # the adapter's delta is the best rank-4 approximation of the TIES-merged delta
    full = load_folder(gk.merge({**_adapter_cfg(tmp_path, adapters, "ties", 4, density=0.5), "output": "model"}, tmp_path / "full"))
    base = load_folder(tmp_path / "base")
    key = "model.layers.1.self_attn.q_proj.weight"
    want = full[key] - base[key]
    got = gk.materialize_delta(model)[key]
    rel = float((got - want).norm() / want.norm())
    assert abs(rel - err["per_key"][key]) < 1e-4


@pytest.mark.parametrize("model_fn,targets,ff", [(tiny_llama, ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
                                                 (tiny_gpt2, ["c_attn", "c_fc", "c_proj"], ["mlp.c_proj"])])
def test_ia3_inputs_equal_their_materialized_models(tmp_path, model_fn, targets, ff):
    model_fn(0).save_pretrained(tmp_path / "base")
    inputs, full = [], []
    for i, fmt in enumerate(["native", "peft"]):
        model = model_fn(0)
        torch.manual_seed(i)
        gk.inject(model, gk.IA3Config(targets=targets, feedforward=ff, init_ia3_weights=False))
        gk.save_adapter(model, tmp_path / f"a{i}", format=fmt)
        inputs.append(str(tmp_path / f"a{i}"))
        full.append(str(gk.export_merged(tmp_path / f"a{i}", tmp_path / "base", tmp_path / f"full{i}")))
    def cfg(inputs):
        return {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"), "dtype": "float32",
                "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(inputs, [0.6, 0.4])]}
    a = load_folder(gk.merge(cfg(inputs), tmp_path / "m1"))
    b = load_folder(gk.merge(cfg(full), tmp_path / "m2"))
    assert any(not torch.equal(a[k], load_folder(tmp_path / "base")[k]) for k in a)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_linear_merge_of_adapters_is_a_loadable_model_folder(tmp_path):
    """linear needs no base for its arithmetic, but adapters enter on it: config.json and the
    tokenizer come from the adapters' base, so the output loads like any HF folder."""
    import transformers

    tiny_llama(0).save_pretrained(tmp_path / "base")
    inputs = [str(make_adapter(tmp_path / "base", tmp_path / f"a{i}", seed=i)) for i in range(2)]
    out = gk.merge({"merge_method": "linear", "base_model": str(tmp_path / "base"), "dtype": "float32",
                    "models": [{"model": m, "parameters": {"weight": 0.5}} for m in inputs]}, tmp_path / "linear")
    assert (out / "config.json").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_adapter_output_refuses_inputs_without_low_rank_factors(tmp_path):
    """``output: adapter`` re-factors LoRA factors: a method that does not declare
    ``low_rank_factors`` (IA3) is refused in one line, and nothing is written."""
    from graftkit.errors import ConfigError

    tiny_llama(0).save_pretrained(tmp_path / "base")
    model = tiny_llama(0)
    gk.inject(model, gk.IA3Config(targets=["k_proj", "v_proj"], init_ia3_weights=False))
    gk.save_adapter(model, tmp_path / "ia3")
    lora = make_adapter(tmp_path / "base", tmp_path / "lora", seed=1)
    with pytest.raises(ConfigError, match="LoRA-family inputs"):
        gk.merge(_adapter_cfg(tmp_path, [lora, tmp_path / "ia3"], "task_arithmetic", 4), tmp_path / "out")
    assert not (tmp_path / "out").exists()
