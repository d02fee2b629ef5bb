"""VeRA: one pair of frozen random matrices for the whole model, and two trained vectors per layer.

Kopiczko et al., 2024 ("VeRA: Vector-based Random Matrix Adaptation", ICLR 2024, arXiv:2310.11454)
freeze a random pair ``A`` (r x in_max) and ``B`` (out_max x r), shared by EVERY adapted layer, and
train only two scaling vectors per layer, ``lambda_d`` (r) and ``lambda_b`` (out)::

    delta_W = diag(lambda_b) B[:out] diag(lambda_d) A[:, :in]        (canonical (out, in) view)
    y = W x + lambda_b * (B[:out] (lambda_d * (A[:, :in] dropout(x))))

so an adapted layer costs ``out + r`` numbers (LoRA: ``r (out + in)``). ``A`` and ``B`` are sized to
the largest adapted layer and each layer reads its top-left slice (as peft does); both are drawn
with Kaiming-uniform bounds from a generator seeded with ``projection_prng_key`` (``A`` first, then
``B``: peft's draw, so the same key gives peft's matrices). ``lambda_b`` starts at zero (the identity)
and ``lambda_d`` at ``d_initial`` (0.1, the paper's Table 6c); ``init_weights: false`` starts from
``lambda_b = 1`` and ``lambda_d ~ N(0, 1)`` (peft's meaning; for tests).

Saving: the pair is saved ONCE, under the first target (``<first target>.vera_A`` / ``.vera_B``), when
``save_projection`` is true (the default, as in peft); otherwise it is regenerated from the key and the
projection's size, which every target's options record (``projection: [out_max, in_max]``), so a
merge without the model regenerates it too. peft's ``VERA`` folders convert both ways (peft keeps the
pair as ``base_model.vera_A`` / ``base_model.vera_B``); peft's ``bias`` other than "none" and any
option this graftkit does not know are refused by name.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..errors import AdapterError, FileFormatError, UnsupportedError
from ..layers import matrix_shape
from ..registry import METHODS
from ..targets import ParamInfo
from .base import MethodConfig, PeftConverter, SavedTarget, layer_kind
from .weight_delta import WeightDeltaMethod, WeightDeltaSite

LAMBDA_B, LAMBDA_D, SHARED_A, SHARED_B = "vera_lambda_b", "vera_lambda_d", "vera_A", "vera_B"
#: peft's keys of the shared pair (one level above the wrapped model: not under base_model.model.)
PEFT_A, PEFT_B = "base_model.vera_A", "base_model.vera_B"


class VeRAConfig(MethodConfig):
    r: int = Field(256, ge=1)
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    d_initial: float = 0.1
    init_weights: bool = True


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    # gain sqrt(2) over fan_in = shape[1]: torch's kaiming_uniform_ with a=0, drawn from the generator
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


@lru_cache(maxsize=8)
def _projection(r: int, out_max: int, in_max: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(key)
    a = _kaiming_uniform((r, in_max), g)
    return a, _kaiming_uniform((out_max, r), g)


def projection(r: int, out_max: int, in_max: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared pair ``(A (r, in_max), B (out_max, r))`` of ``projection_prng_key`` ``key`` (float32, CPU, fresh copies)."""
    a, b = _projection(int(r), int(out_max), int(in_max), int(key))
    return a.clone(), b.clone()


def vera_formula(kind: str, weight: torch.Tensor, slots: Mapping[str, torch.Tensor], settings: Mapping[str, Any]) -> torch.Tensor:
    """``diag(lambda_b) B[:out] diag(lambda_d) A[:, :in]``, (out, in) float32."""
    out_f, in_f = matrix_shape(kind, weight.shape)
    lb, ld = slots[LAMBDA_B].float(), slots[LAMBDA_D].float()
    a = slots[SHARED_A][:, :in_f].to(lb.device).float()
    b = slots[SHARED_B][:out_f].to(lb.device).float()
    return (lb[:, None] * b) @ (ld[:, None] * a)


