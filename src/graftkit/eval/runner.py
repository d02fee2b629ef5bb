"""Run an evaluation: models x tasks -> results.json, predictions, summary.json.

:func:`evaluate_model` evaluates one model on a list of tasks and returns, per task,
``{"kind", "n", "main", "higher_is_better", "metrics", "seconds", "rows", ...}`` (``rows``
are the per-example predictions, the lines of ``predictions/<task>.jsonl``). It loads the
model at most once per head kind (classification tasks share one load and swap heads;
generation, code and perplexity share a causal-LM load); forward passes run under
``torch.inference_mode``. An :class:`EvalCache` passed across calls keeps each task file's
rows and each (tokenizer, task) tokenization, so a study that evaluates fifty merges of one
base tokenizes every test set once.

:func:`evaluate` runs an EVAL.yaml: task files are read and checked before any model loads
(bad data fails at once), then each model is evaluated; a model that fails is recorded under
``failures`` in ``summary.json`` and the others still run. Each model's folder
``OUT/<model>/`` is written atomically, and an existing one is refused unless ``overwrite``
(checked before anything is computed).
"""
from __future__ import annotations

import gc
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from ..errors import EvalError, GraftError
from .config import (AnyTask, ClassificationTask, CodeTask, EvalConfig, GenerationTask, ModelSpec, PerplexityTask,
                     load_eval_config, parse_model, parse_task)
from .sandbox import allow_unsafe, require_isolation
from .tasks import TaskData, load_task

SUMMARY = "summary.json"
RESULTS = "results.json"


# -- cache ---------------------------------------------------------------------------------------

def task_files_hash(task: AnyTask) -> str | None:
    """SHA-256 over the bytes of a task's file (and samples_file): what its scores were computed
    from. By content, not by name or mtime: an edited file (even within one mtime tick, or
    copied back with its old mtime) is a different task. Without a samples_file it is the file's
    own SHA-256 (what ``sha256sum`` prints); None for the packaged HumanEval."""
    import hashlib

    from ..files import file_sha256

    samples = getattr(task, "samples_file", None)
    if not samples:
        return file_sha256(task.file)
    digests = [file_sha256(p) for p in (task.file, samples)]
    return hashlib.sha256("\0".join(d if d is not None else f"unreadable:{p}" for d, p in zip(digests, (task.file, samples))).encode()).hexdigest()


def task_key(task: AnyTask, files_hash: str | None = None) -> str:
    """A task's identity: its settings and its files' content hash, so an edited file is re-read."""
    return json.dumps([task.model_dump(mode="json"), files_hash or task_files_hash(task)], sort_keys=True)


class EvalCache:
    """Task rows and tokenized inputs shared across :func:`evaluate_model` calls.

    Keys: task rows by :func:`task_key`; tokenizers and tokenizations by the tokenizer's
    content hash (:func:`graftkit.eval.models.tokenizer_key`), so models that carry copies of
    one tokenizer share them. ``stats`` counts real work (``read``, ``tokenize``,
    ``tokenizer_load``) for tests and diagnostics.
    """

    def __init__(self) -> None:
        self._data: dict[str, TaskData] = {}
        self._tokenizers: dict[str, Any] = {}
        self._keys: dict[tuple[str, int], str] = {}
        self._encoded: dict[tuple[str, str], Any] = {}
        self._read_hash: dict[str, str | None] = {}  # task settings -> content hash of the rows last read
        self.stats: Counter = Counter()

    def task_data(self, task: AnyTask) -> TaskData:
        digest = task_files_hash(task)
        key = task_key(task, digest)
        if key not in self._data:
            data = load_task(task)
            data.sha256 = digest  # what the scores will be computed from, recorded in results.json
            self._data[key] = data
            self.stats["read"] += 1
        self._read_hash[task_key(task, "-")] = digest
        return self._data[key]

    def tokenizer(self, folder: Path) -> tuple[str, Any]:
        from .models import load_tokenizer, tokenizer_key

        stamp = (str(folder), max((f.stat().st_mtime_ns for f in folder.iterdir() if f.is_file()), default=0))
        if stamp not in self._keys:
            self._keys[stamp] = tokenizer_key(folder)
        key = self._keys[stamp]
        if key not in self._tokenizers:
            self._tokenizers[key] = load_tokenizer(folder)
            self.stats["tokenizer_load"] += 1
        return key, self._tokenizers[key]

    def encoded(self, tok_key: str, task: AnyTask, build: Callable[[], Any]) -> Any:
        # the file version task_data last read, not a fresh hash: a file edited since must not
        # file tokens of the old rows under the new content's key
        settings = task_key(task, "-")
        key = (tok_key, task_key(task, self._read_hash.get(settings)))
        if key not in self._encoded:
            self._encoded[key] = build()
            self.stats["tokenize"] += 1
        return self._encoded[key]

    def clear(self) -> None:
        self.__init__()


