"""MeteoRA: several LoRA adapters kept as frozen experts, mixed per token by a learned top-k gate.

Xu et al., 2024 ("MeteoRA: Multiple-tasks Embedded LoRA for Large Language Models",
arXiv:2405.13053) embed N off-the-shelf LoRA adapters into the base model as a mixture of
experts: every LoRA-wrapped linear layer gets a gate ``G`` (N x in, no bias) and computes, for
each token ``x``::

    l = G x                              (N logits)
    T = top-k indices of l,  w = softmax(l[T])  (over the k chosen experts only)
    y = W x + sum_{i in T} w_i * s_i B_i A_i x

Only the gates train; the adapters stay frozen, so the model can switch adapters token by token
(also within one generation). ``top_k`` equal to N is a dense softmax mixture. With ``top_k`` 1 the
weight is the constant 1 and the gate would get no gradient: graftkit passes the gradient of the
chosen expert's softmax probability over all N logits through (straight-through; the forward value
stays exactly 1).

Config::

    method: meteora
    adapters: [path/to/lora_a, path/to/lora_b]   # LoRA adapter folders (graftkit or peft) of this base
    top_k: 1
    gate_init_std: 0.02        # the gates start N(0, std^2): near-uniform weights, varied top-k choices
    targets: [...]             # optional: a subset of the adapters' modules (default: every module any adapter adapts)

A module that some adapter does not adapt gets a zero expert for it. Each expert's scaling
(``lora_alpha / r``, rsLoRA's ``/ sqrt(r)``) is folded into its ``B``, and ranks are zero-padded to
the largest, so a site holds ``meteora_A`` (N, r, in) and ``meteora_B`` (N, out, r): frozen slots,
saved with the adapter (a saved MeteoRA adapter loads without the LoRA folders). The gate is the
trained slot ``meteora_gate`` (N, in). DoRA adapters are refused (their magnitude rescaling is not
an additive expert), as are adapters that train heads whole.

Without ``adapters``, ``num_experts`` and ``r`` give zero experts (the identity: a shape to load
saved experts into) or, with ``init_weights: false``, random frozen experts (for tests).

Differences from the paper: the paper batches the experts in custom GPU kernels; here every
expert's low-rank product is computed for every token (N small) and weighted by the sparse top-k
weights, which gives the same values. The gate is trained with the task loss of ``graft train``
alone (no balancing or gate-label loss); the straight-through top-1 gradient is graftkit's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..errors import AdapterError, ConfigError, TargetError, UnsupportedError
from ..layers import layer_kind, matrix_shape
from ..registry import METHODS
from .activation import ModuleInfo, ModuleMethod, ModuleSite, find_module, first_tensor, replace_first, resolve_modules
from .base import MethodConfig, first_input

GATE, EXPERT_A, EXPERT_B = "meteora_gate", "meteora_A", "meteora_B"
#: a key of ``options`` that carries the experts' factors from resolve() to make_sites() at injection
#: (never saved: make_sites pops it; a loaded adapter fills the experts from its saved slots)
_INIT = "_experts"


class MeteoRAConfig(MethodConfig):
    adapters: list[str] = Field(default_factory=list)
    top_k: int = Field(2, ge=1)
    gate_init_std: float = Field(0.02, ge=0.0)
    #: without adapters: the number of experts and their rank
    num_experts: int | None = Field(None, ge=1)
    r: int = Field(8, ge=1)
    #: without adapters: zero experts (True) or random frozen ones (False, for tests)
    init_weights: bool = True

    def __init__(self, **data: Any):
        super().__init__(**data)
        if self.adapters and self.num_experts is not None:
            raise ConfigError("meteora: give either adapters (LoRA folders) or num_experts, not both")
        if not self.adapters and self.num_experts is None:
            raise ConfigError("meteora needs adapters: a list of LoRA adapter folders (its frozen experts)")
        n = len(self.adapters) or self.num_experts
        if self.top_k > n:
            raise ConfigError(f"meteora: top_k is {self.top_k} but there are only {n} experts; lower top_k")


def route(x: torch.Tensor, gate: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per-token expert weights ``(..., N)``: softmax over the ``top_k`` largest gate logits, zero
    elsewhere. With ``top_k`` 1 that weight is the constant 1, which gives the gate no gradient; its
    gradient is then that of the chosen expert's softmax probability over all N logits
    (straight-through: the forward value stays exactly 1)."""
    logits = F.linear(x, gate)
    if top_k >= gate.shape[0]:
        return torch.softmax(logits, dim=-1)
    top, index = logits.topk(top_k, dim=-1)
    if top_k == 1:
        p = torch.softmax(logits, dim=-1).gather(-1, index)
        weight = 1.0 + p - p.detach()
    else:
        weight = torch.softmax(top, dim=-1)
    return torch.zeros_like(logits).scatter(-1, index, weight)


