"""DARE tolerance (Yu et al., 2024): how much of an expert's task vector can be dropped at random,
with the survivors rescaled by ``1 / (1 - p)``, before its accuracy falls.

For each drop rate ``p`` the model ``base + DARE(expert - base, p)`` is written to a temporary HF
folder one tensor at a time (the drop is :func:`graftkit.merge.dare.drop`, the one ``dare_linear``
merges use, seeded per tensor) and scored by ``graft eval``'s classification runner
(:func:`graftkit.eval.runner.evaluate_model`). ``p = 0`` is the expert itself: the curve's
reference point. The task head (``classifier.*`` / ``score.*``, the names ``graft study`` excludes
from merges) and tensors the base lacks are kept whole, as the paper keeps task heads: a head
trained from a random start has no pre-trained value for its delta to be measured from. Every
other tensor is dropped.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, GraftError
from ..merge.plan import open_model_folder

DEFAULT_RATES = (0.5, 0.9, 0.95, 0.99)
_FLOATS = ("F64", "F32", "F16", "BF16")
HEADS = ("classifier.", "score.")


def kept_whole(key: str, base) -> bool:
    return key not in base.files or key.startswith(HEADS)


class DareToleranceError(GraftError):
    """The base and the expert do not fit together, or the task is not a classification task."""


def check_rates(rates) -> list[float]:
    out = []
    for r in rates:
        try:
            p = float(r)
        except (TypeError, ValueError):
            raise ConfigError(f"drop rate {r!r} is not a number; give rates in [0, 1), e.g. 0.5 0.9 0.99") from None
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"drop rate {r!r} is outside [0, 1): p is the share of the delta dropped (1 would drop it all)")
        out.append(p)
    if not out:
        raise ConfigError("no drop rates given; give rates in [0, 1), e.g. 0.5 0.9 0.99")
    return sorted(set(out))


def _check_pair(base, cb: dict, expert, ce: dict) -> None:
    if cb.get("model_type") != ce.get("model_type"):
        raise DareToleranceError(f"expert {expert.path} is {ce.get('model_type')} but base {base.path} is {cb.get('model_type')}; "
                                 "give the base the expert was fine-tuned from")
    shared = [k for k in expert.keys() if not kept_whole(k, base)]
    if not shared:
        raise DareToleranceError(f"expert {expert.path} and base {base.path} share no tensor names; give the base the expert was fine-tuned from")
    for k in shared:
        if tuple(base.shape(k)) != tuple(expert.shape(k)):
            raise DareToleranceError(f"{k} is {list(expert.shape(k))} in the expert {expert.path} but {list(base.shape(k))} in the "
                                     f"base {base.path}; give the base the expert was fine-tuned from")


def dropped_delta(delta: torch.Tensor, p: float, seed: int | None) -> torch.Tensor:
    """DARE on one tensor's delta: keep each entry with probability ``1 - p``, scale survivors by ``1 / (1 - p)``."""
    from ..merge.dare import drop

    return drop(delta.float().unsqueeze(0), 1.0 - p, rescale=True, seed=seed)[0]


def write_dropped(base, expert, p: float, seed: int, out: Path) -> dict:
    """``base + DARE(expert - base, p)`` as an HF folder at ``out`` (a fresh folder), streaming."""
    from ..merge.plan import TOKENIZER_FILES, seed_for
    from ..merge.write import ShardWriter
    from ..tensors import ST_TO_TORCH, st_dtype

    entries = [(k, st_dtype(expert.dtype(k)), tuple(expert.shape(k))) for k in expert.keys()]
    kept = total = 0
    writer = ShardWriter(out, entries)
    try:
        for key, dtype, _ in entries:
            w = expert.get(key)
            if not kept_whole(key, base) and dtype in _FLOATS:
                b = base.get(key).float()
                delta = w.float() - b
                d = dropped_delta(delta, p, seed_for(seed, key)) if p > 0 else delta
                nz = delta != 0
                kept += int((d[nz] != 0).sum())
                total += int(nz.sum())
                w = (b + d).to(getattr(torch, ST_TO_TORCH[dtype]))
            writer.write(key, w)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    for name in ("config.json", *TOKENIZER_FILES):
        src = Path(expert.path) / name
        src = src if src.is_file() else Path(base.path) / name
        if src.is_file():
            shutil.copy2(src, out / name)
    return {"kept": kept, "nonzero": total}


