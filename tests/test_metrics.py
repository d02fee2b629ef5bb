"""Metrics: hand-computed values, edge cases and bad inputs (pure functions, no models)."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from graftkit.errors import EvalError
from graftkit.eval.metrics import (METRICS, accuracy, exact_match, expected_calibration_error, higher_is_better, macro_f1,
                                   normalize_answer, pass_at_k, perplexity)


# -- accuracy / macro-F1 ---------------------------------------------------------------------------

def test_accuracy_lists_arrays_and_tensors():
    assert accuracy(["a", "b", "c", "a"], ["a", "b", "b", "b"]) == 0.5
    assert accuracy(np.array([0, 1, 2]), torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    assert accuracy([1, 2], ["1", "2"]) == 1.0  # mixed int / str labels compare as text


@pytest.mark.parametrize("pred,gold,msg", [([1, 2], [1], "2 predictions but 1 gold"), ([], [], "empty"),
                                           ([[1, 2]], [[1, 2]], "1-D")])
def test_accuracy_bad_input(pred, gold, msg):
    with pytest.raises(EvalError, match=msg):
        accuracy(pred, gold)


def test_macro_f1_by_hand_with_an_absent_label():
    pred, gold = ["a", "a", "b", "b"], ["a", "b", "b", "b"]
    # a: TP 1, FP 1, FN 0 -> 2/3;  b: TP 2, FP 0, FN 1 -> 4/5;  c: never predicted, never gold -> skipped
    assert macro_f1(pred, gold) == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert macro_f1(pred, gold, labels=["a", "b", "c"]) == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_macro_f1_gold_label_never_predicted_scores_zero():
    # a: TP 1, FP 1 -> 2/3; b: in gold, never predicted -> 0
    assert macro_f1(["a", "a"], ["a", "b"]) == pytest.approx(1 / 3)
    assert macro_f1([0, 1, 2], [0, 1, 2]) == 1.0


def test_macro_f1_bad_labels():
    with pytest.raises(EvalError, match="none of the given labels"):
        macro_f1(["a"], ["a"], labels=["x"])
    with pytest.raises(EvalError, match="labels is empty"):
        macro_f1(["a"], ["a"], labels=[])


# -- ECE -------------------------------------------------------------------------------------------

def test_ece_worked_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.55, 0.45], [0.4, 0.6]])
    gold = np.array([0, 1, 1, 0, 0])
    # 4 bins of width .25. (.75, 1]: conf .9 (right), .8 (wrong): acc .5, conf .85 -> 2/5 * .35 = .14
    # (.5, .75]: conf .7 (right), .55 (right), .6 (wrong): acc 2/3, conf 1.85/3 -> 3/5 * .05 = .03
    assert expected_calibration_error(probs, gold, n_bins=4) == pytest.approx(0.17)
    assert expected_calibration_error(torch.tensor(probs), torch.tensor(gold), n_bins=4) == pytest.approx(0.17)


def test_ece_bins_are_closed_on_the_right_and_perfect_calibration_is_zero():
    # conf .5 belongs to (0, .5], conf .6 to (.5, 1]: each bin alone -> (1 - .5)/2 + (.6 - 0)/2
    assert expected_calibration_error([[0.5, 0.5], [0.6, 0.4]], [0, 1], n_bins=2) == pytest.approx(0.55)
    assert expected_calibration_error([[0.75, 0.25]] * 4, [0, 0, 0, 1], n_bins=10) == pytest.approx(0.0)


@pytest.mark.parametrize("probs,gold,msg", [([0.2, 0.8], [1], "N x C"), ([[0.2, 0.8]], [2], r"class indices in \[0, 2\)"),
                                            ([[2.0, -1.0]], [0], "softmax"), ([[0.2, 0.8]], [0, 1], "one gold index")])
def test_ece_bad_input(probs, gold, msg):
    with pytest.raises(EvalError, match=msg):
        expected_calibration_error(probs, gold)
    with pytest.raises(EvalError, match="n_bins"):
        expected_calibration_error([[0.2, 0.8]], [1], n_bins=0)


# -- answers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,kw,want", [
    ("  The Answer!  ", {}, "the answer"),
    ("The answer, a cat.", {"strip_articles": True}, "answer cat"),
    ("Hello,   World", {"lower": False}, "Hello World"),
    ("a  b", {"collapse_space": False, "strip_punct": False}, "a  b"),
    ("1,000", {"number": True}, "1000"),
    ("1,000,000 dollars.", {"number": True}, "1000000 dollars"),
    ("3.0", {"number": True}, "3"),
    ("3.0", {}, "30"),  # without number, a decimal point is punctuation like any other
    ("-2.50 apples", {"number": True}, "-2.5 apples"),
    ("#### 007.", {"number": True}, "7"),
    ("12345678901234567890.000", {"number": True}, "12345678901234567890"),
    (None, {}, ""),
])
def test_normalize_answer(text, kw, want):
    assert normalize_answer(text, **kw) == want


def test_exact_match():
    assert exact_match("The cat.", "the cat")
    assert not exact_match("the cat", "cat")
    assert exact_match("the cat", "cat", strip_articles=True)
    assert exact_match("$1,000", "1000.00", number=True)
    assert not exact_match("$1,000", "1000.00")
    assert exact_match("Paris", ["London", "paris"])


# -- pass@k ----------------------------------------------------------------------------------------

def _pass_at_k_comb(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))  # comb(m, k) is 0 for m < k


def test_pass_at_k_matches_the_binomial_formula():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(_pass_at_k_comb(n, c, k)), abs=1e-12), (n, c, k)
    # large n: no overflow, still exact to float precision
    assert pass_at_k(200, 10, 100) == pytest.approx(float(_pass_at_k_comb(200, 10, 100)), rel=1e-12)


def test_pass_at_k_edges():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 8, 3) == 1.0  # n - c = 2 < k: every draw of 3 holds a pass
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # pass@1 is c/n
    with pytest.raises(EvalError, match="k=6 is larger than the 5 samples"):
        pass_at_k(5, 1, 6)
    for args in ((5, 6, 1), (0, 0, 1), (5, 1, 0), (5.0, 1, 1), (True, 1, 1)):
        with pytest.raises(EvalError):
            pass_at_k(*args)


# -- perplexity / registry -------------------------------------------------------------------------

def test_perplexity():
    assert perplexity(10 * math.log(4), 10) == pytest.approx(4.0)
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(EvalError, match="at least one scored token"):
        perplexity(1.0, 0)
    with pytest.raises(EvalError, match="NaN"):
        perplexity(float("nan"), 3)


def test_registry_and_direction():
    assert METRICS.names() == sorted(["accuracy", "macro_f1", "ece", "exact_match", "pass@k", "perplexity"])
    assert METRICS.get("ece") is expected_calibration_error
    assert METRICS.get("pass@k") is pass_at_k
    assert higher_is_better("accuracy") and higher_is_better("pass@5")
    assert not higher_is_better("perplexity") and not higher_is_better("ece")
