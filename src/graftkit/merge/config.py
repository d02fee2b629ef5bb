"""The merge config: mergekit's YAML schema for what it covers, strict about everything else.

    merge_method: ties
    base_model: path/to/base
    models:
      - model: path/to/ft1
        parameters: {weight: 1.0, density: 0.5}
      - model: path/to/ft2
        parameters: {weight: 0.5, density: 0.5}
    parameters: {normalize: true, lambda: 1.0}
    dtype: bfloat16            # mergekit's load dtype; graftkit always computes in float32
    out_dtype: bfloat16        # stored dtype (default: dtype, else each input tensor's own)
    tokenizer_source: base

graftkit extras: ``seed`` (DARE masks), ``max_shard_size``, ``threads``, ``output: adapter`` with
``rank``, ``exclude`` (tensors left out of the merge, see :func:`exclude_matcher`), ``search``
(grid / greedy soup, see :mod:`graftkit.merge.search`), and ``data`` (the examples of a data-aware
method, top level or per model, see :class:`DataBlock` and :mod:`graftkit.merge.data`). A parameter value may be a number or mergekit's filter list
``[{filter: mlp, value: 0.3}, {value: 0.5}]`` (first entry whose filter is a substring of the
tensor name wins). Unknown keys - at any level, including parameter names a method does not
take - are one-line ConfigErrors.
"""
from __future__ import annotations

import fnmatch
import math
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import Field

from ..config import StrictModel, parse_config, read_yaml
from ..errors import ConfigError
from ..validate import parse_size

DTYPES = ("float32", "float16", "bfloat16", "float64")


class FilterValue(StrictModel):
    filter: Optional[str] = None
    value: Union[float, list[float]]


# a number, a gradient (list of numbers interpolated over the layers), or filter entries
ParamValue = Union[bool, int, float, str, list[float], list[FilterValue], None]


class DataBlock(StrictModel):
    """The examples a data-aware method (fisher, regmean, ...) runs each input model on: ``task`` is a
    task as ``graft eval`` takes it (a mapping: name, kind, file, fields...) or the path of a task
    file (its kind then follows the model: classification for a sequence classifier, perplexity
    text for a causal LM); the first ``examples`` rows are used. Given at the top level for every
    input, or on one input (``models[i].data``), whose keys then replace the top-level ones."""

    task: Optional[Union[str, dict[str, Any]]] = None
    examples: Optional[int] = Field(None, ge=1)
    batch_size: Optional[int] = Field(None, ge=1)
    fisher: Optional[Literal["expected", "empirical"]] = None

    def over(self, other: Optional["DataBlock"]) -> "DataBlock":
        """This block's keys over ``other``'s (a model's own block over the top-level one)."""
        if other is None:
            return self
        return DataBlock(**{**other.model_dump(exclude_unset=True), **self.model_dump(exclude_unset=True)})


class InputModel(StrictModel):
    model: str
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    data: Optional[DataBlock] = None


class InputSlice(StrictModel):
    """One source of an output slice: layers ``[start, end)`` of ``model`` (mergekit's ``layer_range``)."""
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


class OutputSlice(StrictModel):
    """A run of output layers: the sources' layer ranges (all of one length) merged layer by layer
    with the merge method (``passthrough`` takes one source and copies it)."""
    sources: list[InputSlice]
    base_model: Optional[str] = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


class SearchConfig(StrictModel):
    grid: dict[str, list[float]] = Field(default_factory=dict)
    command: Optional[str] = None


class MergeConfig(StrictModel):
    merge_method: str
    base_model: Optional[str] = None
    models: list[InputModel] = Field(default_factory=list)
    slices: Optional[list[OutputSlice]] = None  # layer stacking / frankenmerges (merge/slices.py)
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: Optional[Literal["float32", "float16", "bfloat16", "float64"]] = None
    out_dtype: Optional[Literal["float32", "float16", "bfloat16", "float64"]] = None
    tokenizer_source: Optional[str] = None
    name: Optional[str] = None
    # graftkit extras
    seed: Optional[int] = None
    max_shard_size: Union[int, str] = "2GB"
    threads: Optional[int] = Field(None, ge=1)
    output: Literal["model", "adapter"] = "model"
    rank: Optional[Union[int, Literal["auto"]]] = None  # output: adapter; auto: the smallest per key within max_error
    max_error: Optional[float] = None
    dora: Optional[bool] = None  # output: adapter: magnitude + direction (default: when an input is DoRA)
    search: Optional[SearchConfig] = None
    exclude: list[str] = Field(default_factory=list)
    data: Optional[DataBlock] = None  # data-aware methods only: see DataBlock

    def data_for(self, model: str) -> Optional[DataBlock]:
        """The data block of one input: its own keys over the top-level ones (None when neither)."""
        own = next((m.data for m in self.models if m.model == model and m.data is not None), None)
        return own.over(self.data) if own is not None else self.data

    # -- resolution helpers ---------------------------------------------------------------
    def method(self):
        from ..registry import MERGES
        from . import breadcrumbs  # noqa: F401  (registration)

        return MERGES.get(self.merge_method)


