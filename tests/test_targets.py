"""Choosing parameters: globs, regexes, all-linear, exclude, module types, layers, and the
errors for patterns that select nothing, tied aliases and mistyped config keys."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch import nn

import graftkit as gk
import graftkit.methods  # noqa: F401  (registers every method)
from graftkit.adapter import get_state
from graftkit.errors import ConfigError, TargetError, UnsupportedError
from graftkit.targets import block_index, resolve_targets

from conftest import tiny_bert, tiny_gpt2, tiny_llama



def targets_of(model: nn.Module, method: str = "lora", **cfg) -> list[str]:
    gk.inject(model, {"method": method, **cfg})
    return get_state(model).targets


def tied_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


LLAMA_LINEAR = sorted(
    f"model.layers.{i}.{m}.weight"
    for i in range(2)
    for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
)
GPT2_CONV1D = sorted(f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))


# --------------------------------------------------------------------------------------
# globs and regexes
# --------------------------------------------------------------------------------------

def test_glob_suffix_selects_every_block():
    assert targets_of(tiny_llama(), targets=["q_proj"]) == [
        "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"]


def test_glob_dotted_suffix_and_wildcards():
    assert targets_of(tiny_gpt2(), targets=["mlp.c_proj"]) == [
        "transformer.h.0.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.weight"]  # not attn.c_proj
    assert targets_of(tiny_llama(), targets=["[qv]_proj"]) == sorted(
        f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qv")
    assert targets_of(tiny_llama(), targets=["?_proj"]) == sorted(
        f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qkvo")
    # a glob over a block selects everything an adapter can take there
    assert targets_of(tiny_llama(), "full", targets=["layers.0.*"]) == sorted(
        n for n, _ in tiny_llama().named_parameters() if n.startswith("model.layers.0."))


def test_glob_matches_parameter_names_too():
    # a full parameter name, and a bias-only suffix for bitfit
    assert targets_of(tiny_bert(), "bitfit", targets=["query.bias"]) == [
        "bert.encoder.layer.0.attention.self.query.bias", "bert.encoder.layer.1.attention.self.query.bias"]
    assert targets_of(tiny_llama(), targets=["model.layers.1.mlp.up_proj.weight"]) == ["model.layers.1.mlp.up_proj.weight"]


def test_glob_is_not_a_substring_match():
    # 'proj' is not a dotted suffix of 'q_proj'
    with pytest.raises(TargetError):
        targets_of(tiny_llama(), targets=["proj"])


def test_regex_must_match_the_whole_name():
    assert targets_of(tiny_llama(), targets=[r"re:.*\.(q|v)_proj"]) == sorted(
        f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qv")
    assert targets_of(tiny_llama(), targets=[r"re:model\.layers\.1\.mlp\.(up|down)_proj\.weight"]) == [
        "model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    # a regex that would match only part of the name selects nothing
    with pytest.raises(TargetError, match="re:q_proj"):
        targets_of(tiny_llama(), targets=["re:q_proj"])
    with pytest.raises(TargetError):
        targets_of(tiny_llama(), targets=[r"re:layers\.0\..*"])


def test_several_patterns_union_without_duplicates():
    got = targets_of(tiny_llama(), targets=["q_proj", r"re:.*q_proj", "model.layers.0.self_attn.q_proj"])
    assert got == ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"]


# --------------------------------------------------------------------------------------
# all-linear
# --------------------------------------------------------------------------------------

def test_all_linear_llama_excludes_lm_head():
    got = targets_of(tiny_llama(), targets=["all-linear"])
    assert got == LLAMA_LINEAR
    assert "lm_head.weight" not in got and "model.embed_tokens.weight" not in got


def test_all_linear_tied_llama_excludes_head_and_embedding():
    assert targets_of(tied_llama(), targets=["all-linear"]) == LLAMA_LINEAR


def test_all_linear_gpt2_takes_conv1d_not_tied_head():
    got = targets_of(tiny_gpt2(), targets=["all-linear"])
    assert got == GPT2_CONV1D
    assert not any("wte" in n or "lm_head" in n for n in got)


def test_all_linear_bert_weights_only():
    got = targets_of(tiny_bert(), targets=["all-linear"])
    assert all(n.endswith(".weight") for n in got)
    assert "bert.encoder.layer.0.attention.self.query.weight" in got
    assert "bert.pooler.dense.weight" in got
    assert not any("LayerNorm" in n or "embeddings" in n for n in got)


def test_all_linear_with_train_also_leaves_the_head_to_train_also():
    model = tiny_bert()
    got = targets_of(model, targets=["all-linear"], train_also=["classifier"])
    assert "classifier.weight" not in got
    assert get_state(model).train_also == ["classifier.bias", "classifier.weight"]


# --------------------------------------------------------------------------------------
# exclude, module_types, layers
# --------------------------------------------------------------------------------------

def test_exclude():
    assert targets_of(tiny_llama(), targets=["q_proj", "v_proj"], exclude=["layers.0.*"]) == [
        "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"]
    assert targets_of(tiny_llama(), targets=["all-linear"], exclude=[r"re:.*mlp\..*"]) == [
        n for n in LLAMA_LINEAR if ".mlp." not in n]


def test_exclude_everything_is_an_error():
    with pytest.raises(TargetError, match="after exclude"):
        targets_of(tiny_llama(), targets=["q_proj"], exclude=["q_proj"])


def test_module_types():
    assert targets_of(tiny_bert(), "full", module_types=["Embedding"]) == [
        "bert.embeddings.position_embeddings.weight", "bert.embeddings.token_type_embeddings.weight",
        "bert.embeddings.word_embeddings.weight"]
    got = targets_of(tiny_gpt2(), "full", module_types=["Conv1D"])
    assert {n.rsplit(".", 2)[-2] for n in got} == {"c_attn", "c_proj", "c_fc"} and len(got) == 16  # weights + biases
    norms = targets_of(tiny_llama(), "full", module_types=["LlamaRMSNorm"])
    assert norms == sorted(["model.norm.weight"] + [f"model.layers.{i}.{k}.weight" for i in range(2)
                                                    for k in ("input_layernorm", "post_attention_layernorm")])


def test_layers_list_top_bottom():
    assert targets_of(tiny_llama(), targets=["all-linear"], layers=[1]) == [n for n in LLAMA_LINEAR if block_index(n) == 1]
    assert targets_of(tiny_llama(), targets=["all-linear"], layers=[0, 1]) == LLAMA_LINEAR
    assert targets_of(tiny_gpt2(), targets=["c_attn"], layers="top:1") == ["transformer.h.1.attn.c_attn.weight"]
    assert targets_of(tiny_gpt2(), targets=["c_attn"], layers="bottom:1") == ["transformer.h.0.attn.c_attn.weight"]
    assert targets_of(tiny_bert(), "full", layers="top:2") == sorted(
        n for n, _ in tiny_bert().named_parameters() if n.startswith("bert.encoder.layer."))
    # peft's spelling
    cfg = gk.LoRAConfig(target_modules=["q_proj"], layers_to_transform=[0])
    assert cfg.layers == [0] and cfg.targets == ["q_proj"]


@pytest.mark.parametrize("layers,message", [
    ("top:0", r"choose K in 1\.\.2"),
    ("bottom:3", r"choose K in 1\.\.2"),
    ("middle:1", r"bad layers value 'middle:1'.*'top:K' or 'bottom:K'"),
    ("top", r"bad layers value"),
    ([2], r"layers \[2\] do not exist; the model has blocks 0\.\.1"),
    ([0, 5], r"layers \[5\] do not exist"),
])
def test_bad_layers(layers, message):
    model = tiny_llama()
    with pytest.raises(TargetError, match=message) as exc:
        targets_of(model, targets=["q_proj"], layers=layers)
    assert "\n" not in str(exc.value)
    assert get_state(model) is None


def test_layers_without_blocks():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    with pytest.raises(TargetError, match="no parameter name has a block index"):
        targets_of(model, targets=["all-linear"], layers="top:1")


def test_layers_bad_type_is_a_config_error():
    with pytest.raises(ConfigError, match="layers"):
        gk.LoRAConfig(targets=["q_proj"], layers={"top": 1})


# --------------------------------------------------------------------------------------
# patterns that select nothing
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern,closest", [
    ("q_prj", "self_attn.q_proj"),
    ("model.layers.0.self_attn.q_prj", "model.layers.0.self_attn.q_proj"),
    ("mlp.gate", "mlp.gate_proj"),
    ("re:q_proj", "q_proj"),
])
def test_no_match_names_the_closest_parameter(pattern, closest):
    model = tiny_llama()
    with pytest.raises(TargetError) as exc:
        targets_of(model, targets=[pattern])
    msg = str(exc.value)
    assert repr(pattern) in msg and "closest names:" in msg
    assert closest in msg.split("closest names:")[1].split(",")[0], msg
    assert "\n" not in msg
    assert get_state(model) is None and all(p.requires_grad for p in model.parameters())


def test_no_match_on_other_models():
    with pytest.raises(TargetError, match=r"closest names: transformer\.h\.\d\.attn\.c_attn"):
        targets_of(tiny_gpt2(), targets=["c_atn"])
    with pytest.raises(TargetError, match=r"closest names: bert\.encoder\.layer\.\d\.attention\.self\.query"):
        targets_of(tiny_bert(), targets=["querry"])


def test_pattern_that_matches_only_ineligible_parameters():
    # LayerNorm weights are 1-D: LoRA cannot adapt them; the error says it is about lora
    with pytest.raises(TargetError, match="no parameter that lora can adapt"):
        targets_of(tiny_llama(), targets=["input_layernorm"])
    # IA3 takes Linear/Conv1D/Conv2d, not embeddings
    with pytest.raises(TargetError, match="ia3"):
        targets_of(tiny_llama(), "ia3", targets=["embed_tokens"])


def test_every_pattern_must_match():
    # one good and one bad pattern is still an error (a typo is never skipped silently)
    with pytest.raises(TargetError, match="'v_prj'"):
        targets_of(tiny_llama(), targets=["q_proj", "v_prj"])


def test_no_targets_given():
    with pytest.raises(TargetError, match="no targets given"):
        targets_of(tiny_llama())


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("pattern", ["lm_head", "lm_head.weight"])
def test_tied_alias_names_the_real_parameter(method, pattern):
    model = tied_llama()
    with pytest.raises(TargetError, match=r"tied to model\.embed_tokens\.weight") as exc:
        targets_of(model, method, targets=[pattern])
    assert "'model.embed_tokens.weight'" in str(exc.value)
    # the real name works for an in-place method (one tensor, trained once)
    assert targets_of(tied_llama(), "full", targets=["model.embed_tokens.weight"]) == ["model.embed_tokens.weight"]


def test_tied_alias_gpt2():
    with pytest.raises(TargetError, match=r"lm_head\.weight, which is tied to transformer\.wte\.weight"):
        targets_of(tiny_gpt2(), targets=["lm_head"])


# --------------------------------------------------------------------------------------
# the resolved list is explicit, sorted and saved
# --------------------------------------------------------------------------------------

def test_resolved_targets_sorted_and_saved(tmp_path):
    model = tiny_llama()
    got = targets_of(model, targets=["v_proj", "down_proj", "q_proj"], r=2)
    assert got == sorted(got) and len(got) == 6
    path = gk.save_adapter(model, tmp_path / "a")
    meta = json.loads((path / "adapter.json").read_text())
    assert meta["targets"] == got
    assert meta["config"]["targets"] == ["v_proj", "down_proj", "q_proj"]  # the patterns, as given
    assert set(meta["target_options"]) == set(got)
    # loading applies the saved names, not the patterns
    fresh = tiny_llama()
    gk.load_adapter(fresh, path)
    assert get_state(fresh).targets == got


def test_loading_never_reinterprets_patterns(tmp_path):
    model = tiny_llama()
    targets_of(model, targets=["q_proj"], r=2)
    path = gk.save_adapter(model, tmp_path / "a")
    meta_path = path / "adapter.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["targets"] = ["all-linear"]  # a pattern that would now select 14 weights
    meta_path.write_text(json.dumps(meta))
    fresh = tiny_llama()
    gk.load_adapter(fresh, path)
    assert get_state(fresh).targets == ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"]


def test_resolve_targets_direct():
    model = tiny_llama()
    infos = resolve_targets(model, ["v_proj", "q_proj"], eligible=lambda i: True, what="test")
    names = [i.name for i in infos]
    assert names == sorted(names)
    assert all(i.module.get_parameter(i.pname) is i.param for i in infos)


# --------------------------------------------------------------------------------------
# config keys
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,key,suggest", [
    (lambda: gk.LoRAConfig(rr=4), "rr", "'r'"),
    (lambda: gk.LoRAConfig(lora_alhpa=16), "lora_alhpa", "'lora_alpha'"),
    (lambda: gk.LoRAConfig(target=["q_proj"]), "target", "'targets'"),
    (lambda: gk.IA3Config(feedforward_module=["fc"]), "feedforward_module", "'feedforward'"),
    (lambda: gk.FullConfig(layer="top:1"), "layer", "'layers'"),
    (lambda: gk.inject(tiny_llama(), {"method": "lora", "targets": ["q_proj"], "lora_dropuot": 0.1}), "lora_dropuot", "'lora_dropout'"),
])
def test_unknown_config_key(make, key, suggest):
    with pytest.raises(ConfigError) as exc:
        make()
    msg = str(exc.value)
    assert "\n" not in msg, "config errors are one line"
    assert f"unknown key {key!r}" in msg
    assert f"did you mean {suggest}?" in msg
    accepted = msg.split("accepted keys:")[1]
    for k in ("targets", "exclude", "layers", "train_also"):
        assert k in accepted


def test_unknown_key_lists_method_keys():
    msg = ""
    try:
        gk.LoRAConfig(zzz=1)
    except ConfigError as exc:
        msg = str(exc)
    assert msg.startswith("LoRAConfig: unknown key 'zzz'")
    assert "did you mean" not in msg
    accepted = [k.strip() for k in msg.split("accepted keys:")[1].split(",")]
    assert {"r", "lora_alpha", "lora_dropout", "use_dora", "use_rslora", "init_lora_weights"} <= set(accepted)


@pytest.mark.parametrize("kwargs,key", [({"r": 0}, "r"), ({"lora_dropout": 1.5}, "lora_dropout"), ({"lora_alpha": -1}, "lora_alpha"),
                                        ({"r": "eight"}, "r")])
def test_bad_config_value(kwargs, key):
    with pytest.raises(ConfigError, match=rf"LoRAConfig: bad value .* for '{key}'") as exc:
        gk.LoRAConfig(targets=["q_proj"], **kwargs)
    assert "\n" not in str(exc.value)


def test_unknown_method_suggests():
    with pytest.raises(UnsupportedError, match=r"unknown tuning method 'lorra' \(did you mean 'lora'\?\)"):
        gk.inject(tiny_llama(), {"method": "lorra", "targets": ["q_proj"]})


def test_ia3_feedforward_must_be_a_subset():
    with pytest.raises(ConfigError, match="feedforward pattern 'down_proj' matches none of the targets"):
        targets_of(tiny_llama(), "ia3", targets=["k_proj", "v_proj"], feedforward=["down_proj"])
