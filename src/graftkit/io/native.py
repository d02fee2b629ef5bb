"""The native adapter folder and its in-memory form.

A folder holds ``adapter.json`` and ``adapter.safetensors``. The JSON records the method,
its config, the resolved target list with per-target options, the parameters trained
whole (``train_also``), the base model (class, name, fingerprint) and the versions that
wrote it. Tensor keys are ``<base parameter name>.<slot>``, e.g.
``model.layers.0.self_attn.q_proj.weight.lora_A``, or ``<module name>.<slot>`` for methods that
attach to modules (activation space), e.g. ``model.layers.0.mlp.adapter_down``.

:class:`AdapterFile` is that pair in memory. peft folders are converted to it on read (see
:mod:`graftkit.io.peft`), so every adapter, whatever its file format, is applied to a model
by one function, :func:`apply_adapter`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter import get_state, inject, require_state, sites, unload
from ..config import parse_config
from ..errors import AdapterError, ConfigError, FileFormatError
from ..fingerprint import check_fingerprint
from ..registry import METHODS
from ..targets import find_param
from ..tensors import atomic_dir, read_safetensors
from ..validate import check_adapter, shape_error

FORMAT = "graftkit-adapter"
FORMAT_VERSION = 1
META_NAME = "adapter.json"
WEIGHTS_NAME = "adapter.safetensors"


@dataclass
class AdapterFile:
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    path: Path | None = None  # the folder it was read from (for messages; never written)

    @property
    def method(self) -> str:
        return self.meta["method"]

    @property
    def targets(self) -> list[str]:
        return self.meta["targets"]

    @property
    def train_also(self) -> list[str]:
        return self.meta.get("train_also", [])

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def versions() -> dict[str, str]:
    import transformers

    from .. import __version__

    return {"graftkit": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def adapter_from_model(model: nn.Module) -> AdapterFile:
    state = require_state(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, site in sites(model).items():
        for slot, t in site.slot_tensors().items():
            tensors[f"{name}.{slot}"] = t.detach().to("cpu").contiguous().clone()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": state.method,
        "config": state.config.model_dump(mode="json"),
        "targets": state.targets,
        "target_options": state.options,
        # how each target's LoRA delta maps onto the stored weight (Conv1D and Embedding are
        # transposed; a square matrix alone cannot tell), for merging without the live model
        "target_kinds": {name: site.kind for name, site in sites(model).items()},
        "train_also": state.train_also,
        "base_model": {**state.base, "fingerprint": state.fingerprint},
        "versions": versions(),
    }
    from .quantize import model_quantization

    quantization = model_quantization(model)
    if quantization is not None:  # QLoRA: what the adapter was trained against (a merged export redoes it)
        meta["quantization"] = quantization
    saved = getattr(METHODS.get(state.method), "saved_adapter", None)
    adapter = AdapterFile(meta, tensors)
    # a method whose live form differs from its saved one (LoRA's PiSSA/OLoRA against a residual base)
    return saved(model, adapter) if saved is not None else adapter


def write_native(adapter: AdapterFile, path: str | Path, overwrite: bool = False) -> Path:
    from safetensors.torch import save_file

    with atomic_dir(path, overwrite) as tmp:
        save_file(adapter.tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / META_NAME).write_text(json.dumps(adapter.meta, indent=2, sort_keys=False) + "\n")
    return Path(path)


def read_native(path: str | Path) -> AdapterFile:
    path = Path(path)
    meta_path = path / META_NAME
    from ..files import path_kind, read_json

    kind = path_kind(path)
    if kind is None:
        raise FileFormatError(f"adapter folder {path} does not exist; check the path")
    if kind != "a folder":
        raise FileFormatError(f"{path} is {kind}; give an adapter folder (with {META_NAME})")
    if path_kind(meta_path) is None:
        raise FileFormatError(f"{path} has no {META_NAME}; is it a graftkit adapter folder?")
    meta = read_json(meta_path, "adapter description", hint="re-save the adapter", mapping=True)
    if meta.get("format") != FORMAT:
        raise FileFormatError(f"{meta_path} is not a graftkit adapter description (format={meta.get('format')!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise FileFormatError(f"{meta_path} has format version {meta['format_version']}; this graftkit reads up to {FORMAT_VERSION}: upgrade graftkit")
    for key in ("method", "config", "targets"):
        if key not in meta:
            raise FileFormatError(f"{meta_path} lacks the '{key}' entry; re-save the adapter")
    method = METHODS.get(meta["method"])  # unknown method -> clear error
    try:  # a mistyped key is named on read (inspect, export), not only when the adapter is applied
        parse_config(method.config_cls, meta["config"])
    except ConfigError as exc:
        raise ConfigError(f"{meta_path}: {exc}; fix or remove that key") from None
    return AdapterFile(meta, read_safetensors(path / WEIGHTS_NAME), path)


def apply_adapter(model: nn.Module, adapter: AdapterFile, force: bool = False) -> nn.Module:
    """Inject ``adapter`` into ``model`` and load its tensors; on any mismatch the model is left untouched."""
    if get_state(model) is not None:
        raise AdapterError(f"the model already has a {get_state(model).method} adapter; call gk.unload(model) before loading another")
    method = METHODS.get(adapter.method)
    config = parse_config(method.config_cls, adapter.meta["config"])
    if hasattr(method, "bind_saved"):  # sequence-space adapters from peft name no module: bound to this model's
        adapter = method.bind_saved(model, adapter)
    base = adapter.meta.get("base_model") or {}
    base_name = base.get("name_or_path")
    check_adapter(adapter, _where(adapter))
    for name in adapter.targets:
        method.find(model, name)  # a missing parameter or module is named in the error
    for name in adapter.train_also:
        find_param(model, name)
    if not force:
        check_fingerprint(model, base.get("fingerprint"), set(adapter.train_also), base_name)
    resolved = {"targets": adapter.targets, "options": adapter.meta.get("target_options", {}), "train_also": adapter.train_also}
    inject(model, config, resolved=resolved)
    try:
        _load_tensors(model, adapter)
    except BaseException:
        unload(model, merge=False)
        raise
    return model


def _where(adapter: AdapterFile) -> str:
    """How an adapter is named in a message: the folder it was read from."""
    return str(adapter.path) if adapter.path is not None else "the adapter"


def _load_tensors(model: nn.Module, adapter: AdapterFile) -> None:
    expected: dict[str, tuple] = {}
    for name, site in sites(model).items():
        for slot, shape in site.slot_shapes().items():
            expected[f"{name}.{slot}"] = shape
    for key, shape in expected.items():
        if key not in adapter.tensors:
            raise AdapterError(f"the adapter file has no tensor {key}; it is incomplete or was made for another model")
        got = tuple(adapter.tensors[key].shape)
        if got != shape:
            raise shape_error(key, got, shape, "this model")
    extra = sorted(set(adapter.tensors) - set(expected))
    if extra:
        raise AdapterError(f"the adapter file has {len(extra)} tensor(s) this model has no place for, e.g. {extra[0]}; it was made for another model")
    for name, site in sites(model).items():
        site.load_slots({slot: adapter.tensors[f"{name}.{slot}"] for slot in site.slots})
