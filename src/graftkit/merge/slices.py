"""``slices:`` - layer stacking and frankenmerges, mergekit's layer-range config.

    merge_method: passthrough
    slices:
      - sources: [{model: A, layer_range: [0, 4]}]
      - sources: [{model: B, layer_range: [2, 6]}]

The output's layers are the slices' layers in order, renumbered from 0 (here A's layers 0-3, then
B's layers 2-5 as layers 4-7), and ``num_hidden_layers`` is their count. Within a slice every source
covers the same number of layers; output layer ``i`` of the slice merges layer ``start_k + i`` of
each source ``k`` with the merge method (``passthrough`` takes one source and copies it, scaled by
its ``scale`` if given). As in mergekit:

* the tensors before the layers (the embeddings) come from the first slice's sources and the ones
  after them (final norm, LM head) from the last slice's sources, merged with the method;
* a parameter is looked up on the source, then the slice's ``parameters``, then the top-level
  ``parameters``; a gradient ``[v0, ..., vm]`` runs over each slice's own layers
  (``t = i / (length - 1)``, 1 for a one-layer slice; 0 for the embeddings, norm and head);
* a slice's base model is its ``base_model``, else the top-level one, and must be one of its sources.

The output config.json is the top-level ``base_model``'s, else the first slice's first source's
(mergekit takes an arbitrary referenced model's), with the layer count replaced and per-layer lists
(``layer_types`` and any list as long as the layer count, ``mlp_only_layers`` indices) rebuilt from
the layers each output layer came from.

The engine merges a slice config like any other: each source position of the slices becomes one
input (a :class:`RemappedCheckpoint` whose tensor names are the output's names and whose bytes are
the source layer's, read in place), so the fused kernels, chunking and the checks all apply.
Graftkit requires every slice to have the same number of sources (mergekit allows slices with
different counts for methods that take any number). With ``tokenizer_source``, merge/vocab.py
aligns each vocabulary tensor over the models that supply it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, UnsupportedError
from ..tensors import Checkpoint

LAYER_KEY = re.compile(r"^(.*?\.(?:layers|h|layer|blocks)\.)(\d+)(\..+)$")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# tensors that come before the layers (mergekit's pre_weights); every other non-layer tensor is a post weight
PRE_HINTS = ("embed_tokens", "wte", "wpe", "word_embeddings", "embed_in", "embed_positions", "position_embeddings",
             "token_type_embeddings", "embeddings.")
# config lists of layer indices (not one entry per layer)
LAYER_INDEX_LISTS = ("mlp_only_layers",)


class RemappedCheckpoint(Checkpoint):
    """A checkpoint whose tensor ``name`` is tensor ``source_name`` of another checkpoint: the bytes
    are read in place (byte-range reads, memory maps and the fused kernels work unchanged), only the
    names differ. ``mapping``: output name -> (checkpoint, its name)."""

    def __init__(self, label: str, mapping: dict[str, tuple[Checkpoint, str]]):
        self.path = Path(label)
        self.label = label
        self.sources = dict(mapping)
        self.files = {}
        self.headers = {}
        self._data_starts = {}
        self._pickled = None
        for out, (ckpt, name) in mapping.items():
            if ckpt._pickled is not None:
                raise UnsupportedError(f"{ckpt.path} holds pickled weights; slices and vocabulary alignment read safetensors "
                                       "only - convert it with save_pretrained(safe_serialization=True)")
            f, lo, _ = ckpt.byte_range(name)
            meta = ckpt.headers[ckpt.files[name]][name]
            self.files[out] = f
            self.headers.setdefault(f, {})[out] = meta
            self._data_starts[f] = lo - meta["data_offsets"][0]

    def get(self, key: str):
        ckpt, name = self.sources[key]
        return ckpt.get(name)

    def read(self, key: str, rows=None):
        ckpt, name = self.sources[key]
        return ckpt.read(name, rows)

    def byte_range(self, key: str):
        ckpt, name = self.sources[key]
        return ckpt.byte_range(name)


# -- the config ----------------------------------------------------------------------------------------

def uses_base(spec) -> bool:
    return bool(spec.needs_base or spec.base_as_input)


def slice_base(cfg, sl) -> str | None:
    return sl.base_model or cfg.base_model


def ordered_sources(cfg, spec, sl) -> list:
    """A slice's sources in the method's input order: its base first when the method uses one."""
    if not uses_base(spec):
        return list(sl.sources)
    base = slice_base(cfg, sl)
    first = next(i for i, s in enumerate(sl.sources) if s.model == base)
    return [sl.sources[first]] + [s for i, s in enumerate(sl.sources) if i != first]


def check_slices(cfg, spec) -> None:
    """The checks a ``slices:`` config needs before any file is opened (one-line ConfigErrors)."""
    if cfg.models:
        raise ConfigError("the config has both models: and slices:; give one of them (slices: lists layer ranges of models, "
                          "models: merges whole models)")
    if not cfg.slices:
        raise ConfigError("slices: is empty; list at least one slice ({sources: [{model: PATH, layer_range: [START, END]}]})")
    count = None
    for i, sl in enumerate(cfg.slices):
        if not sl.sources:
            raise ConfigError(f"slices[{i}] has no sources; give at least one {{model: PATH, layer_range: [START, END]}}")
        for j, src in enumerate(sl.sources):
            a, b = src.layer_range
            if a < 0 or b <= a:
                raise ConfigError(f"slices[{i}].sources[{j}] ({src.model}): layer_range [{a}, {b}] is empty or negative; "
                                  "give [START, END) with 0 <= START < END")
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sl.sources}
        if len(lengths) > 1:
            ranges = ", ".join(str(list(s.layer_range)) for s in sl.sources)
            raise ConfigError(f"slices[{i}]: the sources cover different numbers of layers ({ranges}); every source of a slice "
                              "must cover as many layers as the others")
        where = f"slices[{i}]"
        if uses_base(spec):
            base = slice_base(cfg, sl)
            if not base:
                raise ConfigError(f"merge_method {spec.name} needs a base model; add base_model: PATH (top level or in {where})")
            if not any(s.model == base for s in sl.sources):
                raise ConfigError(f"{where}: its base model {base} is not one of its sources; add a source "
                                  f"{{model: {base}, layer_range: [...]}} (the base's layers that the others are differences from)")
        # the tensors handed to the method: a delta method gets the base apart from the models
        n = len(sl.sources) - (1 if spec.needs_base and not spec.base_as_input else 0)
        # min_models counts as for models: (every model for a model-input method that requires its base, else the non-base ones)
        optional_base = spec.base_as_input and not spec.needs_base
        base = slice_base(cfg, sl)
        others = sum(1 for s in sl.sources if (spec.inputs == "model" and not optional_base) or s.model != base)
        if spec.max_models is not None and n > spec.max_models:
            most = spec.max_models
            raise ConfigError(f"{where} has {len(sl.sources)} sources but merge_method {spec.name} takes at most {most} "
                              f"{'model' if most == 1 else 'models'} per slice (passthrough: one source per slice)")
        if others < spec.min_models:
            raise ConfigError(f"{where}: merge_method {spec.name} needs at least {spec.min_models} source(s) besides the base; "
                              f"got {others}")
        if count is not None and len(sl.sources) != count:
            raise ConfigError(f"slices[{i}] has {len(sl.sources)} sources but slices[0] has {count}; graftkit merges slices "
                              "with one number of sources - split the merge in two (merge the slices, then stack them)")
        count = len(sl.sources)


def referenced_models(cfg) -> list[str]:
    """Every model a slice config reads, base first, in order of first mention."""
    found = [cfg.base_model] if cfg.base_model else []
    for sl in cfg.slices:
        found += [sl.base_model] if sl.base_model else []
        found += [s.model for s in sl.sources]
    return list(dict.fromkeys(found))


def layer_count(config: dict, keys) -> int:
    """A model's layer count: from its config.json, else from the highest layer index of its tensors."""
    for name in LAYER_COUNT_KEYS:
        if isinstance(config.get(name), int):
            return config[name]
    found = [int(m.group(2)) for k in keys if (m := LAYER_KEY.match(k))]
    return max(found) + 1 if found else 0


