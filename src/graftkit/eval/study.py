"""``graft study STUDY.yaml``: tune one expert per task, merge them every way, evaluate all, report.

The end-to-end experiment of the model-merging papers (task arithmetic, TIES, DARE, PCB,
TALL masks), on the user's own base model and tasks:

1. **data** - each task is a packaged corpus (``graftkit.data.CORPORA``) or the user's files,
   split into train / validation / test. Splits are disjoint by text, checked (a study whose
   test examples also appear in its training or validation data is refused): merge
   hyperparameters are chosen on validation and every reported number comes from test.
2. **experts** - one fine-tuned model per (expert family, task), trained with
   :mod:`graftkit.train` recipes. An expert whose recipe and data are unchanged is reused from
   the study folder (``study_key.txt`` holds their hash). A failed expert is recorded and the
   study goes on without it. A family's ``search: {lr: [...]}`` trains one expert per learning
   rate and keeps the one most accurate on the task's validation split.
3. **merges** - per family, every listed merge method over that family's experts, streamed by
   :mod:`graftkit.merge`. Classification heads are task-specific (one label set per task), so
   they are excluded from merging; every model of a family is evaluated on task *t* with the
   family's expert-*t* head. A ``search:`` grid is scored by the mean validation accuracy of
   the merged model over the tasks; the best point is kept.
4. **evaluation** - the base, every expert and every merge on every task's test split, with
   :func:`graftkit.eval.evaluate_model`; per-example predictions are kept.
5. **comparisons** - expert checks (is each expert significantly above the majority class and
   the base on its own task? :func:`check_expert`), normalized accuracy (merge / the task's own
   expert; against a flagged expert it is recorded as not meaningful and left out of every
   "best merge" choice), flips against the task's expert, paired-bootstrap significance against
   a reference merge, forgetting of each expert on the tasks it was not tuned on, and
   task-vector cosine / sign-conflict matrices.
6. **report** - ``report.html`` + ``report.md`` (:mod:`graftkit.eval.report`).

``study.json`` is rewritten after each stage, so nothing computed is lost when a later stage
fails or the run is interrupted; re-running reuses the experts.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field

from ..config import StrictModel, parse_config, read_yaml
from ..errors import ConfigError, GraftError

SPLITS = ("train", "validation", "test")


# -- the recipe ------------------------------------------------------------------------------------

class SplitSizes(StrictModel):
    train: int = Field(320, ge=1)
    validation: int = Field(80, ge=1)
    test: int = Field(200, ge=1)


class StudyTask(StrictModel):
    """A classification task: a packaged corpus split by the study, or the user's own split files."""

    name: str
    corpus: Optional[str] = None  # a name in graftkit.data.CORPORA
    files: Optional[dict[str, str]] = None  # {train, validation, test}: JSONL / CSV / Parquet
    text_field: str = "text"
    label_field: str = "label"
    sizes: SplitSizes = Field(default_factory=SplitSizes)  # corpus splits only
    max_length: int = Field(64, ge=8)


class ExpertFamily(StrictModel):
    """How the experts of one family are tuned: a ``graft train`` method and optimizer section;
    ``search: {lr: [...]}`` trains one expert per learning rate and keeps, per task, the one
    with the best validation accuracy (ties: the first listed)."""

    family: str
    method: dict[str, Any] = Field(default_factory=lambda: {"method": "full"})
    optim: dict[str, Any] = Field(default_factory=dict)
    search: dict[str, list[float]] = Field(default_factory=dict)


class MergeData(StrictModel):
    """The examples of a data-aware merge (fisher, regmean, ...): each expert's statistics are
    computed on the first ``examples`` rows of its own task's ``split`` (the merge config's
    per-model ``data:`` blocks, see graftkit.merge.config.DataBlock)."""

    split: Literal["train", "validation"] = "train"
    examples: Optional[int] = Field(None, ge=1)
    batch_size: Optional[int] = Field(None, ge=1)
    fisher: Optional[Literal["expected", "empirical"]] = None


class MergeRun(StrictModel):
    """One merge method over a family's experts; ``search`` values are tried on validation.
    ``data`` (data-aware methods; default: the train split) says which examples they run on."""

    method: str
    name: Optional[str] = None  # default: the method name
    parameters: dict[str, Any] = Field(default_factory=dict)
    search: dict[str, list[float]] = Field(default_factory=dict)
    data: Optional[MergeData] = None

    @property
    def label(self) -> str:
        return self.name or self.method


class EvaluationSettings(StrictModel):
    batch_size: int = Field(64, ge=1)
    confidence: float = Field(0.95, gt=0, lt=1)
    resamples: int = Field(2000, ge=100)
    against: str = "task_arithmetic"  # significance reference merge (itself is compared with linear)


class StudyConfig(StrictModel):
    name: str = "study"
    base: str
    seed: int = 0
    tasks: list[StudyTask]
    experts: list[ExpertFamily]
    merges: list[MergeRun] = Field(default_factory=list)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    output: str = "out/study"


def _duplicates(names: list[str]) -> list[str]:
    return sorted({n for n in names if names.count(n) > 1})


