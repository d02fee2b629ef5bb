"""GreenTrainer: train the tensors that buy the most loss reduction per backward FLOP.

Huang et al., 2024, "Towards Green AI in Fine-tuning Large Language Models via Adaptive
Backpropagation" (ICLR). Training a subset ``S`` of the model's tensors costs, in the backward pass,

    T(S) = sum_{j >= min(S)} t_dy(j) + sum_{j in S} t_dw(j)

over the tensors in forward order: ``t_dw(j)`` is the cost of tensor j's weight gradient, ``t_dy(j)``
the cost of passing the activation gradient back through its operation, which every tensor above the
deepest trained one must pay (the gradient has to reach it). Each tensor's contribution is the
first-order Taylor estimate of the loss change its update makes, ``I(j) = -sum g1 * dw0``, where
``dw0`` is the weight change of one optimizer step on a batch and ``g1`` the gradient at the updated
weights (the paper's estimate, normalised by max |I|). GreenTrainer picks

    max sum_{j in S} I(j)   subject to   T(S) <= flops_budget * T(everything)

by dynamic programming (a 0/1 knapsack over ``t_dw`` for each choice of the deepest tensor, whose
``t_dy`` tail is then fixed), trains only ``S`` in place (as full fine-tuning does: the delta is
``theta - theta0``), and can select again every ``reselect_every`` steps.

FLOPs per tensor are counted from one real forward pass on the run's first batch (its padded
shapes): a linear or Conv1D weight (out x in) over N token positions has ``t_dw = t_dy = 2 N in out``;
its bias ``t_dw = N out``; a LayerNorm weight ``t_dw = N d``, ``t_dy = 4 N d``; an embedding ``t_dw = N d``
and no ``t_dy`` (no gradient flows into token ids). The attention product between the projections
(``QK^T`` and ``AV``: ``8 B L^2 d`` backward) is charged to the last projection its attention block
calls before the output projection, so reaching Q, K or V pays it. Other parameter-free operations
(activations, softmax, residual adds) are elementwise and not counted.

``flops_budget`` is the fraction of the full backward pass allowed (the issue's definition; the paper's
rho also counts the forward pass). Selection needs training batches, so it happens in ``graft train``
(``TuningMethod.training``); ``gk.inject`` alone trains every target, like ``full``.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
from pydantic import AliasChoices, Field
from torch import nn

from ..errors import ConfigError
from ..layers import is_conv1d
from ..registry import METHODS
from ..targets import ParamInfo
from .base import HOLDER, MethodConfig, MethodTraining
from .inplace import InplaceMethod

#: knapsack resolution: the budget is split into this many units (weights rounded up, so a selection
#: never exceeds the budget)
UNITS = 2000


class GreenTrainerConfig(MethodConfig):
    targets: list[str] = Field(default_factory=lambda: ["*"], validation_alias=AliasChoices("targets", "target_modules"))
    #: the fraction of full fine-tuning's backward FLOPs the selection may spend, in (0, 1]
    flops_budget: float = Field(0.5, gt=0, le=1)
    #: select again every this many optimizer steps (the paper: every few epochs); None: once, at the start
    reselect_every: int | None = Field(None, ge=1)
    #: training micro-batches averaged for the importance estimate (the paper uses one)
    importance_batches: int = Field(1, ge=1)


def tensor_flops(model: nn.Module, batch_forward: Callable[[], Any], names: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(names in forward order, t_dy, t_dw)`` for the floating-point parameters ``names``, counted
    from one forward pass (``batch_forward()``) with hooks recording each module's input shape."""
    wanted = set(names)
    owner_of: dict[int, list[tuple[str, str]]] = {}
    for mname, module in model.named_modules():
        if mname.endswith(HOLDER) or f".{HOLDER}." in f".{mname}.":
            continue
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if full in wanted:
                owner_of.setdefault(id(module), []).append((full, pname))
    order: list[str] = []
    t_dy: dict[str, float] = {}
    t_dw: dict[str, float] = {}
    attention_stack: list[list[str]] = []  # projections called inside the innermost attention block now running

    def linear_like(m: nn.Module) -> bool:
        return isinstance(m, nn.Linear) or is_conv1d(m)

    def record(module: nn.Module, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()), None)
        entries = owner_of.get(id(module), [])
        if not entries or not isinstance(x, torch.Tensor):
            return
        for full, pname in entries:
            if full in t_dw:  # called twice (tied or shared): count the first call's position
                continue
            p = module._parameters[pname]
            if linear_like(module):
                in_f = module.in_features if isinstance(module, nn.Linear) else p.shape[0] if pname == "weight" else x.shape[-1]
                n = x.numel() / max(in_f, 1)
                if pname == "weight":
                    cost = 2.0 * n * p.numel()
                    t_dw[full], t_dy[full] = cost, cost
                else:
                    t_dw[full], t_dy[full] = n * p.numel(), 0.0
            elif isinstance(module, nn.Embedding):
                t_dw[full], t_dy[full] = float(x.numel() * module.embedding_dim), 0.0
            elif isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower():
                d = p.numel()
                n = x.numel() / max(d, 1)
                t_dw[full], t_dy[full] = n * d, (4.0 * n * d if pname == "weight" else 0.0)
            else:  # an unknown module: its parameters' gradients cost about one pass over them per row
                rows = x.shape[0] if x.dim() else 1
                t_dw[full], t_dy[full] = 2.0 * rows * p.numel(), 0.0
            order.append(full)
            if attention_stack and linear_like(module) and pname == "weight":
                attention_stack[-1].append(full)

    def attention_enter(module, args, kwargs):
        attention_stack.append([])

    def attention_exit(module, args, kwargs, output):
        called = attention_stack.pop()
        x = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or not called:
            return
        b, length, d = x.shape
        # QK^T and AV: 2 B L^2 d each forward, twice that backward
        core = 8.0 * b * length * length * d
        out_names = ("o_proj", "out_proj", "c_proj", "dense", "out_lin")
        before_out = [c for c in called if not c.rsplit(".", 2)[-2].endswith(out_names)]
        target = (before_out or called)[-1]
        t_dy[target] = t_dy.get(target, 0.0) + core

    handles = []
    for module in model.modules():
        if id(module) in owner_of:
            handles.append(module.register_forward_hook(record, with_kwargs=True))
        direct = [c for c in module.children() if linear_like(c)]
        if "attention" in type(module).__name__.lower() and len(direct) >= 2:
            handles.append(module.register_forward_pre_hook(attention_enter, with_kwargs=True))
            handles.append(module.register_forward_hook(attention_exit, with_kwargs=True))
    try:
        with torch.no_grad():
            batch_forward()
    finally:
        for h in handles:
            h.remove()
    return order, np.array([t_dy[n] for n in order]), np.array([t_dw[n] for n in order])


