"""LoRA initialisations from the weights (PiSSA, OLoRA) and from the data (EVA).

The LoRA config key ``init_lora_weights`` (alias ``init``) takes peft's names:

* ``pissa`` (Meng et al., 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation
  of Large Language Models"): with the SVD ``W = U S V^T`` (canonical (out, in) view) and scaling
  ``s``, ``A = sqrt(S_r / s) V_r^T`` and ``B = U_r sqrt(S_r / s)``, so ``s B A`` is the best rank-r
  part of ``W``; the base becomes the residual ``W_res = W - s B A`` and the model starts unchanged.
  ``pissa_niter_<N>`` is the fast variant: ``torch.svd_lowrank`` (randomized, ``N`` subspace
  iterations) instead of the full SVD, as in peft.
* ``olora`` (Büyükakyüz, 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language
  Models"): with the QR decomposition ``W = Q R``, ``B = Q_r`` (orthonormal columns) and
  ``A = R_r`` (first r rows); the base becomes ``W - s B A``.
* ``eva`` (Paischer et al., 2024, "One Initialization to Rule them All: Fine-tuning via Explained
  Variance Adaptation"): ``A`` holds the top right-singular vectors of each adapted layer's inputs
  on a few training batches (the principal components of the centred inputs), ``B = 0``. Ranks
  are redistributed across layers by explained variance: every layer may take up to
  ``round(rho * r)`` components and the ``sum(r)`` components with the largest explained-variance
  ratios win (a layer left with rank 0 loses its LoRA); ``adjust_scaling_factors`` keeps
  ``alpha / r`` per layer.

PiSSA and OLoRA train against the residual base, so a saved adapter is converted to a plain LoRA
against the ORIGINAL base (as peft's ``path_initial_model_for_weight_conversion``):
``s (B_t A_t - B_0 A_0) = s [B_t, B_0] [A_t; -A_0]``, rank ``2r`` with ``alpha`` doubled
(``* sqrt(2)`` under rsLoRA) so the scaling is unchanged. adapter.json records the conversion.

EVA differs from peft in how the components are computed (documented in docs/methods.md): graftkit
accumulates each layer's exact input covariance over the given batches (float64) and
eigendecomposes it; peft runs a randomized incremental PCA over its dataloader until the
components' cosine similarity between steps exceeds ``tau``. On the same data the two agree up to
peft's approximation (tests/test_lora_init.py compares them); ``tau`` therefore has no meaning here
and a non-default value is refused by name.
"""
from __future__ import annotations

import copy
import math
import re
from typing import Any, Callable

import torch
from pydantic import Field
from torch import nn

from ..config import StrictModel
from ..errors import AdapterError, ConfigError, UnsupportedError
from .base import MethodTraining, first_input

RESIDUAL_INITS = ("pissa", "olora")  # (and pissa_niter_<N>) the base becomes a residual
VALID_INITS = "true, false, gaussian, pissa, pissa_niter_<N> (N >= 1), olora, eva"
EVA_NEEDS_DATA = ("this LoRA has init_lora_weights 'eva', which starts from the SVD of the layers' inputs on training "
                  "batches: train it with graft train as method lora (the start runs on the first batches; not inside "
                  "compose, use init true, pissa or olora there), or call graftkit.methods.lora_init.eva_init(model, "
                  "batches) after gk.inject")
_NITER = re.compile(r"pissa_niter_(\d+)")


class EvaConfig(StrictModel):
    """peft's EvaConfig (the keys graftkit honours) plus ``batches``, graftkit's own."""

    rho: float = Field(2.0, ge=1.0)
    tau: float = Field(0.99, ge=0.0, le=1.0)
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True
    #: how many training micro-batches the start reads (peft: its dataloader until convergence)
    batches: int = Field(4, ge=1)


