"""LT-SFT: Lottery-Ticket Sparse Fine-Tuning (composable sparse fine-tuning).

Ansell et al., 2022, "Composable Sparse Fine-Tuning for Cross-Lingual Transfer" (ACL). In one
``graft train`` run:

1. phase 1 trains every selected entry, ``theta0 -> theta1``, for ``phase1_steps`` optimizer steps
   (default: ``phase1_fraction`` of the run, half);
2. the ``K`` entries with the largest ``|theta1 - theta0|`` over all selected parameters are kept
   (``num_trainable`` = K, or ``fraction`` of the selected entries; neither: 1%);
3. the parameters go back to ``theta0`` and phase 2 trains only those K entries (a fresh optimizer),
   giving the sparse difference vector ``phi = theta2 - theta0``.

``phi`` is saved compactly (indices and values, methods/sparse.py). Two of them compose by addition,
``theta0 + phi_task + phi_lang``, which ``graft merge`` with ``task_arithmetic`` (weights 1) does.

Phase 2 runs the recipe's learning-rate schedule again (warmup and decay) over the steps left, as the
paper's second fine-tuning does (``restart_schedule``, read by the training loop when it rebuilds the
optimizer). Deviation: heads trained whole (``train_also``) keep their phase-1 values instead of being
reset. The
selection needs training, so ``gk.inject`` alone trains every selected entry (as ``full``) and saves
those that changed.
"""
from __future__ import annotations

from typing import Any

import torch
from pydantic import AliasChoices, Field

from ..errors import ConfigError
from ..registry import METHODS
from .base import MethodConfig, MethodTraining
from .sparse import SparseMethod, entries_wanted, sparse_sites


class LTSFTConfig(MethodConfig):
    targets: list[str] = Field(default_factory=lambda: ["*"], validation_alias=AliasChoices("targets", "target_modules"))
    #: K, the entries kept for phase 2 (or ``fraction`` of the selected entries; neither: 1%)
    num_trainable: int | None = None
    fraction: float | None = None
    #: phase 1's length in optimizer steps (None: ``phase1_fraction`` of the run)
    phase1_steps: int | None = Field(None, ge=1)
    phase1_fraction: float = Field(0.5, gt=0, lt=1)


DEFAULT_FRACTION = 0.01


class LTSFTTraining(MethodTraining):
    resumable = False  # the phase and the kept entries are not in a checkpoint

    def __init__(self, config: LTSFTConfig):
        self.config = config
        self.phase1 = 0
        self.kept = self.entries = 0
        self.switched = False
        self.restart_schedule = False  # True while the loop rebuilds the optimizer for phase 2

    def start(self, model, forward, batches, total_steps) -> None:
        c = self.config
        self.phase1 = c.phase1_steps if c.phase1_steps is not None else max(1, int(round(c.phase1_fraction * total_steps)))
        if self.phase1 >= total_steps:
            raise ConfigError(f"lt_sft: phase1_steps {self.phase1} leaves no step for phase 2 (the run has {total_steps} steps); "
                              "lower phase1_steps or train longer")
        self.entries = sum(s.base.numel() for s in sparse_sites(model).values())
        fraction = c.fraction if c.fraction is not None or c.num_trainable is not None else DEFAULT_FRACTION
        self.kept = entries_wanted("lt_sft", c.num_trainable, fraction, self.entries)

    @torch.no_grad()
    def select(self, model) -> None:
        """Keep the K most-changed entries over every site, reset to theta0, train only those."""
        sites = list(sparse_sites(model).values())
        change = torch.cat([(s.base.detach().float() - s.theta0.to(s.base.device).float()).abs().reshape(-1).cpu() for s in sites])
        top = torch.topk(change, self.kept, sorted=False).indices.sort().values
        start = 0
        for s in sites:
            n = s.base.numel()
            lo, hi = torch.searchsorted(top, torch.tensor([start, start + n]))
            s.set_mask(top[lo:hi] - start)
            s.base.copy_(s.theta0.to(s.base.device, s.base.dtype))
            start += n
        self.switched = True

    def after_update(self, model, step) -> bool:
        self.restart_schedule = False
        if step + 1 == self.phase1:
            self.select(model)
            self.restart_schedule = True
            return True  # phase 2 starts with a fresh optimizer (no phase-1 moments) and schedule
        if self.switched:
            for s in sparse_sites(model).values():
                s.enforce()
        return False

    def report(self, model) -> dict[str, Any]:
        changed = sum(int((s.base.detach().float() != s.theta0.to(s.base.device).float()).sum()) for s in sparse_sites(model).values())
        return {"phase1_steps": self.phase1, "kept_entries": self.kept, "entries": self.entries,
                "density": round(self.kept / self.entries, 6) if self.entries else 0.0, "changed_entries": changed}


@METHODS.register("lt_sft")
class LTSFT(SparseMethod):
    name = "lt_sft"
    config_cls = LTSFTConfig

    @classmethod
    def resolve(cls, model, config: LTSFTConfig, skip=()):
        infos, options = super().resolve(model, config, skip)
        fraction = config.fraction if config.fraction is not None or config.num_trainable is not None else DEFAULT_FRACTION
        entries_wanted(cls.name, config.num_trainable, fraction, sum(i.param.numel() for i in infos))  # bad input: now, in one line
        return infos, options

    @classmethod
    def training(cls, config: Any) -> MethodTraining:
        from ..config import parse_config

        return LTSFTTraining(parse_config(LTSFTConfig, dict(config)))