# -- progress ------------------------------------------------------------------------------------

class Bar:
    """A rich progress bar over batches (one line per model x task), or nothing."""

    def __init__(self, enabled: bool = True, console=None):
        self.enabled = enabled
        self.console = console
        self.progress = None
        self._depth = 0

    def __enter__(self) -> "Bar":
        if self.enabled and self._depth == 0:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("batches"),
                                     TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=self.console or Console(stderr=True), transient=False)
            self.progress.start()
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0 and self.progress is not None:
            self.progress.stop()
            self.progress = None

    def task(self, description: str, total: int) -> Callable[[int], None] | None:
        if self.progress is None:
            return None
        tid = self.progress.add_task(description, total=max(total, 1))
        return lambda n=1: self.progress.advance(tid, n)  # type: ignore[union-attr]


def _batches(n: int, size: int) -> int:
    return (n + size - 1) // size


# -- one task ------------------------------------------------------------------------------------

def _position_limit(model) -> int | None:
    from ..train.data import model_position_limit

    return model_position_limit(model)


def _run_classification(loaded, tok, tok_key: str, task: ClassificationTask, data: TaskData, cache: EvalCache, bar: Bar,
                        label: str) -> dict[str, Any]:
    from . import classify
    from .models import choose_head, install_head, pad_id

    head = choose_head(loaded, task.name, task.head)
    gold = classify.gold_ids(data.references, head, task.file)  # an unseen label fails before any compute
    install_head(loaded.model, head)
    pad = pad_id(tok)
    if getattr(loaded.model.config, "pad_token_id", None) is None:  # decoder heads pool the last non-pad token
        loaded.model.config.pad_token_id = pad
    enc = cache.encoded(tok_key, task, lambda: [ids[: task.max_length] for ids in
                                                tok(data.texts, truncation=False, add_special_tokens=True)["input_ids"]])
    limit = _position_limit(loaded.model)
    max_length = min(task.max_length, limit) if limit else task.max_length
    advance = bar.task(label, _batches(len(enc), task.batch_size))
    probs = classify.predict_probs(loaded.model, enc, pad=pad, batch_size=task.batch_size, max_length=max_length, advance=advance)
    metrics, rows = classify.score(probs, gold, head, data.references)
    return {"kind": task.kind, "n": len(rows), "main": "accuracy", "higher_is_better": True, "metrics": metrics,
            "head": head.source, "labels": head.labels, "rows": rows}


def _run_generation(loaded, tok, tok_key: str, task: GenerationTask, data: TaskData, cache: EvalCache, bar: Bar,
                    label: str) -> dict[str, Any]:
    from .generate import encode_prompts, generate, score_generation
    from .models import pad_id

    enc = cache.encoded(tok_key, task, lambda: encode_prompts(tok, data.texts, chat=task.chat, system_prompt=task.system_prompt,
                                                              max_prompt_length=task.max_prompt_length, where=f"task {task.name!r}"))
    advance = bar.task(label, _batches(len(enc), task.batch_size))
    outputs = generate(loaded.model, tok, enc, max_new_tokens=task.max_new_tokens, decoding=task.decoding,
                       num_samples=task.decoding.num_samples, stop=task.stop, batch_size=task.batch_size, pad=pad_id(tok),
                       advance=advance)
    metrics, rows = score_generation(task, outputs, data.references, data.rows)
    main = "score" if task.scorer else "exact_match"
    return {"kind": task.kind, "n": len(rows), "main": main, "higher_is_better": True, "metrics": metrics, "rows": rows}