def check_init(value: Any) -> Any:
    """``init_lora_weights`` as given, or a ValueError naming the valid values."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value in ("gaussian", "pissa", "olora", "eva"):
            return value
        m = _NITER.fullmatch(value)
        if m and int(m.group(1)) >= 1:
            return value
    raise ValueError(f"init_lora_weights {value!r} is not known; valid: {VALID_INITS}")


def is_residual(init: Any) -> bool:
    return isinstance(init, str) and (init in RESIDUAL_INITS or _NITER.fullmatch(init) is not None)


def refuse_unsupported(name: str, init: str, kind: str, dora: bool, quantized: bool) -> None:
    if kind not in ("linear", "conv1d"):
        raise UnsupportedError(f"{name}: init_lora_weights {init!r} works on linear layers (Linear, Conv1D), not on a "
                               f"{kind} weight; leave it out of the targets or use init_lora_weights: true")
    if dora:
        raise UnsupportedError(f"init_lora_weights {init!r} with use_dora is not supported (the saved conversion to a "
                               "plain LoRA is exact for LoRA only); set use_dora: false or init_lora_weights: true")
    if quantized:
        raise UnsupportedError(f"{name} is a 4-bit quantized weight: init_lora_weights {init!r} needs the full-precision "
                               "weight; load the base without quantize")


# -- PiSSA / OLoRA --------------------------------------------------------------------------
def pissa_factors(w: torch.Tensor, r: int, scaling: float, niter: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with ``s B A`` the rank-r principal part of ``w`` (out, in), float32."""
    w = w.float()
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(w, q=r, niter=niter)
        vh = v.t()
    root = torch.sqrt(s / scaling)
    return root[:, None] * vh, u * root[None, :]


