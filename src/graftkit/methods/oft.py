"""OFT: orthogonal fine-tuning with a block-diagonal rotation of each weight's inputs.

Qiu et al., 2023 ("Controlling Text-to-Image Diffusion by Orthogonal Finetuning", NeurIPS 2023,
arXiv:2306.07280) keep a weight's hyperspherical energy (the angles between its neurons) by
learning an orthogonal ``R`` and using ``W' = W R^T`` in place of ``W`` (out x in): the layer sees
its input rotated, ``y = W (R^T x)``, i.e. per token ``x -> x R``. ``R = diag(R_1, ..., R_r)`` is
block-diagonal with ``r`` blocks of size ``b = in / r``; each block comes from a skew-symmetric
``Q_j`` (``b (b - 1) / 2`` free values: its upper triangle) through the Cayley map

    exact Cayley:              R_j = (I - Q_j)(I + Q_j)^{-1}
    Cayley-Neumann (default):  R_j = I + 2 Q_j + 2 Q_j^2 + ... + 2 Q_j^{m-1} + Q_j^m

The Neumann form (Qiu et al., 2025, "Orthogonal Finetuning Made Scalable", arXiv:2506.19847) drops
the inverse; it is the series of ``(I + Q)(I - Q)^{-1}`` (the exact form's transpose, so the two
options rotate the other way for the same ``Q``) cut after ``m = num_cayley_neumann_terms - 1``
powers (``m = 3`` for 3 or 4 terms; 2 terms: ``I + 2Q``; 1 term: ``I``), exactly as peft 0.21
computes it, and is orthogonal only up to ``O(|Q|^{m+1})``. ``Q = 0`` gives ``R = I``: training
starts from the base model.

Options, all peft's (``OFTConfig``): ``oft_block_size`` (default 32) or ``r`` (number of blocks),
one of them zero; a size that does not divide a layer's input width is moved to the nearest
divisor, as peft does, and the size each target got is saved in ``target_options``.
``block_share`` trains one block shared by every block of a layer. ``coft`` (constrained OFT)
keeps each ``Q_j`` in a Frobenius ball of radius ``eps / sqrt(r)``: the stored tensor is projected
in place at every forward (as peft does) and the projection is a constant for backward.
``module_dropout`` sets ``int(p * r)`` random blocks to the identity per training forward (OFT's
multiplicative dropout; peft 0.21 builds this layer but its OFT forward never calls it, so a run
with ``module_dropout > 0`` trains differently from peft's; evaluation is the same).

The unmerged forward is peft's: a forward pre-hook rotates the layer's input block by block (``tokens
x in x b`` multiply-adds, no dense ``R`` and no second matmul with ``W``). Merging folds ``W R^T``
into the weight; the delta ``W R^T - W`` reads the base weight (``reads_base``). Adapts ``nn.Linear``
and transformers' ``Conv1D`` (peft's OFT has no Conv1D layer: such an adapter saves natively only);
peft's Conv2d and Embedding variants are not implemented (its unmerged Conv2d forward folds
rotated patches back with summation, which is not its merged kernel).
"""
from __future__ import annotations

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
from .weight_delta import WeightDeltaMethod, WeightDeltaSite, canonical


class OFTConfig(MethodConfig):
    # peft's pair: exactly one of them is non-zero; r = in / oft_block_size
    r: int = Field(0, ge=0)
    oft_block_size: int = Field(32, ge=0)
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    coft: bool = False
    eps: float = Field(6e-5, gt=0)
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = Field(5, ge=1)
    # True: Q = 0 (R = I, identity at init); False: Q ~ N(0, 0.1^2) (tests, debugging)
    init_weights: bool = True

    @model_validator(mode="before")
    @classmethod
    def _r_alone(cls, data: Any) -> Any:
        # peft makes users zero oft_block_size by hand when they give r; r alone means blocks by count
        if isinstance(data, dict) and data.get("r") and "oft_block_size" not in data:
            data = {**data, "oft_block_size": 0}
        return data

    @model_validator(mode="after")
    def _one_size(self):
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ConfigError(f"OFTConfig: give one of r (number of blocks) or oft_block_size, the other 0 "
                              f"(got r={self.r}, oft_block_size={self.oft_block_size}); r x oft_block_size = the layer's input width")
        return self


