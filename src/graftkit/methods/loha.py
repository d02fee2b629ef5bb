"""LoHa: a low-rank Hadamard product as the weight delta.

FedPara (Hyeon-Woo et al., 2022, "FedPara: Low-Rank Hadamard Product for Communication-Efficient
Federated Learning", ICLR 2022) writes a weight as the elementwise (Hadamard) product of two
low-rank matrices; LyCORIS (Yeh et al., 2024, "Navigating Text-To-Image Customization: From LyCORIS
Fine-Tuning to Model Evaluation", ICLR 2024) uses it as a fine-tuning delta, as peft's ``LOHA`` does::

    delta_W = (alpha / r) * (W1a W1b) ⊙ (W2a W2b)        W1a, W2a: (out, r)   W1b, W2b: (r, in)

in the canonical (out, in) view of :mod:`graftkit.layers` (a Conv2d kernel flattened to
(out, in/groups * kh * kw)). The product of two rank-r matrices has rank up to r², so LoHa reaches a
higher rank than a LoRA with the same number of parameters (2r(out + in) here). ``W2b`` starts at
zero, so training starts from the base model.

With ``use_effective_conv2d`` a Conv2d with a kernel larger than 1x1 uses FedPara's "Proposition 3"
(a CP/Tucker form) for each factor: ``T`` (r, r, kh, kw), ``Wa`` (r, out), ``Wb`` (r, in/groups)::

    rebuild(T, Wa, Wb)[o, i, y, x] = sum_{p,q} T[p, q, y, x] Wa[p, o] Wb[q, i]
    delta_W = (alpha / r) * rebuild(T1, W1a, W1b) ⊙ rebuild(T2, W2a, W2b)

During training (only), ``module_dropout`` skips the whole delta of a layer for a forward with that
probability, and ``rank_dropout`` zeroes output rows of the delta, rescaling the kept ones by
1/(kept fraction), as peft does; both do nothing at evaluation, so parity with peft holds there.

Tensors, shapes and names are peft's (``hada_w1_a`` ...), so the peft converter (:data:`LoHa.peft`)
only renames keys. Layers: Linear, Conv2d (also in peft), and transformers' GPT-2 ``Conv1D`` (graftkit
only: peft's LoHa has no Conv1D, so such an adapter is saved natively, not exported to peft).
Shared with :mod:`graftkit.methods.lokr`: the config keys, the dropouts and the peft folder plumbing.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from ..errors import AdapterError, FileFormatError, UnsupportedError
from ..layers import matrix_shape
from ..registry import METHODS
from ..targets import ParamInfo
from .base import MethodConfig, PeftConverter, SavedTarget, first_input
from .lora import pattern_value
from .weight_delta import WeightDeltaMethod, WeightDeltaSite


def bad_pattern_key(patterns: Mapping[str, Any]) -> str | None:
    """Why a key of a per-module pattern map (a regular expression) is unusable, or None."""
    for key in patterns:
        try:
            re.compile(key)
        except re.error as exc:
            return f"key {key!r} is not a valid regular expression ({exc})"
    return None


class LycorisConfig(MethodConfig):
    """The keys peft's LoHaConfig and LoKrConfig share (same names and defaults)."""

    r: int = Field(8, ge=1)
    alpha: float = Field(8.0, gt=0)
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    use_effective_conv2d: bool = False
    init_weights: bool = True
    # per-module rank / alpha, keyed by a regex matched against the end of the module name (peft's rule)
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _regex_keys(cls, value):
        bad = bad_pattern_key(value)
        if bad:
            raise ValueError(f"{bad}; fix it")
        return value


class LoHaConfig(LycorisConfig):
    pass


def kernel(kind: str, shape) -> tuple[int, ...]:
    """A Conv2d's (kh, kw); () for a matrix."""
    return tuple(shape[2:]) if kind == "conv2d" else ()


def effective_conv(kind: str, shape, settings: Mapping[str, Any]) -> bool:
    # peft: a 1x1 kernel is a plain matrix, so the CP form is used only for larger kernels
    return bool(settings.get("use_effective_conv2d")) and kind == "conv2d" and kernel(kind, shape) != (1, 1)


