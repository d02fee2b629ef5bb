"""graft compress / graft decompress (TALL-mask compression, analysis/tall.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from graftkit.analysis.masks import load_masks
from graftkit.cli import main
from merge_helpers import load_folder, make_models


def _folder(path: Path, tensors: dict) -> Path:
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"name": path.name}))
    return path


def _recipe(path: Path, base, experts: dict, **extra) -> Path:
    path.write_text(yaml.safe_dump({"base": str(base), "experts": {t: str(p) for t, p in experts.items()}, **extra}))
    return path


@pytest.fixture
def hand(tmp_path):
    """Dyadic values, so every sum is exact and the expected experts can be written by hand."""
    ids = torch.arange(4)
    base = _folder(tmp_path / "base", {"w": torch.zeros(1, 4), "b": torch.ones(2), "ids": ids})
    a = _folder(tmp_path / "a", {"w": torch.tensor([[1.0, 0.25, -1.0, 0.5]]), "b": torch.tensor([1.5, 1.0]), "ids": ids,
                                 "classifier.weight": torch.full((2, 4), 3.0)})
    b = _folder(tmp_path / "b", {"w": torch.tensor([[0.25, 1.0, 1.0, 0.5]]), "b": torch.tensor([1.0, 0.0]), "ids": ids + 1,
                                 "classifier.weight": torch.full((5, 4), -2.0)})
    recipe = _recipe(tmp_path / "tall.yaml", base, {"A": a, "B": b}, **{"lambda": 1.0, "exclude": ["^classifier\\."]})
    return tmp_path, recipe


def test_decompress_equals_hand_computed_golden(hand, capsys):
    root, recipe = hand
    assert main(["compress", str(recipe), str(root / "bundle")]) == 0
    line = capsys.readouterr().out.strip()
    assert "storage ratio" in line and "\n" not in line
    # tau_MTL: w = [1.25, 1.25, 0, 1], b = [0.5, -1]; lambda 1: m_t = |tau_t| >= |tau_other|
    tau = load_folder(root / "bundle" / "tau_mtl")
    assert torch.equal(tau["w"], torch.tensor([[1.25, 1.25, 0.0, 1.0]])) and torch.equal(tau["b"], torch.tensor([0.5, -1.0]))
    for task, w, b in (("A", [1.25, 0.0, 0.0, 1.0], [1.5, 1.0]), ("B", [0.0, 1.25, 0.0, 1.0], [1.0, 0.0])):
        assert main(["decompress", str(root / "bundle"), task, str(root / f"out{task}")]) == 0
        got = load_folder(root / f"out{task}")
        assert torch.equal(got["w"], torch.tensor([w])), task
        # b: tau_A = [0.5, 0], tau_B = [0, -1]: A keeps entry 0 (1 + 0.5), B keeps entry 1 (1 - 1)
        assert torch.equal(got["b"], torch.tensor(b)), task
        src = load_file(str(root / task.lower() / "model.safetensors"))
        assert torch.equal(got["ids"], src["ids"]) and got["ids"].dtype == torch.int64  # non-float: the expert's own
        assert torch.equal(got["classifier.weight"], src["classifier.weight"])  # excluded head, each task its own shape
        assert json.loads((root / f"out{task}" / "config.json").read_text()) == {"name": task.lower()}


def test_python_api_takes_the_recipe_as_a_mapping(hand):
    """compress(dict) validates the mapping as the CLI validates the file (it used to index the raw
    mapping as if it were parsed, a TypeError on a lambda list) and writes the same bundle."""
    from graftkit.analysis.tall import compress
    from graftkit.errors import ConfigError

    root, recipe = hand
    raw = yaml.safe_load(recipe.read_text())
    compress(raw, root / "api")
    assert main(["compress", str(recipe), str(root / "cli")]) == 0
    for task in ("A", "B"):
        assert (root / "api" / "tasks" / task / "mask.safetensors").read_bytes() == (root / "cli" / "tasks" / task / "mask.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="no validation task"):
        compress({**raw, "lambda": [0.2, 0.4]}, root / "bad")
    assert not (root / "bad").exists()


def test_mask_round_trip_and_storage_ratio(hand):
    root, recipe = hand
    assert main(["compress", str(recipe), str(root / "bundle")]) == 0
    m = json.loads((root / "bundle" / "bundle.json").read_text())
    fp = m["base"]["fingerprint"]
    masks = load_masks(root / "bundle" / "tasks" / "A" / "mask.safetensors", fp)
    assert set(masks) == {"w", "b"}  # ids (int) and the head are not merged
    assert torch.equal(masks["w"], torch.tensor([[True, False, True, True]]))
    assert torch.equal(masks["b"], torch.tensor([True, False]))
    assert set(m["tasks"]["A"]["stored_whole"]) == {"ids", "classifier.weight"}
    assert m["tasks"]["A"]["mask_density"] == pytest.approx(4 / 6)
    files = [f for f in (root / "bundle").rglob("*") if f.is_file() and f.name != "bundle.json"]
    experts = sum(f.stat().st_size for d in ("a", "b") for f in (root / d).rglob("*") if f.is_file())
    st = m["storage"]
    assert st["bundle_bytes"] == sum(f.stat().st_size for f in files)
    assert st["experts_bytes"] == experts
    assert st["ratio"] == pytest.approx(st["bundle_bytes"] / experts)


def test_tiny_llama_experts_rebuild_exactly(tmp_path):
    import transformers

    paths = make_models(tmp_path, n=3)
    recipe = _recipe(tmp_path / "r.yaml", paths["base"], {f"t{i}": paths[f"ft{i}"] for i in range(3)}, **{"lambda": 0.4})
    assert main(["compress", str(recipe), str(tmp_path / "bundle")]) == 0
    base = load_folder(paths["base"])
    fts = [load_folder(paths[f"ft{i}"]) for i in range(3)]
    assert main(["decompress", str(tmp_path / "bundle"), "t1", str(tmp_path / "out")]) == 0
    got = load_folder(tmp_path / "out")
    assert set(got) == set(fts[1])
    for k, b in base.items():
        d = [ft[k] - b for ft in fts]
        tau = d[0] + d[1] + d[2]
        mask = d[1].abs() >= 0.4 * (tau - d[1]).abs()
        assert torch.equal(got[k], b + mask * tau), k
    m = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert 0 < m["tasks"]["t1"]["mask_density"] < 1 and m["storage"]["ratio"] < 1  # one float tensor + 3 bit masks < 3 float
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # a loadable HF folder
    assert torch.equal(model.state_dict()["model.norm.weight"], got["model.norm.weight"])


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("graft: error: ") and "\n" not in err, err
    return err


def test_bundle_missing_task_names_the_tasks_it_has(hand, capsys):
    root, recipe = hand
    assert main(["compress", str(recipe), str(root / "bundle")]) == 0
    capsys.readouterr()
    assert main(["decompress", str(root / "bundle"), "C", str(root / "out")]) == 2
    assert "no task 'C'" in (err := _err(capsys)) and "A, B" in err
    assert not (root / "out").exists()


def test_bundle_for_another_base_is_refused(tmp_path, capsys):
    paths = make_models(tmp_path / "m", n=2)
    other = make_models(tmp_path / "o", n=0, seed=1)["base"]  # same shapes, other weights
    recipe = _recipe(tmp_path / "r.yaml", paths["base"], {"a": paths["ft0"], "b": paths["ft1"]})
    assert main(["compress", str(recipe), str(tmp_path / "bundle")]) == 0
    capsys.readouterr()
    assert main(["decompress", str(tmp_path / "bundle"), "a", str(tmp_path / "out"), "--base", str(other)]) == 2
    assert "different base" in _err(capsys)
    assert not (tmp_path / "out").exists()
    # the recorded base itself replaced by another model
    import shutil

    shutil.rmtree(paths["base"])
    shutil.copytree(other, paths["base"])
    assert main(["decompress", str(tmp_path / "bundle"), "a", str(tmp_path / "out")]) == 2
    assert "different base" in _err(capsys)
    assert not (tmp_path / "out").exists()


def test_experts_of_different_shapes_are_refused(tmp_path, capsys):
    base = _folder(tmp_path / "base", {"w": torch.zeros(1, 4)})
    a = _folder(tmp_path / "a", {"w": torch.ones(1, 4)})
    b = _folder(tmp_path / "b", {"w": torch.ones(1, 5)})
    recipe = _recipe(tmp_path / "r.yaml", base, {"A": a, "B": b})
    assert main(["compress", str(recipe), str(tmp_path / "bundle")]) == 2
    err = _err(capsys)
    assert "expert B" in err and "[1, 5]" in err and "[1, 4]" in err
    assert not (tmp_path / "bundle").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_lambda_chosen_on_validation_with_tiny_bert_heads(tmp_path, capsys):
    """Two tiny BERT classifiers (heads of 3 and 2 labels, stored whole); task A's lambda is chosen
    on its validation file among three candidates. The recorded score of the chosen one is what
    evaluating its decompressed expert gives, and it is the best recorded score."""
    import graftkit as gk
    from eval_helpers import cls_file, two_bert_experts
    from graftkit.eval import evaluate_model

    tok = gk.load_tokenizer("minilm")
    base, experts = two_bert_experts(tok, tmp_path)
    val = cls_file(tmp_path, name="val.jsonl")
    recipe = _recipe(tmp_path / "r.yaml", base, experts, **{
        "lambda": {"A": [0.0, 0.5, 5.0], "B": 0.4}, "exclude": ["^classifier\\."], "select": "metric",
        "validation": {"A": {"kind": "classification", "file": val, "max_length": 32}}})
    assert main(["compress", str(recipe), str(tmp_path / "bundle")]) == 0
    m = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    scores = m["tasks"]["A"]["validation"]
    assert [s["lambda"] for s in scores] == [0.0, 0.5, 5.0]
    best = max(scores, key=lambda s: s["accuracy"])  # max keeps the first of equal ones, as compress does
    assert m["tasks"]["A"]["lambda"] == best["lambda"] and m["tasks"]["B"]["lambda"] == 0.4 and "validation" not in m["tasks"]["B"]
    assert not list((tmp_path / "bundle").glob(".select-*"))
    assert main(["decompress", str(tmp_path / "bundle"), "A", str(tmp_path / "outA")]) == 0
    r = evaluate_model({"name": "a", "path": str(tmp_path / "outA")}, [{"name": "A", "kind": "classification", "file": val, "max_length": 32}])
    assert r["A"]["metrics"]["accuracy"] == pytest.approx(best["accuracy"])
    assert load_folder(tmp_path / "outA")["classifier.weight"].shape == (3, 4 * 8)  # task A's own 3-label head


def test_fidelity_gap_is_the_mean_kl_to_the_expert():
    from graftkit.analysis.tall import fidelity_gap

    expert = {"kind": "classification", "rows": [{"probs": [0.5, 0.5]}, {"probs": [0.9, 0.1]}]}
    rebuilt = {"kind": "classification", "rows": [{"probs": [0.25, 0.75]}, {"probs": [0.9, 0.1]}]}
    want = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)) / 2  # the second example agrees exactly
    assert fidelity_gap(expert, rebuilt) == pytest.approx(want, rel=1e-9)
    assert fidelity_gap(expert, expert) == 0.0
    gen = {"kind": "generation", "main": "exact_match", "metrics": {"exact_match": 0.5}}
    assert fidelity_gap(gen, {**gen, "metrics": {"exact_match": 0.25}}) == 0.25


def test_lambda_chosen_by_fidelity_to_the_expert(tmp_path):
    """The default select: the candidate whose rebuilt expert's label distributions are closest
    (mean KL) to the expert's own on validation; the recorded gap is the KL recomputed here from
    the expert and the decompressed expert."""
    import graftkit as gk
    from eval_helpers import cls_file, two_bert_experts
    from graftkit.eval import evaluate_model

    tok = gk.load_tokenizer("minilm")
    base, experts = two_bert_experts(tok, tmp_path)
    val = {"name": "A", "kind": "classification", "file": cls_file(tmp_path, name="val.jsonl"), "max_length": 32}
    recipe = _recipe(tmp_path / "r.yaml", base, experts, **{
        "lambda": {"A": [5.0, 0.5, 0.0], "B": 0.4}, "exclude": ["^classifier\\."], "validation": {"A": val}})
    assert main(["compress", str(recipe), str(tmp_path / "bundle")]) == 0
    a = json.loads((tmp_path / "bundle" / "bundle.json").read_text())["tasks"]["A"]
    gaps = [c["gap"] for c in a["validation"]]
    assert a["select"] == "fidelity" and len(set(gaps)) == 3  # three different rebuilds
    assert a["lambda"] == a["validation"][gaps.index(min(gaps))]["lambda"]
    assert main(["decompress", str(tmp_path / "bundle"), "A", str(tmp_path / "outA")]) == 0
    ref = evaluate_model({"name": "e", "path": experts["A"]}, [val])["A"]
    got = evaluate_model({"name": "r", "path": str(tmp_path / "outA")}, [val])["A"]
    p = torch.tensor([r["probs"] for r in ref["rows"]], dtype=torch.float64).clamp_min(1e-12)
    q = torch.tensor([r["probs"] for r in got["rows"]], dtype=torch.float64).clamp_min(1e-12)
    assert min(gaps) == pytest.approx(float((p * (p.log() - q.log())).sum(1).mean()), rel=1e-9, abs=1e-12)
    assert a["validation"][0]["expert_accuracy"] == pytest.approx(ref["metrics"]["accuracy"])


def test_unknown_select_is_refused(hand, capsys):
    root, recipe = hand
    raw = yaml.safe_load(recipe.read_text())
    raw["select"] = "best"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["compress", str(recipe), str(root / "bundle")]) == 2
    assert "select must be one of fidelity, metric" in _err(capsys)
    assert not (root / "bundle").exists()


def test_lambda_list_without_validation_is_refused(hand, capsys):
    root, recipe = hand
    raw = yaml.safe_load(recipe.read_text())
    raw["lambda"] = [0.2, 0.4]
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["compress", str(recipe), str(root / "bundle")]) == 2
    assert "no validation task" in _err(capsys)
    assert not (root / "bundle").exists()


@pytest.mark.parametrize("higher_is_better, want", [(True, 0.0), (False, 100.0)])
def test_lambda_choice_scores_each_candidates_rebuilt_expert(hand, monkeypatch, higher_is_better, want):
    """A stand-in evaluator scores a candidate by the sum of its rebuilt ``w`` (read from the folder
    it is given): lambda 0 keeps all of tau_MTL (sum 3.5), 1 gives [1.25, 0, 0, 1] (2.25), 100 none (0)."""
    import graftkit.eval.runner as runner
    from eval_helpers import cls_file

    def fake(spec, tasks, *a, **kw):
        w = load_folder(Path(spec["path"]))["w"]
        return {tasks[0].name: {"main": "score", "higher_is_better": higher_is_better, "metrics": {"score": float(w.sum())}}}

    monkeypatch.setattr(runner, "evaluate_model", fake)
    root, recipe = hand
    raw = yaml.safe_load(recipe.read_text())
    raw["lambda"] = {"A": [1.0, 0.0, 100.0], "B": 1.0}
    raw["select"] = "metric"
    raw["validation"] = {"A": {"kind": "classification", "file": cls_file(root, name="val.jsonl")}}
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["compress", str(recipe), str(root / "bundle")]) == 0
    a = json.loads((root / "bundle" / "bundle.json").read_text())["tasks"]["A"]
    assert a["validation"] == [{"lambda": 1.0, "score": 2.25}, {"lambda": 0.0, "score": 3.5}, {"lambda": 100.0, "score": 0.0}]
    assert a["lambda"] == want


def test_expert_missing_a_tensor_and_moved_base_are_refused(hand, tmp_path, capsys):
    root, recipe = hand
    assert main(["compress", str(recipe), str(root / "bundle")]) == 0
    (root / "base").rename(root / "moved")
    capsys.readouterr()
    assert main(["decompress", str(root / "bundle"), "A", str(root / "out")]) == 2
    assert "does not exist" in (err := _err(capsys)) and "--base" in err
    assert main(["decompress", str(root / "bundle"), "A", str(root / "out"), "--base", str(root / "moved")]) == 0
    capsys.readouterr()
    c = _folder(root / "c", {"w": torch.ones(1, 4)})  # no "b"
    raw = yaml.safe_load(recipe.read_text())
    raw["base"], raw["experts"]["C"] = str(root / "moved"), str(c)
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["compress", str(recipe), str(root / "b2")]) == 2
    assert "expert C" in (err := _err(capsys)) and "lacks 1 tensor" in err and "e.g. b;" in err
    assert not (root / "b2").exists()
