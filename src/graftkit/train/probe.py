"""``graft probe intrinsic-dim``: how many random directions a task needs.

Li et al. (2018) call the smallest subspace dimension d at which training in a random d-dimensional
subspace (:mod:`graftkit.methods.subspace`) reaches 90% of full training's score the task's
*intrinsic dimension* ``d_int90``; Aghajanyan et al. (2020) measure it for fine-tuning pretrained
language models. The probe trains, with one recipe's model, data and budget (steps, batch, schedule,
seed):

* full fine-tuning (the recipe's method replaced by ``full``, at ``full_lr``), unless its score is
  given (``full_score``: e.g. from an earlier run);
* the subspace method at each d (the recipe's own subspace options when its method is
  ``subspace``, else the defaults with the classification head frozen, so every trained degree of
  freedom is in z), at ``subspace_lr``;

and reports each score, its share of the full score and ``d_int90`` (None when no d reaches 90%:
the answer is then "more than the largest d tried"). It writes ``probe.json``, ``probe.png``
(score against d) and each run's own folder (``full/``, ``d<d>/``) to the output folder.
"""
from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path
from typing import Any, Iterable

from ..errors import ConfigError

#: the fraction of the full score that defines the intrinsic dimension (Li et al.'s d_int90)
FRACTION = 0.9
#: full fine-tuning's rate when the recipe's method is something else (the adapter bench's, BERT-size encoders)
FULL_LR = 5e-5
#: z's rate when the recipe's method is not subspace: with unit-norm columns an Adam step moves theta by
#: about lr * sqrt(d), so 1e-2 at d = 1000 moves it about as far as full fine-tuning at 5e-5 does on
#: MiniLM's 22.7M parameters (lr * sqrt(D)); a choice made here, neither paper gives one for AdamW
SUBSPACE_LR = 1e-2
#: a full score within this share of the way from chance to 1 makes d_int90 meaningless (a warning)
CHANCE_MARGIN = 0.1


def parse_dims(text: str | Iterable[int]) -> list[int]:
    """``"10,100,1000"`` -> [10, 100, 1000] (sorted, distinct, each >= 1), or one ConfigError line."""
    items = [x.strip() for x in text.split(",")] if isinstance(text, str) else [str(x) for x in text]
    items = [x for x in items if x]
    if not items:
        raise ConfigError("--dims is empty; give subspace dimensions separated by commas, e.g. --dims 10,100,1000")
    dims = []
    for x in items:
        try:
            value = int(x.replace("_", ""))
        except ValueError:
            raise ConfigError(f"--dims: {x!r} is not a whole number; give dimensions separated by commas, e.g. --dims 10,100,1000") from None
        if value < 1:
            raise ConfigError(f"--dims: {value} is not a subspace dimension; each d must be 1 or more")
        dims.append(value)
    return sorted(set(dims))


def d_int90(runs: list[dict[str, Any]], full_score: float, fraction: float = FRACTION) -> int | None:
    """The smallest d whose score reaches ``fraction`` of ``full_score`` (None: none does)."""
    threshold = fraction * full_score
    hits = [r["d"] for r in runs if r.get("score") is not None and r["score"] >= threshold]
    return min(hits) if hits else None


def _metric(recipe) -> str:
    if not recipe.data.validation:
        raise ConfigError("graft probe intrinsic-dim scores each run on the recipe's validation data; add data.validation")
    if recipe.task == "classification":
        return "val_accuracy"
    if recipe.eval.exact_match:
        return "val_exact_match"
    raise ConfigError(f"graft probe intrinsic-dim needs a score where higher is better: a classification recipe (accuracy) or "
                      f"eval.exact_match: true for a {recipe.task} recipe")


def _variant(base: dict[str, Any], method: dict[str, Any], lr: float, out: Path) -> dict[str, Any]:
    data = json.loads(json.dumps(base))
    data["method"] = method
    data["optim"]["lr"] = lr
    data["output"] = {**data["output"], "dir": str(out), "export": [], "checkpoint_every": None}
    return data


