"""BOFT: orthogonal fine-tuning with a butterfly product of block-diagonal rotations.

Liu et al., 2024 ("Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization", ICLR 2024,
arXiv:2311.06243) build OFT's orthogonal matrix from ``m`` sparse factors instead of one
block-diagonal matrix, so that few parameters still give a dense rotation:

    W' = diag(s) W M^T,    M = B_m ... B_2 B_1,    B_i = P_i diag(R_i1, ..., R_iD) P_i^T

(``W`` is out x in; per token the layer sees ``x -> x M`` and scales its output, bias excluded, by
``s``). Each factor has ``D`` (``boft_block_num``) orthogonal blocks of size ``H`` (``boft_block_size``,
``D H = in``), each the exact Cayley map ``R = (I - S)(I + S)^{-1}`` of ``S = (A - A^T) / 2`` with a
free ``A`` (H x H); ``P_i`` is the butterfly permutation that interleaves halves of neighbouring
blocks in groups of ``2^(i-1)`` blocks (``P_1 = I``), so ``m = log2(D) + 1`` factors connect every
input with every other. ``m = 1`` (``boft_n_butterfly_factor: 1``, the default) is OFT's
block-diagonal rotation (exact Cayley) plus the scale ``s``. ``A = 0, s = 1`` is the identity.

Options, all peft's (``BOFTConfig``): ``boft_block_size`` (default 4) or ``boft_block_num``, one of them
zero, and ``boft_n_butterfly_factor`` (``m``), with peft's rules (the sizes divide the input width,
``D`` a multiple of ``2^(m-1)``, even ``D`` and ``H`` when ``m > 1``: each broken rule is one line naming
the layer); ``boft_dropout`` sets ``int(p D)`` blocks of one random factor to the identity per
training forward (peft's multiplicative dropout).

The unmerged forward rotates the layer's input factor by factor (gathers and ``tokens x in x H``
multiply-adds per factor, no dense ``M``) and scales the output; a Conv2d kernel (canonical
``(out, in kh kw)`` view) takes the dense delta. Merging folds ``diag(s) W M^T`` into the weight; the
delta reads the base weight (``reads_base``).

peft 0.21 builds ``m > 1`` only where its CUDA block-diagonal extension compiles; elsewhere it sets
``m = 1`` with a warning (its files then hold one factor). graftkit computes any ``m`` on any device
and reads the factor count from the tensors, so a peft file of either kind loads; an ``m > 1``
export loads in peft only where peft can build that extension.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import torch
from pydantic import Field, model_validator
from torch import nn

from ..errors import AdapterError, ConfigError, FileFormatError, UnsupportedError
from ..layers import layer_kind, logical_shape, matrix_shape
from ..registry import METHODS
from ..targets import ParamInfo
from .base import MethodConfig, PeftConverter, first_input
from .oft import cayley, replace_input
from .weight_delta import WeightDeltaMethod, WeightDeltaSite, canonical


class BOFTConfig(MethodConfig):
    # peft's pair: exactly one of them is non-zero; block_size x block_num = the layer's input width
    boft_block_size: int = Field(4, ge=0)
    boft_block_num: int = Field(0, ge=0)
    boft_n_butterfly_factor: int = Field(1, ge=1)
    boft_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # True: A = 0, s = 1 (identity at init); False: A ~ N(0, 0.1^2), s ~ N(1, 0.1^2) (tests, debugging)
    init_weights: bool = True

    @model_validator(mode="before")
    @classmethod
    def _num_alone(cls, data: Any) -> Any:
        # peft makes users zero boft_block_size by hand when they give boft_block_num
        if isinstance(data, dict) and data.get("boft_block_num") and "boft_block_size" not in data:
            data = {**data, "boft_block_size": 0}
        return data

    @model_validator(mode="after")
    def _one_size(self):
        if (self.boft_block_size == 0) == (self.boft_block_num == 0):
            raise ConfigError(f"BOFTConfig: give one of boft_block_size or boft_block_num, the other 0 (got boft_block_size="
                              f"{self.boft_block_size}, boft_block_num={self.boft_block_num}); their product is the layer's input width")
        return self


def boft_shape(name: str, in_features: int, size: int, num: int, factors: int) -> tuple[int, int]:
    """(block size H, block number D) for a layer of ``in_features`` inputs, by peft's rules."""
    extra = factors - 1
    where = f"BOFT on {name} ({in_features} inputs)"
    if size == 0:
        if in_features % num:
            raise ConfigError(f"{where}: boft_block_num={num} does not divide the input width; pick a divisor of {in_features}")
        if extra and (extra > int(math.log2(num)) or num % 2 ** extra):
            raise ConfigError(f"{where}: boft_block_num={num} must be a multiple of 2^(boft_n_butterfly_factor - 1) = {2 ** extra}; "
                              "lower boft_n_butterfly_factor or change boft_block_num")
        size = in_features // num
    else:
        if in_features % size:
            raise ConfigError(f"{where}: boft_block_size={size} does not divide the input width; pick a divisor of {in_features}")
        if extra and in_features % (size * 2 ** extra):
            raise ConfigError(f"{where}: boft_block_size x 2^(boft_n_butterfly_factor - 1) = {size * 2 ** extra} must divide the "
                              "input width; lower boft_n_butterfly_factor or boft_block_size")
        num = in_features // size
    if extra and (num % 2 or size % 2):
        raise ConfigError(f"{where}: with boft_n_butterfly_factor > 1 the block size ({size}) and block number ({num}) must both "
                          "be even; change boft_block_size or boft_block_num")
    return size, num


