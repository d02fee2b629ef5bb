"""The training loop: a readable recipe on ``accelerate``, not a framework.

One file runs on one CPU, one GPU or several processes (``accelerate launch`` or ``torchrun``:
DDP, gloo on CPU; FSDP2 from accelerate's config, see :mod:`.fsdp`). Each optimizer step is

    for each of grad_accum micro-batches:           (the processes' slices of one global batch)
        loss = mean token (or example) loss          (task-balanced with ``multitask``)
        backward(loss / grad_accum)                  (gradients all-reduced on the last one)
    [HFT: drop the gradients of this stage's frozen half]
    clip gradients; AdamW step; schedule step

Which examples a micro-batch holds is a pure function of (seed, epoch, position), and
checkpoints carry the trained tensors, optimizer, scheduler and every process's RNG state,
so ``--resume`` continues bit for bit.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, TrainingError
from ..methods import method_named
from . import fsdp
from .checkpoint import latest_checkpoint, load_checkpoint, restore, rng_state, save_checkpoint, snapshot
from .data import IGNORE, Order, Prepared, collate, prepare
from .recipe import Recipe
from .runstate import RUN_FILE, describe_owner, owner, read_run
_STEP_SLEEP = float(os.environ.get("GRAFT_TEST_STEP_SLEEP", "0") or 0)
METRICS = "metrics.jsonl"


# -- the model with its loss ---------------------------------------------------------------------

class WithLoss(nn.Module):
    """Wraps the model so that DDP and FSDP see one forward that returns the loss.

    For causal LMs the vocabulary projection is applied only to positions that have a target
    (the response tokens in chat SFT): the full ``(batch, length, vocab)`` logits tensor is the
    largest activation of a small LM and most of it would be thrown away.
    """

    def __init__(self, model: nn.Module, task: str, balanced: bool, kernels: str = "torch"):
        super().__init__()
        self.model = model
        self.task = task
        self.balanced = balanced
        self.kernels = kernels  # "liger": the fused linear cross-entropy of liger-kernel (CUDA), see .kernels
        self.augment = None  # classification: mixup / contrastive loss in training (train.augment.SentenceAugment), set by Run.setup
        self.distill = None  # PANDA: the teacher's KD term in training (train.distill.Distiller), set by Run.setup
        self.batch_hook = None  # the method's look at each causal-LM batch (TuningMethod.batch_hook), set by Run.setup
        cfg = model.config
        self.sparse_head = (task == "causal-lm" and isinstance(model.get_output_embeddings(), nn.Linear)
                            and getattr(cfg, "final_logit_softcapping", None) is None and getattr(cfg, "logit_scale", None) is None
                            and hasattr(model, "base_model") and model.base_model is not model)

    # what accelerate's FSDP2 reads to find the blocks and the embeddings to shard
    @property
    def _no_split_modules(self) -> list[str] | None:
        return getattr(self.model, "_no_split_modules", None)

    def get_input_embeddings(self) -> nn.Module | None:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.get_output_embeddings()

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, number of targets, number of correct predictions - ``None`` in training mode)."""
        task = batch.get("task")
        if self.task != "classification" and self.batch_hook is not None:
            self.batch_hook(batch)
        # the teacher runs first: a shared teacher swaps its tensors into this model (train.distill)
        teacher = self.distill.teacher_logits(batch) if self.distill is not None and self.training else None
        if self.task == "classification":
            aux = correct = None
            if self.augment is not None and self.training:
                logits, ce, aux = self.augment.loss(self.model, batch)
            else:
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
                ce = nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
                correct = (logits.argmax(-1) == batch["labels"]).sum() if not self.training else None
            if self.balanced and task is not None:
                from .multitask import balanced_loss

                loss, _ = balanced_loss(ce[:, None], torch.ones_like(ce[:, None]), task)
            else:
                loss = ce.mean()
            if aux is not None:
                loss = self.augment.combine(loss, aux)
            if teacher is not None:
                loss = loss + self.distill.term(logits, teacher)
            return loss, torch.tensor(len(ce), device=ce.device), correct
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE
        at = _TargetRows(batch, keep)
        head = self.model.get_output_embeddings() if self.sparse_head else None
        frozen_head = head is not None and not any(p.requires_grad for p in head.parameters())
        inputs = _model_inputs(batch)
        logits = None
        if self.sparse_head:
            hidden = at(self.model.base_model(**inputs).last_hidden_state)
        summed = None  # liger's summed loss: the plain mean needs no per-row losses (whose backward liger recomputes)
        if self.training and self.sparse_head and self.kernels == "liger" and torch.is_grad_enabled():
            from .kernels import fused_linear_cross_entropy

            if self.balanced and task is not None:
                tok, correct = fused_linear_cross_entropy(hidden, head, at.targets, "none"), None
            else:
                summed, correct = fused_linear_cross_entropy(hidden, head, at.targets, "sum"), None
        elif self.training and frozen_head and torch.is_grad_enabled():
            # the accuracy is only reported by evaluate(); training needs the loss and its gradient,
            # which a chunked pass gives without the full logits (see linear_ce)
            from .linear_ce import frozen_linear_cross_entropy

            tok, correct = frozen_linear_cross_entropy(hidden, head, at.targets), None
        else:
            if self.sparse_head:
                logits = head(hidden).float()
            else:
                logits = at(self.model(**inputs).logits).float()
            tok = nn.functional.cross_entropy(logits, at.targets, reduction="none")
            correct = (logits.argmax(-1) == at.targets).sum() if not self.training else None
        n = keep.sum()
        if summed is not None:
            loss = summed / n.clamp(min=1)
        elif self.balanced and task is not None:
            from .multitask import balanced_loss

            full = at.scatter(tok)
            loss, _ = balanced_loss(full, keep, task)
        else:
            loss = tok.sum() / n.clamp(min=1)
        if teacher is not None:  # the student's logits at the same target positions as the teacher's
            loss = loss + self.distill.term(logits if logits is not None else head(hidden).float(), teacher)
        return loss, n, correct


