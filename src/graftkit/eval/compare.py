"""Compare evaluated models: paired bootstrap significance, prediction flips, forgetting, normalized scores.

- Paired bootstrap (Efron & Tibshirani, 1993; as used for NLP system comparison by Koehn,
  2004 and Berg-Kirkpatrick et al., 2012): per-example differences ``d_i = a_i - b_i`` are
  resampled with replacement ``R`` times; the ``(1-confidence)/2`` and ``(1+confidence)/2``
  quantiles of the resampled means form the percentile confidence interval of
  ``mean(a) - mean(b)``. The two-sided p-value is the share of resampled means at least as far
  from the observed mean as the observed mean is from 0 (the bootstrap distribution shifted
  to the null), ``(1 + #{|m_r - d| >= |d|}) / (1 + R)``. Verdict: ``win`` when the whole
  interval is above 0, ``loss`` when below, else ``tie``.
- Flips (regressions a model introduces although its accuracy may rise; Yan et al., 2021,
  "Positive-Congruent Training"): ``negative`` = reference right and new wrong,
  ``positive`` = the reverse, on binary per-example scores.
- Exact one-sided binomial test (:func:`binomial_tail`): whether ``k`` right of ``n`` is more
  than a fixed rate such as the majority-class share; the study uses it to flag experts that
  never learned their task.
- Forgetting: a model's score on tasks it was not tuned on minus the base model's.
- Normalized score (as in the TIES / task-arithmetic merging papers): the merged model's score
  on a task divided by that task's expert's score.

The pure functions take per-example score arrays; :func:`compare_runs` reads two ``graft eval``
model folders (``results.json`` + ``predictions/<task>.jsonl``) and checks that their examples
match by id and reference before comparing anything.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import EvalError, FileFormatError
from .metrics import higher_is_better
from ..files import read_jsonl

_CHUNK_ELEMENTS = 1 << 22  # resampled indices held at once (32 MB of int64)


def _scores(x: Any, what: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise EvalError(f"{what} must be a 1-D sequence of per-example scores, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise EvalError(f"{what} holds NaN or infinite per-example scores; fix the evaluation that wrote them")
    return arr


def _paired(a: Any, b: Any, what: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    x, y = _scores(a, f"{what} (first)"), _scores(b, f"{what} (second)")
    if len(x) != len(y):
        raise EvalError(f"{what}: {len(x)} vs {len(y)} examples; paired comparison needs the same examples in both")
    if len(x) == 0:
        raise EvalError(f"{what}: no examples to compare")
    return x, y


def flips(ref_scores: Any, new_scores: Any) -> dict[str, int]:
    """Count examples whose binary score changes: ``negative`` (ref 1 -> new 0), ``positive`` (0 -> 1), ``n``."""
    ref, new = _paired(ref_scores, new_scores, "flips")
    for arr, name in ((ref, "reference"), (new, "new")):
        if not np.isin(arr, (0.0, 1.0)).all():
            raise EvalError(f"flips need binary (0/1) per-example scores, but the {name} scores are not; "
                            "flips are defined for accuracy / exact-match tasks")
    return {"negative": int(np.sum((ref == 1) & (new == 0))), "positive": int(np.sum((ref == 0) & (new == 1))),
            "n": int(len(ref))}


def paired_bootstrap(a: Any, b: Any, *, resamples: int = 10000, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap of ``mean(a) - mean(b)`` over the same examples.

    Returns ``{"diff", "low", "high", "p_value", "verdict"}``: the observed difference, its
    percentile confidence interval, the two-sided p-value, and ``"win"`` (``a`` better: low > 0),
    ``"loss"`` (high < 0) or ``"tie"``, all from ``a``'s side and for higher-is-better scores;
    for a lower-is-better score pass the negated scores (or swap win and loss). Deterministic
    for a given ``seed``. Resampled index matrices are drawn in chunks, so memory stays bounded
    for any number of examples.
    """
    x, y = _paired(a, b, "paired_bootstrap")
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 1:
        raise EvalError(f"resamples must be a positive integer (10000 is usual), got {resamples!r}")
    if not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise EvalError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence!r}")
    d = x - y
    n = len(d)
    diff = float(d.mean())
    rng = np.random.default_rng(seed)
    means = np.empty(resamples, dtype=np.float64)
    chunk = max(1, min(resamples, _CHUNK_ELEMENTS // n))
    for start in range(0, resamples, chunk):
        m = min(chunk, resamples - start)
        means[start:start + m] = d[rng.integers(0, n, size=(m, n))].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = (float(q) for q in np.quantile(means, [alpha / 2, 1 - alpha / 2]))
    # tolerance: resampled means of identical values differ from diff by rounding only
    tol = 1e-12 * max(1.0, abs(diff))
    p_value = float((1 + np.sum(np.abs(means - diff) >= abs(diff) - tol)) / (1 + resamples))
    verdict = "win" if low > 0 else "loss" if high < 0 else "tie"
    return {"diff": diff, "low": low, "high": high, "p_value": min(p_value, 1.0), "verdict": verdict}


def binomial_tail(successes: int, n: int, rate: float) -> float:
    """``P(X >= successes)`` for ``X ~ Binomial(n, rate)``, exactly (log-space sum of the terms).

    The one-sided p-value of "a model with ``successes`` of ``n`` examples right is more accurate
    than ``rate``" (e.g. the majority-class share): how often a predictor that is right with
    probability ``rate`` on each example would do at least as well.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise EvalError(f"binomial_tail needs a positive number of examples, got n={n!r}")
    if isinstance(successes, bool) or not isinstance(successes, (int, np.integer)) or not 0 <= successes <= n:
        raise EvalError(f"binomial_tail needs 0 <= successes <= n ({n}), got {successes!r}")
    if not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
        raise EvalError(f"binomial_tail needs a rate between 0 and 1, got {rate!r}")
    if successes == 0 or rate == 1:
        return 1.0
    if rate == 0:
        return 0.0
    lp, lq = math.log(rate), math.log1p(-rate)
    top_n = math.lgamma(n + 1)
    logs = [top_n - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq for i in range(int(successes), n + 1)]
    peak = max(logs)
    return min(1.0, math.exp(peak) * math.fsum(math.exp(v - peak) for v in logs))


def forgetting(before: Mapping[str, float], after: Mapping[str, float], tuned_on: Iterable[str] = ()) -> dict[str, float]:
    """``after[t] - before[t]`` for every task in both that is not in ``tuned_on`` (negative = forgot)."""
    skip = set(tuned_on)
    return {t: float(after[t]) - float(before[t]) for t in after if t in before and t not in skip}


def normalized_score(merged: float, expert: float) -> float:
    """``merged / expert``: the share of the task expert's score a merged model keeps (NaN if expert is 0)."""
    merged, expert = float(merged), float(expert)
    if expert == 0:
        return math.nan
    return merged / expert


# --- graft eval folders --------------------------------------------------------------------------

@dataclass
class EvalRun:
    """One ``graft eval`` model folder: ``results.json`` and its per-task predictions."""

    path: Path
    name: str
    tasks: dict[str, dict[str, Any]]
    _examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)

    def examples(self, task: str) -> list[dict[str, Any]]:
        if task not in self._examples:
            self._examples[task] = _read_predictions(self, task)
        return self._examples[task]


def load_run(path: str | Path) -> EvalRun:
    """Read a model folder written by ``graft eval`` (``OUT/<model>``); one-line errors otherwise."""
    path = Path(path)
    if not path.exists():
        raise FileFormatError(f"{path} does not exist; give a model folder written by graft eval (OUT/<model name>)")
    if not path.is_dir():
        raise FileFormatError(f"{path} is a file; give a model folder written by graft eval (OUT/<model name>)")
    results = path / "results.json"
    if not results.is_file():
        summary = path / "summary.json"
        if summary.is_file():
            try:
                names = json.loads(summary.read_text()).get("models") or []
            except (ValueError, AttributeError):  # ValueError: bad JSON or not UTF-8; only a hint is lost
                names = []
            hint = f" (e.g. {path / str(names[0])})" if names else ""
            raise FileFormatError(f"{path} is a graft eval output folder; give one model folder inside it{hint}")
        raise FileFormatError(f"{path} has no results.json; give a model folder written by graft eval (OUT/<model name>)")
    from ..files import read_json

    data = read_json(results, "results file", hint="re-run graft eval")
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
        raise FileFormatError(f"{results} has no 'tasks' mapping; is it a graft eval results file?")
    name = str((data.get("model") or {}).get("name") or path.name)
    return EvalRun(path, name, data["tasks"])


def _read_predictions(run: EvalRun, task: str) -> list[dict[str, Any]]:
    info = run.tasks[task]
    rel = info.get("predictions") or f"predictions/{task}.jsonl"
    path = run.path / rel
    if not path.is_file():
        raise FileFormatError(f"{path} (predictions of task {task!r}) does not exist; re-run graft eval for {run.path}")
    rows = read_jsonl(path, "a graft eval prediction object")
    for number, row in enumerate(rows, 1):
        if "id" not in row or "score" not in row:
            raise FileFormatError(f"{path}: row {number} has no 'id' and 'score'; is it a graft eval predictions file?")
    if not rows:
        raise FileFormatError(f"{path} holds no predictions; re-run graft eval for {run.path}")
    return rows


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 43 else text[:40] + "..."


def aligned_scores(task: str, runs: Sequence[EvalRun]) -> list[np.ndarray]:
    """Per-example scores of ``task`` from each run, in the first run's example order.

    Every run must hold the same example ids, each with the same reference; otherwise one
    error says which id differs.
    """
    first = runs[0]
    ref_rows = first.examples(task)
    order = [_key(r["id"]) for r in ref_rows]
    if len(set(order)) != len(order):
        raise EvalError(f"task {task!r}: {first.path} repeats an example id; predictions must have unique ids")
    refs = {_key(r["id"]): r for r in ref_rows}
    out = []
    for run in runs:
        rows = run.examples(task)
        by_id = {_key(r["id"]): r for r in rows}
        if len(by_id) != len(rows):
            raise EvalError(f"task {task!r}: {run.path} repeats an example id; predictions must have unique ids")
        missing = [i for i in order if i not in by_id]
        extra = [i for i in by_id if i not in refs]
        if missing or extra:
            which = f"id {missing[0]} is missing" if missing else f"id {extra[0]} is extra"
            raise EvalError(f"task {task!r}: {run.path} has {len(rows)} examples and {first.path} has {len(ref_rows)}, "
                            f"{which}; evaluate both on the same task file and limit")
        for i in order:
            a, b = refs[i].get("reference"), by_id[i].get("reference")
            if _key(a) != _key(b):
                raise EvalError(f"task {task!r}: example id {i} has reference {_short(a)} in {first.path} but {_short(b)} "
                                f"in {run.path}; the runs used different task files")
        try:
            out.append(np.asarray([float(by_id[i]["score"]) for i in order], dtype=np.float64))
        except (TypeError, ValueError):
            raise FileFormatError(f"task {task!r}: {run.path} has a non-numeric 'score'; re-run graft eval") from None
    return out


def _main(run: EvalRun, task: str) -> tuple[str, float]:
    info = run.tasks[task]
    main = info.get("main")
    metrics = info.get("metrics") or {}
    if main not in metrics:
        raise FileFormatError(f"{run.path}/results.json: task {task!r} has no value for its main metric {main!r}")
    return str(main), float(metrics[main])


def parse_experts(items: Iterable[str]) -> dict[str, str]:
    """``["bbc=out/experts/bbc", ...]`` -> ``{"bbc": "out/experts/bbc"}``."""
    experts: dict[str, str] = {}
    for item in items:
        task, sep, folder = item.partition("=")
        if not sep or not task or not folder:
            raise EvalError(f"--expert takes TASK=DIR (a task name and that task's expert eval folder), got {item!r}")
        if task in experts:
            raise EvalError(f"--expert given twice for task {task!r}; give one expert folder per task")
        experts[task] = folder
    return experts


def compare_runs(a: str | Path, b: str | Path, *, base: str | Path | None = None,
                 experts: Mapping[str, str | Path] | None = None, confidence: float = 0.95, resamples: int = 10000,
                 seed: int = 0) -> dict[str, Any]:
    """Compare model folder ``b`` against ``a`` on every task both were evaluated on.

    Per task: both models' metrics, ``diff`` = mean per-example score of B minus A with its
    paired-bootstrap interval, p-value and verdict for B (``win``: B is better, whichever
    direction the main metric counts as better), flips from A to B (binary scores only),
    with ``base`` each model's main score minus the base's, with ``experts`` each model's
    main score divided by that task's expert's.
    """
    ra, rb = load_run(a), load_run(b)
    rbase = load_run(base) if base is not None else None
    rexp = {t: load_run(p) for t, p in (experts or {}).items()}
    common = [t for t in ra.tasks if t in rb.tasks]
    if not common:
        raise EvalError(f"{ra.path} ({', '.join(ra.tasks) or 'no tasks'}) and {rb.path} ({', '.join(rb.tasks) or 'no tasks'}) "
                        "share no task; evaluate both on the same tasks")
    for t, run in rexp.items():
        if t not in common:
            raise EvalError(f"--expert {t}: {t!r} is not a task both models were evaluated on ({', '.join(common)})")
        if t not in run.tasks:
            raise EvalError(f"--expert {t}: {run.path} was not evaluated on {t!r} (it has {', '.join(run.tasks) or 'no tasks'})")
    report: dict[str, Any] = {
        "a": {"name": ra.name, "path": str(ra.path)}, "b": {"name": rb.name, "path": str(rb.path)},
        "base": {"name": rbase.name, "path": str(rbase.path)} if rbase else None,
        "confidence": confidence, "resamples": resamples, "seed": seed, "tasks": {},
        "skipped": {"only_a": [t for t in ra.tasks if t not in rb.tasks], "only_b": [t for t in rb.tasks if t not in ra.tasks],
                    "not_in_base": []},
    }
    for t in common:
        main_a, score_a = _main(ra, t)
        main_b, score_b = _main(rb, t)
        if main_a != main_b:
            raise EvalError(f"task {t!r}: main metric is {main_a!r} in {ra.path} but {main_b!r} in {rb.path}; "
                            "evaluate both with the same task config")
        info = ra.tasks[t]
        hib = bool(info.get("higher_is_better", higher_is_better(main_a)))
        sa, sb = aligned_scores(t, [ra, rb])
        boot = paired_bootstrap(sb, sa, resamples=resamples, confidence=confidence, seed=seed)
        if not hib:  # the interval is about the scores; the verdict is about which model is better
            boot["verdict"] = {"win": "loss", "loss": "win"}.get(boot["verdict"], "tie")
        binary = bool(np.isin(sa, (0.0, 1.0)).all() and np.isin(sb, (0.0, 1.0)).all())
        entry: dict[str, Any] = {
            "kind": info.get("kind"), "main": main_a, "higher_is_better": hib, "n": int(len(sa)),
            "a": {"score": score_a, "metrics": dict(ra.tasks[t].get("metrics") or {})},
            "b": {"score": score_b, "metrics": dict(rb.tasks[t].get("metrics") or {})},
            **boot, "flips": flips(sa, sb) if binary else None,
        }
        if rbase is not None:
            if t in rbase.tasks:
                aligned_scores(t, [ra, rbase])
                _, score_base = _main(rbase, t)
                entry["base"] = {"score": score_base,
                                 "a": forgetting({t: score_base}, {t: score_a})[t],
                                 "b": forgetting({t: score_base}, {t: score_b})[t]}
            else:
                report["skipped"]["not_in_base"].append(t)
        if t in rexp:
            aligned_scores(t, [ra, rexp[t]])
            main_e, score_e = _main(rexp[t], t)
            if main_e != main_a:
                raise EvalError(f"--expert {t}: its main metric is {main_e!r}, the models' is {main_a!r}")
            entry["normalized"] = {"expert": str(rexp[t].path), "expert_score": score_e,
                                   "a": normalized_score(score_a, score_e), "b": normalized_score(score_b, score_e)}
        report["tasks"][t] = entry
    return report


# what a predictions row's "score" is, where it is not the main metric's per-example value
_PER_EXAMPLE = {"perplexity": "the example's mean token NLL, so diff is in nats", "code": "the problem's pass@k estimate"}


def _f(v: Any, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


def format_comparison(report: Mapping[str, Any]) -> str:
    """The plain-text tables ``graft compare`` prints: one per task."""
    a, b = report["a"]["name"], report["b"]["name"]
    if a == b:
        a, b = report["a"]["path"], report["b"]["path"]
    pct = f"{100 * report['confidence']:g}%"
    lines = [f"A = {a} ({report['a']['path']})", f"B = {b} ({report['b']['path']})"]
    if report.get("base"):
        lines.append(f"base = {report['base']['name']} ({report['base']['path']})")
    lines.append(f"diff = B - A of the mean per-example score; {pct} paired bootstrap interval, "
                 f"{report['resamples']} resamples; verdict is B against A")
    for t, e in report["tasks"].items():
        better = "higher is better" if e["higher_is_better"] else "lower is better"
        lines += ["", f"{t} ({e.get('kind') or '?'}, {e['n']} examples, main metric {e['main']}, {better})"]
        if e.get("kind") in _PER_EXAMPLE:
            lines.append(f"  (per-example score: {_PER_EXAMPLE[e['kind']]})")
        names = list(dict.fromkeys([*e["a"]["metrics"], *e["b"]["metrics"]]))
        rows = [("metric", "A", "B")] + [(m + (" *" if m == e["main"] else ""), _f(e["a"]["metrics"].get(m)),
                                          _f(e["b"]["metrics"].get(m))) for m in names]
        w0 = max(14, *(len(r[0]) for r in rows))
        w = max(9, *(len(r[1]) for r in rows), *(len(r[2]) for r in rows))
        lines += [f"  {r[0]:<{w0}}  {r[1]:>{w}}  {r[2]:>{w}}" for r in rows]
        lines.append(f"  {'diff B - A':<{w0}}  {_f(e['diff'], True)}  {pct} CI [{_f(e['low'], True)}, {_f(e['high'], True)}]"
                     f"  p = {e['p_value']:.3g}  verdict: {e['verdict']}")
        if e.get("flips"):
            fl = e["flips"]
            lines.append(f"  {'flips A -> B':<{w0}}  {fl['negative']} negative (A right, B wrong), "
                         f"{fl['positive']} positive, of {fl['n']}")
        if "base" in e:
            lines.append(f"  {'vs base':<{w0}}  A {_f(e['base']['a'], True)}  B {_f(e['base']['b'], True)}"
                         f"  (base {e['main']} {_f(e['base']['score'])})")
        if "normalized" in e:
            nz = e["normalized"]
            lines.append(f"  {'normalized':<{w0}}  A {_f(nz['a'])}  B {_f(nz['b'])}"
                         f"  (score / expert's {_f(nz['expert_score'])}, {nz['expert']})")
    sk = report.get("skipped") or {}
    for key, what in (("only_a", "not compared (only in A)"), ("only_b", "not compared (only in B)"),
                      ("not_in_base", "no base score")):
        if sk.get(key):
            lines.append(f"\n{what}: {', '.join(sk[key])}")
    return "\n".join(lines)