def backward_flops(t_dy: np.ndarray, t_dw: np.ndarray, selected: np.ndarray) -> float:
    """T(S): the activation-gradient tail down to the deepest selected tensor plus the selected weight
    gradients (tensors in forward order)."""
    reach = np.maximum.accumulate(selected.astype(float))
    return float(np.sum(reach * t_dy + selected * t_dw))


def select_tensors(t_dy: np.ndarray, t_dw: np.ndarray, importance: np.ndarray, budget: float,
                   forced: np.ndarray | None = None, units: int = UNITS) -> np.ndarray:
    """The selection (a bool mask over the tensors, forward order) with the largest total importance
    whose ``backward_flops`` is at most ``budget``; ``forced`` tensors are always in it. An exact 0/1
    knapsack on weights rounded UP to ``budget / units``, one per choice of the deepest tensor."""
    n = len(t_dw)
    forced = np.zeros(n, bool) if forced is None else forced.astype(bool)
    if backward_flops(t_dy, t_dw, forced) > budget:
        raise ValueError("budget below the forced tensors' own cost")
    unit = budget / units
    tail = np.cumsum(t_dy[::-1])[::-1]  # tail[i] = sum_{j >= i} t_dy[j]
    deepest_forced = int(np.argmax(forced)) if forced.any() else n
    forced_dw = float(t_dw[forced].sum())
    best_value, best = 0.0, forced.copy()
    # items are added from the output side down; dp[c] = best importance of the items above with weight <= c
    dp = np.zeros(units + 1)
    keep = np.zeros((n, units + 1), bool)
    weights = np.ceil(t_dw / unit).astype(np.int64)
    for i in range(n - 1, -1, -1):
        if forced[i] or importance[i] <= 0:  # forced ones are paid for above; a harmful update is never worth FLOPs
            continue
        room = budget - tail[min(i, deepest_forced)] - forced_dw - t_dw[i]  # with i the deepest tensor trained
        if room >= 0:
            cap = min(units, int(math.floor(room / unit + 1e-9)))
            value = importance[i] + dp[cap]
            if value > best_value:
                chosen = forced.copy()
                chosen[i] = True
                c = cap
                for j in range(i + 1, n):  # walk the items above i back through the table
                    if keep[j, c]:
                        chosen[j] = True
                        c -= weights[j]
                best_value, best = value, chosen
        w = weights[i]
        if w <= units:
            take = np.full(units + 1, -np.inf)
            take[w:] = dp[: units + 1 - w] + importance[i]
            keep[i] = take > dp
            dp = np.maximum(dp, take)
    return best


