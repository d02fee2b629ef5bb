"""TALL-mask compression - Wang et al., 2024, "Localizing Task Information for Improved Model
Merging and Compression" (ICML; code github.com/nik-dim/tall_masks).

A set of experts fine-tuned from one base is stored as

* a reference to the base (its path and :func:`graftkit.analysis.masks.base_fingerprint`; the base
  is not copied: it is needed anyway, and the separate experts do not include it either);
* one multi-task vector ``tau_MTL = sum_t tau_t``, the **unscaled** sum of the task vectors
  ``tau_t = theta_t - theta_0`` (the reference code's semantics), in the base's dtype;
* per task a bit-packed mask ``m_t = |tau_t| >= lambda_t * |tau_MTL - tau_t|``
  (:func:`graftkit.merge.consensus.tall_mask`, the formula the consensus merge uses), ``lambda_t``
  chosen on validation among candidates (:data:`SELECT`);
* per task the tensors that are not merged, stored whole: the ones matching ``exclude``
  (classification heads), the ones the base lacks, and non-float ones.

An expert is rebuilt as ``theta_0 + m_t * tau_MTL`` (:func:`rebuild`), computed in float32 and
cast to the base tensor's dtype: :func:`decompress` writes it as an HF folder, and ``graft eval``
loads it in memory from a model entry ``{bundle: BUNDLE, bundle_task: TASK}`` (:func:`open_expert`). Everything streams one tensor at a time; the masks are held
bit-packed until they are written (an eighth of a byte per entry and task).

Bundle layout (``bundle.json`` is the manifest)::

    bundle.json                 base reference, tasks, lambdas, storage
    tau_mtl/model.safetensors   tau_MTL (HF shards)
    tasks/<task>/mask.safetensors    the task's bit-packed mask (analysis/masks.py format)
    tasks/<task>/whole.safetensors   the task's unmerged tensors (heads, buffers)
    tasks/<task>/*.json, tokenizer    the expert's non-weight files (config.json, tokenizer...)
"""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, FileFormatError, GraftError
from ..tensors import Checkpoint, dir_size, st_dtype
from .masks import base_fingerprint, check_base, load_masks, pack_mask, save_masks, unpack_mask

FORMAT = "graftkit-tall-bundle"
VERSION = 1
MANIFEST = "bundle.json"
DEFAULT_LAMBDA = 0.4  # the middle of the paper's 0.2-0.6 range, as consensus_ta's default
TASK_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
# How a lambda candidate is chosen on a task's validation data. "fidelity" (default): the rebuilt
# expert closest to the expert itself (mean KL of their label distributions), because the bundle's
# job is to stand in for the expert, and the best accuracy on a small validation split is mostly
# noise (bench/RESULTS.md compares the two). "metric": the best main metric, the paper's choice.
SELECT = ("fidelity", "metric")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json", ".pt", ".pth")


class BundleError(GraftError):
    """A TALL bundle does not fit the request: a missing task, another base, experts that do not match."""


def _is_float(dtype: str) -> bool:
    return st_dtype(dtype).upper().startswith(("F", "BF"))


