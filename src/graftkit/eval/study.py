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
   study goes on without it.
3. **merges** - per family, every listed merge method over that family's experts, streamed by
   :mod:`graftkit.merge`. Classification heads are task-specific (one label set per task), so
   they are excluded from merging; every model of a family is evaluated on task *t* with the
   family's expert-*t* head. A ``search:`` grid is scored by the mean validation accuracy of
   the merged model over the tasks; the best point is kept.
4. **evaluation** - the base, every expert and every merge on every task's test split, with
   :func:`graftkit.eval.evaluate_model`; per-example predictions are kept.
5. **comparisons** - normalized accuracy (merge / the task's own expert), flips against the
   task's expert, paired-bootstrap significance against a reference merge, forgetting of each
   expert on the tasks it was not tuned on, and task-vector cosine / sign-conflict matrices.
6. **report** - ``report.html`` + ``report.md`` (:mod:`graftkit.eval.report`).

``study.json`` is rewritten after each stage, so nothing computed is lost when a later stage
fails or the run is interrupted; re-running reuses the experts.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Optional

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
    """How the experts of one family are tuned: a ``graft train`` method and optimizer section."""

    family: str
    method: dict[str, Any] = Field(default_factory=lambda: {"method": "full"})
    optim: dict[str, Any] = Field(default_factory=dict)


class MergeRun(StrictModel):
    """One merge method over a family's experts; ``search`` values are tried on validation."""

    method: str
    name: Optional[str] = None  # default: the method name
    parameters: dict[str, Any] = Field(default_factory=dict)
    search: dict[str, list[float]] = Field(default_factory=dict)

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
    if cfg.merges and len(cfg.tasks) < 2:
        raise ConfigError("study: merging needs at least two tasks (one expert each); add a task or remove merges")
    placeholders = [{"model": f"expert{i}"} for i in range(len(cfg.tasks))]
    for m in cfg.merges:  # the merge engine's own checks, on placeholder inputs (no file is opened)
        try:
            load_config(merge_config(m, "base", [p["model"] for p in placeholders], exclude=[], grid=True))
        except GraftError as exc:
            raise ConfigError(f"study merge {m.label!r}: {exc}") from None
    return cfg


def load_study(config: Any) -> StudyConfig:
    if isinstance(config, (str, Path)):
        config = read_yaml(config, "study")
    return validate_study(parse_config(StudyConfig, config))


def merge_config(run: MergeRun, base: str, inputs: list[str], *, exclude: list[str], grid: bool) -> dict:
    """A graft merge config for ``run`` over ``inputs`` (per-model vs global parameters split as the
    method declares them); with ``grid`` the search values go into a ``search:`` block."""
    from ..registry import MERGES
    from ..merge.config import MergeConfig  # noqa: F401  (registers the merge methods)
    from .. import merge as _merge_pkg  # noqa: F401

    spec = MERGES.get(run.method)
    per_model = {k: v for k, v in run.parameters.items() if k in spec.model_params}
    global_ = {k: v for k, v in run.parameters.items() if k not in spec.model_params}
    cfg: dict[str, Any] = {"merge_method": run.method, "base_model": base,
                           "models": [{"model": p, "parameters": dict(per_model)} for p in inputs],
                           "parameters": global_, "dtype": "float32"}
    if run.method == "slerp":
        raise ConfigError("study merges combine several experts; slerp interpolates exactly two models - use linear or task_arithmetic")
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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    os.replace(tmp, path)


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
            "normalized": {}, "flips": {}, "significance": {}, "forgetting": {}, "similarity": {}, "failures": [],
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
        model = load_model(self.cfg.base, head="classification", num_labels=2)
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

    def recipe_for(self, family: ExpertFamily, task: StudyTask) -> dict[str, Any]:
        d = self.data[task.name]
        optim = {"seed": self.cfg.seed, **family.optim}
        export = ["merged"] if family.method.get("method", "full") not in ("lora", "ia3") else []
        return {"model": self.cfg.base, "task": "classification",
                "data": {"train": str(d["paths"]["train"]), "labels": d["labels"], "max_length": task.max_length},
                "method": dict(family.method), "optim": optim,
                "output": {"dir": str(self.out / "experts" / family.family / task.name), "export": export}}

    def train_experts(self) -> None:
        from ..train import parse_recipe
        from ..train.loop import train

        for family in self.cfg.experts:
            self.experts[family.family] = {}
            self.result["models"].append({"name": f"{family.family}/base", "kind": "base", "family": family.family,
                                          "base": self.cfg.base, "heads": f"the {family.family} experts' heads"})
            for task in self.cfg.tasks:
                name = f"{family.family}/{task.name}"
                raw = self.recipe_for(family, task)
                folder = Path(raw["output"]["dir"])
                entry = {"name": name, "kind": "expert", "family": family.family, "task": task.name}
                t0 = time.perf_counter()
                try:
                    recipe = parse_recipe(raw, source=f"study expert {name}")
                    # the resolved recipe, defaults included: a changed default (say optim.fast_dropout)
                    # retrains instead of reusing an expert trained another way
                    key = hashlib.sha256((json.dumps(recipe.resolved(), sort_keys=True, default=str)
                                          + _hash_files([self.data[task.name]["paths"]["train"]])).encode()).hexdigest()
                    key_file = folder / "study_key.txt"
                    done = (folder / "adapter").exists() and key_file.exists() and key_file.read_text().strip() == key
                    if done:
                        self.console.print(f"  {name}: unchanged recipe and data, reusing {folder}")
                        entry["cached"] = True
                    else:
                        self.console.print(f"  {name}: training ({family.method.get('method', 'full')})")
                        summary = train(recipe, overwrite=True, console=self.console, progress=self.progress)
                        key_file.write_text(key + "\n")
                        entry["final_loss"] = summary.get("final_loss")
                except Exception as exc:  # one expert failing must not end the study
                    self.fail("train", name, exc)
                    continue
                entry["seconds"] = round(time.perf_counter() - t0, 1)
                # a fully tuned expert is used as its exported HF folder; an adapter expert as the
                # adapter (the merge engine materializes its deltas key by key) on the base
                merged, adapter = folder / "merged", folder / "adapter"
                source = merged if merged.exists() else adapter
                self.experts[family.family][task.name] = {
                    "input": source, "head": source,
                    "model": {"path": str(merged)} if merged.exists() else {"path": self.cfg.base, "adapter": str(adapter)}}
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
        from ..merge import search as merge_search
        from ..merge.executor import run_merge

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
                    cfg = merge_config(run, str(base_dir), inputs, exclude=exclude, grid=True)
                    shutil.rmtree(folder, ignore_errors=True)
                    if run.search:
                        evaluate = lambda d, f=family: self.validation_score(Path(d), f)  # noqa: E731
                        merge_search.run_search(cfg, folder, evaluate, overwrite=True)
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
        return evaluate_model(spec, self.task_specs(split, family), out_dir=out_dir, cache=self.cache)

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
                shutil.rmtree(out_dir, ignore_errors=True)
                try:
                    results = self.evaluate(name, model, family, "test", out_dir)
                except Exception as exc:
                    self.fail("evaluate", name, exc)
                    continue
                self.result["scores"][name] = {t: r["metrics"]["accuracy"] for t, r in results.items()}
                shown = "  ".join(f"{t} {s:.3f}" for t, s in self.result["scores"][name].items())
                self.console.print(f"  {name:<28} {shown}")
                self.save()

    # 5. comparisons
    def per_example(self, name: str, task: str) -> list[float] | None:
        path = self.out / "eval" / name
        files = list(path.rglob(f"predictions/{task}.jsonl"))
        if not files:
            return None
        return [float(json.loads(line)["score"]) for line in files[0].read_text().splitlines() if line.strip()]

    def compare(self) -> None:
        from .compare import flips, paired_bootstrap

        scores, ev = self.result["scores"], self.cfg.evaluation
        for family, experts in self.experts.items():
            base = scores.get(f"{family}/base", {})
            for t in experts:  # forgetting: an expert on the tasks it was not tuned on, minus the base
                own = scores.get(f"{family}/{t}")
                if own:
                    self.result["forgetting"][f"{family}/{t}"] = {s: own[s] - base[s] for s in own if s != t and s in base}
            for label in self.merged.get(family, {}):
                name = f"{family}/{label}"
                if name not in scores:
                    continue
                norm, flip, sig = {}, {}, {}
                against = ev.against if label != ev.against else "linear"
                ref_name = f"{family}/{against}"
                for t, s in scores[name].items():
                    expert = scores.get(f"{family}/{t}", {}).get(t)
                    if expert:
                        norm[t] = s / expert
                    new = self.per_example(name, t)
                    old = self.per_example(f"{family}/{t}", t)
                    if new is not None and old is not None and len(new) == len(old):
                        flip[t] = {"reference": f"{family}/{t}", **flips(old, new)}
                    ref = self.per_example(ref_name, t) if ref_name in scores else None
                    if new is not None and ref is not None and len(new) == len(ref):
                        b = paired_bootstrap(new, ref, resamples=ev.resamples, confidence=ev.confidence, seed=self.cfg.seed)
                        sig[t] = {"against": ref_name, "confidence": ev.confidence, **b}
                self.result["normalized"][name] = norm
                self.result["flips"][name] = flip
                if sig:
                    self.result["significance"][name] = sig

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
            table.add_row(name, *[f"{v:.3f}" if v is not None else "-" for v in vals],
                          f"{sum(got) / len(got):.3f}" if got else "-",
                          f"{sum(norm.values()) / len(norm):.3f}" if norm else "")
        self.console.print(table)


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

    cfg = load_study(config)
    out = Path(out or cfg.output)
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
