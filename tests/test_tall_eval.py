"""graft eval of a TALL bundle's expert, rebuilt in memory (model entry {bundle, bundle_task})."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from graftkit.cli import main
from merge_helpers import make_models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two tiny BERT classifiers (3 and 2 labels, heads stored whole) compressed into one bundle,
    and task A's expert decompressed to a folder."""
    import graftkit as gk
    from eval_helpers import cls_file, two_bert_experts

    root = tmp_path_factory.mktemp("tall_eval")
    tok = gk.load_tokenizer("minilm")
    base, experts = two_bert_experts(tok, root)
    (root / "r.yaml").write_text(yaml.safe_dump({"base": base, "experts": experts, "lambda": 0.4, "exclude": ["^classifier\\."]}))
    assert main(["compress", str(root / "r.yaml"), str(root / "bundle")]) == 0
    assert main(["decompress", str(root / "bundle"), "A", str(root / "outA")]) == 0
    density = json.loads((root / "bundle" / "bundle.json").read_text())["tasks"]["A"]["mask_density"]
    assert 0.2 < density < 0.95  # the mask matters: base, tau_MTL and the expert all differ from the rebuild
    return root, cls_file(root, name="test.jsonl")


def _config(root: Path, models: list[dict], file: str) -> Path:
    path = root / f"eval-{models[0]['name']}.yaml"
    path.write_text(yaml.safe_dump({"models": models, "tasks": [{"name": "topic", "kind": "classification", "file": file,
                                                                   "max_length": 32, "batch_size": 3}]}))
    return path


def _files(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder)): f.stat().st_mtime_ns for f in folder.rglob("*")}


def test_bundle_expert_scores_exactly_as_its_decompressed_folder(tiny, tmp_path, capsys):
    from graftkit.eval.config import ModelSpec
    from graftkit.eval.models import load

    root, file = tiny
    before = _files(root / "bundle")
    cfg = _config(tmp_path, [{"name": "tall", "bundle": str(root / "bundle"), "bundle_task": "A"},
                             {"name": "folder", "path": str(root / "outA")}], file)
    assert main(["eval", str(cfg), "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    assert _files(root / "bundle") == before  # rebuilt in memory: nothing written into the bundle
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ev", cfg.name]  # nor beside the output
    a = (tmp_path / "ev" / "tall" / "predictions" / "topic.jsonl").read_text()
    assert a == (tmp_path / "ev" / "folder" / "predictions" / "topic.jsonl").read_text()
    assert len(a.splitlines()) == 7
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["scores"]["tall"] == summary["scores"]["folder"]
    rec = json.loads((tmp_path / "ev" / "tall" / "results.json").read_text())["model"]
    assert rec["bundle"] == str(root / "bundle") and rec["bundle_task"] == "A" and rec["path"] is None
    # the weights themselves, and so the logits, are bit-identical to loading the decompressed folder
    got = load(ModelSpec(name="t", bundle=str(root / "bundle"), bundle_task="A"), "classification")
    ref = load(ModelSpec(name="f", path=str(root / "outA")), "classification")
    sa, sb = got.model.state_dict(), ref.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert got.own is not None and got.own.labels == ["business", "sports", "tech"]  # task A's own head, stored whole
    ids = torch.tensor([[101, 2054, 2003, 102]])
    assert torch.equal(got.model(input_ids=ids).logits, ref.model(input_ids=ids).logits)


def test_base_given_as_path_and_causal_lm_experts(tmp_path):
    """A moved base given as the entry's path; tiny Llama experts (causal LM, nothing stored whole)
    load with the same weights as their decompressed folder."""
    from graftkit.eval.config import ModelSpec
    from graftkit.eval.models import load

    paths = make_models(tmp_path, n=2)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"base": str(paths["base"]), "experts": {"a": str(paths["ft0"]), "b": str(paths["ft1"])}}))
    assert main(["compress", str(tmp_path / "r.yaml"), str(tmp_path / "bundle")]) == 0
    assert main(["decompress", str(tmp_path / "bundle"), "b", str(tmp_path / "out")]) == 0
    paths["base"].rename(tmp_path / "moved")
    got = load(ModelSpec(name="t", bundle=str(tmp_path / "bundle"), bundle_task="b", path=str(tmp_path / "moved")), "causal-lm")
    ref = load(ModelSpec(name="f", path=str(tmp_path / "out")), "causal-lm")
    sa, sb = got.model.state_dict(), ref.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ft = load(ModelSpec(name="e", path=str(paths["ft1"])), "causal-lm").model.state_dict()
    assert not all(torch.equal(sa[k], ft[k]) for k in sa)  # a rebuild, not the expert itself


