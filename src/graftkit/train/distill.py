"""``distill``: prompt transfer with knowledge distillation (PANDA), for every tuning method.

Zhong, Ding, Liu, Du and Tao, "PANDA: Prompt Transfer Meets Knowledge Distillation for
Efficient Model Adaptation" (arXiv 2208.10160; IEEE TKDE 2024), papers-000.md #38. The target
adapter (the *student*) starts from the source-task adapter (``init_from``, see
:mod:`.lineage`) and is trained with the task loss plus a distillation term from the *teacher*:
the same frozen base carrying the source adapter, run without gradients:

    L = L_task + w * KD,    KD = T^2 * mean_i KL( softmax(z_t,i / T) || softmax(z_s,i / T) )       (1)

``z_t``/``z_s`` are the teacher's/student's logits and ``i`` runs over the positions the task
loss is taken on: the target tokens (labels != -100, shifted as the LM loss) of a causal LM,
the class logits of each example for classification. ``T`` is ``distill.temperature``; the
``T^2`` factor keeps the term's gradient scale independent of ``T`` (Hinton et al. 2015).
The mean runs over all the micro-batch's positions (``multitask.balance`` balances the task loss
only). Evaluation reports the task loss alone, so validation losses compare across runs.

**The weight ``w``.** ``distill.weight`` is a number, or ``auto``: PANDA sets the strength of
the distillation from its prompt-transferability metric (more transferable source -> stronger
distillation). The paper's exact equation could not be read here: the offline copies of the
paper hold only its abstract and summary, which say that the metric "maps source and target
tasks into a shared semantic space using soft prompts and computes the transferability as the
cosine similarity of task embeddings", and the released code (github.com/WHU-ZQH/PANDA,
``p-tuning-v2/training/trainer_base.py``) weights its distillation term - an MSE between the
teacher's and the student's logits, where (1) has the tempered KL - by a fixed hand-set factor.
What ``auto`` implements is that description, made concrete and labelled as graftkit's reading,
not the paper's equation:

    e(P) = (1/N) sum_n [ (1/|x_n|) sum_j h_L(x_n; P)_j ]            (task embedding of adapter P)
    s    = cos( e(P_source), e(P_target) )                          (transferability)
    w    = max(0, s)                                                (distillation weight)

``h_L(x; P)`` is the base model's last hidden state with adapter ``P`` at the real (unpadded)
tokens ``j`` of a target-task input ``x``; the ``N`` inputs are the first ``distill.samples``
training examples of this run. Both embeddings are made by the same frozen model on the same
target-task inputs, so they share one space whatever the tasks. ``P_source`` is the teacher;
``P_target`` is ``distill.reference``: an adapter of the same method and shape trained on the
target task alone (a short plain run of the same recipe without ``init_from``/``distill``), as
the metric compares a source prompt with a target prompt. ``w`` is computed once, before the
first step, printed, and recorded in the saved adapter's lineage (``adapter.json``).

**The teacher's memory.** When the teacher adapter has the student's method and shapes (the
PANDA case: the teacher is the source the student starts from), the teacher *shares the
student's model*: its tensors are kept aside, and for the teacher's forward they are switched
into the student's sites (a pointer swap of each live tensor's storage, under ``no_grad`` and
in eval mode) and switched back before the student's forward - one extra adapter's worth of
memory, no second base. A teacher of another method or shape runs as a second, frozen copy of
the base with its adapter (twice the base's memory). Sharing does not work with the model
sharded (FSDP), so ``distill`` is refused there in one line; under DDP each process
distils its share of the batch (2 processes give 1 process's losses: tests/test_distill.py).

``distill`` needs ``init_from`` (PANDA's student starts from the source prompt; the teacher may
be another adapter than the one ``init_from`` names).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .data import IGNORE, collate


# -- the loss ------------------------------------------------------------------------------------

def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Equation (1)'s KD term: ``T^2 * mean_i KL(softmax(teacher_i/T) || softmax(student_i/T))``
    over the rows ``i`` of ``(rows, classes)`` logits; 0 for no rows."""
    if student.shape[0] == 0:
        return student.sum() * 0.0
    t = float(temperature)
    log_ps = torch.log_softmax(student.float() / t, dim=-1)
    log_pt = torch.log_softmax(teacher.float() / t, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return (t * t) * kl.mean()


def logits_at_targets(model: nn.Module, batch: dict[str, torch.Tensor], task: str, sparse: bool) -> torch.Tensor:
    """The logits the task loss is taken on, as :class:`~.loop.WithLoss` computes them: class
    logits ``(batch, classes)``, or the LM's logits at the target positions ``(targets, vocab)``."""
    if task == "classification":
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    keep = batch["labels"][:, 1:] != IGNORE
    # as WithLoss: a packed batch (data.pack_examples) passes its position ids and no mask
    if "position_ids" in batch:  # no cache: with one, transformers would not keep packed examples apart
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    else:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if sparse:
        hidden = model.base_model(**inputs).last_hidden_state
        return model.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return model(**inputs).logits[:, :-1][keep].float()


# -- the transferability metric ------------------------------------------------------------------

def task_embedding(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``e = mean_n mean_{j real} h[n, j]`` for last hidden states ``(batch, length, width)``
    and the attention mask ``(batch, length)``; returns ``(width,)`` float64."""
    m = mask.to(torch.float64).unsqueeze(-1)
    per_example = (hidden.to(torch.float64) * m).sum(1) / m.sum(1).clamp(min=1)
    return per_example.mean(0)


def transferability(source: torch.Tensor, target: torch.Tensor) -> float:
    """Cosine similarity of two task embeddings."""
    s, t = source.to(torch.float64), target.to(torch.float64)
    return float((s @ t) / (s.norm() * t.norm()).clamp(min=1e-30))


def auto_weight(score: float) -> float:
    """The distillation weight ``auto`` gives for a transferability ``score``: ``max(0, score)``."""
    return max(0.0, float(score))


# -- the teacher ---------------------------------------------------------------------------------

def _live(site) -> list[torch.Tensor]:
    """The tensors a site's forward reads: its slot parameters, or the weight an in-place site
    (full fine-tuning, a head trained whole) changes."""
    if getattr(site, "inplace", False):
        return [site.base]
    # a dotted slot names a tensor of a submodule (P-tuning's prompt encoder)
    return [site.get_parameter(s) if "." in s else getattr(site, s) for s in site.slots]


class SharedTeacher:
    """The teacher as other values of the student's own adapter tensors (same method, shapes)."""

    shared = True

    def __init__(self, model: nn.Module, tensors: dict[str, torch.Tensor]):
        from ..adapter import sites

        self.model = model
        self.live: list[torch.Tensor] = []
        self.teacher: list[torch.Tensor] = []
        with torch.no_grad():
            for name, site in sites(model).items():
                live = _live(site)
                kept = [t.data for t in live]
                for t in live:  # load the teacher into fresh storage, then keep that storage aside
                    t.data = torch.empty_like(t.data)
                site.load_slots({slot: tensors[f"{name}.{slot}"] for slot in site.slots})
                self.live.extend(live)
                self.teacher.extend(t.data for t in live)
                for t, k in zip(live, kept):
                    t.data = k

    @contextlib.contextmanager
    def active(self):
        kept = [t.data for t in self.live]
        was = self.model.training
        try:
            for t, v in zip(self.live, self.teacher):
                t.data = v
            self.model.eval()
            yield self.model
        finally:
            self.model.train(was)
            for t, k in zip(self.live, kept):
                t.data = k

    def to(self, device: torch.device) -> None:
        self.teacher = [t.to(device) for t in self.teacher]


class SeparateTeacher:
    """The teacher as a second, frozen copy of the base with its own adapter."""

    shared = False

    def __init__(self, model: nn.Module):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @contextlib.contextmanager
    def active(self):
        yield self.model

    def to(self, device: torch.device) -> None:
        self.model.to(device)


class Distiller:
    """Equation (1)'s distillation term, called by :class:`~.loop.WithLoss` in training."""

    def __init__(self, teacher, task: str, weight: float, temperature: float, sparse: bool):
        self.teacher_model = teacher
        self.task = task
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.sparse = sparse

    @torch.no_grad()
    def teacher_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.teacher_model.active() as model:
            return logits_at_targets(model, batch, self.task, self.sparse)

    def term(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return self.weight * kd_loss(student, teacher, self.temperature)

    def attach(self, module: nn.Module, device: torch.device) -> None:
        """Hook into the run's :class:`~.loop.WithLoss` (after ``accelerate.prepare`` moved it)."""
        module.distill = self
        if getattr(module, "kernels", "torch") == "liger":  # liger's fused loss never forms the logits KD needs
            module.kernels = "torch"
        self.teacher_model.to(device)


# -- set-up --------------------------------------------------------------------------------------

@torch.no_grad()
def measure_embedding(model: nn.Module, examples: list[dict[str, Any]], pad_id: int, batch_size: int,
                      device: torch.device) -> torch.Tensor:
    """The task embedding of the adapter now in ``model`` over ``examples`` (eval mode)."""
    was = model.training
    model.eval()
    total, count = None, 0
    try:
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i:i + batch_size], pad_id)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            e = task_embedding(hidden, mask) * len(ids)
            total = e if total is None else total + e
            count += len(ids)
    finally:
        model.train(was)
    return total / max(count, 1)


def setup_distill(run, model: nn.Module) -> tuple[Distiller, dict[str, Any], list[str]]:
    """Build the teacher and the weight for ``run.recipe.distill``; returns the distiller, its
    lineage record and warnings. ``model`` carries the student adapter, already initialised."""
    from ..adapter import sites
    from .lineage import check_source, read_source
    from .loop import WithLoss

    r = run.recipe
    d = r.distill
    slots = sum(len(site.slots) for site in sites(model).values())
    teacher_src = read_source(d.teacher, "distill.teacher")
    try:
        tensors = check_source(model, teacher_src, base_name=r.model)
    except ConfigError:
        tensors = None  # another method or shape: the teacher runs as a second model
    if tensors is not None and len(tensors) < slots:
        raise ConfigError(f"distill.teacher {teacher_src.path}: its head was trained for other labels than this run's (or it has none); "
                          "the teacher's logits must be over this task's classes - give a teacher trained for these labels")
    teacher = SharedTeacher(model, tensors) if tensors is not None else SeparateTeacher(_second_model(r, teacher_src, model))
    sparse = WithLoss(model, r.task, False).sparse_head
    record: dict[str, Any] = {"teacher": teacher_src.record(), "weight_setting": d.weight, "temperature": d.temperature,
                              "teacher_shares_base": teacher.shared}
    if d.weight == "auto":
        ref = read_source(d.reference, "distill.reference")
        ref_tensors = check_source(model, ref, base_name=r.model)
        if len(ref_tensors) < slots:
            raise ConfigError(f"distill.reference {ref.path}: its head was trained for other labels than this run's; "
                              "give an adapter trained on this run's target task")
        examples = run.data.train[: d.samples]
        pad = run.tokenizer.pad_token_id
        device = next(model.parameters()).device
        with teacher.active() as tm:
            e_source = measure_embedding(tm, examples, pad, r.eval.batch_size, device)
        with SharedTeacher(model, ref_tensors).active() as m:
            e_target = measure_embedding(m, examples, pad, r.eval.batch_size, device)
        score = transferability(e_source, e_target)
        weight = auto_weight(score)
        record.update(transferability=score, reference=ref.record())
        warnings = teacher_src.warnings + ref.warnings
    else:
        weight = float(d.weight)
        warnings = teacher_src.warnings
    record["weight"] = weight
    return Distiller(teacher, r.task, weight, d.temperature, sparse), record, warnings


def _second_model(r, source, student: nn.Module) -> nn.Module:
    """The base loaded again with the teacher adapter: for a teacher of another method or shape."""
    from ..adapter import get_state
    from ..errors import AdapterError
    from ..io import load_base_for
    from ..io.native import apply_adapter

    model = load_base_for(source.adapter, r.model)
    if r.task == "classification":
        labels = (source.adapter.meta.get("base_model") or {}).get("id2label")
        if labels != get_state(student).base.get("id2label"):
            raise ConfigError(f"distill.teacher {source.path}: its head was trained for other labels ({labels}) than this run's "
                              f"({get_state(student).base.get('id2label')}); give a teacher trained for these labels")
    try:
        apply_adapter(model, source.adapter)
    except AdapterError as exc:
        raise AdapterError(f"distill.teacher {source.path}: {exc}") from None
    return model