@functools.lru_cache(maxsize=64)
def butterfly_perms(n: int, blocks: int, size: int, factors: int) -> tuple[torch.Tensor, ...]:
    """Factor i's permutation (``(P A P^T)[r, c] = A[p[r], p[c]]``): in each group of ``size 2^i``
    inputs, the half-blocks (``size / 2`` each) at even positions first, then those at odd ones."""
    if factors == 1:
        return (torch.arange(n),)
    half = size // 2
    out = []
    for i in range(factors):
        group = size * 2 ** i
        chunks = group // half
        order = [*range(0, chunks, 2), *range(1, chunks, 2)]
        within = torch.cat([torch.arange(c * half, (c + 1) * half) for c in order])
        out.append(torch.cat([g + within for g in range(0, n, group)]))
    return tuple(out)


def boft_blocks(a: torch.Tensor) -> torch.Tensor:
    """(m, D, H, H) free matrices -> their exact Cayley rotations, float32."""
    m, d, h, _ = a.shape
    a = a.float().reshape(m * d, h, h)
    return cayley(0.5 * (a - a.transpose(1, 2)), False, 0).reshape(m, d, h, h)


def butterfly_matrix(blocks: torch.Tensor, perms: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``M = B_m ... B_1`` (in x in) with ``B_i = P_i diag(blocks[i]) P_i^T``."""
    out = None
    for i, p in enumerate(perms):
        p = p.to(blocks.device)
        b = torch.block_diag(*blocks[i].unbind(0))[p][:, p]
        out = b if out is None else b @ out
    return out


def butterfly_rotate(x: torch.Tensor, blocks: torch.Tensor, perms: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``x @ M`` for row vectors ``x`` (..., in), one sparse factor at a time (``x B_m ... B_1``)."""
    _, d, h, _ = blocks.shape
    for i in reversed(range(len(perms))):
        p = perms[i].to(x.device)
        u = x[..., torch.argsort(p)] if i else x  # P_1 = I
        u = torch.einsum("...jk,jkc->...jc", u.reshape(*u.shape[:-1], d, h), blocks[i]).reshape(x.shape)
        x = u[..., p] if i else u
    return x


def perms_for(settings: Mapping[str, Any], in_features: int) -> tuple[torch.Tensor, ...]:
    return butterfly_perms(in_features, int(settings["block_num"]), int(settings["block_size"]), int(settings["factors"]))


def boft_delta(kind: str, weight: torch.Tensor, slots: Mapping[str, torch.Tensor], settings: Mapping[str, Any]) -> torch.Tensor:
    """``diag(s) W M^T - W`` in the canonical (out, in) view, float32."""
    w = canonical(kind, weight)
    m = butterfly_matrix(boft_blocks(slots["boft_R"]), perms_for(settings, w.shape[1]))
    return (w @ m.t()) * slots["boft_s"].float()[:, None] - w


class BOFTSite(WeightDeltaSite):
    slots = ("boft_R", "boft_s")
    reads_base = True
    formula = staticmethod(boft_delta)

    def __init__(self, info: ParamInfo, kind: str, settings: Mapping[str, Any]):
        super().__init__(info, kind, settings)
        if kind not in BOFT.kinds:
            raise UnsupportedError(f"{info.name}: BOFT adapts nn.Linear, Conv1D and Conv2d weights, not a {kind} weight; "
                                   "leave it out of the targets")
        if kind == "conv2d" and info.module.groups != 1:
            raise UnsupportedError(f"{info.name}: BOFT on grouped convolutions (groups={info.module.groups}) is not supported "
                                   "(nor in peft); leave it out of the targets")
        h, d, m = (int(self.settings[k]) for k in ("block_size", "block_num", "factors"))
        if h * d != self.in_features:
            raise AdapterError(f"{info.name}: BOFT blocks {d} x {h} do not cover the layer's {self.in_features} inputs; "
                               "the adapter was made for another base model (or its adapter.json is corrupt)")
        self.factors, self.block_num, self.block_size = m, d, h
        dev = info.param.device
        self.boft_R = nn.Parameter(torch.zeros(m, d, h, h, dtype=self.dtype, device=dev))
        self.boft_s = nn.Parameter(torch.ones(self.out_features, dtype=self.dtype, device=dev))
        if not self.settings.get("init_weights", True):
            with torch.no_grad():
                self.boft_R.normal_(0.0, 0.1)
                self.boft_s.normal_(1.0, 0.1)

    def rotation_blocks(self) -> torch.Tensor:
        blocks = boft_blocks(self.boft_R)
        p = float(self.settings.get("boft_dropout") or 0.0)
        k = int(p * self.block_num)
        if self.training and k:
            # peft's multiplicative dropout: k blocks of one random factor become the identity
            drop = torch.zeros(self.factors, self.block_num, 1, 1, device=blocks.device, dtype=blocks.dtype)
            drop[torch.randint(0, self.factors, (1,)).item(), torch.randperm(self.block_num, device=blocks.device)[:k]] = 1
            eye = torch.eye(self.block_size, device=blocks.device, dtype=blocks.dtype)
            blocks = (1 - drop) * blocks + drop * eye
        return blocks

    def attach(self) -> None:
        if self.kind == "conv2d":  # the dense delta through the base conv's own geometry
            super().attach()
            return
        self.owner.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        self.owner.register_forward_hook(self._post_hook, with_kwargs=True)

    def _delta_output(self, x: torch.Tensor) -> torch.Tensor:  # conv2d only: dropout shows in training as in linear
        if not self.training or not self.settings.get("boft_dropout"):
            return super()._delta_output(x)
        m = butterfly_matrix(self.rotation_blocks(), perms_for(self.settings, self.in_features))
        w = canonical(self.kind, self.base)
        d = ((w @ m.t()) * self.boft_s.float()[:, None] - w).reshape(self.base.shape)
        o = self.owner
        return torch.nn.functional.conv2d(x.to(d.dtype), d, None, o.stride, o.padding, o.dilation, o.groups)

    def _pre_hook(self, module, args, kwargs):
        if not self.enabled or self.merged:
            return None
        x = first_input(args, kwargs)
        rotated = butterfly_rotate(x.to(self.dtype), self.rotation_blocks(), perms_for(self.settings, self.in_features))
        return replace_input(args, kwargs, rotated.to(x.dtype))

    def _post_hook(self, module, args, kwargs, output):
        if not self.enabled or self.merged:
            return None
        s = self.boft_s.to(output.dtype)
        bias = getattr(module, "bias", None)
        if bias is None:
            return output * s
        return (output - bias) * s + bias


# -- saved adapters ---------------------------------------------------------------------------------

def _check_saved(adapter, name: str, options: dict, where: str) -> None:
    from ..validate import saved_tensor

    r = saved_tensor(adapter, f"{name}.boft_R", where)
    s = saved_tensor(adapter, f"{name}.boft_s", where)
    want = tuple(options.get(k) for k in ("factors", "block_num", "block_size", "block_size"))
    if tuple(r.shape) != want:
        raise AdapterError(f"{where}: {name}.boft_R has shape {tuple(r.shape)} but adapter.json gives (factors, block_num, block_size) "
                           f"= {want[:3]} for it; the file is corrupt or mixes two adapters")
    if s.dim() != 1:
        raise AdapterError(f"{where}: adapter tensor {name}.boft_s has shape {tuple(s.shape)}; BOFT's scale is 1-D - the file is corrupt")


def _saved_shapes(adapter, name: str, kind: str, base_shape: tuple, feedforward: bool = False) -> dict[str, tuple]:
    options = (adapter.meta.get("target_options") or {}).get(name) or {}
    out_f, in_f = matrix_shape(kind, base_shape)
    m, d, h = (options.get(k) for k in ("factors", "block_num", "block_size"))
    if not all(isinstance(v, int) and v >= 1 for v in (m, d, h)):
        raise AdapterError(f"the BOFT adapter's adapter.json gives (factors, block_num, block_size) = {(m, d, h)} for {name}; "
                           "the file is corrupt - re-save it")
    if d * h != in_f:
        raise AdapterError(f"the BOFT adapter's {d} blocks of {h} for {name} do not cover its {in_f} inputs in this base "
                           f"{tuple(base_shape)}; the adapter was made for another base model")
    return {f"{name}.boft_R": (m, d, h, h), f"{name}.boft_s": (out_f,)}


# -- peft's BOFT format -----------------------------------------------------------------------------

def _peft_read(cfg: dict, raw: dict, path):
    from ..io.native import AdapterFile
    from ..io.peft import CONFIG_NAME, WEIGHTS_NAME, _common_config, _heads, _meta, _number

    bias = cfg.get("bias", "none")
    if bias not in (None, "none"):
        raise UnsupportedError(f"this peft BOFT uses bias={bias!r}, which graftkit does not support; supported: BOFT with bias='none'")
    rs = {k[: -len(".boft_R")]: v for k, v in raw.items() if k.endswith(".boft_R")}
    ss = {k[: -len(".boft_s")]: v for k, v in raw.items() if k.endswith(".boft_s")}
    if not rs:
        raise FileFormatError(f"{path / WEIGHTS_NAME} holds no BOFT tensors (keys ending in .boft_R)")
    size = _number(cfg, "boft_block_size", 4, path, integer=True, low=0)
    num = _number(cfg, "boft_block_num", 0, path, integer=True, low=0)
    factors = _number(cfg, "boft_n_butterfly_factor", 1, path, integer=True, low=1)
    dropout = _number(cfg, "boft_dropout", 0.0, path, low=0, high=1)
    if (size == 0) == (num == 0):
        raise FileFormatError(f"{path / CONFIG_NAME}: boft_block_size={size} and boft_block_num={num}; exactly one of them must be "
                              "non-zero - fix the file")
    heads, tensors = _heads(raw, {f"{m}.boft_R" for m in rs} | {f"{m}.boft_s" for m in ss})
    targets, options, kinds = [], {}, {}
    for module, r in sorted(rs.items()):
        s = ss.get(module)
        if s is None:
            raise FileFormatError(f"{path / WEIGHTS_NAME}: module {module} has boft_R but no boft_s; the file is incomplete")
        if r.dim() != 4 or r.shape[2] != r.shape[3] or s.dim() != 2 or 1 not in s.shape:
            raise FileFormatError(f"{path / WEIGHTS_NAME}: {module} has boft_R {tuple(r.shape)} and boft_s {tuple(s.shape)}; BOFT's are "
                                  "(factors, blocks, size, size) and (out, 1) or (1, out) - the file is corrupt")
        name = f"{module}.weight"
        targets.append(name)
        options[name] = {"block_size": int(r.shape[2]), "block_num": int(r.shape[1]), "factors": int(r.shape[0])}
        # peft keeps a Linear's scale as (out, 1) and a Conv2d's as (1, out)
        kinds[name] = "conv2d" if s.shape[0] == 1 and s.shape[1] != 1 else "linear"
        tensors[f"{name}.boft_R"] = r.contiguous()
        tensors[f"{name}.boft_s"] = s.reshape(-1).contiguous()
    config = {**_common_config(cfg, heads), "boft_block_size": size, "boft_block_num": num, "boft_n_butterfly_factor": factors,
              "boft_dropout": dropout, "init_weights": True}
    meta = _meta("boft", config, targets, options, heads, cfg, path)
    meta["target_kinds"] = kinds
    return AdapterFile(meta, tensors)


def _peft_write_site(site, key: str, tensors: dict, acc: dict) -> None:
    from ..io.peft import PREFIX

    module = key[len(PREFIX):]
    if site.kind not in ("linear", "conv2d"):
        raise UnsupportedError(f"{module}: peft's BOFT has no layer for a {site.kind} weight (transformers' Conv1D); "
                               "save this adapter with format='native'")
    s = site.boft_s.detach().cpu()
    tensors[f"{key}.boft_R"] = site.boft_R.detach().cpu()
    tensors[f"{key}.boft_s"] = s.reshape(1, -1) if site.kind == "conv2d" else s.reshape(-1, 1)
    acc.setdefault("shapes", {})[module] = (site.in_features, site.block_size, site.block_num, site.factors)


def _peft_write_config(state, acc: dict) -> dict:
    c = state.config
    for module, (in_f, h, d, m) in sorted(acc.get("shapes", {}).items()):
        try:
            want = (*boft_shape(module, in_f, c.boft_block_size, c.boft_block_num, c.boft_n_butterfly_factor), c.boft_n_butterfly_factor)
        except ConfigError:
            want = None
        if want != (h, d, m):
            raise UnsupportedError(f"{module}: its BOFT shape ({m} factors of {d} blocks of {h}) is not the one peft derives from the "
                                   "adapter's config, so peft could not load it; save it with format='native'")
    return {"boft_block_size": c.boft_block_size, "boft_block_num": c.boft_block_num,
            "boft_n_butterfly_factor": c.boft_n_butterfly_factor, "boft_dropout": c.boft_dropout, "init_weights": True,
            "bias": "none", "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None}


@METHODS.register("boft")
class BOFT(WeightDeltaMethod):
    name = "boft"
    config_cls = BOFTConfig
    site_cls = BOFTSite
    kinds = ("linear", "conv1d", "conv2d")
    check_saved = staticmethod(_check_saved)
    saved_shapes = staticmethod(_saved_shapes)
    peft = PeftConverter("BOFT", _peft_read, _peft_write_site, _peft_write_config)

    @classmethod
    def site_options(cls, config: BOFTConfig, info: ParamInfo) -> dict[str, Any]:
        kind = layer_kind(info.module, info.pname)
        _, in_f = matrix_shape(kind, logical_shape(info.param))
        h, d = boft_shape(info.name, in_f, config.boft_block_size, config.boft_block_num, config.boft_n_butterfly_factor)
        return {"block_size": h, "block_num": d, "factors": config.boft_n_butterfly_factor}