_MISSING = object()


def _check_value(where: str, name: str, value, default=_MISSING) -> None:
    """One parameter value against the kind of its default: a switch, a word, or a number (or a
    per-layer list of numbers, or filter entries) in its range."""
    if value is None:
        return
    if isinstance(default, bool):
        if not isinstance(value, bool) and value not in (0, 1):
            raise ConfigError(f"{where}: parameter {name!r} is {value!r}; it must be true or false")
        return
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: parameter {name!r} is {value!r}; it must be a word such as {default!r}")
        return
    if isinstance(value, (bool, str)):
        raise ConfigError(f"{where}: parameter {name!r} is {value!r}; it must be a number (or a list of numbers over the layers, "
                          "or [{filter: NAME, value: NUMBER}, ...] entries)")
    values = []
    for v in (value if isinstance(value, list) else [value]):
        v = v.value if isinstance(v, FilterValue) else v
        values.extend(v if isinstance(v, list) else [v])
    for v in values:
        if not math.isfinite(float(v)):
            raise ConfigError(f"{where}: parameter {name!r} is {v}; it must be a finite number")
        if name in ("density",) and not 0 < float(v) <= 1:
            raise ConfigError(f"{where}: density {v} is out of range; it must be in (0, 1] (the share of each delta kept)")
        if name in ("gamma", "t") and not 0 <= float(v) <= 1:
            raise ConfigError(f"{where}: {name} {v} is out of range; it must be in [0, 1]")
        if name == "epsilon" and not 0 <= float(v) < 1:
            raise ConfigError(f"{where}: epsilon {v} is out of range; it must be in [0, 1)")
        if name == "select_topk" and not 0 < float(v) <= 1:
            raise ConfigError(f"{where}: select_topk {v} is out of range; it must be in (0, 1] (the share of entries kept, "
                              "ranked by their variance across the models)")


def _suffixes(name: str):
    parts = name.split(".")
    for i in range(len(parts)):
        yield ".".join(parts[i:])


def exclude_matcher(patterns: list[str]):
    """``exclude`` patterns as a predicate on tensor names, matched as :mod:`graftkit.targets` does
    (without importing torch): ``re:<regex>`` must match the whole tensor name or its owner's
    name (the name minus its last part); anything else is a case-sensitive glob that may match
    the whole name, the owner's name, or any dotted suffix of either (``classifier.*`` and
    ``classifier`` both select ``classifier.weight`` and ``classifier.bias``). ``None`` when
    there are no patterns."""
    if not patterns:
        return None
    compiled = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"exclude: {pattern!r} is not a pattern; give glob patterns or 're:REGEX' strings")
        if pattern.startswith("re:"):
            try:
                compiled.append((pattern, re.compile(pattern[3:])))
            except re.error as exc:
                raise ConfigError(f"exclude: {pattern!r} is not a valid regular expression ({exc})") from None
        else:
            compiled.append((pattern, None))

    def hits(pattern_rx, name: str) -> bool:
        pattern, rx = pattern_rx
        names = (name, name.rsplit(".", 1)[0]) if "." in name else (name,)
        if rx is not None:
            return any(rx.fullmatch(n) for n in names)
        return any(fnmatch.fnmatchcase(s, pattern) for n in names for s in _suffixes(n))

    def excluded(name: str) -> bool:
        return any(hits(c, name) for c in compiled)

    def unmatched(names) -> list[str]:
        """The patterns that select none of ``names``."""
        names = list(names)
        return [c[0] for c in compiled if not any(hits(c, n) for n in names)]

    excluded.unmatched = unmatched
    return excluded


def _like(spec, name: str):
    """A value of the declared kind of parameter ``name`` for :func:`_check_value` (its default,
    or a stand-in when a required or unset parameter has none)."""
    p = spec.param(name)
    if p is None:
        return _MISSING
    if p.default is not None:
        return p.default
    return {bool: False, str: ""}.get(p.kind, _MISSING)


