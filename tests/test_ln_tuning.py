"""LN tuning: only the normalisation layers' gains and biases train; in-place, so merged at all times;
peft's LN_TUNING format both ways."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch import nn

import graftkit as gk
from conftest import logits, tiny_bert, tiny_gpt2, tiny_inputs, tiny_llama
from graftkit.errors import FileFormatError, TargetError
from graftkit.methods import method_named
from graftkit.methods.ln_tuning import is_norm

IDS = tiny_inputs()


def tiny_t5(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.T5Config(vocab_size=96, d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=8,
                                decoder_start_token_id=0, pad_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg).eval()


def t5_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits


BUILD = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2, "t5": tiny_t5}
# the norm parameters of each tiny model, counted by hand from its config (hidden size 32, 2 blocks)
NORM_PARAMS = {
    "llama": 32 * (2 * 2 + 1),  # RMSNorm gains: input + post-attention per block, final norm
    "bert": 2 * 32 * (2 * 2 + 1),  # LayerNorm gain + bias: two per block, the embeddings' one
    "gpt2": 2 * 32 * (2 * 2 + 1),  # ln_1, ln_2 per block, ln_f
    "t5": 32 * (2 * 2 + 1 + 2 * 3 + 1),  # T5LayerNorm gains: 2 per encoder block + final, 3 per decoder block + final
}


def out(arch, model):
    return t5_logits(model, IDS) if arch == "t5" else logits(model, IDS)


@torch.no_grad()
def perturb(params, seed: int = 3, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("arch", BUILD)
def test_only_norm_parameters_train(arch):
    model = gk.inject(BUILD[arch](), {"method": "ln_tuning"})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    norms = {f"{m}.{p}" for m, mod in model.named_modules() if is_norm(mod) for p, _ in mod.named_parameters(recurse=False)}
    assert trainable == norms  # every norm parameter, and nothing else (no head, no embedding)
    assert gk.count_parameters(model)[0] == NORM_PARAMS[arch]
    # in place: no adapter tensors are added, the base keys are the trained tensors themselves
    assert not any("graft_adapter" in n for n, _ in model.named_parameters())
    assert gk.count_parameters(model)[1] == sum(p.numel() for p in BUILD[arch]().parameters())


def test_norm_classes():
    import transformers.models.llama.modeling_llama as llama
    import transformers.models.t5.modeling_t5 as t5

    assert is_norm(nn.LayerNorm(4)) and is_norm(nn.RMSNorm(4)) and is_norm(t5.T5LayerNorm(4)) and is_norm(llama.LlamaRMSNorm(4))
    assert not is_norm(nn.BatchNorm1d(4)) and not is_norm(nn.GroupNorm(2, 4)) and not is_norm(nn.Linear(4, 4))


def test_targets_exclude_layers():
    model = gk.inject(tiny_gpt2(), {"method": "ln_tuning", "targets": ["ln_1"], "exclude": ["h.0.ln_1.bias"]})
    assert gk.get_state(model).targets == ["transformer.h.0.ln_1.weight", "transformer.h.1.ln_1.bias", "transformer.h.1.ln_1.weight"]
    model = gk.inject(tiny_llama(), {"method": "ln_tuning", "layers": [1]})
    assert gk.get_state(model).targets == ["model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"]
    with pytest.raises(TargetError, match="q_proj"):  # a weight matrix is no norm: named in the one-line refusal
        gk.inject(tiny_llama(), {"method": "ln_tuning", "targets": ["q_proj"]})


def test_values_against_hand_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8))
    gk.inject(model, {"method": "ln_tuning"})
    ln = model[1]
    g0, b0 = ln.weight.detach().clone(), ln.bias.detach().clone()
    dg, db = torch.linspace(-0.5, 0.5, 8), torch.linspace(0.2, -0.3, 8)
    with torch.no_grad():
        ln.weight.add_(dg)
        ln.bias.add_(db)
    x = torch.randn(3, 6)
    h = model[0](x)
    want = (g0 + dg) * (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + ln.eps) + (b0 + db)
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=0)
    delta = gk.materialize_delta(model)
    assert set(delta) == {"1.weight", "1.bias"}
    torch.testing.assert_close(delta["1.weight"], dg, atol=1e-6, rtol=0)
    torch.testing.assert_close(delta["1.bias"], db, atol=1e-6, rtol=0)
    # the saved tensors are the deltas too
    from graftkit.io import adapter_from_model

    saved = adapter_from_model(model).tensors
    torch.testing.assert_close(saved["1.weight.delta"], dg, atol=1e-6, rtol=0)


def test_merge_unload_disable_save_load(tmp_path):
    base = logits(tiny_llama(), IDS)
    model = gk.inject(tiny_llama(), {"method": "ln_tuning"})
    torch.testing.assert_close(logits(model, IDS), base)  # identity at init
    perturb(gk.trainable_parameters(model))
    tuned = logits(model, IDS)
    assert (tuned - base).abs().max() > 1e-2
    gk.merge_adapter(model)  # always merged: a no-op
    torch.testing.assert_close(logits(model, IDS), tuned)
    with gk.disabled(model):
        torch.testing.assert_close(logits(model, IDS), base)
    torch.testing.assert_close(logits(model, IDS), tuned)
    gk.save_adapter(model, tmp_path / "native")
    loaded = gk.load_adapter(tiny_llama(), tmp_path / "native")
    torch.testing.assert_close(logits(loaded, IDS), tuned, atol=0, rtol=0)
    gk.unload(loaded, merge=False)
    torch.testing.assert_close(logits(loaded, IDS), base, atol=0, rtol=0)
    gk.unload(model, merge=True)
    assert gk.get_state(model) is None and not any(p.requires_grad is False for p in model.parameters())
    torch.testing.assert_close(logits(model, IDS), tuned, atol=0, rtol=0)


def test_method_capabilities():
    m = method_named("ln_tuning")
    assert m.space == "weight" and m.has_weight_delta and m.identity_at_init and m.merge_deltas is not None
    assert m.peft is not None and m.peft.peft_type == "LN_TUNING"


# -- parity with the real peft ------------------------------------------------------------------

peft = pytest.importorskip("peft")
ATOL = 1e-5
# peft knows default norm names for llama, gpt2 and t5; BERT's have to be named
PEFT_TARGETS = {"llama": None, "gpt2": None, "bert": ["LayerNorm"], "t5": None}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "t5"])
def test_peft_folder_loads_into_graftkit_and_back(arch, tmp_path):
    # BERT is a classifier: peft's SEQ_CLS saves its new head whole (graftkit: train_also)
    task = "SEQ_CLS" if arch == "bert" else None
    pm = peft.get_peft_model(BUILD[arch](), peft.LNTuningConfig(target_modules=PEFT_TARGETS[arch], task_type=task))
    perturb([p for p in pm.parameters() if p.requires_grad])
    pm.eval()
    ref = out(arch, pm)
    assert (ref - out(arch, BUILD[arch]())).abs().max() > 1e-2
    pm.save_pretrained(tmp_path / "peft")
    model = gk.load_adapter(BUILD[arch](), tmp_path / "peft")
    assert gk.get_state(model).method == "ln_tuning"
    torch.testing.assert_close(out(arch, model), ref, atol=ATOL, rtol=0)
    gk.save_adapter(model, tmp_path / "again", format="peft")
    back = peft.PeftModel.from_pretrained(BUILD[arch](), tmp_path / "again").eval()
    torch.testing.assert_close(out(arch, back), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_native_adapter_exported_to_peft(arch, tmp_path):
    model = gk.inject(BUILD[arch](), {"method": "ln_tuning"})
    perturb(gk.trainable_parameters(model), seed=5)
    ref = logits(model, IDS)
    gk.save_adapter(model, tmp_path / "native")
    fresh = gk.load_adapter(BUILD[arch](), tmp_path / "native")
    gk.save_adapter(fresh, tmp_path / "peft", format="peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LN_TUNING"
    theirs = peft.PeftModel.from_pretrained(BUILD[arch](), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(theirs, IDS), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits(theirs.merge_and_unload(), IDS), ref, atol=ATOL, rtol=0)


def test_peft_export_of_partial_targets(tmp_path):
    """Only the gains of GPT-2's norms trained: peft keeps a whole copy of each norm layer, so the
    untouched biases are written with their base values and peft's model is the same."""
    model = gk.inject(tiny_gpt2(), {"method": "ln_tuning", "targets": ["re:.*ln_.*\\.weight"]})
    perturb(gk.trainable_parameters(model))
    ref = logits(model, IDS)
    gk.save_adapter(model, tmp_path / "peft", format="peft")
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(theirs, IDS), ref, atol=ATOL, rtol=0)