def validate_study(cfg: StudyConfig) -> StudyConfig:
    """Everything that can be checked before hours of training: names, corpora, merge params."""
    from ..data import CORPORA
    from ..merge.config import load_config

    if not cfg.tasks:
        raise ConfigError("study: tasks is empty; list at least one task (two or more to merge)")
    if not cfg.experts:
        raise ConfigError("study: experts is empty; give at least one family, e.g. {family: full, method: {method: full}}")
    for what, names in (("task", [t.name for t in cfg.tasks]), ("expert family", [e.family for e in cfg.experts]),
                        ("merge", [m.label for m in cfg.merges])):
        dup = _duplicates(names)
        if dup:
            raise ConfigError(f"study: {what} name {dup[0]!r} appears twice; names must be unique (give merges a distinct 'name')")
        bad = [n for n in names if not n or "/" in n or n.startswith(".")]
        if bad:
            raise ConfigError(f"study: {what} name {bad[0]!r} is not usable as a folder name; use letters, digits, '-' and '_'")
    for t in cfg.tasks:
        if (t.corpus is None) == (t.files is None):
            raise ConfigError(f"study task {t.name!r}: give either corpus: NAME (one of {', '.join(sorted(CORPORA))}) or files: {{train, validation, test}}")
        if t.corpus is not None and t.corpus not in CORPORA:
            raise ConfigError(f"study task {t.name!r}: unknown corpus {t.corpus!r}; packaged corpora: {', '.join(sorted(CORPORA))}")
        if t.files is not None and sorted(t.files) != sorted(SPLITS):
            raise ConfigError(f"study task {t.name!r}: files needs exactly train, validation and test; got {', '.join(sorted(t.files)) or 'none'}")
    for e in cfg.experts:
        _check_expert_search(e)
        _check_expert_recipe(cfg, e)
    if cfg.merges and len(cfg.tasks) < 2:
        raise ConfigError("study: merging needs at least two tasks (one expert each); add a task or remove merges")
    placeholders = [{"model": f"expert{i}"} for i in range(len(cfg.tasks))]
    for m in cfg.merges:  # the merge engine's own checks, on placeholder inputs (no file is opened)
        try:
            load_config(merge_config(m, "base", [p["model"] for p in placeholders], exclude=[], grid=True,
                                     data_tasks=[{"name": f"task{i}", "kind": "classification", "file": f"task{i}.jsonl"}
                                                 for i in range(len(placeholders))]))
        except GraftError as exc:
            raise ConfigError(f"study merge {m.label!r}: {exc}") from None
    return cfg


def _check_expert_search(e: ExpertFamily) -> None:
    if not e.search:
        return
    where = f"study expert family {e.family!r}: search"
    other = sorted(set(e.search) - {"lr"})
    if other:
        raise ConfigError(f"{where} supports lr only (e.g. search: {{lr: [1.0e-4, 3.0e-4]}}), got {other[0]!r}")
    lrs = e.search["lr"]
    if not lrs:
        raise ConfigError(f"{where}.lr is empty; list the learning rates to try, e.g. [1.0e-4, 3.0e-4]")
    bad = [v for v in lrs if not (math.isfinite(v) and v > 0)]
    if bad:
        raise ConfigError(f"{where}.lr value {bad[0]!r} is not a positive learning rate; use values like 1.0e-4")
    dup = _duplicates(lrs)
    if dup:
        raise ConfigError(f"{where}.lr value {dup[0]:g} appears twice; list each learning rate once")
    if "lr" in e.optim:
        raise ConfigError(f"{where}.lr and optim.lr are both given; the search chooses the learning rate - remove optim.lr")


def expert_recipe(cfg: StudyConfig, family: ExpertFamily, data: dict[str, Any], folder: Path, lr: float | None = None) -> dict[str, Any]:
    """The ``graft train`` recipe of one expert (``data``: the recipe's data section)."""
    optim = {"seed": cfg.seed, **family.optim}
    if lr is not None:
        optim["lr"] = lr
    from ..methods import method_named

    # an expert whose adapter can be a merge input is merged from the adapter; others export merged
    method = method_named(family.method.get("method", "full"))
    config = {k: v for k, v in family.method.items() if k != "method"}
    mergeable = getattr(method, "merge_deltas", None) is not None and method.weight_delta(config)
    export = [] if mergeable else ["merged"]
    return {"model": cfg.base, "task": "classification", "data": data, "method": dict(family.method), "optim": optim,
            "output": {"dir": str(folder), "export": export}}


def _check_expert_recipe(cfg: StudyConfig, e: ExpertFamily) -> None:
    """The family's method and optim sections through ``graft train``'s own recipe checks (on a
    placeholder data section, no file is opened), so a typo fails before the study folder exists."""
    from ..train import parse_recipe

    for lr in e.search.get("lr") or [None]:
        raw = expert_recipe(cfg, e, {"train": "train.jsonl", "labels": ["a", "b"]}, Path("experts"), lr)
        try:
            parse_recipe(raw, source="recipe")
        except GraftError as exc:
            raise ConfigError(f"study expert family {e.family!r}: {exc}") from None


def base_head_labels(base: str) -> int | None:
    """The label count of the base's classification head, or None when it has none."""
    from ..io.hf import model_config

    config = model_config(base)
    if any(str(a).endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or []):
        return int(config.num_labels)
    return None