def validate(cfg: MergeConfig) -> MergeConfig:
    """Check the config against its method: parameter names, ranges, base model, model count."""
    spec = cfg.method()
    if cfg.slices is not None:
        return _validate_slices(cfg, spec)
    if spec.needs_base and not cfg.base_model:
        raise ConfigError(f"merge_method {spec.name} needs a base_model (the task vectors are differences from it); add 'base_model: PATH'")
    accepted_model = set(spec.model_params)
    accepted_global = set(spec.global_params) | accepted_model
    for name, value in cfg.parameters.items():
        if name not in accepted_global:
            raise ConfigError(f"parameters: unknown parameter {name!r} for merge_method {spec.name}; accepted: {', '.join(sorted(accepted_global)) or 'none'}")
        _check_value("parameters", name, value, _like(spec, name))
    if cfg.parameters.get("scope", "tensor") not in ("tensor", "global"):
        raise ConfigError(f"parameters.scope must be 'tensor' (per-tensor trimming, mergekit's) or 'global' (one threshold per model); got {cfg.parameters['scope']!r}")
    optional_base = spec.base_as_input and not spec.needs_base  # nuslerp, multislerp, karcher: min/max count the others
    if spec.base_as_input and spec.needs_base and spec.max_models is not None:
        others = [m for m in cfg.models if m.model != cfg.base_model]
        if len(others) != spec.max_models - 1:
            want = spec.max_models - 1
            raise ConfigError(f"merge_method {spec.name} takes the base_model and exactly {'one' if want == 1 else want} other "
                              f"model{'s' if want != 1 else ''}; got {len(others)} other model(s)")
    for p in spec.params:
        if p.required and not p.per_model and p.name not in cfg.parameters:
            raise ConfigError(f"merge_method {spec.name} needs parameters.{p.name} (it has no default); add it to parameters")
    non_base = [m for m in cfg.models if (spec.inputs == "model" and not spec.base_as_input) or m.model != cfg.base_model]
    if len(non_base) < spec.min_models - (1 if spec.base_as_input and spec.needs_base else 0):  # slerp's 2 count its base
        raise ConfigError(f"merge_method {spec.name} needs at least {spec.min_models} model(s) besides the base; got {len(non_base)}")
    if optional_base and spec.max_models is not None and len(non_base) > spec.max_models:
        raise ConfigError(f"merge_method {spec.name} takes {'exactly' if spec.min_models == spec.max_models else 'at most'} "
                          f"{spec.max_models} model(s) besides the base_model; got {len(non_base)}")
    if not spec.base_as_input and spec.max_models is not None and len(non_base) > spec.max_models:  # passthrough: one
        raise ConfigError(f"merge_method {spec.name} takes at most {spec.max_models} model(s); got {len(non_base)} "
                          "(to take layers from several models, list them in slices:, docs/merge.md)")
    _check_data(cfg, spec, non_base)
    for i, m in enumerate(cfg.models):
        for name, value in m.parameters.items():
            if name not in accepted_model:
                raise ConfigError(f"models[{i}] ({m.model}): unknown parameter {name!r} for merge_method {spec.name}; accepted: {', '.join(sorted(accepted_model)) or 'none'}")
            _check_value(f"models[{i}] ({m.model})", name, value, _like(spec, name))
    for p in spec.params:
        missing = [m.model for m in non_base if p.required and p.per_model and p.name not in m.parameters and p.name not in cfg.parameters]
        if missing:
            raise ConfigError(f"merge_method {spec.name} needs {p.name} for every model (it has no default), and {missing[0]} has none; "
                              f"add parameters: {{{p.name}: ...}} to that model (or to the top-level parameters)")
    weights = [m.parameters.get("weight", cfg.parameters.get("weight", spec.model_params.get("weight", 1.0))) for m in non_base]
    normalize = cfg.parameters.get("normalize", spec.global_params.get("normalize", False))
    if "weight" in spec.model_params and normalize and all(isinstance(w, (int, float)) for w in weights) and abs(sum(weights)) < 1e-8:
        raise ConfigError(f"the model weights sum to {sum(weights)} and normalize is on, so the merge would divide by zero; change the weights or set normalize: false")
    # (nuslerp's weights are a ratio - all 0 is t = 1/2, as in mergekit - and multislerp checks its own)
    if "weight" in spec.model_params and not spec.base_as_input and non_base and all(isinstance(w, (int, float)) and not isinstance(w, bool) and w == 0 for w in weights):
        # every task vector scaled by 0: the output would be the base model, written as if merged
        raise ConfigError(f"every model weight is 0, so {spec.name} would write {'base_model unchanged' if spec.needs_base else 'all zeros'}; give at least one model a "
                          "nonzero weight (to copy the base, use it directly)")
    if "gamma" in spec.model_params:
        _check_crumbs(cfg, spec, non_base)
    if "epsilon" in spec.model_params:
        _check_magprune(cfg, spec, non_base)
    if spec.check is not None:
        spec.check(cfg)
    parse_size(cfg.max_shard_size)
    exclude_matcher(cfg.exclude)  # bad regexes fail here, before any file is opened
    if cfg.output == "adapter" and cfg.rank is None:
        raise ConfigError("output: adapter needs rank: R (the rank of the LoRA to write), or rank: auto with max_error: X")
    _check_rank(cfg)
    if cfg.search is not None:
        for name in cfg.search.grid:
            if name not in accepted_global:
                raise ConfigError(f"search.grid: unknown parameter {name!r} for merge_method {spec.name}; accepted: {', '.join(sorted(accepted_global))}")
            for value in cfg.search.grid[name]:
                _check_value(f"search.grid.{name}", name, value, _like(spec, name))
        if "weight" in spec.model_params and 0 in cfg.search.grid.get("weight", []):
            raise ConfigError("search.grid.weight has 0, which sets every model's weight to 0 and would write base_model as a trial; "
                              "drop it (the base model needs no merge)")
    return cfg