def dare_tolerance(base: str | Path, expert: str | Path, task: Any, rates=DEFAULT_RATES, seed: int = 0,
                   progress: bool = False) -> dict:
    """Accuracy of ``base + DARE(expert - base, p)`` on a classification ``task`` (an eval task
    dict / ClassificationTask, or a JSONL file with ``text`` and ``label``) for ``p`` in ``rates``.

    Returns ``{"base", "expert", "task", "seed", "rows": [{"rate", "accuracy", "kept_share",
    "retained"}]}`` with ``rate 0`` (the expert) first; ``retained`` is accuracy / the expert's."""
    from ..eval.config import ClassificationTask, parse_task
    from ..eval.runner import EvalCache, evaluate_model

    ps = check_rates(rates)
    if isinstance(task, (str, Path)):
        task = {"name": Path(task).stem.replace(" ", "_") or "task", "kind": "classification", "file": str(task)}
    spec = parse_task(task)
    if not isinstance(spec, ClassificationTask):
        raise DareToleranceError(f"task {spec.name!r} is a {spec.kind} task; DARE tolerance scores classification tasks (accuracy)")
    if not Path(spec.file).is_file():
        raise DareToleranceError(f"task file {spec.file} does not exist; give a JSONL file with text and label fields")
    b, cb = open_model_folder(base, "base", DareToleranceError)
    e, ce = open_model_folder(expert, "expert", DareToleranceError)
    _check_pair(b, cb, e, ce)
    cache = EvalCache()
    rows = []
    with tempfile.TemporaryDirectory(prefix="graft-dare-") as tmp:
        for p in [0.0, *[p for p in ps if p > 0]]:
            folder = Path(tmp) / f"p{p:g}"
            folder.mkdir()
            counts = write_dropped(b, e, p, seed, folder)
            res = evaluate_model({"name": f"dare-p{p:g}", "path": str(folder)}, [spec], cache=cache, progress=progress)
            acc = float(res[spec.name]["metrics"]["accuracy"])
            rows.append({"rate": p, "accuracy": acc,
                         "kept_share": counts["kept"] / counts["nonzero"] if counts["nonzero"] else 1.0})
            shutil.rmtree(folder)
    ref = rows[0]["accuracy"]
    for r in rows:
        r["retained"] = r["accuracy"] / ref if ref else None
    return {"base": str(base), "expert": str(expert), "task": spec.name, "seed": seed, "rows": rows}


def build_dare_sections(result: dict):
    """The report's blocks: a table and the accuracy-against-rate curve."""
    from ..eval.report import Cell, Figure, Para, Section, Table, new_figure, png_bytes

    rows = result["rows"]
    table = Table(header=[Cell("drop rate p"), Cell("accuracy", num=True), Cell("retained", num=True),
                          Cell("kept share of the delta", num=True)],
                  rows=[[Cell(f"{r['rate']:g}" + (" (expert)" if r["rate"] == 0 else "")), Cell(f"{r['accuracy']:.4f}", num=True),
                         Cell("-" if r["retained"] is None else f"{r['retained']:.3f}", num=True),
                         Cell(f"{r['kept_share']:.4f}", num=True)] for r in rows])
    fig = new_figure(5.0, 3.2)
    ax = fig.add_subplot()
    ax.plot([r["rate"] for r in rows], [r["accuracy"] for r in rows], marker="o")
    ax.set_xlabel("drop rate p (rescaled by 1/(1-p))")
    ax.set_ylabel(f"accuracy on {result['task']}")
    ax.set_title("DARE tolerance")
    figure = Figure("dare_tolerance", png_bytes(fig), alt="accuracy against DARE drop rate",
                    caption=f"{result['expert']} over {result['base']}, seed {result['seed']}")
    sec = Section("dare", "DARE tolerance", [
        Para(f"Accuracy of base + DARE(expert - base, p) on {result['task']}: each delta entry kept with probability 1 - p "
             "and rescaled by 1/(1 - p); the task head and tensors the base lacks kept whole."),
        table, figure])
    return [sec], [figure]


def write_dare_report(result: dict, out_dir) -> tuple[Path, Path]:
    from ..eval.report import write_sections

    sections, figures = build_dare_sections(result)
    return write_sections("DARE tolerance", sections, figures, out_dir)
