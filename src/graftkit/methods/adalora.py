"""AdaLoRA: an SVD-form weight delta whose rank budget is reallocated during training.

Zhang et al., 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning" (ICLR 2023)
parametrise a layer's update like a singular value decomposition::

    delta_W = P diag(E) Q * s / (init_r + 1e-5)       P = lora_B (out, r)   E = lora_E (r, 1)   Q = lora_A (r, in)

with ``s = lora_alpha`` (``init_r`` when ``lora_alpha`` is 0), as peft 0.21.2's ``ADALORA`` computes it
(its ``ranknum`` is the initial rank, also after a rank pattern shrinks a layer). Training keeps
``P`` and ``Q`` near-orthogonal with the regulariser ``R = mean over P, Q of ||P^T P - I||_F`` (resp.
``||Q Q^T - I||_F``) weighted by ``orth_reg_weight`` and prunes *triplets* ``(P[:, i], E[i], Q[i])``
to a global budget that falls from ``init_r`` per layer to ``target_r`` per layer:

* importance of every entry ``I = |w * grad|``, smoothed ``Ibar = b1 Ibar + (1 - b1) I`` (sensitivity)
  and ``U = b2 U + (1 - b2) |I - Ibar|`` (uncertainty); the entry's score is ``Ibar * U``;
* a triplet's score is ``S(E_i) + mean_j S(Q_ij) + mean_k S(P_ki)``;
* the budget (total kept triplets) at update ``t`` is ``init_bgt`` up to ``tinit``, then falls
  cubically, ``target + (init - target) (1 - (t - tinit) / (T - tfinal - tinit))^3``, every ``deltaT``
  updates the lowest-scoring triplets beyond the budget get ``E_i = 0``; at ``t = T - tfinal`` the final
  pattern is fixed and kept for the last ``tfinal`` updates.

Pruning only zeroes ``E`` (as peft does), so shapes never change during a run; the triplets a trained
adapter keeps are those with ``E_i != 0`` (a zero singular value adds nothing to the delta), which is
what :func:`to_lora` keeps when it exports the adapter as a plain LoRA with per-module ranks.
``t`` counts the updates done (1 after the first), like a Trainer's ``global_step`` when peft's
``update_and_allocate`` is called after ``optimizer.step()``.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ..errors import AdapterError, ConfigError, FileFormatError, UnsupportedError
from ..layers import matrix_shape
from ..registry import METHODS
from ..targets import ParamInfo
from .base import MethodConfig, MethodTraining, PeftConverter, SavedTarget
from .weight_delta import WeightDeltaMethod, WeightDeltaSite

#: peft's guard against a zero rank in ``ranknum + 1e-5``; kept so logits agree within float rounding
RANK_EPS = 1e-5


class AdaLoRAConfig(MethodConfig):
    """peft's AdaLoraConfig keys (same names and defaults); ``total_step`` defaults to the run's steps."""

    init_r: int = Field(12, ge=1)
    target_r: int = Field(8, ge=0)
    lora_alpha: float = Field(8.0, ge=0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    tinit: int = Field(0, ge=0)
    tfinal: int = Field(0, ge=0)
    deltaT: int = Field(1, ge=1)
    beta1: float = Field(0.85, gt=0.0, lt=1.0)
    beta2: float = Field(0.85, gt=0.0, lt=1.0)
    orth_reg_weight: float = Field(0.5, ge=0.0)
    total_step: int | None = Field(None, ge=1)
    # True: E = 0, P and Q ~ N(0, 0.02^2) (identity at init); False: all three random (tests)
    init_lora_weights: bool = True

    @model_validator(mode="after")
    def _budget(self):
        if self.target_r > self.init_r:
            raise ConfigError(f"AdaLoRAConfig: target_r={self.target_r} is larger than init_r={self.init_r}; the budget can only "
                              "shrink - lower target_r or raise init_r")
        if self.total_step is not None:
            schedule_check(self.tinit, self.tfinal, self.total_step)
        return self


def schedule_check(tinit: int, tfinal: int, total: int) -> None:
    if tinit >= total - tfinal:
        raise ConfigError(f"AdaLoRA: tinit={tinit} and tfinal={tfinal} leave no budgeting phase in {total} steps (need "
                          "tinit < total_step - tfinal); lower tinit/tfinal or train longer")


def scale(settings: Mapping[str, Any]) -> float:
    alpha = float(settings.get("lora_alpha", 8.0))
    return alpha if alpha > 0 else float(settings["init_r"])


def adalora_formula(kind: str, weight: torch.Tensor, slots: Mapping[str, torch.Tensor], settings: Mapping[str, Any]) -> torch.Tensor:
    """``P diag(E) Q * s / (init_r + 1e-5)`` in the canonical (out, in) view, float32."""
    a, b, e = slots["lora_A"].float(), slots["lora_B"].float(), slots["lora_E"].float()
    return (b @ (a * e)) * scale(settings) / (float(settings["init_r"]) + RANK_EPS)


class AdaLoRASite(WeightDeltaSite):
    slots = ("lora_A", "lora_B", "lora_E")
    formula = staticmethod(adalora_formula)

    def __init__(self, info: ParamInfo, kind: str, settings: Mapping[str, Any]):
        super().__init__(info, kind, settings)
        if kind == "conv2d" and info.module.groups != 1:
            raise UnsupportedError(f"{info.name}: AdaLoRA on grouped convolutions (groups={info.module.groups}) is not supported")
        r = int(self.settings.get("r", self.settings["init_r"]))
        self.r = r
        dev = info.param.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=self.dtype, device=dev))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, dtype=self.dtype, device=dev))
        self.lora_E = nn.Parameter(torch.empty(r, 1, dtype=self.dtype, device=dev))
        p = float(self.settings.get("lora_dropout") or 0.0)
        self.dropout = nn.Dropout(p) if p > 0 else nn.Identity()
        with torch.no_grad():
            if self.settings.get("init_lora_weights", True):
                nn.init.zeros_(self.lora_E)
                nn.init.normal_(self.lora_A, std=0.02)
                nn.init.normal_(self.lora_B, std=0.02)
            else:
                for t in (self.lora_A, self.lora_B, self.lora_E):
                    nn.init.normal_(t)

    def factored_output(self, x: torch.Tensor) -> torch.Tensor | None:
        # the dropout sees the input, as peft's; a rank-r product instead of the dense delta
        x = self.dropout(x.to(self.lora_A.dtype)) if self.owner.training else x.to(self.lora_A.dtype)
        s = scale(self.settings) / (float(self.settings["init_r"]) + RANK_EPS)
        if self.kind == "conv2d":
            m = self.owner
            k = self.delta_matrix(self.base).reshape(self.base.shape)
            return F.conv2d(x, k.to(x.dtype), None, m.stride, m.padding, m.dilation, m.groups)
        return (x @ (self.lora_A * self.lora_E).t() @ self.lora_B.t()) * s


# -- saved files ------------------------------------------------------------------------------------

def _check_saved(adapter, name: str, options: dict, where: str) -> None:
    from ..validate import saved_tensor

    a = saved_tensor(adapter, f"{name}.lora_A", where)
    b = saved_tensor(adapter, f"{name}.lora_B", where)
    e = saved_tensor(adapter, f"{name}.lora_E", where)
    if a.dim() != 2 or b.dim() != 2 or e.dim() != 2 or e.shape[1] != 1:
        raise AdapterError(f"{where}: {name} has lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}, lora_E {tuple(e.shape)}; AdaLoRA "
                           "needs 2-D P and Q and an (r, 1) E - the file is corrupt")
    if not (a.shape[0] == b.shape[1] == e.shape[0]):
        raise AdapterError(f"{where}: the ranks of {name}'s lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)} and lora_E "
                           f"{tuple(e.shape)} disagree; the file is corrupt or mixes two adapters")
    r = options.get("r")
    if r is not None and r != a.shape[0]:
        raise AdapterError(f"{where}: adapter.json says r={r!r} for {name} but {name}.lora_A has rank {a.shape[0]}; "
                           "the file is corrupt or mixes two adapters")


def _saved_shapes(adapter, name: str, kind: str, base_shape: tuple, feedforward: bool = False) -> dict[str, tuple]:
    out_f, in_f = matrix_shape(kind, base_shape)
    r = adapter.tensors[f"{name}.lora_A"].shape[0]
    return {f"{name}.lora_A": (r, in_f), f"{name}.lora_B": (out_f, r), f"{name}.lora_E": (r, 1)}


# -- peft's ADALORA folders --------------------------------------------------------------------------

#: adapter_config.json keys of peft's AdaLoraConfig that graftkit reads
ADALORA_KEYS = ("init_r", "target_r", "lora_alpha", "lora_dropout", "tinit", "tfinal", "deltaT", "beta1", "beta2",
                "orth_reg_weight", "total_step")


def _peft_read(cfg: dict, raw: dict, path: Path):
    from ..io.native import AdapterFile
    from ..io.peft import UNSUPPORTED_LORA, WEIGHTS_NAME, _common_config, _heads, _meta, _number

    for key, harmless in {**UNSUPPORTED_LORA, "use_dora": False, "loftq_config": None}.items():
        value = cfg.get(key, harmless)
        if value not in (harmless, None, False, {}, []):
            raise UnsupportedError(f"this peft AdaLoRA uses {key}={value!r}, which graftkit does not support; supported: "
                                   "plain AdaLoRA on Linear, Conv1D and Conv2d layers")
    init_r = _number(cfg, "init_r", 12, path, integer=True, low=1)
    numbers = {"init_r": init_r, "target_r": _number(cfg, "target_r", 8, path, integer=True, low=0),
               "lora_alpha": _number(cfg, "lora_alpha", 8, path, low=0),
               "lora_dropout": _number(cfg, "lora_dropout", 0.0, path, low=0, high=1),
               "tinit": _number(cfg, "tinit", 0, path, integer=True, low=0),
               "tfinal": _number(cfg, "tfinal", 0, path, integer=True, low=0),
               "deltaT": _number(cfg, "deltaT", 1, path, integer=True, low=1),
               "beta1": _number(cfg, "beta1", 0.85, path, low=0, high=1), "beta2": _number(cfg, "beta2", 0.85, path, low=0, high=1),
               "orth_reg_weight": _number(cfg, "orth_reg_weight", 0.5, path, low=0)}
    if cfg.get("total_step") is not None:
        numbers["total_step"] = _number(cfg, "total_step", None, path, integer=True, low=1)
    pattern = cfg.get("rank_pattern") or {}
    if not isinstance(pattern, dict) or not all(isinstance(v, list) for v in pattern.values()):
        raise FileFormatError(f"{path / 'adapter_config.json'}: rank_pattern is {pattern!r}; peft's AdaLoRA writes a list of "
                              "kept/pruned flags per <module>.lora_E - fix the file")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    used: set[str] = set()
    for key, value in raw.items():
        module, _, slot = key.rpartition(".")
        if slot in ("lora_A", "lora_B", "lora_E") and module:
            modules.setdefault(module, {})[slot] = value
            used.add(key)
    if not modules:
        raise FileFormatError(f"{path / WEIGHTS_NAME} holds no AdaLoRA tensors")
    heads, tensors = _heads(raw, used)
    targets, options, kinds = [], {}, {}
    for module, slots in sorted(modules.items()):
        if set(slots) != {"lora_A", "lora_B", "lora_E"}:
            raise FileFormatError(f"{path / WEIGHTS_NAME}: module {module} has {sorted(slots)}; an AdaLoRA layer needs lora_A, "
                                  "lora_B and lora_E - the file is corrupt")
        a, b, e = slots["lora_A"], slots["lora_B"], slots["lora_E"]
        if a.dim() != 2 or b.dim() != 2 or e.dim() != 2 or not (a.shape[0] == b.shape[1] == e.shape[0]):
            raise FileFormatError(f"{path / WEIGHTS_NAME}: {module} has lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}, lora_E "
                                  f"{tuple(e.shape)}; their ranks must agree - the file is corrupt or mixes two adapters")
        r = a.shape[0]
        # peft builds each layer with init_r, then shrinks the ones rank_pattern names to their kept triplets
        flags = pattern.get(f"{module}.lora_E")
        want = init_r if flags is None else sum(bool(f) for f in flags)
        if r != want:
            raise FileFormatError(f"{path / WEIGHTS_NAME}: {module} has rank {r} but adapter_config.json gives it {want} "
                                  "(init_r / rank_pattern); the file is corrupt or mixes two adapters")
        if r == 0:  # every triplet pruned: one zero triplet is the same (zero) delta with non-empty tensors
            a, b, e, r = a.new_zeros(1, a.shape[1]), b.new_zeros(b.shape[0], 1), e.new_zeros(1, 1), 1
        name = f"{module}.weight"
        targets.append(name)
        options[name] = {"r": r}
        if cfg.get("fan_in_fan_out"):
            kinds[name] = "conv1d"
        tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"], tensors[f"{name}.lora_E"] = a.contiguous(), b.contiguous(), e.contiguous()
    config = {**_common_config(cfg, heads), **numbers, "init_lora_weights": True}
    meta = _meta("adalora", config, targets, options, heads, cfg, path)
    meta["target_kinds"] = kinds
    return AdapterFile(meta, tensors)


def _peft_write_site(site, key: str, tensors: dict, acc: dict) -> None:
    from ..io.peft import PREFIX

    module = key[len(PREFIX):]
    if site.kind not in ("linear", "conv1d", "conv2d"):
        raise UnsupportedError(f"{module}: peft's AdaLoRA adapts Linear, Conv1D and Conv2d layers only, not {site.kind}; "
                               "save this adapter with format='native'")
    init_r = int(site.settings["init_r"])
    if site.r > init_r:
        raise UnsupportedError(f"{module}: rank {site.r} is above init_r={init_r}, which peft's AdaLoRA cannot load; save it natively")
    if site.r != init_r:  # peft shrinks such a layer by the pattern before loading its tensors
        acc.setdefault("pattern", {})[f"{module}.lora_E"] = [True] * site.r + [False] * (init_r - site.r)
    for slot, t in site.slot_tensors().items():
        tensors[f"{key}.{slot}"] = t.detach().cpu()


def _peft_write_config(state, acc: dict) -> dict:
    c = state.config
    # peft refuses a config without a budgeting phase; one without a recorded total gets the shortest that has one
    total = c.total_step or c.tinit + c.tfinal + 1
    return {"init_r": c.init_r, "target_r": c.target_r, "lora_alpha": c.lora_alpha, "lora_dropout": c.lora_dropout,
            "tinit": c.tinit, "tfinal": c.tfinal, "deltaT": c.deltaT, "beta1": c.beta1, "beta2": c.beta2,
            "orth_reg_weight": c.orth_reg_weight, "total_step": total, "rank_pattern": acc.get("pattern") or None,
            "bias": "none", "init_lora_weights": True, "r": 8}


# -- the rank allocation during training -----------------------------------------------------------------

class RankBudget(MethodTraining):
    """AdaLoRA's part in ``graft train``: the orthogonality loss, the importance EMAs and the budgeted
    masking of ``E``. The EMAs are not in a checkpoint, so a run cannot resume."""

    resumable = False

    def __init__(self, config: AdaLoRAConfig):
        self.config = config
        self.sites: dict[str, AdaLoRASite] = {}
        self.total = config.total_step
        self.grads: dict[str, torch.Tensor] = {}
        self.ema: dict[str, torch.Tensor] = {}
        self.unc: dict[str, torch.Tensor] = {}
        self.final: dict[str, torch.Tensor] | None = None  # the kept triplets fixed at T - tfinal
        self.kept: dict[str, torch.Tensor] | None = None  # the last allocation's kept triplets
        self.budgets: list[tuple[int, int]] = []  # (update, budget) of every allocation

    # -- setup ---------------------------------------------------------------------------------
    def attach(self, model: nn.Module, total_steps: int) -> None:
        from ..adapter import sites

        self.sites = {n: s for n, s in sites(model).items() if isinstance(s, AdaLoRASite)}
        if not self.sites:
            raise ConfigError("AdaLoRA: the model has no AdaLoRA layer to allocate ranks over")
        if self.total is None:
            self.total = total_steps
        schedule_check(self.config.tinit, self.config.tfinal, self.total)
        self.init_bgt = sum(s.r for s in self.sites.values())
        self.target_bgt = self.config.target_r * len(self.sites)

    def start(self, model, forward, batches, total_steps):
        self.attach(model, total_steps)

    # -- the paper's pieces ---------------------------------------------------------------------
    def budget(self, t: int) -> tuple[int, bool]:
        """The number of triplets kept after update ``t``, and whether ``t`` allocates."""
        c, total = self.config, self.total
        if t <= c.tinit:
            return self.init_bgt, False
        if t > total - c.tfinal:
            return self.target_bgt, True
        left = 1 - (t - c.tinit) / (total - c.tfinal - c.tinit)
        return int((self.init_bgt - self.target_bgt) * left**3 + self.target_bgt), t % c.deltaT == 0

    def extra_loss(self, model):
        w = self.config.orth_reg_weight
        if w == 0:
            return None
        terms = []
        for s in self.sites.values():
            for gram in (s.lora_A @ s.lora_A.t(), s.lora_B.t() @ s.lora_B):
                terms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)))
        return w * torch.stack(terms).mean()

    def before_update(self, model, step):
        # the importance reads the weights after the update (peft calls update_and_allocate after
        # optimizer.step()), but the loop clears the gradients by then: keep them
        with torch.no_grad():
            for n, s in self.sites.items():
                for slot, p in s.slot_tensors().items():
                    self.grads[f"{n}.{slot}"] = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)

    @torch.no_grad()
    def update_importance(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for n, s in self.sites.items():
            for slot, p in s.slot_tensors().items():
                key = f"{n}.{slot}"
                ipt = (p * self.grads[key]).abs()
                ema = self.ema.get(key, torch.zeros_like(p))
                unc = self.unc.get(key, torch.zeros_like(p))
                ema = b1 * ema + (1 - b1) * ipt
                self.ema[key], self.unc[key] = ema, b2 * unc + (1 - b2) * (ipt - ema).abs()

    def scores(self) -> dict[str, torch.Tensor]:
        """Each layer's triplet scores (r,)."""
        out = {}
        for n in self.sites:
            s = {slot: self.ema[f"{n}.{slot}"] * self.unc[f"{n}.{slot}"] for slot in ("lora_A", "lora_B", "lora_E")}
            out[n] = s["lora_E"].view(-1) + (s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0))
        return out

    @torch.no_grad()
    def allocate(self, budget: int) -> dict[str, torch.Tensor]:
        scores = self.scores()
        drop = self.init_bgt - budget
        if drop <= 0:  # nothing beyond the budget (target_r = init_r)
            kept = {n: torch.ones_like(v, dtype=torch.bool) for n, v in scores.items()}
        else:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), drop).values
            kept = {n: v > threshold for n, v in scores.items()}
        self.apply(kept)
        return kept

    @torch.no_grad()
    def apply(self, kept: dict[str, torch.Tensor]) -> None:
        for n, keep in kept.items():
            e = self.sites[n].lora_E
            e.masked_fill_(~keep.view(-1, 1).to(e.device), 0.0)

    def after_update(self, model, step):
        t = step + 1
        boundary = self.total - self.config.tfinal
        if t < boundary:
            self.update_importance()
            budget, allocate = self.budget(t)
            if allocate:
                self.kept = self.allocate(budget)
                self.budgets.append((t, budget))
        elif t == boundary:
            self.final = self.kept = self.allocate(self.target_bgt)
            self.budgets.append((t, self.target_bgt))
            self.ema, self.unc = {}, {}
        elif self.final is not None:
            self.apply(self.final)
        self.grads = {}
        return False

    def report(self, model):
        ranks = {n: int((s.lora_E.detach() != 0).sum()) for n, s in self.sites.items()}
        return {"initial_budget": self.init_bgt, "target_budget": self.target_bgt, "allocations": len(self.budgets),
                "final_budget": self.budgets[-1][1] if self.budgets else self.init_bgt,
                "kept_ranks": sum(ranks.values()), "rank_pattern": ranks}