def mix(x: torch.Tensor, gate: torch.Tensor, a: torch.Tensor, b: torch.Tensor, top_k: int) -> torch.Tensor:
    """``sum_i w_i(x) B_i A_i x`` per token: x (..., in), gate (N, in), a (N, r, in), b (N, out, r)."""
    weights = route(x, gate, top_k)
    low = torch.einsum("...i,nri->...nr", x, a)
    return torch.einsum("...n,...nr,nor->...o", weights, low, b)


class MeteoRASite(ModuleSite):
    slots = (GATE, EXPERT_A, EXPERT_B)
    #: saved, never trained: the LoRA experts
    frozen_slots = (EXPERT_A, EXPERT_B)

    def __init__(self, info: ModuleInfo, n: int, r: int, top_k: int, gate_std: float,
                 experts: tuple[torch.Tensor, torch.Tensor] | None, random_experts: bool):
        super().__init__(info, "meteora")
        weight = info.module.weight
        self.out_features, self.in_features = matrix_shape(layer_kind(info.module, "weight"), weight.shape)
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self.top_k = int(top_k)
        self.meteora_gate = nn.Parameter((torch.randn(n, self.in_features) * gate_std).to(dtype=dtype, device=weight.device))
        if experts is not None:
            a, b = experts
        elif random_experts:
            a = torch.randn(n, r, self.in_features) / self.in_features ** 0.5
            b = torch.randn(n, self.out_features, r) / r ** 0.5
        else:
            a, b = torch.zeros(n, r, self.in_features), torch.zeros(n, self.out_features, r)
        # buffers, not parameters: nothing trains them; not in the model's state dict (the adapter file saves them)
        self.register_buffer(EXPERT_A, a.to(dtype=dtype, device=weight.device), persistent=False)
        self.register_buffer(EXPERT_B, b.to(dtype=dtype, device=weight.device), persistent=False)

    def attach(self) -> None:
        self.on_output(self._hook)

    def _hook(self, module, args, kwargs, output):
        if not self.enabled:
            return None
        x = first_input(args, kwargs)
        out = first_tensor(output)
        added = mix(x.to(self.meteora_gate.dtype), self.meteora_gate, self.meteora_A, self.meteora_B, self.top_k)
        return replace_first(output, out + added.to(out.dtype))

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        """The expert weights this site gives inputs ``x`` (..., in)."""
        return route(x.to(self.meteora_gate.dtype), self.meteora_gate, self.top_k)


def _module_name(target: str) -> str:
    return target[: -len(".weight")] if target.endswith(".weight") else target


