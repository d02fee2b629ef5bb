"""Evaluation metrics: pure functions, array-likes (lists, numpy arrays, torch tensors) in, floats out.

- accuracy: ``mean(pred == gold)``.
- macro-F1: the unweighted mean over labels of ``F1_l = 2 TP_l / (2 TP_l + FP_l + FN_l)``;
  a label that is neither predicted nor in gold is skipped, a gold label never predicted
  scores 0.
- expected calibration error (Guo et al., 2017, "On Calibration of Modern Neural Networks"):
  confidences ``max_c p_ic`` fall into ``M`` equal-width bins ``((m-1)/M, m/M]`` and
  ``ECE = sum_m |B_m|/N * |acc(B_m) - conf(B_m)|``.
- exact match after answer normalisation (SQuAD-style lower-casing, punctuation and article
  stripping, plus optional number canonicalisation: ``"1,000" -> "1000"``, ``"3.0" -> "3"``).
- pass@k (Chen et al., 2021, "Evaluating Large Language Models Trained on Code"): the
  unbiased estimator ``1 - C(n-c, k) / C(n, k)`` from ``n`` samples of which ``c`` pass,
  computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` so no binomial coefficient overflows.
- perplexity: ``exp(sum NLL / tokens)``.

Nothing here reads files or models; every function validates its inputs and raises a
one-line :class:`~graftkit.errors.EvalError` on bad ones. :data:`METRICS` names them.
"""
from __future__ import annotations

import math
import re
import string
from typing import Any, Sequence

import numpy as np

from ..errors import EvalError
from ..registry import Registry

METRICS: Registry = Registry("metric")

