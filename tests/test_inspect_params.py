"""``graft inspect --params RECIPE.yaml``: trainable and total parameters without training, from the
model's config alone (the folders here hold no weights at all), against hand counts."""
from __future__ import annotations

import json

import pytest
import transformers

from graftkit.cli import main

# tiny Llama (hidden 32, 4 heads of 8, 2 KV heads, FFN 64, 2 blocks, vocabulary 96, untied head)
LLAMA = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
# per block: q 32x32, k 16x32, v 16x32, o 32x32, gate/up/down 3 x 64x32, two RMSNorm gains of 32
LLAMA_TOTAL = 96 * 32 + 2 * (1024 + 512 + 512 + 1024 + 3 * 2048 + 2 * 32) + 32 + 96 * 32
BERT = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)


@pytest.fixture
def llama_dir(tmp_path):
    """A model folder with config.json only: counting must not need the weights."""
    transformers.LlamaConfig(**LLAMA, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def recipe(tmp_path, model, method, task="causal-lm", **data) -> str:
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": str(model), "task": task, "data": {"train": str(tmp_path / "train.jsonl"), **data},
                                    "method": method, "output": {"dir": str(tmp_path / "out")}}))
    return str(path)


def params(capsys, path) -> dict:
    assert main(["inspect", "--params", path, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_lora_counts_match_hand_count(tmp_path, capsys, llama_dir):
    info = params(capsys, recipe(tmp_path, llama_dir, {"method": "lora", "r": 4, "targets": ["q_proj", "v_proj"]}))
    # r x (in + out) per adapted matrix: q 4 x (32 + 32), v 4 x (32 + 16), in each of 2 blocks
    assert info["trainable"] == 2 * (4 * 64 + 4 * 48) == 896
    assert info["total"] == LLAMA_TOTAL == 24736  # base parameters only, LoRA factors not included
    assert info["ratio"] == pytest.approx(896 / 24736)
    assert info["device"] == "meta" and info["targets"] == 4
    total = sum(p.numel() for p in transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).parameters())
    assert total == LLAMA_TOTAL


def test_text_output(tmp_path, capsys, llama_dir):
    assert main(["inspect", "--params", recipe(tmp_path, llama_dir, {"method": "ln_tuning"})]) == 0
    out = capsys.readouterr().out
    rows = dict(line.split(None, 1) for line in out.splitlines())
    assert rows["trainable"].strip() == f"{32 * 5:,}"  # 2 RMSNorm gains per block + the final norm
    assert rows["total"].startswith("24,736 ")
    assert rows["ratio"].strip() == f"{100 * 160 / 24736:.4f}%"


def test_classification_head_is_trained_and_sized_from_the_data(tmp_path, capsys):
    transformers.BertConfig(**BERT, architectures=["BertModel"]).save_pretrained(tmp_path / "bert")
    rows = [{"text": f"t{i}", "label": lab} for i, lab in enumerate("xyzxyz")]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = params(capsys, recipe(tmp_path, tmp_path / "bert", {"method": "lora", "r": 2, "targets": ["query", "value"]},
                                 task="classification"))
    head = 3 * 32 + 3  # classifier for the 3 labels of train.jsonl
    assert info["labels"] == {"count": 3, "from": str(tmp_path / "train.jsonl")}
    assert info["head_parameters"] == head
    assert info["trainable"] == 2 * 2 * (2 * (32 + 32)) + head
    assert info["class"] == "BertForSequenceClassification"
    info = params(capsys, recipe(tmp_path, tmp_path / "bert", {"method": "lora", "r": 2, "targets": ["query"]},
                                 task="classification", labels=["a", "b", "c", "d", "e"]))
    assert info["head_parameters"] == 5 * 32 + 5 and info["labels"]["from"] == "data.labels"


@pytest.mark.parametrize("case, method, match", [
    ("bad method key", {"method": "lora", "rr": 4, "targets": ["q_proj"]}, "rr"),
    ("unknown method", {"method": "lorra"}, "lorra"),
    ("target matches nothing", {"method": "lora", "targets": ["query"]}, "query"),
])
def test_bad_method_is_one_line(tmp_path, capsys, llama_dir, case, method, match):
    assert main(["inspect", "--params", recipe(tmp_path, llama_dir, method)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("graft: error:") and "\n" not in err and match in err


def test_missing_model_is_one_line(tmp_path, capsys):
    assert main(["inspect", "--params", recipe(tmp_path, tmp_path / "nowhere", {"method": "ln_tuning"})]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("graft: error:") and "\n" not in err and "nowhere" in err


def test_classification_without_labels_or_data_is_one_line(tmp_path, capsys):
    transformers.BertConfig(**BERT, architectures=["BertModel"]).save_pretrained(tmp_path / "bert")
    assert main(["inspect", "--params", recipe(tmp_path, tmp_path / "bert", {"method": "bitfit"}, task="classification")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("graft: error:") and "\n" not in err and "train.jsonl" in err