def load_study(config: Any) -> StudyConfig:
    if isinstance(config, (str, Path)):
        config = read_yaml(config, "study recipe")
    return validate_study(parse_config(StudyConfig, config))


def merge_config(run: MergeRun, base: str, inputs: list[str], *, exclude: list[str], grid: bool,
                 data_tasks: list[dict] | None = None) -> dict:
    """A graft merge config for ``run`` over ``inputs`` (per-model vs global parameters split as the
    method declares them); with ``grid`` the search values go into a ``search:`` block. A
    data-aware method gets a ``data:`` block per input from ``data_tasks`` (each input's task, as
    ``graft eval`` takes it) and ``run.data``; other methods refuse ``run.data``."""
    from ..registry import MERGES
    from ..merge.config import MergeConfig  # noqa: F401  (registers the merge methods)
    from .. import merge as _merge_pkg  # noqa: F401

    spec = MERGES.get(run.method)
    per_model = {k: v for k, v in run.parameters.items() if k in spec.model_params}
    global_ = {k: v for k, v in run.parameters.items() if k not in spec.model_params}
    cfg: dict[str, Any] = {"merge_method": run.method, "base_model": base,
                           "models": [{"model": p, "parameters": dict(per_model)} for p in inputs],
                           "parameters": global_, "dtype": "float32"}
    if spec.base_as_input and spec.needs_base:  # an optional base (multislerp, karcher) is the experts' origin: fine
        raise ConfigError(f"study merges combine several experts; {run.method} takes the base as one of exactly two inputs - "
                          "use linear or task_arithmetic")
    if getattr(spec, "data", None) is not None and data_tasks is not None:
        opts = (run.data or MergeData()).model_dump(exclude_none=True)
        opts.pop("split", None)
        for entry, task in zip(cfg["models"], data_tasks):
            entry["data"] = {"task": dict(task), **opts}
    elif run.data is not None:
        raise ConfigError(f"study merge {run.label!r}: data: is for data-aware methods (fisher, regmean, ...); "
                          f"{run.method} uses no data - remove it")
    if exclude:
        cfg["exclude"] = list(exclude)
    if grid and run.search:
        cfg["search"] = {"grid": {k: list(v) for k, v in run.search.items()}}
    return cfg


# -- small helpers ------------------------------------------------------------------------------

def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    from ..outputs import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    from ..outputs import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _error_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}" if not isinstance(exc, GraftError) else (text[0] if text else type(exc).__name__)


def check_disjoint(task: str, splits: dict[str, list[str]]) -> None:
    """Refuse a split whose test texts also appear in train or validation (or validation in train):
    a tuned hyperparameter or a trained weight must never have seen a reported example. Texts
    compare by their words (:func:`graftkit.data.corpora.text_key`), so case and punctuation
    variants of one text count as the same example."""
    from ..data import text_key

    seen: dict[str, str] = {}
    for split in SPLITS:
        for text in splits.get(split, []):
            key = text_key(text)
            other = seen.get(key)
            if other is not None and other != split:
                raise GraftError(f"study task {task!r}: a {split} example also appears in {other} ({text[:60]!r}...); "
                                 "tuning and test splits must not overlap - deduplicate the files")
            seen.setdefault(key, split)


# -- comparisons -------------------------------------------------------------------------------