def cp_rebuild(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """FedPara's Proposition 3: core ``t`` (r, r, kh, kw) with mode factors ``wa`` (r, out) and
    ``wb`` (r, in) -> a kernel (out, in, kh, kw)."""
    return torch.einsum("pqyx,po,qi->oiyx", t.float(), wa.float(), wb.float())


def scale(settings: Mapping[str, Any]) -> float:
    return float(settings["alpha"]) / int(settings["r"])


# -- LoHa's math ---------------------------------------------------------------------------------

def loha_shapes(kind: str, shape, settings: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The slots of one LoHa target on a base weight of stored ``shape`` (peft's shapes)."""
    r = int(settings["r"])
    out_f, in_f = matrix_shape(kind, shape)
    if effective_conv(kind, shape, settings):
        k = kernel(kind, shape)
        return {"hada_w1_a": (r, out_f), "hada_w1_b": (r, shape[1]), "hada_t1": (r, r, *k),
                "hada_w2_a": (r, out_f), "hada_w2_b": (r, shape[1]), "hada_t2": (r, r, *k)}
    return {"hada_w1_a": (out_f, r), "hada_w1_b": (r, in_f), "hada_w2_a": (out_f, r), "hada_w2_b": (r, in_f)}


def loha_formula(kind: str, weight: torch.Tensor, slots: Mapping[str, torch.Tensor], settings: Mapping[str, Any]) -> torch.Tensor:
    """``(alpha / r) * (W1a W1b) ⊙ (W2a W2b)`` (or the CP form of each factor), (out, in) float32."""
    s = slots
    if "hada_t1" in s:
        one = cp_rebuild(s["hada_t1"], s["hada_w1_a"], s["hada_w1_b"])
        two = cp_rebuild(s["hada_t2"], s["hada_w2_a"], s["hada_w2_b"])
        return (one * two * scale(settings)).flatten(1)
    one = s["hada_w1_a"].float() @ s["hada_w1_b"].float()
    two = s["hada_w2_a"].float() @ s["hada_w2_b"].float()
    return (one * two) * scale(settings)


# -- the live site shared with LoKr ----------------------------------------------------------------

class LycorisSite(WeightDeltaSite):
    """A LoHa/LoKr site: slots from the method's ``shapes`` function, peft's initialisations, and
    peft's module and rank dropout while training."""

    #: ``shapes(kind, stored shape, settings) -> {slot: shape}``
    shapes: ClassVar[Callable[[str, Any, Mapping[str, Any]], dict[str, tuple[int, ...]]]]

    def __init__(self, info: ParamInfo, kind: str, settings: Mapping[str, Any]):
        super().__init__(info, kind, settings)
        weight = info.param
        if kind == "conv2d" and len(weight.shape) != 4:
            raise UnsupportedError(f"{info.name}: a Conv2d weight must be 4-D, this one is {tuple(weight.shape)}")
        shapes = type(self).shapes(kind, weight.shape, self.settings)
        self.slots = tuple(shapes)
        for slot, shape in shapes.items():
            setattr(self, slot, nn.Parameter(torch.empty(shape, dtype=self.dtype, device=weight.device)))
        self.rank_dropout = float(self.settings.get("rank_dropout") or 0.0)
        self.module_dropout = float(self.settings.get("module_dropout") or 0.0)
        with torch.no_grad():
            self.init_slots(self.settings.get("init_weights", True))

    def init_slots(self, init) -> None:
        raise NotImplementedError

    @staticmethod
    def kaiming(t: torch.Tensor) -> None:
        nn.init.kaiming_uniform_(t, a=math.sqrt(5))

    # -- training-time dropouts (no effect in eval mode) ----------------------------------------
    def row_keep(self, rows: int, device) -> torch.Tensor:
        """peft's rank dropout: keep each output row with probability 1 - rank_dropout."""
        keep = (torch.rand(rows) > self.rank_dropout).float()
        return (keep / keep.mean().clamp_min(1e-12)).to(device)  # rescaled to mean one (LoHa's rule)

    def _hook(self, module, args, kwargs, output):
        if not self.enabled or self.merged:
            return None
        # the owner's mode, not the site's: a site added to a model in eval mode is itself in train mode
        training = self.owner.training
        if training and self.module_dropout and torch.rand(1).item() <= self.module_dropout:
            return None  # this layer's delta is skipped for this forward
        if not (training and self.rank_dropout):
            return super()._hook(module, args, kwargs, output)
        x = first_input(args, kwargs)
        d = self.delta_matrix(self.base)
        d = d * self.row_keep(d.shape[0], d.device)[:, None]
        m = self.owner
        if self.kind == "conv2d":
            k = d.reshape(self.base.shape)
            extra = F.conv2d(x.to(k.dtype), k, None, m.stride, m.padding, m.dilation, m.groups)
        else:
            extra = F.linear(x.to(d.dtype), d)
        return output + extra.to(output.dtype)


class LoHaSite(LycorisSite):
    formula = staticmethod(loha_formula)
    shapes = staticmethod(loha_shapes)

    def factored_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """``delta x`` through rank-r² factors, without the dense (out, in) delta: the Hadamard product of
        two rank-r products is the product of their row-wise Khatri-Rao factors,
        ``(W1a W1b) ⊙ (W2a W2b) = (W1a ⊙r W2a)(W1b ⊙c W2b)`` with ``(W1a ⊙r W2a)[o, p r + q] = W1a[o, p] W2a[o, q]``.
        Used for matrices when it costs fewer multiplications than forming the delta: r² (in + out) < in out,
        roughly (r = 8 on a 384-wide layer), or a batch of few tokens."""
        if self.kind not in ("linear", "conv1d") or "hada_t1" in self.slots:
            return None
        r, out_f, in_f = self.hada_w1_b.shape[0], self.out_features, self.in_features
        tokens = x.numel() // in_f
        if tokens * r * r * (in_f + out_f) >= out_f * in_f * (tokens + 2 * r):
            return None
        ka = (self.hada_w1_a.float()[:, :, None] * self.hada_w2_a.float()[:, None, :]).reshape(out_f, r * r)
        kb = (self.hada_w1_b.float()[:, None, :] * self.hada_w2_b.float()[None, :, :]).reshape(r * r, in_f)
        return F.linear(F.linear(x.float(), kb), ka) * scale(self.settings)

    def init_slots(self, init) -> None:
        # peft's (FedPara's He) init: every factor random but W2b, which starts at zero (identity at init);
        # init_weights=False leaves W2b random too (a non-identity start, for tests)
        for slot in self.slots:
            self.kaiming(getattr(self, slot))
        if init:
            nn.init.zeros_(self.hada_w2_b)


# -- the method class shared with LoKr --------------------------------------------------------------

class LycorisMethod(WeightDeltaMethod):
    kinds = ("linear", "conv1d", "conv2d")
    #: ``shapes`` of the site class, for checking saved files
    site_cls: ClassVar[type[LycorisSite]]

    @classmethod
    def site_options(cls, config: LycorisConfig, info: ParamInfo) -> dict[str, Any]:
        return {"r": int(pattern_value(config.rank_pattern, info.module_name, config.r)),
                "alpha": float(pattern_value(config.alpha_pattern, info.module_name, config.alpha))}

    @classmethod
    def _merge_deltas(cls, t: SavedTarget):
        if not t.kind:
            # a peft folder does not say; peft adapts only Linear (2-D) and Conv2d (4-D) weights
            from dataclasses import replace

            t = replace(t, kind="conv2d" if len(t.base_shape) == 4 else "linear")
        return super()._merge_deltas(t)


def check_saved_slots(method, adapter, name: str, options: dict, where: str) -> None:
    """The slots saved for ``name`` are one complete layout of the method, with the rank of adapter.json."""
    prefix = f"{name}."
    have = {k[len(prefix):] for k in adapter.tensors if k.startswith(prefix) and "." not in k[len(prefix):]}
    layouts = method.layouts
    if not any(set(layout) <= have for layout in layouts):
        want = " or ".join("+".join(layout) for layout in layouts)
        raise AdapterError(f"{where}: the adapter has tensors {sorted(have) or 'none'} for {name}, but a {method.name} target needs "
                           f"{want}; the file is incomplete or corrupt - re-save it")
    r = options.get("r")
    for slot in have:
        t = adapter.tensors[prefix + slot]
        if t.dim() < 2:
            raise AdapterError(f"{where}: adapter tensor {prefix}{slot} has shape {tuple(t.shape)}; {method.name} factors are at least 2-D "
                               "- the file is corrupt")
    if r is not None:
        for slot, axis in method.rank_axes.items():
            t = adapter.tensors.get(prefix + slot)
            if t is not None and t.shape[axis] != r:
                raise AdapterError(f"{where}: adapter.json says r={r!r} for {name} but {prefix}{slot} has shape {tuple(t.shape)} "
                                   f"(rank {t.shape[axis]}); the file is corrupt or mixes two adapters")


def saved_slot_shapes(method, adapter, name: str, kind: str, base_shape: tuple) -> dict[str, tuple]:
    settings = method.settings(adapter.meta.get("config") or {}, (adapter.meta.get("target_options") or {}).get(name) or {})
    if "r" not in settings:
        return {}
    return {f"{name}.{slot}": tuple(shape) for slot, shape in method.site_cls.shapes(kind, base_shape, settings).items()}


# -- peft's folders (shared with LoKr) -----------------------------------------------------------------

@dataclass(frozen=True)
class LycorisConverter(PeftConverter):
    #: peft's LoHaConfig and LoKrConfig have no fan_in_fan_out key (peft warns on one)
    fan_in_fan_out: bool = False


#: adapter_config.json keys of every peft config that say nothing about the delta
PEFT_COMMON = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
               "inference_mode", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
               "modules_to_save", "fan_in_fan_out"}
LYCORIS_KEYS = {"r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "init_weights", "rank_pattern", "alpha_pattern"}


def refuse_unknown(cfg: dict, known: set[str], peft_type: str) -> None:
    """A key of adapter_config.json this graftkit does not know changes the method (a newer peft's variant):
    refuse it by name rather than load something else."""
    for key in sorted(cfg):
        value = cfg[key]
        if key not in known and value not in (None, False, {}, [], "none"):
            raise UnsupportedError(f"this peft {peft_type} adapter uses {key}={value!r}, which graftkit does not support; "
                                   f"supported options: {', '.join(sorted(known - PEFT_COMMON))}")


def collect_modules(raw: dict, slots: tuple[str, ...], path: Path, what: str) -> tuple[dict[str, dict[str, torch.Tensor]], set[str]]:
    """peft's ``<module>.<slot>`` keys grouped by module, and the keys used."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    known: set[str] = set()
    for key, value in raw.items():
        module, _, slot = key.rpartition(".")
        if slot in slots and module:
            modules.setdefault(module, {})[slot] = value
            known.add(key)
    if not modules:
        from ..io.peft import WEIGHTS_NAME

        raise FileFormatError(f"{path / WEIGHTS_NAME} holds no {what} tensors")
    return modules, known


def lycoris_from_peft(method, cfg: dict, raw: dict, path: Path, extra_keys: set[str], config_extra: dict) -> Any:
    """A peft LoHa/LoKr folder as graftkit's AdapterFile (the tensors keep their names and shapes)."""
    from ..io.native import AdapterFile
    from ..io.peft import WEIGHTS_NAME, _common_config, _heads, _meta, _number

    peft_type = method.peft.peft_type
    refuse_unknown(cfg, PEFT_COMMON | LYCORIS_KEYS | extra_keys, peft_type)
    all_slots = tuple(sorted({s for layout in method.layouts for s in layout}))
    modules, used = collect_modules(raw, all_slots, path, peft_type)
    heads, tensors = _heads(raw, used)
    r0 = _number(cfg, "r", 8, path, integer=True, low=1)
    alpha0 = _number(cfg, "alpha", 8, path)
    for key in ("rank_dropout", "module_dropout"):
        _number(cfg, key, 0.0, path, low=0, high=1)
    alphas = cfg.get("alpha_pattern") or {}
    if not isinstance(alphas, dict) or not isinstance(cfg.get("rank_pattern") or {}, dict):
        raise FileFormatError(f"{path / 'adapter_config.json'}: rank_pattern and alpha_pattern must map module patterns to numbers")
    for key in ("rank_pattern", "alpha_pattern"):
        bad = bad_pattern_key(cfg.get(key) or {})
        if bad:
            raise FileFormatError(f"{path / 'adapter_config.json'}: {key} {bad} - fix the file")
    targets, options, kinds = [], {}, {}
    for module, slots in sorted(modules.items()):
        if not any(set(layout) <= set(slots) for layout in method.layouts):
            raise FileFormatError(f"{path / WEIGHTS_NAME}: module {module} has {sorted(slots)}, not a complete {peft_type} layout - "
                                  "the file is corrupt")
        name = f"{module}.weight"
        targets.append(name)
        # peft builds each layer with the config's rank (r / rank_pattern), then loads the tensors into it
        r = int(pattern_value(cfg.get("rank_pattern") or {}, module, r0))
        found = method.rank_of(slots)
        if found is not None and found != r:
            raise FileFormatError(f"{path / WEIGHTS_NAME}: module {module} has rank-{found} factors but adapter_config.json gives it "
                                  f"r={r} (r / rank_pattern); the file is corrupt or mixes two adapters")
        options[name] = {"r": r, "alpha": float(pattern_value(alphas, module, alpha0))}
        if any(t.dim() == 4 for t in slots.values()):
            kinds[name] = "conv2d"  # (2-D factors alone could be a Linear or a flattened kernel: the base decides)
        for slot, t in slots.items():
            tensors[f"{name}.{slot}"] = t.contiguous()
    config = {**_common_config(cfg, heads), "r": r0, "alpha": alpha0,
              "rank_dropout": float(cfg.get("rank_dropout") or 0.0), "module_dropout": float(cfg.get("module_dropout") or 0.0),
              "use_effective_conv2d": bool(cfg.get("use_effective_conv2d")), "init_weights": True,
              "rank_pattern": cfg.get("rank_pattern") or {}, "alpha_pattern": alphas, **config_extra}
    meta = _meta(method.name, config, targets, options, heads, cfg, path)
    meta["target_kinds"] = kinds
    return AdapterFile(meta, tensors)


def lycoris_site_to_peft(site, key: str, tensors: dict, acc: dict) -> None:
    from ..io.peft import PREFIX

    if site.kind not in ("linear", "conv2d"):
        raise UnsupportedError(f"{key[len(PREFIX):]}: peft's {acc.get('_type', 'LoHa/LoKr')} adapts Linear and Conv2d layers only, not "
                               f"{site.kind} (GPT-2's Conv1D); save this adapter with format='native'")
    module = key[len(PREFIX):]
    acc.setdefault("ranks", {})[module] = int(site.settings["r"])
    acc.setdefault("alphas", {})[module] = float(site.settings["alpha"])
    for slot, t in site.slot_tensors().items():
        tensors[f"{key}.{slot}"] = t.detach().cpu()


def lycoris_peft_config(state, acc: dict) -> dict:
    from ..io.peft import _exact

    ranks, alphas = acc.get("ranks", {}), acc.get("alphas", {})
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    a0 = Counter(alphas.values()).most_common(1)[0][0]
    c = state.config
    return {"r": r0, "alpha": a0, "rank_dropout": c.rank_dropout, "module_dropout": c.module_dropout,
            "use_effective_conv2d": c.use_effective_conv2d, "init_weights": True,
            "rank_pattern": {_exact(m): r for m, r in ranks.items() if r != r0},
            "alpha_pattern": {_exact(m): a for m, a in alphas.items() if a != a0}}


def _peft_read(cfg, raw, path):
    return lycoris_from_peft(LoHa, cfg, raw, path, set(), {})


def _peft_write_site(site, key, tensors, acc):
    acc["_type"] = "LoHa"
    lycoris_site_to_peft(site, key, tensors, acc)


def _peft_write_config(state, acc):
    acc.pop("_type", None)
    return lycoris_peft_config(state, acc)


@METHODS.register("loha")
class LoHa(LycorisMethod):
    name = "loha"
    config_cls = LoHaConfig
    site_cls = LoHaSite
    peft = LycorisConverter("LOHA", _peft_read, _peft_write_site, _peft_write_config)
    #: the complete slot sets a target can have
    layouts: ClassVar[tuple[tuple[str, ...], ...]] = (
        ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
        ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    )
    #: the axis holding the rank, per slot (the CP layout puts it first in every factor; b's is always 0)
    rank_axes: ClassVar[dict[str, int]] = {"hada_w1_b": 0, "hada_w2_b": 0}

    @staticmethod
    def rank_of(slots: Mapping[str, torch.Tensor]) -> int:
        return int(slots["hada_w1_b"].shape[0])

    check_saved = staticmethod(lambda adapter, name, options, where: check_saved_slots(LoHa, adapter, name, options, where))
    saved_shapes = staticmethod(lambda adapter, name, kind, base_shape, feedforward=False:
                                saved_slot_shapes(LoHa, adapter, name, kind, base_shape))
