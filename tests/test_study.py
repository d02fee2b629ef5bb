"""graft study end to end on a tiny BERT: data splits, experts, merges chosen on validation,
evaluation on test, comparisons, the report; the split discipline and a failing family."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from graftkit.errors import ConfigError, GraftError

WORDS = {
    "topic": {"sport": ["match", "goal", "team", "coach", "league"], "money": ["bank", "stock", "market", "profit", "loan"]},
    "mood": {"pos": ["great", "lovely", "superb", "happy", "fine"], "neg": ["awful", "bad", "sad", "poor", "dull"]},
}
FILLER = ["the", "a", "it", "was", "and", "then", "we", "saw", "this", "that"]


def write_task(folder: Path, task: str, seed: int, sizes=(64, 16, 24)) -> dict[str, str]:
    """Tiny separable classification data: a label's keywords among filler words; disjoint splits."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < sum(sizes):
        label = rng.choice(sorted(WORDS[task]))
        words = [rng.choice(FILLER) for _ in range(5)] + [rng.choice(WORDS[task][label]) for _ in range(2)]
        rng.shuffle(words)
        text = " ".join(words)
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": label})
    files, start = {}, 0
    for split, n in zip(("train", "validation", "test"), sizes):
        path = folder / task / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[start:start + n]))
        files[split] = str(path)
        start += n
    return files


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A 2-layer BERT with MiniLM's tokenizer (the packaged one), saved as an HF folder; no dropout,
    so whether its tiny experts learn their task does not hang on the dropout draws."""
    from graftkit.io.hf import load_tokenizer

    tok = load_tokenizer("minilm")
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    import torch

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_base") / "bert"
    transformers.BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def study_recipe(tmp_path: Path, base: Path, **changes) -> dict:
    data = tmp_path / "data"
    recipe = {
        "name": "tiny", "base": str(base), "seed": 0,
        "tasks": [{"name": "topic", "files": write_task(data, "topic", 1), "max_length": 16},
                  {"name": "mood", "files": write_task(data, "mood", 2), "max_length": 16}],
        "experts": [{"family": "full", "method": {"method": "full"},
                     "optim": {"lr": 1e-2, "batch_size": 16, "epochs": 8}}],
        "merges": [{"method": "linear"},
                   {"method": "task_arithmetic", "search": {"lambda": [0.5, 1.0]}},
                   {"method": "ties", "parameters": {"density": 0.5}}],
        "evaluation": {"batch_size": 32, "resamples": 200},
        "output": str(tmp_path / "study"),
    }
    recipe.update(changes)
    return recipe


def test_tiny_study_end_to_end(tmp_path, tiny_base):
    from graftkit.eval.study import run_study

    recipe = study_recipe(tmp_path, tiny_base, experts=[  # 12 epochs: 8 left one of seeds 0-2 at 0.67-0.75
        {"family": "full", "method": {"method": "full"}, "optim": {"lr": 1e-2, "batch_size": 16, "epochs": 12}},
        {"family": "lora", "method": {"method": "lora", "r": 4, "targets": ["query", "value", "dense"]},
         "optim": {"lr": 3e-2, "batch_size": 16, "epochs": 8}}])
    result = run_study(recipe, progress=False)
    out = tmp_path / "study"
    assert result["failures"] == []
    names = [m["name"] for m in result["models"]]
    for family in ("full", "lora"):
        for model in ("base", "topic", "mood", "linear", "task_arithmetic", "ties"):
            assert f"{family}/{model}" in names
            assert set(result["scores"][f"{family}/{model}"]) == {"topic", "mood"}
    # the experts learned their own task (keywords make it easy) and the chosen lambda is a grid value
    assert result["scores"]["full/topic"]["topic"] > 0.8 and result["scores"]["full/mood"]["mood"] > 0.8
    ta = next(m for m in result["models"] if m["name"] == "full/task_arithmetic")
    assert ta["params"]["lambda"] in (0.5, 1.0) and len(ta["search"]) == 2 and sum(t["chosen"] for t in ta["search"]) == 1
    # normalized accuracy is merge / expert, flips count against the task's expert
    norm = result["normalized"]["full/ties"]["topic"]
    assert norm == pytest.approx(result["scores"]["full/ties"]["topic"] / result["scores"]["full/topic"]["topic"])
    flips = result["flips"]["full/ties"]["topic"]
    assert flips["n"] == 24 and flips["reference"] == "full/topic"
    assert result["significance"]["full/ties"]["topic"]["verdict"] in ("win", "tie", "loss")
    assert set(result["forgetting"]["full/topic"]) == {"mood"}
    sim = result["similarity"]["full"]
    assert sim["tasks"] == ["topic", "mood"] and sim["cosine"][0][0] == pytest.approx(1.0)
    # outputs on disk: study.json, per-example predictions, merged folders without heads, the report
    assert json.loads((out / "study.json").read_text())["scores"] == result["scores"]
    assert (out / "eval" / "full" / "ties").exists()
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and (out / "report.md").exists()
    for family in ("full", "lora"):
        assert (out / "merges" / family / "ties" / "config.json").exists()


def test_study_reuses_unchanged_experts(tmp_path, tiny_base):
    from graftkit.eval.study import run_study

    recipe = study_recipe(tmp_path, tiny_base, merges=[])
    run_study(recipe, progress=False)
    again = run_study(recipe, progress=False)
    experts = [m for m in again["models"] if m["kind"] == "expert"]
    assert experts and all(m.get("cached") for m in experts)


def test_failing_family_is_reported_and_the_rest_continues(tmp_path, tiny_base):
    from graftkit.eval.study import run_study

    recipe = study_recipe(tmp_path, tiny_base, experts=[
        {"family": "broken", "method": {"method": "lora", "r": 2, "targets": ["no_such_layer"]}},
        {"family": "full", "method": {"method": "full"}, "optim": {"lr": 3e-3, "batch_size": 16, "epochs": 1}}],
        merges=[{"method": "linear"}])
    result = run_study(recipe, progress=False)
    failed = {(f["stage"], f["model"]) for f in result["failures"]}
    assert failed == {("train", "broken/topic"), ("train", "broken/mood")}
    assert "no_such_layer" in result["failures"][0]["error"]
    assert "full/linear" in result["scores"]
    html = (tmp_path / "study" / "report.html").read_text()
    assert "broken/topic" in html and "no_such_layer" in html


def test_split_discipline_refuses_overlapping_test_and_tuning_examples(tmp_path, tiny_base):
    from graftkit.eval.study import check_disjoint, run_study

    check_disjoint("t", {"train": ["a b"], "validation": ["c d"], "test": ["e f"]})
    with pytest.raises(GraftError, match="test example also appears in validation"):
        check_disjoint("t", {"train": ["a b"], "validation": ["c d"], "test": ["C  d"]})
    with pytest.raises(GraftError, match="test example also appears in train"):  # VADER-style variants
        check_disjoint("t", {"train": ["Damn! we lost power."], "validation": [], "test": ["DAMN!! We lost power!!"]})
    recipe = study_recipe(tmp_path, tiny_base)
    files = recipe["tasks"][0]["files"]
    leaked = Path(files["validation"]).read_text().splitlines()[0]
    with open(files["test"], "a") as f:
        f.write(leaked + "\n")
    with pytest.raises(GraftError, match="must not overlap"):
        run_study(recipe, progress=False)
    assert not (tmp_path / "study" / "experts").exists()  # refused before any training


def test_study_splits_of_a_corpus_are_disjoint(tmp_path):
    """The packaged-corpus path: stratified, deduplicated splits never share a text."""
    from graftkit.data import rotten_tomatoes, stratified_split

    train, val, test = stratified_split(rotten_tomatoes(), [300, 80, 200], seed=0)
    texts = [{t for t, _ in part} for part in (train, val, test)]
    assert not (texts[0] & texts[2]) and not (texts[1] & texts[2]) and not (texts[0] & texts[1])


@pytest.mark.parametrize("change, message", [
    ({"tasks": []}, "tasks is empty"),
    ({"experts": []}, "experts is empty"),
    ({"merges": [{"method": "ties", "parameters": {"density": 1.5}}]}, "density 1.5 is out of range"),
    ({"merges": [{"method": "no_such"}]}, "unknown merge method 'no_such'"),
    ({"merges": [{"method": "linear"}, {"method": "linear"}]}, "appears twice"),
    ({"tasks": [{"name": "x", "corpus": "nope"}]}, "unknown corpus 'nope'"),
    ({"tasks": [{"name": "x", "corpus": "bbc_news", "files": {}}]}, "either corpus"),
    ({"colour": "red"}, "unknown key 'colour'"),
])
def test_bad_study_recipes_are_one_line_errors(tmp_path, tiny_base, change, message):
    from graftkit.eval.study import load_study

    recipe = study_recipe(tmp_path, tiny_base, **change)
    with pytest.raises(ConfigError, match=message) as info:
        load_study(recipe)
    assert "\n" not in str(info.value)


def test_graft_study_cli_bad_recipe_exits_2(tmp_path):
    bad = tmp_path / "study.yaml"
    bad.write_text("base: minilm\ntasks: []\nexperts: []\n")
    r = subprocess.run([sys.executable, "-m", "graftkit.cli", "study", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "tasks is empty" in r.stderr


def test_demo_recipe_is_a_valid_study():
    import yaml

    from graftkit.demo import demo_recipe
    from graftkit.eval.study import load_study

    cfg = load_study(yaml.safe_load(demo_recipe()))
    assert [t.name for t in cfg.tasks] == ["bbc", "rotten", "tweets", "amazon"]
    assert {e.family for e in cfg.experts} == {"full", "lora"}
    assert [m.method for m in cfg.merges] == ["linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs", "pcb", "consensus_ties"]
    full = load_study(yaml.safe_load(Path("examples/study_full.yaml").read_text()))
    assert [m.method for m in full.merges] == [m.method for m in cfg.merges]