def _eval_error(capsys, code_args) -> str:
    capsys.readouterr()
    assert main(code_args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("graft: error: ") and "\n" not in err, err
    return err


def test_bundle_without_the_task_names_the_tasks_it_has(tiny, tmp_path, capsys):
    root, file = tiny
    cfg = _config(tmp_path, [{"name": "tall", "bundle": str(root / "bundle"), "bundle_task": "C"}], file)
    err = _eval_error(capsys, ["eval", str(cfg), "--out", str(tmp_path / "ev"), "--no-progress"])
    assert "no task 'C'" in err and "A, B" in err
    assert not (tmp_path / "ev" / "tall").exists()


def test_bundle_on_another_base_is_refused(tiny, tmp_path, capsys):
    import graftkit as gk
    from eval_helpers import bert, save

    root, file = tiny
    tok = gk.load_tokenizer("minilm")
    other = save(bert(tok, seed=5), tok, tmp_path / "other")  # same shapes, other weights
    cfg = _config(tmp_path, [{"name": "tall", "bundle": str(root / "bundle"), "bundle_task": "A", "path": other}], file)
    err = _eval_error(capsys, ["eval", str(cfg), "--out", str(tmp_path / "ev"), "--no-progress"])
    assert "different base" in err and str(tmp_path / "other") in err
    assert not (tmp_path / "ev" / "tall").exists()


def test_a_folder_that_is_not_a_bundle_is_refused(tiny, tmp_path, capsys):
    root, file = tiny
    cfg = _config(tmp_path, [{"name": "tall", "bundle": str(root / "outA"), "bundle_task": "A"}], file)
    err = _eval_error(capsys, ["eval", str(cfg), "--out", str(tmp_path / "ev"), "--no-progress"])
    assert "is not a TALL bundle" in err and "outA" in err


def test_a_bundle_whose_recorded_base_is_gone_points_at_path(tiny, tmp_path, capsys):
    root, file = tiny
    shutil.copytree(root / "bundle", tmp_path / "bundle")
    m = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    m["base"]["path"] = str(tmp_path / "gone")
    (tmp_path / "bundle" / "bundle.json").write_text(json.dumps(m))
    cfg = _config(tmp_path, [{"name": "tall", "bundle": str(tmp_path / "bundle"), "bundle_task": "B"}], file)
    err = _eval_error(capsys, ["eval", str(cfg), "--out", str(tmp_path / "ev"), "--no-progress"])
    assert "does not exist" in err and "`path:`" in err


@pytest.mark.parametrize("entry, words", [
    ({"bundle": "b"}, "bundle needs bundle_task"),
    ({"bundle_task": "A", "path": "minilm"}, "bundle_task needs bundle"),
    ({}, "give path"),
    ({"bundle": "b", "bundle_task": "A", "adapter": "x"}, "adapter applies to a model folder"),
])
def test_model_entry_fields_are_checked(tmp_path, capsys, entry, words):
    cfg = _config(tmp_path, [{"name": "m", **entry}], str(tmp_path / "t.jsonl"))
    err = _eval_error(capsys, ["eval", str(cfg), "--out", str(tmp_path / "ev"), "--no-progress"])
    assert words in err and "'m'" in err