def test_merged_export_and_cli_round_trip(tmp_path):
    from graftkit.cli import main

    tiny_gpt2().save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(tiny_gpt2(), peft.LNTuningConfig(task_type="CAUSAL_LM"))
    perturb([p for p in pm.parameters() if p.requires_grad])
    pm.eval().save_pretrained(tmp_path / "peft")
    ref = logits(pm, IDS)
    assert main(["import-peft", str(tmp_path / "peft"), str(tmp_path / "native"), "--base", str(tmp_path / "base")]) == 0
    assert main(["export", str(tmp_path / "native"), "--base", str(tmp_path / "base"), "--peft", str(tmp_path / "again")]) == 0
    back = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "again").eval()
    torch.testing.assert_close(logits(back, IDS), ref, atol=ATOL, rtol=0)
    merged = gk.export_merged(tmp_path / "native", tmp_path / "base", tmp_path / "merged")
    ours = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    torch.testing.assert_close(logits(ours, IDS), logits(pm.merge_and_unload(), IDS), atol=ATOL, rtol=0)


def test_peft_file_without_ln_tensors_is_refused(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({"peft_type": "LN_TUNING", "target_modules": ["ln_1"]}))
    save_file({"base_model.model.transformer.h.0.ln_1.weight": torch.ones(32)}, str(tmp_path / "p" / "adapter_model.safetensors"))
    with pytest.raises(FileFormatError, match="holds no LN tuning tensors"):
        gk.load_adapter(tiny_gpt2(), tmp_path / "p")