# -- the math ---------------------------------------------------------------------------------------

def nearest_divisor(n: int, want: int) -> int:
    """peft's adjust_oft_parameters: the divisor of ``n`` closest to ``want`` (the lower on a tie)."""
    if want >= n:
        return n
    higher = want
    while higher <= n and n % higher:
        higher += 1
    lower = want
    while lower > 1 and n % lower:
        lower -= 1
    return lower if want - lower <= higher - want else higher


def block_size_for(in_features: int, r: int, oft_block_size: int) -> int:
    """The block size peft gives a layer of ``in_features`` inputs under (r, oft_block_size)."""
    if oft_block_size:
        return oft_block_size if in_features % oft_block_size == 0 else nearest_divisor(in_features, oft_block_size)
    blocks = r if in_features % r == 0 and r <= in_features else nearest_divisor(in_features, r)
    return in_features // blocks


def block_of(n_elements: int) -> int | None:
    """The block size ``b`` with ``b (b - 1) / 2 == n_elements``, or None."""
    b = (1 + math.isqrt(1 + 8 * n_elements)) // 2
    return b if b * (b - 1) // 2 == n_elements else None


def skew(vec: torch.Tensor, b: int) -> torch.Tensor:
    """(blocks, b(b-1)/2) upper triangles -> (blocks, b, b) skew-symmetric matrices."""
    rows, cols = torch.triu_indices(b, b, 1, device=vec.device)
    q = vec.new_zeros(vec.shape[0], b, b)
    q[:, rows, cols] = vec
    return q - q.transpose(-2, -1)


def cayley(q: torch.Tensor, neumann: bool, terms: int) -> torch.Tensor:
    """Orthogonal (blocks, b, b) from skew-symmetric ``q`` (see the module docstring for both forms)."""
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).expand_as(q)
    if not neumann:
        # R (I + Q) = I - Q
        return torch.linalg.solve(eye + q, eye - q, left=False)
    r = eye.clone()
    if terms < 2:
        return r
    r = r + 2.0 * q
    if terms == 2:
        return r
    top = max(terms - 1, 3)  # peft's series ends on a half-weight power Q^top
    power = q
    for _ in range(2, top):
        power = power @ q
        r = r + 2.0 * power
    return r + power @ q


@torch.no_grad()
def coft_project(vec: torch.Tensor, b: int, eps: float) -> torch.Tensor:
    """COFT: each block's skew matrix pulled into the Frobenius ball of radius ``eps / sqrt(blocks)``."""
    q = skew(vec, b)
    radius = eps / math.sqrt(vec.shape[0])
    norm = q.flatten(1).norm(dim=1).view(-1, 1, 1)
    inside = norm <= radius
    q = torch.where(inside, q, radius * q / torch.where(inside, torch.ones_like(norm), norm))
    rows, cols = torch.triu_indices(b, b, 1, device=vec.device)
    return q[:, rows, cols]


def oft_blocks(vec: torch.Tensor, settings: Mapping[str, Any], in_features: int) -> torch.Tensor:
    """The (in / b, b, b) rotation blocks of a target (a shared block repeated), float32,
    differentiable in ``vec`` (a COFT projection passes the gradient straight through)."""
    b = int(settings["block_size"])
    vec = vec.float()
    if settings.get("coft"):
        vec = vec + (coft_project(vec, b, float(settings["eps"])) - vec).detach()
    r = cayley(skew(vec, b), bool(settings.get("use_cayley_neumann", True)), int(settings.get("num_cayley_neumann_terms", 5)))
    n = in_features // b
    return r.expand(n, b, b) if r.shape[0] == 1 and n > 1 else r