def target_index(labels: torch.Tensor) -> torch.Tensor:
    """Flat positions ``b * length + t`` of the tokens that have a target (``labels[b, t + 1]``
    is not IGNORE), computed on the CPU copy of a batch. On a GPU, selecting rows with a boolean
    mask waits for the device to learn how many there are; by this index it does not."""
    b, t = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)
    return b * labels.shape[1] + t


class _TargetRows:
    """The rows of a ``(batch, length, ...)`` output at the target positions, in the order of
    ``keep``'s nonzeros: through ``batch["target_index"]`` (no wait for the device) when the
    step computed it, else through the boolean mask."""

    def __init__(self, batch: dict[str, torch.Tensor], keep: torch.Tensor):
        self.keep, self.index = keep, batch.get("target_index")
        labels = batch["labels"]
        self.targets = labels[:, 1:][keep] if self.index is None else labels.reshape(-1)[self.index + 1]

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            return t[:, :-1][self.keep]
        return t.reshape(-1, *t.shape[2:]).index_select(0, self.index)

    def scatter(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-row values back into a zero ``keep``-shaped tensor."""
        full = torch.zeros(self.keep.shape, dtype=rows.dtype, device=rows.device)
        if self.index is None:
            full[self.keep] = rows
        else:
            length = self.keep.shape[1] + 1
            full.view(-1)[self.index - self.index // length] = rows  # b * length + t -> b * (length - 1) + t
        return full


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A packed batch (``data.pack_examples``) passes its per-example position ids and no
    attention mask: transformers then masks attention block-diagonally, one block per example
    (``masking_utils.find_packed_sequence_indices``; varlen flash attention on GPUs). Its
    ``attention_mask`` only marks the padding, for counting tokens. No cache: transformers skips
    the packed-sequence mask when a (default, empty) KV cache is passed, and examples would then
    attend across each other."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


# -- set-up -------------------------------------------------------------------------------------

def hold_frozen_linears_in_bf16(model: nn.Module) -> int:
    """Store the frozen weights of the model's Linear layers in bfloat16; return how many.

    Under bf16 autocast every Linear casts its float32 weight to bf16 on each use (autocast caches
    casts only of tensors that require grad), so a LoRA run re-casts the whole frozen base model
    twice per step - 12% of a SmolLM2-135M step on an AMX CPU. Holding them in bf16 gives the
    matmuls the same operands without the casts. Used for LoRA without DoRA only, whose delta
    does not depend on the base weights: the adapter saved is the same, and exported merged models
    read the base from its files. Weights tied to an embedding stay float32 (the embedding output
    feeds the float32 residual stream)."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    count = 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        if (isinstance(module, nn.Linear) and isinstance(w, nn.Parameter) and not w.requires_grad
                and w.dtype == torch.float32 and id(w) not in embedded):
            w.data = w.data.to(torch.bfloat16)
            count += 1
    return count


def _adamw(groups: list[dict[str, Any]], o) -> torch.optim.Optimizer:
    try:  # the fused kernel (CPU and CUDA, torch >= 2.4; FSDP shards too): one pass over each tensor, as the Trainer's default
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)


def _head_names(model: nn.Module) -> list[str]:
    for name in ("classifier", "score"):
        if isinstance(getattr(model, name, None), nn.Module):
            return [name]
    raise ConfigError(f"{type(model).__name__} has no classifier or score head; classification needs a *ForSequenceClassification model")


