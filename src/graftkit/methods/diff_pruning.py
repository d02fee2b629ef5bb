"""Diff pruning: a task-specific diff vector with an L0 penalty through hard-concrete gates.

Guo et al., 2021, "Parameter-Efficient Transfer Learning with Diff Pruning" (ACL). Each selected
parameter gets ``theta = theta0 + delta`` with

    delta = z * w,    z = min(1, max(0, s * (zeta - gamma) + gamma)),
    s = sigmoid((log u - log(1 - u) + log_alpha) / beta),   u ~ U(0, 1)

the hard-concrete gate of Louizos et al. (2018): a binary concrete variable stretched to
``(gamma, zeta)`` (``gamma < 0 < 1 < zeta``) and clipped, so ``z`` is exactly 0 or 1 with positive
probability. The expected number of nonzero gates is differentiable,

    E[||z||_0] = sum sigmoid(log_alpha - beta * log(-gamma / zeta)),

and is added to the task loss with weight ``l0_weight`` (``MethodTraining.extra_loss``). In evaluation
the gates are deterministic, ``z = min(1, max(0, sigmoid(log_alpha) * (zeta - gamma) + gamma))``.
Defaults follow the authors' code: ``w = 0`` and ``log_alpha = 5`` at the start (the model is the base
model; every gate open), ``(gamma, zeta) = (-1.5, 1.5)``, ``beta = 1``, ``l0_weight = 1.25e-7``.

``target_sparsity`` (the paper's sense: the share of entries the diff vector keeps, 0.005 for its
0.5%) projects ``delta`` onto that L0 ball by magnitude, globally over the selected parameters, as the
paper does after training; with ``project_at < 1`` this happens after that share of the run and the
remaining steps fine-tune the kept entries with the gates fixed (the paper's second stage). The
structured (grouped) variant is not implemented.

The site (``WeightDeltaSite``: the delta is added in the forward pass, the base stays untouched) holds
``w`` and ``log_alpha`` while training; the adapter is saved compactly as the nonzero entries of the
deterministic ``z * w`` (methods/sparse.py), and a reloaded one fixes its gates to those entries.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from pydantic import AliasChoices, Field, model_validator
from torch import nn

from ..layers import layer_kind, to_matrix
from ..registry import METHODS
from ..targets import ParamInfo
from .base import MethodConfig, MethodTraining, Site
from .sparse import STORED, bind_saved, check_saved, saved_shapes, scatter, sparse_merge_deltas, to_sparse
from .weight_delta import WeightDeltaMethod, WeightDeltaSite, adapter_dtype

#: a log_alpha that fixes a gate (open or shut) in training as in evaluation: sigmoid saturates to exactly 1 or 0
FIXED = 1e4


class DiffPruningConfig(MethodConfig):
    targets: list[str] = Field(default_factory=lambda: ["*"], validation_alias=AliasChoices("targets", "target_modules"))
    #: weight of the expected L0 norm in the loss
    l0_weight: float = Field(1.25e-7, ge=0)
    #: the concrete temperature
    beta: float = Field(1.0, gt=0)
    #: the stretch interval (gamma, zeta), gamma < 0 and zeta > 1
    gamma: float = Field(-1.5, lt=0)
    zeta: float = Field(1.5, gt=1)
    log_alpha_init: float = 5.0
    #: the share of entries the final diff vector keeps, in (0, 1] (None: whatever the gates keep)
    target_sparsity: float | None = None
    #: when the projection to target_sparsity happens, as a share of the run (1: after the last step)
    project_at: float = Field(1.0, gt=0, le=1)
    #: False: w starts random (N(0, 0.02^2)) and log_alpha uniform in (-2, 2) - a non-identity start for tests
    init_weights: bool = True

    @model_validator(mode="after")
    def _check(self):
        if self.target_sparsity is not None and not 0 < self.target_sparsity <= 1:
            raise ValueError(f"target_sparsity {self.target_sparsity} is outside (0, 1]; give the share of entries to keep, "
                             "e.g. 0.005 for the paper's 0.5%")
        return self


def hard_concrete(log_alpha: torch.Tensor, beta: float, gamma: float, zeta: float, sample: bool,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Gates ``z`` in [0, 1]: sampled (training) or the deterministic test-time estimate."""
    if sample:
        u = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device, dtype=torch.float32)
        u = u.clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha.float()) / beta)
    else:
        s = torch.sigmoid(log_alpha.float())
    return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def expected_l0(log_alpha: torch.Tensor, beta: float, gamma: float, zeta: float) -> torch.Tensor:
    """``E[||z||_0] = sum P(z > 0)``, differentiable in log_alpha."""
    return torch.sigmoid(log_alpha.float() - beta * math.log(-gamma / zeta)).sum()