# Metrics where a smaller value is the better model; everything else is higher-is-better.
LOWER_IS_BETTER = frozenset({"ece", "perplexity", "nll"})


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` (a METRICS name or e.g. ``"pass@5"``) is better."""
    return metric not in LOWER_IS_BETTER


def _array(x: Any, what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == object:  # a list of strings with None, mixed types: compare as strings
        arr = np.asarray([str(v) for v in arr.ravel()]).reshape(arr.shape)
    return arr


def _pair(pred: Any, gold: Any) -> tuple[np.ndarray, np.ndarray]:
    p, g = _array(pred, "pred"), _array(gold, "gold")
    if p.ndim != 1 or g.ndim != 1:
        raise EvalError(f"predictions and gold labels must be 1-D sequences, got shapes {p.shape} and {g.shape}")
    if len(p) != len(g):
        raise EvalError(f"{len(p)} predictions but {len(g)} gold labels; give one prediction per example")
    if len(p) == 0:
        raise EvalError("no examples to score; the evaluation set is empty")
    if p.dtype.kind != g.dtype.kind and {p.dtype.kind, g.dtype.kind} & {"U", "S"}:
        p, g = p.astype(str), g.astype(str)  # "1" vs 1: compare as text rather than never matching
    return p, g


@METRICS.register("accuracy")
def accuracy(pred: Any, gold: Any) -> float:
    """Fraction of examples with ``pred == gold``."""
    p, g = _pair(pred, gold)
    return float(np.mean(p == g))


@METRICS.register("macro_f1")
def macro_f1(pred: Any, gold: Any, labels: Sequence | None = None) -> float:
    """Unweighted mean of per-label F1 = 2TP / (2TP + FP + FN).

    ``labels`` defaults to every label seen in ``pred`` or ``gold``. A label with no
    predicted and no gold example has an undefined F1 and is skipped; a gold label that is
    never predicted has F1 0 (and so does a predicted label absent from gold).
    """
    p, g = _pair(pred, gold)
    if labels is None:
        universe = np.unique(np.concatenate([p, g]))
    else:
        universe = _array(list(labels), "labels")
        if p.dtype.kind != universe.dtype.kind and {p.dtype.kind, universe.dtype.kind} & {"U", "S"}:
            universe, p, g = universe.astype(str), p.astype(str), g.astype(str)
        if len(universe) == 0:
            raise EvalError("macro_f1: labels is empty; give the label set or leave it out")
    # one-hot (N x L) membership, then per-label counts in one reduction each
    pm = p[:, None] == universe[None, :]
    gm = g[:, None] == universe[None, :]
    tp = np.sum(pm & gm, axis=0)
    fp = np.sum(pm & ~gm, axis=0)
    fn = np.sum(~pm & gm, axis=0)
    denom = 2 * tp + fp + fn
    present = denom > 0
    if not present.any():
        raise EvalError("macro_f1: none of the given labels occurs in the predictions or gold labels")
    return float(np.mean(2 * tp[present] / denom[present]))


@METRICS.register("ece")
def expected_calibration_error(probs: Any, gold: Any, n_bins: int = 15) -> float:
    """Expected calibration error (Guo et al., 2017) with ``n_bins`` equal-width bins on [0, 1].

    ``probs`` is N x C (rows are class probabilities), ``gold`` the N gold class indices.
    Confidence is the top probability and accuracy whether its class is the gold one. Bin m
    holds confidences in ((m-1)/M, m/M] (a confidence of exactly 0 goes to the first bin);
    ``ECE = sum_m |B_m|/N * |acc(B_m) - conf(B_m)| = (1/N) sum_m |sum_{i in B_m} (correct_i - conf_i)|``.
    """
    pr = _array(probs, "probs").astype(np.float64)
    g = _array(gold, "gold")
    if pr.ndim != 2:
        raise EvalError(f"ece: probs must be N x C class probabilities, got shape {pr.shape}")
    if g.ndim != 1 or len(g) != len(pr):
        raise EvalError(f"ece: {len(pr)} probability rows but gold has shape {g.shape}; give one gold index per row")
    if len(g) == 0:
        raise EvalError("no examples to score; the evaluation set is empty")
    if g.dtype.kind not in "iu" or g.min() < 0 or g.max() >= pr.shape[1]:
        raise EvalError(f"ece: gold must hold class indices in [0, {pr.shape[1]}); map labels to indices first")
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise EvalError(f"ece: n_bins must be a positive integer, got {n_bins!r}")
    if not np.isfinite(pr).all() or pr.min() < 0 or pr.max() > 1 + 1e-6:
        raise EvalError("ece: probs must be probabilities in [0, 1] (apply softmax to logits first)")
    conf = pr.max(axis=1)
    correct = (pr.argmax(axis=1) == g).astype(np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    gap = np.bincount(bins, weights=correct - conf, minlength=n_bins)
    return float(np.abs(gap).sum() / len(g))


_ARTICLES = re.compile(r"\b(a|an|the)\b", re.IGNORECASE)
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w])")
_PUNCT = re.escape(string.punctuation)
_ALL_PUNCT = re.compile(f"[{_PUNCT}]")
# with number=True: keep a decimal point between digits and a minus sign that starts a number
_PUNCT_KEEP_NUMBERS = re.compile(rf"(?!(?<=\d)\.(?=\d))(?!(?<![\w])-(?=\d))[{_PUNCT}]")


def _canonical_number(match: re.Match) -> str:
    # textual, not via float: "12345678901234567890" must not turn into 1.2345678901234567e+19
    text = match.group(0)
    negative = text.startswith("-")
    whole, _, frac = text.lstrip("-").partition(".")
    out = (whole.lstrip("0") or "0") + ("." + frac.rstrip("0") if frac.rstrip("0") else "")
    return "-" + out if negative and out != "0" else out


def normalize_answer(text: str, *, lower: bool = True, strip_punct: bool = True, strip_articles: bool = False,
                     collapse_space: bool = True, number: bool = False) -> str:
    """Normalise a short answer before exact-match comparison (SQuAD-style, Rajpurkar et al., 2016).

    Steps, in order: lower-case; with ``number``, drop thousands separators (``1,000`` ->
    ``1000``) and write each number canonically (``3.0`` -> ``3``, ``2.50`` -> ``2.5``,
    ``007`` -> ``7``); remove punctuation (with ``number``, a decimal point between digits
    and a leading minus sign survive); remove the articles a/an/the; collapse runs of
    whitespace to one space and strip the ends.
    """
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    if lower:
        text = text.lower()
    if number:
        text = _THOUSANDS.sub("", text)
        text = _NUMBER.sub(_canonical_number, text)
    if strip_punct:
        text = (_PUNCT_KEEP_NUMBERS if number else _ALL_PUNCT).sub("", text)
    if strip_articles:
        text = _ARTICLES.sub(" ", text)
    if collapse_space:
        text = " ".join(text.split())
    return text


@METRICS.register("exact_match")
def exact_match(pred: str, ref: str | Sequence[str], **norm: Any) -> bool:
    """Whether ``pred`` equals ``ref`` (or any of several references) after :func:`normalize_answer`."""
    refs = [ref] if isinstance(ref, str) or ref is None else list(ref)
    p = normalize_answer(pred, **norm)
    return any(p == normalize_answer(r, **norm) for r in refs)


@METRICS.register("pass@k")
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate (Chen et al., 2021) from ``n`` samples of which ``c`` pass.

    ``pass@k = 1 - C(n-c, k) / C(n, k)``: the probability that at least one of ``k`` samples
    drawn without replacement from the ``n`` passes. Computed as
    ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``; it is exactly 1 when ``n - c < k`` (every draw of
    ``k`` contains a passing sample).
    """
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise EvalError(f"pass@k: {name} must be an integer, got {v!r}")
    if n < 1 or not 0 <= c <= n:
        raise EvalError(f"pass@k: need n >= 1 samples and 0 <= c <= n passing, got n={n}, c={c}")
    if k < 1:
        raise EvalError(f"pass@k: k must be >= 1, got {k}")
    if k > n:
        raise EvalError(f"pass@k: k={k} is larger than the {n} samples drawn; sample at least k per problem or lower k")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


@METRICS.register("perplexity")
def perplexity(nll_sum: float, n_tokens: int) -> float:
    """``exp(nll_sum / n_tokens)``: the exponentiated mean negative log-likelihood per token (nats)."""
    if n_tokens <= 0:
        raise EvalError(f"perplexity: need at least one scored token, got {n_tokens}; are the texts empty?")
    mean = float(nll_sum) / float(n_tokens)
    if math.isnan(mean):
        raise EvalError("perplexity: the summed NLL is NaN; the model produced non-finite logits")
    try:
        return math.exp(mean)
    except OverflowError:
        return math.inf
