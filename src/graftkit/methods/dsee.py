"""DSEE: a low-rank plus sparse weight delta, and an optionally pruned final weight.

DSEE (Chen et al., 2023, "DSEE: Dually Sparsity-embedded Efficient Tuning of Pre-trained Language
Models", ACL 2023, arXiv:2111.00160) adds to a frozen weight ``W`` (out x in) a sparsity-aware
low-rank update::

    delta_W = s * (B A + S)        A: (r, in)   B: (out, r)   s = lora_alpha / r

where ``S`` is non-zero only on a support fixed before training and only its non-zero values train
(the authors' code, github.com/VITA-Group/DSEE, scales S by the same ``alpha / r``). The support is
chosen from the pretrained weight:

* ``sparse_select: magnitude`` - the largest ``|W|`` (the authors' ``omp`` option);
* ``sparse_select: decomposition`` - the largest entries of the sparse residual of a low-rank plus
  sparse split of W: ``|W - W_k|`` with ``W_k`` its best rank-``decompose_rank`` approximation (the
  authors iterate a GoDec/GreBsmo-style split; a truncated SVD gives the low-rank part directly);
* ``sparse_select: random`` - a seeded random support (the authors' ``rp`` baseline).

``structure`` sets the pattern of S: ``unstructured`` entries, or whole output ``rows``, or whole
``heads`` (blocks of ``head_dim`` consecutive output rows of a q/k/v projection), scored by the
same criterion summed over the row or block. S is stored compactly: ``dsee_index`` (flat entry
indices, or row indices) and ``dsee_values`` (one value per entry, or one row of ``in`` values per
selected row), never as a dense matrix.

Sparse final weight (the paper's second sparsity): with ``prune: p`` the adapted weight is
``M * (W + delta_W)`` where ``M`` zeroes the fraction ``p`` of entries of smallest magnitude, taken
on the current ``W + delta_W``. The live forward, merging, ``materialize_delta``, ``graft merge`` and
export all use it, so training sees the pruned weight (the paper prunes and then fine-tunes) and a
merged export has exactly those zeros; :func:`dsee_report` (also the run's ``method_report``)
measures the sparsity reached.
"""
from __future__ import annotations

import math
import zlib
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..errors import AdapterError, ConfigError
from ..layers import layer_kind, matrix_shape
from ..registry import METHODS
from ..targets import ParamInfo
from .base import MethodConfig, MethodTraining
from .weight_delta import WeightDeltaMethod, WeightDeltaSite, canonical

#: S's size when neither ``num_sparse`` nor ``sparse_fraction`` is given: the authors' scripts use 64
#: entries per weight (``--num_sparse 64``); a structured S gets one row or one head
DEFAULT_ENTRIES = 64


class DSEEConfig(MethodConfig):
    r: int = Field(8, ge=1)
    lora_alpha: float = Field(8.0, gt=0)
    #: how many entries (or rows, or heads) of each target S covers
    num_sparse: int | None = Field(None, ge=1)
    #: the same as a fraction of the entries (or rows, or heads) of each target; wins over num_sparse
    sparse_fraction: float | None = Field(None, gt=0, le=1)
    sparse_select: Literal["magnitude", "decomposition", "random"] = "magnitude"
    structure: Literal["unstructured", "rows", "heads"] = "unstructured"
    #: rows per head for ``structure: heads``
    head_dim: int | None = Field(None, ge=1)
    #: rank of the low-rank part removed before ``decomposition`` scores the residual
    decompose_rank: int = Field(8, ge=1)
    #: fraction of the final weight's entries zeroed by magnitude (None: no pruning)
    prune: float | None = Field(None, gt=0, lt=1)
    seed: int = 0
    #: True: B and S start at zero (identity at init); False: random (for tests)
    init_weights: bool = True


def units(structure: str, out_f: int, in_f: int, head_dim: int | None, name: str) -> int:
    """How many units S picks from: entries, rows or heads of a target."""
    if structure == "unstructured":
        return out_f * in_f
    if structure == "rows":
        return out_f
    if head_dim is None:
        raise ConfigError("dsee: structure 'heads' needs head_dim (the rows of one attention head, e.g. hidden_size / num_heads)")
    if out_f % head_dim:
        raise ConfigError(f"dsee: {name} has {out_f} output rows, not a multiple of head_dim={head_dim}; "
                          "target the q/k/v projections or set head_dim to the model's head size")
    return out_f // head_dim


def sparse_count(config: DSEEConfig, out_f: int, in_f: int, name: str) -> int:
    total = units(config.structure, out_f, in_f, config.head_dim, name)
    unit = {"unstructured": "entries", "rows": "rows", "heads": "heads"}[config.structure]
    if config.sparse_fraction is not None:
        return max(1, round(config.sparse_fraction * total))
    n = config.num_sparse if config.num_sparse is not None else (DEFAULT_ENTRIES if config.structure == "unstructured" else 1)
    if n > total:
        raise ConfigError(f"dsee: num_sparse={n} is more than the {total} {unit} of {name} ({out_f} x {in_f}); "
                          f"use num_sparse <= {total} or sparse_fraction in (0, 1]")
    return n


