"""LoRA, rsLoRA and DoRA: low-rank weight updates.

LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes a
weight ``W`` (out x in) and learns ``delta_W = s * B A`` with ``A`` (r x in), ``B`` (out x r),
``s = lora_alpha / r``; ``B`` starts at zero so training starts from the base model. The
forward pass stays factored, ``y = W x + s * B (A (dropout(x)))``, and the dense product is
formed only to merge or to materialize the delta.

rsLoRA (Kalajdzievski, 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with
LoRA") uses ``s = lora_alpha / sqrt(r)`` so that the update's scale does not collapse as r
grows.

DoRA (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") splits the adapted
weight into magnitude and direction, ``W' = m * (W + s B A) / ||W + s B A||_c``, where the
norm is taken per output row and ``m`` (one value per output) is trained and initialised to
that norm. As in the paper (sec. 4.3), the norm is treated as a constant in the backward
pass. The unmerged forward is ``base(x) + (m/n - 1) * W x_d + (m/n) * s * B A x_d``.

All layer kinds use the canonical (out, in) view of :mod:`graftkit.layers`: ``A`` is stored
as (r, in) and ``B`` as (out, r) even for Conv1D, Embedding (in = vocabulary) and Conv2d
(in = in_channels * kh * kw). Adapter tensors are kept in float32 when the base is in half
precision.
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import AliasChoices, Field, field_validator, model_validator
from torch import nn

from ..errors import ConfigError, UnsupportedError
from ..layers import from_matrix, is_quantized, logical_shape, matrix_shape, to_matrix
from ..registry import METHODS
from ..targets import ParamInfo
from . import lora_init
from .base import MergeDelta, MethodConfig, PeftConverter, SavedTarget, Site, TuningMethod, first_input, install_property, layer_kind, remove_property


class LoRAConfig(MethodConfig):
    r: int = Field(8, ge=1)
    lora_alpha: float = Field(8.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    use_rslora: bool = False
    use_dora: bool = False
    # peft's meaning: True = A random, B zero (identity at init); "gaussian" = A ~ N(0, 1/r);
    # False = A and B both random (not an identity; for tests and debugging). "pissa",
    # "pissa_niter_<N>", "olora" (the base becomes a residual) and "eva" (data-driven):
    # methods/lora_init.py.
    init_lora_weights: bool | str = Field(True, validation_alias=AliasChoices("init_lora_weights", "init"))
    eva_config: lora_init.EvaConfig | None = None
    # Per-module rank / alpha, keyed by a regex matched against the end of the module name (peft).
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)

    @field_validator("init_lora_weights", mode="before")
    @classmethod
    def _init_name(cls, value):
        return lora_init.check_init(value)

    @model_validator(mode="after")
    def _eva_options(self):
        if self.eva_config is not None and self.init_lora_weights != "eva":
            raise ValueError(f"eva_config is set but init_lora_weights is {self.init_lora_weights!r}; set init_lora_weights: eva or drop eva_config")
        if self.eva_config is not None and self.eva_config.tau != 0.99:
            raise ValueError("eva_config.tau is not supported: graftkit computes the exact SVD of the inputs of eva_config.batches "
                             "batches (no incremental convergence test); drop tau and set batches")
        return self


def pattern_value(patterns: dict[str, Any], module_name: str, default):
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", module_name):
            return value
    return default


def lora_scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def lora_delta(kind: str, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
               magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """The dense delta of a LoRA (or DoRA, with ``magnitude``) in the stored layout of ``weight``.

    LoRA: ``s * B A`` in the canonical (out, in) view. DoRA: ``m * (W + s B A) / ||W + s B A||_c - W``
    (row norms of the canonical view). float32. Shared by the live site and the merge engine.
    """
    lora = (lora_B.float() @ lora_A.float()) * scaling
    if magnitude is None:
        return from_matrix(kind, lora, weight.shape)
    w = to_matrix(kind, weight).float()
    adapted = w + lora
    factor = magnitude.float() / adapted.detach().norm(dim=1)  # a constant for backward (DoRA sec. 4.3)
    return from_matrix(kind, factor[:, None] * adapted - w, weight.shape)


class LoRASite(Site):
    slots = ("lora_A", "lora_B")

    def __init__(self, info: ParamInfo, kind: str, r: int, alpha: float, dropout: float,
                 rslora: bool, dora: bool, init: bool | str):
        super().__init__(info, kind)
        weight = info.param
        if kind == "conv2d" and info.module.groups != 1:
            raise UnsupportedError(f"{info.name}: LoRA on grouped convolutions (groups={info.module.groups}) is not supported")
        if kind == "param" and weight.dim() != 2:
            raise UnsupportedError(f"{info.name}: LoRA on a bare parameter needs a 2-D tensor, this one has shape {tuple(weight.shape)}")
        quantized = is_quantized(weight)
        if quantized and (dora or kind != "linear"):
            raise UnsupportedError(f"{info.name} is a 4-bit quantized weight: only plain LoRA (no DoRA) adapts it; "
                                   "set use_dora: false, or load the base without quantize")
        # a 4-bit weight (QLoRA) is packed bytes: the factors take its logical shape and stay float32
        out_f, in_f = matrix_shape(kind, logical_shape(weight))
        dtype = torch.float32 if quantized or weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        self.r, self.alpha, self.dora, self.quantized = r, alpha, dora, quantized
        self.scaling = lora_scaling(alpha, r, rslora)
        self.scaling_is_rs = rslora
        self.lora_A = nn.Parameter(torch.empty(r, in_f, dtype=dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.empty(out_f, r, dtype=dtype, device=weight.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._init_weights(init)
        # PiSSA / OLoRA: the starting factors, kept to run the original model while disabled, to restore
        # the base on unload and to save against the original base (lora_init.saved_adapter)
        self.register_buffer("initial_A", None, persistent=False)
        self.register_buffer("initial_B", None, persistent=False)
        self.residual_applied = False
        self.eva_pending = init == "eva"  # EVA's start (lora_init.eva_init) has not run yet
        if isinstance(init, str) and init != "gaussian":
            lora_init.refuse_unsupported(info.name, init, kind, dora, quantized)
        if lora_init.is_residual(init) and weight.device.type != "meta":  # on meta (parameter counts) there is nothing to decompose
            a, b = lora_init.residual_factors(init, to_matrix(kind, weight.detach()), r, self.scaling)
            with torch.no_grad():
                self.lora_A.copy_(a)
                self.lora_B.copy_(b)
            self.initial_A, self.initial_B = a.to(dtype).clone(), b.to(dtype).clone()
        if dora:
            self.slots = ("lora_A", "lora_B", "lora_magnitude_vector")
            with torch.no_grad():
                norm = self._adapted_matrix(weight).norm(dim=1)
            self.lora_magnitude_vector = nn.Parameter(norm.to(dtype))
            # the factor m / n in force while merged, to unmerge exactly what merge did
            self.register_buffer("merge_factor", torch.ones(out_f, dtype=torch.float32), persistent=False)

    @torch.no_grad()
    def _init_weights(self, init) -> None:
        if self.kind == "embedding":
            # peft's embedding convention: A zero, B normal
            nn.init.zeros_(self.lora_A) if init is not False else nn.init.normal_(self.lora_A)
            nn.init.normal_(self.lora_B)
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    def initial_matrix(self) -> torch.Tensor:
        """s * B0 A0 (PiSSA/OLoRA: the part taken out of the base) in the stored layout, float32."""
        return from_matrix(self.kind, (self.initial_B.float() @ self.initial_A.float()) * self.scaling, self.base.shape)

    @torch.no_grad()
    def set_rank(self, r: int, alpha: float, lora_a: torch.Tensor) -> None:
        """New factors of rank ``r`` (EVA's redistribution): A from ``lora_a``, B zero."""
        dtype, device = self.lora_A.dtype, self.lora_A.device
        self.r, self.alpha = r, alpha
        self.scaling = lora_scaling(alpha, r, self.scaling_is_rs)
        self.lora_A = nn.Parameter(lora_a.to(device=device, dtype=dtype).contiguous())
        self.lora_B = nn.Parameter(torch.zeros(self.lora_B.shape[0], r, dtype=dtype, device=device))

    # -- math -----------------------------------------------------------------------------
    def lora_matrix(self) -> torch.Tensor:
        """s * B A in the canonical (out, in) view, float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def _adapted_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return to_matrix(self.kind, weight).float() + self.lora_matrix()

    def _dora_factor(self, weight: torch.Tensor) -> torch.Tensor:
        # the norm is a constant for the backward pass (DoRA sec. 4.3)
        norm = self._adapted_matrix(weight.detach()).norm(dim=1).detach()
        return self.lora_magnitude_vector.float() / norm

    def dense_delta(self, weight: torch.Tensor) -> torch.Tensor:
        """Delta in the stored layout for an *unmerged* base weight."""
        magnitude = self.lora_magnitude_vector if self.dora else None
        return lora_delta(self.kind, weight, self.lora_A, self.lora_B, self.scaling, magnitude)

    # -- forward --------------------------------------------------------------------------
    def attach(self) -> None:
        if self.initial_A is not None and not self.residual_applied:
            # applied here, not in __init__: a refused injection builds every site before touching the model
            with torch.no_grad():
                self.base.sub_(self.initial_matrix().to(self.base.dtype))
            self.residual_applied = True
        if self.kind == "param":
            install_property(self.owner, self.pname)
        else:
            self.owner.register_forward_hook(self._hook, with_kwargs=True)

    def detach(self) -> None:
        super().detach()
        if self.kind == "param":
            remove_property(self.owner, self.pname)

    def effective(self, param: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.merged:
            return param
        return param + self.dense_delta(param).to(param.dtype)

    def _factored(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A, self.lora_B
        if self.kind == "embedding":
            m = self.owner
            h = F.embedding(x, a.t(), m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)
            return h @ b.t()
        if self.kind == "conv2d":
            m = self.owner
            k = a.view(self.r, m.in_channels, *m.kernel_size)
            h = F.conv2d(x, k, None, m.stride, m.padding, m.dilation)
            return F.conv2d(h, b.view(b.shape[0], self.r, 1, 1))
        return F.linear(F.linear(x, a), b)

    def _base_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        m, w = self.owner, self.base
        if self.kind == "conv2d":
            return F.conv2d(x, w.to(x.dtype), None, m.stride, m.padding, m.dilation, m.groups)
        return F.linear(x, to_matrix(self.kind, w).to(x.dtype))

    def _hook(self, module, args, kwargs, output):
        if self.merged:
            return None
        if not self.enabled:
            if not self.residual_applied:
                return None
            # disabled: the original model, residual base plus the part taken out of it
            x = first_input(args, kwargs).to(self.initial_A.dtype)
            return output + (F.linear(F.linear(x, self.initial_A), self.initial_B) * self.scaling).to(output.dtype)
        if self.eva_pending:
            raise ConfigError(lora_init.EVA_NEEDS_DATA)
        x = first_input(args, kwargs)
        if self.kind != "embedding":
            x = self.dropout(x.to(self.lora_A.dtype))
        # (under autocast the factors' matmul runs in the autocast dtype: a float32 output there, from a
        # 4-bit base layer that casts back to its input's dtype, takes the unfused path)
        if (not self.dora and self.kind in ("linear", "conv1d") and output.dtype == self.lora_B.dtype
                and not torch.is_autocast_enabled(output.device.type)):
            # one fused GEMM adds s * (x A^T) B^T to the base output: no separate (tokens x out)
            # temporaries for the product, the scaling and the sum
            h = F.linear(x, self.lora_A).reshape(-1, self.r)
            if output.is_contiguous() and not self.quantized:  # a 4-bit layer's output can be a view autograd guards
                # in place: the base layer's backward never needs its own output, so autograd
                # allows it, and it saves a (tokens x out) allocation per adapted layer
                output.view(-1, output.shape[-1]).addmm_(h, self.lora_B.t(), alpha=self.scaling)
                return output
            fused = torch.addmm(output.reshape(-1, output.shape[-1]), h, self.lora_B.t(), alpha=self.scaling)
            return fused.view(output.shape)
        lora = self._factored(x) * self.scaling
        if not self.dora:
            return output + lora.to(output.dtype)
        factor = self._dora_factor(self.base)
        shape = (1, -1, 1, 1) if self.kind == "conv2d" else (-1,)
        factor = factor.view(shape)
        bias = getattr(module, "bias", None) if self.kind != "embedding" else None
        if self.kind == "embedding" or isinstance(self.dropout, nn.Identity) or not self.training:
            base = output if bias is None else output - bias.view(shape)
        else:  # the base term must see the same dropped-out input as the LoRA term
            base = self._base_no_bias(x)
        extra = (factor - 1) * base + factor * lora
        return output + extra.to(output.dtype)

    # -- merge ----------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        w = self.base
        if is_quantized(w):
            from ..io.quantize import refuse_live_merge

            raise refuse_live_merge("merging a LoRA")
        if self.dora:
            self.merge_factor.copy_(self._dora_factor(w))
        w.add_(self.dense_delta(w).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base
        if self.dora:
            merged = to_matrix(self.kind, w).float()
            orig = merged / self.merge_factor[:, None] - self.lora_matrix()
            w.copy_(from_matrix(self.kind, orig, w.shape).to(w.dtype))
        else:
            w.sub_(self.dense_delta(w).to(w.dtype))
        self.merged = False

    @torch.no_grad()
    def restore_base(self) -> None:
        super().restore_base()
        if self.residual_applied:
            self.base.add_(self.initial_matrix().to(self.base.dtype))
            self.residual_applied = False

    def delta(self) -> dict[str, torch.Tensor]:
        w = self.base
        if self.residual_applied:  # against the original base: s (B A - B0 A0)
            return {self.pname: (self.dense_delta(w) - self.initial_matrix()).detach()}
        if self.merged and self.dora:
            orig = from_matrix(self.kind, to_matrix(self.kind, w).float() / self.merge_factor[:, None] - self.lora_matrix(), w.shape)
            return {self.pname: w.float() - orig}
        return {self.pname: self.dense_delta(w).detach()}


def _infer_kind(t: SavedTarget, a: torch.Tensor, b: torch.Tensor) -> str:
    """How the factors lie on a base weight when adapter.json has no ``target_kinds``."""
    from ..errors import AdapterError, UnsupportedError

    shape, name = t.base_shape, t.name
    out_f, in_f = b.shape[0], a.shape[1]
    if len(shape) == 2 and shape[0] != shape[1]:
        if shape == (out_f, in_f):
            return "linear"
        if shape == (in_f, out_f):
            return "conv1d"
        raise AdapterError(f"{t.where}: {name}.lora_A has shape {tuple(a.shape)} and {name}.lora_B {tuple(b.shape)}, which fit "
                           f"neither ({out_f}, {in_f}) nor ({in_f}, {out_f}), but the base weight {name} is {shape}; "
                           "the adapter was made for another base model (or is corrupt)")
    if len(shape) == 4:
        return "conv2d"
    raise UnsupportedError(f"{t.where}: cannot tell how the LoRA of {name} {shape} lies on the weight (no target_kinds in its "
                           "adapter.json); re-save the adapter with this graftkit, or import it from peft again")


def _merge_deltas(t: SavedTarget) -> dict[str, MergeDelta]:
    a, b, mag = t.slots["lora_A"], t.slots["lora_B"], t.slots.get("lora_magnitude_vector")
    kind = t.kind or _infer_kind(t, a, b)
    t.check_fits(kind)
    r = int(t.options.get("r", a.shape[0]))
    scaling = lora_scaling(float(t.options.get("lora_alpha", t.config.get("lora_alpha", r))), r, bool(t.config.get("use_rslora")))
    return {t.name: MergeDelta(kind, lambda w: lora_delta(kind, w, a, b, scaling, mag), (a, b, scaling, mag))}


def _peft_read(cfg, raw, path):
    from ..io.peft import lora_from_peft

    return lora_from_peft(cfg, raw, path)


def _peft_write_site(site, key, tensors, acc):
    from ..io.peft import PREFIX, lora_site_to_peft

    if getattr(site, "eva_pending", False):
        raise ConfigError(lora_init.EVA_NEEDS_DATA)
    if site.initial_A is None:
        lora_site_to_peft(site, key, tensors, acc)
        return
    # PiSSA / OLoRA: a plain LoRA of rank 2r against the original base, as peft's
    # save_pretrained(path_initial_model_for_weight_conversion=...) writes it
    module = key[len(PREFIX):]
    a, b = lora_init.converted_factors(site)  # (2r, in), (out, 2r): peft's layout for Linear and Conv1D alike
    tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
    acc.setdefault("ranks", {})[module] = 2 * site.r
    acc.setdefault("alphas", {})[module] = lora_init.converted_alpha(site.alpha, site.scaling_is_rs)


def _peft_write_config(state, acc):
    from ..io.peft import lora_peft_config

    return lora_peft_config(state, acc)


def _check_saved(adapter, name: str, options: dict, where: str) -> None:
    from ..errors import AdapterError
    from ..validate import saved_tensor

    a = saved_tensor(adapter, f"{name}.lora_A", where)
    b = saved_tensor(adapter, f"{name}.lora_B", where)
    for key, t in ((f"{name}.lora_A", a), (f"{name}.lora_B", b)):
        if t.dim() != 2:
            raise AdapterError(f"{where}: adapter tensor {key} has shape {tuple(t.shape)}; LoRA factors are 2-D - the file is corrupt")
    if a.shape[0] != b.shape[1]:
        raise AdapterError(f"{where}: {name}.lora_A has shape {tuple(a.shape)} but {name}.lora_B has {tuple(b.shape)}; "
                           f"their ranks ({a.shape[0]} vs {b.shape[1]}) must agree - the file is corrupt or mixes two adapters")
    r = options.get("r")
    if r is not None and r != a.shape[0]:
        raise AdapterError(f"{where}: adapter.json says r={r!r} for {name} but {name}.lora_A has shape {tuple(a.shape)} "
                           f"(rank {a.shape[0]}); the file is corrupt or mixes two adapters")
    mag = adapter.tensors.get(f"{name}.lora_magnitude_vector")
    if mag is not None and tuple(mag.shape) != (b.shape[0],):
        raise AdapterError(f"{where}: {name}.lora_magnitude_vector has shape {tuple(mag.shape)} but {name}.lora_B has "
                           f"{tuple(b.shape)} ({b.shape[0]} outputs); the file is corrupt or mixes two adapters")


def _saved_shapes(adapter, name: str, kind: str, base_shape: tuple, feedforward: bool = False) -> dict[str, tuple]:
    from ..layers import matrix_shape

    out_f, in_f = matrix_shape(kind, base_shape)
    r = adapter.tensors[f"{name}.lora_A"].shape[0]
    want = {f"{name}.lora_A": (r, in_f), f"{name}.lora_B": (out_f, r)}
    if f"{name}.lora_magnitude_vector" in adapter.tensors:
        want[f"{name}.lora_magnitude_vector"] = (out_f,)
    return want


@METHODS.register("lora")
class LoRA(TuningMethod):
    name = "lora"
    config_cls = LoRAConfig
    kinds = ("linear", "conv1d", "embedding", "conv2d", "param")
    merge_deltas = staticmethod(_merge_deltas)
    check_saved = staticmethod(_check_saved)
    saved_shapes = staticmethod(_saved_shapes)
    peft = PeftConverter("LORA", _peft_read, _peft_write_site, _peft_write_config)
    low_rank_factors = True

    @classmethod
    def training(cls, config: Any):
        from ..config import parse_config

        c = parse_config(LoRAConfig, dict(config))
        return lora_init.EvaTraining(c.eva_config or lora_init.EvaConfig()) if c.init_lora_weights == "eva" else None

    #: the adapter file as saved (adapter_from_model): PiSSA/OLoRA converted against the original base
    saved_adapter = staticmethod(lora_init.saved_adapter)

    @classmethod
    def frozen_base_in_bf16(cls, config: dict[str, Any]) -> bool:
        # DoRA normalises by the base weight's column norms, which bf16 would perturb
        return not config.get("use_dora")

    @classmethod
    def trains_on_quantized_base(cls, config: dict[str, Any]) -> bool:
        return not config.get("use_dora")

    @classmethod
    def eligible(cls, info: ParamInfo) -> bool:
        kind = layer_kind(info.module, info.pname)
        if kind == "param":
            return info.param.dim() == 2 and info.param.is_floating_point()
        return kind in cls.kinds

    @classmethod
    def site_options(cls, config: LoRAConfig, info: ParamInfo) -> dict[str, Any]:
        return {
            "r": int(pattern_value(config.rank_pattern, info.module_name, config.r)),
            "lora_alpha": float(pattern_value(config.alpha_pattern, info.module_name, config.lora_alpha)),
        }

    @classmethod
    def make_sites(cls, infos: list, config: LoRAConfig, options: dict[str, dict[str, Any]]) -> list[Site]:
        if config.init_lora_weights == "eva" and cls.training.__func__ is not LoRA.training.__func__:
            # a method built on LoRA with its own training (DEFT) would never run EVA's start
            raise UnsupportedError(f"init_lora_weights 'eva' is not supported by method {cls.name} (its training does not run "
                                   "EVA's data-driven start); use init_lora_weights true, pissa or olora, or method lora")
        return super().make_sites(infos, config, options)

    @classmethod
    def make_site(cls, info: ParamInfo, config: LoRAConfig, options: dict[str, Any]) -> Site:
        kind = layer_kind(info.module, info.pname)
        return LoRASite(info, kind, options["r"], options["lora_alpha"], config.lora_dropout,
                        config.use_rslora, config.use_dora, config.init_lora_weights)