def _run_code(loaded, tok, tok_key: str | None, task: CodeTask, data: TaskData, cache: EvalCache, bar: Bar,
              label: str) -> dict[str, Any]:
    from .code import score_code_problems

    if data.samples is not None:
        completions = data.samples
    else:
        from .generate import encode_prompts, generate
        from .models import pad_id

        enc = cache.encoded(tok_key, task, lambda: encode_prompts(tok, [str(p["prompt"]) for p in data.problems], chat=False,
                                                                  system_prompt=None, max_prompt_length=None,
                                                                  where=f"task {task.name!r}"))
        advance = bar.task(label, _batches(len(enc), task.batch_size))
        completions = generate(loaded.model, tok, enc, max_new_tokens=task.max_new_tokens, decoding=task.decoding,
                               num_samples=task.num_samples, stop=task.stop, batch_size=task.batch_size, pad=pad_id(tok),
                               advance=advance)
    by_id = {str(p["task_id"]): list(c) for p, c in zip(data.problems, completions)}
    # the sandbox's own progress bar would be a second live display inside ours: one line instead
    advance = bar.task(f"{label} (running {sum(map(len, completions))} programs)", 1)
    metrics, scored = score_code_problems(data.problems, by_id, k=task.k, timeout=task.timeout, memory_mb=task.memory_mb,
                                          workers=task.workers, progress=False)
    if advance is not None:
        advance(1)
    main = f"pass@{task.k[0]}"
    rows = []
    for i, (problem, got, comp) in enumerate(zip(data.problems, scored, completions)):
        row = {"id": i, "task_id": problem.get("task_id"), "prediction": comp[0] if comp else "", "reference": None}
        row.update(got)
        row.setdefault("score", got.get(main))
        row["id"] = i
        row["completions"] = comp
        rows.append(row)
    return {"kind": task.kind, "n": len(rows), "main": main, "higher_is_better": True, "metrics": dict(metrics), "rows": rows}


def _run_perplexity(loaded, tok, tok_key: str, task: PerplexityTask, data: TaskData, cache: EvalCache, bar: Bar,
                    label: str) -> dict[str, Any]:
    from .metrics import perplexity
    from .models import pad_id
    from .perplexity import count_windows, token_nll

    enc = cache.encoded(tok_key, task, lambda: [list(x) for x in tok(data.texts, add_special_tokens=True)["input_ids"]])
    limit = _position_limit(loaded.model)
    max_length = min(task.max_length, limit) if limit else task.max_length
    advance = bar.task(label, _batches(count_windows(enc, max_length), task.batch_size))
    nll, tokens = token_nll(loaded.model, enc, max_length=max_length, batch_size=task.batch_size, pad=pad_id(tok), advance=advance)
    total = sum(tokens)
    if total == 0:
        raise EvalError(f"task {task.name!r}: every text in {task.file} is shorter than two tokens; perplexity needs longer texts")
    metrics = {"perplexity": perplexity(sum(nll), total), "nll": sum(nll) / total, "tokens": total}
    rows = [{"id": i, "prediction": None, "reference": None, "score": (s / n if n else None), "nll": s, "tokens": n}
            for i, (s, n) in enumerate(zip(nll, tokens))]
    return {"kind": task.kind, "n": len(rows), "main": "perplexity", "higher_is_better": False, "metrics": metrics, "rows": rows}


RUNNERS = {"classification": _run_classification, "generation": _run_generation, "code": _run_code,
           "perplexity": _run_perplexity}


# -- one model -----------------------------------------------------------------------------------

