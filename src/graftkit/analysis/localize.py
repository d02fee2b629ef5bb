"""Skill localization: which few entries of a fine-tuning delta carry the task.

Panigrahi et al. 2023 ("Task-Specific Skill Localization in Fine-tuned Language Models") graft
a sparse part of the delta ``delta = theta_ft - theta0`` onto the base,
``theta(gamma) = theta0 + gamma (.) delta``, and ask how small the grafted region can be while
the task loss stays that of the fine-tuned model. Two masks at each sparsity ``s`` (the share of
all delta entries grafted, ``k = max(1, round(s * N))`` entries):

* **magnitude**: the ``k`` largest ``|delta|`` over the whole model (one global threshold, not
  one per tensor; exactly ``k`` entries, ties broken by position);
* **learned**: ``gamma = sigmoid(S)``, ``S`` starts at ``+init`` on the magnitude mask and
  ``-init`` elsewhere, and is optimised on the task's training data to lower the cross-entropy of
  ``theta(gamma)`` (optionally plus ``l1 * mean(gamma)``). As in the paper's code, each step is plain
  gradient descent on ``S`` with the gradient of the whole training set (``batches_per_step``
  fewer batches); the paper's learning rate of ~1e7 is replaced by a scale-free one (``sgd_step``:
  the budget-th largest gradient moves its logit by ``lr``). ``optimizer: adam`` is the alternative;
  it moves every logit by about ``lr`` whatever its gradient's size, which lets entries with tiny
  deltas but a steady gradient sign crowd out the ones that matter. By default the forward pass uses
  the binarised mask and the gradient is that of the relaxation (straight-through), so the loss
  being lowered is the binary mask's, not that of a relaxed model that also grafts ``sigmoid(-init)``
  of every other entry. The result is binarised to exactly the ``k`` largest ``S`` (the paper
  rounds ``gamma`` at 0.5, which lets the size drift; a fixed ``k`` compares equal budgets). The
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

With ``eval_task`` every mask and the fine-tuned and base models are also scored on held-out data
(the masks are still chosen on the training objective alone). The multi-expert form (``experts:``)
localizes each expert in turn, one in memory at a time, then per sparsity compares their learned
masks (Jaccard) and grafts each expert's own delta on the union of all of them (the paper's
multi-task graft).
"""
from __future__ import annotations

import fnmatch
import re
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
from pydantic import Field, field_validator

from ..config import StrictModel, parse_config, read_yaml
from ..errors import ConfigError, GraftError, UnsupportedError


class LocalizeError(GraftError):
    """A localization cannot run as asked (no shared tensors, no delta, a task of the wrong kind)."""


# -- recipe ---------------------------------------------------------------------------------------
class ExpertEntry(StrictModel):
    """One expert of the multi-expert form (``experts: {name: {expert, task, eval_task}}``)."""
    expert: str
    task: dict
    eval_task: dict | None = None


class LocalizeConfig(StrictModel):
    base: str                     # the pre-trained model (folder or packaged alias)
    expert: str | None = None     # fine-tuned model folder, or adapter folder on `base`
    task: dict | None = None      # a graft eval classification task (name, file, ...): the training data
    eval_task: dict | None = None  # held-out data (typically the test split) every mask is also scored on
    experts: dict[str, Any] | None = None  # the multi-expert form: {name: ExpertEntry fields}, instead of expert/task/eval_task
    sparsity: list[float]         # shares of the delta's entries to graft, each in (0, 1]
    steps: int = Field(20, gt=0)  # optimisation steps of the learned mask
    optimizer: Literal["sgd", "adam"] = "sgd"  # sgd: steps proportional to the gradient (the paper's); see sgd_step
    lr: Optional[float] = Field(None, gt=0)  # default 1.0 for sgd (the budget-th largest gradient's step), 0.1 for adam
    batches_per_step: Optional[int] = Field(None, gt=0)  # training batches per step; default all (a full-batch gradient)
    straight_through: bool = True  # forward with the binary mask, gradient of the sigmoid relaxation
    init: float = Field(3.0, gt=0)  # |S| at the start: sigmoid(3) = 0.95
    l1: float = Field(0.0, ge=0)  # weight of mean(gamma) in the loss
    eval_every: int = Field(5, gt=0)
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

    def single(self, name: str) -> "LocalizeConfig":
        """The single-expert recipe of one entry of ``experts`` (same base and settings)."""
        e = self.experts[name]
        return self.model_copy(update={"experts": None, "expert": e.expert, "task": e.task, "eval_task": e.eval_task})


_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def check_sparsity(s: Any) -> float:
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not (0 < s <= 1) or math.isnan(s):
        raise ValueError(f"sparsity {s!r} is outside (0, 1]; give the share of delta entries to graft, e.g. 0.01 for 1%")
    return float(s)


def load_localize_config(source: Any) -> LocalizeConfig:
    if isinstance(source, (str, Path)):
        source = read_yaml(source, "localize recipe")
    cfg = parse_config(LocalizeConfig, source)
    check_form(cfg)
    return cfg


