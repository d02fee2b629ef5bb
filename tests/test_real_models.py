"""The real packaged models (see ASSETS.md): MiniLM as a classifier, SmolLM2-135M-Instruct as a
chat LM. Few and small; SmolLM2's first use converts its GGUF to a cached folder (~30 s)."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

import graftkit as gk

pytestmark = pytest.mark.real

SENTENCES = ["The match ended in a draw.", "Shares fell sharply today.", "A new phone was released.", "The band plays tonight."]


def minilm():
    return gk.load_model("minilm", head="classification", num_labels=3)


@pytest.fixture(scope="module")
def minilm_batch():
    tok = gk.load_tokenizer("minilm")
    return dict(tok(SENTENCES, padding=True, return_tensors="pt"))


def cls_logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_minilm_lora_train_step_and_round_trip(minilm_batch, tmp_path):
    model = minilm()
    assert type(model).__name__ == "BertForSequenceClassification"
    base_logits = cls_logits(model, minilm_batch)
    gk.inject(model, gk.LoRAConfig(r=4, lora_alpha=8, targets=["all-linear"], train_also=["classifier"]))
    state = gk.get_state(model)
    assert state.train_also == ["classifier.bias", "classifier.weight"]
    assert "classifier.weight" not in state.targets
    # every block's q, k, v, attention output, intermediate and output projections (+ the pooler)
    assert sum(".encoder.layer." in t for t in state.targets) == 6 * 6
    torch.testing.assert_close(cls_logits(model, minilm_batch), base_logits)  # identity at init

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    opt = torch.optim.AdamW(gk.trainable_parameters(model), lr=1e-2)
    loss = model(**minilm_batch, labels=torch.tensor([0, 1, 2, 0])).loss
    loss.backward()
    opt.step()
    model.eval()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    adapter_params = {n for n in before if ".graft_adapter." in n}
    assert changed >= {"classifier.weight", "classifier.bias"}
    assert any(n.endswith("lora_B") for n in changed)
    assert changed <= adapter_params | {"classifier.weight", "classifier.bias"}, sorted(changed - adapter_params)[:5]

    trained = cls_logits(model, minilm_batch)
    assert not torch.allclose(trained, base_logits)
    folder = gk.save_adapter(model, tmp_path / "adapter")
    again = gk.load_adapter(minilm(), folder)  # a fresh base: its classifier is random, the adapter's replaces it
    torch.testing.assert_close(cls_logits(again, minilm_batch), trained, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def smollm2():
    return gk.load_model("smollm2"), gk.load_tokenizer("smollm2")


def test_smollm2_chat_answer(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_smollm2_lora_export_merged(smollm2, tmp_path):
    model, tok = smollm2
    batch = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        base = model(**batch).logits
    gk.inject(model, gk.LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    try:
        assert len(gk.get_state(model).targets) == 60
        trainable, total = gk.count_parameters(model)
        assert trainable == 30 * (4 * (576 + 576) + 4 * (576 + 192))
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).logits, base)  # B = 0: identity
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
            adapted = model(**batch).logits
        assert (adapted - base).abs().max() > 1e-3
        folder = gk.save_adapter(model, tmp_path / "adapter")
    finally:
        gk.unload(model, merge=False)  # the module-scoped base goes back untouched

    out = gk.export_merged(folder, "smollm2", tmp_path / "merged", max_shard_size="100MB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert (out / "config.json").exists() and (out / "graft_provenance.json").exists()
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template
    with torch.no_grad():
        got = merged(**batch).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, adapted, atol=1e-4, rtol=1e-4)