def _device(device):
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _free() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def evaluate_model(model_spec: ModelSpec | dict, tasks: list[AnyTask | dict], out_dir: str | Path | None = None,
                   cache: EvalCache | None = None, *, overwrite: bool = False, progress: bool | Bar = False,
                   device: str | None = None, unsafe_no_isolation: bool = False) -> dict[str, dict[str, Any]]:
    """Evaluate one model on ``tasks``; returns ``{task: result}`` and writes ``out_dir`` when given.

    Code tasks need OS isolation (:mod:`graftkit.eval.sandbox`); without it they are refused
    unless ``unsafe_no_isolation``."""
    spec = model_spec if isinstance(model_spec, ModelSpec) else parse_model(model_spec)
    tasks = [parse_task(t) for t in tasks]
    if any(t.kind == "code" for t in tasks):
        require_isolation(unsafe_no_isolation)
    names = [t.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise EvalError(f"task name {dup[0]!r} appears more than once; task names must be unique")
    if out_dir is not None:
        from ..outputs import check_output

        check_output(out_dir, eval_inputs(spec, tasks))
    if out_dir is not None and Path(out_dir).exists() and not overwrite:
        raise EvalError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it, or choose another output folder")
    cache = cache if cache is not None else EvalCache()
    data = {t.name: cache.task_data(t) for t in tasks}
    dev = _device(device)
    bar = progress if isinstance(progress, Bar) else Bar(bool(progress))
    results: dict[str, dict[str, Any]] = {}
    load_seconds: dict[str, float] = {}
    with bar, allow_unsafe(unsafe_no_isolation):
        need = [t for t in tasks if t.needs_model]
        tok_key, tok = cache.tokenizer(_tokenizer_folder(spec)) if need else (None, None)
        for t in tasks:
            if not t.needs_model:
                t0 = time.perf_counter()
                results[t.name] = RUNNERS[t.kind](None, None, None, t, data[t.name], cache, bar, f"{spec.name} {t.name}")
                results[t.name]["seconds"] = round(time.perf_counter() - t0, 3)
        for kind in ("classification", "causal-lm"):
            group = [t for t in need if t.head_kind == kind]
            if not group:
                continue
            from .models import load

            t0 = time.perf_counter()
            loaded = load(spec, kind, dev)
            load_seconds[kind] = round(time.perf_counter() - t0, 3)
            try:
                for t in group:
                    t0 = time.perf_counter()
                    results[t.name] = RUNNERS[t.kind](loaded, tok, tok_key, t, data[t.name], cache, bar, f"{spec.name} {t.name}")
                    results[t.name]["seconds"] = round(time.perf_counter() - t0, 3)
            finally:
                del loaded
                _free()
    ordered = {n: results[n] for n in names}
    for t in tasks:  # which version of the task file these scores belong to (see _merge_summary)
        ordered[t.name]["file_sha256"] = data[t.name].sha256
    if out_dir is not None:
        for n, r in ordered.items():
            r["predictions"] = f"predictions/{n}.jsonl"
        write_model_dir(Path(out_dir), spec, ordered, overwrite=overwrite, load_seconds=load_seconds)
    return ordered


def eval_inputs(spec: ModelSpec, tasks: list[AnyTask]) -> list[tuple[str, Any]]:
    """What evaluating ``spec`` on ``tasks`` reads, for :func:`graftkit.outputs.check_output`."""
    found: list[tuple[str, Any]] = [(f"model {spec.name!r}", spec.path), (f"bundle of {spec.name!r}", spec.bundle),
                                    (f"adapter of {spec.name!r}", spec.adapter),
                                    (f"tokenizer of {spec.name!r}", spec.tokenizer)]
    found += [(f"head of {spec.name!r} for {t!r}", h) for t, h in spec.heads.items()]
    if spec.bundle is not None and spec.path is None:
        from ..analysis.tall import recorded_base

        found.append((f"base of {spec.name!r} (recorded in its bundle)", recorded_base(spec.bundle)))
    for t in tasks:
        found += [(f"file of task {t.name!r}", getattr(t, "file", None)), (f"samples_file of task {t.name!r}", getattr(t, "samples_file", None)),
                  (f"head of task {t.name!r}", getattr(t, "head", None))]
    return found


def _tokenizer_folder(spec: ModelSpec) -> Path:
    from .models import tokenizer_folder

    return tokenizer_folder(spec)


def _versions() -> str:
    from .. import __version__

    return __version__


def results_json(spec: ModelSpec, results: dict[str, dict[str, Any]], load_seconds: dict[str, float] | None = None) -> dict[str, Any]:
    return {
        "model": {"name": spec.name, "path": spec.path, "adapter": spec.adapter, "head": dict(spec.heads) or None,
                  **({"bundle": spec.bundle, "bundle_task": spec.bundle_task} if spec.bundle is not None else {})},
        "tasks": {n: {k: v for k, v in r.items() if k != "rows"} for n, r in results.items()},
        "load_seconds": load_seconds or {},
        "graftkit": _versions(),
    }


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def write_model_dir(out_dir: Path, spec: ModelSpec, results: dict[str, dict[str, Any]], *, overwrite: bool = False,
                    load_seconds: dict[str, float] | None = None) -> Path:
    from ..tensors import atomic_dir

    with atomic_dir(out_dir, overwrite) as tmp:
        for name, r in results.items():
            path = tmp / "predictions" / f"{name}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", encoding="utf-8") as f:
                for row in r["rows"]:
                    f.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
        (tmp / RESULTS).write_text(json.dumps(results_json(spec, results, load_seconds), indent=2, default=_json_default) + "\n")
    return out_dir