class VeRASite(WeightDeltaSite):
    """One adapted weight. The first site of an injection (the keeper) holds the shared pair as
    buffers (frozen: never trained) and, with ``save_projection``, saves it as two more slots; the
    other sites read the keeper's."""

    slots = (LAMBDA_B, LAMBDA_D)
    #: slots that are saved but never trained (the shared random pair)
    frozen_slots = (SHARED_A, SHARED_B)
    formula = staticmethod(vera_formula)

    def __init__(self, info: ParamInfo, kind: str, settings: Mapping[str, Any]):
        super().__init__(info, kind, settings)
        r, device = int(self.settings["r"]), info.param.device
        if self.settings.get("init_weights", True):
            lb = torch.zeros(self.out_features, dtype=self.dtype, device=device)
            ld = torch.full((r,), float(self.settings.get("d_initial", 0.1)), dtype=self.dtype, device=device)
        else:  # peft's init_weights=False: not the identity
            lb = torch.ones(self.out_features, dtype=self.dtype, device=device)
            ld = torch.randn(r, dtype=self.dtype).to(device)
        self.vera_lambda_b = nn.Parameter(lb)
        self.vera_lambda_d = nn.Parameter(ld)
        p = float(self.settings.get("vera_dropout", 0.0))
        self.dropout = nn.Dropout(p) if p > 0 else nn.Identity()
        object.__setattr__(self, "keeper", self)

    def hold_projection(self, a: torch.Tensor, b: torch.Tensor, save: bool) -> None:
        """Make this site the keeper of the shared pair (saved as slots when ``save``)."""
        device = self.vera_lambda_b.device
        # buffers, not parameters: nothing trains them; not in the state dict (the adapter file saves them)
        self.register_buffer(SHARED_A, a.to(device), persistent=False)
        self.register_buffer(SHARED_B, b.to(device), persistent=False)
        self.slots = (LAMBDA_B, LAMBDA_D, SHARED_A, SHARED_B) if save else (LAMBDA_B, LAMBDA_D)
        object.__setattr__(self, "keeper", self)

    def share(self, keeper: "VeRASite") -> None:
        object.__setattr__(self, "keeper", keeper)

    def shared(self) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self.keeper, SHARED_A), getattr(self.keeper, SHARED_B)

    def delta_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        a, b = self.shared()
        slots = {LAMBDA_B: self.vera_lambda_b, LAMBDA_D: self.vera_lambda_d, SHARED_A: a, SHARED_B: b}
        return vera_formula(self.kind, weight, slots, self.settings)

    def factored_output(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.shared()
        a, b = a[:, : self.in_features].to(self.dtype), b[: self.out_features].to(self.dtype)
        h = F.linear(self.dropout(x.to(self.dtype)), a) * self.vera_lambda_d
        return F.linear(h, b) * self.vera_lambda_b


def _projection_size(infos: list[ParamInfo]) -> tuple[int, int]:
    """peft's rule: the largest out and the largest in over every adapted layer."""
    shapes = [matrix_shape(layer_kind(i.module, i.pname), i.param.shape) for i in infos]
    return max(s[0] for s in shapes), max(s[1] for s in shapes)


def _shared_saved(tensors: Mapping[str, torch.Tensor]) -> tuple[str | None, str | None]:
    a = next((k for k in tensors if k.endswith(f".{SHARED_A}")), None)
    b = next((k for k in tensors if k.endswith(f".{SHARED_B}")), None)
    return a, b


def _check_saved(adapter, name: str, options: dict, where: str) -> None:
    from ..validate import saved_tensor

    config = adapter.meta.get("config") or {}
    lb = saved_tensor(adapter, f"{name}.{LAMBDA_B}", where)
    ld = saved_tensor(adapter, f"{name}.{LAMBDA_D}", where)
    for key, t in ((f"{name}.{LAMBDA_B}", lb), (f"{name}.{LAMBDA_D}", ld)):
        if t.dim() != 1:
            raise AdapterError(f"{where}: adapter tensor {key} has shape {tuple(t.shape)}; VeRA's scaling vectors are 1-D - the file is corrupt")
    r = config.get("r")
    if r is not None and ld.shape[0] != r:
        raise AdapterError(f"{where}: adapter.json says r={r!r} but {name}.{LAMBDA_D} holds {ld.shape[0]} values; "
                           "the file is corrupt or mixes two adapters")
    a_key, b_key = _shared_saved(adapter.tensors)
    if config.get("save_projection", True) and (a_key is None or b_key is None):
        raise AdapterError(f"{where}: the adapter saves its projections (save_projection: true) but has no *.{SHARED_A if a_key is None else SHARED_B}; "
                           "it is incomplete - re-save it")
    if a_key is not None and b_key is not None:
        a, b = adapter.tensors[a_key], adapter.tensors[b_key]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != ld.shape[0] or b.shape[1] != ld.shape[0]:
            raise AdapterError(f"{where}: the shared {a_key} {tuple(a.shape)} and {b_key} {tuple(b.shape)} do not have rank "
                               f"r={ld.shape[0]} ((r, in) and (out, r)); the file is corrupt or mixes two adapters")


def _saved_shapes(adapter, name: str, kind: str, base_shape: tuple, feedforward: bool = False) -> dict[str, tuple]:
    out_f, in_f = matrix_shape(kind, base_shape)
    r = adapter.tensors[f"{name}.{LAMBDA_D}"].shape[0]
    want = {f"{name}.{LAMBDA_B}": (out_f,), f"{name}.{LAMBDA_D}": (r,)}
    a_key, b_key = _shared_saved(adapter.tensors)
    if a_key is not None and b_key is not None:
        a, b = adapter.tensors[a_key], adapter.tensors[b_key]
        if a.shape[1] < in_f or b.shape[0] < out_f:
            raise AdapterError(f"the shared projections {a_key} {tuple(a.shape)} and {b_key} {tuple(b.shape)} are too small for the "
                               f"base weight {name} {tuple(base_shape)} ({out_f} outputs, {in_f} inputs); the adapter was made for another base model")
        if a_key.startswith(f"{name}."):
            want[a_key], want[b_key] = tuple(a.shape), tuple(b.shape)
    return want


PEFT_COMMON = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
               "inference_mode", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
               "modules_to_save", "fan_in_fan_out"}
