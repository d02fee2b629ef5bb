"""graft eval, classification: outputs, metrics by hand, head precedence and sources, bad inputs, cache."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import transformers

import graftkit as gk
from graftkit.errors import ConfigError, EvalError, FileFormatError
from graftkit.eval import EvalCache, evaluate, evaluate_model
from graftkit.eval.config import TaskSpec, load_eval_config
from eval_helpers import GOLD, LABELS, TEXTS, bert, cls_file, plain_probs, save, task, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return gk.load_tokenizer("minilm")


# -- end to end, metrics by hand ------------------------------------------------------------------

def test_constant_head_metrics_by_hand(tmp_path, tok):
    folder = save(bert(tok, bias=[0.0, 2.0, 0.0]), tok, tmp_path / "m")
    res = evaluate_model({"name": "m", "path": folder}, [task(cls_file(tmp_path))], out_dir=tmp_path / "out")
    r = res["topic"]
    # always "sports": 3 of 7 right
    assert [row["prediction"] for row in r["rows"]] == ["sports"] * 7
    assert r["metrics"]["accuracy"] == pytest.approx(3 / 7)
    # F1: business 0 (2 gold, never predicted), sports 2*3/(2*3+4+0) = 0.6, tech 0 -> mean 0.2
    assert r["metrics"]["macro_f1"] == pytest.approx(0.6 / 3)
    conf = math.exp(2) / (math.exp(2) + 2)
    assert r["metrics"]["ece"] == pytest.approx(abs(3 / 7 - conf), abs=1e-6)
    assert r["main"] == "accuracy" and r["n"] == 7 and r["labels"] == LABELS
    # files: results.json (no rows), predictions in file order
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["model"] == {"name": "m", "path": folder, "adapter": None, "head": None}
    assert results["tasks"]["topic"]["predictions"] == "predictions/topic.jsonl" and "rows" not in results["tasks"]["topic"]
    lines = [json.loads(l) for l in (tmp_path / "out" / "predictions" / "topic.jsonl").read_text().splitlines()]
    assert [l["id"] for l in lines] == list(range(7)) and [l["reference"] for l in lines] == GOLD
    assert [l["score"] for l in lines] == [float(g == "sports") for g in GOLD]
    assert lines[0]["probs"] == pytest.approx([1 / (math.exp(2) + 2), conf, 1 / (math.exp(2) + 2)], abs=1e-6)


def test_batched_sorted_padded_equals_one_by_one(tmp_path, tok):
    model = bert(tok, seed=3)
    folder = save(model, tok, tmp_path / "m")
    r = evaluate_model({"name": "m", "path": folder}, [task(cls_file(tmp_path))])["topic"]
    ref = plain_probs(model, tok, TEXTS)
    np.testing.assert_allclose(np.array([row["probs"] for row in r["rows"]]), ref, atol=1e-5)
    assert [row["prediction"] for row in r["rows"]] == [LABELS[i] for i in ref.argmax(1)]
    gold = np.array([LABELS.index(g) for g in GOLD])
    assert r["metrics"]["accuracy"] == pytest.approx(float((ref.argmax(1) == gold).mean()))


def test_limit_and_max_length(tmp_path, tok):
    model = bert(tok, seed=4)
    folder = save(model, tok, tmp_path / "m")
    t = TaskSpec(name="topic", kind="classification", file=cls_file(tmp_path), limit=4, max_length=4, batch_size=2)
    r = evaluate_model({"name": "m", "path": folder}, [t])["topic"]
    assert r["n"] == 4
    np.testing.assert_allclose(np.array([row["probs"] for row in r["rows"]]), plain_probs(model, tok, TEXTS[:4], 4), atol=1e-5)


# -- heads ----------------------------------------------------------------------------------------

def test_head_precedence(tmp_path, tok):
    own = save(bert(tok, seed=0, bias=[0.0, 3.0, 0.0]), tok, tmp_path / "own")  # sports
    task_head = save(bert(tok, seed=1, bias=[0.0, 0.0, 3.0]), tok, tmp_path / "task_head")  # tech
    model_head = save(bert(tok, seed=2, bias=[3.0, 0.0, 0.0]), tok, tmp_path / "model_head")  # business
    f = cls_file(tmp_path)
    tasks = [task(f, "with_head", head=task_head), task(f, "plain")]
    r1 = evaluate_model({"name": "a", "path": own, "heads": {"with_head": model_head}}, tasks)
    r2 = evaluate_model({"name": "b", "path": own}, tasks)
    assert {row["prediction"] for row in r1["with_head"]["rows"]} == {"business"}  # model.heads wins
    assert {row["prediction"] for row in r2["with_head"]["rows"]} == {"tech"}  # then task.head
    assert {row["prediction"] for row in r1["plain"]["rows"]} == {"sports"}  # then the model's own
    assert {row["prediction"] for row in r2["plain"]["rows"]} == {"sports"}
    assert r1["with_head"]["head"] == model_head and r2["with_head"]["head"] == task_head


def test_head_with_other_label_order_and_count(tmp_path, tok):
    """File labels map to head outputs by name: a 4-label head in another order still scores right."""
    labels = ["tech", "weather", "sports", "business"]
    head = save(bert(tok, seed=5, labels=labels, bias=[0.0, 0.0, 4.0, 0.0]), tok, tmp_path / "head")
    base = save(bert(tok, seed=0, head=False), tok, tmp_path / "bare")
    r = evaluate_model({"name": "m", "path": base}, [task(cls_file(tmp_path), head=head)])["topic"]
    assert r["labels"] == labels and {row["prediction"] for row in r["rows"]} == {"sports"}
    assert r["metrics"]["accuracy"] == pytest.approx(3 / 7)
    assert len(r["rows"][0]["probs"]) == 4


def test_no_head_error(tmp_path, tok):
    bare = save(bert(tok, head=False), tok, tmp_path / "bare")
    with pytest.raises(EvalError, match=r"has no classification head for task 'topic'; give `head:`"):
        evaluate_model({"name": "bare", "path": bare}, [task(cls_file(tmp_path))])


def test_unseen_label_error(tmp_path, tok):
    folder = save(bert(tok), tok, tmp_path / "m")
    f = cls_file(tmp_path, gold=GOLD[:-1] + ["weather"])
    with pytest.raises(EvalError) as e:
        evaluate_model({"name": "m", "path": folder}, [task(f)])
    msg = str(e.value)
    assert "'weather'" in msg and f in msg and "\n" not in msg


def test_default_labels_map_integer_labels(tmp_path, tok):
    """A head saved with transformers' default names (LABEL_0, ...) reads a file's 0/1/2 labels as ids."""
    model = bert(tok, labels=["LABEL_0", "LABEL_1", "LABEL_2"], bias=[0.0, 0.0, 5.0])
    folder = save(model, tok, tmp_path / "m")
    f = write_jsonl(tmp_path / "ints.jsonl", [{"text": t, "label": i % 3} for i, t in enumerate(TEXTS)])
    r = evaluate_model({"name": "m", "path": folder}, [task(f)])["topic"]
    assert r["metrics"]["accuracy"] == pytest.approx(2 / 7)
    assert r["rows"][2]["reference"] == "2" and r["rows"][2]["prediction"] == "LABEL_2"


# -- bad inputs -------------------------------------------------------------------------------------

def test_missing_field_names_row_and_file(tmp_path, tok):
    rows = [{"text": t, "label": g} for t, g in zip(TEXTS, GOLD)]
    del rows[2]["label"]
    f = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(EvalError, match=r"bad\.jsonl: line 3 has no value for field 'label'"):
        evaluate_model({"name": "m", "path": "unused"}, [task(f)])
    f2 = write_jsonl(tmp_path / "nofield.jsonl", [{"body": "x", "label": "a"}])
    with pytest.raises(EvalError, match=r"has no field 'text' .*its fields are: body, label"):
        evaluate_model({"name": "m", "path": "unused"}, [task(f2)])


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(EvalError, match="holds no rows"):
        evaluate_model({"name": "m", "path": "unused"}, [task(str(tmp_path / "empty.jsonl"))])
    with pytest.raises(FileFormatError, match="does not exist"):
        evaluate_model({"name": "m", "path": "unused"}, [task(str(tmp_path / "nope.jsonl"))])
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": "b"}\n{oops\n')
    with pytest.raises(FileFormatError, match="line 2 is not valid JSON"):
        evaluate_model({"name": "m", "path": "unused"}, [task(str(tmp_path / "broken.jsonl"))])


def test_csv_and_parquet(tmp_path, tok):
    import pandas as pd

    folder = save(bert(tok, bias=[0.0, 2.0, 0.0]), tok, tmp_path / "m")
    frame = pd.DataFrame({"text": TEXTS, "label": GOLD})
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet")
    for f in ("t.csv", "t.parquet"):
        r = evaluate_model({"name": "m", "path": folder}, [task(str(tmp_path / f))])["topic"]
        assert r["metrics"]["accuracy"] == pytest.approx(3 / 7)


def test_config_errors_are_one_line():
    base = {"models": [{"name": "m", "path": "x"}], "tasks": [{"name": "t", "kind": "classification", "file": "f"}]}
    cases = [
        ({**base, "tasks": [{"name": "t", "kind": "classification", "file": "f", "lable_field": "y"}]},
         r"tasks\[0\] \('t'\): ClassificationTask: unknown key 'lable_field' \(did you mean 'label_field'\?\); accepted keys: "),
        ({**base, "models": [{"name": "m", "path": "x", "adapters": "a"}]}, r"models\[0\] \('m'\): ModelSpec: unknown key 'adapters'"),
        ({**base, "tasks": [{"name": "t", "kind": "regression", "file": "f"}]}, r"unknown kind 'regression'; choose one of"),
        ({**base, "models": [{"name": "m", "path": "x", "heads": {"nope": "h"}}]}, r"heads names task 'nope'"),
        ({**base, "models": base["models"] * 2}, r"models name 'm' appears more than once"),
        ({**base, "extra": 1}, r"EvalConfig: unknown key 'extra'"),
        ({"models": [], "tasks": base["tasks"]}, r"'models' must be a non-empty list"),
        ({**base, "models": [{"name": "full", "path": "x"}, {"name": "full/ties", "path": "y"}]},
         r"model name 'full/ties' is inside model 'full''s folder"),
        ({**base, "models": [{"name": "../up", "path": "x"}]}, r"model name '../up' must be letters"),
        ({**base, "tasks": [{"name": "t", "kind": "generation", "file": "f", "extract": "(["}]}, r"not a valid regular expression"),
        ({**base, "tasks": [{"name": "t", "kind": "generation", "file": "f", "system_prompt": "x"}]}, r"system_prompt needs chat: true"),
        ({**base, "tasks": [{"name": "t", "kind": "generation", "file": "f", "decoding": {"temp": 1}}]},
         r"Decoding: unknown key 'temp'"),
    ]
    for data, pattern in cases:
        with pytest.raises(ConfigError, match=pattern) as e:
            load_eval_config(data)
        assert "\n" not in str(e.value)


def test_existing_output_is_refused_before_computing(tmp_path, tok):
    folder = save(bert(tok, bias=[0.0, 2.0, 0.0]), tok, tmp_path / "m")
    cfg = {"models": [{"name": "m", "path": folder}], "tasks": [{"name": "topic", "kind": "classification", "file": cls_file(tmp_path)}]}
    evaluate(cfg, tmp_path / "out")
    (tmp_path / "out" / "m" / "marker").write_text("kept")
    with pytest.raises(EvalError, match=r"already holds results.*--overwrite"):
        evaluate(cfg, tmp_path / "out")
    assert (tmp_path / "out" / "m" / "marker").exists()
    s = evaluate(cfg, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "m" / "marker").exists() and s["scores"]["m"]["topic"] == pytest.approx(3 / 7)


def test_select_models_and_tasks_and_summary_merge(tmp_path, tok):
    a = save(bert(tok, bias=[0.0, 2.0, 0.0]), tok, tmp_path / "a")
    b = save(bert(tok, seed=1, bias=[2.0, 0.0, 0.0]), tok, tmp_path / "b")
    f = cls_file(tmp_path)
    cfg = {"models": [{"name": "a", "path": a}, {"name": "b", "path": b}],
           "tasks": [{"name": "t1", "kind": "classification", "file": f}, {"name": "t2", "kind": "classification", "file": f}]}
    s1 = evaluate(cfg, tmp_path / "out", models=["a"], tasks=["t1"])
    assert s1["models"] == ["a"] and s1["tasks"] == ["t1"] and s1["scores"] == {"a": {"t1": pytest.approx(3 / 7)}}
    s2 = evaluate(cfg, tmp_path / "out", models=["b"])
    assert s2["models"] == ["a", "b"]  # the earlier run's model is kept
    assert s2["scores"]["b"] == {"t1": pytest.approx(2 / 7), "t2": pytest.approx(2 / 7)}
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["scores"]["a"] == {"t1": pytest.approx(3 / 7)}
    with pytest.raises(EvalError, match="no model named 'c' in the eval config; its models are: a, b"):
        evaluate(cfg, tmp_path / "out2", models=["c"])


# -- the tokenization cache -----------------------------------------------------------------------

def test_cache_tokenizes_once_across_models(tmp_path, tok, monkeypatch):
    a = save(bert(tok, seed=0), tok, tmp_path / "a")
    b = save(bert(tok, seed=1), tok, tmp_path / "b")  # another folder, an identical tokenizer copy
    t = task(cls_file(tmp_path))
    calls = []
    cls = type(tok)
    original = cls.__call__
    monkeypatch.setattr(cls, "__call__", lambda self, *a_, **k: (calls.append(1), original(self, *a_, **k))[1])
    cache = EvalCache()
    ra = evaluate_model({"name": "a", "path": a}, [t], cache=cache)
    rb = evaluate_model({"name": "b", "path": b}, [t], cache=cache)
    evaluate_model({"name": "a2", "path": a}, [t], cache=cache)
    assert len(calls) == 1
    assert cache.stats == {"read": 1, "tokenize": 1, "tokenizer_load": 1}
    assert ra["topic"]["rows"][0]["probs"] != rb["topic"]["rows"][0]["probs"]  # different models all the same




def test_bad_head_sources(tmp_path, tok):
    folder = save(bert(tok), tok, tmp_path / "m")
    f = cls_file(tmp_path)
    model = bert(tok)
    gk.inject(model, gk.LoRAConfig(r=2, targets=["query"]))
    headless = str(gk.save_adapter(model, tmp_path / "headless"))
    with pytest.raises(EvalError, match=r"is an adapter without the head tensor classifier\.(bias|weight)"):
        evaluate_model({"name": "m", "path": folder}, [task(f, head=headless)])
    torch.manual_seed(0)
    wide = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=tok.vocab_size, hidden_size=48, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, num_labels=3))
    wide_dir = save(wide, tok, tmp_path / "wide")
    with pytest.raises(EvalError, match=r"tensor classifier\.weight has shape \(3, 48\) but this model's head needs \(labels, 32\)"):
        evaluate_model({"name": "m", "path": folder}, [task(f, head=wide_dir)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="is neither an HF model folder"):
        evaluate_model({"name": "m", "path": folder}, [task(f, head=str(tmp_path / "empty"))])