def select_support(w: torch.Tensor, n: int, settings: Mapping[str, Any], name: str) -> torch.Tensor:
    """The ``n`` units of S on the canonical weight ``w`` (out, in): flat entry indices (unstructured)
    or output row indices (rows, heads), sorted, int64."""
    w = w.detach().float()
    how, structure = settings["sparse_select"], settings["structure"]
    if how == "magnitude":
        score = w.abs()
    elif how == "decomposition":
        k = min(int(settings["decompose_rank"]), *w.shape)
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        score = (w - (u[:, :k] * sv[:k]) @ vh[:k]).abs()
    else:  # a support fixed by the seed and the target's name (the saved index is what reloads)
        g = torch.Generator().manual_seed(int(settings["seed"]) * 1_000_003 + zlib.crc32(name.encode()))
        score = torch.rand(w.shape, generator=g)
    if structure == "unstructured":
        picked = torch.topk(score.flatten(), n).indices
    elif structure == "rows":
        picked = torch.topk(score.pow(2).sum(1), n).indices
    else:
        hd = int(settings["head_dim"])
        heads = torch.topk(score.pow(2).sum(1).view(-1, hd).sum(1), n).indices
        picked = (heads[:, None] * hd + torch.arange(hd)).flatten()
    return picked.sort().values.to(torch.int64)


def sparse_matrix(index: torch.Tensor, values: torch.Tensor, out_f: int, in_f: int) -> torch.Tensor:
    """S as a dense (out, in) float32 matrix, differentiable in ``values``."""
    index = index.to(values.device)
    if values.dim() == 1:
        return torch.zeros(out_f * in_f, device=values.device).index_add(0, index, values.float()).view(out_f, in_f)
    return torch.zeros(out_f, in_f, device=values.device).index_add(0, index, values.float())


def prune_mask(full: torch.Tensor, fraction: float) -> torch.Tensor:
    """1 on the entries kept: all but the ``fraction`` of smallest magnitude (exactly that many zeroed)."""
    keep = full.numel() - round(fraction * full.numel())
    mask = torch.zeros(full.numel(), device=full.device)
    mask[torch.topk(full.detach().abs().flatten(), keep).indices] = 1.0
    return mask.view(full.shape)


def dsee_formula(kind: str, weight: torch.Tensor, slots: Mapping[str, torch.Tensor], settings: Mapping[str, Any]) -> torch.Tensor:
    """``s (B A + S)``, or with ``prune`` ``M * (W + s (B A + S)) - W``: (out, in) float32."""
    a, b = slots["dsee_A"].float(), slots["dsee_B"].float()
    out_f, in_f = b.shape[0], a.shape[1]
    scale = float(settings["lora_alpha"]) / a.shape[0]
    delta = (b @ a + sparse_matrix(slots["dsee_index"], slots["dsee_values"], out_f, in_f)) * scale
    if not settings.get("prune"):
        return delta
    w = canonical(kind, weight).to(delta.device)
    full = w + delta
    return full * prune_mask(full, float(settings["prune"])) - w


class DSEESite(WeightDeltaSite):
    slots = ("dsee_A", "dsee_B", "dsee_index", "dsee_values")
    #: saved, never trained: S's support, fixed at injection
    frozen_slots = ("dsee_index",)
    formula = staticmethod(dsee_formula)

    def __init__(self, info: ParamInfo, kind: str, settings: Mapping[str, Any]):
        super().__init__(info, kind, settings)
        # a pruned weight is read from the base: merging keeps what it added, to unmerge exactly
        self.reads_base = bool(self.settings.get("prune"))
        r, n, dev = int(self.settings["r"]), int(self.settings["num_sparse"]), info.param.device
        out_f, in_f = self.out_features, self.in_features
        self.scaling = float(self.settings["lora_alpha"]) / r
        self.dsee_A = nn.Parameter(torch.empty(r, in_f, dtype=self.dtype, device=dev))
        self.dsee_B = nn.Parameter(torch.zeros(out_f, r, dtype=self.dtype, device=dev))
        index = select_support(canonical(kind, info.param), n, self.settings, info.name)
        self.register_buffer("dsee_index", index.to(dev))
        shape = (index.numel(),) if self.settings["structure"] == "unstructured" else (index.numel(), in_f)
        self.dsee_values = nn.Parameter(torch.zeros(shape, dtype=self.dtype, device=dev))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.dsee_A, a=math.sqrt(5))  # as LoRA's A
            if not self.settings.get("init_weights", True):
                nn.init.kaiming_uniform_(self.dsee_B, a=math.sqrt(5))
                self.dsee_values.normal_(0.0, 0.1)

    def factored_output(self, x: torch.Tensor) -> torch.Tensor | None:
        # without pruning: s * (B (A x) + S x), S x read straight from its entries (no dense S)
        if self.settings.get("prune"):
            return None
        x = x.to(self.dsee_A.dtype)
        low = F.linear(F.linear(x, self.dsee_A), self.dsee_B)
        values, index = self.dsee_values, self.dsee_index
        if values.dim() == 1:
            rows, cols = index // self.in_features, index % self.in_features
            extra = x[..., cols] * values
        else:
            rows, extra = index, F.linear(x, values)
        sparse = torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device).index_add(-1, rows, extra)
        return (low + sparse) * self.scaling