VERA_KEYS = {"r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial", "init_weights", "bias"}


def _peft_read(cfg: dict, raw: dict, path: Path):
    from ..io.native import AdapterFile
    from ..io.peft import CONFIG_NAME, WEIGHTS_NAME, _common_config, _heads, _meta, _number

    bias = cfg.get("bias", "none")
    if bias not in ("none", None):
        raise UnsupportedError(f"this peft VERA adapter uses bias={bias!r} (it trains biases too), which graftkit does not support; "
                               "supported: bias='none'")
    for key in sorted(cfg):
        if key not in PEFT_COMMON | VERA_KEYS and cfg[key] not in (None, False, {}, [], "none"):
            raise UnsupportedError(f"this peft VERA adapter uses {key}={cfg[key]!r}, which graftkit does not support; "
                                   f"supported options: {', '.join(sorted(VERA_KEYS))}")
    r = _number(cfg, "r", 256, path, integer=True, low=1)
    dropout = _number(cfg, "vera_dropout", 0.0, path, low=0, high=1)
    d_initial = _number(cfg, "d_initial", 0.1, path)
    key = cfg.get("projection_prng_key", 0)
    if not isinstance(key, int) or isinstance(key, bool):
        raise FileFormatError(f"{path / CONFIG_NAME}: projection_prng_key is {key!r}; it must be an integer (it draws the projections) - fix the file")
    save = cfg.get("save_projection", True)
    if not isinstance(save, bool):
        raise FileFormatError(f"{path / CONFIG_NAME}: save_projection is {save!r}; it must be true or false - fix the file")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    used = set()
    for k, v in raw.items():
        module, _, slot = k.rpartition(".")
        if slot in (LAMBDA_B, LAMBDA_D) and module:
            modules.setdefault(module, {})[slot] = v
            used.add(k)
    if not modules:
        raise FileFormatError(f"{path / WEIGHTS_NAME} holds no VeRA tensors")
    pair = {s: next((raw[k] for k in (p, p.split(".", 1)[1]) if k in raw), None) for s, p in ((SHARED_A, PEFT_A), (SHARED_B, PEFT_B))}
    used |= {PEFT_A, PEFT_B, SHARED_A, SHARED_B}
    if save and (pair[SHARED_A] is None or pair[SHARED_B] is None):
        raise FileFormatError(f"{path / WEIGHTS_NAME} has no {PEFT_A if pair[SHARED_A] is None else PEFT_B} although adapter_config.json says "
                              "save_projection: true; the file is incomplete - save it again")
    heads, tensors = _heads(raw, used)
    targets, kinds = [], {}
    for module, slots in sorted(modules.items()):
        lb, ld = slots.get(LAMBDA_B), slots.get(LAMBDA_D)
        if lb is None or ld is None:
            raise FileFormatError(f"{path / WEIGHTS_NAME}: module {module} lacks {LAMBDA_B if lb is None else LAMBDA_D}")
        if ld.dim() != 1 or ld.shape[0] != r or lb.dim() != 1:
            raise FileFormatError(f"{path / WEIGHTS_NAME}: {module} has {LAMBDA_D} {tuple(ld.shape)} and {LAMBDA_B} {tuple(lb.shape)}, but "
                                  f"adapter_config.json gives r={r}; the file is corrupt or mixes two adapters")
        name = f"{module}.weight"
        targets.append(name)
        kinds[name] = "conv1d" if cfg.get("fan_in_fan_out") else "linear"
        tensors[f"{name}.{LAMBDA_B}"], tensors[f"{name}.{LAMBDA_D}"] = lb.contiguous(), ld.contiguous()
    options: dict[str, dict] = {name: {} for name in targets}
    if save:  # (without it peft regenerates the pair from the key and ignores a saved one; so does graftkit)
        a, b = pair[SHARED_A], pair[SHARED_B]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise FileFormatError(f"{path / WEIGHTS_NAME}: {PEFT_A} {tuple(a.shape)} and {PEFT_B} {tuple(b.shape)} do not have rank r={r}; "
                                  "the file is corrupt or mixes two adapters")
        tensors[f"{targets[0]}.{SHARED_A}"], tensors[f"{targets[0]}.{SHARED_B}"] = a.contiguous(), b.contiguous()
        options = {name: {"projection": [int(b.shape[0]), int(a.shape[1])]} for name in targets}
    config = {**_common_config(cfg, heads), "r": r, "projection_prng_key": key, "save_projection": save,
              "vera_dropout": dropout, "d_initial": d_initial, "init_weights": True}
    meta = _meta("vera", config, targets, options, heads, cfg, path)
    meta["target_kinds"] = kinds
    return AdapterFile(meta, tensors)


