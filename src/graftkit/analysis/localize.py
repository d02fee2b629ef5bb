"""Skill localization: which few entries of a fine-tuning delta carry the task.

Panigrahi et al. 2023 ("Task-Specific Skill Localization in Fine-tuned Language Models") graft
a sparse part of the delta ``delta = theta_ft - theta0`` onto the base,
``theta(gamma) = theta0 + gamma (.) delta``, and ask how small the grafted region can be while
the task loss stays that of the fine-tuned model. Two masks at each sparsity ``s`` (the share of
all delta entries grafted, ``k = max(1, round(s * N))`` entries):

* **magnitude**: the ``k`` largest ``|delta|`` over the whole model (one global threshold, not
  one per tensor; exactly ``k`` entries, ties broken by position);
* **learned**: ``gamma = sigmoid(S)``, ``S`` starts at ``+init`` on the magnitude mask and
  ``-init`` elsewhere, and is optimised with Adam on the task's training data to lower the
  cross-entropy of ``theta(gamma)`` (optionally plus ``l1 * mean(gamma)``); the result is
  binarised to the ``k`` largest ``S`` (the paper's "optimise, then keep the top-s"). The
  binarised mask is scored on the whole training set every ``eval_every`` steps and the best
  one kept; step 0 is the magnitude mask itself, so the learned mask's training loss is never
  above the magnitude mask's (the report says whether it improved on it).

The model is the fine-tuned one; the grafted weights go in through ``torch.func.functional_call``
so nothing is copied per step. Tensors of the expert that the base lacks (a fresh classifier
head) or that ``exclude`` names are the expert's own in every grafted model. Everything held
in memory is base + delta + S (three copies of the grafted tensors): fine for MiniLM-sized
models; the delta is not flattened into one vector except for the top-k selection.

Expert: a full fine-tune folder, or an adapter folder whose method has a weight delta (it is
folded into its base as ``graft eval`` does, and the delta taken from the folded weights).
"""
from __future__ import annotations

import fnmatch
import re
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import Field, field_validator

from ..config import StrictModel, parse_config, read_yaml
from ..errors import ConfigError, GraftError, UnsupportedError


class LocalizeError(GraftError):
    """A localization cannot run as asked (no shared tensors, no delta, a task of the wrong kind)."""


# -- recipe ---------------------------------------------------------------------------------------
class LocalizeConfig(StrictModel):
    base: str                     # the pre-trained model (folder or packaged alias)
    expert: str                   # fine-tuned model folder, or adapter folder on `base`
    task: dict                    # a graft eval classification task (name, file, ...): the training data
    sparsity: list[float]         # shares of the delta's entries to graft, each in (0, 1]
    steps: int = Field(100, gt=0)  # optimisation steps of the learned mask, one batch each
    lr: float = Field(0.1, gt=0)  # Adam on the logits S
    init: float = Field(3.0, gt=0)  # |S| at the start: sigmoid(3) = 0.95
    l1: float = Field(0.0, ge=0)  # weight of mean(gamma) in the loss
    eval_every: int = Field(25, gt=0)
    exclude: list[str] = Field(default_factory=list)  # globs of tensors never grafted (taken from the expert)
    masks: list[str] = Field(default_factory=list)  # existing mask files to score too (made on this base)
    save_grafted: bool = False    # also write each grafted model as an HF folder
    seed: int = 0
    out: str

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("give at least one sparsity level, e.g. [0.001, 0.01, 0.1]")
        for s in v:
            check_sparsity(s)
        return sorted(set(float(s) for s in v))


def check_sparsity(s: Any) -> float:
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not (0 < s <= 1) or math.isnan(s):
        raise ValueError(f"sparsity {s!r} is outside (0, 1]; give the share of delta entries to graft, e.g. 0.01 for 1%")
    return float(s)


def load_localize_config(source: Any) -> LocalizeConfig:
    if isinstance(source, (str, Path)):
        source = read_yaml(source, "localize recipe")
    return parse_config(LocalizeConfig, source)


# -- pure math --------------------------------------------------------------------------------------
def budget(numel: int, s: float) -> int:
    """Entries grafted at sparsity ``s``: at least one, at most all."""
    try:
        check_sparsity(s)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return min(numel, max(1, round(s * numel)))