def load_recipe(path: str | Path | dict) -> dict:
    """``base``, ``experts`` (task -> folder), ``lambda``, ``validation`` and ``exclude`` (regexes
    of tensors stored whole per task). ``lambda`` is a number, a list of candidates, or a mapping
    task -> either; a task with several candidates needs ``validation[task]``, an eval task (the
    ``tasks:`` entries of EVAL.yaml), on which a candidate is chosen by ``select`` (see :data:`SELECT`)."""
    from ..config import read_yaml

    raw, path = (path, "compress recipe") if isinstance(path, dict) else (read_yaml(path, "compress recipe"), path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a compress recipe is a mapping with base, experts, lambda, exclude")
    unknown = sorted(set(raw) - {"base", "experts", "lambda", "validation", "exclude", "select"})
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; a compress recipe has base, experts, lambda, validation, select, exclude")
    select = raw.get("select", "fidelity")
    if select not in SELECT:
        raise ConfigError(f"{path}: select must be one of {', '.join(SELECT)} (how a lambda candidate is chosen on validation), got {select!r}")
    if not isinstance(raw.get("base"), str) or not raw["base"]:
        raise ConfigError(f"{path}: base must be the folder of the model the experts were fine-tuned from")
    experts = raw.get("experts")
    if not isinstance(experts, dict) or len(experts) < 2:
        raise ConfigError(f"{path}: experts must map at least two task names to expert folders")
    for task, folder in experts.items():
        if not isinstance(task, str) or not TASK_RE.match(task):
            raise ConfigError(f"{path}: task name {task!r} must be letters, digits, '_', '-' or '.' (it names a folder in the bundle)")
        if not isinstance(folder, str) or not folder:
            raise ConfigError(f"{path}: expert {task} must be a model folder path")
    lam = raw.get("lambda", DEFAULT_LAMBDA)
    lambdas = {t: lam for t in experts} if not isinstance(lam, dict) else dict(lam)
    if set(lambdas) != set(experts):
        raise ConfigError(f"{path}: lambda must be one number or give every task one (tasks: {', '.join(experts)})")
    validation = raw.get("validation") or {}
    if not isinstance(validation, dict) or not set(validation) <= set(experts):
        raise ConfigError(f"{path}: validation must map task names (of experts) to eval tasks")
    for t, v in list(lambdas.items()):
        v = v if isinstance(v, list) else [v]
        if not v or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not x >= 0 for x in v):
            raise ConfigError(f"{path}: lambda for {t} must be a number >= 0 or a list of them (the paper picks one in 0.2-0.6), got {lambdas[t]!r}")
        if len(v) > 1 and t not in validation:
            raise ConfigError(f"{path}: task {t} has {len(v)} lambda candidates but no validation task to choose among them; "
                              "add validation: {" + t + ": {kind: classification, file: ...}} or give one lambda")
        lambdas[t] = [float(x) for x in v]
    exclude = raw.get("exclude") or []
    if not isinstance(exclude, list) or not all(isinstance(x, str) for x in exclude):
        raise ConfigError(f"{path}: exclude must be a list of regexes (tensors stored whole per task, e.g. 'classifier\\.')")
    for x in exclude:
        try:
            re.compile(x)
        except re.error as exc:
            raise ConfigError(f"{path}: exclude pattern {x!r} is not a valid regex ({exc})") from None
    from ..eval.config import parse_task

    checked = {t: parse_task({"name": t, **v} if isinstance(v, dict) else v, f"validation.{t}") for t, v in validation.items()}
    return {"base": raw["base"], "experts": dict(experts), "lambda": lambdas, "validation": checked, "exclude": exclude,
            "select": select}


