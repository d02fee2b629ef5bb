"""Multi-stage merges (``graft merge-multi``, mergekit-multi's format): one YAML file holding
several merge recipes as separate documents (``---``), each with a ``name``; a recipe may use an
earlier stage's name wherever it names a model (``base_model``, ``models[].model``,
``slices[].sources[].model``, ``tokenizer_source``), and gets that stage's output folder.

* Named stages are written to ``INTERMEDIATE_DIR/<name>``; at most one stage has no name, and it
  is the final merge, written to ``--out-path``.
* The stages run in dependency order (a topological sort; a cycle is an error that names it),
  each through the ordinary front door (:func:`graftkit.merge.api.run_merge`), so each output is
  complete or absent.
* ``lazy`` (the default, as in mergekit) skips a named stage whose folder already holds the
  output of the very same recipe (its ``mergekit_config.yml`` equals the recipe, references
  resolved); mergekit skips any folder with weights in it, which reuses a stale stage after the
  recipe changed. A stage folder that holds something else is refused, never overwritten.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError

MODEL_FIELDS = ("model", "base_model", "tokenizer_source")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def read_stages(path: str | Path) -> list[tuple[str | None, dict]]:
    """The ``(name, recipe)`` of every document of a multi-stage file, in file order."""
    import yaml

    from ..files import read_text

    text = read_text(path, "multi-stage merge config", ConfigError)
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}; fix the syntax") from None
    if not docs:
        raise ConfigError(f"multi-stage merge config {path} holds no recipe; give one merge recipe per YAML document")
    stages, names = [], set()
    for i, doc in enumerate(docs, 1):
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: document {i} is not a merge recipe (a mapping); give one recipe per YAML document")
        recipe = dict(doc)
        name = recipe.pop("name", None)
        if name is not None:
            name = str(name)
            if not NAME_RE.fullmatch(name) or name in (".", ".."):
                raise ConfigError(f"{path}: stage name {name!r} is not a plain folder name (letters, digits, . _ -); rename it")
            if name in names:
                raise ConfigError(f"{path}: two stages are named {name!r}; give every stage its own name")
            names.add(name)
        elif any(n is None for n, _ in stages):
            raise ConfigError(f"{path}: documents {[j for j, (n, _) in enumerate(stages, 1) if n is None][0]} and {i} both "
                              "have no name; only the final merge may be unnamed - name the others")
        stages.append((name, recipe))
    return stages


def _references(value: Any, names: set[str], key: str | None = None) -> set[str]:
    """Stage names used as model references anywhere in a recipe."""
    if isinstance(value, dict):
        return set().union(*(_references(v, names, k) for k, v in value.items())) if value else set()
    if isinstance(value, list):
        return set().union(*(_references(v, names, key) for v in value)) if value else set()
    if key in MODEL_FIELDS and isinstance(value, str) and value in names:
        return {value}
    return set()


def _resolve(value: Any, folders: dict[str, str], key: str | None = None) -> Any:
    if isinstance(value, dict):
        return {k: _resolve(v, folders, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, folders, key) for v in value]
    if key in MODEL_FIELDS and isinstance(value, str) and value in folders:
        return folders[value]
    return value


def stage_order(stages: list[tuple[str | None, dict]]) -> list[tuple[str | None, dict]]:
    """The stages in an order where every stage comes after the stages it uses."""
    names = {n for n, _ in stages if n is not None}
    deps = {n: _references(r, names) for n, r in stages}
    by_name = dict(stages)
    done: list[str | None] = []
    state: dict[str | None, str] = {}

    def visit(name: str | None, path: list) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "open":
            cycle = path[path.index(name):] + [name]
            raise ConfigError("the stages depend on each other in a circle: " + " -> ".join(str(c) for c in cycle)
                              + "; break the circle")
        state[name] = "open"
        for dep in sorted(deps[name]):
            visit(dep, [*path, name])
        state[name] = "done"
        done.append(name)

    for name, _ in stages:
        visit(name, [])
    return [(n, by_name[n]) for n in done]


def _same_recipe(folder: Path, recipe: dict) -> bool:
    import yaml

    written = folder / "mergekit_config.yml"
    try:
        return (folder / "graft_provenance.json").is_file() and yaml.safe_load(written.read_text()) == recipe
    except (OSError, yaml.YAMLError):
        return False


def run_multi(config: str | Path, intermediate_dir: str | Path, out: str | Path | None = None, *, merge: Callable,
              lazy: bool = True, overwrite: bool = False, threads: int | None = None, allow_pickle: bool = False,
              force: bool = False, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Run every stage of a multi-stage file with ``merge`` (the front door's ``run_merge``);
    return ``{stage name (None for the final merge): output folder}``."""
    stages = stage_order(read_stages(config))
    final = any(n is None for n, _ in stages)
    if final and out is None:
        raise ConfigError(f"{config} has an unnamed final merge; give --out-path for it")
    if not final and out is not None:
        raise ConfigError(f"{config} has no unnamed final merge, so --out-path would stay empty; remove the name of the "
                          "final stage or drop --out-path")
    if final and Path(out).exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another output folder or pass --overwrite")
    work = Path(intermediate_dir)
    if work.exists() and not work.is_dir():
        raise ConfigError(f"intermediate dir {work} is not a folder; choose a folder for the stage outputs")
    folders = {n: str(work / n) for n, _ in stages if n is not None}
    done: dict[str | None, Path] = {}
    for i, (name, recipe) in enumerate(stages, 1):
        recipe = _resolve(recipe, folders)
        label = name or "final merge"
        if name is None:
            target, replace = Path(out), overwrite
        else:
            target, replace = Path(folders[name]), False
            if target.exists():
                if lazy and _same_recipe(target, recipe):
                    log(f"stage {i}/{len(stages)} {label}: {target} already holds this recipe's output, skipped")
                    done[name] = target
                    continue
                if not (target / "graft_provenance.json").is_file():
                    raise ConfigError(f"{target} exists and is not a graft merge output; move it away or choose another "
                                      "intermediate dir (it is never overwritten)")
                replace = True  # our own earlier stage output, of another recipe (or --no-lazy): rebuilt, swapped in whole
        work.mkdir(parents=True, exist_ok=True)
        log(f"stage {i}/{len(stages)} {label}: {recipe.get('merge_method', '?')} -> {target}")
        done[name] = Path(merge(recipe, target, overwrite=replace, threads=threads, allow_pickle=allow_pickle, force=force))
    return done
