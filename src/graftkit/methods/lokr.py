"""LoKr: a Kronecker product as the weight delta.

LyCORIS (Yeh et al., 2024, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
Evaluation", ICLR 2024), after KronA (Edalati et al., 2022, "KronA: Parameter Efficient Tuning with
Kronecker Adapter"), writes the delta of an (out, in) weight as a Kronecker product, as peft's ``LOKR``
does::

    delta_W = (alpha / r) * W1 ⊗ W2          W1: (a, c)   W2: (b, d)   out = a b,  in = c d

with ``(a, b) = factorization(out)`` and ``(c, d) = factorization(in)``: the two factors nearest
sqrt(dim), or ``decompose_factor`` and dim / decompose_factor when it divides dim (LyCORIS's rule).
``W2`` is itself low-rank, ``W2a W2b`` (b x r, r x d), unless r >= max(b, d) / 2, where the full
matrix is no larger; with ``decompose_both`` ``W1`` is too (``W1a W1b``), under the same rule. A
Conv2d kernel (out, in/groups, kh, kw) keeps its kernel in ``W2``: ``W2`` is (b, d, kh, kw) or
``W2a`` (b, r), ``W2b`` (r, d kh kw); with ``use_effective_conv2d`` (kernels above 1x1) FedPara's CP
form ``rebuild(T2, W2a, W2b)`` (see :mod:`graftkit.methods.loha`). In the canonical (out, in kh kw)
view the delta is ``(alpha / r) * kron(W1, W2 flattened to (b, d kh kw))``.

``W1`` (or ``W1a``) starts at zero, so training starts from the base model; ``init_weights:
lycoris`` zeroes ``W2`` (or ``W2b``) instead, as the LyCORIS repository does. ``rank_dropout`` and
``module_dropout`` act during training only (rows of the delta kept with probability 1 - p, rescaled
by the kept fraction when ``rank_dropout_scale``), as in peft. Tensors and names are peft's
(``lokr_w1`` ...), so the peft converter only renames keys. Layers: Linear, Conv2d, and GPT-2's
``Conv1D`` (graftkit only: peft's LoKr has no Conv1D).
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal, Mapping

import torch
from torch import nn

from ..layers import matrix_shape
from ..registry import METHODS
from .loha import (LycorisConfig, LycorisConverter, LycorisMethod, LycorisSite, check_saved_slots, cp_rebuild, effective_conv, kernel,
                   lycoris_from_peft, lycoris_peft_config, lycoris_site_to_peft, saved_slot_shapes, scale)


class LoKrConfig(LycorisConfig):
    init_weights: bool | Literal["lycoris"] = True
    decompose_both: bool = False
    # -1: the factors nearest sqrt(dim); n > 0: (n, dim / n) where n divides dim
    decompose_factor: int = -1
    rank_dropout_scale: bool = False


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's split of ``dim`` into two factors ``(m, n)``, ``m * n == dim``.

    ``factor`` > 0 dividing ``dim``: exactly ``(factor, dim // factor)``. Otherwise the divisor pair
    with the smallest sum (the one nearest sqrt(dim)), its smaller member at most ``factor`` (no bound
    for -1), returned smaller first."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    bound = dim if factor == -1 else factor
    best = 1
    m = 2
    # walk the divisors upward while the pair's sum does not grow and the bound allows: the sum
    # m + dim/m falls until m passes sqrt(dim)
    while best < dim // best:
        while dim % m:
            m += 1
        if m + dim // m > best + dim // best or m > bound:
            break
        best = m
        m += 1
    return min(best, dim // best), max(best, dim // best)


def lokr_layout(kind: str, shape, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Which factors a target has: ``(a, b), (c, d)``, the kernel, and whether W1 / W2 are full."""
    r = int(settings["r"])
    df = int(settings.get("decompose_factor", -1))
    out_f, _ = matrix_shape(kind, shape)
    in_dim = shape[1] if kind == "conv2d" else matrix_shape(kind, shape)[1]
    a, b = factorization(out_f, df)
    c, d = factorization(in_dim, df)
    return {"a": a, "b": b, "c": c, "d": d, "k": kernel(kind, shape),
            "full_w1": not (settings.get("decompose_both") and r < max(a, c) / 2),
            "full_w2": not (r < max(b, d) / 2),
            "cp": effective_conv(kind, shape, settings)}


