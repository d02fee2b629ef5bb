"""Choosing merge parameters on validation data: a grid ``search:`` and greedy soups.

The evaluation harness lives elsewhere; here the hook is either a Python callable
``evaluate(model_dir: Path) -> float`` (higher is better) or a shell command (``search.command``
in the YAML) whose last line of output is the score, with ``{model}`` replaced by the merged
folder. Every candidate is a real streaming merge into a temporary folder; only the winner is
kept, moved into place atomically, with ``search_results.json`` listing every trial.

* :func:`run_search` - the grid: ``search: {grid: {density: [0.3, 0.5], lambda: [0.8, 1.0]}}``
  tries every combination; a per-model parameter (``density``, ``weight``, ...) is set on every
  model, a global one in ``parameters``.
* :func:`greedy_soup` - Wortsman et al., 2022 ("Model soups"): score each candidate alone, sort
  by score, start from the best, and add each next candidate to the uniform soup only if the
  soup's score does not drop.
"""
from __future__ import annotations

import itertools
import json
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, GraftError
from .config import MergeConfig, load_config

Evaluate = Callable[[Path], float]


def command_evaluator(command: str) -> Evaluate:
    def evaluate(model_dir: Path) -> float:
        cmd = command.replace("{model}", shlex.quote(str(model_dir)))
        r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
        if r.returncode != 0:
            raise GraftError(f"evaluation command failed (exit {r.returncode}) on {model_dir}: {r.stderr.strip().splitlines()[-1:] or ''}")
        try:
            return float(r.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise GraftError(f"evaluation command printed no score on its last line (got {r.stdout.strip()[-80:]!r})") from None

    return evaluate


def check_search(cfg: MergeConfig, evaluate: Evaluate | None = None) -> None:
    """What run_search refuses before merging anything (``graft merge --dry-run`` runs it too)."""
    if cfg.search is None or not cfg.search.grid:
        raise ConfigError("run_search needs a search: block with a grid, e.g. search: {grid: {density: [0.3, 0.5]}}")
    if evaluate is None and not cfg.search.command:
        raise ConfigError("search: give an evaluation command (search.command, '{model}' = the merged folder) or a Python callable")


def describe_search(cfg: MergeConfig) -> list[str]:
    """The search part of ``graft merge --dry-run``: how many merges, and the shell command each runs."""
    if cfg.search is None:
        return []
    trials = 1
    for values in cfg.search.grid.values():
        trials *= len(values)
    grid = ", ".join(f"{name} in {values}" for name, values in cfg.search.grid.items())
    lines = [f"search        {trials} trial merge(s) over {grid}; the best-scoring one is kept"]
    if cfg.search.command:
        lines.append(f"shell command {cfg.search.command}")
        lines.append(f"              runs through the shell (sh -c) once per trial, {{model}} = that trial's folder: "
                     f"{trials} run(s) of a command from this recipe - read it before running the merge")
    return lines


def _with_params(cfg: MergeConfig, values: dict[str, Any]) -> dict:
    data = cfg.model_dump(mode="json", exclude_none=True)
    data.pop("search", None)
    spec = cfg.method()
    for name, value in values.items():
        if name in spec.model_params:
            for m in data["models"]:
                if spec.inputs == "model" or m["model"] != data.get("base_model"):
                    m.setdefault("parameters", {})[name] = value
        else:
            data.setdefault("parameters", {})[name] = value
    return data


def _finish(best_dir: Path, out: Path, trials: list, overwrite: bool) -> Path:
    from ..outputs import swap_in

    (best_dir / "search_results.json").write_text(json.dumps(trials, indent=2) + "\n")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another output folder or pass --overwrite")
    return swap_in(best_dir, out)  # the old output stays until the new one is in place


def run_search(config: Any, out: str | Path, evaluate: Evaluate | None = None, *, merge: Callable, overwrite: bool = False,
               threads: int | None = None, force: bool = False) -> Path:
    """Merge every grid point with ``merge`` (the front door's ``run_merge``), score each with
    ``evaluate`` (or ``search.command``), keep the best."""
    from ..outputs import check_output, stage_path
    from .plan import merge_inputs

    cfg = load_config(config)
    check_search(cfg, evaluate)
    if evaluate is None:
        evaluate = command_evaluator(cfg.search.command)
    out = Path(out)
    check_output(out, merge_inputs(cfg, config))
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another output folder or pass --overwrite")
    work = stage_path(out)  # named so that the next run removes it if this one is killed
    work.mkdir(parents=True)
    names = list(cfg.search.grid)
    trials, best = [], None
    try:
        for i, combo in enumerate(itertools.product(*(cfg.search.grid[n] for n in names))):
            values = dict(zip(names, combo))
            folder = merge(_with_params(cfg, values), work / f"trial{i}", threads=threads, progress=False, force=force)
            score = float(evaluate(folder))
            trials.append({"parameters": values, "score": score})
            if best is None or score > best[0]:
                if best is not None:
                    shutil.rmtree(best[1], ignore_errors=True)
                best = (score, folder)
            else:
                shutil.rmtree(folder, ignore_errors=True)
        for t in trials:
            t["best"] = t["score"] == best[0]
        return _finish(best[1], out, trials, overwrite)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def greedy_soup(models: list[str | Path], evaluate: Evaluate, out: str | Path, *, merge: Callable, overwrite: bool = False,
                dtype: str | None = None, threads: int | None = None) -> Path:
    """Greedy soup: add candidates in order of their own score while the uniform soup's score does
    not drop; each soup is a linear merge made with ``merge`` (the front door's ``run_merge``)."""
    from ..outputs import check_output, stage_path

    if len(models) < 1:
        raise ConfigError("greedy_soup needs at least one candidate model")
    out = Path(out)
    check_output(out, [("model", m) for m in models])
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another output folder or pass --overwrite")
    models = [str(m) for m in models]
    scored = sorted(((float(evaluate(Path(m))), m) for m in models), key=lambda t: -t[0])
    work = stage_path(out)  # named so that the next run removes it if this one is killed
    work.mkdir(parents=True)
    trials = [{"model": m, "alone": s} for s, m in scored]
    try:
        soup, soup_score, soup_dir = [scored[0][1]], scored[0][0], None
        for i, (_, m) in enumerate(scored[1:], 1):
            cfg = {"merge_method": "linear", "models": [{"model": x, "parameters": {"weight": 1.0}} for x in [*soup, m]]}
            if dtype:
                cfg["dtype"] = dtype
            folder = merge(cfg, work / f"soup{i}", threads=threads, progress=False)
            score = float(evaluate(folder))
            trials[i]["soup_score"] = score
            trials[i]["added"] = score >= soup_score
            if score >= soup_score:
                soup, soup_score = [*soup, m], score
                if soup_dir is not None:
                    shutil.rmtree(soup_dir, ignore_errors=True)
                soup_dir = folder
            else:
                shutil.rmtree(folder, ignore_errors=True)
        if soup_dir is None:  # the best single model is the soup: copy it through a one-model linear merge
            cfg = {"merge_method": "linear", "models": [{"model": soup[0], "parameters": {"weight": 1.0}}]}
            if dtype:
                cfg["dtype"] = dtype
            soup_dir = merge(cfg, work / "soup0", threads=threads, progress=False)
        result = {"soup": soup, "score": soup_score, "trials": trials}
        return _finish(soup_dir, out, [result], overwrite)
    finally:
        shutil.rmtree(work, ignore_errors=True)
