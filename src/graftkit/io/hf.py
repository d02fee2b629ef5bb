"""Hugging Face model folders: loading a base, exporting an adapted model.

Bases load with ``trust_remote_code=False`` and safetensors only, unless the caller allows
pickled ``.bin`` weights (transformers then reads them with ``weights_only=True``). An
exported model is an ordinary HF folder - sharded ``model*.safetensors`` with an index,
``config.json``, the base's tokenizer - plus ``graft_provenance.json`` saying which adapter
and base produced it. It is written atomically.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..assets import model_dir
from ..errors import ConfigError, FileFormatError, UnsupportedError
from ..tensors import PICKLE_NAMES, atomic_dir, check_safetensors_header, index_shards, read_pickle_checkpoint

HEAD_CLASSES = {"causal-lm": "ForCausalLM", "classification": "ForSequenceClassification"}
HEAD_SUFFIXES = {"causal-lm": ("ForCausalLM", "LMHeadModel"), "classification": ("ForSequenceClassification",)}


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def _auto_config(transformers, path: Path):
    """The folder's config, or one line saying why transformers cannot build it without running the
    folder's own code (``auto_map``), which graftkit never does."""
    try:
        return transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    except ValueError as exc:
        _refuse_remote_code(path, exc)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FileFormatError(f"transformers cannot read {Path(path) / 'config.json'}: {first}") from None


def _refuse_remote_code(path: Path, exc: Exception) -> None:
    """Raise the one-line refusal when transformers failed because the folder wants its own code."""
    raw: Any = {}
    for name in ("config.json", "tokenizer_config.json"):
        try:
            raw = json.loads((Path(path) / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(raw, dict) and raw.get("auto_map"):
            raise UnsupportedError(
                f"{path} needs its own Python code to load: {name} has auto_map (model_type {raw.get('model_type')!r}, which "
                "transformers does not ship); graftkit loads models with trust_remote_code off and never runs code from a model "
                "folder - use a model whose architecture transformers includes, or convert this one to such an architecture"
            ) from exc


def model_class(path: Path, class_name: str | None = None, head: str | None = None):
    if head is not None and head not in HEAD_CLASSES:
        raise ConfigError(f"unknown head {head!r}; choose one of {', '.join(HEAD_CLASSES)}")
    transformers = _quiet_transformers()
    config = _auto_config(transformers, path)
    if class_name is None:
        archs = getattr(config, "architectures", None) or []
        if head is not None:
            stem = archs[0] if archs else type(config).__name__.replace("Config", "Model")
            if stem.endswith(HEAD_SUFFIXES[head]):  # already that head (GPT2LMHeadModel has no ...ForCausalLM twin)
                class_name = stem
            else:
                # longest suffixes first: "GPT2LMHeadModel" must lose "LMHeadModel", not just "Model"
                for suffix in ("ForSequenceClassification", "LMHeadModel", "ForCausalLM", "ForMaskedLM", "Model"):
                    if stem.endswith(suffix):
                        stem = stem[: -len(suffix)]
                        break
                class_name = stem + HEAD_CLASSES[head]
        elif archs:
            class_name = archs[0]
        else:
            return transformers.AutoModel
    cls = getattr(transformers, class_name, None)
    if cls is None:
        raise FileFormatError(f"transformers has no model class {class_name!r} (needed for {path}); upgrade transformers or pick another class")
    return cls


def load_model(name: str | Path, *, class_name: str | None = None, head: str | None = None,
               dtype: torch.dtype | str = torch.float32, allow_pickle: bool = False, quantize=None,
               keep_unquantized: list[str] | tuple[str, ...] = (), **kwargs: Any) -> nn.Module:
    """Load a base model from a folder or packaged alias, never from the network.

    ``quantize`` (a :class:`~graftkit.io.quantize.QuantizeConfig` or its dict) loads the Linear
    layers in 4 bit through bitsandbytes (QLoRA), except the modules in ``keep_unquantized``."""
    from .quantize import as_config

    quantize = as_config(quantize)
    path = model_dir(name)
    for index in path.glob("*.index.json"):  # transformers follows an index wherever it points
        index_shards(index)
    for f in path.glob("*.safetensors"):  # headers only: safetensors' own error is not one clear line
        check_safetensors_header(f)
    if not list(path.glob("*.safetensors")):
        pickled = [path / n for n in PICKLE_NAMES if (path / n).exists()]
        if not pickled:
            raise FileFormatError(f"{path} holds no model weights (*.safetensors)")
        read_pickle_checkpoint(pickled[0], allow_pickle)  # refuses unless allowed
    cls = model_class(path, class_name, head)
    if quantize is not None:
        from .quantize import load_kwargs

        config = _auto_config(_quiet_transformers(), path)
        for key, value in kwargs.items():  # num_labels and the label names shape the head left unquantized
            setattr(config, key, value)
        kwargs = {**kwargs, **load_kwargs(cls, config, quantize, keep_unquantized)}
    try:
        model = cls.from_pretrained(path, dtype=dtype, trust_remote_code=False, use_safetensors=not allow_pickle or None, **kwargs)
    except RuntimeError as exc:
        if "ignore_mismatched_sizes" not in str(exc) or "num_labels" not in kwargs:
            raise
        # transformers' own message points at a report printed above it, which graft does not show
        have = getattr(_auto_config(_quiet_transformers(), path), "num_labels", "?")
        raise ConfigError(f"{path} has a classification head for {have} labels, but {kwargs['num_labels']} were asked for; "
                          "use the model without its head (the bare encoder) or data with the same labels") from None
    model.config._name_or_path = str(name)
    if quantize is not None:
        from .quantize import prepare

        prepare(model, quantize)
    return model


def load_tokenizer(name: str | Path):
    transformers = _quiet_transformers()
    path = model_dir(name)
    try:
        return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except ValueError as exc:
        _refuse_remote_code(path, exc)
        raise


def model_config(name: str | Path):
    """A model folder's (or alias's) transformers config, without running code from the folder."""
    return _auto_config(_quiet_transformers(), model_dir(name))


def save_model_folder(model: nn.Module, out: str | Path, *, tokenizer_from: str | Path | None, provenance: dict,
                      max_shard_size: str | int = "2GB", overwrite: bool = False) -> Path:
    """Write ``model`` as an HF folder (sharded safetensors + index + config + tokenizer)."""
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        if tokenizer_from is not None:
            try:
                load_tokenizer(tokenizer_from).save_pretrained(tmp)
            except (OSError, ValueError) as exc:
                provenance = {**provenance, "tokenizer": f"not copied: {exc}"}
        (tmp / "graft_provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return Path(out)