# -- the plan -------------------------------------------------------------------------------------

@dataclass
class OutLayer:
    slice: int
    sources: list[tuple[str, int]]   # (model, its layer), in the method's input order
    t: float                          # the gradient position inside the slice


@dataclass
class SlicePlan:
    """What the engine needs of a slice config: the inputs it reads (one per source position),
    each tensor's slice and gradient position, and the output config.json."""
    slots: list[str]                                 # input labels, method order
    ckpts: dict[str, RemappedCheckpoint]
    layers: list[OutLayer]
    slice_of: dict[str, int] = field(default_factory=dict)
    t: dict[str, float] = field(default_factory=dict)
    donor: str = ""
    config: dict = field(default_factory=dict)
    views: list = field(default_factory=list)        # per slice: a MergeConfig whose models are the slots

    def layer_t(self, key: str) -> float:
        return self.t.get(key, 0.0)

    def view(self, key: str):
        return self.views[self.slice_of.get(key, 0)]


def plan_layers(cfg, spec, counts: dict[str, int]) -> list[OutLayer]:
    """The output layers in order, each with the source layers it merges; a layer range past a
    model's last layer is a ConfigError."""
    out = []
    for i, sl in enumerate(cfg.slices):
        for j, src in enumerate(sl.sources):
            a, b = src.layer_range
            n = counts[src.model]
            if b > n:
                raise ConfigError(f"slices[{i}].sources[{j}]: layer_range [{a}, {b}] is out of range for {src.model}, which has "
                                  f"{n} layer{'s' if n != 1 else ''} (ranges are [START, END) with END <= {n})")
        srcs = ordered_sources(cfg, spec, sl)
        length = srcs[0].layer_range[1] - srcs[0].layer_range[0]
        for idx in range(length):
            t = idx / (length - 1) if length > 1 else 1.0
            out.append(OutLayer(i, [(s.model, s.layer_range[0] + idx) for s in srcs], t))
    return out


