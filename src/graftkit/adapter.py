"""Model-level adapter operations: inject, merge, unmerge, unload, disable, materialize.

These functions act on a plain ``nn.Module`` (usually a transformers model) in place. The
adapter's bookkeeping lives in ``model.__dict__['_graft_state']`` (not a module, so it
never shows up in the state dict) and its tensors in per-parameter sites (see
:mod:`graftkit.methods.base`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from .config import parse_config
from .errors import AdapterError, ConfigError, TargetError
from .fingerprint import fingerprint
from .layers import layer_kind
from .methods.activation import MODULE_KEY, refusal
from .methods.base import HOLDER, MethodConfig, Site, TuningMethod
from .methods.inplace import DeltaSite
from .registry import METHODS
from .targets import ParamInfo, find_param, resolve_targets, tied_aliases

STATE = "_graft_state"


@dataclass
class AdapterState:
    method: str
    config: MethodConfig
    targets: list[str]
    options: dict[str, dict[str, Any]]
    train_also: list[str]
    fingerprint: dict
    requires_grad: dict[str, bool] = field(default_factory=dict)
    base: dict[str, Any] = field(default_factory=dict)


def method_for(config: MethodConfig | dict) -> tuple[type[TuningMethod], MethodConfig]:
    """Find the method of a config object, or of a dict with a ``method`` key."""
    if isinstance(config, MethodConfig):
        for name in METHODS:
            m = METHODS.get(name)
            if type(config) is m.config_cls:
                return m, config
        raise ConfigError(f"{type(config).__name__} belongs to no registered method")
    if not isinstance(config, dict) or "method" not in config:
        raise ConfigError(f"an adapter config needs a 'method' key naming one of: {', '.join(METHODS.names())}")
    data = dict(config)
    method = METHODS.get(data.pop("method"))
    return method, parse_config(method.config_cls, data)


def get_state(model: nn.Module) -> AdapterState | None:
    return model.__dict__.get(STATE)


def require_state(model: nn.Module) -> AdapterState:
    state = get_state(model)
    if state is None:
        raise AdapterError("the model has no adapter; call gk.inject(model, config) or gk.load_adapter(model, path) first")
    return state


def sites(model: nn.Module) -> dict[str, Site]:
    """Full base-parameter name -> its site, in model order."""
    out: dict[str, Site] = {}
    for mname, module in model.named_modules():
        holder = module._modules.get(HOLDER)
        if holder is None:
            continue
        for pname, site in holder.items():
            # a module site is keyed by its module's name, a weight site by its parameter's
            out[mname if pname == MODULE_KEY else f"{mname}.{pname}" if mname else pname] = site
    return out


def _existing_site(info: ParamInfo) -> bool:
    holder = info.module._modules.get(HOLDER)
    return holder is not None and info.pname in holder


def _add_site(info: ParamInfo, site: Site) -> None:
    holder = info.module._modules.get(HOLDER)
    if holder is None:
        holder = nn.ModuleDict()
        info.module.add_module(HOLDER, holder)
    holder[info.pname] = site
    site.train(info.module.training)  # a site added to a model in eval mode must not run its dropout
    site.attach()
    if site.inplace:
        info.param.requires_grad_(True)


def _refuse_tied(model: nn.Module, method: str, new_sites: list[tuple[ParamInfo, Site]]) -> None:
    """A hooked (not in-place) site sees only its owner's forward. On a tensor shared with
    another module (tied input/output embeddings) the unmerged adapter would change the
    input embedding alone while merging changes every use: merged != unmerged."""
    aliases: dict[str, list[str]] = {}
    for alias, real in tied_aliases(model).items():
        aliases.setdefault(real, []).append(alias)
    for info, site in new_sites:
        if not site.inplace and info.name in aliases:
            raise TargetError(
                f"{info.name} is tied to {', '.join(aliases[info.name])} (one shared tensor); a {method} adapter on it "
                "would act on one of its uses while unmerged and on all of them once merged. Untie the weights first "
                "(load the model with tie_word_embeddings=False) or leave this parameter out of the targets"
            )


def inject(model: nn.Module, config: MethodConfig | dict, *, resolved: dict[str, Any] | None = None) -> nn.Module:
    """Attach a tuning method to ``model`` in place and freeze everything else.

    ``resolved`` (used when loading a saved adapter) gives the explicit target list and
    per-target options instead of resolving the config's patterns again.
    """
    method, config = method_for(config)
    existing = get_state(model)
    if existing is not None:
        raise AdapterError(
            f"the model already has a {existing.method} adapter on {len(existing.targets)} parameters; "
            "call gk.unload(model) (merging or not) before injecting another"
        )
    if resolved is None:
        heads = resolve_targets(model, config.train_also, eligible=lambda i: i.param.is_floating_point(), what="train_also") if config.train_also else []
        infos, options = method.resolve(model, config, skip={h.name for h in heads})
    else:
        heads = [find_param(model, n) for n in resolved["train_also"]]
        infos = [method.find(model, n) for n in resolved["targets"]]
        options = resolved["options"]
    for info in [*infos, *heads]:
        if _existing_site(info):
            raise AdapterError(f"parameter {info.name} already carries an adapter; unload it before injecting again")
    head_names = sorted(h.name for h in heads)
    target_names = [i.name for i in infos]
    # module targets are probed through their own parameters
    probes = [n for i in infos for n in (i.probe_params()[:1] if i.param is None else [i.name])]
    fp = fingerprint(model, probes, skip=set(head_names))
    # build every site before touching the model, so a refused target leaves it as it was
    new_sites = list(zip(infos, method.make_sites(infos, config, options)))
    _refuse_tied(model, method.name, new_sites)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for info, site in new_sites:
        _add_site(info, site)
    for info in heads:
        _add_site(info, DeltaSite(info, layer_kind(info.module, info.pname), absolute=True))
    model_config = getattr(model, "config", None)
    base = {
        "class": type(model).__name__,
        "name_or_path": getattr(model_config, "_name_or_path", None) or None,
        "model_type": getattr(model_config, "model_type", None),
    }
    if type(model).__name__.endswith("ForSequenceClassification"):
        base["num_labels"] = model_config.num_labels
        base["id2label"] = {str(k): v for k, v in model_config.id2label.items()}
    model.__dict__[STATE] = AdapterState(method.name, config, target_names, options, head_names, fp, requires_grad, base)
    return model


def require_weight_delta(state: AdapterState, what: str) -> None:
    """Refuse a weight-only operation on an adapter that changes activations, in one line."""
    method = METHODS.get(state.method)
    if not method.weight_delta(state.config):
        raise AdapterError(refusal(state.method, what, "sequence" if method.space == "sequence" else "activation"))


def merge_adapter(model: nn.Module) -> None:
    """Fold the adapter into the base weights (forward output is unchanged)."""
    require_weight_delta(require_state(model), "merging into the weights")
    for site in sites(model).values():
        site.merge()


def unmerge_adapter(model: nn.Module) -> None:
    """Take a merged adapter back out of the base weights."""
    require_state(model)
    for site in sites(model).values():
        site.unmerge()


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove the adapter. ``merge=True`` keeps its effect in the weights; ``False`` restores the base."""
    state = require_state(model)
    if merge:
        require_weight_delta(state, "unload(merge=True)")
    for site in sites(model).values():
        if not site.enabled:
            site.set_enabled(True)
        if merge:
            site.merge()
        else:
            site.restore_base()
        site.detach()
    for module in list(model.modules()):
        if HOLDER in module._modules:
            del module._modules[HOLDER]
    for name, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(name, True))
    del model.__dict__[STATE]
    return model


