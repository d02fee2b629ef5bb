"""``method: compose``: several tuning methods in one model (the unified view / MAM adapter)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import graftkit as gk
from conftest import TINY_MODELS, logits, tiny_inputs, tiny_llama, tiny_t5
from graftkit.errors import AdapterError, ConfigError, TargetError
from graftkit.methods import method_named
from test_train import assets, chat_recipe  # noqa: F401  (module fixture: a tiny Llama with a tokenizer, chat data)

IDS = tiny_inputs()
ATTN = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"], "gpt2": ["c_attn"], "t5": ["q", "v"]}
FAMILIES = {**TINY_MODELS, "t5": tiny_t5}


def outputs(model, ids=IDS):
    """Logits; the encoder-decoder reads the same ids on both sides."""
    with torch.no_grad():
        extra = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
        return model(input_ids=ids, **extra).logits


def mam(family: str, **adapter) -> dict:
    """A parallel adapter on the FFN plus LoRA on attention."""
    return {"method": "compose", "methods": [{"method": "parallel_adapter", "reduction_factor": 4, **adapter},
                                             {"method": "lora", "targets": ATTN[family], "r": 4, "lora_alpha": 8}]}


def perturb(model: nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gk.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def hand_forward(model: nn.Module, adapter) -> nn.Module:
    """``adapter``'s effect written out by hand with plain hooks on an unadapted model: LoRA adds
    ``s B A x`` to its layer's output, the parallel adapter adds ``s_pa (W_up relu(W_down x + b) + b')``
    of the FFN input ``x`` to the FFN output."""
    modules = dict(model.named_modules())
    parts = adapter.meta["config"]["methods"]
    t = adapter.tensors
    for name in adapter.targets:
        options = adapter.meta["target_options"][name]
        part = parts[options["component"]]
        if part["method"] == "lora":
            owner = name.rsplit(".", 1)[0]
            a, b, s = t[f"{name}.lora_A"], t[f"{name}.lora_B"], options["lora_alpha"] / options["r"]
            modules[owner].register_forward_hook(lambda m, args, out, a=a, b=b, s=s: out + s * (args[0] @ a.T @ b.T))
        elif part["method"] == "parallel_adapter":
            seen = {}
            source = modules[options.get("input_from", name)]
            source.register_forward_pre_hook(lambda m, args, seen=seen: seen.__setitem__("x", args[0]))

            def add(m, args, out, name=name, seen=seen, s=part["scaling"]):
                x = seen.pop("x")
                h = torch.relu(x @ t[f"{name}.adapter_down"].T + t[f"{name}.adapter_down_bias"])
                return out + s * (h @ t[f"{name}.adapter_up"].T + t[f"{name}.adapter_up_bias"])

            modules[name].register_forward_hook(add)
        else:
            raise AssertionError(part["method"])
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mam_is_both_adapters_at_once(family, tmp_path):
    make = FAMILIES[family]
    base = outputs(make())
    model = gk.inject(make(), mam(family))
    assert torch.equal(outputs(model), base)  # every part is the identity at init
    assert method_named("compose").identity_for(gk.get_state(model).config)
    # only the parts' own tensors train, exactly as many as the two methods alone
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".graft_adapter." in n for n in trainable)
    alone = [gk.count_parameters(gk.inject(make(), {**part}))[0] for part in mam(family)["methods"]]
    assert gk.count_parameters(model)[0] == sum(alone)
    perturb(model)
    out = outputs(model)
    assert not torch.allclose(out, base, atol=1e-3)
    path = gk.save_adapter(model, tmp_path / "mam")
    adapter = gk.read_adapter(path)
    assert {o["component"] for o in adapter.meta["target_options"].values()} == {0, 1}
    # the same two effects written by hand on a bare model
    torch.testing.assert_close(outputs(hand_forward(make(), adapter)), out, rtol=1e-5, atol=1e-5)
    with gk.disabled(model):
        assert torch.equal(outputs(model), base)
    loaded = gk.load_adapter(make(), path)
    assert torch.equal(outputs(loaded), out)
    assert list(gk.sites(loaded)) == list(gk.sites(model))
    assert gk.unload(loaded, merge=False) is loaded and torch.equal(outputs(loaded), base)


def test_weight_parts_make_a_weight_delta(tmp_path):
    """LoRA on q/v plus IA3 on k: the composition merges, materializes and is a merge input."""
    config = {"method": "compose", "methods": [{"method": "lora", "targets": ["q_proj", "v_proj"], "r": 4},
                                               {"method": "ia3", "targets": ["k_proj"]}]}
    assert method_named("compose").weight_delta(config)
    assert method_named("compose").space_of(config) == "weight"
    model = gk.inject(tiny_llama(), config)
    perturb(model, scale=0.2)
    out = logits(model, IDS)
    delta = gk.materialize_delta(model)
    assert sorted(delta) == sorted(n for n, _ in tiny_llama().named_parameters() if n.endswith(("q_proj.weight", "v_proj.weight", "k_proj.weight")))
    site = gk.sites(model)["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(delta["model.layers.0.self_attn.q_proj.weight"], site.lora_B @ site.lora_A * site.scaling)
    ia3 = gk.sites(model)["model.layers.1.self_attn.k_proj.weight"]
    torch.testing.assert_close(delta["model.layers.1.self_attn.k_proj.weight"],
                               ia3.base.float() * (ia3.ia3_l.float().view(-1, 1) - 1))
    adapter = gk.save_adapter(model, tmp_path / "adapter")
    gk.merge_adapter(model)
    torch.testing.assert_close(logits(model, IDS), out, rtol=1e-4, atol=1e-4)
    # a merge input: base + the parts' deltas, through each part's merge_deltas
    tiny_llama().save_pretrained(tmp_path / "base")
    merged = gk.merge({"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
                       "models": [{"model": str(adapter)}]}, tmp_path / "merged")
    got = gk.load_model(merged)
    for name, p in tiny_llama().named_parameters():
        torch.testing.assert_close(dict(got.named_parameters())[name].float(), p.float() + delta.get(name, 0), rtol=1e-5, atol=1e-6)


def test_activation_part_refuses_weight_operations():
    model = gk.inject(tiny_llama(), mam("llama"))
    assert not method_named("compose").weight_delta(gk.get_state(model).config)
    assert method_named("compose").space_of(gk.get_state(model).config) == "activation"
    for op in (gk.materialize_delta, gk.merge_adapter, lambda m: gk.unload(m, merge=True)):
        with pytest.raises(AdapterError, match="a compose adapter has none: it changes the model's activations"):
            op(model)


def test_bitfit_part_is_a_merge_input(tmp_path):
    """LoRA + BitFit: each part enters graft merge through its own merge_deltas (BitFit's saved dense
    delta as it is), so a weight-1 linear merge of the composed adapter is base + its materialized delta."""
    from conftest import tiny_gpt2
    from merge_helpers import load_folder

    model = gk.inject(tiny_gpt2(), {"method": "compose", "methods": [{"method": "lora", "targets": ["c_attn"], "r": 2,
                                                                      "init_lora_weights": False},
                                                                     {"method": "bitfit", "targets": ["c_fc"]}]})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05)
    assert method_named("compose").weight_delta(gk.get_state(model).config)
    delta = gk.materialize_delta(model)
    assert any(k.endswith("c_fc.bias") for k in delta) and any(k.endswith("c_attn.weight") for k in delta)
    path = gk.save_adapter(model, tmp_path / "a")
    tiny_gpt2().save_pretrained(tmp_path / "base")
    gk.merge({"merge_method": "linear", "base_model": str(tmp_path / "base"), "dtype": "float32",
              "models": [{"model": str(path), "parameters": {"weight": 1.0}}]}, tmp_path / "m")
    merged, base = load_folder(tmp_path / "m"), load_folder(tmp_path / "base")
    for key, d in delta.items():
        assert torch.allclose(merged[key].float(), base[key].float() + d, atol=1e-6), key


CONFLICTS = [
    # a module site (houlsby on o_proj, its attn_out) and a weight site on o_proj.weight
    ([{"method": "houlsby"}, {"method": "lora", "targets": ["o_proj"]}],
     ["houlsby (methods[0]) and lora (methods[1])", "model.layers.0.self_attn.o_proj"]),
    # two weight sites on one parameter
    ([{"method": "lora", "targets": ["q_proj"]}, {"method": "ia3", "targets": ["q_proj"]}],
     ["lora (methods[0]) and ia3 (methods[1])", "model.layers.0.self_attn.q_proj"]),
    # two module sites on one module
    ([{"method": "parallel_adapter"}, {"method": "pfeiffer"}], ["parallel_adapter (methods[0]) and pfeiffer (methods[1])", "model.layers.0.mlp"]),
]


@pytest.mark.parametrize("parts,needles", CONFLICTS)
def test_conflicting_parts_are_refused(parts, needles):
    model = tiny_llama()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(TargetError) as err:
        gk.inject(model, {"method": "compose", "methods": parts})
    msg = str(err.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    assert gk.get_state(model) is None and not gk.sites(model)  # nothing half-attached
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


@pytest.mark.parametrize("methods,needle", [
    ([], "methods is empty"),
    ([{"method": "compose", "methods": [{"method": "lora", "targets": ["q_proj"]}]}], "compositions do not nest"),
    ([{"method": "lorra", "targets": ["q_proj"]}], "unknown method 'lorra'"),
    (["lora"], "must be a mapping with a 'method' key"),
    ([{"method": "lora", "targets": ["q_proj"], "rr": 4}], "methods[0] (lora): LoRAConfig: unknown key 'rr'"),
    ([{"method": "lora", "targets": ["q_proj"], "train_also": ["lm_head"]}], "put train_also next to methods"),
])
def test_bad_compose_configs(methods, needle):
    with pytest.raises(ConfigError) as err:
        gk.inject(tiny_llama(), {"method": "compose", "methods": methods})
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_part_that_matches_nothing_is_named():
    with pytest.raises(TargetError, match=r"compose: methods\[1\] \(lora\): .*'qq_proj'"):
        gk.inject(tiny_llama(), {"method": "compose", "methods": [{"method": "pfeiffer"}, {"method": "lora", "targets": ["qq_proj"]}]})


def test_selection_keys_belong_to_the_parts():
    with pytest.raises(ConfigError, match="targets belongs to each component method"):
        gk.inject(tiny_llama(), {"method": "compose", "targets": ["q_proj"], "methods": [{"method": "pfeiffer"}]})


def test_train_also_on_the_composition(tmp_path):
    model = gk.inject(tiny_llama(), {**mam("llama"), "train_also": ["lm_head"]})
    assert "lm_head.weight" in gk.get_state(model).train_also
    perturb(model)
    out = logits(model, IDS)
    assert torch.equal(logits(gk.load_adapter(tiny_llama(), gk.save_adapter(model, tmp_path / "a")), IDS), out)


def test_corrupt_component_index_is_refused(tmp_path):
    model = gk.inject(tiny_llama(), mam("llama"))
    adapter = gk.read_adapter(gk.save_adapter(model, tmp_path / "a"))
    name = next(iter(adapter.meta["target_options"]))
    adapter.meta["target_options"][name]["component"] = 7
    with pytest.raises(AdapterError, match="no valid component index .* the adapter.json is corrupt"):
        gk.io.apply_adapter(tiny_llama(), adapter)


def test_graft_train_runs_a_compose_recipe(assets, tmp_path):
    from graftkit.train import parse_recipe, train

    recipe = chat_recipe(assets, tmp_path / "run", method=mam("llama"), optim={"max_steps": 3}, eval={"every": None})
    train(parse_recipe(recipe), progress=False)
    adapter = gk.read_adapter(tmp_path / "run" / "adapter")
    assert adapter.method == "compose" and [p["method"] for p in adapter.meta["config"]["methods"]] == ["parallel_adapter", "lora"]
    # the parallel adapters' up-projections started at zero: training moved them
    ups = [t for k, t in adapter.tensors.items() if k.endswith("adapter_up")]
    assert ups and all(bool(u.abs().sum() > 0) for u in ups)