def _peft_write_site(site: VeRASite, key: str, tensors: dict, acc: dict) -> None:
    tensors[f"{key}.{LAMBDA_B}"] = site.vera_lambda_b.detach().cpu()
    tensors[f"{key}.{LAMBDA_D}"] = site.vera_lambda_d.detach().cpu()
    if site.keeper is site and bool(site.settings.get("save_projection", True)):
        a, b = site.shared()
        tensors[PEFT_A], tensors[PEFT_B] = a.detach().float().cpu(), b.detach().float().cpu()


def _peft_write_config(state, acc: dict) -> dict:
    c = state.config
    return {"r": c.r, "projection_prng_key": c.projection_prng_key, "save_projection": c.save_projection,
            "vera_dropout": c.vera_dropout, "d_initial": c.d_initial, "bias": "none", "init_weights": True}


@METHODS.register("vera")
class VeRA(WeightDeltaMethod):
    name = "vera"
    config_cls = VeRAConfig
    site_cls = VeRASite
    kinds = ("linear", "conv1d")
    shared_slots = (SHARED_A, SHARED_B)
    check_saved = staticmethod(_check_saved)
    saved_shapes = staticmethod(_saved_shapes)
    peft = PeftConverter("VERA", _peft_read, _peft_write_site, _peft_write_config)

    @classmethod
    def identity_for(cls, config: Any) -> bool:
        data = config.model_dump() if isinstance(config, MethodConfig) else dict(config)
        return bool(data.get("init_weights", True))

    @classmethod
    def make_sites(cls, infos: list, config: VeRAConfig, options: dict[str, dict[str, Any]]) -> list:
        if not infos:
            return []
        size = _projection_size(infos)
        for info in infos:
            # a fact of the whole target set, kept with each target (adapter.json) so that a merge without
            # the model can regenerate the pair when it is not saved
            opts = options.setdefault(info.name, {})
            saved = opts.get("projection")
            if saved is not None and (not isinstance(saved, (list, tuple)) or tuple(saved) != size):
                raise AdapterError(f"{info.name}: the adapter's projections are {list(saved)!r} (largest out, in) but its targets on this "
                                   f"model need {list(size)}; it was made for another base model")
            opts["projection"] = list(size)
        sites = [cls.make_site(info, config, options[info.name]) for info in infos]
        a, b = projection(config.r, size[0], size[1], config.projection_prng_key)
        sites[0].hold_projection(a, b, config.save_projection)
        for site in sites[1:]:
            site.share(sites[0])
        return sites

    @classmethod
    def saved_slots(cls, t: SavedTarget) -> dict[str, torch.Tensor]:
        slots = dict(t.slots)
        a_key, b_key = _shared_saved(t.tensors)
        if a_key is not None and b_key is not None:
            slots[SHARED_A], slots[SHARED_B] = t.tensors[a_key], t.tensors[b_key]
            return slots
        size = t.options.get("projection")
        if not size:
            raise UnsupportedError(f"{t.where}: this VeRA adapter was saved without its projections (save_projection: false) and without "
                                   "their size; load it into its base model (gk.load_adapter) and save it again, then merge that")
        slots[SHARED_A], slots[SHARED_B] = projection(int(t.config.get("r", slots[LAMBDA_D].shape[0])), size[0], size[1],
                                                      int(t.config.get("projection_prng_key", 0)))
        return slots