def rotate_rows(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x @ diag(blocks)`` for row vectors ``x`` (..., in), without forming the block-diagonal matrix."""
    n, b, _ = blocks.shape
    return torch.einsum("...jk,jkc->...jc", x.reshape(*x.shape[:-1], n, b), blocks).reshape(x.shape)


def oft_delta(kind: str, weight: torch.Tensor, slots: Mapping[str, torch.Tensor], settings: Mapping[str, Any]) -> torch.Tensor:
    """``W R^T - W`` in the canonical (out, in) view, float32."""
    w = canonical(kind, weight)
    blocks = oft_blocks(slots["oft_R"], settings, w.shape[1])
    n, b, _ = blocks.shape
    rotated = torch.einsum("ojk,jck->ojc", w.reshape(w.shape[0], n, b), blocks).reshape(w.shape)
    return rotated - w


def block_dropout(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """OFT's multiplicative dropout: ``int(p * n)`` random blocks replaced by the identity."""
    n = blocks.shape[0]
    k = int(p * n)
    if k == 0:
        return blocks
    drop = torch.zeros(n, 1, 1, device=blocks.device, dtype=blocks.dtype)
    drop[torch.randperm(n, device=blocks.device)[:k]] = 1
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)
    return (1 - drop) * blocks + drop * eye


def replace_input(args: tuple, kwargs: dict, x: torch.Tensor):
    if args:
        return (x, *args[1:]), kwargs
    key = next(iter(kwargs))
    return args, {**kwargs, key: x}


# -- the site ---------------------------------------------------------------------------------------

