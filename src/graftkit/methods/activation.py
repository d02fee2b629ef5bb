"""Module-keyed attachments: the home of activation-space methods.

A weight-space site adapts one base parameter (``<param>.<slot>``); an activation-space site
adapts what one *module* computes, through forward hooks on the module's input or output,
and owns small trainable tensors of its own. It is stored under
``<module>.graft_adapter["module"]`` and saved as ``<module name>.<slot>``, so the base
state-dict keys never change and the usual protocol (inject, disable, unload, save, load,
double-injection detection) works unchanged.

Such a site changes hidden states, not weights: it has no weight delta and cannot be folded
into the base. Operations that need one (``materialize_delta``, ``merge_adapter``, weight-space
merges, ``export --merged``) refuse it with one line naming the method (:func:`refuse_weight_op`).
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import AdapterError, TargetError
from .base import HOLDER, MethodConfig, Site, TuningMethod

#: the holder key of a site attached to its whole module (a parameter name never equals it)
MODULE_KEY = "module"


@dataclass(frozen=True)
class ModuleInfo:
    """A module chosen as an attachment point (the module counterpart of ``ParamInfo``)."""

    name: str  # full module name, e.g. model.layers.0.mlp
    module: nn.Module
    #: the whole model, for sites that also hook another module (e.g. a parallel adapter's input)
    root: nn.Module | None = field(default=None, compare=False, repr=False)

    @property
    def module_name(self) -> str:
        return self.name

    @property
    def pname(self) -> str:
        return MODULE_KEY

    @property
    def param(self) -> None:
        return None

    def probe_params(self) -> list[str]:
        """Names of the module's own parameters (relative to the model), for the base fingerprint."""
        return [f"{self.name}.{n}" for n, _ in self.module.named_parameters() if f".{HOLDER}." not in f".{n}."]


def find_module(model: nn.Module, name: str) -> ModuleInfo:
    modules = dict(model.named_modules())
    if name not in modules or not name:
        raise AdapterError(f"the model has no module {name!r}; the adapter was made for another model")
    return ModuleInfo(name, modules[name], model)


def find_target(model: nn.Module, name: str):
    """A saved target name as a module when the model has a module of that name, else as a
    parameter (a parameter's name is never also a module's)."""
    if name and name in dict(model.named_modules()):
        return find_module(model, name)
    from ..targets import find_param

    return find_param(model, name)


