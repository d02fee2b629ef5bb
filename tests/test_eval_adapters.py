"""graft eval with adapters (native, peft, bf16, wrong base), the command line, and the real MiniLM."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import graftkit as gk
from graftkit.errors import AdapterError, EvalError
from graftkit.eval import evaluate, evaluate_model
from graftkit.eval.config import TaskSpec
from eval_helpers import LABELS, TEXTS, bert, cls_file, lora_adapter, plain_probs, save, task, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return gk.load_tokenizer("minilm")


# -- adapters ---------------------------------------------------------------------------------------

def test_adapter_on_base(tmp_path, tok):
    adapted, adapter = lora_adapter(tok, tmp_path)
    base = save(bert(tok, seed=0, head=False), tok, tmp_path / "base")
    r = evaluate_model({"name": "lora", "path": base, "adapter": adapter}, [task(cls_file(tmp_path))], out_dir=tmp_path / "o")
    ref = plain_probs(adapted, tok, TEXTS)  # the live adapter, unmerged
    np.testing.assert_allclose(np.array([row["probs"] for row in r["topic"]["rows"]]), ref, atol=1e-5)
    assert json.loads((tmp_path / "o" / "results.json").read_text())["model"]["adapter"] == adapter


def test_adapter_on_a_base_whose_head_has_another_label_count(tmp_path, tok):
    """graft study's base/ layout: the base carries an untrained 2-label head. An adapter that trains
    its 3-label head whole loads on it and scores as the live adapter does (the base's head re-made
    at 3 labels, then replaced); one that leaves a re-made head tensor to chance is refused."""
    from graftkit.errors import ConfigError
    from graftkit.io import load_base_for, read_adapter

    adapted, adapter = lora_adapter(tok, tmp_path)
    base = save(bert(tok, seed=0, labels=["neg", "pos"]), tok, tmp_path / "base2")
    r = evaluate_model({"name": "lora", "path": base, "adapter": adapter}, [task(cls_file(tmp_path))])
    np.testing.assert_allclose(np.array([row["probs"] for row in r["topic"]["rows"]]), plain_probs(adapted, tok, TEXTS), atol=1e-5)
    partial = read_adapter(adapter)
    partial.meta["train_also"] = [k for k in partial.train_also if k != "classifier.bias"]
    del partial.tensors["classifier.bias.value"]
    with pytest.raises(ConfigError, match="does not replace its tensor classifier.bias"):
        load_base_for(partial, base)


def test_adapter_as_head_source(tmp_path, tok):
    adapted, adapter = lora_adapter(tok, tmp_path)
    other = save(bert(tok, seed=9, bias=[9.0, 0.0, 0.0]), tok, tmp_path / "other")  # own head: always business
    r = evaluate_model({"name": "m", "path": other}, [task(cls_file(tmp_path), head=adapter)])["topic"]
    body = bert(tok, seed=9)
    with torch.no_grad():  # the adapter's classifier on the other model's body
        body.classifier.weight.copy_(adapted.classifier.weight)
        body.classifier.bias.copy_(adapted.classifier.bias)
    np.testing.assert_allclose(np.array([row["probs"] for row in r["rows"]]), plain_probs(body, tok, TEXTS), atol=1e-5)


def test_adapter_for_another_base(tmp_path, tok):
    _, adapter = lora_adapter(tok, tmp_path, base_seed=0)
    wrong = save(bert(tok, seed=1, head=False), tok, tmp_path / "wrong")
    with pytest.raises(AdapterError, match="made for a different base model"):
        evaluate_model({"name": "x", "path": wrong, "adapter": adapter}, [task(cls_file(tmp_path))])
    # through evaluate(): recorded as a failure, the other model still runs
    good = save(bert(tok, seed=1, bias=[0.0, 1.0, 0.0]), tok, tmp_path / "good")
    cfg = {"models": [{"name": "x", "path": wrong, "adapter": adapter}, {"name": "good", "path": good}],
           "tasks": [{"name": "topic", "kind": "classification", "file": cls_file(tmp_path)}]}
    summary = evaluate(cfg, tmp_path / "out")
    assert summary["models"] == ["good"] and summary["scores"]["good"]["topic"] == pytest.approx(3 / 7)
    assert len(summary["failures"]) == 1 and summary["failures"][0]["model"] == "x"
    assert "different base model" in summary["failures"][0]["error"]
    assert not (tmp_path / "out" / "x").exists() and (tmp_path / "out" / "good" / "results.json").exists()
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["failures"] == summary["failures"]


def test_peft_adapter_on_base(tmp_path, tok):
    adapted, _ = lora_adapter(tok, tmp_path)
    peft_dir = gk.save_adapter(adapted, tmp_path / "peft", format="peft")
    base = save(bert(tok, seed=0, head=False), tok, tmp_path / "base")
    r = evaluate_model({"name": "p", "path": base, "adapter": str(peft_dir)}, [task(cls_file(tmp_path))])["topic"]
    np.testing.assert_allclose(np.array([row["probs"] for row in r["rows"]]), plain_probs(adapted, tok, TEXTS), atol=1e-5)
    assert r["labels"] == LABELS  # peft keeps no label names, but the base folder's config has them


def test_unmerged_adapter_in_bf16(tmp_path, tok):
    """In bf16 folding would round the weights, so the adapter stays unmerged; outputs stay close."""
    adapted, adapter = lora_adapter(tok, tmp_path)
    base = save(bert(tok, seed=0, head=False), tok, tmp_path / "base")
    r = evaluate_model({"name": "b", "path": base, "adapter": adapter, "dtype": "bfloat16"}, [task(cls_file(tmp_path))])
    np.testing.assert_allclose(np.array([row["probs"] for row in r["topic"]["rows"]]), plain_probs(adapted, tok, TEXTS), atol=0.05)


# -- command line -----------------------------------------------------------------------------------

def graft(*args, cwd):
    return subprocess.run([sys.executable, "-m", "graftkit.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_config_error_exit_2_one_line(tmp_path):
    (tmp_path / "eval.yaml").write_text("models: [{name: m, path: x}]\ntasks: [{name: t, kind: classification, file: f, lable: y}]\n")
    p = graft("eval", "eval.yaml", cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("graft: error: tasks[0] ('t'): ClassificationTask: unknown key 'lable'")


def test_cli_runs_and_reports_failures(tmp_path, tok):
    good = save(bert(tok, bias=[0.0, 2.0, 0.0]), tok, tmp_path / "good")
    bare = save(bert(tok, head=False), tok, tmp_path / "bare")
    cls_file(tmp_path)
    (tmp_path / "eval.yaml").write_text(
        f"models:\n  - {{name: good, path: {good}}}\n  - {{name: bare, path: {bare}}}\n"
        "tasks:\n  - {name: topic, kind: classification, file: test.jsonl, max_length: 32}\noutput: res\n")
    p = graft("eval", "eval.yaml", "--no-progress", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()]
    assert p.stderr.startswith("graft: error: model 'bare' failed: model 'bare'") and "give `head:`" in p.stderr
    assert "topic (accuracy)" in p.stdout and "0.4286" in p.stdout
    summary = json.loads((tmp_path / "res" / "summary.json").read_text())
    assert summary["scores"] == {"good": {"topic": pytest.approx(3 / 7)}} and summary["failures"][0]["model"] == "bare"
    p = graft("eval", "eval.yaml", "--models", "good", cwd=tmp_path)
    assert p.returncode == 2 and "already holds results" in p.stderr
# -- the real MiniLM ------------------------------------------------------------------------------

@pytest.mark.real
def test_real_minilm_adapter_matches_plain_loop(tmp_path):
    from graftkit.data import bbc_news

    texts, labels = zip(*bbc_news()[::45][:48])  # every class, in a fixed order
    names = sorted(set(labels))
    model = gk.load_model("minilm", head="classification", num_labels=len(names), id2label=dict(enumerate(names)),
                          label2id={n: i for i, n in enumerate(names)})
    gk.inject(model, gk.LoRAConfig(r=4, targets=["query", "value"], train_also=["classifier"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.02)
    adapter = gk.save_adapter(model, tmp_path / "adapter")
    f = write_jsonl(tmp_path / "bbc.jsonl", [{"text": t, "label": l} for t, l in zip(texts, labels)])
    t = TaskSpec(name="bbc", kind="classification", file=f, max_length=128, batch_size=16)
    r = evaluate_model({"name": "lora", "path": "minilm", "adapter": str(adapter)}, [t])["bbc"]
    tok = gk.load_tokenizer("minilm")
    with torch.no_grad():
        batch = tok(list(texts), truncation=True, max_length=128, padding=True, return_tensors="pt")
        ref = model(**batch).logits.argmax(-1).tolist()
    agree = np.mean([row["prediction"] == names[i] for row, i in zip(r["rows"], ref)])
    # graftkit truncates like graft train (ids[:128], no final [SEP]), the plain loop keeps [SEP]: long texts may differ
    assert agree >= 0.9
    with pytest.raises(EvalError, match="has no classification head for task 'bbc'; give `head:`"):
        evaluate_model({"name": "bare", "path": "minilm"}, [t])