def _plan(base: Checkpoint, experts: dict[str, Checkpoint], exclude: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """The merged keys (the base's float tensors not excluded) and per task the keys stored whole.
    Raised before anything is written: an expert whose merged tensors differ from the base's."""
    pats = [re.compile(x) for x in exclude]
    excluded = lambda k: any(p.search(k) for p in pats)  # noqa: E731
    merged = [k for k in base.keys() if _is_float(base.dtype(k)) and not excluded(k)]
    whole: dict[str, list[str]] = {}
    for task, ck in experts.items():
        keys = set(ck.keys())
        missing = [k for k in merged if k not in keys]
        if missing:
            raise BundleError(f"expert {task} ({ck.path}) lacks {len(missing)} tensor(s) the base has, e.g. {missing[0]}; "
                              "TALL compression needs experts of the base's architecture")
        for k in merged:
            if tuple(ck.shape(k)) != tuple(base.shape(k)):
                raise BundleError(f"expert {task} ({ck.path}): {k} has shape {list(ck.shape(k))}, the base's is {list(base.shape(k))}; "
                                  "experts must share the base's shapes (a task head of its own size: add it to exclude)")
        merged_set = set(merged)
        whole[task] = [k for k in ck.keys() if k not in merged_set]
    return merged, whole


def _copy_side_files(src: Path, dst: Path) -> None:
    if not src.is_dir():
        return
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.startswith("."):
            shutil.copy2(f, dst / f.name)


def compress(recipe: str | Path | dict, out: str | Path, overwrite: bool = False) -> dict:
    """Write the TALL bundle of the recipe's experts to ``out``; return its manifest."""
    from ..merge.consensus import tall_mask
    from ..merge.write import ShardWriter
    from ..outputs import atomic_dir, check_output

    cfg = load_recipe(recipe)
    base = Checkpoint(cfg["base"])
    experts = {t: Checkpoint(p) for t, p in cfg["experts"].items()}
    merged, whole = _plan(base, experts, cfg["exclude"])
    if not merged:
        raise BundleError(f"no tensor of the base {cfg['base']} is left to merge (every one is excluded or not float); check exclude")
    check_output(out, [("base", cfg["base"]), *((f"expert {t}", p) for t, p in cfg["experts"].items())])
    shapes = {k: base.shape(k) for k in merged}
    fp = base_fingerprint(base.get, shapes)
    tasks = list(experts)
    cands = cfg["lambda"]
    packed: dict[str, list[dict[str, torch.Tensor]]] = {t: [{} for _ in cands[t]] for t in tasks}
    kept = {t: [0] * len(cands[t]) for t in tasks}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "tau_mtl").mkdir()
        writer = ShardWriter(tmp / "tau_mtl", [(k, st_dtype(base.dtype(k)), tuple(shapes[k])) for k in merged])
        try:
            for k in merged:
                b = base.get(k)
                deltas = {t: experts[t].get(k).float() - b.float() for t in tasks}
                tau = torch.stack(list(deltas.values())).sum(dim=0).to(b.dtype)  # unscaled sum, stored in the base's dtype
                writer.write(k, tau)
                tau = tau.float()  # the masks judge against the tau that is stored, so a rebuild uses what was judged
                for t in tasks:
                    for j, lam in enumerate(cands[t]):
                        mask = tall_mask(deltas[t], tau, lam)
                        packed[t][j][k] = pack_mask(mask)[0]
                        kept[t][j] += int(mask.sum())
                del deltas
        except BaseException:
            writer.abort()
            raise
        writer.close()
        total = sum(int(torch.Size(s).numel()) for s in shapes.values())
        chosen, scores = {}, {}
        for t in tasks:
            j, scores[t] = _choose(t, cands[t], packed[t], shapes, base, tmp, experts[t], whole[t], cfg["validation"].get(t),
                                   cfg.get("select", "fidelity"))
            chosen[t] = j
            folder = tmp / "tasks" / t
            folder.mkdir(parents=True)
            # one task's masks unpacked at a time: bool costs a byte per entry, packed an eighth
            save_masks(folder / "mask.safetensors", {k: unpack_mask(v, shapes[k]) for k, v in packed.pop(t)[j].items()}, fp)
            from safetensors.torch import save_file

            save_file({k: experts[t].get(k).contiguous() for k in whole[t]}, str(folder / "whole.safetensors"))
            _copy_side_files(experts[t].path, folder)
        experts_bytes = sum(dir_size(ck.path) if ck.path.is_dir() else ck.path.stat().st_size for ck in experts.values())
        bundle_bytes = dir_size(tmp)  # every file but the manifest, which records the count
        manifest = {
            "format": FORMAT, "version": VERSION,
            "base": {"path": str(Path(cfg["base"]).resolve()), "fingerprint": fp},
            "tau_mtl": "sum of the task vectors (theta_t - theta_0), unscaled, in the base's dtype",
            "mask": "|tau_t| >= lambda_t * |tau_MTL - tau_t|; expert_t = theta_0 + m_t * tau_MTL",
            "merged_tensors": len(merged), "merged_parameters": total, "exclude": cfg["exclude"],
            "tasks": {t: {"source": str(Path(cfg["experts"][t]).resolve()), "lambda": cands[t][chosen[t]],
                          "mask_density": kept[t][chosen[t]] / max(total, 1), "stored_whole": whole[t],
                          **({"validation": scores[t], "select": cfg.get("select", "fidelity")} if scores[t] else {})}
                      for t in tasks},
            "storage": {"experts_bytes": experts_bytes, "bundle_bytes": bundle_bytes,
                        "ratio": bundle_bytes / experts_bytes if experts_bytes else None,
                        "counted": "every file of the expert folders vs every file of the bundle except bundle.json; "
                                   "the base is referenced, not stored, so it is in neither"},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def rebuild(base: Checkpoint, tau: Checkpoint, mask_of, whole, whole_keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """An expert's tensors, one at a time: ``theta_0 + m * tau_MTL`` (float32, cast to the base's
    dtype) for the merged keys, then ``whole``'s tensors for the rest. The one place the rebuild is
    computed: ``graft decompress`` writes what it yields and ``graft eval`` loads it in memory."""
    for k in tau.keys():
        b = base.get(k)
        yield k, (b.float() + mask_of(k) * tau.get(k).float()).to(b.dtype)
    for k in whole_keys:
        yield k, whole.get(k)


def _write_expert(folder: Path, base: Checkpoint, tau: Checkpoint, mask_of, whole, whole_keys: list[str], side: Path) -> None:
    """An HF folder of :func:`rebuild`'s tensors with ``side``'s config and tokenizer files."""
    from ..merge.write import ShardWriter

    entries = [(k, st_dtype(base.dtype(k)), tuple(tau.shape(k))) for k in tau.keys()]
    entries += [(k, st_dtype(whole.dtype(k)), tuple(whole.shape(k))) for k in whole_keys]
    writer = ShardWriter(folder, entries)
    try:
        for k, t in rebuild(base, tau, mask_of, whole, whole_keys):
            writer.write(k, t)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    _copy_side_files(side, folder)


def fidelity_gap(expert: dict, rebuilt: dict) -> float:
    """How far a rebuilt expert's validation results are from the expert's own (lower is closer):
    for classification the mean KL(expert || rebuilt) of the two models' label distributions per
    example, otherwise the absolute difference of the main metric."""
    if expert.get("kind") == "classification":
        p = np.clip(np.asarray([r["probs"] for r in expert["rows"]], dtype=np.float64), 1e-12, None)
        q = np.clip(np.asarray([r["probs"] for r in rebuilt["rows"]], dtype=np.float64), 1e-12, None)
        return float((p * (np.log(p) - np.log(q))).sum(axis=1).mean())
    return abs(float(rebuilt["metrics"][rebuilt["main"]]) - float(expert["metrics"][expert["main"]]))


def _choose(task: str, cands: list[float], packed: list[dict], shapes: dict, base: Checkpoint, bundle_tmp: Path,
            expert: Checkpoint, whole_keys: list[str], validation, select: str = "fidelity") -> tuple[int, list[dict]]:
    """The index of the lambda chosen on ``validation`` (the first of equal ones) by ``select``, with
    every candidate's score; one candidate needs no evaluation."""
    if len(cands) == 1 or validation is None:
        return 0, []
    from ..eval.runner import evaluate_model

    reference = evaluate_model({"name": f"{task}-expert", "path": str(expert.path)}, [validation])[validation.name] \
        if select == "fidelity" else None
    tau = Checkpoint(bundle_tmp / "tau_mtl")
    scores, best = [], None
    for j, lam in enumerate(cands):
        folder = bundle_tmp / f".select-{task}-{j}"
        folder.mkdir()
        try:
            _write_expert(folder, base, tau, lambda k: unpack_mask(packed[j][k], shapes[k]), expert, whole_keys, expert.path)
            r = evaluate_model({"name": f"{task}-lambda-{lam:g}", "path": str(folder)}, [validation])[validation.name]
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        score = float(r["metrics"][r["main"]])
        row = {"lambda": lam, r["main"]: score}
        if reference is not None:
            row["gap"] = fidelity_gap(reference, r)
            row[f"expert_{r['main']}"] = float(reference["metrics"][reference["main"]])
            signed = -row["gap"]
        else:
            signed = score if r["higher_is_better"] else -score
        scores.append(row)
        if best is None or signed > best[0]:
            best = (signed, j)
    return best[1], scores


def read_manifest(bundle: str | Path) -> dict:
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise FileFormatError(f"{bundle} is not a TALL bundle (no {MANIFEST}); give a folder graft compress wrote")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FileFormatError(f"{path} is not valid JSON; write the bundle again with graft compress") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("tasks"), dict):
        raise FileFormatError(f"{path} is not a TALL bundle manifest; give a folder graft compress wrote")
    if m.get("version") != VERSION:
        raise FileFormatError(f"{path} is a bundle of version {m.get('version')}; this graftkit reads version {VERSION}")
    return m


def task_folder(bundle: str | Path, task: str) -> Path:
    """``bundle``'s folder of ``task`` (its mask, stored tensors, config and tokenizer files);
    refused when ``bundle`` is not a bundle or lacks the task (the line names the tasks it has)."""
    bundle = Path(bundle)
    m = read_manifest(bundle)
    if task not in m["tasks"]:
        raise BundleError(f"{bundle} has no task {task!r}; it holds {', '.join(sorted(m['tasks']))}")
    return bundle / "tasks" / task


@dataclass
class BundleExpert:
    """One task of a bundle, checked against its base and ready to rebuild (:meth:`tensors`)."""

    bundle: Path
    task: str
    base_path: Path
    base: Checkpoint
    tau: Checkpoint
    masks: dict[str, torch.Tensor]
    whole: Checkpoint
    folder: Path  # the task's folder: config.json, tokenizer and other side files

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        return rebuild(self.base, self.tau, self.masks.__getitem__, self.whole, self.whole.keys())


def open_expert(bundle: str | Path, task: str, base: str | Path | None = None, base_hint: str = "with --base") -> BundleExpert:
    """Task ``task`` of ``bundle`` on ``base`` (default: the base path the bundle records), after
    the checks that it is that bundle's base: its tensors' names and shapes, then its fingerprint.
    ``base_hint`` says how the caller gives another base (``--base``, a model entry's ``path``)."""
    bundle = Path(bundle)
    folder = task_folder(bundle, task)
    m = read_manifest(bundle)
    base_path = Path(base) if base is not None else Path(m["base"]["path"])
    if base is None and not base_path.exists():
        raise BundleError(f"the base {base_path} recorded in {bundle} does not exist (the bundle references it, not a copy); "
                          f"give the base folder {base_hint}")
    base_ck = Checkpoint(base_path)
    tau = Checkpoint(bundle / "tau_mtl")
    keys = tau.keys()
    missing = [k for k in keys if k not in base_ck.files or tuple(base_ck.shape(k)) != tuple(tau.shape(k))]
    if missing:
        raise BundleError(f"{base_path} is not the base of {bundle}: {missing[0]} is missing or of another shape; "
                          f"give the base it was made from ({m['base']['path']}) {base_hint}")
    fp = base_fingerprint(base_ck.get, {k: tau.shape(k) for k in keys})
    try:
        check_base(m["base"].get("fingerprint"), fp, bundle)
    except GraftError as exc:
        raise BundleError(f"{exc} (base given: {base_path})") from None
    masks = load_masks(folder / "mask.safetensors", fp)
    return BundleExpert(bundle, task, base_path, base_ck, tau, masks, Checkpoint(folder / "whole.safetensors"), folder)


def recorded_base(bundle: str | Path) -> str | None:
    """The base path ``bundle`` records, or None where it is not a readable bundle (the reader of
    the bundle reports that, with the reason)."""
    try:
        return str(read_manifest(bundle)["base"]["path"])
    except (GraftError, OSError, KeyError, TypeError):
        return None


def decompress(bundle: str | Path, task: str, out: str | Path, base: str | Path | None = None, overwrite: bool = False) -> Path:
    """Rebuild expert ``task`` as an HF folder: ``theta_0 + m_t * tau_MTL`` for the merged tensors,
    the task's stored tensors for the rest, and the expert's config and tokenizer files."""
    from ..outputs import atomic_dir, check_output

    ex = open_expert(bundle, task, base)
    check_output(out, [("bundle", ex.bundle), ("base", ex.base_path)])
    with atomic_dir(out, overwrite=overwrite) as tmp:
        _write_expert(tmp, ex.base, ex.tau, ex.masks.__getitem__, ex.whole, ex.whole.keys(), ex.folder)
    return Path(out)