def check_expert(name: str, task: str, correct: Any, majority: float, base: Any = None, *, base_name: str = "the base",
                 confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Did expert ``name`` learn its own ``task``? Two one-sided tests at level ``(1 - confidence) / 2``:

    * above the majority class: exact binomial test of its ``k`` right of ``n`` (``correct``, the
      0/1 per-example scores) against the majority-class share ``majority`` of the same test
      split, ``p = P(Binomial(n, majority) >= k)``;
    * above the base (``base``: the base model's per-example scores on the same examples, with
      this family's heads): the paired bootstrap of :func:`graftkit.eval.compare.paired_bootstrap`;
      above means its ``confidence`` interval of expert minus base lies wholly above 0.

    Returns ``{"expert", "task", "score", "n", "level", "majority": {...}, "base": {...} | None,
    "flagged", "reasons"}``; a flagged expert's reasons are one line each, naming the expert, its
    score, the majority or base score and the p-value or interval. Normalized scores against a
    flagged expert do not measure retained skill (dividing by a majority-class score rewards a
    merge for matching a model that learned nothing).
    """
    import numpy as np

    from ..errors import EvalError
    from .compare import binomial_tail, paired_bootstrap

    x = np.asarray(correct, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0 or not np.isin(x, (0.0, 1.0)).all():
        raise EvalError(f"checking expert {name}: its per-example scores on {task!r} must be a non-empty list of 0/1 (accuracy)")
    n, k = len(x), int(x.sum())
    score, level = k / n, (1.0 - confidence) / 2
    p_major = binomial_tail(k, n, float(majority))
    check: dict[str, Any] = {
        "expert": name, "task": task, "score": score, "n": n, "level": level,
        "majority": {"score": float(majority), "test": "one-sided exact binomial", "p_value": p_major, "above": p_major < level},
        "base": None, "flagged": False, "reasons": []}
    if not check["majority"]["above"]:
        check["reasons"].append(f"{name} is not significantly above the majority class on {task}: accuracy {score:.3f} vs "
                                f"majority class {float(majority):.3f} (n = {n}; one-sided exact binomial p = {p_major:.3g}, "
                                f"needs < {level:.3g})")
    if base is not None:
        b = paired_bootstrap(x, base, resamples=resamples, confidence=confidence, seed=seed)
        base_score = float(np.mean(np.asarray(base, dtype=np.float64)))
        check["base"] = {"name": base_name, "score": base_score, "test": "paired bootstrap", "confidence": confidence,
                         **b, "above": b["low"] > 0}
        if not check["base"]["above"]:
            check["reasons"].append(f"{name} is not significantly above {base_name} on {task}: accuracy {score:.3f} vs "
                                    f"{base_score:.3f} (difference {b['diff']:+.3f}, {100 * confidence:g}% paired bootstrap "
                                    f"interval [{b['low']:+.3f}, {b['high']:+.3f}], p = {b['p_value']:.3g})")
    check["flagged"] = bool(check["reasons"])
    return check


def compare_study(result: dict[str, Any], eval_dir: str | Path, experts: dict[str, list[str]], merges: dict[str, list[str]],
                  evaluation: EvaluationSettings, *, seed: int = 0, fail=None) -> None:
    """The study's comparisons, from ``result["scores"]``, ``result["tasks"]`` and the per-example
    predictions of the ``graft eval`` model folders ``eval_dir/FAMILY/MODEL`` (read and matched by
    example id and reference with :mod:`graftkit.eval.compare`). Fills ``forgetting``,
    ``expert_checks`` (:func:`check_expert` per expert), ``normalized`` (merge / the task's expert,
    only where that expert passed its checks), ``normalized_not_meaningful`` (the others, with the
    reason), ``flips`` (against the task's expert) and ``significance`` (paired bootstrap against
    ``evaluation.against``, itself against ``linear``). ``experts`` and ``merges`` map a family to its
    expert tasks and merge labels. A pair of folders that cannot be compared is passed to
    ``fail(stage, model, exc)`` (raised without it) and left out.
    """
    from .compare import aligned_scores, flips, load_run, normalized_score, paired_bootstrap

    scores, ev = result.get("scores") or {}, evaluation
    tasks = {t["name"]: t for t in result.get("tasks") or []}
    for key in ("forgetting", "expert_checks", "normalized", "normalized_not_meaningful", "flips", "significance"):
        result[key] = {}
    runs: dict[str, Any] = {}

    def run(name: str):
        if name not in runs:
            folder = Path(eval_dir) / name
            runs[name] = load_run(folder) if (folder / "results.json").is_file() else None
        return runs[name]

    def paired(name: str, other: str, task: str):
        """Per-example scores of ``name`` and ``other`` on ``task``, aligned by example id; None if missing."""
        a, b = run(name), run(other)
        if a is None or b is None or task not in a.tasks or task not in b.tasks:
            return None
        try:
            return aligned_scores(task, [a, b])
        except GraftError as exc:
            if fail is None:
                raise
            fail("compare", f"{name} vs {other} on {task}", exc)
            return None

    for family, ts in experts.items():
        base_name = f"{family}/base"
        base = scores.get(base_name, {})
        for t in ts:
            name = f"{family}/{t}"
            own = scores.get(name)
            if not own:
                continue
            # forgetting: an expert on the tasks it was not tuned on, minus the base
            result["forgetting"][name] = {s: own[s] - base[s] for s in own if s != t and s in base}
            majority = (tasks.get(t) or {}).get("majority")
            if t not in own or majority is None:
                continue
            pair = paired(name, base_name, t)
            if pair is not None:
                correct, base_scores = pair
            else:  # no per-example file: the binomial test needs only the count right
                n = int((tasks.get(t) or {}).get("n_test") or 0)
                if n < 1:
                    continue
                k = int(round(own[t] * n))
                correct, base_scores = [1.0] * k + [0.0] * (n - k), None
            try:
                result["expert_checks"][name] = check_expert(name, t, correct, majority, base_scores, base_name=base_name,
                                                             confidence=ev.confidence, resamples=ev.resamples, seed=seed)
            except GraftError as exc:
                if fail is None:
                    raise
                fail("compare", name, exc)
    checks = result["expert_checks"]
    for family, labels in merges.items():
        for label in labels:
            name = f"{family}/{label}"
            if name not in scores:
                continue
            norm, unmeant, flip, sig = {}, {}, {}, {}
            against = ev.against if label != ev.against else "linear"
            ref_name = f"{family}/{against}"
            for t, s in scores[name].items():
                expert_name = f"{family}/{t}"
                expert = scores.get(expert_name, {}).get(t)
                if expert:
                    check = checks.get(expert_name) or {}
                    if check.get("flagged"):
                        unmeant[t] = {"value": normalized_score(s, expert), "expert": expert_name,
                                      "reason": "; ".join(check["reasons"])}
                    else:
                        norm[t] = normalized_score(s, expert)
                pair = paired(expert_name, name, t)
                if pair is not None:
                    flip[t] = {"reference": expert_name, **flips(*pair)}
                pair = paired(name, ref_name, t) if ref_name in scores else None
                if pair is not None:
                    b = paired_bootstrap(*pair, resamples=ev.resamples, confidence=ev.confidence, seed=seed)
                    sig[t] = {"against": ref_name, "confidence": ev.confidence, **b}
            result["normalized"][name] = norm
            if unmeant:
                result["normalized_not_meaningful"][name] = unmeant
            result["flips"][name] = flip
            if sig:
                result["significance"][name] = sig


def flagged_experts(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The expert checks of ``result`` that failed (see :func:`check_expert`)."""
    return [c for c in (result.get("expert_checks") or {}).values() if isinstance(c, dict) and c.get("flagged")]


# -- the pipeline -------------------------------------------------------------------------------

class Study:
    """One run of a study; :func:`run_study` drives it stage by stage."""

    def __init__(self, cfg: StudyConfig, out: Path, console=None, progress: bool = True):
        from rich.console import Console

        self.cfg, self.out, self.progress = cfg, out, progress
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.data: dict[str, dict[str, Any]] = {}
        self.experts: dict[str, dict[str, dict[str, Any]]] = {}  # family -> task -> {dir, input, head}
        self.merged: dict[str, dict[str, Path]] = {}  # family -> merge label -> folder
        self.cache = None
        self.result: dict[str, Any] = {
            "name": cfg.name, "recipe": cfg.model_dump(mode="json"), "tasks": [], "models": [], "scores": {},
            "expert_checks": {}, "normalized": {}, "normalized_not_meaningful": {}, "flips": {}, "significance": {}, "forgetting": {}, "similarity": {}, "failures": [],
            "timings": {}, "environment": _environment(),
        }

    # bookkeeping
    def save(self) -> None:
        _write_json(self.out / "study.json", self.result)

    def fail(self, stage: str, model: str, exc: BaseException) -> None:
        line = _error_line(exc)
        self.result["failures"].append({"stage": stage, "model": model, "error": line})
        self.console.print(f"[red]  {stage} {model} failed: {line}[/red] (the study goes on without it)")

    def stage(self, name: str, title: str):
        study = self

        class _Timer:
            def __enter__(self):
                study.console.rule(f"[bold]{title}")
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                study.result["timings"][name] = round(time.perf_counter() - self.t, 1)
                study.save()
                return False

        return _Timer()

    # 1. data
    def prepare_data(self) -> None:
        from collections import Counter

        from ..data import CORPORA, stratified_split, text_key
        from ..files import check_label_types
        from ..train.data import read_rows

        for i, t in enumerate(self.cfg.tasks):
            folder = self.out / "data" / t.name
            if t.corpus is not None:
                parts = stratified_split(CORPORA[t.corpus](), [t.sizes.train, t.sizes.validation, t.sizes.test],
                                         seed=self.cfg.seed + i, key=lambda e: text_key(e[0]))
                rows = {s: [{"text": x, "label": y} for x, y, *_ in part] for s, part in zip(SPLITS, parts)}
            else:
                rows = {}
                for s in SPLITS:
                    raw = read_rows(t.files[s])
                    check_label_types(raw, t.label_field, t.files[s])
                    for j, r in enumerate(raw):
                        for f in (t.text_field, t.label_field):
                            if r.get(f) in (None, ""):
                                raise GraftError(f"study task {t.name!r}: row {j + 1} of {t.files[s]} has no {f!r} field; every row needs it")
                    rows[s] = [{"text": str(r[t.text_field]), "label": str(r[t.label_field])} for r in raw]
            check_disjoint(t.name, {s: [r["text"] for r in rows[s]] for s in SPLITS})
            labels = sorted({r["label"] for r in rows["train"]})
            for s in ("validation", "test"):
                unseen = sorted({r["label"] for r in rows[s]} - set(labels))
                if unseen:
                    raise GraftError(f"study task {t.name!r}: label {unseen[0]!r} is in {s} but not in train; the expert could never predict it")
            paths = {}
            for s in SPLITS:
                paths[s] = folder / f"{s}.jsonl"
                _write_jsonl(paths[s], rows[s])
            test_counts = Counter(r["label"] for r in rows["test"])
            majority = max(test_counts.values()) / len(rows["test"])
            self.data[t.name] = {"paths": paths, "labels": labels, "max_length": t.max_length}
            self.result["tasks"].append({"name": t.name, "kind": "classification", "main": "accuracy", "labels": labels,
                                         "source": t.corpus or t.files["train"], **{f"n_{s}": len(rows[s]) for s in SPLITS},
                                         "majority": majority})
            self.console.print(f"  {t.name}: {len(labels)} labels, {len(rows['train'])} train / {len(rows['validation'])} validation / "
                               f"{len(rows['test'])} test (majority class {majority:.3f} of test)")

    # 2. experts
    def base_layout(self) -> Path:
        """The base model in the experts' key layout (``bert.*`` + a head) so that merges and
        adapters line up key by key; written once per study folder."""
        from ..io.hf import load_model, save_model_folder

        folder = self.out / "base"
        prov = folder / "graft_provenance.json"
        if prov.exists() and json.loads(prov.read_text()).get("base") == self.cfg.base:
            return folder
        # a base with a classification head keeps its label count (another one is refused by transformers)
        model = load_model(self.cfg.base, head="classification", num_labels=base_head_labels(self.cfg.base) or 2)
        save_model_folder(model, folder, tokenizer_from=self.cfg.base, overwrite=True,
                          provenance={"produced_by": "graft study (base in the classification key layout)", "base": self.cfg.base})
        return folder

    def head_patterns(self, base_dir: Path) -> list[str]:
        """Tensor-name patterns of the task heads (excluded from merges and similarity)."""
        from ..tensors import Checkpoint

        keys = Checkpoint(base_dir).keys()
        for head in ("classifier", "score"):
            if any(k.startswith(head + ".") for k in keys):
                return [f"{head}.*"]
        raise GraftError(f"{self.cfg.base} loaded for classification has no classifier or score head; the study needs a *ForSequenceClassification model")

    def recipe_for(self, family: ExpertFamily, task: StudyTask, lr: float | None = None) -> dict[str, Any]:
        """The ``graft train`` recipe of one expert; with ``lr`` (a search candidate) that learning
        rate, trained into its own folder ``experts/FAMILY/TASK/lr-LR``."""
        d = self.data[task.name]
        folder = self.out / "experts" / family.family / task.name
        if lr is not None:
            folder = folder / f"lr-{lr:g}"
        return expert_recipe(self.cfg, family, {"train": str(d["paths"]["train"]), "labels": d["labels"], "max_length": task.max_length},
                             folder, lr)

    def expert_model(self, folder: Path) -> tuple[Path, dict[str, str]]:
        """``(merge input and head, eval model spec)`` of a trained expert folder: a fully tuned
        expert is used as its exported HF folder; an adapter expert as the adapter (the merge
        engine materializes its deltas key by key) on the base."""
        merged, adapter = folder / "merged", folder / "adapter"
        if merged.exists():
            return merged, {"path": str(merged)}
        return adapter, {"path": self.cfg.base, "adapter": str(adapter)}

    def train_one(self, family: ExpertFamily, task: StudyTask, lr: float | None, label: str) -> tuple[Path, dict[str, Any]]:
        """Train (or reuse, when its recipe and data are unchanged) one expert; returns its folder
        and what to record (``cached`` or ``final_loss``, and the learning rate it used)."""
        from ..train import parse_recipe
        from ..train.loop import train

        raw = self.recipe_for(family, task, lr)
        folder = Path(raw["output"]["dir"])
        recipe = parse_recipe(raw, source=f"study expert {label}")
        info: dict[str, Any] = {"lr": recipe.optim.lr}
        # the resolved recipe, defaults included: a changed default (say optim.fast_dropout)
        # retrains instead of reusing an expert trained another way
        key = hashlib.sha256((json.dumps(recipe.resolved(), sort_keys=True, default=str)
                              + _hash_files([self.data[task.name]["paths"]["train"]])).encode()).hexdigest()
        key_file = folder / "study_key.txt"
        if (folder / "adapter").exists() and key_file.exists() and key_file.read_text().strip() == key:
            self.console.print(f"  {label}: unchanged recipe and data, reusing {folder}")
            info["cached"] = True
        else:
            self.console.print(f"  {label}: training ({family.method.get('method', 'full')})")
            summary = train(recipe, overwrite=True, console=self.console, progress=self.progress)
            key_file.write_text(key + "\n")
            info["final_loss"] = summary.get("final_loss")
        return folder, info

    def expert_validation(self, task: str, folder: Path, label: str) -> float:
        """One expert's accuracy on its own task's validation split (with its own head)."""
        from .config import ModelSpec, TaskSpec
        from .runner import evaluate_model

        source, model = self.expert_model(folder)
        d = self.data[task]
        spec = TaskSpec(name=task, kind="classification", file=str(d["paths"]["validation"]), text_field="text",
                        label_field="label", max_length=d["max_length"], batch_size=self.cfg.evaluation.batch_size,
                        head=str(source))
        results = evaluate_model(ModelSpec(name=label.replace("/", "-").replace(" ", "_"), **model), [spec], cache=self.cache)
        return float(results[task]["metrics"]["accuracy"])

    def train_experts(self) -> None:
        for family in self.cfg.experts:
            self.experts[family.family] = {}
            self.result["models"].append({"name": f"{family.family}/base", "kind": "base", "family": family.family,
                                          "base": self.cfg.base, "heads": f"the {family.family} experts' heads"})
            lrs: list[float | None] = list(family.search.get("lr") or [None])
            for task in self.cfg.tasks:
                name = f"{family.family}/{task.name}"
                entry: dict[str, Any] = {"name": name, "kind": "expert", "family": family.family, "task": task.name}
                t0 = time.perf_counter()
                trained = []
                for lr in lrs:
                    label = name if lr is None else f"{name} lr={lr:g}"
                    try:
                        trained.append((lr, label, *self.train_one(family, task, lr, label)))
                    except Exception as exc:  # one expert (or one candidate) failing must not end the study
                        self.fail("train", label, exc)
                if not trained:
                    continue
                if lrs != [None]:  # the learning rate is a hyper-parameter: chosen on validation, never on test
                    trials, scored = [], []
                    for lr, label, folder, info in trained:
                        try:
                            acc = self.expert_validation(task.name, folder, label)
                        except Exception as exc:
                            self.fail("validate", label, exc)
                            trials.append({"params": {"lr": lr}, "validation": None, "chosen": False, "failed": "validate"})
                            continue
                        trials.append({"params": {"lr": lr}, "validation": acc, "chosen": False})
                        scored.append((acc, -len(scored), len(trials) - 1, folder, info))
                    trials += [{"params": {"lr": lr}, "validation": None, "chosen": False, "failed": "train"}
                               for lr in lrs if lr not in {t[0] for t in trained}]
                    if not scored:
                        continue
                    acc, _, i, folder, info = max(scored, key=lambda x: x[:2])  # ties: the first listed
                    trials[i]["chosen"] = True
                    entry["search"] = sorted(trials, key=lambda t: lrs.index(t["params"]["lr"]))
                    self.console.print(f"  {name}: lr {info['lr']:g} chosen on validation (accuracy {acc:.3f}; tried "
                                       + ", ".join(f"{t['params']['lr']:g}" for t in entry["search"]) + ")")
                else:
                    _, _, folder, info = trained[0]
                entry.update(info)
                entry["seconds"] = round(time.perf_counter() - t0, 1)
                source, model = self.expert_model(folder)
                self.experts[family.family][task.name] = {"input": source, "head": source, "model": model, "dir": folder}
                self.result["models"].append(entry)
                self.save()

    # 3. similarity and merges
    def similarity(self, base_dir: Path, exclude: list[str]) -> None:
        from ..analysis.similarity import task_vector_similarity

        for family, experts in self.experts.items():
            if len(experts) < 2:
                continue
            try:
                sim = task_vector_similarity(base_dir, {t: e["input"] for t, e in experts.items()}, exclude=exclude)
                self.result["similarity"][family] = {k: sim[k] for k in ("tasks", "cosine", "sign_conflict", "norms", "keys") if k in sim}
            except Exception as exc:
                self.fail("similarity", family, exc)

    def merges(self, base_dir: Path, exclude: list[str]) -> None:
        from ..merge.api import run_merge, run_search

        for family, experts in self.experts.items():
            self.merged[family] = {}
            if len(experts) < 2:
                if self.cfg.merges:
                    self.console.print(f"  {family}: fewer than two experts trained, no merges")
                continue
            tasks = list(experts)
            inputs = [str(experts[t]["input"]) for t in tasks]
            for run in self.cfg.merges:
                name = f"{family}/{run.label}"
                folder = self.out / "merges" / family / run.label
                t0 = time.perf_counter()
                try:
                    split = (run.data or MergeData()).split
                    cfg = merge_config(run, str(base_dir), inputs, exclude=exclude, grid=True,
                                       data_tasks=[{"name": t, "kind": "classification", "file": str(self.data[t]["paths"][split]),
                                                    "text_field": "text", "label_field": "label",
                                                    "max_length": self.data[t]["max_length"]} for t in tasks])
                    if run.search:  # overwrite=True: the previous merge stays until the new one is complete
                        evaluate = lambda d, f=family: self.validation_score(Path(d), f)  # noqa: E731
                        run_search(cfg, folder, evaluate, overwrite=True)
                        trials = json.loads((folder / "search_results.json").read_text())
                        best = next(t for t in trials if t.get("best"))
                        params = {**run.parameters, **best["parameters"]}
                        search = [{"params": t["parameters"], "validation": t["score"], "chosen": bool(t.get("best"))} for t in trials]
                    else:
                        run_merge(cfg, folder, overwrite=True, progress=False)
                        params, search = dict(run.parameters), []
                except Exception as exc:
                    self.fail("merge", name, exc)
                    continue
                self.merged[family][run.label] = folder
                shown = ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in params.items()) or "defaults"
                self.console.print(f"  {name}: {shown} ({time.perf_counter() - t0:.0f} s)")
                self.result["models"].append({"name": name, "kind": "merge", "family": family, "method": run.method,
                                              "params": params, "search": search, "seconds": round(time.perf_counter() - t0, 1)})
                self.save()

    # 4. evaluation
    def heads(self, family: str) -> dict[str, str]:
        return {t: str(e["head"]) for t, e in self.experts.get(family, {}).items()}

    def task_specs(self, split: str, family: str) -> list[Any]:
        from .config import TaskSpec

        heads = self.heads(family)
        return [TaskSpec(name=t, kind="classification", file=str(self.data[t]["paths"][split]), text_field="text",
                         label_field="label", max_length=self.data[t]["max_length"], batch_size=self.cfg.evaluation.batch_size,
                         head=heads[t])
                for t in self.data if t in heads]

    def evaluate(self, name: str, model: dict[str, str], family: str, split: str, out_dir: Path | None) -> dict[str, Any]:
        from .config import ModelSpec
        from .runner import evaluate_model

        spec = ModelSpec(name=name.replace("/", "-"), **model)
        return evaluate_model(spec, self.task_specs(split, family), out_dir=out_dir, cache=self.cache, overwrite=True)

    def validation_score(self, folder: Path, family: str) -> float:
        results = self.evaluate(f"{family}/candidate", {"path": str(folder)}, family, "validation", None)
        scores = [r["metrics"]["accuracy"] for r in results.values()]
        return sum(scores) / len(scores)

    def evaluate_all(self) -> None:
        for family in self.experts:
            if not self.experts[family]:
                continue
            models = [(f"{family}/base", {"path": str(self.out / "base")})]
            models += [(f"{family}/{t}", e["model"]) for t, e in self.experts[family].items()]
            models += [(f"{family}/{m}", {"path": str(folder)}) for m, folder in self.merged.get(family, {}).items()]
            for name, model in models:
                out_dir = self.out / "eval" / name
                try:  # overwrite: the previous results stay until these are complete
                    results = self.evaluate(name, model, family, "test", out_dir)
                except Exception as exc:
                    self.fail("evaluate", name, exc)
                    continue
                self.result["scores"][name] = {t: r["metrics"]["accuracy"] for t, r in results.items()}
                shown = "  ".join(f"{t} {s:.3f}" for t, s in self.result["scores"][name].items())
                self.console.print(f"  {name:<28} {shown}")
                self.save()

    # 5. comparisons
    def compare(self) -> None:
        compare_study(self.result, self.out / "eval", {f: list(e) for f, e in self.experts.items()},
                      {f: list(m) for f, m in self.merged.items()}, self.cfg.evaluation, seed=self.cfg.seed, fail=self.fail)

    def report(self) -> tuple[Path, Path]:
        from .report import write_report

        return write_report(self.result, self.out)

    def print_table(self) -> None:
        from rich.table import Table

        tasks = [t["name"] for t in self.result["tasks"]]
        table = Table(title=f"graft study {self.cfg.name}: test accuracy (normalized = merge / the task's expert)")
        table.add_column("model")
        for t in tasks:
            table.add_column(t, justify="right")
        table.add_column("mean", justify="right")
        table.add_column("norm. mean", justify="right")
        table.add_row("majority class", *[f"{t['majority']:.3f}" for t in self.result["tasks"]], "", "")
        for name, row in self.result["scores"].items():
            vals = [row.get(t) for t in tasks]
            got = [v for v in vals if v is not None]
            norm = self.result["normalized"].get(name, {})
            left_out = "*" if self.result["normalized_not_meaningful"].get(name) else ""
            table.add_row(name, *[f"{v:.3f}" if v is not None else "-" for v in vals],
                          f"{sum(got) / len(got):.3f}" if got else "-",
                          f"{sum(norm.values()) / len(norm):.3f}{left_out}" if norm else ("n/m" if left_out else ""))
        self.console.print(table)
        flagged = flagged_experts(self.result)
        for check in flagged:
            for reason in check["reasons"]:
                self.console.print(f"[bold red]warning:[/bold red] {reason}")
        if flagged:
            self.console.print("  normalized scores against these experts are not meaningful: left out of norm. mean (*) "
                               "and of the best-merge choice, shown as n/m in the report")


def _environment() -> dict[str, Any]:
    import torch
    import transformers

    from .. import __version__

    return {"graftkit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "threads": torch.get_num_threads()}


def run_study(config: Any, out: str | Path | None = None, *, console=None, progress: bool = True) -> dict[str, Any]:
    """Run a study (a STUDY.yaml path, dict or :class:`StudyConfig`); returns ``study.json``'s content."""
    from .runner import EvalCache

    from ..outputs import check_output

    cfg = load_study(config)
    out = Path(out or cfg.output)
    check_output(out, [("base model", cfg.base), *[(f"{s} file of study task {t.name!r}", f)
                                                    for t in cfg.tasks for s, f in (t.files or {}).items()]])
    from ..files import check_label_types, read_rows

    from ..assets import model_dir

    model_dir(cfg.base)  # a missing base model too: one error, and no study folder left behind
    head = base_head_labels(cfg.base)
    for t in cfg.tasks:  # a bad data file is one error before anything is written
        for s, f in (t.files or {}).items():
            rows = read_rows(f, name="data file")
            check_label_types(rows, t.label_field, f)
            n = len({str(r.get(t.label_field)) for r in rows if r.get(t.label_field) not in (None, "")})
            if s == "train" and head is not None and n != head:
                raise ConfigError(f"study base {cfg.base} already has a classification head for {head} labels, but study task "
                                  f"{t.name!r} has {n} labels in {f}; every expert gets a head for its own task's labels - use the "
                                  "base model without its classification head (the bare encoder) or tasks with the same labels")
    out.mkdir(parents=True, exist_ok=True)
    study = Study(cfg, out, console=console, progress=progress)
    study.cache = EvalCache()
    t0 = time.perf_counter()
    (out / "study.yaml").write_text(_yaml(cfg.model_dump(mode="json")))
    with study.stage("data", "data: splits (train / validation for choosing merge settings / test for reporting)"):
        study.prepare_data()
    with study.stage("train", "experts: one per family and task"):
        base_dir = study.base_layout()
        exclude = study.head_patterns(base_dir)
        study.train_experts()
    with study.stage("merge", f"merges: {', '.join(m.label for m in cfg.merges) or 'none'} (settings chosen on validation)"):
        study.similarity(base_dir, exclude)
        study.merges(base_dir, exclude)
    with study.stage("eval", "evaluation: every model on every task's test split"):
        study.evaluate_all()
        study.compare()
    study.result["timings"]["total"] = round(time.perf_counter() - t0, 1)
    study.save()
    study.print_table()
    try:
        html, md = study.report()
        study.result["report"] = {"html": str(html), "md": str(md)}
    except Exception as exc:
        study.fail("report", "report", exc)
    study.save()
    return study.result


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