def check_form(cfg: LocalizeConfig) -> None:
    """One expert at the top level, or two or more distinct, well-named ones under ``experts``."""
    if cfg.experts is None:
        if cfg.expert is None or cfg.task is None:
            raise ConfigError("localize recipe: give the expert and its task (expert:, task:), "
                              "or several experts under experts: {name: {expert: ..., task: ...}}")
        return
    top = [k for k in ("expert", "task", "eval_task") if getattr(cfg, k) is not None] + (["masks"] if cfg.masks else [])
    if top:
        raise ConfigError(f"localize recipe: give either experts: or {'/'.join(top)} at the top level, not both "
                          "(each entry of experts: has its own expert, task and eval_task)")
    n = len(cfg.experts)
    if n < 2:
        raise ConfigError(f"localize recipe: experts: has {n} entr{'y' if n == 1 else 'ies'}; give two or more "
                          "(for one expert put expert/task/eval_task at the top level)")
    seen: dict[str, str] = {}
    entries = {}
    for name, e in cfg.experts.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
            raise ConfigError(f"localize recipe: expert name {name!r} must be letters, digits, '.', '_' or '-' (it names output folders)")
        if not e:
            raise ConfigError(f"localize recipe: experts.{name} is empty; give its expert: and task: (and optionally eval_task:)")
        try:
            e = entries[name] = parse_config(ExpertEntry, e)
        except ConfigError as exc:
            raise ConfigError(f"localize recipe: experts.{name}: {exc}") from None
        p = Path(e.expert).expanduser()
        where = str(p.resolve()) if p.exists() else e.expert
        if where in seen:
            raise ConfigError(f"localize recipe: experts {seen[where]!r} and {name!r} both name {e.expert}; give each expert once")
        seen[where] = name
    cfg.experts = entries


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
        return score_weights(self, params, self.batches)

    def score_mask(self, masks: dict[str, torch.Tensor]) -> dict[str, float]:
        return self.score(grafted(self.base, self.deltas, masks))

    def mask_gradient(self, logits_s: dict[str, torch.Tensor], k: int, batches: list, *, straight_through: bool = True,
                      l1: float = 0.0) -> float:
        """Accumulate into ``logits_s[n].grad`` the gradient of the mean loss over ``batches``; returns that loss.

        Straight-through: the forward pass grafts the binary mask (the ``k`` largest logits), the one
        the step will be judged by; the gradient is the sigmoid relaxation's, ``dL/dtheta * delta *
        sigmoid'(S)``. A relaxed forward would also graft ``sigmoid(-init)`` of every other entry and
        lower a loss that the binary mask does not have."""
        hard = topk_masks(logits_s, k) if straight_through else None
        total = 0.0
        for batch in batches:  # one gradient over all the batches (the paper accumulates the whole set)
            soft = {n: torch.sigmoid(v) for n, v in logits_s.items()}
            gamma = {n: hard[n].float() + soft[n] - soft[n].detach() for n in soft} if hard is not None else soft
            loss = self.loss(grafted(self.base, self.deltas, gamma), batch)
            if l1:
                loss = loss + l1 * sum(g.sum() for g in soft.values()) / self.numel
            (loss / len(batches)).backward()
            total += float(loss.detach()) / len(batches)
        return total

    def learn(self, s: float, *, steps: int, lr: float | None = None, optimizer: str = "sgd", init: float = 3.0,
              l1: float = 0.0, eval_every: int = 5, seed: int = 0, batches_per_step: int | None = None,
              straight_through: bool = True, progress: Callable[[int], None] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        """The learned binary mask at sparsity ``s`` and its history (see the module docstring)."""
        k = budget(self.numel, s)
        lr = default_lr(optimizer) if lr is None else lr
        start = topk_masks({n: d.abs() for n, d in self.deltas.items()}, k)
        logits_s = {n: torch.where(m, init, -init).float().requires_grad_(True) for n, m in start.items()}
        opt = torch.optim.Adam(list(logits_s.values()), lr=lr) if optimizer == "adam" else None
        best_mask, best = start, self.score_mask(start)
        history = [{"step": 0, **best}]
        best_step = 0
        gen = torch.Generator().manual_seed(seed)
        per_step = len(self.batches) if batches_per_step is None else min(batches_per_step, len(self.batches))
        for step in range(1, steps + 1):
            picked = (self.batches if per_step == len(self.batches) else
                      [self.batches[int(i)] for i in torch.randperm(len(self.batches), generator=gen)[:per_step]])
            self.mask_gradient(logits_s, k, picked, straight_through=straight_through, l1=l1)
            with torch.no_grad():
                if opt is not None:
                    opt.step()
                else:
                    sgd_step(logits_s, lr, k)
            for v in logits_s.values():
                v.grad = None
            if progress is not None:
                progress(1)
            if step % eval_every == 0 or step == steps:
                mask = topk_masks(logits_s, k)
                got = self.score_mask(mask)
                history.append({"step": step, **got})
                if got["loss"] < best["loss"]:
                    best_mask, best, best_step = mask, got, step
        return best_mask, {"k": k, "best_step": best_step, "history": history, **best}


def default_lr(optimizer: str) -> float:
    return {"sgd": 1.0, "adam": 0.1}[optimizer]


@torch.no_grad()
def sgd_step(logits_s: dict[str, torch.Tensor], lr: float, k: int) -> None:
    """One gradient-descent step on the mask logits, scaled so that the k-th largest gradient
    (k = the mask's budget) moves its logit by ``lr``.

    The paper runs plain SGD with a learning rate of about 1e7, because ``dL/dS = dL/dtheta * delta *
    sigmoid'(S)`` is tiny and model-dependent; dividing by a gradient quantile makes ``lr`` mean the same
    on every model. Unlike Adam, which moves every logit by about ``lr`` whatever its gradient's size,
    the step stays proportional to the gradient, so an entry whose graft barely matters (a tiny
    delta) does not displace one that matters."""
    flat = torch.cat([v.grad.abs().reshape(-1) for v in logits_s.values()])
    scale = float(torch.topk(flat, min(k, flat.numel()), sorted=False).values.min())
    if scale <= 0:
        scale = float(flat.max())
    if scale <= 0:
        return  # no gradient: nothing to learn from
    for v in logits_s.values():
        v.sub_(lr * v.grad / scale)


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


def _classification_task(data: dict, where: str):
    from ..eval.config import ClassificationTask, parse_task

    task = parse_task(data, where)
    if not isinstance(task, ClassificationTask):
        raise UnsupportedError(f"graft localize scores classification tasks; {where} {task.name!r} is a {task.kind} task")
    return task


def _task_batches(task, tok, head) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The task's examples, tokenized and batched by length, gold labels as ids of ``head``."""
    from ..eval.classify import gold_ids, length_batches, right_pad
    from ..eval.models import pad_id
    from ..eval.tasks import load_task

    data = load_task(task)
    gold = gold_ids(data.references, head, task.file)
    enc = [ids[:task.max_length] for ids in tok(data.texts, truncation=False, add_special_tokens=True)["input_ids"]]
    pad = pad_id(tok)
    batches = []
    for idx in length_batches([len(e) for e in enc], task.batch_size):
        ids, mask = right_pad([enc[i] for i in idx], pad, "cpu")
        batches.append((ids, mask, torch.tensor([gold[i] for i in idx])))
    return batches


def _delta_adapter(path: str):
    """The adapter at ``path``, refused unless its method changes weights (skill localization grafts a weight delta)."""
    from ..io import read_adapter
    from ..methods import method_named

    adapter = read_adapter(path)
    if not method_named(adapter.method).weight_delta(adapter.meta.get("config") or {}):
        raise UnsupportedError(f"{path} is a {adapter.method} adapter, which changes activations, not weights; "
                               "skill localization needs a weight delta (a full fine-tune, LoRA, IA3, ...)")
    return adapter


def check_expert(cfg: LocalizeConfig, name: str | None = None) -> None:
    """What can be checked before any mask is learned: the tasks are classification tasks whose data
    reads, the expert is a model folder, or an adapter with a weight delta made on ``base`` (its
    recorded fingerprint)."""
    from ..assets import model_dir
    from ..eval.tasks import load_task
    from ..merge.adapters import is_adapter

    where = f"expert {name!r}: " if name else ""
    try:
        load_task(_classification_task(cfg.task, "task"))
        if cfg.eval_task is not None:
            load_task(_classification_task(cfg.eval_task, "eval_task"))
        if not is_adapter(cfg.expert):
            model_dir(cfg.expert)
        else:
            from ..fingerprint import check_fingerprint
            from ..io import load_base_for

            adapter = _delta_adapter(cfg.expert)
            recorded = adapter.meta.get("base_model") or {}
            check_fingerprint(load_base_for(adapter, cfg.base), recorded.get("fingerprint"), set(adapter.train_also),
                              recorded.get("name_or_path"))
    except GraftError as exc:
        if not where:
            raise
        raise type(exc)(f"{where}{exc}") from None


def open_graft(cfg: LocalizeConfig) -> tuple[Graft, dict]:
    """Load the expert (with its classifier head), the base tensors it shares, and the task's training
    batches (and, with ``eval_task``, its held-out batches as ``info["eval_batches"]``)."""
    from ..assets import model_dir
    from ..eval.config import ModelSpec
    from ..eval.models import choose_head, install_head, load, load_tokenizer, tokenizer_folder
    from ..merge.adapters import is_adapter
    from ..tensors import Checkpoint

    task = _classification_task(cfg.task, "task")
    eval_task = _classification_task(cfg.eval_task, "eval_task") if cfg.eval_task is not None else None
    if is_adapter(cfg.expert):
        _delta_adapter(cfg.expert)
        spec = ModelSpec(name="expert", path=cfg.base, adapter=cfg.expert)
    else:
        spec = ModelSpec(name="expert", path=cfg.expert)
    loaded = load(spec, "classification")
    model = loaded.model
    head = choose_head(loaded, task.name, task.head)
    if head is not loaded.own:
        install_head(model, head)
    tok = load_tokenizer(tokenizer_folder(spec))
    batches = _task_batches(task, tok, head)
    # held-out examples are scored with the head the training data chose: one model, one label set
    eval_batches = _task_batches(eval_task, tok, head) if eval_task is not None else None

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
    info = {"task": task.name, "examples": sum(len(b[2]) for b in batches), "labels": head.labels, "tokenizer": tok,
            "base_ckpt": base_ckpt, "kept_from_expert": sorted(set(params) - set(deltas)), "eval_batches": eval_batches,
            "eval_task": eval_task.name if eval_task is not None else None,
            "eval_examples": sum(len(b[2]) for b in eval_batches) if eval_batches else 0}
    return graft, info


def mask_fingerprint(graft: Graft, base_ckpt) -> dict:
    from .masks import base_fingerprint

    return base_fingerprint(base_ckpt.get, {graft.names[n]: tuple(d.shape) for n, d in graft.deltas.items()})


def score_weights(graft: Graft, params: dict[str, torch.Tensor], batches) -> dict[str, float]:
    """Mean cross-entropy per example, accuracy and ECE of these weights on ``batches``."""
    from ..eval.metrics import expected_calibration_error

    probs, golds, total = [], [], 0.0
    with torch.no_grad():
        for ids, mask, gold in batches:
            logits = graft.logits(params, ids, mask)
            total += float(torch.nn.functional.cross_entropy(logits, gold, reduction="sum"))
            probs.append(torch.softmax(logits, -1))
            golds.append(gold)
    p, g = torch.cat(probs), torch.cat(golds)
    return {"loss": total / len(g), "accuracy": float((p.argmax(-1) == g).float().mean()),
            "ece": expected_calibration_error(p.numpy(), g.numpy())}


def score_grafted(graft: Graft, masks: dict[str, torch.Tensor], heldout=None, train: dict | None = None) -> dict:
    """Training scores of ``base + masks * delta`` (or ``train`` when already known) and, with
    ``heldout`` batches, the same on those under ``"heldout"``."""
    params = grafted(graft.base, graft.deltas, masks)
    out = dict(train) if train is not None else graft.score(params)
    if heldout:
        out["heldout"] = score_weights(graft, params, heldout)
    return out


def _ticker(total: int, progress: bool, t0: float) -> Callable[[int], None]:
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        if progress and (done[0] % max(1, total // 20) == 0 or done[0] == total):
            print(f"graft localize: {done[0]}/{total} mask steps ({time.time() - t0:.0f}s)", flush=True)

    return tick


def localize_expert(cfg: LocalizeConfig, graft: Graft, info: dict, given: dict, tick) -> tuple[dict, dict[str, dict]]:
    """Magnitude and learned masks at every sparsity of ``cfg`` and their scores (training and, with
    an eval task, held-out), the ``given`` masks' scores; returns (result, masks by file stem)."""
    held = info.get("eval_batches")
    zero = {n: torch.zeros_like(d, dtype=torch.bool) for n, d in graft.deltas.items()}
    one = {n: torch.ones_like(d, dtype=torch.bool) for n, d in graft.deltas.items()}
    result: dict[str, Any] = {"base": cfg.base, "expert": cfg.expert, "task": info["task"], "examples": info["examples"],
                              "eval_task": info.get("eval_task"), "eval_examples": info.get("eval_examples", 0),
                              "delta_entries": graft.numel, "tensors": len(graft.deltas),
                              "kept_from_expert": info["kept_from_expert"], "steps": cfg.steps,
                              "optimizer": cfg.optimizer, "lr": cfg.lr or default_lr(cfg.optimizer),
                              "batches_per_step": cfg.batches_per_step, "straight_through": cfg.straight_through,
                              "init": cfg.init, "l1": cfg.l1, "finetuned": score_grafted(graft, one, held),
                              "base_scores": score_grafted(graft, zero, held), "levels": [], "given": []}
    masks_out: dict[str, dict] = {}
    for s in cfg.sparsity:
        mag = magnitude_masks(graft.deltas, s)
        mag_scores = score_grafted(graft, mag, held)
        # the learned mask is chosen on the training objective alone; held-out data only scores it
        learned, hist = graft.learn(s, steps=cfg.steps, lr=cfg.lr, optimizer=cfg.optimizer, init=cfg.init, l1=cfg.l1,
                                    eval_every=cfg.eval_every, seed=cfg.seed, batches_per_step=cfg.batches_per_step,
                                    straight_through=cfg.straight_through, progress=tick)
        overlap = sum(int((mag[n] & learned[n]).sum()) for n in mag)
        result["levels"].append({"sparsity": s, "k": hist["k"], "magnitude": mag_scores,
                                 "learned": score_grafted(graft, learned, held, {k: hist[k] for k in ("loss", "accuracy", "ece", "best_step")}),
                                 "history": hist["history"], "overlap": overlap / hist["k"]})
        masks_out[f"magnitude-s{s:g}"] = mag
        masks_out[f"learned-s{s:g}"] = learned
    for path, m in given.items():
        result["given"].append({"path": path, "k": sum(int(v.sum()) for v in m.values()), **score_grafted(graft, m, held)})
    if len(given) > 1:  # several experts' (or levels') regions: overlap, and this expert grafted on their union
        labels = [Path(p).stem if Path(p).stem not in [Path(q).stem for q in given if q != p] else p for p in given]
        result["overlap"] = mask_jaccard(dict(zip(labels, given.values())))
        union = {n: torch.stack([m[n] for m in given.values()]).any(0) for n in graft.deltas}
        result["union"] = {"k": sum(int(v.sum()) for v in union.values()), **score_grafted(graft, union, held)}
    return result, masks_out


def run_localize(cfg: LocalizeConfig | dict | str | Path, progress: bool = True) -> dict:
    """Run a localize recipe end to end; writes masks, the report and ``result.json`` under ``out``."""
    from .masks import load_masks, save_masks

    cfg = load_localize_config(cfg)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out {out} is a file; give a folder for the masks and the report")
    torch.manual_seed(cfg.seed)
    if cfg.experts is not None:
        return run_localize_multi(cfg, out, progress)
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
    result, masks_out = localize_expert(cfg, graft, info, given, _ticker(cfg.steps * len(cfg.sparsity), progress, t0))
    result["seconds"] = time.time() - t0

    # every computation is done: write
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name, m in masks_out.items():
        files.append(str(save_masks(out / "masks" / f"{name}.safetensors", {graft.names[n]: v for n, v in m.items()}, fp)))
        if cfg.save_grafted:
            files.append(str(_save_grafted(graft, m, info["tokenizer"], out / "grafted" / name)))
    result["files"] = files
    sections, figures = build_localize_sections(result)
    _write_report(f"graft localize: {cfg.expert}", sections, figures, out, result)
    return result


def _write_report(title: str, sections: list, figures: list, out: Path, result: dict) -> None:
    from ..eval.report import write_sections

    html, md = write_sections(title, sections, figures, out)
    result["report"] = [str(html), str(md)]
    tmp = out / ".result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / "result.json")


def _open_expert(cfg: LocalizeConfig, name: str) -> tuple[Graft, dict]:
    try:
        return open_graft(cfg)
    except GraftError as exc:
        raise type(exc)(f"expert {name!r}: {exc}") from None


def union_masks(masks: list[dict[str, torch.Tensor]], shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """The union of several experts' masks over every key of ``shapes`` (a key an expert's mask
    lacks, a tensor its fine-tuning left unchanged, counts as empty for it)."""
    out = {}
    for k, shape in shapes.items():
        u = torch.zeros(shape, dtype=torch.bool)
        for m in masks:
            if k in m:
                u |= m[k]
        out[k] = u
    return out


def run_localize_multi(cfg: LocalizeConfig, out: Path, progress: bool = True) -> dict:
    """The multi-expert form: each expert's masks (one expert in memory at a time), per sparsity
    the Jaccard overlap of their learned masks, and every expert grafted on the union of them
    (its own delta on the union region), scored on its task and held-out data."""
    import shutil
    import tempfile

    from .masks import base_fingerprint, pack_mask, save_masks, unpack_mask

    names = list(cfg.experts)
    for name in names:  # before any learning: a wrong task or an adapter made on another base costs nothing
        check_expert(cfg.single(name), name)
    t0 = time.time()
    tick = _ticker(cfg.steps * len(cfg.sparsity) * len(names), progress, t0)
    per: dict[str, dict] = {}
    packed: dict[str, dict[str, dict[str, tuple]]] = {}  # expert -> mask file stem -> base key -> (bits, shape)
    fps: dict[str, dict] = {}
    shapes: dict[str, tuple] = {}  # base key -> shape, over every expert's delta
    unpack = lambda m: {k: unpack_mask(*v) for k, v in m.items()}  # noqa: E731
    graft = info = None
    for name in names:
        graft = info = None  # the previous expert goes before the next one is loaded
        graft, info = _open_expert(cfg.single(name), name)
        res, masks = localize_expert(cfg.single(name), graft, info, {}, tick)
        per[name] = res
        packed[name] = {stem: {graft.names[n]: pack_mask(v) for n, v in m.items()} for stem, m in masks.items()}
        fps[name] = mask_fingerprint(graft, info["base_ckpt"])
        shapes.update({graft.names[n]: tuple(d.shape) for n, d in graft.deltas.items()})
        open_name, masks = name, None
    base_ckpt = info["base_ckpt"]
    levels, unions = [], {}
    for s in cfg.sparsity:
        stem = f"learned-s{s:g}"
        full = {name: {k: (unpack_mask(*packed[name][stem][k]) if k in packed[name][stem] else torch.zeros(shape, dtype=torch.bool))
                       for k, shape in shapes.items()} for name in names}
        u = union_masks(list(full.values()), shapes)
        levels.append({"sparsity": s, "k": sum(int(v.sum()) for v in u.values()), "overlap": mask_jaccard(full), "union": {}})
        unions[s] = {k: pack_mask(v) for k, v in u.items()}
        del full, u
    staging = Path(tempfile.mkdtemp(prefix="graft-localize-")) if cfg.save_grafted else None
    try:
        for name in [open_name] + [n for n in names if n != open_name]:  # the expert still loaded goes first
            if name != open_name:
                graft = info = None
                graft, info = _open_expert(cfg.single(name), name)
                open_name = name
            for lv in levels:
                u = unpack(unions[lv["sparsity"]])
                mine = {n: u[graft.names[n]] for n in graft.deltas}
                lv["union"][name] = score_grafted(graft, mine, info.get("eval_batches"))
                if staging is not None:
                    _save_grafted(graft, mine, info["tokenizer"], staging / name / f"union-s{lv['sparsity']:g}")
        graft = info = None
        for lv in levels:
            lv["union"] = {name: lv["union"][name] for name in names}

        # every computation is done: write
        out.mkdir(parents=True, exist_ok=True)
        files = []
        for name in names:
            for stem, m in packed[name].items():
                files.append(str(save_masks(out / "masks" / name / f"{stem}.safetensors", unpack(m), fps[name])))
        union_fp = base_fingerprint(base_ckpt.get, shapes)
        for s, m in unions.items():
            files.append(str(save_masks(out / "masks" / f"union-s{s:g}.safetensors", unpack(m), union_fp)))
        if staging is not None:
            for name in names:
                for folder in sorted((staging / name).iterdir()):
                    target = out / "grafted" / name / folder.name
                    if target.exists():
                        shutil.rmtree(target)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(folder), str(target))
                    files.append(str(target))
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    result = {"base": cfg.base, "experts": per, "sparsity": cfg.sparsity, "levels": levels, "union_entries": sum(
        math.prod(v) for v in shapes.values()), "seconds": time.time() - t0, "files": files}
    sections, figures = build_multi_sections(result)
    _write_report(f"graft localize: {len(names)} experts", sections, figures, out, result)
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


def retained(acc: float | None, ref: float | None) -> float | None:
    """Grafted accuracy as a share of the fine-tuned model's (None where that is 0 or missing)."""
    if acc is None or not ref or ref != ref:
        return None
    return acc / ref


def _ret(acc, ref) -> str:
    r = retained(acc, ref)
    return "n/a" if r is None else f"{r:.3f}"


def _held(scores: dict) -> dict | None:
    return scores.get("heldout")


def build_localize_sections(result: dict, tag: str = "", title: str = "") -> tuple[list, list]:
    """Sections of one expert's run; ``tag`` prefixes section keys and figure names (several experts
    in one report), ``title`` prefixes section titles."""
    from ..eval.report import Cell, Details, Figure, Para, Pre, Section, Table, new_figure, png_bytes

    ft, b = result["finetuned"], result["base_scores"]
    acc_ft = ft["accuracy"]
    held = _held(ft) is not None
    acc_ft_h = ft["heldout"]["accuracy"] if held else None
    key = (lambda k: f"{tag}-{k}") if tag else (lambda k: k)
    name = (lambda n: f"{n}_{tag}") if tag else (lambda n: n)
    head_title = (lambda t: f"{title}: {t}") if title else (lambda t: t)

    def ret(a: float) -> str:
        return _ret(a, acc_ft)

    summary_paras = [
        Para(f"Base {result['base']}, expert {result['expert']}, task {result['task']} ({result['examples']} training examples). "
             f"The delta spans {result['delta_entries']:,} entries in {result['tensors']} tensors; "
             f"{len(result['kept_from_expert'])} tensors (e.g. a new classifier head) are always the expert's own."),
        Para(f"Fine-tuned: loss {ft['loss']:.4f}, accuracy {ft['accuracy']:.3f}, ECE {ft['ece']:.3f}. "
             f"Base with the expert's head (nothing grafted): loss {b['loss']:.4f}, accuracy {b['accuracy']:.3f}."),
        Para(f"Learned masks: {result['steps']} {result.get('optimizer', 'adam')} steps at lr {result['lr']:g} "
             f"({'all' if result.get('batches_per_step') is None else result['batches_per_step']} training batches per step"
             f"{', straight-through' if result.get('straight_through') else ''}) from |S| = {result['init']:g}, "
             f"l1 {result['l1']:g}; they are chosen on the training data alone"
             + (f"; held-out scores are on {result['eval_task']} ({result['eval_examples']} examples), which never "
                "steers the masks." if held else "; no eval_task was given, so every score is on the data the masks were fitted on.")),
    ]
    if held:
        fh, bh = ft["heldout"], b["heldout"]
        summary_paras.append(Para(f"Held-out: fine-tuned loss {fh['loss']:.4f}, accuracy {fh['accuracy']:.3f}, ECE {fh['ece']:.3f}; "
                                  f"base with the expert's head accuracy {bh['accuracy']:.3f}."))
    summary = Section(key("summary"), head_title("Summary"), summary_paras)
    cols = ["sparsity", "entries", "magnitude loss", "magnitude acc", "retained"] + (["held-out retained"] if held else []) + \
        ["ECE", "learned loss", "learned acc", "retained"] + (["held-out retained"] if held else []) + ["ECE", "best step", "overlap"]
    head = [Cell(t) for t in cols]

    def hret(sc: dict) -> list:
        return [Cell(_ret(sc["heldout"]["accuracy"], acc_ft_h), num=True)] if held else []

    rows = []
    for lv in result["levels"]:
        m, l = lv["magnitude"], lv["learned"]
        rows.append([Cell(_pct(lv["sparsity"])), Cell(f"{lv['k']:,}", num=True),
                     Cell(f"{m['loss']:.4f}", num=True), Cell(f"{m['accuracy']:.3f}", num=True), Cell(ret(m["accuracy"]), num=True)]
                    + hret(m) + [Cell(f"{m['ece']:.3f}", num=True),
                                 Cell(f"{l['loss']:.4f}", num=True, bold=l["loss"] < m["loss"]), Cell(f"{l['accuracy']:.3f}", num=True),
                                 Cell(ret(l["accuracy"]), num=True)]
                    + hret(l) + [Cell(f"{l['ece']:.3f}", num=True), Cell(str(l["best_step"]), num=True),
                                 Cell(f"{lv['overlap']:.2f}", num=True)])
    for g in result.get("given") or []:
        row = [Cell(Path(g["path"]).name), Cell(f"{g['k']:,}", num=True), Cell(f"{g['loss']:.4f}", num=True),
               Cell(f"{g['accuracy']:.3f}", num=True), Cell(ret(g["accuracy"]), num=True)] + hret(g) + [Cell(f"{g['ece']:.3f}", num=True)]
        rows.append(row + [Cell("") for _ in range(len(cols) - len(row))])
    table = Table(head, rows, note=f"retained = grafted accuracy / fine-tuned accuracy ({ft['accuracy']:.3f}"
                  + (f"; held-out {acc_ft_h:.3f}" if held else "") + f"); ECE of the "
                  f"fine-tuned model {ft['ece']:.3f}. best step 0 means optimisation did not beat the magnitude mask. "
                  "overlap = share of the learned mask's entries that the magnitude mask also has.")
    blocks: list = [table]
    if held:
        hrows = []
        for label, sc in [("fine-tuned", ft), ("base", b)] + [(f"{_pct(lv['sparsity'])} {kind}", lv[kind])
                                                             for lv in result["levels"] for kind in ("magnitude", "learned")]:
            h = sc["heldout"]
            hrows.append([Cell(label), Cell(f"{h['loss']:.4f}", num=True), Cell(f"{h['accuracy']:.3f}", num=True),
                          Cell(_ret(h["accuracy"], acc_ft_h), num=True), Cell(f"{h['ece']:.3f}", num=True)])
        blocks.append(Details(f"held-out scores ({result['eval_task']}, {result['eval_examples']} examples)",
                              [Table([Cell(t) for t in ("weights", "loss", "accuracy", "retained", "ECE")], hrows)]))
    figures = []
    levels = result["levels"]
    if levels:
        fig = new_figure(6, 3.4)
        ax = fig.add_subplot(111)
        xs = [100 * lv["sparsity"] for lv in levels]
        ax.plot(xs, [lv["magnitude"]["accuracy"] for lv in levels], "o-", color="C0", label="magnitude")
        ax.plot(xs, [lv["learned"]["accuracy"] for lv in levels], "s-", color="C1", label="learned")
        if held:
            ax.plot(xs, [lv["magnitude"]["heldout"]["accuracy"] for lv in levels], "o--", color="C0", alpha=0.6, label="magnitude, held-out")
            ax.plot(xs, [lv["learned"]["heldout"]["accuracy"] for lv in levels], "s--", color="C1", alpha=0.6, label="learned, held-out")
        ax.axhline(ft["accuracy"], color="grey", ls="--", label="fine-tuned")
        ax.axhline(b["accuracy"], color="grey", ls=":", label="base")
        ax.set_xscale("log")
        ax.set_xlabel("grafted share of delta entries (%)")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize="small")
        figures.append(Figure(name("localize_accuracy"), png_bytes(fig), "accuracy against sparsity, learned and magnitude masks",
                              "Accuracy of the grafted model against the grafted share of the delta (solid: training data"
                              + ("; dashed: held-out data" if held else "") + ")."))
    scores = Section(key("scores"), head_title("Learned vs magnitude masks"), blocks + figures)
    hist = Section(key("history"), head_title("Optimisation history"), [
        Details(f"s = {_pct(lv['sparsity'])}", [Pre("\n".join(
            f"step {h['step']:>5}  loss {h['loss']:.4f}  acc {h['accuracy']:.3f}  ece {h['ece']:.3f}" for h in lv["history"]))])
        for lv in levels] or [Para("no sparsity levels")])
    out = [summary, scores, hist]
    ov = result.get("overlap")
    if ov:
        from ..eval.report import chart_style, heatmap

        names = ov["experts"]
        with chart_style():
            fig = new_figure(1.6 + 0.7 * len(names), 1.2 + 0.6 * len(names))
            ax = fig.add_subplot(111)
            heatmap(ax, fig, ov["all"], names, "Jaccard overlap of the given masks", "viridis", 0.0, 1.0, "Jaccard", True)
        figures.append(Figure(name("localize_overlap"), png_bytes(fig), "Jaccard overlap of the given masks"))
        u = result["union"]
        out.append(Section(key("overlap"), head_title("Overlap of the given masks"), [
            figures[-1],
            Para(f"This expert grafted on the union of the given masks ({u['k']:,} entries): loss {u['loss']:.4f}, "
                 f"accuracy {u['accuracy']:.3f} (retained {ret(u['accuracy'])}), ECE {u['ece']:.3f}"
                 + (f"; held-out retained {_ret(u['heldout']['accuracy'], acc_ft_h)}." if held else ".")),
            _group_table(ov)]))
    if not tag:
        out.append(Section("files", "Files", [Pre("\n".join(result.get("files") or []) or "none")]))
    return out, figures


def _group_table(ov: dict):
    from ..eval.report import Cell, Details, Table

    names = ov["experts"]
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    grows = [[Cell(g)] + [Cell(f"{m[i][j]:.3f}", num=True) for i, j in pairs] for g, m in sorted(ov["groups"].items())]
    return Details("per layer and module type", [Table([Cell("layer/module")] + [Cell(f"{names[i]} vs {names[j]}") for i, j in pairs], grows)])


def build_multi_sections(result: dict) -> tuple[list, list]:
    """The multi-expert report: overview, overlap of the learned masks per sparsity, every expert
    grafted on their union, then each expert's own sections."""
    from ..eval.report import Cell, Figure, Para, Pre, Section, Table, chart_style, heatmap, new_figure, png_bytes

    per, levels = result["experts"], result["levels"]
    names = list(per)
    held = {n: _held(per[n]["finetuned"]) is not None for n in names}
    any_held = any(held.values())
    rows = []
    for n in names:
        r = per[n]
        ft = r["finetuned"]
        rows.append([Cell(n), Cell(r["task"]), Cell(str(r["examples"]), num=True), Cell(f"{ft['accuracy']:.3f}", num=True),
                     Cell(f"{r['base_scores']['accuracy']:.3f}", num=True),
                     Cell(f"{r['eval_task']} ({r['eval_examples']})" if held[n] else "none"),
                     Cell(f"{ft['heldout']['accuracy']:.3f}" if held[n] else "", num=True),
                     Cell(f"{r['delta_entries']:,}", num=True)])
    overview = Section("summary", "Summary", [
        Para(f"Base {result['base']}; {len(names)} experts, each localized on its own task (one expert in memory at a time); "
             f"sparsity levels {', '.join(_pct(s) for s in result['sparsity'])}. Per level, the overlap of the experts' learned "
             "masks and each expert grafted on the union of all of them (its own delta on the union region; the paper's "
             "multi-task graft). Masks are chosen on training data alone; held-out data only scores them."),
        Table([Cell(t) for t in ("expert", "task", "examples", "fine-tuned acc", "base acc", "held-out task", "held-out acc",
                                 "delta entries")], rows)])
    hcols = ["held-out retained"] if any_held else []
    urows = []
    for lv in levels:
        urows.append(f"{_pct(lv['sparsity'])}: union of the learned masks, {lv['k']:,} of {result['union_entries']:,} entries")
        mine = {n: next(x for x in per[n]["levels"] if x["sparsity"] == lv["sparsity"]) for n in names}
        for n in names:
            ft, own, un = per[n]["finetuned"], mine[n]["learned"], lv["union"][n]
            hr = lambda sc: ([Cell(_ret(sc["heldout"]["accuracy"], ft["heldout"]["accuracy"]), num=True)] if held[n]  # noqa: E731
                             else [Cell("", num=True)]) if any_held else []
            urows.append([Cell(n), Cell(f"{own['accuracy']:.3f}", num=True), Cell(_ret(own["accuracy"], ft["accuracy"]), num=True)]
                         + hr(own) + [Cell(f"{un['loss']:.4f}", num=True), Cell(f"{un['accuracy']:.3f}", num=True),
                                      Cell(_ret(un["accuracy"], ft["accuracy"]), num=True)] + hr(un)
                         + [Cell(f"{un['ece']:.3f}", num=True)])
    union = Section("union", "Every expert grafted on the union of the learned masks", [
        Table([Cell(t) for t in ["expert", "own mask acc", "retained"] + hcols + ["union loss", "union acc", "retained"] + hcols
               + ["union ECE"]], urows,
              note="own mask = the expert's learned mask at this level; union = the same expert's delta grafted on the union "
                   "of every expert's learned mask at this level. retained = grafted accuracy / the expert's fine-tuned accuracy "
                   "(training data; held-out: on its eval_task).")])
    figures, ov_blocks = [], []
    for lv in levels:
        ov = lv["overlap"]
        with chart_style():
            fig = new_figure(1.6 + 0.7 * len(names), 1.2 + 0.6 * len(names))
            ax = fig.add_subplot(111)
            heatmap(ax, fig, ov["all"], ov["experts"], f"learned masks at {_pct(lv['sparsity'])}", "viridis", 0.0, 1.0, "Jaccard", True)
        figures.append(Figure(f"localize_overlap_s{lv['sparsity']:g}", png_bytes(fig),
                              f"Jaccard overlap of the experts' learned masks at {_pct(lv['sparsity'])}"))
        ov_blocks += [figures[-1], _group_table(ov)]
    overlap = Section("overlap", "Overlap of the experts' learned masks",
                      [Para("Jaccard |A & B| / |A | B| of two experts' learned masks over the whole model (heatmap, one per "
                            "sparsity level) and per layer and module type.")] + ov_blocks)
    out = [overview, union, overlap]
    for n in names:
        secs, figs = build_localize_sections(per[n], tag=n, title=n)
        out += secs
        figures += figs
    out.append(Section("files", "Files", [Pre("\n".join(result.get("files") or []) or "none")]))
    return out, figures


def summary_line(res: dict) -> str:
    """The one line ``graft localize`` prints."""
    if "experts" in res and "levels" in res and isinstance(res["experts"], dict):
        names = list(res["experts"])
        parts = []
        for lv in res["levels"]:
            rets = []
            for n in names:
                ft = res["experts"][n]["finetuned"]
                r = retained(lv["union"][n]["accuracy"], ft["accuracy"])
                h = lv["union"][n].get("heldout")
                rh = retained(h["accuracy"], ft["heldout"]["accuracy"]) if h else None
                rets.append(f"{n} {'n/a' if r is None else f'{r:.3f}'}" + ("" if rh is None else f" (held-out {rh:.3f})"))
            m = len(names)
            pair = [lv["overlap"]["all"][i][j] for i in range(m) for j in range(i + 1, m)]
            parts.append(f"{_pct(lv['sparsity'])}: {', '.join(rets)}, mean Jaccard {sum(pair) / len(pair):.3f}")
        return (f"graft localize: {len(names)} experts; retained accuracy grafted on the union of their learned masks "
                f"({'; '.join(parts)}); report {res['report'][0]}")
    ft = res["finetuned"]
    fh = ft.get("heldout")

    def r(sc: dict) -> str:
        a = retained(sc["accuracy"], ft["accuracy"])
        out = "n/a" if a is None else f"{a:.3f}"
        if fh:
            h = retained(sc["heldout"]["accuracy"], fh["accuracy"])
            out += f" (held-out {'n/a' if h is None else f'{h:.3f}'})"
        return out

    parts = [f"{_pct(lv['sparsity'])}: magnitude {r(lv['magnitude'])}, learned {r(lv['learned'])}" for lv in res["levels"]]
    return (f"graft localize: retained training accuracy ({'; '.join(parts)}) of the expert's {ft['accuracy']:.3f}"
            + (f" (held-out {fh['accuracy']:.3f})" if fh else "") + f"; report {res['report'][0]}")


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