def _check_data(cfg: MergeConfig, spec, non_base) -> None:
    """A data-aware method needs a task for every input; any other method takes no data."""
    kind = getattr(spec, "data", None)
    given = cfg.data is not None or any(m.data is not None for m in cfg.models)
    if kind is None:
        if given:
            raise ConfigError(f"merge_method {spec.name} uses no data, but the config has a data: block; remove it "
                              "(data-aware methods: fisher, regmean, ...; see docs/merge.md)")
        return
    alpha = cfg.parameters.get("alpha")
    if kind == "gram" and isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and not 0 <= alpha <= 1:
        raise ConfigError(f"parameters.alpha is {alpha}; it scales the Gram matrices' off-diagonal entries and must be in [0, 1] "
                          "(1: the exact closed form, 0: per-feature weighted averaging)")
    for m in non_base:
        block = cfg.data_for(m.model)
        if block is None or block.task is None:
            raise ConfigError(f"merge_method {spec.name} computes {kind} statistics of each model on examples, but "
                              f"{'no data: block is given' if not given else f'{m.model} has no data task'}; add "
                              "'data: {task: TASK_FILE_OR_SPEC, examples: N}' (docs/merge.md, data-aware merges)")


def _validate_slices(cfg: MergeConfig, spec) -> MergeConfig:
    """A ``slices:`` config: the slices' structure (merge/slices.py; the layer ranges are checked
    against the models' layer counts when the plan opens them), then every parameter block of it -
    top level, per slice and per source - against the method, as for ``models:``."""
    from .slices import check_slices

    check_slices(cfg, spec)
    if getattr(spec, "data", None) or cfg.data is not None:
        raise ConfigError(f"merge_method {spec.name} with a data: block does not take slices:; merge whole models (models:) instead")
    accepted_model = set(spec.model_params)
    accepted_global = set(spec.global_params) | accepted_model
    blocks = [("parameters", cfg.parameters)] + [(f"slices[{i}].parameters", s.parameters) for i, s in enumerate(cfg.slices)]
    for where, params in blocks:
        for name, value in params.items():
            if name not in accepted_global:
                raise ConfigError(f"{where}: unknown parameter {name!r} for merge_method {spec.name}; accepted: {', '.join(sorted(accepted_global)) or 'none'}")
            _check_value(where, name, value, _like(spec, name))
    for i, sl in enumerate(cfg.slices):
        for j, src in enumerate(sl.sources):
            where = f"slices[{i}].sources[{j}] ({src.model})"
            for name, value in src.parameters.items():
                if name not in accepted_model:
                    raise ConfigError(f"{where}: unknown parameter {name!r} for merge_method {spec.name}; accepted: {', '.join(sorted(accepted_model)) or 'none'}")
                _check_value(where, name, value, _like(spec, name))
        for p in spec.params:
            if p.required and not p.per_model and p.name not in cfg.parameters and p.name not in sl.parameters:
                raise ConfigError(f"merge_method {spec.name} needs parameters.{p.name} (it has no default); add it to parameters "
                                  f"or to slices[{i}].parameters")
    parse_size(cfg.max_shard_size)
    exclude_matcher(cfg.exclude)
    if cfg.output == "adapter" or cfg.search is not None:
        what = "output: adapter" if cfg.output == "adapter" else "search"
        raise ConfigError(f"{what} does not take slices: (a layer-stacked model has no single base to take a delta from); "
                          "merge with slices first, then use the output as a model")
    return cfg


