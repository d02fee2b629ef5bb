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
    recipe["merges"].append({"method": "regmean", "data": {"examples": 16}})  # data-aware: each expert's own train split
    recipe["merges"].append({"method": "adamerging", "parameters": {"steps": 3}, "data": {"split": "validation", "examples": 8}})
    recipe["merges"].append({"method": "lorahub", "parameters": {"budget": 4}, "data": {"split": "validation", "examples": 8}})
    result = run_study(recipe, progress=False)
    out = tmp_path / "study"
    # lorahub composes LoRA adapters: the full family's experts are refused with one line, the study goes on
    assert [(f["stage"], f["model"]) for f in result["failures"]] == [("merge", "full/lorahub")], result["failures"]
    assert "lorahub combines LoRA adapters" in result["failures"][0]["error"]
    assert set(result["scores"]["lora/lorahub"]) == {"topic", "mood"}
    names = [m["name"] for m in result["models"]]
    for family in ("full", "lora"):
        for model in ("base", "topic", "mood", "linear", "task_arithmetic", "ties", "regmean", "adamerging"):
            assert f"{family}/{model}" in names
            assert set(result["scores"][f"{family}/{model}"]) == {"topic", "mood"}
    # the experts learned their own task (keywords make it easy) and the chosen lambda is a grid value
    assert result["scores"]["full/topic"]["topic"] > 0.8 and result["scores"]["full/mood"]["mood"] > 0.8
    ta = next(m for m in result["models"] if m["name"] == "full/task_arithmetic")
    assert ta["params"]["lambda"] in (0.5, 1.0) and len(ta["search"]) == 2 and sum(t["chosen"] for t in ta["search"]) == 1
    # normalized accuracy is merge / expert, flips count against the task's expert
    norm = result["normalized"]["full/ties"]["topic"]
    assert norm == pytest.approx(result["scores"]["full/ties"]["topic"] / result["scores"]["full/topic"]["topic"])
    # every expert was checked; a merge's normalized score is meaningful exactly where its task's expert passed
    assert set(result["expert_checks"]) == {f"{f}/{t}" for f in ("full", "lora") for t in ("topic", "mood")}
    for name in result["normalized"]:
        family = name.split("/")[0]
        ok = {t for t in ("topic", "mood") if not result["expert_checks"][f"{family}/{t}"]["flagged"]}
        assert set(result["normalized"][name]) == ok
        assert set(result["normalized_not_meaningful"].get(name, {})) == {"topic", "mood"} - ok
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
    ({"experts": [{"family": "f", "search": {"epochs": [1, 2]}}]}, "search supports lr only"),
    ({"experts": [{"family": "f", "search": {"lr": []}}]}, "search.lr is empty"),
    ({"experts": [{"family": "f", "search": {"lr": [1e-4, -1e-3]}}]}, "value -0.001 is not a positive learning rate"),
    ({"experts": [{"family": "f", "search": {"lr": [1e-4, float("nan")]}}]}, "value nan is not a positive learning rate"),
    ({"experts": [{"family": "f", "search": {"lr": [1e-4, 1e-4]}}]}, "value 0.0001 appears twice"),
    ({"experts": [{"family": "f", "optim": {"lr": 1e-3}, "search": {"lr": [1e-4, 3e-4]}}]}, "search.lr and optim.lr are both given"),
    ({"experts": [{"family": "f", "search": {"lr": ["fast"]}}]}, "search"),
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


# -- study guards: experts that did not learn their task, the learning-rate search ----------------

def write_noise_task(folder: Path, seed: int, sizes=(64, 16, 48)) -> dict[str, str]:
    """A task nothing can learn: filler-word texts whose labels ignore them, two thirds 'yes' in
    every split. Its expert can do no better than the majority class (as the expert of section 9
    of issue 11 did, at 0.642 = the majority share)."""
    rng = random.Random(seed)
    files, seen = {}, set()
    for split, n in zip(("train", "validation", "test"), sizes):
        rows = []
        while len(rows) < n:
            text = " ".join(rng.choice(FILLER) for _ in range(7))
            if text not in seen:
                seen.add(text)
                rows.append({"text": text, "label": "yes" if len(rows) % 3 else "no"})
        path = folder / "noise" / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files[split] = str(path)
    return files


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, tiny_base):
    """One tiny study, run once for the tests below: a learnable task (topic) and an unlearnable
    one (noise), full experts with the learning rate searched over two values on validation, two
    merges. 48 test examples per task, so a learned expert is significantly above the majority."""
    from graftkit.eval.study import run_study

    tmp = tmp_path_factory.mktemp("guarded")
    data = tmp / "data"
    recipe = study_recipe(tmp, tiny_base, name="guarded",
                          tasks=[{"name": "topic", "files": write_task(data, "topic", 1, sizes=(64, 16, 48)), "max_length": 16},
                                 {"name": "noise", "files": write_noise_task(data, 3), "max_length": 16}],
                          experts=[{"family": "full", "method": {"method": "full"}, "search": {"lr": [1e-5, 1e-2]},
                                    "optim": {"batch_size": 16, "epochs": 12}}],
                          merges=[{"method": "linear"}, {"method": "task_arithmetic", "parameters": {"lambda": 1.0}}])
    return run_study(recipe, progress=False), tmp / "study"