def lokr_shapes(kind: str, shape, settings: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The slots of one LoKr target on a base weight of stored ``shape`` (peft's shapes)."""
    r = int(settings["r"])
    L = lokr_layout(kind, shape, settings)
    a, b, c, d, k = L["a"], L["b"], L["c"], L["d"], L["k"]
    out = {"lokr_w1": (a, c)} if L["full_w1"] else {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)}
    if L["full_w2"]:
        out["lokr_w2"] = (b, d, *k)
    elif L["cp"]:
        out.update({"lokr_t2": (r, r, *k), "lokr_w2_a": (r, b), "lokr_w2_b": (r, d)})
    else:
        kk = 1
        for n in k:
            kk *= n
        out.update({"lokr_w2_a": (b, r), "lokr_w2_b": (r, d * kk)})
    return out


def lokr_formula(kind: str, weight: torch.Tensor, slots: Mapping[str, torch.Tensor], settings: Mapping[str, Any]) -> torch.Tensor:
    """``(alpha / r) * kron(W1, W2)`` in the canonical (out, in) view, float32."""
    s = slots
    w1 = s["lokr_w1"].float() if "lokr_w1" in s else s["lokr_w1_a"].float() @ s["lokr_w1_b"].float()
    if "lokr_w2" in s:
        w2 = s["lokr_w2"].float()
    elif "lokr_t2" in s:
        w2 = cp_rebuild(s["lokr_t2"], s["lokr_w2_a"], s["lokr_w2_b"])
    else:
        w2 = s["lokr_w2_a"].float() @ s["lokr_w2_b"].float()
    return torch.kron(w1, w2.reshape(w2.shape[0], -1)) * scale(settings)


class LoKrSite(LycorisSite):
    formula = staticmethod(lokr_formula)
    shapes = staticmethod(lokr_shapes)

    def factored_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """``delta x`` without the dense delta, for matrices: ``kron(W1, W2) vec(X) = vec(W1 X W2^T)`` with the
        input viewed as (c, d) per token (row-major, as the Kronecker product's column index p d + q), so a
        token costs c d b + a c b multiplications instead of (a b)(c d)."""
        if self.kind not in ("linear", "conv1d"):
            return None
        s = self.slot_tensors()
        w1 = s["lokr_w1"].float() if "lokr_w1" in s else s["lokr_w1_a"].float() @ s["lokr_w1_b"].float()
        w2 = s["lokr_w2"].float() if "lokr_w2" in s else s["lokr_w2_a"].float() @ s["lokr_w2_b"].float()
        (a, c), (b, d) = w1.shape, w2.shape
        lead = x.shape[:-1]
        z = x.float().reshape(-1, c, d) @ w2.t()  # (tokens, c, b)
        return (torch.matmul(w1, z).reshape(*lead, a * b)) * scale(self.settings)

    def init_slots(self, init) -> None:
        for slot in self.slots:
            self.kaiming(getattr(self, slot))
        if init == "lycoris":  # the LyCORIS repository: W2 (or W2b) at zero
            nn.init.zeros_(self.lokr_w2 if "lokr_w2" in self.slots else self.lokr_w2_b)
        elif init:  # peft's default: W1 (or W1a) at zero
            nn.init.zeros_(self.lokr_w1 if "lokr_w1" in self.slots else self.lokr_w1_a)

    def row_keep(self, rows: int, device) -> torch.Tensor:
        keep = (torch.rand(rows) > self.rank_dropout).float()
        if self.settings.get("rank_dropout_scale"):
            keep = keep / keep.mean().clamp_min(1e-12)
        return keep.to(device)


LOKR_KEYS = {"decompose_both", "decompose_factor", "rank_dropout_scale"}


def _peft_read(cfg, raw, path):
    from ..errors import FileFormatError
    from ..io.peft import _number

    init = cfg.get("init_weights", True)
    df = _number(cfg, "decompose_factor", -1, path, integer=True)
    if not isinstance(cfg.get("decompose_both", False), bool) or not isinstance(cfg.get("rank_dropout_scale", False), bool):
        raise FileFormatError(f"{path / 'adapter_config.json'}: decompose_both and rank_dropout_scale must be true or false - fix the file")
    extra = {"decompose_both": bool(cfg.get("decompose_both")), "decompose_factor": df,
             "rank_dropout_scale": bool(cfg.get("rank_dropout_scale")), "init_weights": "lycoris" if init == "lycoris" else True}
    return lycoris_from_peft(LoKr, cfg, raw, path, LOKR_KEYS, extra)


def _peft_write_site(site, key, tensors, acc):
    acc["_type"] = "LoKr"
    lycoris_site_to_peft(site, key, tensors, acc)


def _peft_write_config(state, acc):
    acc.pop("_type", None)
    c = state.config
    return {**lycoris_peft_config(state, acc), "decompose_both": c.decompose_both, "decompose_factor": c.decompose_factor,
            "rank_dropout_scale": c.rank_dropout_scale}


@METHODS.register("lokr")
class LoKr(LycorisMethod):
    name = "lokr"
    config_cls = LoKrConfig
    site_cls = LoKrSite
    peft = LycorisConverter("LOKR", _peft_read, _peft_write_site, _peft_write_config)
    layouts: ClassVar[tuple[tuple[str, ...], ...]] = (
        ("lokr_w1", "lokr_w2"), ("lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2"), ("lokr_w1", "lokr_w2_a", "lokr_w2_b"),
        ("lokr_w1_a", "lokr_w1_b", "lokr_w2"), ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
        ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"),
    )
    rank_axes: ClassVar[dict[str, int]] = {"lokr_w1_b": 0, "lokr_w2_b": 0}

    @staticmethod
    def rank_of(slots: Mapping[str, torch.Tensor]) -> int | None:
        """The rank the factored slots carry; None when both factors are full matrices."""
        for slot in ("lokr_w2_b", "lokr_w1_b"):
            if slot in slots:
                return int(slots[slot].shape[0])
        return None

    check_saved = staticmethod(lambda adapter, name, options, where: check_saved_slots(LoKr, adapter, name, options, where))
    saved_shapes = staticmethod(lambda adapter, name, kind, base_shape, feedforward=False:
                                saved_slot_shapes(LoKr, adapter, name, kind, base_shape))