def split_keys(keys) -> tuple[dict[int, list[str]], list[str]]:
    """A model's tensor names as {layer index: names with the index replaced by ``{}``} and the
    names outside the layers."""
    layers: dict[int, list[str]] = {}
    other = []
    for k in keys:
        m = LAYER_KEY.match(k)
        if m:
            layers.setdefault(int(m.group(2)), []).append(m.group(1) + "{}" + m.group(3))
        else:
            other.append(k)
    return layers, other


def slot_labels(cfg, spec) -> list[str]:
    n = len(cfg.slices[0].sources)
    if uses_base(spec):
        return ["slices[*] base"] + [f"slices[*] source {k}" for k in range(1, n)]
    return [f"slices[*] source {k}" for k in range(n)]


def key_mapping(cfg, spec, layers: list[OutLayer], model_keys: dict[str, list[str]]) -> tuple[list[dict], dict, dict]:
    """Per input slot, output name -> (model, its name); and each output name's slice and ``t``.

    Raises ConfigError when a source lacks a tensor that the first source of its slice has."""
    slots = len(layers[0].sources) if layers else len(cfg.slices[0].sources)
    maps: list[dict[str, tuple[str, str]]] = [{} for _ in range(slots)]
    slice_of: dict[str, int] = {}
    ts: dict[str, float] = {}
    split = {m: split_keys(keys) for m, keys in model_keys.items()}

    def need(model: str, name: str, like: str, where: str) -> None:
        if name not in model_keys[model]:
            raise ConfigError(f"{where}: {model} has no tensor {name} (which {like} has); slices must come from models of one "
                              "architecture")

    first = ordered_sources(cfg, spec, cfg.slices[0])
    last = ordered_sources(cfg, spec, cfg.slices[-1])
    ref_model = first[0].model
    for name in split[ref_model][1]:
        pre = any(h in name for h in PRE_HINTS)
        srcs = first if pre else last
        for k, src in enumerate(srcs):
            need(src.model, name, ref_model, f"slices[{0 if pre else len(cfg.slices) - 1}]")
            maps[k][name] = (src.model, name)
        slice_of[name] = 0 if pre else len(cfg.slices) - 1
        ts[name] = 0.0
    for j, layer in enumerate(layers):
        lead_model, lead_layer = layer.sources[0]
        templates = split[lead_model][0].get(lead_layer, [])
        for tpl in templates:
            out = tpl.format(j)
            for k, (model, idx) in enumerate(layer.sources):
                name = tpl.format(idx)
                need(model, name, f"{lead_model} layer {lead_layer}", f"slices[{layer.slice}]")
                maps[k][out] = (model, name)
            slice_of[out] = layer.slice
            ts[out] = layer.t
    return maps, slice_of, ts