def dsee_report(model: nn.Module) -> dict[str, Any]:
    """What a DSEE adapter holds and the sparsity its final weights reach: trained S entries, low-rank
    parameters, and the fraction of zeros in ``W + delta`` over all targets (measured, not the config)."""
    from ..adapter import sites

    entries = low_rank = zeros = total = 0
    prune = None
    for site in sites(model).values():
        if not isinstance(site, DSEESite):
            continue
        entries += site.dsee_values.numel()
        low_rank += site.dsee_A.numel() + site.dsee_B.numel()
        prune = site.settings.get("prune")
        with torch.no_grad():
            w = canonical(site.kind, site.base)
            final = w if site.merged else w + site.delta_matrix(site.base)
        zeros += int((final == 0).sum())
        total += final.numel()
    return {"sparse_entries": entries, "low_rank_parameters": low_rank, "prune": prune,
            "final_weight_sparsity": zeros / total if total else 0.0, "final_weight_zeros": zeros, "target_entries": total}


class DSEETraining(MethodTraining):
    def report(self, model: nn.Module) -> dict[str, Any]:
        return dsee_report(model)


def _check_saved(adapter, name: str, options: dict, where: str) -> None:
    from ..validate import saved_tensor

    a, b = saved_tensor(adapter, f"{name}.dsee_A", where), saved_tensor(adapter, f"{name}.dsee_B", where)
    index, values = saved_tensor(adapter, f"{name}.dsee_index", where), saved_tensor(adapter, f"{name}.dsee_values", where)
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise AdapterError(f"{where}: {name}.dsee_A has shape {tuple(a.shape)} and {name}.dsee_B {tuple(b.shape)}; they must be "
                           "(r, in) and (out, r) - the file is corrupt or mixes two adapters")
    if index.dim() != 1 or index.is_floating_point() or values.dim() not in (1, 2) or values.shape[0] != index.numel():
        raise AdapterError(f"{where}: {name}.dsee_index {tuple(index.shape)} ({index.dtype}) and {name}.dsee_values "
                           f"{tuple(values.shape)} do not form a sparse delta (integer indices, one value or row each) - the file is corrupt")
    limit = b.shape[0] * a.shape[1] if values.dim() == 1 else b.shape[0]
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= limit or index.unique().numel() != index.numel()):
        raise AdapterError(f"{where}: {name}.dsee_index holds indices outside [0, {limit}) or repeated ones; the file is corrupt")
    n = options.get("num_sparse")
    if n is not None and values.dim() == 1 and n != index.numel():
        raise AdapterError(f"{where}: adapter.json says num_sparse={n} for {name} but {name}.dsee_index has {index.numel()} entries; "
                           "the file is corrupt or mixes two adapters")


def _saved_shapes(adapter, name: str, kind: str, base_shape: tuple, feedforward: bool = False) -> dict[str, tuple]:
    out_f, in_f = matrix_shape(kind, torch.Size(base_shape))
    r = adapter.tensors[f"{name}.dsee_A"].shape[0]
    values = adapter.tensors[f"{name}.dsee_values"]
    want = {f"{name}.dsee_A": (r, in_f), f"{name}.dsee_B": (out_f, r)}
    if values.dim() == 2:
        want[f"{name}.dsee_values"] = (values.shape[0], in_f)
    return want


@METHODS.register("dsee")
class DSEE(WeightDeltaMethod):
    name = "dsee"
    config_cls = DSEEConfig
    site_cls = DSEESite
    kinds = ("linear", "conv1d")
    check_saved = staticmethod(_check_saved)
    saved_shapes = staticmethod(_saved_shapes)

    @classmethod
    def site_options(cls, config: DSEEConfig, info: ParamInfo) -> dict[str, Any]:
        # checked for every target before any site is built: a bad size leaves the model untouched
        out_f, in_f = matrix_shape(layer_kind(info.module, info.pname), info.param.shape)
        return {"num_sparse": sparse_count(config, out_f, in_f, info.name)}

    @classmethod
    def identity_for(cls, config: Any) -> bool:
        """A fresh adapter is the identity unless it prunes: the pruned base weight differs from the base."""
        data = config.model_dump() if isinstance(config, MethodConfig) else dict(config)
        return bool(data.get("init_weights", True)) and not data.get("prune")

    @classmethod
    def training(cls, config: Any) -> MethodTraining:
        return DSEETraining()