def olora_factors(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (first r rows of R, first r columns of Q) of ``w = Q R``, float32."""
    q, rr = torch.linalg.qr(w.float())
    return rr[:r].contiguous(), q[:, :r].contiguous()


def residual_factors(init: str, w: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    if init == "olora":
        return olora_factors(w, r)
    m = _NITER.fullmatch(init)
    return pissa_factors(w, r, scaling, int(m.group(1)) if m else None)


def converted_alpha(alpha: float, rslora: bool) -> float:
    """alpha of the rank-2r conversion with the same scaling (alpha/r, or alpha/sqrt(r) under rsLoRA)."""
    return alpha * math.sqrt(2) if rslora else alpha * 2


def converted_factors(site) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of rank 2r with ``s B' A' = s (B_t A_t - B_0 A_0)``: the trained delta against the original base."""
    a = torch.cat([site.lora_A.detach().float(), -site.initial_A.float()], dim=0)
    b = torch.cat([site.lora_B.detach().float(), site.initial_B.float()], dim=1)
    return a.to(site.lora_A.dtype).cpu().contiguous(), b.to(site.lora_B.dtype).cpu().contiguous()


def saved_adapter(model: nn.Module, adapter):
    """The adapter file as saved: PiSSA/OLoRA converted to a plain LoRA against the original base,
    EVA with its start recorded; a plain LoRA unchanged."""
    from ..adapter import require_state, sites

    state = require_state(model)
    init = state.config.init_lora_weights
    if not isinstance(init, str) or init == "gaussian":
        return adapter
    live = sites(model)
    if any(getattr(s, "eva_pending", False) for s in live.values()):
        raise ConfigError(EVA_NEEDS_DATA)
    meta = dict(adapter.meta)
    config = dict(meta["config"])
    config["init_lora_weights"] = True  # the saved factors are a plain LoRA: loading must not re-initialise
    config["eva_config"] = None
    options = copy.deepcopy(meta.get("target_options", {}))
    tensors = dict(adapter.tensors)
    record: dict[str, Any] = {"init_lora_weights": init}
    if is_residual(init):
        rslora = bool(state.config.use_rslora)
        for name, site in live.items():
            if getattr(site, "initial_A", None) is None:
                continue
            tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = converted_factors(site)
            options[name] = {**options.get(name, {}), "r": 2 * site.r, "lora_alpha": converted_alpha(site.alpha, rslora)}
        config["r"] = 2 * config["r"]
        config["lora_alpha"] = converted_alpha(config["lora_alpha"], rslora)
        config["rank_pattern"] = {k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()}
        config["alpha_pattern"] = {k: converted_alpha(v, rslora) for k, v in (config.get("alpha_pattern") or {}).items()}
        record["converted"] = ("trained against the residual base W - s B0 A0; saved as a plain LoRA of rank 2r against "
                               "the original base: B = [B, B0], A = [A; -A0], alpha doubled (x sqrt(2) under rsLoRA)")
    else:
        record["ranks"] = {name: o.get("r") for name, o in options.items() if name not in state.train_also}
        record["eva_config"] = (state.config.eva_config or EvaConfig()).model_dump(mode="json")
    meta["config"], meta["target_options"], meta["lora_init"] = config, options, record
    return type(adapter)(meta, tensors, getattr(adapter, "path", None))


# -- EVA ------------------------------------------------------------------------------------
class _Moments:
    """Running first and second moments of one layer's inputs (float64), for an exact PCA."""

    def __init__(self, dim: int, device):
        self.n = 0
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64)
        self.n += x.shape[0]
        self.total += x.sum(0)
        self.gram += x.t() @ x

    def pca(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(components (k, dim), singular values of the centred data, explained-variance ratios), descending."""
        mean = self.total / self.n
        scatter = self.gram - self.n * torch.outer(mean, mean)
        vals, vecs = torch.linalg.eigh(scatter)
        vals, vecs = vals.flip(0).clamp_min(0), vecs.flip(1).t()
        # peft's sign convention (sklearn's svd_flip, v-based): each component's largest entry is positive
        idx = vecs.abs().argmax(dim=1)
        vecs = vecs * torch.sign(vecs[torch.arange(vecs.shape[0]), idx])[:, None]
        total = vals.sum()
        return vecs, vals.sqrt(), vals / total if total > 0 else vals


def _token_mask(batch: dict, eva: EvaConfig) -> torch.Tensor | None:
    ids = batch.get("input_ids")
    mask = batch.get("attention_mask")
    if mask is None and ids is None:
        return None
    mask = (mask if mask is not None else torch.ones_like(ids)).bool()
    labels = batch.get("labels")
    # token labels only: a classification batch's labels (one per sequence) say nothing about tokens
    if eva.use_label_mask and isinstance(labels, torch.Tensor) and labels.shape == mask.shape:
        mask = mask & (labels != eva.label_mask_value)
    return mask


def _default_forward(model: nn.Module) -> Callable[[dict], Any]:
    return lambda batch: model(**batch)


@torch.no_grad()
def eva_init(model: nn.Module, batches: list[dict], forward: Callable[[dict], Any] | None = None) -> dict[str, int]:
    """Run EVA's data-driven start on an injected ``init_lora_weights: eva`` LoRA: ``batches`` are
    model inputs (dicts of tensors on the model's device), ``forward(batch)`` runs the model on one
    (default ``model(**batch)``). Returns the rank each target got (0: its LoRA was removed)."""
    from ..adapter import require_state, sites

    state = require_state(model)
    live = {n: s for n, s in sites(model).items() if getattr(s, "eva_pending", False)}
    if not live:
        raise AdapterError("the model's LoRA waits for no EVA start (its init_lora_weights is not 'eva', or the start ran already)")
    if not batches:
        raise ConfigError("EVA needs at least one batch of training inputs for its start; pass batches")
    eva = state.config.eva_config or EvaConfig()
    forward = forward or _default_forward(model)
    moments: dict[str, _Moments] = {}
    current: dict[str, Any] = {"mask": None}

    def grab(name, site):
        def hook(module, args, kwargs):
            x = first_input(args, kwargs)
            mask = current["mask"]
            if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
                x = x[mask]
            x = x.reshape(-1, x.shape[-1])
            if name not in moments:
                moments[name] = _Moments(x.shape[-1], x.device)
            moments[name].add(x)
        return hook

    handles = [site.owner.register_forward_pre_hook(grab(name, site), with_kwargs=True) for name, site in live.items()]
    training = model.training
    for site in live.values():
        site.set_enabled(False)  # the base model's inputs, as peft's disable_adapter()
    model.eval()
    try:
        for batch in batches:
            current["mask"] = _token_mask(batch, eva)
            forward(batch)
    finally:
        for h in handles:
            h.remove()
        for site in live.values():
            site.set_enabled(True)
        model.train(training)
    missing = [n for n in live if n not in moments]
    if missing:
        raise ConfigError(f"EVA saw no input of {missing[0]} on the given batches (is the layer used in the forward pass?)")
    if distributed():
        for m in moments.values():  # every process starts from the same components
            torch.distributed.all_reduce(m.total)
            torch.distributed.all_reduce(m.gram)
            n = torch.tensor([m.n], dtype=torch.float64, device=m.total.device)
            torch.distributed.all_reduce(n)
            m.n = int(n.item())
    ranks = eva_ranks(live, moments, state.options, eva)
    apply_eva(model, live, moments, ranks, eva)
    return ranks


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def eva_ranks(live: dict, moments: dict[str, _Moments], options: dict, eva: EvaConfig) -> dict[str, int]:
    """peft's redistribution: each layer offers its first round(rho * r) explained-variance ratios, the
    sum(r) largest over all layers win; layers with identical inputs give their first (in model
    order) at least the rank of the others."""
    pcas = {n: m.pca() for n, m in moments.items()}
    budget = sum(int(options[n]["r"]) for n in live)
    offered, owners = [], []
    for n in live:
        k = min(round(int(options[n]["r"]) * eva.rho), pcas[n][2].shape[0])
        offered.append(pcas[n][2][:k])
        owners += [n] * k
    ratios = torch.cat(offered)
    order = torch.argsort(ratios, descending=True, stable=True)[:budget]
    counts = {n: 0 for n in live}
    for i in order.tolist():
        counts[owners[i]] += 1
    names = list(live)
    for i, n in enumerate(names):
        for first in names[:i]:
            if moments[first].n == moments[n].n and torch.equal(moments[first].gram, moments[n].gram) and torch.equal(moments[first].total, moments[n].total):
                if counts[n] > counts[first]:
                    counts[n], counts[first] = counts[first], counts[n]
                break
    for n in live:
        live[n]._eva_pca = pcas[n]
    return counts


def apply_eva(model: nn.Module, live: dict, moments: dict, ranks: dict[str, int], eva: EvaConfig) -> None:
    from ..adapter import require_state

    state = require_state(model)
    for name, site in live.items():
        comps, sing, _ = site._eva_pca
        del site._eva_pca
        rank = ranks[name]
        if rank == 0:
            remove_site(model, name, site)
            continue
        u = comps[:rank].clone()
        if eva.whiten:
            u = u / sing[:rank].sqrt()[:, None]
        r0, alpha = int(state.options[name]["r"]), float(state.options[name]["lora_alpha"])
        if rank != r0 and eva.adjust_scaling_factors:
            alpha = alpha * rank / r0
        site.set_rank(rank, alpha, u)
        site.eva_pending = False
        state.options[name] = {**state.options[name], "r": rank, "lora_alpha": alpha}


def remove_site(model: nn.Module, name: str, site) -> None:
    """Take a target's LoRA out of the model (EVA gave it rank 0, as peft removes such a layer)."""
    from ..adapter import require_state
    from .base import HOLDER

    state = require_state(model)
    site.detach()
    holder = site.owner._modules[HOLDER]
    del holder[site.pname]
    if len(holder) == 0:
        del site.owner._modules[HOLDER]
    state.targets.remove(name)
    state.options.pop(name, None)


class EvaTraining(MethodTraining):
    """EVA's start in ``graft train``: the SVD of the adapted layers' inputs on the first micro-batches."""

    def __init__(self, eva: EvaConfig):
        self.batches_needed = eva.batches
        self.ranks: dict[str, int] = {}

    def start(self, model, forward, batches, total_steps) -> None:
        self.ranks = eva_init(model, batches, forward)

    def report(self, model) -> dict[str, Any]:
        kept = [r for r in self.ranks.values() if r > 0]
        return {"eva_rank_min": min(kept) if kept else 0, "eva_rank_max": max(kept) if kept else 0,
                "eva_rank_total": sum(kept), "eva_layers_removed": sum(1 for r in self.ranks.values() if r == 0)}