def test_merge_inputs_equal_their_merged_exports(tmp_path):
    """A native (delta) and a peft (absolute values) LN tuning adapter as merge inputs give the same
    task-arithmetic merge as their merged exports: merge_deltas reads both kinds of slot."""
    from merge_helpers import load_folder

    tiny_gpt2().save_pretrained(tmp_path / "base")
    model = gk.inject(tiny_gpt2(), {"method": "ln_tuning"})
    perturb(gk.trainable_parameters(model), seed=1)
    gk.save_adapter(model, tmp_path / "native")
    pm = peft.get_peft_model(tiny_gpt2(), peft.LNTuningConfig(task_type="CAUSAL_LM"))
    perturb([p for p in pm.parameters() if p.requires_grad], seed=2)
    pm.save_pretrained(tmp_path / "peft")
    adapters = [tmp_path / "native", tmp_path / "peft"]
    full = [gk.export_merged(a, tmp_path / "base", tmp_path / f"full{i}") for i, a in enumerate(adapters)]

    def cfg(inputs):
        return {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"), "dtype": "float32",
                "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(inputs, [0.6, 0.3])]}

    a = load_folder(gk.merge(cfg(adapters), tmp_path / "m1"))
    b = load_folder(gk.merge(cfg(full), tmp_path / "m2"))
    base = load_folder(tmp_path / "base")
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert not torch.equal(a["transformer.h.0.ln_1.weight"], base["transformer.h.0.ln_1.weight"])
    assert torch.equal(a["transformer.h.0.attn.c_attn.weight"], base["transformer.h.0.attn.c_attn.weight"])