def probe_intrinsic_dim(recipe, dims: Iterable[int] | str, out: str | Path, *, full_score: float | None = None,
                        full_lr: float | None = None, subspace_lr: float | None = None, overwrite: bool = False,
                        progress: bool = True, console=None, source: str | None = None) -> dict[str, Any]:
    """Run the probe (see the module docstring); returns what ``probe.json`` holds."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from . import parse_recipe
    from .loop import train

    dims = parse_dims(dims)
    console = console or Console(highlight=False)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"probe output {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"probe output {out} is not empty; pass --overwrite to replace it or choose another --out")
    if full_score is not None and not (math.isfinite(full_score) and full_score > 0):
        raise ConfigError(f"--full-score {full_score} must be a positive number (the full fine-tuning score)")
    metric = _metric(recipe)
    base = recipe.model_dump(mode="json")
    method = dict(recipe.method)
    own = method.get("method")
    full_lr = full_lr or (recipe.optim.lr if own == "full" else FULL_LR)
    subspace_lr = subspace_lr or (recipe.optim.lr if own == "subspace" else SUBSPACE_LR)
    sub = {k: v for k, v in method.items() if k not in ("d", "dim")} if own == "subspace" else {"method": "subspace", "head": "freeze"}
    full_method = {"method": "full", **({k: method[k] for k in ("targets", "exclude", "layers") if k in method} if own == "full" else {})}
    # every recipe is checked before the first run starts: a bad one fails in a second, not after an hour
    plans = []
    if full_score is None:
        plans.append(("full", None, parse_recipe(_variant(base, full_method, full_lr, out / "full"), "probe (full fine-tuning)")))
    for d in dims:
        plans.append((f"d={d}", d, parse_recipe(_variant(base, {**sub, "d": d}, subspace_lr, out / f"d{d}"), f"probe (d={d})")))
    out.mkdir(parents=True, exist_ok=True)
    log = io.StringIO()
    quiet = Console(file=log, highlight=False, width=120)
    result: dict[str, Any] = {"recipe": source, "model": recipe.model, "metric": metric,
                              "fraction": FRACTION, "full_lr": full_lr, "subspace_lr": subspace_lr,
                              "budget": {"steps": recipe.optim.max_steps, "epochs": recipe.optim.epochs,
                                         "batch_size": recipe.optim.batch_size, "max_length": recipe.data.max_length,
                                         "seed": recipe.optim.seed},
                              "full": {"score": full_score, "source": "given"} if full_score is not None else None, "runs": []}
    columns = (TextColumn("[bold]probe {task.fields[now]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("probe", total=len(plans), now="")
        for label, d, r in plans:
            bar.update(task, now=label)
            t0 = time.perf_counter()
            try:
                summary = train(r, overwrite=True, console=quiet, progress=False)
            finally:
                (out / "train.log").write_text(log.getvalue())
            seconds = round(time.perf_counter() - t0, 1)
            score = summary.get(metric)
            if d is None:
                result["full"] = {"score": score, "source": "trained", "trainable": summary.get("trainable_parameters"),
                                  "seconds": seconds, "dir": str(out / "full")}
            else:
                report = summary.get("method_report") or {}
                result["runs"].append({"d": d, "score": score, "trainable": summary.get("trainable_parameters"), "seconds": seconds,
                                       "projection": report.get("projection"), "D": report.get("D"), "dir": str(out / f"d{d}")})
            bar.advance(task)
    full = result["full"]["score"]
    for run in result["runs"]:
        run["of_full"] = None if run["score"] is None or not full else run["score"] / full
    result["threshold"] = FRACTION * full if full is not None else None
    result["d_int90"] = d_int90(result["runs"], full) if full is not None else None
    result["chance"] = _chance(recipe) if metric == "val_accuracy" else None
    (out / "probe.json").write_text(json.dumps(result, indent=2) + "\n")
    plot = _plot(result, out / "probe.png")
    if plot:
        result["plot"] = plot

    table = Table(title=f"graft probe intrinsic-dim: {metric} ({recipe.model})")
    for col in ("d", "trainable", metric, "of full", "seconds"):
        table.add_column(col, justify="right")
    f = result["full"]
    table.add_row("full", f"{f.get('trainable') or 0:,}" if f.get("trainable") else "-", _fmt(full), "1.00",
                  str(f.get("seconds", "-")) if f.get("source") == "trained" else "given")
    for run in result["runs"]:
        table.add_row(f"{run['d']:,}", f"{run['trainable'] or 0:,}", _fmt(run["score"]),
                      "-" if run["of_full"] is None else f"{run['of_full']:.2f}", str(run["seconds"]))
    console.print(table)
    if result["d_int90"] is None:
        console.print(f"d_int90: none of d = {', '.join(map(str, dims))} reaches {FRACTION:.0%} of full fine-tuning's "
                      f"{_fmt(full)} ({_fmt(result['threshold'])}); the intrinsic dimension is above {max(dims):,}")
    else:
        console.print(f"d_int90 = {result['d_int90']:,} (the smallest d reaching {FRACTION:.0%} of full fine-tuning's {_fmt(full)})")
    chance = result["chance"]
    if chance is not None and full is not None and full < chance + CHANCE_MARGIN * (1 - chance):
        # 90% of a score near chance is below chance: any d "reaches" it, and d_int90 says nothing
        result["warning"] = (f"full fine-tuning's {_fmt(full)} is near chance ({_fmt(chance)}, the majority label's share of the "
                             "validation data): d_int90 is not meaningful; train longer (optim.max_steps) or check the recipe")
        (out / "probe.json").write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"[yellow]warning:[/yellow] {result['warning']}")
    console.print(f"written to {out} (probe.json{', probe.png' if plot else ''}, one folder per run)")
    return result


def _chance(recipe) -> float | None:
    """The majority label's share of the validation rows: the accuracy of always answering it."""
    from collections import Counter

    from .data import read_rows

    try:
        labels = [str(r.get(recipe.data.label_field)) for r in read_rows(recipe.data.validation, recipe.data.format)]
    except Exception:  # the runs read it already; a score without this reference is still a score
        return None
    return max(Counter(labels).values()) / len(labels) if labels else None


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _plot(result: dict[str, Any], path: Path) -> str | None:
    """Score against d (log scale) with the full score and the 90% line; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = [r for r in result["runs"] if r["score"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["d"] for r in runs], [r["score"] for r in runs], "o-", label="subspace")
    if result["full"]["score"] is not None:
        ax.axhline(result["full"]["score"], color="k", ls="--", label="full fine-tuning")
        ax.axhline(result["threshold"], color="grey", ls=":", label=f"{FRACTION:.0%} of full")
    if result["d_int90"] is not None:
        ax.axvline(result["d_int90"], color="tab:red", ls=":", label=f"d_int90 = {result['d_int90']:,}")
    ax.set_xscale("log")
    ax.set_xlabel("subspace dimension d")
    ax.set_ylabel(result["metric"])
    ax.set_title(f"intrinsic dimension: {result['model']}")
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
