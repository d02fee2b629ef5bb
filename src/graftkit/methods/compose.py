"""Composing tuning methods in one model: the unified view and the MAM adapter.

He et al., 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning": prefix
tuning, LoRA and adapters all add a modification ``delta h`` to some hidden state ``h`` of the
frozen model, and methods placed at different positions combine. Their MAM adapter ("mix and
match") puts prefix tuning on attention and a scaled parallel adapter on the feed-forward
sublayer:

    h_attn <- h_attn + delta h_prefix,      h_ffn <- h_ffn + s * W_up f(W_down x_ffn)

A composition is one config list, each entry a method's own config::

    method: compose
    methods:
      - {method: parallel_adapter, reduction_factor: 16}
      - {method: lora, targets: [q_proj, v_proj], r: 8}

Every component resolves its own sites; the adapter holds their union, saved with the component
index of each target in ``target_options`` (``{"component": i, ...}``) so a load rebuilds exactly
the same sites. Each module carries at most one component: two components on one module (two
sites on one parameter, weight sites on two parameters of one module, or a weight site on a
module's parameter and a module site on the module itself) would depend on the order their hooks
run in, so they are refused in one line naming both methods and the module. Parameters are
matched by their owner module, so a parallel adapter on ``mlp`` and LoRA on ``mlp.down_proj``
compose (the adapter reads and changes what ``mlp`` returns, LoRA changes ``down_proj``).

The composition's capabilities come from its parts: it has a weight delta (``materialize_delta``,
merging, ``export --merged``, merge inputs through each part's ``merge_deltas``) only if every
part has one, and it is the identity at init when every part is.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

from pydantic import field_validator, model_validator
from torch import nn

from ..config import parse_config
from ..errors import AdapterError, ConfigError, GraftError, TargetError, UnsupportedError
from ..registry import METHODS
from .base import MethodConfig, SavedTarget, Site, TuningMethod

#: the target_options entry holding a target's component index
COMPONENT = "component"
_SPACE_ORDER = ("weight", "activation", "sequence")


class ComposeConfig(MethodConfig):
    #: the component methods, each ``{method: NAME, **its config}`` (normalised to the full config)
    methods: list[dict[str, Any]]

    @field_validator("methods", mode="before")
    @classmethod
    def _parts(cls, value: Any) -> list[dict[str, Any]]:
        if not isinstance(value, list):
            raise ConfigError(f"compose: methods must be a list of method configs, got {value!r}")
        if not value:
            raise ConfigError("compose: methods is empty; list the methods to combine, e.g. "
                              "[{method: parallel_adapter}, {method: lora, targets: [q_proj, v_proj]}]")
        out = []
        for i, entry in enumerate(value):
            method, config = _parse_part(i, entry)
            out.append({"method": method.name, **config.model_dump(mode="json")})
        return out

    @model_validator(mode="after")
    def _no_own_targets(self):
        # the selection keys belong to the components; set here they would be ignored
        for key in ("targets", "exclude", "module_types", "layers"):
            if getattr(self, key):
                raise ConfigError(f"compose: {key} belongs to each component method, not to the composition; "
                                  f"move it into the entries of methods")
        return self

    def parts(self) -> list[tuple[type[TuningMethod], MethodConfig]]:
        """``(method, its config)`` per component, in order."""
        return [_parse_part(i, entry) for i, entry in enumerate(self.methods)]


def _parse_part(i: int, entry: Any) -> tuple[type[TuningMethod], MethodConfig]:
    if not isinstance(entry, dict) or not isinstance(entry.get("method"), str):
        raise ConfigError(f"compose: methods[{i}] must be a mapping with a 'method' key naming a tuning method, got {entry!r}")
    data = dict(entry)
    name = data.pop("method")
    if name not in METHODS:
        close = [n for n in METHODS.names() if not issubclass(METHODS.get(n), Compose)]
        raise ConfigError(f"compose: methods[{i}] names an unknown method {name!r}; choose one of {', '.join(close)}")
    method = METHODS.get(name)
    if issubclass(method, Compose):
        raise ConfigError(f"compose: methods[{i}] is itself a {name}; compositions do not nest - list its methods in the outer methods list")
    try:
        config = parse_config(method.config_cls, data)
    except ConfigError as exc:
        raise ConfigError(f"compose: methods[{i}] ({name}): {exc}") from None
    if config.train_also:
        raise ConfigError(f"compose: methods[{i}] ({name}) has train_also; parameters trained whole belong to the composition: "
                          "put train_also next to methods")
    return method, config


def _config(config: Any) -> ComposeConfig:
    if isinstance(config, ComposeConfig):
        return config
    data = dict(config or {})
    data.pop("method", None)  # a recipe's method section names the composition itself
    return parse_config(ComposeConfig, data)


def _component(config: Any, options: dict, name: str, where: str) -> tuple[type[TuningMethod], MethodConfig, dict]:
    """The component that owns target ``name``: its method, config and own options."""
    parts = _config(config).parts()
    index = (options or {}).get(COMPONENT)
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(parts):
        raise AdapterError(f"{where}: target {name} has no valid component index in target_options (got {index!r}, "
                           f"{len(parts)} components); the adapter.json is corrupt - re-save the adapter")
    method, part = parts[index]
    return method, part, {k: v for k, v in options.items() if k != COMPONENT}


def _as_part(adapter: Any, method: type[TuningMethod], part: MethodConfig) -> Any:
    """``adapter`` seen as an adapter of one component (its checks read the method's own config)."""
    return replace(adapter, meta={**adapter.meta, "method": method.name, "config": part.model_dump(mode="json")})


def _merge_deltas(t: SavedTarget) -> dict:
    method, part, options = _component(t.config, t.options, t.name, t.where)
    if method.merge_deltas is None:
        raise UnsupportedError(f"{t.where}: its {method.name} part (on {t.name}) cannot be a merge input; export the adapter "
                               "merged first (graft export ADAPTER --base BASE --merged OUT) and merge that model")
    return method.merge_deltas(replace(t, config=part.model_dump(mode="json"), options=options))


def _check_saved(adapter, name: str, options: dict, where: str) -> None:
    method, part, own = _component(adapter.meta.get("config"), options, name, where)
    if method.check_saved is not None:
        method.check_saved(_as_part(adapter, method, part), name, own, where)


def _saved_shapes(adapter, name: str, kind: str, base_shape: tuple, feedforward: bool = False) -> dict:
    options = (adapter.meta.get("target_options") or {}).get(name) or {}
    method, part, _ = _component(adapter.meta.get("config"), options, name, str(adapter.path or "the adapter"))
    if method.saved_shapes is None:
        return {}
    return method.saved_shapes(_as_part(adapter, method, part), name, kind, base_shape, feedforward)


@METHODS.register("compose")
class Compose(TuningMethod):
    name = "compose"
    config_cls = ComposeConfig
    kinds = ()
    #: a composition's own space is :meth:`space_of` its config; the class answers for the case
    #: that needs a word at all (a refusal of a weight-only operation: some part is not weight-space)
    space: ClassVar[str] = "activation"
    merge_deltas = staticmethod(_merge_deltas)
    check_saved = staticmethod(_check_saved)
    saved_shapes = staticmethod(_saved_shapes)

    @classmethod
    def weight_delta(cls, config: Any) -> bool:
        return all(m.weight_delta(c) for m, c in _config(config).parts())

    @classmethod
    def space_of(cls, config: Any) -> str:
        """The widest space of the parts: weight < activation < sequence."""
        return max((m.space for m, _ in _config(config).parts()), key=_SPACE_ORDER.index)

    @classmethod
    def identity_for(cls, config: Any) -> bool:
        """Whether a fresh adapter with ``config`` leaves the model's outputs unchanged (every part does)."""
        return all(m.identity_at_init for m, _ in _config(config).parts())

    @classmethod
    def batch_hook(cls, config: Any):
        hooks = [h for h in (m.batch_hook(c) for m, c in _config(config).parts()) if h is not None]
        if not hooks:
            return None

        def every_part(batch: dict) -> None:
            for hook in hooks:
                hook(batch)

        return every_part

    @classmethod
    def frozen_base_in_bf16(cls, config: dict[str, Any]) -> bool:
        return all(m.frozen_base_in_bf16(c.model_dump(mode="json")) for m, c in _config(config).parts())

    @classmethod
    def find(cls, model: nn.Module, name: str):
        # the component is not known here (target_options say it); the name alone tells a module
        # from a parameter
        from .activation import find_target

        return find_target(model, name)

    @classmethod
    def resolve(cls, model: nn.Module, config: ComposeConfig, skip=()):
        infos: list = []
        options: dict[str, dict[str, Any]] = {}
        owners: dict[str, tuple[int, str, str]] = {}  # module name -> (component, method, target)
        for i, (method, part) in enumerate(config.parts()):
            try:
                found, opts = method.resolve(model, part, skip)
            except GraftError as exc:  # say which part of the composition could not be placed
                raise type(exc)(f"compose: methods[{i}] ({method.name}): {exc}") from None
            for info in found:
                module = info.module_name
                prior = owners.get(module)
                if prior is not None and prior[0] != i:
                    raise TargetError(
                        f"compose: {prior[1]} (methods[{prior[0]}]) and {method.name} (methods[{i}]) both attach to "
                        f"{module or 'the model'} ({prior[2]} and {info.name}); a module carries one method - narrow the "
                        "targets, exclude or layers of one of them")
                owners.setdefault(module, (i, method.name, info.name))
                infos.append(info)
                options[info.name] = {COMPONENT: i, **(opts.get(info.name) or {})}
        return infos, options

    @classmethod
    def make_sites(cls, infos: list, config: ComposeConfig, options: dict[str, dict[str, Any]]) -> list[Site]:
        groups: dict[int, list[tuple[int, Any, dict]]] = {}
        for at, info in enumerate(infos):
            method, _, own = _component(config, options.get(info.name) or {}, info.name, "the adapter")
            groups.setdefault(options[info.name][COMPONENT], []).append((at, info, own))
        parts = config.parts()
        sites: list[Any] = [None] * len(infos)
        # each component builds its sites together (a component may share tensors among them)
        for index, items in groups.items():
            method, part = parts[index]
            built = method.make_sites([info for _, info, _ in items], part, {info.name: own for _, info, own in items})
            for (at, _, _), site in zip(items, built):
                sites[at] = site
        return sites
