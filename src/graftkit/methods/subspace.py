"""Random-subspace tuning: train a d-dimensional vector that a fixed random projection spreads
over every selected parameter.

Li, Farkhoor, Liu and Yosinski, 2018, "Measuring the Intrinsic Dimension of Objective Landscapes"
(ICLR 2018, arXiv:1804.08838); Aghajanyan, Zettlemoyer and Gupta, 2020, "Intrinsic Dimensionality
Explains the Effectiveness of Language Model Fine-Tuning" (ACL 2021, arXiv:2012.13255). With the
selected parameters flattened and concatenated into one vector ``theta`` of length D::

    theta = theta0 + P z,        z in R^d (trained, starts at 0),   P in R^{D x d} (fixed, random)

Only ``z`` trains. ``P`` is never stored: the adapter saves ``z`` and the config's ``seed``, and the
projection is drawn again from the seed on load. Two projections (``projection``):

* ``dense``: ``P`` with N(0, 1) entries, each column scaled to unit length (Li et al.). D x d
  floats, so only for small D x d (``auto`` picks it up to :data:`DENSE_LIMIT` entries).
* ``fastfood``: the Fastfood transform (Le, Sarlos and Smola, 2013) as both papers use it. With
  ``L`` the smallest power of two >= d and ``z`` zero-padded to ``L``, one block is
  ``V_b = H G_b Pi_b H B_b`` (``H`` the L x L Walsh-Hadamard matrix, applied by the fast transform;
  ``B_b`` random signs, ``Pi_b`` a random permutation, ``G_b`` Gaussian); ``ceil(D / L)`` blocks
  with their own ``B, Pi, G`` are stacked and cut to D rows. Cost O(D log d) time and O(D) memory
  for the fixed randomness. Each block is scaled by ``1 / sqrt(D ||G_b||^2)``, so a column of the
  stacked matrix has expected unit norm (Li et al.'s divisor ``sqrt(LL ||G||^2) sqrt(D / LL)`` for
  their single block; here every block is exactly unit-norm before the cut to D rows).

The forward adds ``(P z)[offset : offset + n]`` to each selected tensor through a read-through
property (the owner's own forward then uses ``W + delta``: one matmul, not two); ``P z`` is formed
once per forward pass and shared by every site. A classification head the training loop adds
(``train_also``) trains whole by default; ``head: freeze`` keeps it at its initial value, so every
trained degree of freedom besides a frozen random head is in ``z`` (what the intrinsic-dimension
probe, :mod:`graftkit.train.probe`, uses).
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import AliasChoices, Field
from torch import nn

from ..errors import AdapterError, ConfigError
from ..registry import METHODS
from ..targets import ParamInfo
from .base import MergeDelta, MethodConfig, MethodTraining, SavedTarget, Site, TuningMethod, install_property, layer_kind, remove_property

#: the slot of ``z`` (held by the first site; the others read it through that one)
SLOT = "subspace_z"
#: ``projection: auto`` draws a dense P up to this many entries (64 MB of float32), Fastfood above
DENSE_LIMIT = 1 << 24


class SubspaceConfig(MethodConfig):
    targets: list[str] = Field(default_factory=lambda: ["*"], validation_alias=AliasChoices("targets", "target_modules"))
    #: the subspace dimension
    d: int = Field(1000, ge=1, validation_alias=AliasChoices("d", "dim"))
    projection: Literal["auto", "dense", "fastfood"] = "auto"
    #: the projection is drawn from this seed (saved instead of P)
    seed: int = 0
    #: a classification head added by graft train: trained whole, or frozen at its initial value
    head: Literal["train", "freeze"] = "train"
    #: z starts at 0 (identity); false: N(0, 1/d) entries (tests, a visible start)
    init_weights: bool = True


# -- the transforms -------------------------------------------------------------------------------

#: the largest Hadamard factor applied as one matrix product: the transform of length L = 2^k runs as
#: ceil(k / 5) products with H_32 (or a smaller H), each a GEMM over every block at once - the radix-32
#: form of the butterfly (H_{ab} = H_a (x) H_b in Sylvester order), O(L log L) like the radix-2 one but
#: far fewer passes over memory, which is what a CPU pays for
RADIX = 32
#: Fastfood runs over about this many values at a time (4 MB of float32)
CHUNK = 1 << 20
_HADAMARD: dict[tuple, torch.Tensor] = {}


def hadamard_matrix(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The n x n Walsh-Hadamard matrix in Sylvester order (entries +-1), n a power of two."""
    key = (n, dtype, str(device))
    h = _HADAMARD.get(key)
    if h is None:
        h = torch.ones(1, 1, dtype=dtype, device=device)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        _HADAMARD[key] = h
    return h