def test_expert_at_the_majority_class_is_flagged_and_a_learned_one_is_not(guarded):
    result, out = guarded
    assert result["failures"] == []
    checks = result["expert_checks"]
    noise, topic = checks["full/noise"], checks["full/topic"]
    majority = {t["name"]: t["majority"] for t in result["tasks"]}
    assert noise["flagged"] and noise["score"] == result["scores"]["full/noise"]["noise"]
    assert noise["majority"]["score"] == majority["noise"] and noise["majority"]["p_value"] >= noise["level"]
    assert not noise["majority"]["above"]
    line = noise["reasons"][0]
    assert line.startswith("full/noise is not significantly above the majority class on noise: ")
    assert f"accuracy {noise['score']:.3f} vs majority class {majority['noise']:.3f}" in line
    assert f"p = {noise['majority']['p_value']:.3g}" in line
    # the learned expert passes both checks
    assert not topic["flagged"] and topic["reasons"] == []
    assert topic["majority"]["above"] and topic["majority"]["p_value"] < topic["level"]
    assert topic["base"]["above"] and topic["base"]["name"] == "full/base" and topic["base"]["low"] > 0
    assert topic["base"]["score"] == result["scores"]["full/base"]["topic"]
    assert json.loads((out / "study.json").read_text())["expert_checks"] == json.loads(json.dumps(checks))


def test_normalized_scores_against_a_flagged_expert_are_not_meaningful(guarded):
    result, out = guarded
    scores = result["scores"]
    for merge in ("full/linear", "full/task_arithmetic"):
        assert set(result["normalized"][merge]) == {"topic"}
        assert result["normalized"][merge]["topic"] == pytest.approx(scores[merge]["topic"] / scores["full/topic"]["topic"])
        nm = result["normalized_not_meaningful"][merge]["noise"]
        assert nm["expert"] == "full/noise" and "majority class" in nm["reason"]
        assert nm["value"] == pytest.approx(scores[merge]["noise"] / scores["full/noise"]["noise"])
    # the report: a banner, the warning line, n/m cells, and the best merge chosen on topic alone
    page, md = (out / "report.html").read_text(), (out / "report.md").read_text()
    assert "1 expert(s) did not learn their own task: full/noise" in page
    assert "Warning: full/noise is not significantly above the majority class on noise" in md
    assert "n/m †" in page and "n/m †" in md
    best = max(("full/linear", "full/task_arithmetic"), key=lambda m: result["normalized"][m]["topic"])
    assert f"full: {best} ({result['normalized'][best]['topic']:.3f}, without noise (n/m))" in md


def test_expert_learning_rate_is_chosen_on_validation(guarded):
    result, out = guarded
    experts = {m["name"]: m for m in result["models"] if m["kind"] == "expert"}
    for name in ("full/topic", "full/noise"):
        trials = experts[name]["search"]
        assert [t["params"]["lr"] for t in trials] == [1e-5, 1e-2] and sum(t["chosen"] for t in trials) == 1
        chosen = next(t for t in trials if t["chosen"])
        assert chosen["validation"] == max(t["validation"] for t in trials)
        assert experts[name]["lr"] == chosen["params"]["lr"]
        for lr in ("1e-05", "0.01"):
            assert (out / "experts" / name / f"lr-{lr}" / "study_key.txt").is_file()
    # the topic keywords are learned at 1e-2 and not at 1e-5 in 48 steps: validation picks 1e-2,
    # and the test scores are the chosen expert's
    assert experts["full/topic"]["lr"] == 1e-2
    evaluated = json.loads((out / "eval" / "full" / "topic" / "results.json").read_text())
    # full fine-tuning's dense delta is a merge input: the expert is scored as base + its adapter, no merged export
    assert evaluated["model"]["adapter"].endswith(str(Path("full", "topic", "lr-0.01", "adapter")))
    md = (out / "report.md").read_text()
    assert "full/topic: 2 trial(s), chosen lr=0.01" in md
    assert "| full/topic | topic | 0.01 (chosen on validation from 1e-05, 0.01) |" in md