def rewrite_config(config: dict, layers: list[OutLayer], configs: dict[str, dict]) -> dict:
    """The output config.json: ``config`` (the donor's) with the layer count set to the output's
    and its per-layer settings taken from the layer each output layer came from."""
    out = dict(config)
    count_key = next((k for k in LAYER_COUNT_KEYS if isinstance(config.get(k), int)), "num_hidden_layers")
    donor_n = config.get(count_key)
    out[count_key] = len(layers)
    for key, value in config.items():
        if key == "architectures" or not isinstance(value, list) or not isinstance(donor_n, int) or len(value) != donor_n:
            continue
        new = []
        for layer in layers:
            model, idx = layer.sources[0]
            theirs = configs.get(model, {}).get(key)
            src = theirs if isinstance(theirs, list) and len(theirs) > idx else value
            new.append(src[idx] if idx < len(src) else value[-1])
        out[key] = new
    for key in LAYER_INDEX_LISTS:
        if isinstance(config.get(key), list):
            out[key] = [j for j, layer in enumerate(layers)
                        if layer.sources[0][1] in (configs.get(layer.sources[0][0], {}).get(key) or [])]
    return out


def build_slice_plan(cfg, spec, ckpts: dict[str, Checkpoint], read_config: Callable[[str], dict]) -> SlicePlan:
    """Everything the engine needs to merge a slice config, from the opened source checkpoints."""
    configs = {m: read_config(m) for m in ckpts}
    model_keys = {m: list(c.keys()) for m, c in ckpts.items()}
    counts = {m: layer_count(configs[m], model_keys[m]) for m in ckpts}
    for m in ckpts:
        if counts[m] == 0:
            raise ConfigError(f"{m} has no numbered layers (model.layers.N...), so slices cannot take layer ranges of it")
    layers = plan_layers(cfg, spec, counts)
    maps, slice_of, ts = key_mapping(cfg, spec, layers, model_keys)
    labels = slot_labels(cfg, spec)
    slot_ckpts = {label: RemappedCheckpoint(label, {out: (ckpts[m], name) for out, (m, name) in mp.items()})
                  for label, mp in zip(labels, maps)}
    donor = cfg.base_model or cfg.slices[0].sources[0].model
    views = []
    from .config import InputModel

    for sl in cfg.slices:
        srcs = ordered_sources(cfg, spec, sl)
        models = [InputModel(model=label, parameters=s.parameters) for label, s in zip(labels, srcs)]
        views.append(cfg.model_copy(update={"models": models, "slices": None, "base_model": labels[0] if uses_base(spec) else None,
                                             "parameters": {**cfg.parameters, **sl.parameters}}))
    config = rewrite_config(configs.get(donor) or {}, layers, configs) if configs.get(donor) else {}
    return SlicePlan(labels, slot_ckpts, layers, slice_of, ts, donor, config, views)


def describe_slices(sp: SlicePlan) -> list[str]:
    """``--dry-run`` lines: the output layers and where each run of them comes from."""
    lines = [f"layers        {len(sp.layers)} output layers"]
    start = 0
    for i in range(1, len(sp.layers) + 1):
        if i == len(sp.layers) or sp.layers[i].slice != sp.layers[start].slice:
            first, last = sp.layers[start], sp.layers[i - 1]
            src = "; ".join(f"{m} {a}-{b}" for (m, a), (_, b) in zip(first.sources, last.sources))
            lines.append(f"  layers {start}-{i - 1}  <- {src}")
            start = i
    return lines


def to_merge_inputs(cfg) -> list[tuple[str, Any]]:
    return [("model", m) for m in referenced_models(cfg)]