# -- a whole config ------------------------------------------------------------------------------

def _select(items: list, names: list[str] | None, what: str) -> list:
    if not names:
        return list(items)
    known = {i.name: i for i in items}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise EvalError(f"no {what} named {unknown[0]!r} in the eval config; its {what}s are: {', '.join(known)}")
    return [known[n] for n in dict.fromkeys(names)]


def error_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, GraftError):
        return text or type(exc).__name__
    return f"internal error: {type(exc).__name__}: {text}"


def _write_json_atomic(path: Path, data: Any) -> None:
    from ..outputs import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _merge_summary(out: Path, new: dict[str, Any]) -> dict[str, Any]:
    """Keep what an earlier run into the same folder measured for models this run did not touch."""
    path = out / SUMMARY
    try:
        prev = json.loads(path.read_text())
    except (OSError, ValueError):  # ValueError: bad JSON or bytes that are not UTF-8
        return new
    ran = set(new["models"]) | {f["model"] for f in new["failures"]}
    kept = [m for m in prev.get("models", []) if m not in ran and (out / m / RESULTS).exists()]
    merged = dict(new)
    merged["models"] = kept + [m for m in new["models"] if m not in kept]
    merged["tasks"] = list(dict.fromkeys([*prev.get("tasks", []), *new["tasks"]]))
    merged["scores"] = {**{m: dict(prev.get("scores", {}).get(m, {})) for m in kept}, **new["scores"]}
    for key in ("main", "higher_is_better"):
        merged[key] = {**prev.get(key, {}), **new[key]}
    merged["task_files"] = {**prev.get("task_files", {}), **new.get("task_files", {})}
    # a kept score computed from another version of a task file is not this task's score any
    # more (24 rows beside 8 under one name): leave it out and say which model to re-run
    stale = []
    for m in kept:
        versions = _task_versions(out / m / RESULTS)
        for t in new["tasks"]:
            if t in merged["scores"][m] and versions.get(t) != new["task_files"].get(t):
                del merged["scores"][m][t]
                stale.append({"model": m, "task": t})
    merged["stale"] = stale
    merged["failures"] = new["failures"]  # this run's; an earlier failure left no results to keep
    return merged


def _task_versions(results: Path) -> dict[str, str | None]:
    """Task name -> content hash of the file its scores in ``results`` (a results.json) came from."""
    try:
        tasks = json.loads(results.read_text()).get("tasks", {})
        return {t: r.get("file_sha256") for t, r in tasks.items()}
    except (OSError, ValueError, AttributeError):
        return {}


def stale_warnings(summary: dict[str, Any], config: str | None = None, out: str | None = None) -> list[str]:
    """One line per model whose kept scores were left out because a task file changed since."""
    by_model: dict[str, list[str]] = {}
    for s in summary.get("stale", []):
        by_model.setdefault(s["model"], []).append(s["task"])
    cfg = (f" {config}" if config else "") + (f" --out {out}" if out else "")
    return [f"the score(s) of {m!r} on {', '.join(map(repr, tasks))} came from a different version of the task file and are left "
            f"out of {SUMMARY}; re-run it: graft eval{cfg} --models {m} --tasks {','.join(tasks)} --overwrite"
            for m, tasks in by_model.items()]