class GreenTrainerTraining(MethodTraining):
    resumable = False  # which tensors train is chosen from the run's own start: a checkpoint does not hold it

    def __init__(self, config: GreenTrainerConfig):
        self.config = config
        self.batches_needed = config.importance_batches
        self.forward: Callable[[dict], torch.Tensor] | None = None
        self.batches: list[dict] = []
        self.order: list[str] = []
        self.t_dy = self.t_dw = np.zeros(0)
        self.selected = np.zeros(0, bool)
        self.selections = self.changes = 0
        self.steps = self.total = 0
        self.saved = 0.0  # backward FLOPs not spent so far, against full fine-tuning on the same batches

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        from ..adapter import require_state

        state = require_state(model)
        named = dict(model.named_parameters())
        return {n: named[n] for n in [*state.targets, *state.train_also] if n in named}

    def importance(self, model: nn.Module) -> np.ndarray:
        """``I = -sum g1 * dw0`` per tensor (forward order), normalised by max |I|; the weights are put back."""
        params = self._params(model)
        tensors = [params[n] for n in self.order]
        for p in tensors:
            p.requires_grad_(True)
        start = [p.detach().clone() for p in tensors]
        total = np.zeros(len(tensors))
        lr = self.lr or 1e-4
        for batch in self.batches:
            for p in tensors:
                p.grad = None
            self.forward(batch).backward()
            g0 = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in tensors]
            with torch.no_grad():  # AdamW's first step: lr * g / (|g| + eps), bias corrections cancelling
                dw0 = [-lr * g / (g.abs() + 1e-8) for g in g0]
                for p, d in zip(tensors, dw0):
                    p.add_(d.to(p.dtype))
            for p in tensors:
                p.grad = None
            self.forward(batch).backward()
            with torch.no_grad():
                for k, (p, d) in enumerate(zip(tensors, dw0)):
                    if p.grad is not None:
                        total[k] -= float((p.grad.float() * d.float()).sum())
                for p, w in zip(tensors, start):
                    p.copy_(w)
            for p in tensors:
                p.grad = None
        top = np.abs(total).max()
        return total / top if top > 0 else total

    def select(self, model: nn.Module) -> None:
        c = self.config
        params = self._params(model)
        from ..adapter import require_state

        heads = set(require_state(model).train_also)
        importance = self.importance(model)
        forced = np.array([n in heads for n in self.order])
        full = backward_flops(self.t_dy, self.t_dw, np.ones(len(self.order), bool))
        try:
            self.selected = select_tensors(self.t_dy, self.t_dw, importance, c.flops_budget * full, forced)
        except ValueError:
            need = backward_flops(self.t_dy, self.t_dw, forced) / full
            raise ConfigError(f"greentrainer: flops_budget {c.flops_budget} is below what the heads trained whole need alone "
                              f"({need:.3f} of the full backward pass); raise flops_budget above {need:.3f}") from None
        for name, chosen in zip(self.order, self.selected):
            params[name].requires_grad_(bool(chosen))
        self.selections += 1

    def start(self, model, forward, batches, total_steps) -> None:
        if not batches:
            raise ConfigError("greentrainer needs training batches to choose what trains; train it with graft train")
        self.forward, self.batches, self.total = forward, batches, total_steps
        params = self._params(model)
        self.order, self.t_dy, self.t_dw = tensor_flops(model, lambda: forward(batches[0]), list(params))
        missing = [n for n in params if n not in set(self.order)]
        if missing:  # never used in the forward pass (e.g. a pooler the task skips): nothing to gain, never trained
            for n in missing:
                params[n].requires_grad_(False)
        self.select(model)

    def after_update(self, model, step) -> bool:
        self.steps = step + 1
        every = self.config.reselect_every
        used = backward_flops(self.t_dy, self.t_dw, self.selected)
        self.saved += backward_flops(self.t_dy, self.t_dw, np.ones(len(self.order), bool)) - used
        if every and self.steps % every == 0 and self.steps < self.total:
            before = self.selected.copy()
            self.select(model)
            changed = not np.array_equal(before, self.selected)  # the same tensors: the optimizer keeps its state
            self.changes += changed
            return changed
        return False

    def report(self, model) -> dict[str, Any]:
        full = backward_flops(self.t_dy, self.t_dw, np.ones(len(self.order), bool))
        used = backward_flops(self.t_dy, self.t_dw, self.selected)
        return {"flops_budget": self.config.flops_budget, "tensors_trained": int(self.selected.sum()),
                "tensors": len(self.order), "backward_gflops_full": round(full / 1e9, 4),
                "backward_gflops_selected": round(used / 1e9, 4), "backward_flops_saved": round(1 - used / full, 4) if full else 0.0,
                "selections": self.selections, "selection_changes": self.changes, "backward_gflops_saved_in_run": round(self.saved / 1e9, 4)}


@METHODS.register("greentrainer")
class GreenTrainer(InplaceMethod):
    name = "greentrainer"
    config_cls = GreenTrainerConfig

    @classmethod
    def eligible(cls, info: ParamInfo) -> bool:
        return info.param.is_floating_point()

    @classmethod
    def training(cls, config: Any) -> MethodTraining:
        from ..config import parse_config

        return GreenTrainerTraining(parse_config(GreenTrainerConfig, dict(config)))