def _fwht(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    if n & (n - 1) or n == 0:
        raise ValueError(f"the Walsh-Hadamard transform needs a power-of-two length, not {n}")
    flat = x.reshape(-1, n)
    rows, lead, rest = flat.shape[0], 1, n
    while rest > 1:
        r = min(rest, RADIX)
        rest //= r
        h = hadamard_matrix(r, flat.dtype, flat.device)
        if rest == 1:  # the last factor: one GEMM over every row (H is symmetric)
            flat = (flat.reshape(-1, r) @ h).reshape(rows, n)
        else:  # H_r on the axis of size r, the processed factors before it and the rest after
            flat = torch.matmul(h, flat.reshape(rows * lead, r, rest)).reshape(rows, n)
        lead *= r
    return flat.reshape(x.shape)


class _FWHT(torch.autograd.Function):
    """H is symmetric, so the backward pass is the same transform of the gradient; nothing is saved."""

    @staticmethod
    def forward(ctx, x):
        return _fwht(x)

    @staticmethod
    def backward(ctx, grad):
        return _fwht(grad)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Differentiable, unnormalised Walsh-Hadamard transform of the last dimension (a power of two):
    ``x @ H`` with ``H`` in Sylvester order (``scipy.linalg.hadamard``)."""
    return _FWHT.apply(x)


class _Permute(torch.autograd.Function):
    """``x[b, perm[b, i]]`` per row; the backward pass gathers with the inverse permutation
    (a gather, not the scatter-add autograd would use)."""

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return torch.gather(x, 1, perm)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return torch.gather(grad, 1, inverse), None, None


def block_size(d: int) -> int:
    """Fastfood's block: the smallest power of two >= d."""
    return 1 << max(0, (d - 1).bit_length())


def choose_projection(kind: str, total: int, d: int) -> str:
    if kind != "auto":
        return kind
    return "dense" if total * d <= DENSE_LIMIT else "fastfood"


class Projection(nn.Module):
    """``z -> P z`` for a P drawn from ``seed`` (never saved: rebuilt from the seed)."""

    def __init__(self, kind: str, total: int, d: int, seed: int, device=None):
        super().__init__()
        self.kind, self.total, self.d, self.seed = kind, total, d, seed
        g = torch.Generator().manual_seed(seed)
        if kind == "dense":
            p = torch.randn(total, d, generator=g)
            self.register_buffer("matrix", (p / p.norm(dim=0, keepdim=True)).to(device), persistent=False)
        elif kind == "fastfood":
            L = block_size(d)
            nb = -(-total // L)
            signs = torch.randint(0, 2, (nb, L), generator=g).float().mul_(2).sub_(1)
            perm = torch.argsort(torch.rand(nb, L, generator=g), dim=1)
            inverse = torch.argsort(perm, dim=1)
            gauss = torch.randn(nb, L, generator=g)
            gauss.mul_(1.0 / torch.sqrt(gauss.pow(2).sum(dim=1, keepdim=True) * total))  # see the module docstring
            self.L = L
            self.register_buffer("signs", signs.to(device), persistent=False)
            self.register_buffer("perm", perm.to(device), persistent=False)
            self.register_buffer("inverse", inverse.to(device), persistent=False)
            self.register_buffer("gauss", gauss.to(device), persistent=False)
        else:
            raise ConfigError(f"subspace projection {kind!r} is not one of dense, fastfood, auto")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.float()
        if self.kind == "dense":
            return self.matrix @ z
        nb, L = self.signs.shape
        zp = nn.functional.pad(z, (0, L - z.shape[0])).unsqueeze(0)
        rows = max(1, CHUNK // L)
        parts = []
        # a few blocks at a time: each intermediate stays small enough for the allocator to reuse
        # (a D-long temporary per step is fresh pages from the kernel every time) and in cache
        for i in range(0, nb, rows):
            x = fwht(self.signs[i: i + rows] * zp)  # H B z
            x = _Permute.apply(x, self.perm[i: i + rows], self.inverse[i: i + rows]) * self.gauss[i: i + rows]  # G Pi H B z
            parts.append(fwht(x).reshape(-1))
        return torch.cat(parts)[: self.total]

    def dense_matrix(self) -> torch.Tensor:
        """P itself (D x d), for tests and small checks: the image of each basis vector."""
        eye = torch.eye(self.d, device=self.signs.device if self.kind == "fastfood" else self.matrix.device)
        with torch.no_grad():
            return torch.stack([self(e) for e in eye], dim=1)


# -- sites ----------------------------------------------------------------------------------------

class _Cache:
    """The keeper's last ``P z`` (it may carry an autograd graph, which deepcopy and pickling cannot
    copy: a copy starts empty and forms its own)."""

    __slots__ = ("entry",)

    def __init__(self):
        self.entry = None

    def __deepcopy__(self, memo):
        return _Cache()

    def __reduce__(self):
        return (_Cache, ())


class SubspaceSite(Site):
    """One selected parameter; its delta is its slice of ``P z``. The first site of an injection
    (the keeper) holds ``z`` and the projection, and forms ``P z`` once per forward pass."""

    def __init__(self, info: ParamInfo, kind: str, offset: int, total: int):
        super().__init__(info, kind)
        self.offset, self.numel, self.total = offset, info.param.numel(), total
        self.shape = tuple(info.param.shape)
        self.slots = ()
        object.__setattr__(self, "keeper", self)

    def make_keeper(self, config: SubspaceConfig, projection: str) -> None:
        p = self.base
        z = torch.zeros(config.d, dtype=torch.float32, device=p.device)
        if not config.init_weights:
            z.normal_(std=1.0 / math.sqrt(config.d))
        self.subspace_z = nn.Parameter(z)
        self.projection = Projection(projection, self.total, config.d, config.seed, device=p.device)
        self.slots = (SLOT,)
        object.__setattr__(self, "cache", _Cache())

    def share(self, keeper: "SubspaceSite") -> None:
        object.__setattr__(self, "keeper", keeper)

    # -- P z, once per forward ------------------------------------------------------------
    def pieces(self) -> tuple[torch.Tensor, ...]:
        """``P z`` cut into every site's piece by ONE split: its backward assembles one D-long
        gradient, where a slice per site would each allocate (and sum) a D-long zero tensor."""
        k = self.keeper
        z = k.subspace_z
        grad = torch.is_grad_enabled() and z.requires_grad
        key = (z._version, z.data_ptr(), z.device)
        cache = k.cache
        cached = cache.entry
        if cached is not None and cached[0] == key and (cached[2] or not grad):
            return cached[1] if grad else tuple(t.detach() for t in cached[1])
        v = k.projection(z)
        token = object()
        if grad and v.requires_grad:
            # the next forward pass (another micro-batch with the same z) needs a fresh graph once
            # backward has gone through this one
            def clear(g, _c=cache, _t=token):
                if _c.entry is not None and _c.entry[3] is _t:
                    _c.entry = None
            v.register_hook(clear)
        parts = torch.split(v, k.sizes)
        cache.entry = (key, parts, grad, token)
        return parts

    def dense_delta(self) -> torch.Tensor:
        """This parameter's delta in its stored layout, float32."""
        return self.pieces()[self.index].view(self.shape)

    # -- forward: the owner reads W + delta through a property ------------------------------
    def attach(self) -> None:
        install_property(self.owner, self.pname)

    def detach(self) -> None:
        super().detach()
        remove_property(self.owner, self.pname)

    def effective(self, param: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.merged:
            return param
        return param + self.dense_delta().to(param.dtype)

    # -- merge ------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        w = self.base
        w.add_(self.dense_delta().to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base
        w.sub_(self.dense_delta().to(w.dtype))
        self.merged = False

    def delta(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {self.pname: self.dense_delta().detach().clone()}


# -- saved adapters ------------------------------------------------------------------------------

def _saved_z(tensors, where: str) -> torch.Tensor:
    found = [v for k, v in tensors.items() if k.endswith(f".{SLOT}")]
    if len(found) != 1:
        raise AdapterError(f"{where}: a subspace adapter holds exactly one *.{SLOT} tensor, this one has {len(found)}; "
                           "the file is incomplete or corrupt - re-save it")
    return found[0]


def _check_saved(adapter, name: str, options: dict, where: str) -> None:
    z = _saved_z(adapter.tensors, where)
    d = (adapter.meta.get("config") or {}).get("d")
    if z.dim() != 1 or (d is not None and z.shape[0] != d):
        raise AdapterError(f"{where}: the subspace vector has shape {tuple(z.shape)} but adapter.json says d = {d}; "
                           "the file is corrupt or mixes two adapters")
    for key in ("offset", "total", "projection"):
        if key not in options:
            raise AdapterError(f"{where}: target {name} has no '{key}' in target_options; re-save the adapter with this graftkit")


def _saved_shapes(adapter, name: str, kind: str, base_shape: tuple, feedforward: bool = False) -> dict[str, tuple]:
    key = f"{name}.{SLOT}"
    return {key: (int((adapter.meta.get("config") or {}).get("d", 0)),)} if key in adapter.tensors else {}


#: the last projected vector a merge computed (a merge asks per target; P z is the same for all)
_MERGE_CACHE: dict[str, Any] = {}


def _merge_deltas(t: SavedTarget) -> dict[str, MergeDelta]:
    z = _saved_z(t.tensors, t.where)
    o = t.options
    offset, total, kind = int(o["offset"]), int(o["total"]), str(o["projection"])
    n = math.prod(t.base_shape)
    if offset + n > total:
        raise AdapterError(f"{t.where}: target {t.name} {t.base_shape} does not fit the subspace adapter's layout "
                           f"(offset {offset} + {n} values > {total}); it was made for another model")
    seed, d = int(t.config.get("seed", 0)), int(t.config.get("d", z.shape[0]))
    key = f"{t.where}|{kind}|{total}|{d}|{seed}"

    def fn(w: torch.Tensor, _n=n, _shape=tuple(t.base_shape)) -> torch.Tensor:
        if _MERGE_CACHE.get("key") != key or _MERGE_CACHE.get("z") is not z:
            with torch.no_grad():
                _MERGE_CACHE.update(key=key, z=z, v=Projection(kind, total, d, seed)(z.float()))
        return _MERGE_CACHE["v"][offset: offset + _n].reshape(_shape).clone()

    return {t.name: MergeDelta(layer_kind_of(t), fn)}


def layer_kind_of(t: SavedTarget) -> str:
    return t.kind or "param"


class SubspaceTraining(MethodTraining):
    """Freezes a classification head (``head: freeze``) and reports d, D and the projection."""

    def __init__(self, config: SubspaceConfig):
        self.config = config

    def start(self, model, forward, batches, total_steps) -> None:
        if self.config.head == "freeze":
            from ..adapter import get_state, sites

            heads = set(get_state(model).train_also)
            for name, site in sites(model).items():
                if name in heads:
                    site.base.requires_grad_(False)

    def report(self, model) -> dict[str, Any]:
        from ..adapter import sites

        keeper = next((s for s in sites(model).values() if isinstance(s, SubspaceSite) and s.slots), None)
        if keeper is None:
            return {}
        return {"d": keeper.projection.d, "D": keeper.total, "projection": keeper.projection.kind, "head": self.config.head}


@METHODS.register("subspace")
class Subspace(TuningMethod):
    name = "subspace"
    config_cls = SubspaceConfig
    kinds = ("any",)
    merge_deltas = staticmethod(_merge_deltas)
    check_saved = staticmethod(_check_saved)
    saved_shapes = staticmethod(_saved_shapes)

    @classmethod
    def eligible(cls, info: ParamInfo) -> bool:
        return info.param is not None and info.param.is_floating_point()

    @classmethod
    def resolve(cls, model, config: SubspaceConfig, skip=()):
        infos, _ = super().resolve(model, config, skip)
        total = sum(i.param.numel() for i in infos)
        if config.d > total:
            raise ConfigError(f"subspace d = {config.d} is larger than the {total:,} parameters it would project onto; "
                              f"choose d <= {total} (or select more targets)")
        kind = choose_projection(config.projection, total, config.d)
        options, offset = {}, 0
        for i in infos:
            options[i.name] = {"offset": offset, "total": total, "projection": kind}
            offset += i.param.numel()
        return infos, options

    @classmethod
    def make_sites(cls, infos: list, config: SubspaceConfig, options: dict[str, dict[str, Any]]) -> list[Site]:
        if not infos:
            return []
        sites = []
        for info in infos:
            o = options.get(info.name) or {}
            if not {"offset", "total", "projection"} <= set(o):
                raise AdapterError(f"subspace target {info.name} has no offset/total/projection options; re-save the adapter with this graftkit")
            site = SubspaceSite(info, layer_kind(info.module, info.pname), int(o["offset"]), int(o["total"]))
            if site.offset + site.numel > site.total:
                raise AdapterError(f"subspace target {info.name} ({site.numel} values at offset {site.offset}) lies outside the "
                                   f"adapter's {site.total} values; it was made for another model")
            sites.append(site)
        total = sites[0].total
        if config.d > total:
            raise ConfigError(f"subspace d = {config.d} is larger than the {total:,} parameters it would project onto; choose d <= {total}")
        # the pieces of P z in order: they must tile 0..D exactly (a saved layout is checked here)
        order = sorted(range(len(sites)), key=lambda i: sites[i].offset)
        end = 0
        for rank, i in enumerate(order):
            if sites[i].offset != end:
                raise AdapterError(f"subspace target {infos[i].name} starts at offset {sites[i].offset}, expected {end}: the "
                                   "targets do not tile the projected vector; the adapter was made for another model")
            sites[i].index = rank
            end += sites[i].numel
        if end != total:
            raise AdapterError(f"the subspace targets hold {end} values but the adapter projects onto {total}; it was made for another model")
        sites[0].make_keeper(config, str(options[infos[0].name]["projection"]))
        sites[0].sizes = [sites[i].numel for i in order]
        for s in sites[1:]:
            s.share(sites[0])
        return sites

    @classmethod
    def training(cls, config: Any) -> MethodTraining | None:
        from ..config import parse_config

        return SubspaceTraining(config if isinstance(config, SubspaceConfig) else parse_config(SubspaceConfig, dict(config)))