def topk_masks(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Bool masks holding exactly the ``k`` largest scores over all tensors together."""
    names = list(scores)
    flat = torch.cat([scores[n].detach().reshape(-1).float() for n in names])
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.topk(flat, k, sorted=False).indices] = True
    out, at = {}, 0
    for n in names:
        m = scores[n].numel()
        out[n] = keep[at:at + m].reshape(scores[n].shape)
        at += m
    return out


def magnitude_masks(deltas: dict[str, torch.Tensor], s: float) -> dict[str, torch.Tensor]:
    n = sum(d.numel() for d in deltas.values())
    return topk_masks({k: d.abs() for k, d in deltas.items()}, budget(n, s))


def grafted(base: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor], gamma: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: base[n] + gamma[n].to(deltas[n].dtype) * deltas[n] for n in deltas}


# -- the model side -----------------------------------------------------------------------------------
class Graft:
    """A fine-tuned classifier, its base and delta over the shared tensors, and the training batches.

    ``names`` maps the model's parameter names (what functional_call takes) to the base
    checkpoint's keys (what a mask file is keyed by)."""

    def __init__(self, model: torch.nn.Module, base: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor],
                 batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], names: dict[str, str] | None = None):
        if not deltas:
            raise LocalizeError("the expert shares no tensor with the base (names and shapes); give the base it was fine-tuned from")
        self.model, self.base, self.deltas, self.batches = model, base, deltas, batches
        self.names = names or {n: n for n in deltas}
        self.numel = sum(d.numel() for d in deltas.values())

    def logits(self, params: dict[str, torch.Tensor], ids, mask) -> torch.Tensor:
        from torch.func import functional_call

        return functional_call(self.model, params, (), {"input_ids": ids, "attention_mask": mask}).logits.float()

    def loss(self, params: dict[str, torch.Tensor], batch) -> torch.Tensor:
        ids, mask, gold = batch
        return torch.nn.functional.cross_entropy(self.logits(params, ids, mask), gold)

    @torch.no_grad()
    def score(self, params: dict[str, torch.Tensor]) -> dict[str, float]:
        """Training-set loss (mean cross-entropy per example), accuracy and ECE of these weights."""
        from ..eval.metrics import expected_calibration_error

        probs, golds, total = [], [], 0.0
        for ids, mask, gold in self.batches:
            logits = self.logits(params, ids, mask)
            total += float(torch.nn.functional.cross_entropy(logits, gold, reduction="sum"))
            probs.append(torch.softmax(logits, -1))
            golds.append(gold)
        p, g = torch.cat(probs), torch.cat(golds)
        return {"loss": total / len(g), "accuracy": float((p.argmax(-1) == g).float().mean()),
                "ece": expected_calibration_error(p.numpy(), g.numpy())}

    def score_mask(self, masks: dict[str, torch.Tensor]) -> dict[str, float]:
        return self.score(grafted(self.base, self.deltas, masks))

    def learn(self, s: float, *, steps: int, lr: float, init: float = 3.0, l1: float = 0.0, eval_every: int = 25,
              seed: int = 0, progress: Callable[[int], None] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        """The learned binary mask at sparsity ``s`` and its history (see the module docstring)."""
        k = budget(self.numel, s)
        start = topk_masks({n: d.abs() for n, d in self.deltas.items()}, k)
        logits_s = {n: torch.where(m, init, -init).float().requires_grad_(True) for n, m in start.items()}
        opt = torch.optim.Adam(list(logits_s.values()), lr=lr)
        best_mask, best = start, self.score_mask(start)
        history = [{"step": 0, **best}]
        best_step = 0
        gen = torch.Generator().manual_seed(seed)
        for step in range(1, steps + 1):
            batch = self.batches[int(torch.randint(len(self.batches), (1,), generator=gen))]
            gamma = {n: torch.sigmoid(v) for n, v in logits_s.items()}
            loss = self.loss(grafted(self.base, self.deltas, gamma), batch)
            if l1:
                loss = loss + l1 * sum(g.sum() for g in gamma.values()) / self.numel
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if progress is not None:
                progress(1)
            if step % eval_every == 0 or step == steps:
                mask = topk_masks(logits_s, k)
                got = self.score_mask(mask)
                history.append({"step": step, **got})
                if got["loss"] < best["loss"]:
                    best_mask, best, best_step = mask, got, step
        return best_mask, {"k": k, "best_step": best_step, "history": history, **best}


def _pair_names(model: torch.nn.Module, base_keys: dict[str, tuple], exclude: list[str]) -> dict[str, str]:
    """Model parameter name -> base checkpoint key, for the tensors both have with one shape.
    A task model's names carry a prefix (``bert.``) that a bare base checkpoint lacks."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = {}
    for name, p in model.named_parameters():
        if not p.is_floating_point() or any(fnmatch.fnmatch(name, g) for g in exclude):
            continue
        cands = [name]
        if prefix and name.startswith(prefix + "."):
            cands.append(name[len(prefix) + 1:])
        elif prefix:
            cands.append(f"{prefix}.{name}")
        for c in cands:
            if c in base_keys and tuple(base_keys[c]) == tuple(p.shape):
                out[name] = c
                break
    return out


def open_graft(cfg: LocalizeConfig) -> tuple[Graft, dict]:
    """Load the expert (with its classifier head), the base tensors it shares, and the task's training batches."""
    from ..assets import model_dir
    from ..eval.classify import gold_ids, length_batches, right_pad
    from ..eval.config import ClassificationTask, ModelSpec, parse_task
    from ..eval.models import choose_head, install_head, load, load_tokenizer, pad_id, tokenizer_folder
    from ..eval.tasks import load_task
    from ..merge.adapters import is_adapter
    from ..tensors import Checkpoint

    task = parse_task(cfg.task, "task")
    if not isinstance(task, ClassificationTask):
        raise UnsupportedError(f"graft localize scores classification tasks; task {task.name!r} is a {task.kind} task")
    if is_adapter(cfg.expert):
        from ..io import read_adapter
        from ..methods import method_named

        adapter = read_adapter(cfg.expert)
        if not method_named(adapter.method).weight_delta(adapter.meta.get("config") or {}):
            raise UnsupportedError(f"{cfg.expert} is a {adapter.method} adapter, which changes activations, not weights; "
                                   "skill localization needs a weight delta (a full fine-tune, LoRA, IA3, ...)")
        spec = ModelSpec(name="expert", path=cfg.base, adapter=cfg.expert)
    else:
        spec = ModelSpec(name="expert", path=cfg.expert)
    data = load_task(task)
    loaded = load(spec, "classification")
    model = loaded.model
    head = choose_head(loaded, task.name, task.head)
    if head is not loaded.own:
        install_head(model, head)
    gold = gold_ids(data.references, head, task.file)
    tok = load_tokenizer(tokenizer_folder(spec))
    enc = [ids[:task.max_length] for ids in tok(data.texts, truncation=False, add_special_tokens=True)["input_ids"]]
    pad = pad_id(tok)
    batches = []
    for idx in length_batches([len(e) for e in enc], task.batch_size):
        ids, mask = right_pad([enc[i] for i in idx], pad, "cpu")
        batches.append((ids, mask, torch.tensor([gold[i] for i in idx])))

    base_ckpt = Checkpoint(model_dir(cfg.base))
    names = _pair_names(model, {k: base_ckpt.shape(k) for k in base_ckpt.keys()}, cfg.exclude)
    params = dict(model.named_parameters())
    base, deltas = {}, {}
    for name, key in names.items():
        b = base_ckpt.get(key).to(params[name].dtype)
        d = params[name].detach() - b
        if d.abs().max() > 0:  # an untouched tensor (frozen while fine-tuning) has nothing to localize
            base[name], deltas[name] = b, d
    if not deltas:
        raise LocalizeError(f"{cfg.expert} does not differ from {cfg.base} in any shared tensor; give a fine-tuned model of that base")
    graft = Graft(model, base, deltas, batches, {n: names[n] for n in deltas})
    info = {"task": task.name, "examples": len(gold), "labels": head.labels, "tokenizer": tok,
            "base_ckpt": base_ckpt, "kept_from_expert": sorted(set(params) - set(deltas))}
    return graft, info


def mask_fingerprint(graft: Graft, base_ckpt) -> dict:
    from .masks import base_fingerprint

    return base_fingerprint(base_ckpt.get, {graft.names[n]: tuple(d.shape) for n, d in graft.deltas.items()})


def run_localize(cfg: LocalizeConfig | dict | str | Path, progress: bool = True) -> dict:
    """Run a localize recipe end to end; writes masks, the report and ``result.json`` under ``out``."""
    from .masks import load_masks, save_masks

    cfg = load_localize_config(cfg)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out {out} is a file; give a folder for the masks and the report")
    torch.manual_seed(cfg.seed)
    graft, info = open_graft(cfg)
    fp = mask_fingerprint(graft, info["base_ckpt"])
    by_key = {v: k for k, v in graft.names.items()}
    given = {}
    for path in cfg.masks:  # read them all before any work, so a wrong one costs nothing
        m = load_masks(path, fp)
        missing = sorted(set(by_key) - set(m))
        if missing:
            raise LocalizeError(f"{path} has no mask for {missing[0]} (and {len(missing) - 1} more); give masks made for this expert's delta")
        given[path] = {by_key[k]: m[k] for k in by_key}
    t0 = time.time()
    zero = {n: torch.zeros_like(d, dtype=torch.bool) for n, d in graft.deltas.items()}
    one = {n: torch.ones_like(d, dtype=torch.bool) for n, d in graft.deltas.items()}
    result: dict[str, Any] = {"base": cfg.base, "expert": cfg.expert, "task": info["task"], "examples": info["examples"],
                              "delta_entries": graft.numel, "tensors": len(graft.deltas),
                              "kept_from_expert": info["kept_from_expert"], "steps": cfg.steps, "lr": cfg.lr,
                              "init": cfg.init, "l1": cfg.l1, "finetuned": graft.score_mask(one), "base_scores": graft.score_mask(zero),
                              "levels": [], "given": []}
    total = cfg.steps * len(cfg.sparsity)
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        if progress and (done[0] % max(1, total // 20) == 0 or done[0] == total):
            print(f"graft localize: {done[0]}/{total} mask steps ({time.time() - t0:.0f}s)", flush=True)

    masks_out: dict[str, dict] = {}
    for s in cfg.sparsity:
        mag = magnitude_masks(graft.deltas, s)
        mag_scores = graft.score_mask(mag)
        learned, hist = graft.learn(s, steps=cfg.steps, lr=cfg.lr, init=cfg.init, l1=cfg.l1,
                                    eval_every=cfg.eval_every, seed=cfg.seed, progress=tick)
        overlap = sum(int((mag[n] & learned[n]).sum()) for n in mag)
        result["levels"].append({"sparsity": s, "k": hist["k"], "magnitude": mag_scores,
                                 "learned": {k: hist[k] for k in ("loss", "accuracy", "ece", "best_step")},
                                 "history": hist["history"], "overlap": overlap / hist["k"]})
        masks_out[f"magnitude-s{s:g}"] = mag
        masks_out[f"learned-s{s:g}"] = learned
    for path, m in given.items():
        result["given"].append({"path": path, "k": sum(int(v.sum()) for v in m.values()), **graft.score_mask(m)})
    if len(given) > 1:  # several experts' (or levels') regions: overlap, and this expert grafted on their union
        labels = [Path(p).stem if Path(p).stem not in [Path(q).stem for q in given if q != p] else p for p in given]
        result["overlap"] = mask_jaccard(dict(zip(labels, given.values())))
        union = {n: torch.stack([m[n] for m in given.values()]).any(0) for n in graft.deltas}
        result["union"] = {"k": sum(int(v.sum()) for v in union.values()), **graft.score_mask(union)}
    result["seconds"] = time.time() - t0

    # every computation is done: write
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name, m in masks_out.items():
        files.append(str(save_masks(out / "masks" / f"{name}.safetensors", {graft.names[n]: v for n, v in m.items()}, fp)))
        if cfg.save_grafted:
            files.append(str(_save_grafted(graft, m, info["tokenizer"], out / "grafted" / name)))
    result["files"] = files
    from ..eval.report import write_sections

    sections, figures = build_localize_sections(result)
    html, md = write_sections(f"graft localize: {cfg.expert}", sections, figures, out)
    result["report"] = [str(html), str(md)]
    tmp = out / ".result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / "result.json")
    return result


@torch.no_grad()
def _save_grafted(graft: Graft, masks: dict[str, torch.Tensor], tok, folder: Path) -> Path:
    """Write the expert with its shared tensors replaced by the grafted ones (HF folder)."""
    params = dict(graft.model.named_parameters())
    saved = {n: params[n].detach().clone() for n in graft.deltas}
    try:
        for n, w in grafted(graft.base, graft.deltas, masks).items():
            params[n].copy_(w)
        graft.model.save_pretrained(folder)
        tok.save_pretrained(folder)
    finally:
        for n, w in saved.items():
            params[n].copy_(w)
    return folder


# -- report ---------------------------------------------------------------------------------------
def _pct(s: float) -> str:
    return f"{100 * s:g}%"


def build_localize_sections(result: dict) -> tuple[list, list]:
    from ..eval.report import Cell, Details, Figure, Para, Pre, Section, Table, new_figure, png_bytes

    ft, b = result["finetuned"], result["base_scores"]
    acc_ft = ft["accuracy"] or float("nan")

    def ret(a: float) -> str:
        return f"{a / acc_ft:.3f}" if acc_ft == acc_ft and acc_ft > 0 else "n/a"

    summary = Section("summary", "Summary", [
        Para(f"Base {result['base']}, expert {result['expert']}, task {result['task']} ({result['examples']} training examples). "
             f"The delta spans {result['delta_entries']:,} entries in {result['tensors']} tensors; "
             f"{len(result['kept_from_expert'])} tensors (e.g. a new classifier head) are always the expert's own."),
        Para(f"Fine-tuned: loss {ft['loss']:.4f}, accuracy {ft['accuracy']:.3f}, ECE {ft['ece']:.3f}. "
             f"Base with the expert's head (nothing grafted): loss {b['loss']:.4f}, accuracy {b['accuracy']:.3f}."),
        Para(f"Learned masks: {result['steps']} Adam steps at lr {result['lr']:g} from |S| = {result['init']:g}, "
             f"l1 {result['l1']:g}; scores are on the training data the masks were fitted on."),
    ])
    head = [Cell(t) for t in ("sparsity", "entries", "magnitude loss", "magnitude acc", "retained", "ECE",
                              "learned loss", "learned acc", "retained", "ECE", "best step", "overlap")]
    rows = []
    for lv in result["levels"]:
        m, l = lv["magnitude"], lv["learned"]
        rows.append([Cell(_pct(lv["sparsity"])), Cell(f"{lv['k']:,}", num=True),
                     Cell(f"{m['loss']:.4f}", num=True), Cell(f"{m['accuracy']:.3f}", num=True), Cell(ret(m["accuracy"]), num=True),
                     Cell(f"{m['ece']:.3f}", num=True),
                     Cell(f"{l['loss']:.4f}", num=True, bold=l["loss"] < m["loss"]), Cell(f"{l['accuracy']:.3f}", num=True),
                     Cell(ret(l["accuracy"]), num=True), Cell(f"{l['ece']:.3f}", num=True), Cell(str(l["best_step"]), num=True),
                     Cell(f"{lv['overlap']:.2f}", num=True)])
    for g in result.get("given") or []:
        rows.append([Cell(Path(g["path"]).name), Cell(f"{g['k']:,}", num=True), Cell(f"{g['loss']:.4f}", num=True),
                     Cell(f"{g['accuracy']:.3f}", num=True), Cell(ret(g["accuracy"]), num=True), Cell(f"{g['ece']:.3f}", num=True)]
                    + [Cell("") for _ in range(6)])
    table = Table(head, rows, note=f"retained = grafted accuracy / fine-tuned accuracy ({ft['accuracy']:.3f}); ECE of the "
                  f"fine-tuned model {ft['ece']:.3f}. best step 0 means optimisation did not beat the magnitude mask. "
                  "overlap = share of the learned mask's entries that the magnitude mask also has.")
    figures = []
    levels = result["levels"]
    if levels:
        fig = new_figure(6, 3.4)
        ax = fig.add_subplot(111)
        xs = [100 * lv["sparsity"] for lv in levels]
        ax.plot(xs, [lv["magnitude"]["accuracy"] for lv in levels], "o-", label="magnitude")
        ax.plot(xs, [lv["learned"]["accuracy"] for lv in levels], "s-", label="learned")
        ax.axhline(ft["accuracy"], color="grey", ls="--", label="fine-tuned")
        ax.axhline(b["accuracy"], color="grey", ls=":", label="base")
        ax.set_xscale("log")
        ax.set_xlabel("grafted share of delta entries (%)")
        ax.set_ylabel("training accuracy")
        ax.legend()
        figures.append(Figure("localize_accuracy", png_bytes(fig), "accuracy against sparsity, learned and magnitude masks",
                              "Training accuracy of the grafted model against the grafted share of the delta."))
    scores = Section("scores", "Learned vs magnitude masks", [table] + [f for f in figures])
    hist = Section("history", "Optimisation history", [
        Details(f"s = {_pct(lv['sparsity'])}", [Pre("\n".join(
            f"step {h['step']:>5}  loss {h['loss']:.4f}  acc {h['accuracy']:.3f}  ece {h['ece']:.3f}" for h in lv["history"]))])
        for lv in levels] or [Para("no sparsity levels")])
    files = Section("files", "Files", [Pre("\n".join(result.get("files") or []) or "none")])
    out = [summary, scores, hist]
    ov = result.get("overlap")
    if ov:
        from ..eval.report import heatmap, chart_style

        names = ov["experts"]
        with chart_style():
            fig = new_figure(1.6 + 0.7 * len(names), 1.2 + 0.6 * len(names))
            ax = fig.add_subplot(111)
            heatmap(ax, fig, ov["all"], names, "Jaccard overlap of the given masks", "viridis", 0.0, 1.0, "Jaccard", True)
        figures.append(Figure("localize_overlap", png_bytes(fig), "Jaccard overlap of the given masks"))
        pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
        grows = [[Cell(g)] + [Cell(f"{m[i][j]:.3f}", num=True) for i, j in pairs] for g, m in sorted(ov["groups"].items())]
        u = result["union"]
        out.append(Section("overlap", "Overlap of the given masks", [
            figures[-1],
            Para(f"This expert grafted on the union of the given masks ({u['k']:,} entries): loss {u['loss']:.4f}, "
                 f"accuracy {u['accuracy']:.3f} (retained {ret(u['accuracy'])}), ECE {u['ece']:.3f}."),
            Details("per layer and module type", [Table([Cell("layer/module")] + [Cell(f"{names[i]} vs {names[j]}") for i, j in pairs], grows)])]))
    return out + [files], figures


# -- several experts: where their localized regions overlap (issue 17 item 2, the pure part) ---------
_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


def mask_group(name: str) -> tuple[str, str]:
    """(layer, module type) of a tensor name: ``encoder.layer.3.attention.self.query.weight`` ->
    ("3", "attention.self.query"); tensors outside the numbered blocks are layer "-"."""
    m = _LAYER.search(name)
    if m is None:
        return "-", name.rsplit(".", 1)[0]
    return m.group(1), name[m.end():].rsplit(".", 1)[0]


def mask_jaccard(masks: dict[str, dict[str, torch.Tensor]]) -> dict:
    """Jaccard overlap ``|A & B| / |A | B|`` of several experts' masks (same keys and shapes): over
    the whole model and per (layer, module type). 1.0 where both masks are empty in a group."""
    names = list(masks)
    keys = list(masks[names[0]]) if names else []
    for e in names[1:]:
        if set(masks[e]) != set(keys) or any(masks[e][k].shape != masks[names[0]][k].shape for k in keys):
            raise LocalizeError(f"the masks of {names[0]} and {e} cover different tensors; compare masks made on one base for one delta layout")
    n = len(names)
    inter: dict[tuple, torch.Tensor] = {}
    union: dict[tuple, torch.Tensor] = {}
    for k in keys:
        g = mask_group(k)
        flat = torch.stack([masks[e][k].reshape(-1) for e in names]).float()
        i = flat @ flat.T
        sizes = flat.sum(1)
        u = sizes[:, None] + sizes[None, :] - i
        for grp in (g, ("all", "all")):
            inter[grp] = inter.get(grp, torch.zeros(n, n, dtype=torch.float64)) + i.double()
            union[grp] = union.get(grp, torch.zeros(n, n, dtype=torch.float64)) + u.double()

    def jac(grp):
        i, u = inter[grp], union[grp]
        return torch.where(u > 0, i / u.clamp(min=1), torch.ones_like(u)).tolist()

    return {"experts": names, "all": jac(("all", "all")) if keys else [],
            "groups": {f"{layer}/{module}": jac((layer, module)) for layer, module in inter if layer != "all"}}