def _check_rank(cfg: MergeConfig) -> None:
    """``rank`` / ``max_error`` / ``dora`` of ``output: adapter``, checked as graft extract-lora checks its flags."""
    from .extract_lora import check_rank_options

    if cfg.output != "adapter":
        extra = [k for k in ("max_error", "dora") if getattr(cfg, k) is not None]  # rank alone stays ignored, as before
        if extra:
            raise ConfigError(f"{extra[0]} applies to output: adapter (a merge written as a LoRA); add output: adapter or drop {extra[0]}")
        return
    if cfg.rank == "auto" and cfg.max_error is None:
        raise ConfigError("rank: auto needs max_error: X (the relative Frobenius error each key may have, e.g. 0.05)")
    if cfg.rank != "auto" and cfg.max_error is not None:
        raise ConfigError("max_error goes with rank: auto (the smallest rank per key within it); set rank: auto or drop max_error")
    check_rank_options(rank=None if cfg.rank == "auto" else cfg.rank, max_error=cfg.max_error, flag=False)


def _check_crumbs(cfg: MergeConfig, spec, non_base) -> None:
    """breadcrumbs keeps the entries ranked between the top ``gamma`` share and ``gamma + density``:
    past 1 there are not that many entries, and the mask would silently keep fewer."""
    def top(value, default):
        if value is None:
            return default
        if isinstance(value, list):
            return max((top(v.value if isinstance(v, FilterValue) else v, default) for v in value), default=default)
        return float(value)

    for i, m in enumerate(non_base):
        gamma = top(m.parameters.get("gamma", cfg.parameters.get("gamma")), spec.model_params["gamma"])
        density = top(m.parameters.get("density", cfg.parameters.get("density")), spec.model_params["density"])
        if density < 1 and gamma + density > 1 + 1e-9:
            raise ConfigError(f"{m.model}: gamma {gamma} + density {density} = {gamma + density:g} > 1; breadcrumbs drops the top gamma "
                              "share and keeps the next density share, so the two must sum to at most 1 - lower one of them")


def _check_magprune(cfg: MergeConfig, spec, non_base) -> None:
    """della's keep probabilities run from density - epsilon to density + epsilon: both ends must
    be probabilities strictly inside (0, 1) wherever a delta is pruned (density < 1)."""
    def numbers(value, default):
        if value is None:
            return [default]
        if isinstance(value, list):
            return [x for v in value for x in numbers(v.value if isinstance(v, FilterValue) else v, default)]
        return [float(value)]

    for m in non_base:
        densities = [d for d in numbers(m.parameters.get("density", cfg.parameters.get("density")), spec.model_params["density"]) if d < 1]
        epsilon = max(numbers(m.parameters.get("epsilon", cfg.parameters.get("epsilon")), spec.model_params["epsilon"]))
        if densities and (min(densities) - epsilon <= 0 or max(densities) + epsilon >= 1):
            d = min(densities) if min(densities) - epsilon <= 0 else max(densities)
            raise ConfigError(f"{m.model}: density {d} with epsilon {epsilon} keeps entries with probabilities from {d - epsilon:g} "
                              f"to {d + epsilon:g}; {spec.name} needs density - epsilon > 0 and density + epsilon < 1 - lower epsilon")


def load_config(config: Any) -> MergeConfig:
    """A MergeConfig from a MergeConfig, a dict, or a YAML file path."""
    if isinstance(config, MergeConfig):
        return validate(config)
    if isinstance(config, (str, Path)):
        config = read_yaml(config, "merge config")
    return validate(parse_config(MergeConfig, config))


def resolve(value, key: str, t: float = 0.0):
    """A parameter's value for one tensor, as mergekit resolves it: in a filter list the first
    entry whose filter is a substring of the tensor name wins (``*`` or no filter match all); a
    gradient ``[v0, ..., vm]`` is interpolated linearly at ``t`` = layer index / (layers - 1)
    (0 for tensors outside the layers: embeddings, final norm, head)."""
    if isinstance(value, list):
        if not value:
            return None
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            scaled = t * (len(value) - 1)
            i0 = int(scaled)
            i1 = min(len(value) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * float(value[i0]) + frac * float(value[i1])
        for entry in value:
            if entry.filter is None or entry.filter == "*" or entry.filter in key:
                return resolve(entry.value, key, t)
        return None
    return value