def _schedule(recipe: Recipe, total: int):
    o = recipe.optim
    warmup = o.warmup_steps or int(o.warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if o.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if o.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def param_groups(recipe: Recipe, model: nn.Module, named: list[tuple[str, nn.Parameter]]) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases and norms (1-D tensors); layer-wise LRs if asked."""
    o = recipe.optim
    lrs = {n: o.lr for n, _ in named}
    if recipe.layerwise and recipe.layerwise.lr_decay is not None:
        from .layerwise import find_blocks, layer_lrs

        lrs = layer_lrs(named, o.lr, recipe.layerwise.lr_decay, len(find_blocks(model)[1]))
    if o.loraplus_ratio is not None:
        lrs = loraplus_lrs(model, named, lrs, o.loraplus_ratio, o.loraplus_lr_embedding)
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for n, p in named:
        wd = 0.0 if p.ndim < 2 else o.weight_decay
        g = groups.setdefault((lrs[n], wd), {"params": [], "names": [], "lr": lrs[n], "weight_decay": wd})
        g["params"].append(p)
        g["names"].append(n)
    return list(groups.values())


def loraplus_lrs(model: nn.Module, named: list[tuple[str, nn.Parameter]], lrs: dict[str, float], ratio: float,
                 lr_embedding: float) -> dict[str, float]:
    """LoRA+'s learning rates (Hayou et al., 2024, "LoRA+: Efficient Low Rank Adaptation of Large
    Models"): B learns ``ratio`` times faster than A. Grouped as peft's ``create_loraplus_optimizer``
    does: the LoRA tensors of an embedding at ``lr_embedding``, every ``lora_B`` and every other 1-D
    tensor at lr x ratio, the rest at lr."""
    from ..methods.base import HOLDER

    out = dict(lrs)
    for n, p in named:
        owner = n.split(f".{HOLDER}.")[0] if f".{HOLDER}." in n else None
        if owner is not None and isinstance(model.get_submodule(owner), nn.Embedding):
            out[n] = lr_embedding
        elif n.endswith(".lora_B") or p.ndim == 1:
            out[n] = lrs[n] * ratio
    return out


class Run:
    """Everything one training run holds; ``train()`` builds it and calls ``fit()``."""

    def __init__(self, recipe: Recipe, *, resume: bool = False, overwrite: bool = False, console=None, progress: bool = True):
        if resume and overwrite:
            raise ConfigError("pass --resume (continue the run in output.dir) or --overwrite (replace it), not both")
        self.recipe = recipe
        self.resume = resume
        self.overwrite = overwrite
        self.out = Path(recipe.output.dir)  # where this run writes: output.dir, or its staging sibling (--overwrite)
        self.final = self.out  # output.dir itself
        self.staged = None  # an --overwrite run's new folder, swapped in for the old run by finish()
        self.progress = progress
        from accelerate.state import AcceleratorState

        # accelerate keeps one global state per process; a second run in the same process (a
        # library user, the tests) may ask for another precision
        AcceleratorState._reset_state()

        # accelerate sets up multi-process CPU runs (DDP over gloo) only when told it runs on CPU
        fsdp.check_config()
        cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        # built without accelerate's FSDP plugin: an FSDP run is sharded by graftkit, on every device
        self.acc = fsdp.accelerator("bf16" if recipe.optim.precision == "bf16" else "no", cpu)
        self.main = self.acc.is_main_process
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.fsdp = fsdp.requested(self.acc)  # "graftkit" (sharded, see fsdp.shard) or None
        # one process asking for FSDP2 shards over a mesh of one: it needs a process group
        self.own_group = fsdp.start_processes(self.acc.device) if self.fsdp else False
        if console is None:
            from rich.console import Console

            console = Console(highlight=False, soft_wrap=True, stderr=False, quiet=not self.main)
        self.console = console
        self.warnings: list[str] = []
        self.owner = owner()
        self.inputs: dict[str, Any] | None = None  # what the run is made from, set by setup (see inputs)
        self.started = False  # run.json says "running": from here on an error is recorded there

    # -- output folder --------------------------------------------------------------------------
    def check_output(self) -> dict[str, Any] | None:
        """Refuse an output folder that holds something else; returns the existing run's record."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise TrainingError(f"output.dir {out} is a file; give a folder")
        if not out.exists() or not any(out.iterdir()):
            return None
        record = read_run(out)
        if record is not None and record.get("status") == "running":
            who = record.get("owner") or {}
            mine = who.get("pid") == os.getpid() and who.get("host") == socket.gethostname()  # an earlier run in this process
            if record.get("owner_alive") and not mine:
                raise TrainingError(f"output folder {out} is in use: a graft train run is writing it ({describe_owner(who)}); "
                                    "wait for it to end or stop it, or choose another output.dir")
            if record.get("owner_alive") is None and not mine:
                self.warnings.append(f"{out}/{RUN_FILE} says a run is still writing it ({describe_owner(who)}), which cannot be "
                                     "checked from this machine; make sure it has stopped")
        if self.overwrite:
            return None
        if not self.resume:
            status = (record or {}).get("status")
            what = f"a training run ({status})" if record else "files that are not a graftkit training run"
            hint = "pass --resume to continue it, " if record else ""
            raise TrainingError(f"output folder {out} already holds {what}; {hint}pass --overwrite to replace it, "
                                "or choose another output.dir")
        if record is None:
            raise TrainingError(f"cannot resume: {out} holds no {RUN_FILE}, so it is not a graftkit training run; choose another output.dir")
        if record.get("fingerprint") != self.recipe.fingerprint():
            diff = _diff(record.get("identity", {}), self.recipe.identity())
            raise TrainingError(f"cannot resume: the checkpoints in {out} were made by a different recipe ({diff}); "
                                "use the same recipe, or pass --overwrite to start over")
        return record

    def write_run(self, status: str, **extra: Any) -> None:
        if not self.main:
            return
        record = {"status": status, "fingerprint": self.recipe.fingerprint(), "processes": self.world,
                  "identity": self.recipe.identity(), "recipe": self.recipe.resolved(), **extra}
        if getattr(self, "inputs", None) is not None:
            record["run_fingerprint"] = self.run_fingerprint()
            record["inputs"] = self.inputs
        # a running record names its process, so that a reader can tell a killed run (see runstate)
        record["owner"] = self.owner
        tmp = self.out / f".{RUN_FILE}.tmp"
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, self.out / RUN_FILE)

    def ended(self, exc: BaseException) -> BaseException:
        """Record in run.json how a started run stopped: ``failed`` with the one-line reason, or
        ``interrupted`` (Ctrl-C). Returns the error to raise: disk full becomes one line naming the path."""
        from .checkpoint import disk_full_error

        err = disk_full_error(exc, getattr(exc, "filename", None) or getattr(self, "final", self.out)) or exc
        if self.started and self.main:
            try:
                if isinstance(exc, KeyboardInterrupt):
                    self.write_run("interrupted", error="stopped by an interrupt (Ctrl-C)")
                elif isinstance(err, Exception):
                    from ..errors import GraftError

                    reason = str(err) if isinstance(err, GraftError) else f"{type(err).__name__}: {err}"
                    self.write_run("failed", error=reason.splitlines()[0] if reason else type(err).__name__)
            except OSError:
                pass  # nothing can be written (disk full): read_run reports "interrupted" once this process is gone
        return err

    def run_fingerprint(self) -> str:
        """The recipe's settings plus the contents of its data files and base model."""
        from .inputs import fingerprint

        return fingerprint({"recipe": self.recipe.fingerprint(), **self.inputs})

    def check_inputs(self) -> None:
        """On --resume: refuse when the data, labels or base model differ from the checkpoint's.

        Process 0 decides and every process raises the same line: under accelerate's
        RAM-efficient loading the other processes may not hold the loaded weights yet."""
        from . import inputs
        from .checkpoint import STATE

        problem = None
        if self.main:
            ckpt = latest_checkpoint(self.out)
            recorded = None
            if ckpt is not None:
                try:
                    recorded = json.loads((ckpt / STATE).read_text()).get("inputs")
                except (OSError, json.JSONDecodeError):
                    recorded = None  # load_checkpoint names the unreadable file
                if recorded is None:
                    self.warnings.append(f"checkpoint {ckpt} records no hashes of its data and base model (written by an older graftkit): "
                                         "resuming without checking that they are unchanged")
                else:
                    problem = inputs.check(recorded, self.inputs, str(ckpt), self.recipe.model)
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            problem = broadcast_object_list([problem])[0]
        if problem:
            raise TrainingError(problem)

    def log(self, record: dict[str, Any]) -> None:
        if self.main:
            with open(self.out / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- build ----------------------------------------------------------------------------------
    def _check_finite(self, model: nn.Module) -> None:
        """The base's weights checked on process 0, the verdict on every process: under FSDP's
        RAM-efficient loading only process 0 holds the weights (the others hold uninitialised
        memory until the broadcast), and every process must stop together."""
        from ..errors import FileFormatError
        from ..validate import check_model_finite

        problem: list[str | None] = [None]
        if self.main:
            try:
                check_model_finite(model, f"model {self.recipe.model}")
            except FileFormatError as exc:
                problem = [str(exc)]
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(problem)
        if problem[0] is not None:
            raise FileFormatError(problem[0])

    def _check_packing(self, model: nn.Module) -> None:
        """data.pack_examples needs a model that keeps packed examples apart; decided on process 0
        (the only one holding the weights under FSDP's RAM-efficient loading), raised on all."""
        from .data import packing_problem

        problem: list[str | None] = [packing_problem(model) if self.main else None]
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(problem)
        if problem[0] is not None:
            raise ConfigError(f"data.pack_examples: {self.recipe.model} with method {self.recipe.method.get('method')} does not keep "
                              f"packed examples apart ({problem[0]}); set data.pack_examples=false")

    def setup(self) -> None:
        import random

        import numpy as np
        import transformers

        import graftkit as gk

        from ..io.hf import model_config

        r = self.recipe
        from ..outputs import check_output as check_output_path

        check_output_path(self.final, [("model", r.model), ("tokenizer", r.tokenizer), ("training data", r.data.train),
                                       ("validation data", r.data.validation), ("init_from adapter", r.init_from),
                                       ("distill teacher", r.distill and r.distill.teacher),
                                       ("distill reference", r.distill and r.distill.reference)], clean=self.main)
        self.existing = self.check_output()
        from . import kernels

        # before loading the model: a "liger" that cannot run here is one line, not a load first
        self.kernels = kernels.choose(r.optim.kernels, self.acc.device.type,
                                      self.acc.device.type == "cuda" and kernels.liger_importable())
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()  # per-tensor bars would interleave with ours
        seed = r.optim.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

        config = model_config(r.model)  # a folder wanting its own code (auto_map) is one line, not transformers' error
        self.tokenizer = gk.load_tokenizer(r.tokenizer or r.model)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        from .data import model_position_limit

        class _C:  # model_position_limit reads model.config
            pass

        holder = _C()
        holder.config = config
        from ..methods.soft_prompt import check_train_length

        check_train_length(dict(r.method), r.data.max_length, model_position_limit(holder))  # soft tokens need positions too
        self.data: Prepared = prepare(r, self.tokenizer, model_position_limit(holder))
        self.warnings.extend(self.data.warnings)

        torch.manual_seed(seed)
        kwargs: dict[str, Any] = {}
        if r.task == "classification":
            labels = self.data.labels
            kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels)), "label2id": {l: i for i, l in enumerate(labels)}}
        if r.quantize is not None:  # QLoRA (graftkit.io.quantize): the frozen base in 4 bit, what is trained whole kept apart
            if self.fsdp:
                raise ConfigError("quantize (a 4-bit base) cannot be sharded with FSDP2: its packed weights carry their scales "
                                  "outside the tensor; train QLoRA without --use_fsdp (one process, or DDP), or drop quantize")
            also = r.method.get("train_also", r.method.get("modules_to_save")) or []
            kwargs.update(quantize=r.quantize, keep_unquantized=list(also))
        model = gk.load_model(r.model, head=r.task, **kwargs)
        self._check_finite(model)  # else the run only fails on a NaN loss, with its folder written
        if r.task == "classification" and getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        method = dict(r.method)
        if r.task == "classification":
            heads = _head_names(model)
            also = list(method.get("train_also", method.get("modules_to_save", [])) or [])
            method.pop("modules_to_save", None)
            method["train_also"] = also + [h for h in heads if h not in also]
        gk.inject(model, method)
        if r.data.pack_examples:
            self._check_packing(model)
        if self.kernels == "liger":
            warning = kernels.apply_liger(model, explicit=r.optim.kernels == "liger")
            if warning:
                self.warnings.append(warning)
                self.kernels = "torch"
        from .inputs import data_record

        self.inputs = {"data": data_record(r.data_files(), {"train": len(self.data.train), "validation": len(self.data.validation)}),
                       "model": gk.get_state(model).fingerprint, "labels": self.data.labels}
        self.lineage, self.distiller = None, None
        if r.init_from:  # PVP / PANDA: the adapter starts from a saved one (train.lineage, train.distill)
            from .lineage import setup_lineage

            self.lineage, self.distiller = setup_lineage(self, model)
        if r.layerwise and r.layerwise.freeze_bottom:
            from .layerwise import freeze_bottom

            freeze_bottom(model, r.layerwise.freeze_bottom)
        if r.layerwise and r.layerwise.reinit_top:
            from .layerwise import reinit_top

            reinit_top(model, r.layerwise.reinit_top)
        if r.optim.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # the transformers 5 name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if r.optim.fast_dropout and self.acc.device.type == "cpu":
            from .dropout import use_fast_dropout

            use_fast_dropout(model)
        if r.optim.compile:
            kernels.compile_blocks(model)
        self.model = model
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named:
            raise ConfigError("nothing to train: the method and layerwise options leave no trainable parameter")
        # under FSDP2 too (it gathers a unit whose tensors differ in dtype as bytes): half the bytes gathered and held
        tuning = method_named(method.get("method"))
        if r.optim.precision == "bf16" and tuning is not None and tuning.frozen_base_in_bf16(method):
            self.frozen_in_bf16 = hold_frozen_linears_in_bf16(model)
        o = r.optim
        module = WithLoss(model, r.task, bool(r.multitask and r.multitask.balance), self.kernels)
        if tuning is not None:
            module.batch_hook = tuning.batch_hook({k: v for k, v in method.items() if k != "method"})
        if r.augment and (r.augment.mixup or r.augment.contrastive):
            from .augment import SentenceAugment

            module.augment = SentenceAugment(model, _head_names(model)[0], r.augment)
        self.mask_id = None
        if r.masked_thought:
            from .masked_thought import mask_token_id

            self.mask_id = mask_token_id(self.tokenizer, r.masked_thought.mask_token)
        self.order = Order(len(self.data.train), o.batch_size, self.world, self.rank, seed)
        self.steps_per_epoch = self.order.per_epoch // o.grad_accum
        if self.steps_per_epoch == 0:
            raise ConfigError(f"an epoch of {self.order.per_epoch} micro-batches is shorter than optim.grad_accum={o.grad_accum}")
        self.total = o.max_steps or o.epochs * self.steps_per_epoch
        # the method's own part in training (TuningMethod.training): its start runs before the optimizer
        # exists, since it may choose what trains
        self.method_training = tuning.training({k: v for k, v in method.items() if k != "method"}) if tuning is not None else None
        if self.method_training is not None:
            if self.resume and not self.method_training.resumable:
                raise ConfigError(f"a {method.get('method')} run cannot be resumed from a checkpoint (its own state, such as "
                                  "what it pruned, is not in the checkpoint); start it again without --resume")
            if self.fsdp and self.method_training.changes_what_trains:
                raise ConfigError(f"method {method.get('method')} changes what trains during training, which a sharded (FSDP2) "
                                  "model cannot follow; train it without --use_fsdp")
            self.method_training.lr = o.lr
            wanted = min(self.method_training.batches_needed, self.order.per_epoch)
            self.method_training.start(model, lambda batch: module(batch)[0], [self.prepared_batch(i) for i in range(wanted)],
                                       self.total)
            self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            if not self.named:
                raise ConfigError(f"nothing to train: method {method.get('method')} left no trainable parameter")
        if self.fsdp:  # shard first (on the run's device, process 0's weights): the optimizer must hold the shards
            module = fsdp.shard(module, model, self.acc.device)
            self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizer = _adamw(param_groups(r, model, self.named), o)
        if not self.fsdp:
            module = self.acc.prepare(module)
        self.module = module
        if self.distiller is not None:
            self.distiller.attach(self.acc.unwrap_model(module), self.acc.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(r, self.total))
        self.hft = None
        if r.hft:
            from .hft import HalfFineTuning

            self.hft = HalfFineTuning(self.named, r.hft.stage_steps, r.hft.fraction, seed)
        # different dropout streams per process (model init above used the same seed everywhere)
        torch.manual_seed(seed + self.rank)
        if self.resume:
            self.check_inputs()

        # every check passed: now the output folder may change
        self.start = 0
        self.acc.wait_for_everyone()
        if self.overwrite and self.final.is_dir() and any(self.final.iterdir()):
            # the old run stays in place until this one has finished (finish() swaps them); a
            # killed run leaves only its hidden .NAME.tmp-PID-* sibling, which the next run removes
            name = [None]
            if self.main:
                from ..outputs import Staged

                self.staged = Staged(self.final, overwrite=True)
                name = [self.staged.path.name]
            if self.world > 1:
                from accelerate.utils import broadcast_object_list

                broadcast_object_list(name)
            self.out = self.final.parent / name[0]
        elif self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.acc.wait_for_everyone()
        self.offloaded = _offload_theta0(self.model, self.out / ".theta0" / f"rank{self.rank}")
        ckpt = latest_checkpoint(self.out) if self.resume else None
        if ckpt is not None:
            state = load_checkpoint(ckpt)
            restore(state, self.named, self.optimizer, self.scheduler, self.rank, self.world)
            self.start = state["step"]
            self.console.print(f"resuming from {ckpt} (step {self.start} of {self.total})")
        elif self.main:
            for stale in (self.out / METRICS, self.out / "checkpoints"):
                if stale.is_dir():
                    shutil.rmtree(stale)
                elif stale.exists():
                    stale.unlink()
        if self.main and (self.out / METRICS).exists():  # drop records logged after the checkpoint
            lines = [ln for ln in (self.out / METRICS).read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= self.start]
            (self.out / METRICS).write_text("".join(ln + "\n" for ln in lines))
        self.acc.wait_for_everyone()
        self.write_run("running")
        self.started = True
        if self.main:
            (self.out / "recipe.yaml").write_text(_yaml(self.recipe.resolved()))

    # -- steps ----------------------------------------------------------------------------------
    def micro_batch(self, index: int) -> dict[str, torch.Tensor]:
        return self.to_device(self.host_batch(index))

    def host_batch(self, index: int) -> dict[str, torch.Tensor]:
        """Micro-batch ``index`` of this process, still on the CPU."""
        idx = self.order.micro_batch(index)
        batch = collate([self.data.train[i] for i in idx], self.tokenizer.pad_token_id)
        if self.mask_id is not None:
            from .masked_thought import mask_thought

            g = torch.Generator().manual_seed((self.recipe.optim.seed * 1_000_003 + index) * 64 + self.rank)
            batch = mask_thought(batch, self.recipe.masked_thought.ratio, self.mask_id, g)
        if self.recipe.augment and self.recipe.augment.mixup:
            from .augment import mixup_draw

            batch.update(mixup_draw(self.recipe.augment.mixup.alpha, len(idx), self.recipe.optim.seed, index, self.rank))
        return batch

    def prepared_batch(self, index: int) -> dict[str, torch.Tensor]:
        """Micro-batch ``index`` as train_step feeds it to the model (on the device)."""
        host = self.host_batch(index)
        if self.recipe.task == "causal-lm":
            host["target_index"] = target_index(host["labels"])
        return self.to_device(host)

    def rebuild_optimizer(self) -> None:
        """A fresh optimizer over what trains now (the method changed it); the schedule goes on from its step."""
        r = self.recipe
        done = self.scheduler.last_epoch
        self.named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.optimizer = _adamw(param_groups(r, self.model, self.named), r.optim)
        factor = _schedule(r, self.total)
        if self.method_training.restart_schedule:
            # the method starts a new training phase (LT-SFT's phase 2): the recipe's schedule again over the steps left
            factor = (lambda step, _phase=_schedule(r, self.total - done), _at=done: _phase(max(0, step - _at)))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.scheduler.last_epoch = done
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * factor(done)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.acc.device.type != "cuda":
            return {k: v.to(self.acc.device) for k, v in batch.items()}
        # from pinned memory the copy is queued behind the running kernels instead of waiting for them
        return {k: v.pin_memory().to(self.acc.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self, step: int) -> tuple[float, int]:
        o = self.recipe.optim
        self.module.train()
        loss_sum = torch.zeros((), device=self.acc.device)
        method_sum = torch.zeros((), device=self.acc.device)  # the method's extra loss (MethodTraining.extra_loss)
        tokens = 0
        hooks = self.method_training
        for k in range(o.grad_accum):
            host = self.host_batch(step * o.grad_accum + k)
            tokens += int(host["attention_mask"].sum())  # counted on the CPU: no wait for the device
            if self.recipe.task == "causal-lm":
                host["target_index"] = target_index(host["labels"])
            batch = self.to_device(host)
            if k == o.grad_accum - 1:
                sync = contextlib.nullcontext()
            else:
                sync = fsdp.no_sync(self.module) if self.fsdp else self.acc.no_sync(self.module)
            with sync, self.acc.autocast():
                loss, _, _ = self.module(batch)
                extra = hooks.extra_loss(self.model) if hooks is not None else None
                self.acc.backward((loss if extra is None else loss + extra) / o.grad_accum)
            loss_sum += loss.detach().float()
            if extra is not None:
                method_sum += extra.detach().float()
        loss = self.acc.reduce(loss_sum / o.grad_accum, reduction="mean") if self.world > 1 else loss_sum / o.grad_accum
        # the step's one wait for the device: a non-finite loss must stop it before the update
        value, method_value = torch.stack([loss, method_sum / o.grad_accum]).tolist()
        self.method_loss = method_value if hooks is not None else None
        if not math.isfinite(value):
            last = latest_checkpoint(self.out)  # run.json records the failure: see Run.ended
            keep = f"the last good checkpoint is {last} (resume with --resume after fixing the cause)" if last else "no checkpoint was written yet"
            if self.staged is not None or self.out != self.final:  # --overwrite: train() discards this run's folder
                keep = f"{self.final} still holds the previous run, unchanged"
            raise TrainingError(f"loss became {value} at step {step + 1}; stopped before updating the weights, {keep}. "
                                "Lower optim.lr, keep optim.max_grad_norm set, or use precision fp32")
        if self.hft is not None:
            self.hft.drop_frozen_grads(step)
        if o.max_grad_norm is not None:
            self.acc.clip_grad_norm_([p for _, p in self.named], o.max_grad_norm)
        if hooks is not None:
            hooks.before_update(self.model, step)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if hooks is not None and hooks.after_update(self.model, step):
            self.rebuild_optimizer()
        return value, tokens * self.world

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (and accuracy) over this process's share, summed over processes."""
        data = self.data.validation
        if not data:
            return {}
        self.module.eval()
        mine = data[self.rank::self.world]
        bs = self.recipe.eval.batch_size
        with self.whole_model():  # sharded: the processes' shares may differ in length (see fsdp.unsharded)
            return self.evaluate_share(mine, bs)

    def evaluate_share(self, mine: list[dict[str, Any]], bs: int) -> dict[str, float]:
        totals = torch.zeros(3, device=self.acc.device, dtype=torch.float64)  # loss x n, n, correct
        for i in range(0, len(mine), bs):
            batch = {k: v.to(self.acc.device) for k, v in collate(mine[i:i + bs], self.tokenizer.pad_token_id).items()}
            with self.acc.autocast():
                loss, n, correct = self.module(batch)
            if self.recipe.task == "classification" or not (self.recipe.multitask and self.recipe.multitask.balance):
                totals += torch.stack([loss.double() * n, n.double(), correct.double()])
        if self.world > 1:
            totals = self.acc.reduce(totals, reduction="sum")
        loss, n, correct = totals.tolist()
        out = {"val_loss": loss / max(n, 1)}
        out["val_accuracy" if self.recipe.task == "classification" else "val_token_accuracy"] = correct / max(n, 1)
        if self.recipe.eval.exact_match:
            from .rtuning import generate_answers, is_correct

            model = self.acc.unwrap_model(self.module).model
            model.config.use_cache = True
            with self.acc.autocast():  # in bf16 runs the frozen weights are bf16 (hold_frozen_linears_in_bf16)
                preds = generate_answers(model, self.tokenizer, None, self.recipe.eval.max_new_tokens, bs,
                                         prompt_ids=[e["prompt_ids"] for e in mine])
            hits = torch.tensor([sum(is_correct(p, e["answer"]) for p, e in zip(preds, mine)), len(mine)], device=self.acc.device,
                                dtype=torch.float64)
            if self.world > 1:
                hits = self.acc.reduce(hits, reduction="sum")
            out["val_exact_match"] = float(hits[0] / max(hits[1], 1))
            if self.main:
                self.samples = list(zip([e["answer"] for e in mine[:3]], preds[:3]))
        return out

    def fit(self) -> dict[str, Any]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        r = self.recipe
        for w in self.warnings:
            self.console.print(f"[yellow]warning:[/yellow] {w}")
        trainable = sum(p.numel() for _, p in self.named)
        total_params = sum(p.numel() for n, p in self.model.named_parameters() if "graft_adapter" not in n)
        self.console.print(f"graft train: {r.model} ({type(self.model).__name__}), {r.task}, method {r.method.get('method')}: "
                           f"{trainable:,} trainable of {total_params:,} ({100 * trainable / total_params:.2f}%); "
                           f"{len(self.data.train)} training examples, {len(self.data.validation)} validation; "
                           f"{self.total} steps of {r.optim.batch_size * self.world * r.optim.grad_accum} "
                           f"({self.world} process(es){fsdp.describe(self.module)}, {self.acc.device})")
        first_loss = last_loss = None
        evals: dict[str, float] = {}
        t0 = time.perf_counter()
        tokens_run = 0
        columns = (TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
                   TextColumn("lr {task.fields[lr]:.2e}"), TextColumn("{task.fields[tps]:,.0f} tok/s"), TimeElapsedColumn(), TimeRemainingColumn())
        bar = Progress(*columns, console=self.console, disable=not (self.main and self.progress), transient=False)
        every, ck = r.eval.every, r.output.checkpoint_every
        if r.eval.at_start and self.start == 0:
            before = self.evaluate()
            if before:
                self.log({"step": 0, **before})
                self.console.print("before training: " + ", ".join(f"{k} {v:.4f}" for k, v in before.items()))
                self.baseline = before
        with bar:
            task = bar.add_task("train", total=self.total, completed=self.start, loss=float("nan"), lr=self.scheduler.get_last_lr()[0], tps=0.0)
            for step in range(self.start, self.total):
                ts = time.perf_counter()
                lr = self.scheduler.get_last_lr()[0]
                loss, tokens = self.train_step(step)
                if _STEP_SLEEP:  # lets the kill-and-resume test land its kill mid-run
                    time.sleep(_STEP_SLEEP)
                dt = time.perf_counter() - ts
                tokens_run += tokens
                first_loss = loss if first_loss is None else first_loss
                last_loss = loss
                done = step + 1
                record = {"step": done, "epoch": round(done / self.steps_per_epoch, 4), "loss": loss, "lr": lr,
                          "tokens": tokens, "tokens_per_s": round(tokens / dt, 1)}
                if self.method_loss is not None:
                    record["method_loss"] = self.method_loss
                if done % r.output.log_every == 0 or done == self.total:
                    self.log(record)
                if (every and done % every == 0) or done == self.total:
                    evals = self.evaluate()
                    if evals:
                        self.log({"step": done, **evals})
                        bar.console.print(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in evals.items()))
                if ck and done % ck == 0 and done < self.total:
                    self.checkpoint(done, record)
                bar.update(task, advance=1, loss=loss, lr=lr, tps=tokens_run / (time.perf_counter() - t0))
        elapsed = time.perf_counter() - t0
        summary = {"steps": self.total, "resumed_from": self.start or None, "first_loss": first_loss, "final_loss": last_loss,
                   **{f"start_{k}": v for k, v in getattr(self, "baseline", {}).items()}, **evals, "tokens_per_s": round(tokens_run / elapsed) if elapsed > 0 else None, "seconds": round(elapsed, 2),
                   "trainable_parameters": trainable, "kernels": self.kernels}
        if self.method_training is not None:
            with self.whole_model():
                report = self.method_training.report(self.model)
            if report:
                summary["method_report"] = report
        self.finish(summary)
        return summary

    def checkpoint(self, step: int, record: dict[str, Any]) -> None:
        states = [rng_state()]
        if self.world > 1:
            from accelerate.utils import gather_object

            states = gather_object(states)
        # sharded: every process takes part in the gathers, and only process 0 keeps (and writes) the copy
        snap = snapshot(self.named, self.optimizer, keep=self.main) if self.main or self.fsdp else None
        if self.main:
            info = {"fingerprint": self.recipe.fingerprint(), "micro_batch": step * self.recipe.optim.grad_accum,
                    "processes": self.world, "last": record, "run_fingerprint": self.run_fingerprint(), "inputs": self.inputs}
            save_checkpoint(self.out, step, snap, self.scheduler, states, info, self.recipe.output.keep_checkpoints)
        self.acc.wait_for_everyone()

    def whole_model(self) -> contextlib.AbstractContextManager:
        """Inside, a sharded model holds whole parameters (a collective: every process enters)."""
        return fsdp.unsharded(self.module) if self.fsdp else contextlib.nullcontext()

    def finish(self, summary: dict[str, Any]) -> None:
        import graftkit as gk

        self.acc.wait_for_everyone()
        with self.whole_model():
            if self.main:
                self.save_outputs(gk, summary)
        self.acc.wait_for_everyone()
        self.out = self.final

    def save_outputs(self, gk, summary: dict[str, Any]) -> None:
        """The adapter (and the exports asked for), then the run record and the summary table."""
        model = self.acc.unwrap_model(self.module).model
        if self.recipe.optim.gradient_checkpointing:
            (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        adapter = self.out / "adapter"
        if self.lineage:  # where the adapter started from (train.lineage), in its adapter.json
            from ..io.native import adapter_from_model, write_native

            saved = adapter_from_model(model)
            saved.meta["lineage"] = self.lineage
            write_native(saved, adapter, overwrite=True)
        else:
            gk.save_adapter(model, adapter, overwrite=True)
        outputs = {"adapter": str(self.final / "adapter")}  # final names: an --overwrite run is swapped in below
        if "peft" in self.recipe.output.export:
            gk.save_adapter(model, self.out / "adapter-peft", format="peft", overwrite=True)
            outputs["peft"] = str(self.final / "adapter-peft")
        if "merged" in self.recipe.output.export:
            gk.export_merged(adapter, self.recipe.model, self.out / "merged", overwrite=True)
            outputs["merged"] = str(self.final / "merged")
        summary["outputs"] = outputs
        shutil.rmtree(self.out / ".theta0", ignore_errors=True)
        self.write_run("done", summary=summary)
        if self.staged is not None:  # complete: now the new run replaces the old one
            self.staged.commit()
            self.out = self.final
        self.print_summary(summary)

    def print_summary(self, s: dict[str, Any]) -> None:
        from rich.table import Table

        t = Table(title="graft train: summary", show_header=False)
        t.add_column(style="bold")
        t.add_column()
        for k, v in s.items():
            if k == "outputs":
                for name, path in v.items():
                    t.add_row(name, path)
            elif v is not None:
                t.add_row(k.replace("_", " "), f"{v:.4f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v))
        t.add_row("metrics", str(self.out / METRICS))
        self.console.print(t)


def _offload_theta0(model: nn.Module, folder: Path) -> int:
    """Move the frozen starting values of in-place sites (full fine-tuning keeps ``theta0`` to
    compute ``delta = theta - theta0``) to memory-mapped files: training never reads them, so
    they cost no memory until the adapter is saved. Returns the bytes moved out of memory."""
    from ..adapter import sites
    from ..methods.inplace import DeltaSite

    moved = 0
    for i, site in enumerate(sites(model).values()):
        t = getattr(site, "theta0", None)
        if not isinstance(site, DeltaSite) or site.absolute or t is None or t.device.type != "cpu" or t.numel() < 4096:
            continue
        sharded = fsdp.is_sharded(t)  # FSDP: this process's cut of it (see fsdp.shard), mapped the same way
        whole, t = t, (t.to_local() if sharded else t).contiguous()
        if not t.numel():  # more processes than rows: an empty cut
            continue
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i}.bin"
        t.view(-1).view(torch.uint8).numpy().tofile(path)
        mapped = torch.from_file(str(path), shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)
        if sharded:
            from torch.distributed.tensor import DTensor

            mapped = DTensor.from_local(mapped, whole.device_mesh, whole.placements, run_check=False, shape=whole.shape,
                                        stride=whole.stride())
        site.theta0 = mapped
        moved += t.numel() * t.element_size()
    return moved


def _diff(old: dict, new: dict, prefix: str = "") -> str:
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = _diff(a, b, f"{prefix}{key}.")
            if sub != "no visible difference":
                changes.append(sub)
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return "; ".join(changes[:3]) if changes else "no visible difference"


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def train(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, console=None, progress: bool = True) -> dict[str, Any]:
    """Run a recipe; returns the summary (also in ``<output>/run.json``)."""
    run = Run(recipe, resume=resume, overwrite=overwrite, console=console, progress=progress)
    try:
        run.setup()
        return run.fit()
    except BaseException as exc:
        err = run.ended(exc)
        if run.staged is not None:  # a failed --overwrite run: drop its folder, the previous run stays
            run.staged.discard()
        if err is not exc:
            raise err from exc
        raise
    finally:
        if run.own_group:  # the one-process group fsdp.start_processes made (a library caller may train again)
            fsdp.end_processes()