def set_adapter_enabled(model: nn.Module, enabled: bool) -> None:
    require_state(model)
    for site in sites(model).values():
        site.set_enabled(enabled)


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """``with gk.disabled(model): ...`` runs the base model (an unmerged adapter is skipped)."""
    state = require_state(model)
    merged = [s for s in sites(model).values() if s.merged and not s.inplace]
    if merged:
        raise AdapterError(f"the {state.method} adapter is merged into the weights; call gk.unmerge_adapter(model) before disabling it")
    set_adapter_enabled(model, False)
    try:
        yield model
    finally:
        set_adapter_enabled(model, True)


def materialize_delta(model: nn.Module, *, include_heads: bool = True) -> dict[str, torch.Tensor]:
    """The dense per-parameter delta of the adapter, float32, in each base parameter's layout."""
    state = require_state(model)
    require_weight_delta(state, "materialize_delta")
    heads = set(state.train_also)
    out: dict[str, torch.Tensor] = {}
    for name, site in sites(model).items():
        if not include_heads and name in heads:
            continue
        prefix = name.rsplit(".", 1)[0] + "." if "." in name else ""
        for pname, delta in site.delta().items():
            out[prefix + pname] = delta.detach()
    return out


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) where total counts base parameters only (peft's total also counts the
    adapter's own tensors; for shares under 1% the two ratios agree to two digits)."""
    trainable = sum(p.numel() for p in trainable_parameters(model))
    total = sum(p.numel() for n, p in model.named_parameters() if f".{HOLDER}." not in f".{n}")
    return trainable, total