def evaluate(config: EvalConfig | dict | str | Path, out: str | Path | None = None, *, overwrite: bool = False,
             models: list[str] | None = None, tasks: list[str] | None = None, progress: bool = False,
             raise_errors: bool = False, cache: EvalCache | None = None, device: str | None = None, console=None,
             unsafe_no_isolation: bool = False) -> dict[str, Any]:
    """Run an EVAL.yaml (path, dict or :class:`EvalConfig`); returns the summary (and writes ``out`` when given).

    Code tasks without OS isolation are refused (:class:`EvalError`) unless ``unsafe_no_isolation``.

    ``models`` / ``tasks`` select by name. A model that fails is recorded in ``summary["failures"]``
    (``raise_errors`` re-raises errors that are not graftkit's, for debugging).
    """
    cfg = load_eval_config(config)
    chosen_models: list[ModelSpec] = _select(cfg.models, models, "model")
    chosen_tasks: list[AnyTask] = _select(cfg.tasks, tasks, "task")
    if any(t.kind == "code" for t in chosen_tasks):  # before any model loads: one clear line, not a failure per model
        require_isolation(unsafe_no_isolation)
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        if out_path.exists() and not out_path.is_dir():
            raise EvalError(f"output {out_path} is a file; give a folder")
        from ..outputs import check_output

        for m in chosen_models:  # OUT (written into) and OUT/<model> (replaced) may not be, hold or lie in an input
            check_output(out_path / m.name, [("eval config", config if isinstance(config, (str, Path)) else None),
                                             *eval_inputs(m, chosen_tasks)])
            check_output(out_path, eval_inputs(m, chosen_tasks), clean=False)
        existing = [m.name for m in chosen_models if (out_path / m.name).exists()]
        if existing and not overwrite:
            raise EvalError(f"{out_path / existing[0]} already holds results ({len(existing)} of the models have a folder in {out_path}); "
                            "pass --overwrite to replace them, or choose another --out")
    cache = cache if cache is not None else EvalCache()
    task_files = {}
    for t in chosen_tasks:  # bad task data is an error now, before any model is loaded
        task_files[t.name] = cache.task_data(t).sha256
    scores: dict[str, dict[str, float]] = {}
    mains: dict[str, str] = {}
    better: dict[str, bool] = {}
    failures: list[dict[str, str]] = []
    t_start = time.perf_counter()
    with Bar(progress, console) as bar:
        for m in chosen_models:
            try:
                res = evaluate_model(m, chosen_tasks, out_path / m.name if out_path else None, cache, overwrite=overwrite,
                                     progress=bar, device=device, unsafe_no_isolation=unsafe_no_isolation)
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                if raise_errors and not isinstance(exc, GraftError):
                    raise
                failures.append({"model": m.name, "error": error_line(exc)})
                continue
            scores[m.name] = {t: r["metrics"][r["main"]] for t, r in res.items()}
            for t, r in res.items():
                mains[t], better[t] = r["main"], r["higher_is_better"]
    summary = {"models": list(scores), "tasks": [t.name for t in chosen_tasks], "main": mains, "higher_is_better": better,
               "scores": scores, "task_files": task_files, "stale": [], "failures": failures, "seconds": round(time.perf_counter() - t_start, 2), "graftkit": _versions()}
    if out_path is not None and (scores or not failures):  # every model failed: nothing to record, nothing written
        summary = _merge_summary(out_path, summary)
        _write_json_atomic(out_path / SUMMARY, summary)
    return summary


def summary_table(summary: dict[str, Any], title: str | None = None):
    """A rich table: one row per task (main metric), one column per model."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("task (metric)")
    failed = [f["model"] for f in summary.get("failures", []) if f["model"] not in summary["models"]]
    for m in [*summary["models"], *failed]:
        table.add_column(m, justify="right")
    for t in summary["tasks"]:
        main = summary.get("main", {}).get(t, "")
        arrow = "" if summary.get("higher_is_better", {}).get(t, True) else ", lower is better"
        cells = []
        for m in summary["models"]:
            v = summary["scores"].get(m, {}).get(t)
            cells.append("-" if v is None else f"{v:.4f}")
        cells += ["failed"] * len(failed)
        table.add_row(f"{t} ({main}{arrow})" if main else t, *cells)
    return table