def read_experts(paths: list[str], modules: dict[str, nn.Module]) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Every module any adapter adapts -> one ``(A (r, in), s * B (out, r))`` per adapter (None where
    that adapter does not adapt the module), float32."""
    from ..io import read_adapter
    from .lora import lora_scaling

    found: dict[str, list] = {}
    for i, path in enumerate(paths):
        if not Path(path).is_dir():
            raise ConfigError(f"meteora adapter {path} is not a folder; give LoRA adapter folders (graftkit or peft)")
        adapter = read_adapter(path)
        if adapter.method not in ("lora", "deft"):
            raise UnsupportedError(f"meteora adapter {path} is a {adapter.method} adapter; MeteoRA's experts are LoRA adapters")
        config = adapter.meta.get("config") or {}
        options = adapter.meta.get("target_options") or {}
        if config.get("use_dora") or any(k.endswith(".lora_magnitude_vector") for k in adapter.tensors):
            raise UnsupportedError(f"meteora adapter {path} is DoRA, whose magnitude rescaling is not an additive expert; use plain LoRA adapters")
        if adapter.train_also:
            raise UnsupportedError(f"meteora adapter {path} also trains {adapter.train_also[0]} whole; MeteoRA mixes low-rank experts "
                                   "only - use adapters without train_also")
        for target in adapter.targets:
            name = _module_name(target)
            module = modules.get(name)
            if module is None or layer_kind(module, "weight") not in MeteoRA.kinds_of_modules:
                raise AdapterError(f"meteora adapter {path} adapts {target}, which is not a linear layer of this model; "
                                   "it was made for another base model")
            a, b = adapter.tensors[f"{target}.lora_A"].float(), adapter.tensors[f"{target}.lora_B"].float()
            out_f, in_f = matrix_shape(layer_kind(module, "weight"), module.weight.shape)
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
                raise AdapterError(f"meteora adapter {path}: {target}.lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit "
                                   f"the layer ({out_f} outputs, {in_f} inputs); it was made for another base model")
            opts = options.get(target) or {}
            r = int(opts.get("r", a.shape[0]))
            s = lora_scaling(float(opts.get("lora_alpha", config.get("lora_alpha", r))), r, bool(config.get("use_rslora")))
            found.setdefault(name, [None] * len(paths))[i] = (a, b * s)
    return found


def stack(experts: list, in_f: int, out_f: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded ``(N, r_max, in)`` and ``(N, out, r_max)`` (a missing expert is zero)."""
    r = max((e[0].shape[0] for e in experts if e is not None), default=1)
    a, b = torch.zeros(len(experts), r, in_f), torch.zeros(len(experts), out_f, r)
    for i, e in enumerate(experts):
        if e is not None:
            a[i, : e[0].shape[0]], b[i, :, : e[1].shape[1]] = e
    return a, b


@METHODS.register("meteora")
class MeteoRA(ModuleMethod):
    name = "meteora"
    config_cls = MeteoRAConfig
    identity_at_init = False
    kinds_of_modules = ("linear", "conv1d")

    @classmethod
    def identity_for(cls, config: Any) -> bool:
        data = config.model_dump() if isinstance(config, MethodConfig) else dict(config)
        return not data.get("adapters") and bool(data.get("init_weights", True))

    @classmethod
    def resolve(cls, model: nn.Module, config: MeteoRAConfig, skip=()):
        modules = dict(model.named_modules())
        experts = read_experts(config.adapters, modules) if config.adapters else {}
        if config.targets:
            infos = [i for i in resolve_modules(model, config.targets, config.exclude, cls.name)
                     if layer_kind(i.module, "weight") in cls.kinds_of_modules]
            if experts:
                infos = [i for i in infos if i.name in experts]
        elif experts:
            infos = [ModuleInfo(name, modules[name], model) for name in modules if name in experts]
        else:
            raise TargetError("meteora: no targets given; name linear modules (e.g. targets=['q_proj', 'v_proj']) or give adapters")
        infos = [i for i in infos if i.name not in skip]
        if not infos:
            raise TargetError("meteora: no linear layer is both a target and adapted by the adapters; widen targets or check the adapters")
        n = len(config.adapters) or int(config.num_experts)
        options = {}
        for info in infos:
            out_f, in_f = matrix_shape(layer_kind(info.module, "weight"), info.module.weight.shape)
            if experts:
                a, b = stack(experts[info.name], in_f, out_f)
                options[info.name] = {"experts": n, "r": int(a.shape[1]), _INIT: (a, b)}
            else:
                options[info.name] = {"experts": n, "r": int(config.r)}
        return infos, options

    @classmethod
    def find(cls, model: nn.Module, name: str):
        return find_module(model, name)

    @classmethod
    def make_site(cls, info: ModuleInfo, config: MeteoRAConfig, options: dict[str, Any]):
        if not isinstance(info, ModuleInfo) or layer_kind(info.module, "weight") not in cls.kinds_of_modules:
            raise AdapterError(f"meteora: {info.name} is not a linear layer; the adapter was made for another model")
        init = options.pop(_INIT, None)
        return MeteoRASite(info, int(options["experts"]), int(options["r"]), config.top_k, config.gate_init_std,
                           init, random_experts=not config.init_weights)
