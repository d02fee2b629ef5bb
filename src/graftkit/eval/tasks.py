"""Task data: rows read from JSONL / CSV / Parquet, checked, and the fields each kind needs.

Files are read by :mod:`graftkit.files` (the reader training uses too, so a file is typed the
same way for training and evaluation). ``limit`` keeps the first N rows. A missing field in any
row is one error naming the field, the file and where the row is (the 1-based line of a JSONL
file, the row of a CSV / Parquet one); an empty file, and labels written both as numbers and as
strings, are errors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EvalError
from ..files import check_label_types, read_rows, where
from .config import AnyTask, ClassificationTask, CodeTask, GenerationTask, PerplexityTask


@dataclass
class TaskData:
    """What a task needs from its file, independent of any model or tokenizer."""

    task: AnyTask
    rows: list[dict[str, Any]]
    texts: list[str] = field(default_factory=list)  # classification / perplexity text, generation prompt
    references: list[Any] = field(default_factory=list)  # classification label (str), generation answer (str)
    problems: list[dict[str, Any]] = field(default_factory=list)  # code
    samples: list[list[str]] | None = None  # code with samples_file
    sha256: str | None = None  # content hash of the file(s) read (set by the runner's cache)

    def __len__(self) -> int:
        return len(self.problems) if self.task.kind == "code" else len(self.rows)


def read_task_rows(file: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    rows = read_rows(file, name="task file", allow_empty=True)
    if not rows:
        raise EvalError(f"task file {file} holds no rows; give a file with at least one example")
    return rows[:limit] if limit else rows


def column(rows: list[dict[str, Any]], name: str, path: str | Path, what: str) -> list[Any]:
    """The values of one field; a row without it is an error naming the field, row and file."""
    values = []
    for i, row in enumerate(rows):
        v = row.get(name)
        if v is None or (isinstance(v, float) and v != v):  # absent, null, or a CSV/Parquet NaN
            if i == 0 and all(name not in r for r in rows):
                raise EvalError(f"{path} has no field {name!r} ({what}); its fields are: {', '.join(sorted(map(str, row)))}; "
                                f"set the task's field name")
            raise EvalError(f"{path}: {where(rows, i)} has no value for field {name!r} ({what}); fix or remove that row")
        values.append(v)
    return values


def label_text(v: Any) -> str:
    """Labels are compared by name; 1.0 read from a CSV is the label "1"."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v)


def load_task(task: AnyTask) -> TaskData:
    if isinstance(task, CodeTask):
        return _load_code(task)
    rows = read_task_rows(task.file, task.limit)
    data = TaskData(task, rows)
    if isinstance(task, ClassificationTask):
        data.texts = [str(v) for v in column(rows, task.text_field, task.file, "text_field")]
        labels = column(rows, task.label_field, task.file, "label_field")
        check_label_types(rows, task.label_field, task.file, EvalError)
        data.references = [label_text(v) for v in labels]
    elif isinstance(task, GenerationTask):
        data.texts = [str(v) for v in column(rows, task.prompt_field, task.file, "prompt_field")]
        data.references = [str(v) for v in column(rows, task.reference_field, task.file, "reference_field")]
    elif isinstance(task, PerplexityTask):
        data.texts = [str(v) for v in column(rows, task.text_field, task.file, "text_field")]
    return data


def _load_code(task: CodeTask) -> TaskData:
    from .code import load_problems

    problems = load_problems(task.file)
    if not problems:
        raise EvalError(f"code task {task.name!r}: {task.file} holds no problems")
    if task.limit:
        problems = problems[: task.limit]
    for key in ("task_id", "prompt"):
        column(problems, key, task.file, "code problem")
    data = TaskData(task, problems, problems=problems)
    if task.samples_file:
        rows = read_task_rows(task.samples_file)
        ids = column(rows, "task_id", task.samples_file, "samples_file")
        completions = column(rows, "completion", task.samples_file, "samples_file")
        by_id: dict[str, list[str]] = {}
        for tid, c in zip(ids, completions):
            by_id.setdefault(str(tid), []).append(str(c))
        samples = []
        for p in problems:
            got = by_id.get(str(p["task_id"]), [])
            if len(got) < max(task.k):
                have = f"only {len(got)}" if got else "no"
                raise EvalError(f"{task.samples_file} has {have} completion(s) for {p['task_id']}; pass@{max(task.k)} needs "
                                f"{max(task.k)} per problem: add samples or lower k")
            samples.append(got)
        data.samples = samples
    return data