def test_check_expert_tests_and_levels():
    """The two tests and their one-sided level, on hand-made per-example scores."""
    from graftkit.eval.study import check_expert

    n = 48
    majority = [1.0] * 32 + [0.0] * 16  # the majority-class predictor: right on the 2/3 majority
    # at the majority class: flagged by both tests
    c = check_expert("f/t", "t", majority, 32 / 48, majority, base_name="f/base")
    assert c["flagged"] and not c["majority"]["above"] and not c["base"]["above"] and len(c["reasons"]) == 2
    # 40 of 48 right, base 26 of 48 (nested): above both
    good = [1.0] * 40 + [0.0] * 8
    base = [1.0] * 26 + [0.0] * 22
    c = check_expert("f/t", "t", good, 32 / 48, base, base_name="f/base")
    assert not c["flagged"] and c["majority"]["above"] and c["base"]["above"]
    # far above the majority class but no better than the base: flagged by the base test alone
    c = check_expert("f/t", "t", good, 0.5, good, base_name="f/base")
    assert c["flagged"] and c["majority"]["above"] and not c["base"]["above"]
    assert c["reasons"] == ["f/t is not significantly above f/base on t: accuracy 0.833 vs 0.833 (difference +0.000, "
                            "95% paired bootstrap interval [+0.000, +0.000], p = 1)"]
    # above the base by one example: the interval still touches 0, so not significantly above
    c = check_expert("f/t", "t", good, 0.5, [1.0] * 39 + [0.0] * 9, base_name="f/base")
    assert c["base"]["diff"] > 0 and c["base"]["low"] == 0 and c["flagged"] and not c["base"]["above"]
    # one-sided at (1 - confidence) / 2: 30 of 48 against 0.5 has p = 0.056 (flagged at 0.95 and at 0.9),
    # 32 of 48 has p = 0.0147 (passes at 0.95: 0.0147 < 0.025; flagged at 0.98: level 0.01); 31 of 48 has
    # p = 0.0297, which a two-sided reading of 0.95 (0.05) would pass and the one-sided 0.025 flags
    c30 = [1.0] * 30 + [0.0] * 18
    assert check_expert("f/t", "t", c30, 0.5)["flagged"]
    assert check_expert("f/t", "t", c30, 0.5, confidence=0.9)["flagged"]
    c32 = [1.0] * 32 + [0.0] * 16
    assert not check_expert("f/t", "t", c32, 0.5)["flagged"]
    assert check_expert("f/t", "t", c32, 0.5, confidence=0.98)["flagged"]
    assert check_expert("f/t", "t", c32, 0.5)["majority"]["p_value"] == pytest.approx(0.0146525, abs=1e-6)
    assert check_expert("f/t", "t", [1.0] * 31 + [0.0] * 17, 0.5)["flagged"]
    with pytest.raises(GraftError, match="must be a non-empty list of 0/1"):
        check_expert("f/t", "t", [0.5] * n, 0.5)


def test_binomial_tail_is_exact():
    from fractions import Fraction
    from math import comb

    from graftkit.eval.compare import binomial_tail

    for k, n, p in [(0, 5, Fraction(3, 10)), (3, 5, Fraction(3, 10)), (5, 5, Fraction(3, 10)), (16, 24, Fraction(2, 3)),
                    (20, 24, Fraction(29, 50)), (120, 200, Fraction(1, 2))]:
        exact = sum(comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))
        assert binomial_tail(k, n, float(p)) == pytest.approx(float(exact), rel=1e-9)
    assert binomial_tail(3, 5, 1.0) == 1.0 and binomial_tail(3, 5, 0.0) == 0.0
    assert 0 < binomial_tail(9000, 10000, 0.899) < 0.5  # no overflow at large n
    with pytest.raises(GraftError, match="0 <= successes <= n"):
        binomial_tail(6, 5, 0.5)


def test_a_failed_learning_rate_candidate_is_recorded_and_the_others_compete(tmp_path, tiny_base, monkeypatch):
    """No training here: train_one and the validation scoring are replaced, so only the search
    bookkeeping runs (a failed candidate, a validation tie that goes to the first listed lr)."""
    from rich.console import Console

    from graftkit.eval.study import Study, load_study

    recipe = study_recipe(tmp_path, tiny_base, merges=[],
                          experts=[{"family": "full", "search": {"lr": [1e-5, 1e-3, 1e-2]}, "optim": {"epochs": 1}}])
    study = Study(load_study(recipe), tmp_path / "study", console=Console(quiet=True))
    study.prepare_data()

    def train_one(family, task, lr, label):
        if lr == 1e-5:
            raise FloatingPointError("loss is NaN at step 3")
        folder = tmp_path / "fake" / task.name / f"{lr:g}"
        (folder / "merged").mkdir(parents=True, exist_ok=True)
        return folder, {"lr": lr, "final_loss": 0.1}

    monkeypatch.setattr(study, "train_one", train_one)
    monkeypatch.setattr(study, "expert_validation", lambda task, folder, label: 0.75)  # a tie
    study.train_experts()
    experts = {m["name"]: m for m in study.result["models"] if m["kind"] == "expert"}
    assert set(experts) == {"full/topic", "full/mood"}
    trials = experts["full/topic"]["search"]
    assert [t["params"]["lr"] for t in trials] == [1e-5, 1e-3, 1e-2]
    assert trials[0] == {"params": {"lr": 1e-5}, "validation": None, "chosen": False, "failed": "train"}
    assert [t["chosen"] for t in trials] == [False, True, False]  # the tie goes to the first listed that trained
    assert experts["full/topic"]["lr"] == 1e-3
    assert study.experts["full"]["topic"]["input"] == tmp_path / "fake" / "topic" / "0.001" / "merged"
    assert {(f["stage"], f["model"]) for f in study.result["failures"]} == {("train", "full/topic lr=1e-05"),
                                                                             ("train", "full/mood lr=1e-05")}
    assert "loss is NaN" in study.result["failures"][0]["error"]