class DiffPruningSite(WeightDeltaSite):
    """``delta = z * w`` in the stored layout of the base tensor; saved as its sparse nonzero entries."""

    slots = ("indices", "values")  # the saved form; the trained tensors are ``trained_slots``
    trained_slots = ("w", "log_alpha")

    def __init__(self, info: ParamInfo, kind: str, settings: Mapping[str, Any]):
        # WeightDeltaSite.__init__ reads an (out, in) view; diff pruning also gates 1-D tensors (biases, norms)
        Site.__init__(self, info, kind)
        weight = info.param
        self.dtype = adapter_dtype(weight)
        self.settings = dict(settings)
        self.register_buffer("merged_delta", torch.empty(0), persistent=False)
        shape = weight.shape
        if settings.get("init_weights", True):
            w = torch.zeros(shape, dtype=self.dtype)
            la = torch.full(shape, float(settings.get("log_alpha_init", 5.0)), dtype=torch.float32)
        else:
            w = torch.randn(shape, dtype=self.dtype) * 0.02
            la = torch.rand(shape) * 4 - 2
        self.w = nn.Parameter(w.to(weight.device))
        self.log_alpha = nn.Parameter(la.to(weight.device))
        self.stored = settings.get(STORED)

    def gates(self) -> torch.Tensor:
        s = self.settings
        # the owner's mode, not the site's: a site injected into a model in eval mode starts in train mode
        return hard_concrete(self.log_alpha, s["beta"], s["gamma"], s["zeta"], sample=self.owner.training)

    def dense_delta(self, weight: torch.Tensor) -> torch.Tensor:
        return self.gates() * self.w.float()

    def delta_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return to_matrix(self.kind, self.dense_delta(weight))

    def _delta_output(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind != "embedding":
            return super()._delta_output(x)
        # an embedding's delta is read by row: gate only the rows this batch looks up, not the whole vocabulary
        m = self.owner
        rows, inverse = torch.unique(x, return_inverse=True)
        s = self.settings
        d = hard_concrete(self.log_alpha[rows], s["beta"], s["gamma"], s["zeta"], sample=m.training) * self.w[rows].float()
        pad = None
        if m.padding_idx is not None:
            hit = torch.nonzero(rows == m.padding_idx)
            pad = int(hit[0, 0]) if hit.numel() else None
        return F.embedding(inverse, d, pad, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)

    def eval_delta(self) -> torch.Tensor:
        s = self.settings
        return hard_concrete(self.log_alpha, s["beta"], s["gamma"], s["zeta"], sample=False) * self.w.float()

    def delta(self) -> dict[str, torch.Tensor]:
        if self.merged:  # what merge() added (formed in whatever mode the model was in then)
            return {self.pname: self.merged_delta.clone()}
        return {self.pname: self.eval_delta().detach()}

    # merging folds the deterministic delta and remembers it, so unmerging is exact whatever the mode
    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        d = self.eval_delta()
        self.merged_delta = d.clone()
        self.base.add_(d.to(self.base.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base.sub_(self.merged_delta.to(self.base.dtype))
        self.merged_delta = torch.empty(0, device=self.base.device)
        self.merged = False

    @torch.no_grad()
    def fix(self, keep: torch.Tensor) -> None:
        """Fix the gates to the entries ``keep`` (flat positions), ``w`` to the current delta there."""
        d = self.eval_delta().reshape(-1)
        w = torch.zeros_like(d)
        w[keep] = d[keep]
        la = torch.full_like(d, -FIXED)
        la[keep] = FIXED
        self.w.copy_(w.view(self.w.shape).to(self.w.dtype))
        self.log_alpha.copy_(la.view(self.log_alpha.shape))

    # -- saved form ---------------------------------------------------------------------------
    def slot_tensors(self) -> dict[str, torch.Tensor]:
        indices, values = to_sparse(self.eval_delta().detach())
        return {"indices": indices, "values": values}

    def slot_shapes(self) -> dict[str, tuple[int, ...]]:
        if self.stored is not None:
            return {"indices": (self.stored,), "values": (self.stored,)}
        return {k: tuple(v.shape) for k, v in self.slot_tensors().items()}

    @torch.no_grad()
    def load_slots(self, tensors: dict[str, torch.Tensor]) -> None:
        indices = tensors["indices"].to(self.w.device, torch.int64)
        self.w.copy_(scatter(indices, tensors["values"], self.w.shape, self.w.device).to(self.w.dtype))
        la = torch.full((self.log_alpha.numel(),), -FIXED, device=self.log_alpha.device)
        la[indices] = FIXED
        self.log_alpha.copy_(la.view(self.log_alpha.shape))
        self.stored = None
        if self.merged:  # loading into a merged site: the weight follows the new delta
            self.base.sub_(self.merged_delta.to(self.base.dtype))
            self.merged_delta = self.eval_delta()
            self.base.add_(self.merged_delta.to(self.base.dtype))


def diff_sites(model: nn.Module) -> dict[str, DiffPruningSite]:
    from ..adapter import sites

    return {n: s for n, s in sites(model).items() if isinstance(s, DiffPruningSite)}


class DiffPruningTraining(MethodTraining):
    def __init__(self, config: DiffPruningConfig):
        self.config = config
        self.total = 0
        self.project_step: int | None = None
        self.projected = False
        # a projection before the last step fixes the gates (log_alpha stops training): not in a checkpoint
        self.resumable = config.target_sparsity is None or config.project_at >= 1

    def start(self, model, forward, batches, total_steps) -> None:
        self.total = total_steps
        if self.config.target_sparsity is not None:
            self.project_step = min(total_steps, max(1, int(round(self.config.project_at * total_steps))))

    def extra_loss(self, model) -> torch.Tensor | None:
        c = self.config
        if self.projected or c.l0_weight == 0:
            return None
        return c.l0_weight * sum(expected_l0(s.log_alpha, c.beta, c.gamma, c.zeta) for s in diff_sites(model).values())

    @torch.no_grad()
    def project(self, model) -> None:
        """Keep the ``target_sparsity`` share of entries of largest |delta| over every site; fix the gates."""
        sites = list(diff_sites(model).values())
        mags = torch.cat([s.eval_delta().abs().reshape(-1).cpu() for s in sites])
        k = max(1, int(round(self.config.target_sparsity * mags.numel())))
        top = torch.topk(mags, k, sorted=False).indices.sort().values
        start = 0
        for s in sites:
            n = s.w.numel()
            lo, hi = torch.searchsorted(top, torch.tensor([start, start + n]))
            s.fix((top[lo:hi] - start).to(s.w.device))
            s.log_alpha.requires_grad_(False)
            start += n
        self.projected = True

    def after_update(self, model, step) -> bool:
        if self.project_step is not None and not self.projected and step + 1 == self.project_step:
            self.project(model)
            return step + 1 < self.total  # fine-tune the kept entries: w only, a fresh optimizer
        return False

    def report(self, model) -> dict[str, Any]:
        c = self.config
        sites = list(diff_sites(model).values())
        total = sum(s.w.numel() for s in sites)
        nonzero = sum(int((s.eval_delta() != 0).sum()) for s in sites)
        with torch.no_grad():
            l0 = sum(float(expected_l0(s.log_alpha, c.beta, c.gamma, c.zeta)) for s in sites)
        return {"nonzero_entries": nonzero, "entries": total, "density": round(nonzero / total, 6) if total else 0.0,
                "expected_l0": round(l0, 2), "projected": self.projected}


@METHODS.register("diff_pruning")
class DiffPruning(WeightDeltaMethod):
    name = "diff_pruning"
    config_cls = DiffPruningConfig
    site_cls = DiffPruningSite
    kinds = ("linear", "conv1d", "embedding", "conv2d", "param")
    merge_deltas = staticmethod(sparse_merge_deltas)
    check_saved = staticmethod(check_saved)
    saved_shapes = staticmethod(saved_shapes)

    @classmethod
    def eligible(cls, info: ParamInfo) -> bool:
        return info.param.is_floating_point() and layer_kind(info.module, info.pname) in cls.kinds

    @classmethod
    def bind_saved(cls, model: nn.Module, adapter):
        return bind_saved(model, adapter)

    @classmethod
    def make_sites(cls, infos: list, config: MethodConfig, options: dict[str, dict[str, Any]]) -> list[Site]:
        built = super().make_sites(infos, config, options)
        for opts in options.values():  # a load-time detail, not an option to save again
            if isinstance(opts, dict):
                opts.pop(STORED, None)
        return built

    @classmethod
    def training(cls, config: Any) -> MethodTraining:
        from ..config import parse_config

        return DiffPruningTraining(parse_config(DiffPruningConfig, dict(config)))
