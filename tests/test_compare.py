"""Model comparison: flips, paired bootstrap, forgetting, normalized scores, and `graft compare` on hand-written folders."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from graftkit.cli import main
from graftkit.errors import EvalError
from graftkit.eval import compare as cmp
from graftkit.eval.compare import flips, forgetting, normalized_score, paired_bootstrap


# -- pure functions --------------------------------------------------------------------------------

def test_flips_by_hand():
    ref = [1, 1, 0, 0, 1, 0]
    new = [0, 1, 1, 0, 1, 1]
    assert flips(ref, new) == {"negative": 1, "positive": 2, "n": 6}
    assert flips(np.array(ref, dtype=float), np.array(ref)) == {"negative": 0, "positive": 0, "n": 6}
    with pytest.raises(EvalError, match="binary"):
        flips([0.5, 1], [1, 1])
    with pytest.raises(EvalError, match="3 vs 2 examples"):
        flips([1, 0, 1], [1, 0])
    with pytest.raises(EvalError, match="no examples"):
        flips([], [])


def test_bootstrap_identical_inputs_is_a_tie_with_zero_diff():
    a = np.random.default_rng(1).integers(0, 2, 100)
    res = paired_bootstrap(a, a.copy(), resamples=2000)
    assert res == {"diff": 0.0, "low": 0.0, "high": 0.0, "p_value": 1.0, "verdict": "tie"}


def test_bootstrap_clear_difference_is_a_win_and_reversed_a_loss():
    a = np.array([1] * 180 + [0] * 20)
    b = np.array([1] * 100 + [0] * 100)
    win = paired_bootstrap(a, b, resamples=2000)
    assert win["verdict"] == "win" and win["diff"] == pytest.approx(0.4) and 0 < win["low"] < 0.4 < win["high"]
    assert win["p_value"] < 0.01
    loss = paired_bootstrap(b, a, resamples=2000)
    assert loss["verdict"] == "loss" and loss["diff"] == pytest.approx(-0.4) and loss["high"] < 0


def test_bootstrap_interval_covers_the_true_difference():
    # 60 datasets where a ~ Bernoulli(.7), b ~ Bernoulli(.6): the 90% interval should hold .1 about 90% of the time
    rng = np.random.default_rng(123)
    covered = 0
    for i in range(60):
        a = (rng.random(300) < 0.7).astype(float)
        b = (rng.random(300) < 0.6).astype(float)
        r = paired_bootstrap(a, b, resamples=500, confidence=0.9, seed=i)
        covered += r["low"] <= 0.1 <= r["high"]
        assert r["low"] <= r["diff"] <= r["high"]
    assert covered >= 48  # 80%; the expected count is 54


def test_bootstrap_is_seeded_and_chunking_keeps_it_valid(monkeypatch):
    rng = np.random.default_rng(0)
    a, b = rng.random(50), rng.random(50)
    r1 = paired_bootstrap(a, b, resamples=3000, seed=7)
    assert paired_bootstrap(a, b, resamples=3000, seed=7) == r1
    assert paired_bootstrap(a, b, resamples=3000, seed=8) != r1
    monkeypatch.setattr(cmp, "_CHUNK_ELEMENTS", 128)  # 2 resamples per chunk
    r2 = paired_bootstrap(a, b, resamples=3000, seed=7)
    assert r2["diff"] == r1["diff"] and r2["verdict"] == r1["verdict"]
    assert r2["low"] == pytest.approx(r1["low"], abs=0.03) and r2["high"] == pytest.approx(r1["high"], abs=0.03)


@pytest.mark.parametrize("kw,msg", [({"resamples": 0}, "resamples"), ({"confidence": 1.5}, "confidence"),
                                    ({"confidence": 0}, "confidence")])
def test_bootstrap_bad_arguments(kw, msg):
    with pytest.raises(EvalError, match=msg):
        paired_bootstrap([1, 0], [0, 1], **kw)
    with pytest.raises(EvalError, match="NaN"):
        paired_bootstrap([1, float("nan")], [0, 1])


def test_forgetting_and_normalized_score():
    before = {"bbc": 0.2, "rotten": 0.5, "imdb": 0.6}
    after = {"bbc": 0.9, "rotten": 0.4, "imdb": 0.65, "new": 0.3}
    got = forgetting(before, after, tuned_on={"bbc"})
    assert got.keys() == {"rotten", "imdb"}
    assert got["rotten"] == pytest.approx(-0.1) and got["imdb"] == pytest.approx(0.05)
    assert normalized_score(0.45, 0.9) == pytest.approx(0.5)
    assert math.isnan(normalized_score(0.3, 0.0))


# -- graft compare on hand-written eval folders ----------------------------------------------------

def write_run(root: Path, name: str, tasks: dict, summary: bool = False) -> Path:
    """tasks: {task: {"scores": [...], "main": ..., "kind": ..., "metrics": {...}, "ids": [...], "refs": [...]}}"""
    folder = root / name
    (folder / "predictions").mkdir(parents=True)
    results = {"model": {"name": name, "path": "minilm", "adapter": None, "head": None}, "tasks": {}, "graftkit": "0.1.0"}
    for task, t in tasks.items():
        scores = t["scores"]
        ids = t.get("ids", list(range(len(scores))))
        refs = t.get("refs", [f"label{i % 3}" for i in range(len(scores))])
        main = t.get("main", "accuracy")
        metrics = t.get("metrics", {main: float(np.mean(scores))})
        results["tasks"][task] = {"kind": t.get("kind", "classification"), "n": len(scores), "main": main,
                                  "metrics": metrics, "predictions": f"predictions/{task}.jsonl", "seconds": 0.1}
        rows = [{"id": i, "prediction": "x", "reference": r, "score": s} for i, r, s in zip(ids, refs, scores)]
        (folder / "predictions" / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "results.json").write_text(json.dumps(results))
    if summary:
        (root / "summary.json").write_text(json.dumps({"models": [name], "tasks": list(tasks), "scores": {}}))
    return folder


A_BBC = [1, 1, 1, 0, 0, 1, 0, 1, 0, 1]  # 0.6
B_BBC = [1, 1, 1, 1, 1, 0, 1, 1, 1, 1]  # 0.9: example 5 flips 1 -> 0, examples 3, 4, 6, 8 flip 0 -> 1


@pytest.fixture
def runs(tmp_path):
    a = write_run(tmp_path, "a", {"bbc": {"scores": A_BBC, "metrics": {"accuracy": 0.6, "macro_f1": 0.55}},
                                  "wiki": {"scores": [3.0, 2.5, 4.0], "main": "perplexity", "kind": "perplexity",
                                           "metrics": {"perplexity": 20.1}},
                                  "only_a": {"scores": [1, 0]}})
    b = write_run(tmp_path, "b", {"bbc": {"scores": B_BBC, "metrics": {"accuracy": 0.9, "macro_f1": 0.88}},
                                  "wiki": {"scores": [2.0, 1.5, 3.0], "main": "perplexity", "kind": "perplexity",
                                           "metrics": {"perplexity": 9.5}}})
    return tmp_path, a, b


def graft(*args) -> int:
    return main([str(a) for a in args])


def test_compare_table(runs, capsys):
    root, a, b = runs
    assert graft("compare", a, b, "--resamples", 2000) == 0
    out = capsys.readouterr().out
    assert "bbc (classification, 10 examples, main metric accuracy, higher is better)" in out
    assert "accuracy *" in out and "0.6000" in out and "0.9000" in out and "macro_f1" in out
    assert "diff B - A      +0.3000" in out
    assert "1 negative (A right, B wrong), 4 positive, of 10" in out
    assert "wiki (perplexity, 3 examples, main metric perplexity, lower is better)" in out
    assert "not compared (only in A): only_a" in out


def test_compare_json_values(runs, capsys):
    root, a, b = runs
    assert graft("compare", a, b, "--json", "--resamples", 2000, "--confidence", 0.9) == 0
    report = json.loads(capsys.readouterr().out)
    bbc, wiki = report["tasks"]["bbc"], report["tasks"]["wiki"]
    assert bbc["flips"] == {"negative": 1, "positive": 4, "n": 10}
    assert bbc["diff"] == pytest.approx(0.3) and bbc["a"]["score"] == 0.6 and bbc["b"]["score"] == 0.9
    assert bbc["low"] <= 0.3 <= bbc["high"] and report["confidence"] == 0.9
    # per-example NLL is 1.0 lower for B on every example: a certain improvement on a lower-is-better task
    assert wiki["higher_is_better"] is False and wiki["diff"] == pytest.approx(-1.0)
    assert wiki["verdict"] == "win" and wiki["flips"] is None
    assert report["skipped"]["only_a"] == ["only_a"]
    again = paired_bootstrap(B_BBC, A_BBC, resamples=2000, confidence=0.9, seed=0)
    assert {k: bbc[k] for k in again} == again


def test_compare_with_base_and_expert(runs, capsys):
    root, a, b = runs
    base = write_run(root, "base", {"bbc": {"scores": [0] * 8 + [1] * 2, "metrics": {"accuracy": 0.2}}})
    expert = write_run(root, "expert", {"bbc": {"scores": [1] * 10, "metrics": {"accuracy": 0.95}}})
    assert graft("compare", a, b, "--base", base, "--expert", f"bbc={expert}", "--json", "--resamples", 500) == 0
    bbc = json.loads(capsys.readouterr().out)["tasks"]["bbc"]
    assert bbc["base"] == {"score": 0.2, "a": pytest.approx(0.4), "b": pytest.approx(0.7)}
    assert bbc["normalized"]["a"] == pytest.approx(0.6 / 0.95) and bbc["normalized"]["b"] == pytest.approx(0.9 / 0.95)
    assert graft("compare", a, b, "--base", base, "--expert", f"bbc={expert}", "--resamples", 500) == 0
    out = capsys.readouterr().out
    assert "vs base         A +0.4000  B +0.7000  (base accuracy 0.2000)" in out
    assert "normalized      A 0.6316  B 0.9474" in out
    assert "no base score: wiki" in out


def error_of(capsys, *args) -> str:
    assert graft(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("graft: error: ") and "\n" not in err, err
    return err


def test_compare_bad_inputs(runs, capsys):
    root, a, b = runs
    assert "does not exist" in error_of(capsys, "compare", a, root / "nope")
    assert "has no results.json" in error_of(capsys, "compare", a, root / "a" / "predictions")
    evalroot = root / "evalout"
    write_run(evalroot, "m", {"bbc": {"scores": A_BBC}}, summary=True)
    assert "is a graft eval output folder; give one model folder inside it (e.g." in error_of(capsys, "compare", a, evalroot)
    other = write_run(root, "other", {"imdb": {"scores": [1, 0]}})
    assert "share no task" in error_of(capsys, "compare", a, other)
    ids = write_run(root, "ids", {"bbc": {"scores": A_BBC, "ids": list(range(1, 11))}})
    assert "id 0 is missing" in error_of(capsys, "compare", a, ids)
    short = write_run(root, "short", {"bbc": {"scores": A_BBC[:9]}})
    assert "has 9 examples" in error_of(capsys, "compare", a, short)
    refs = write_run(root, "refs", {"bbc": {"scores": A_BBC, "refs": ["other"] * 10}})
    assert "example id 0 has reference 'label0'" in error_of(capsys, "compare", a, refs)
    main_metric = write_run(root, "f1", {"bbc": {"scores": A_BBC, "main": "macro_f1"}})
    assert "main metric is 'accuracy'" in error_of(capsys, "compare", a, main_metric)
    assert "TASK=DIR" in error_of(capsys, "compare", a, b, "--expert", "bbc")
    assert "not a task both models" in error_of(capsys, "compare", a, b, "--expert", f"imdb={other}")
    assert "was not evaluated on 'bbc'" in error_of(capsys, "compare", a, b, "--expert", f"bbc={other}")
    assert "confidence" in error_of(capsys, "compare", a, b, "--confidence", "2")
    (root / "a" / "predictions" / "bbc.jsonl").write_text('{"id": 0}\n')
    assert "has no 'id' and 'score'" in error_of(capsys, "compare", a, b)
    (root / "a" / "predictions" / "bbc.jsonl").unlink()
    assert "predictions of task 'bbc'" in error_of(capsys, "compare", a, b)
    (root / "a" / "results.json").write_text("{")
    assert "is not valid JSON" in error_of(capsys, "compare", a, b)