def first_tensor(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


def replace_first(value: Any, tensor: torch.Tensor) -> Any:
    """``value`` with its (first) tensor replaced; modules returning tuples keep the rest."""
    if isinstance(value, tuple):
        return (tensor, *value[1:])
    if isinstance(value, list):
        return [tensor, *value[1:]]
    return tensor


class ModuleSite(Site):
    """One adapted module. Subclasses define ``slots`` (their parameters) and ``attach``, which
    registers bound-method hooks through ``on_output``/``on_input`` (removed again on detach)."""

    kind = "module"

    def __init__(self, info: ModuleInfo, method: str):
        nn.Module.__init__(self)
        object.__setattr__(self, "owner", info.module)
        # modules carrying this site's hooks (plain attribute: deepcopy maps it to the copies)
        object.__setattr__(self, "_hooked", [])
        self.pname = MODULE_KEY
        self.kind = "module"
        self.method = method
        self.merged = False
        self.enabled = True

    @property
    def base(self):  # there is no base parameter
        raise AdapterError(f"the {self.method} adapter acts on a module's activations and has no base weight")

    def on_output(self, fn, module: nn.Module | None = None) -> None:
        """``fn(module, args, kwargs, output) -> new output or None`` after ``module`` (default: the owner)."""
        module = module if module is not None else self.owner
        module.register_forward_hook(fn, with_kwargs=True)
        self._hooked.append(module)

    def on_input(self, fn, module: nn.Module | None = None) -> None:
        """``fn(module, args, kwargs) -> (args, kwargs) or None`` before ``module`` (default: the owner)."""
        module = module if module is not None else self.owner
        module.register_forward_pre_hook(fn, with_kwargs=True)
        self._hooked.append(module)

    def detach(self) -> None:
        # hooks are bound methods of this site; found by ``__self__`` (handles would not survive
        # a deepcopy: they point at the original module's hook dicts)
        for module in {id(m): m for m in self._hooked}.values():
            for hooks in (module._forward_hooks, module._forward_pre_hooks):
                for key in [k for k, h in hooks.items() if getattr(h, "__self__", None) is self]:
                    del hooks[key]
                    module._forward_hooks_with_kwargs.pop(key, None)
                    module._forward_pre_hooks_with_kwargs.pop(key, None)
        self._hooked.clear()

    def delta(self) -> dict[str, torch.Tensor]:
        raise AdapterError(refusal(self.method, "a weight delta"))

    def merge(self) -> None:
        raise AdapterError(refusal(self.method, "merging into the weights"))

    def unmerge(self) -> None:
        pass

    def restore_base(self) -> None:
        pass


def article(word: str) -> str:
    """``an`` before a vowel (an ia3 adapter, an iapt adapter), else ``a``."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def refusal(method: str, what: str, space: str = "activation") -> str:
    changes = "(hidden states)" if space == "activation" else "(the soft tokens or key/value prefixes it reads)"
    return (f"{what} needs a weight delta, and {article(method)} {method} adapter has none: it changes the model's {space}s "
            f"{changes}, not its weights. Use it unmerged (gk.load_adapter, or `adapter:` in graft eval), "
            "or merge adapters of one architecture as an adapter soup (linear)")


def refuse_weight_op(method_name: str, config: Any, what: str) -> None:
    """Raise the one-line refusal when an adapter of ``method_name`` with ``config`` (e.g. a saved
    adapter's) has no weight delta."""
    from . import method_named

    method = method_named(method_name)
    if method is not None and not method.weight_delta(config):
        raise AdapterError(refusal(method_name, what, "sequence" if method.space == "sequence" else "activation"))


def _module_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


def resolve_modules(model: nn.Module, patterns: list[str], exclude: list[str], what: str) -> list[ModuleInfo]:
    """Modules whose name (or a dotted suffix of it) matches a pattern, as parameter targets
    match (globs, ``re:<regex>``); adapter holders are never candidates."""
    out: list[ModuleInfo] = []
    matched: set[str] = set()
    for name, module in model.named_modules():
        if not name or f".{HOLDER}" in f".{name}" or name.endswith(HOLDER):
            continue
        hit = [p for p in patterns if _module_matches(p, name)]
        if hit and not any(_module_matches(p, name) for p in exclude):
            out.append(ModuleInfo(name, module, model))
            matched.update(hit)
    missing = [p for p in patterns if p not in matched]
    if missing:
        raise TargetError(f"{what}: target {missing[0]!r} matches no module of the model; name modules such as "
                          "'mlp' or 'layers.0.mlp', or leave targets empty for the method's default places")
    return out


class ModuleMethod(TuningMethod):
    """A tuning method whose sites attach to modules (activation space)."""

    space = "activation"
    has_weight_delta = False
    kinds = ("module",)

    @classmethod
    def find(cls, model: nn.Module, name: str):
        """A saved target: a module, or a base parameter trained alongside (e.g. layer norms)."""
        return find_target(model, name)

    @classmethod
    def resolve(cls, model: nn.Module, config: MethodConfig, skip=()):
        infos = [i for i in cls.resolve_modules(model, config) if i.name not in skip]
        if not infos:
            raise TargetError(f"{cls.name}: nothing to adapt in this model")
        return infos, {i.name: cls.site_options(config, i) for i in infos}

    @classmethod
    def resolve_modules(cls, model: nn.Module, config: MethodConfig) -> list[ModuleInfo]:
        """The modules to attach to (default: ``config.targets`` as module patterns)."""
        if not config.targets:
            raise TargetError(f"{cls.name}: no targets given; name modules (e.g. targets=['mlp'])")
        return resolve_modules(model, config.targets, config.exclude, cls.name)

    @classmethod
    def make_site(cls, info: ModuleInfo, config: MethodConfig, options: dict[str, Any]) -> Site:  # type: ignore[override]
        raise NotImplementedError