# -- export as a plain LoRA --------------------------------------------------------------------------

def to_lora(adapter):
    """A saved AdaLoRA (an AdapterFile, native or read from peft) as a plain LoRA AdapterFile with each
    module's own rank: the triplets with ``E != 0``, ``A = E Q``, ``B = P * s / (init_r + 1e-5)`` and
    ``lora_alpha = r`` (scaling 1), so the delta is the same. A module with no triplet left keeps one
    zero rank (LoRA needs r >= 1)."""
    from ..io.native import AdapterFile
    from ..io.peft import _exact

    if adapter.method != "adalora":
        raise UnsupportedError(f"to_lora converts AdaLoRA adapters; this one is {adapter.method!r}")
    config = dict(adapter.meta["config"])
    tensors = {k: v for k, v in adapter.tensors.items() if k.endswith(".value")}  # heads trained whole
    options, ranks = {}, {}
    for name in adapter.targets:
        where = str(adapter.path or "the adapter")
        topts = (adapter.meta.get("target_options") or {}).get(name) or {}
        _check_saved(adapter, name, topts, where)
        a, b, e = (adapter.tensors[f"{name}.{s}"].float() for s in ("lora_A", "lora_B", "lora_E"))
        keep = e.view(-1) != 0
        r = int(keep.sum())
        s = scale({**config, **topts}) / (float(config["init_r"]) + RANK_EPS)
        if r == 0:
            la, lb, r = a.new_zeros(1, a.shape[1]), b.new_zeros(b.shape[0], 1), 1
        else:
            la, lb = (a * e)[keep], b[:, keep] * s
        tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = la.contiguous(), lb.contiguous()
        options[name] = {"r": r, "lora_alpha": float(r)}
        ranks[name.rsplit(".", 1)[0]] = r
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    lora_config = {"targets": config.get("targets", []), "train_also": config.get("train_also", []),
                   "r": r0, "lora_alpha": float(r0), "lora_dropout": float(config.get("lora_dropout", 0.0)),
                   "rank_pattern": {_exact(m): r for m, r in ranks.items() if r != r0},
                   "alpha_pattern": {_exact(m): float(r) for m, r in ranks.items() if r != r0}}
    for key in ("exclude", "layers", "module_types"):
        if key in config:
            lora_config[key] = config[key]
    meta = {**adapter.meta, "method": "lora", "config": lora_config, "target_options": options,
            "converted_from": {"method": "adalora", "rank_pattern": ranks}}
    return AdapterFile(meta, tensors)