class OFTSite(WeightDeltaSite):
    slots = ("oft_R",)
    reads_base = True
    formula = staticmethod(oft_delta)

    def __init__(self, info: ParamInfo, kind: str, settings: Mapping[str, Any]):
        super().__init__(info, kind, settings)
        if kind not in OFT.kinds:
            raise UnsupportedError(f"{info.name}: OFT adapts nn.Linear and Conv1D weights, not a {kind} weight; "
                                   "leave it out of the targets")
        b = int(self.settings["block_size"])
        if b < 1 or self.in_features % b:
            raise AdapterError(f"{info.name}: OFT block size {b} does not divide the layer's {self.in_features} inputs; "
                               "the adapter was made for another base model (or its adapter.json is corrupt)")
        self.block_size, self.n_blocks = b, self.in_features // b
        rows = 1 if self.settings.get("block_share") else self.n_blocks
        self.oft_R = nn.Parameter(torch.zeros(rows, b * (b - 1) // 2, dtype=self.dtype, device=info.param.device))
        if not self.settings.get("init_weights", True):
            with torch.no_grad():
                self.oft_R.normal_(0.0, 0.1)

    def rotation(self) -> torch.Tensor:
        """The live rotation blocks (n, b, b): COFT's in-place projection and dropout as peft applies them."""
        if self.settings.get("coft"):
            with torch.no_grad():  # peft keeps the stored tensor projected, so the optimizer steps from there
                self.oft_R.copy_(coft_project(self.oft_R.float(), self.block_size, float(self.settings["eps"])).to(self.oft_R.dtype))
        blocks = oft_blocks(self.oft_R, self.settings, self.in_features)
        p = float(self.settings.get("module_dropout") or 0.0)
        if self.training and p > 0 and self.oft_R.shape[0] > 1:  # a shared block has nothing to drop (as peft)
            blocks = block_dropout(blocks, p)
        return blocks

    def attach(self) -> None:
        self.owner.register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    def _pre_hook(self, module, args, kwargs):
        if not self.enabled or self.merged:
            return None
        x = first_input(args, kwargs)
        blocks = self.rotation()
        rotated = rotate_rows(x.to(blocks.dtype), blocks).to(x.dtype)
        return replace_input(args, kwargs, rotated)


# -- saved adapters ---------------------------------------------------------------------------------

def _check_saved(adapter, name: str, options: dict, where: str) -> None:
    from ..validate import saved_tensor

    t = saved_tensor(adapter, f"{name}.oft_R", where)
    b = options.get("block_size")
    if t.dim() != 2:
        raise AdapterError(f"{where}: adapter tensor {name}.oft_R has shape {tuple(t.shape)}; OFT's skew parameters are 2-D - the file is corrupt")
    if not isinstance(b, int) or b < 1 or t.shape[1] != b * (b - 1) // 2:
        raise AdapterError(f"{where}: {name}.oft_R has shape {tuple(t.shape)} but adapter.json gives block_size={b!r} for it "
                           f"(b(b-1)/2 values per block); the file is corrupt or mixes two adapters")


def _saved_shapes(adapter, name: str, kind: str, base_shape: tuple, feedforward: bool = False) -> dict[str, tuple]:
    options = (adapter.meta.get("target_options") or {}).get(name) or {}
    b = options.get("block_size")
    _, in_f = matrix_shape(kind, base_shape)
    if not isinstance(b, int) or b < 1:
        raise AdapterError(f"the OFT adapter's adapter.json gives no block_size for {name} (got {b!r}); the file is corrupt - re-save it")
    if in_f % b:
        raise AdapterError(f"the OFT adapter's block size {b} for {name} does not divide its {in_f} inputs in this base "
                           f"{tuple(base_shape)}; the adapter was made for another base model")
    shared = bool((adapter.meta.get("config") or {}).get("block_share"))
    return {f"{name}.oft_R": (1 if shared else in_f // b, b * (b - 1) // 2)}


# -- peft's OFT format ------------------------------------------------------------------------------

#: the formulation graftkit's files follow (peft 0.18.0 changed the Cayley-Neumann series; peft warns
#: on a file that names no version or an older one)
PEFT_FORMULATION = "0.18.0"


def _older(version: Any, than: str) -> bool:
    try:
        from packaging.version import Version

        return Version(str(version).partition("@")[0]) < Version(than)
    except Exception:  # an unreadable version string: take the file as current
        return False


def _peft_read(cfg: dict, raw: dict, path):
    from ..io.native import AdapterFile
    from ..io.peft import CONFIG_NAME, WEIGHTS_NAME, _common_config, _heads, _meta, _number

    if "oft_block_size" not in cfg or any(".oft_r." in k or k.endswith(".oft_r") for k in raw):
        raise UnsupportedError(f"{path}: this peft OFT adapter predates peft 0.14 (its old oft_r format, no oft_block_size), "
                               "which graftkit does not read; re-train it with a current peft")
    bias = cfg.get("bias", "none")
    if bias not in (None, "none"):
        raise UnsupportedError(f"this peft OFT uses bias={bias!r}, which graftkit does not support; supported: OFT with bias='none'")
    if any(".oft_embedding_R" in k for k in raw):
        raise UnsupportedError("this peft OFT adapts an embedding layer (oft_embedding_R), which graftkit does not support; "
                               "supported: OFT on Linear layers")
    if cfg.get("use_cayley_neumann", True) and cfg.get("peft_version") and _older(cfg["peft_version"], PEFT_FORMULATION):
        raise UnsupportedError(f"this peft OFT was saved by peft {cfg['peft_version']} with use_cayley_neumann, whose series "
                               f"changed in peft {PEFT_FORMULATION}; graftkit computes the current one - re-train it with a current peft")
    suffix = ".oft_R.weight"
    vectors = {k[: -len(suffix)]: v for k, v in raw.items() if k.endswith(suffix)}
    if not vectors:
        raise FileFormatError(f"{path / WEIGHTS_NAME} holds no OFT tensors (keys ending in {suffix})")
    r = _number(cfg, "r", 0, path, integer=True, low=0)
    size = _number(cfg, "oft_block_size", 0, path, integer=True, low=0)
    terms = _number(cfg, "num_cayley_neumann_terms", 5, path, integer=True, low=1)
    dropout = _number(cfg, "module_dropout", 0.0, path, low=0, high=1)
    eps = _number(cfg, "eps", 6e-5, path)
    shared = bool(cfg.get("block_share", False))
    heads, tensors = _heads(raw, {f"{m}{suffix}" for m in vectors})
    targets, options = [], {}
    for module, vec in sorted(vectors.items()):
        b = block_of(vec.shape[-1]) if vec.dim() == 2 else None
        if b is None or (shared and vec.shape[0] != 1):
            raise FileFormatError(f"{path / WEIGHTS_NAME}: {module}{suffix} has shape {tuple(vec.shape)}, which is not "
                                  f"({'1' if shared else 'blocks'}, b(b-1)/2) for any block size b; the file is corrupt")
        name = f"{module}.weight"
        targets.append(name)
        options[name] = {"block_size": b}
        tensors[f"{name}.oft_R"] = vec.contiguous()
    config = {**_common_config(cfg, heads), "r": r, "oft_block_size": size, "module_dropout": dropout,
              "coft": bool(cfg.get("coft", False)), "eps": eps, "block_share": shared,
              "use_cayley_neumann": bool(cfg.get("use_cayley_neumann", True)), "num_cayley_neumann_terms": terms,
              "init_weights": True}
    if (r == 0) == (size == 0):
        raise FileFormatError(f"{path / CONFIG_NAME}: r={r} and oft_block_size={size}; exactly one of them must be non-zero - fix the file")
    meta = _meta("oft", config, targets, options, heads, cfg, path)
    meta["target_kinds"] = {n: "linear" for n in targets}  # peft's OFT Linear (its Conv1D has no OFT layer)
    return AdapterFile(meta, tensors)


def _peft_write_site(site, key: str, tensors: dict, acc: dict) -> None:
    from ..io.peft import PREFIX

    module = key[len(PREFIX):]
    if site.kind != "linear":
        raise UnsupportedError(f"{module}: peft's OFT has no layer for a {site.kind} weight (transformers' Conv1D); "
                               "save this adapter with format='native'")
    tensors[f"{key}.oft_R.weight"] = site.oft_R.detach().cpu()
    acc.setdefault("sizes", {})[module] = (site.in_features, site.block_size)


def _peft_write_config(state, acc: dict) -> dict:
    c = state.config
    for module, (in_f, b) in sorted(acc.get("sizes", {}).items()):
        if block_size_for(in_f, c.r, c.oft_block_size) != b:
            raise UnsupportedError(f"{module}: its OFT block size {b} is not the one peft derives from r={c.r}, "
                                   f"oft_block_size={c.oft_block_size} for {in_f} inputs, so peft could not load it; save it with format='native'")
    return {"r": c.r, "oft_block_size": c.oft_block_size, "module_dropout": c.module_dropout, "coft": c.coft, "eps": c.eps,
            "block_share": c.block_share, "use_cayley_neumann": c.use_cayley_neumann,
            "num_cayley_neumann_terms": c.num_cayley_neumann_terms, "init_weights": True, "bias": "none",
            "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None, "peft_version": PEFT_FORMULATION}


@METHODS.register("oft")
class OFT(WeightDeltaMethod):
    name = "oft"
    config_cls = OFTConfig
    site_cls = OFTSite
    kinds = ("linear", "conv1d")
    check_saved = staticmethod(_check_saved)
    saved_shapes = staticmethod(_saved_shapes)
    peft = PeftConverter("OFT", _peft_read, _peft_write_site, _peft_write_config)

    @classmethod
    def site_options(cls, config: OFTConfig, info: ParamInfo) -> dict[str, Any]:
        kind = layer_kind(info.module, info.pname)
        _, in_f = matrix_shape(kind, logical_shape(info.param))
        return {"block_size": block_size_for(in_f, config.r, config.oft_block_size)}
