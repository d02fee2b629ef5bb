"""LoRAHub (merge/lorahub.py): a gradient-free search of LoRA combination weights on labelled examples.

A tiny BERT classifier (the packaged MiniLM tokenizer) and two LoRAs of its classifier: one that
predicts the examples' labels with confidence ("right") and one that predicts another class."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import graftkit as gk
from eval_helpers import LABELS, TEXTS, bert, save, write_jsonl
from graftkit.cli import main
from graftkit.merge import lorahub as lh
from merge_helpers import load_folder

RIGHT, WRONG = 36, 32  # LoRA seeds: 36 says "business" for every text, 32 "sports"


def lora(tok, seed: int, folder: Path):
    model = bert(tok, seed=0)
    gk.inject(model, gk.LoRAConfig(r=2, lora_alpha=2, targets=["classifier"], init_lora_weights=False))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 3.0)
    gk.save_adapter(model, folder)
    return model


def predict(model, tok) -> list[str]:
    with torch.no_grad():
        return [LABELS[int(model(input_ids=torch.tensor([tok(t)["input_ids"]])).logits.argmax())] for t in TEXTS]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lorahub")
    tok = gk.load_tokenizer("minilm")
    paths = {"base": save(bert(tok, seed=0), tok, root / "base"), "root": root}
    right, wrong = lora(tok, RIGHT, root / "right"), lora(tok, WRONG, root / "wrong")
    labels = predict(right, tok)
    assert labels != predict(wrong, tok)  # the two LoRAs disagree: one of them is clearly right
    paths["right"], paths["wrong"] = str(root / "right"), str(root / "wrong")
    paths["data"] = write_jsonl(root / "task.jsonl", [{"text": t, "label": y} for t, y in zip(TEXTS, labels)])
    return paths


def recipe(folders, models=("wrong", "right"), data=True, **extra) -> dict:
    cfg = {"merge_method": "lorahub", "base_model": folders["base"], "dtype": "float32", "seed": 3,
           "models": [{"model": folders[m]} for m in models], "parameters": {"budget": 16}, **extra}
    if data:
        cfg["data"] = {"task": folders["data"], "batch_size": 4}
    return cfg


def merge_record(out: Path) -> dict:
    meta = json.loads((out / "adapter.json").read_text()) if (out / "adapter.json").exists() else \
        json.loads((out / "graft_provenance.json").read_text())
    return next(x for x in _walk(meta) if isinstance(x, dict) and "weights" in x and "uniform_objective" in x)


def _walk(x):
    yield x
    if isinstance(x, dict):
        for v in x.values():
            yield from _walk(v)
    elif isinstance(x, list):
        for v in x:
            yield from _walk(v)


def test_the_right_lora_gets_the_weight_and_the_adapter_loads(folders, tmp_path):
    out = Path(gk.merge(recipe(folders, output="adapter", rank=2), tmp_path / "hub"))
    found = merge_record(out)
    w = found["weights"]
    # B A is quadratic in w (w and -w compose the same adapter): the weight on a LoRA is |w_i|
    assert abs(w[folders["right"]]) > abs(w[folders["wrong"]]) + 0.1, w
    assert found["objective"] <= found["uniform_objective"] and found["evaluations"] == 16
    # a native LoRA adapter: loaded onto the base, its logits are those of base + B A of the composition
    tok = gk.load_tokenizer(folders["base"])
    model = gk.load_adapter(bert(tok, seed=0), out)
    ids = torch.tensor([tok(TEXTS[0])["input_ids"]])
    ref = bert(tok, seed=0)
    sources = {}
    for name in ("wrong", "right"):
        a = gk.read_adapter(folders[name]).tensors
        sources[name] = (a["classifier.weight.lora_A"], a["classifier.weight.lora_B"])
    wa, wb = w[folders["wrong"]], w[folders["right"]]
    big_a = wa * sources["wrong"][0] + wb * sources["right"][0]
    big_b = wa * sources["wrong"][1] + wb * sources["right"][1]  # scaling alpha / r = 1
    with torch.no_grad():
        ref.classifier.weight.add_(big_b @ big_a)
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        # and the composition fits the examples at least as well as the uniform mix
        assert predict(model, tok) == [json.loads(x)["label"] for x in Path(folders["data"]).read_text().splitlines()]


def test_seeded_search_is_reproducible(folders, tmp_path):
    a = merge_record(Path(gk.merge(recipe(folders), tmp_path / "a")))
    b = merge_record(Path(gk.merge(recipe(folders), tmp_path / "b")))
    assert a["weights"] == b["weights"] and a["objective"] == b["objective"]
    other = lh.search(lambda w: (w[0] - 1) ** 2 + w[1] ** 2, 2, budget=12, seed=4)
    again = lh.search(lambda w: (w[0] - 1) ** 2 + w[1] ** 2, 2, budget=12, seed=4)
    third = lh.search(lambda w: (w[0] - 1) ** 2 + w[1] ** 2, 2, budget=12, seed=5)
    assert other.history == again.history and other.history != third.history
    assert other.history[0]["weights"] == [0.5, 0.5]  # the uniform mix is evaluated first


def test_model_output_folds_the_composition(folders, tmp_path):
    """``output: model``: the base with the composed LoRA folded in, the weights in the provenance."""
    out = Path(gk.merge(recipe(folders), tmp_path / "m"))
    w = merge_record(out)["weights"]
    got, base = load_folder(out), load_folder(Path(folders["base"]))
    a = {n: gk.read_adapter(folders[n]).tensors for n in ("wrong", "right")}
    big_a = sum(w[folders[n]] * a[n]["classifier.weight.lora_A"] for n in a)
    big_b = sum(w[folders[n]] * a[n]["classifier.weight.lora_B"] for n in a)
    torch.testing.assert_close(got["classifier.weight"], base["classifier.weight"] + big_b @ big_a, rtol=0, atol=1e-5)
    for k in base:
        if k != "classifier.weight":
            assert torch.equal(got[k], base[k]), k


def cli_error(capsys, args) -> str:
    capsys.readouterr()
    code = main([str(a) for a in args])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("graft: error: "), err
    return err[0]


def test_bad_inputs(folders, tmp_path, capsys):
    tok = gk.load_tokenizer("minilm")
    full = save(bert(tok, seed=0), tok, tmp_path / "full")

    def run(cfg, name):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        line = cli_error(capsys, ["merge", path, tmp_path / name])
        assert not (tmp_path / name).exists()
        assert cli_error(capsys, ["merge", path, tmp_path / name, "--dry-run"]) == line  # the dry run refuses it too
        return line

    assert "data" in run(recipe(folders, data=False), "nodata")
    cfg = recipe(folders)
    cfg["models"][0] = {"model": full}
    line = run(cfg, "with-full")
    assert "LoRA adapter" in line and full in line


def test_per_tensor_function_golden():
    base = torch.tensor([1.0, 2.0])
    deltas = torch.tensor([[5.0, 5.0]])  # the inputs' own deltas are not used: the composition is
    assert torch.equal(lh.lorahub(base, deltas, composed=torch.tensor([0.5, -1.0])), torch.tensor([1.5, 1.0]))
    assert torch.equal(lh.lorahub(base, deltas, composed=None), base)  # a tensor no adapter targets


def test_causal_lm_loss_on_the_answer_tokens(tmp_path):
    """LoRAs of a tiny Llama on a generation task: the objective is the answer tokens' cross-entropy,
    and the output model's search record says so."""
    from conftest import tiny_llama
    from test_merge_adamerging import _word_tokenizer

    tok = _word_tokenizer()
    base = tiny_llama(0)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    for i in range(2):
        m = tiny_llama(0)
        gk.inject(m, gk.LoRAConfig(r=2, lora_alpha=2, targets=["q_proj", "v_proj"], init_lora_weights=False))
        torch.manual_seed(i)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.5)
        gk.save_adapter(m, tmp_path / f"l{i}")
    rows = [{"prompt": f"w{3 + i} w{9 + i} w{20 + i}", "answer": f"w{40 + i}"} for i in range(4)]
    task = {"name": "gen", "kind": "generation", "file": write_jsonl(tmp_path / "gen.jsonl", rows)}
    cfg = {"merge_method": "lorahub", "base_model": str(tmp_path / "base"), "dtype": "float32", "seed": 0,
           "models": [{"model": str(tmp_path / "l0")}, {"model": str(tmp_path / "l1")}],
           "parameters": {"budget": 6}, "data": {"task": task}}
    found = merge_record(Path(gk.merge(cfg, tmp_path / "out")))
    assert found["loss_kind"] == "cross-entropy of the answer tokens" and found["evaluations"] == 6
    assert found["objective"] <= found["uniform_objective"]