def export_lora(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Read an AdaLoRA adapter folder (graftkit's or peft's) and write it as a plain graftkit LoRA."""
    from ..io.native import write_native
    from ..io.peft import CONFIG_NAME, read_peft
    from ..io.native import read_native

    src = Path(src)
    adapter = read_peft(src) if (src / CONFIG_NAME).exists() else read_native(src)
    return write_native(to_lora(adapter), out, overwrite)


@METHODS.register("adalora")
class AdaLoRA(WeightDeltaMethod):
    name = "adalora"
    config_cls = AdaLoRAConfig
    site_cls = AdaLoRASite
    kinds = ("linear", "conv1d", "conv2d")
    check_saved = staticmethod(_check_saved)
    saved_shapes = staticmethod(_saved_shapes)
    peft = PeftConverter("ADALORA", _peft_read, _peft_write_site, _peft_write_config)

    @classmethod
    def site_options(cls, config: AdaLoRAConfig, info: ParamInfo) -> dict[str, Any]:
        return {"r": config.init_r}

    @classmethod
    def training(cls, config: Any) -> MethodTraining | None:
        return RankBudget(config if isinstance(config, AdaLoRAConfig) else AdaLoRAConfig(**config))

    @classmethod
    def _merge_deltas(cls, t: SavedTarget):
        if not t.kind:  # a peft folder does not say; peft's AdaLoRA adapts Linear (2-D) and Conv2d (4-D) weights
            from dataclasses import replace

            t = replace(t, kind="conv2d" if len(t.base_shape) == 4 else "linear")
        return super()._merge_deltas(t)
