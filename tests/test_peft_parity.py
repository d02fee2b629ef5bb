"""Parity with the real ``peft`` package: same adapter, same logits, both directions.

Every adapter is made with non-identity init and then perturbed (all adapter tensors get
noise), so ``B`` is non-zero, DoRA magnitudes differ from the weight norms and IA3 vectors
differ from one: a conversion that drops, transposes or rescales any tensor changes logits.

(a) peft folder -> ``gk.load_adapter`` into a fresh base -> same logits as peft
(b) graftkit ``save_adapter(format="peft")`` -> ``peft.PeftModel.from_pretrained`` -> same logits
(c) ``gk.export_merged`` HF folder loaded by transformers == peft's ``merge_and_unload``
(d) a native graftkit adapter (inject + perturb + save) exported to peft loads in peft
"""
from __future__ import annotations

import pytest
import torch
import transformers

import graftkit as gk
from conftest import logits, tiny_gpt2, tiny_inputs, tiny_llama

peft = pytest.importorskip("peft")

ATOL = 1e-5

# id: (model, method, kwargs in peft's names; graftkit's configs accept the same names).
# GPT-2's Conv1D needs fan_in_fan_out=True in peft (added below); graftkit detects it.
CASES = {
    "llama-lora":   ("llama", "lora", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama-dora":   ("llama", "lora", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], use_dora=True)),
    "llama-rslora": ("llama", "lora", dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], use_rslora=True,
                                           rank_pattern={"v_proj": 2}, alpha_pattern={"up_proj": 3})),
    "llama-ia3":    ("llama", "ia3", dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "llama-embed":  ("llama", "lora", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "gpt2-lora":    ("gpt2", "lora", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"])),
    "gpt2-dora":    ("gpt2", "lora", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], use_dora=True)),
    "gpt2-rslora":  ("gpt2", "lora", dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], use_rslora=True, rank_pattern={"c_fc": 2})),
    "gpt2-ia3":     ("gpt2", "ia3", dict(target_modules=["c_attn", "c_fc", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"])),
}
BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2}
IDS = tiny_inputs()


def peft_config(case: str):
    model, method, kw = CASES[case]
    # task_type makes export_merged pick the causal-LM class from the base folder itself
    extra = {"task_type": "CAUSAL_LM", **({"fan_in_fan_out": True} if model == "gpt2" else {})}
    if method == "lora":
        return peft.LoraConfig(**kw, **extra, init_lora_weights=False)
    return peft.IA3Config(**kw, **extra, init_ia3_weights=False)


def gk_config(case: str):
    _, method, kw = CASES[case]
    if method == "lora":
        return gk.LoRAConfig(**kw, init_lora_weights=False)
    return gk.IA3Config(**kw, init_ia3_weights=False)


@torch.no_grad()
def perturb(params, seed: int = 3, scale: float = 0.3) -> int:
    g = torch.Generator().manual_seed(seed)
    n = 0
    for p in params:
        p.add_(torch.randn(p.shape, generator=g) * scale)
        n += 1
    return n


def make_peft(case: str, seed: int = 3):
    """A perturbed peft model of ``case`` on a fresh tiny base, in eval mode."""
    model = peft.get_peft_model(BUILD[CASES[case][0]](), peft_config(case))
    assert perturb([p for p in model.parameters() if p.requires_grad], seed) > 0
    return model.eval()


def assert_adapted(ref: torch.Tensor, case: str) -> None:
    """Guard against vacuous parity: the adapter must move the logits well past ATOL."""
    base = logits(BUILD[CASES[case][0]](), IDS)
    assert (ref - base).abs().max() > 1e-2


@pytest.mark.parametrize("case", CASES)
def test_peft_folder_loads_into_graftkit(case, tmp_path):  # (a)
    pm = make_peft(case)
    ref = logits(pm, IDS)
    assert_adapted(ref, case)
    pm.save_pretrained(tmp_path / "peft")
    model = gk.load_adapter(BUILD[CASES[case][0]](), tmp_path / "peft")
    torch.testing.assert_close(logits(model, IDS), ref, atol=ATOL, rtol=0)
    if CASES[case][2].get("rank_pattern"):  # the odd rank survived the conversion
        ranks = {s.r for s in gk.sites(model).values()}
        assert ranks == {CASES[case][2]["r"], *CASES[case][2]["rank_pattern"].values()}


@pytest.mark.parametrize("case", CASES)
def test_graftkit_peft_export_loads_in_peft(case, tmp_path):  # (b)
    pm = make_peft(case)
    ref = logits(pm, IDS)
    pm.save_pretrained(tmp_path / "peft")
    model = gk.load_adapter(BUILD[CASES[case][0]](), tmp_path / "peft")
    gk.save_adapter(model, tmp_path / "again", format="peft")
    back = peft.PeftModel.from_pretrained(BUILD[CASES[case][0]](), tmp_path / "again").eval()
    torch.testing.assert_close(logits(back, IDS), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_merged_export_matches_peft_merge_and_unload(case, tmp_path):  # (c)
    arch = CASES[case][0]
    BUILD[arch]().save_pretrained(tmp_path / "base")
    pm = make_peft(case)
    pm.save_pretrained(tmp_path / "peft")
    out = gk.export_merged(tmp_path / "peft", tmp_path / "base", tmp_path / "merged")
    assert (out / "graft_provenance.json").exists()
    ours = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    theirs = pm.merge_and_unload().eval()
    torch.testing.assert_close(logits(ours, IDS), logits(theirs, IDS), atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_native_adapter_exported_to_peft(case, tmp_path):  # (d)
    arch = CASES[case][0]
    model = gk.inject(BUILD[arch](), gk_config(case))
    assert perturb(gk.trainable_parameters(model), seed=5) > 0
    ref = logits(model, IDS)
    assert_adapted(ref, case)
    gk.save_adapter(model, tmp_path / "native")
    fresh = gk.load_adapter(BUILD[arch](), tmp_path / "native")
    gk.save_adapter(fresh, tmp_path / "peft", format="peft")
    theirs = peft.PeftModel.from_pretrained(BUILD[arch](), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(theirs, IDS), ref, atol=ATOL, rtol=0)
    # and peft's own merge of that export agrees with graftkit's merge
    gk.merge_adapter(model)
    torch.testing.assert_close(logits(theirs.merge_and_unload(), IDS), logits(model, IDS), atol=ATOL, rtol=0)


def test_seq_cls_adapter_merges_onto_lm_folder(tmp_path):
    """A SEQ_CLS adapter (new ``score`` head) exported onto a folder saved as GPT2LMHeadModel:
    graftkit must pick GPT2ForSequenceClassification from the peft task type."""
    tiny_gpt2().save_pretrained(tmp_path / "base")
    clf = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3)
    pm = peft.get_peft_model(clf, peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                                  init_lora_weights=False))
    perturb([p for p in pm.parameters() if p.requires_grad])
    pm.eval().save_pretrained(tmp_path / "peft")
    out = gk.export_merged(tmp_path / "peft", tmp_path / "base", tmp_path / "merged")
    ours = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(ours).__name__ == "GPT2ForSequenceClassification"
    one = IDS[:1]  # no pad token: one row
    torch.testing.assert_close(logits(ours, one), logits(pm.merge_and_unload(), one), atol=ATOL, rtol=0)


@pytest.mark.real
def test_minilm_seq_cls_lora_parity(tmp_path):
    """peft LoRA (task SEQ_CLS: the classifier is in modules_to_save) on the real MiniLM."""
    def base():
        return gk.load_model("minilm", head="classification", num_labels=3)

    ids = torch.tensor([[101, 2054, 2003, 1996, 3007, 1997, 2605, 102], [101, 1045, 2293, 2023, 3185, 1012, 102, 0]])
    mask = (ids != 0).long()

    def out(m):
        with torch.no_grad():
            return m(input_ids=ids, attention_mask=mask).logits

    pm = peft.get_peft_model(base(), peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"],
                                                      init_lora_weights=False))
    trained = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert any("classifier" in n for n in trained)
    perturb([p for p in pm.parameters() if p.requires_grad], scale=0.05)
    pm.eval()
    ref = out(pm)
    pm.save_pretrained(tmp_path / "peft")

    model = gk.load_adapter(base(), tmp_path / "peft")  # (a)
    assert sorted(gk.get_state(model).train_also) == ["classifier.bias", "classifier.weight"]
    torch.testing.assert_close(out(model), ref, atol=ATOL, rtol=0)

    gk.save_adapter(model, tmp_path / "again", format="peft")  # (b)
    back = peft.PeftModel.from_pretrained(base(), tmp_path / "again").eval()
    torch.testing.assert_close(out(back), ref, atol=ATOL, rtol=0)

    merged = gk.export_merged(tmp_path / "peft", "minilm", tmp_path / "merged")  # (c)
    ours = transformers.AutoModelForSequenceClassification.from_pretrained(merged).eval()
    torch.testing.assert_close(out(ours), out(pm.merge_and_unload()), atol=ATOL, rtol=0)
