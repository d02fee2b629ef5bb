"""Adapter files (native and peft) and HF model folders."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..adapter import require_state, unload
from ..methods.activation import refuse_weight_op
from ..errors import FileFormatError
from .native import META_NAME, AdapterFile, adapter_from_model, apply_adapter, read_native, write_native
from .peft import CONFIG_NAME, read_peft, write_peft

FORMATS = ("native", "peft")
PEFT_TASK_HEADS = {"SEQ_CLS": "classification", "CAUSAL_LM": "causal-lm"}


def adapter_format(path: str | Path) -> str:
    path = Path(path)
    if (path / META_NAME).exists():
        return "native"
    if (path / CONFIG_NAME).exists():
        return "peft"
    if not path.exists():
        raise FileFormatError(f"adapter folder {path} does not exist")
    raise FileFormatError(f"{path} is neither a graftkit adapter ({META_NAME}) nor a peft adapter ({CONFIG_NAME})")


def read_adapter(path: str | Path, allow_pickle: bool = False) -> AdapterFile:
    """Read a native or peft adapter folder into memory."""
    return read_native(path) if adapter_format(path) == "native" else read_peft(path, allow_pickle)


def save_adapter(model: nn.Module, path: str | Path, format: str = "native", overwrite: bool = False) -> Path:
    """Save the model's adapter as a native graftkit folder or a peft folder."""
    require_state(model)
    if format == "native":
        return write_native(adapter_from_model(model), path, overwrite)
    if format == "peft":
        return write_peft(model, path, overwrite)
    raise FileFormatError(f"unknown adapter format {format!r}; choose one of {', '.join(FORMATS)}")


def load_adapter(model: nn.Module, path: str | Path, *, force: bool = False, allow_pickle: bool = False) -> nn.Module:
    """Inject the adapter saved at ``path`` (native or peft) into ``model``."""
    return apply_adapter(model, read_adapter(path, allow_pickle), force=force)


def base_class_and_labels(adapter: AdapterFile) -> tuple[str | None, int | None]:
    """The model class an adapter was made on, and its label count if it carries a head."""
    base = adapter.meta.get("base_model") or {}
    num_labels = base.get("num_labels")
    if num_labels is None:
        for name in adapter.train_also:
            parts = name.split(".")
            if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in ("classifier", "score", "out_proj"):
                num_labels = int(adapter.tensors[f"{name}.value"].shape[0])
    return base.get("class"), num_labels


def load_base_for(adapter: AdapterFile, base: str | Path, *, dtype="auto", allow_pickle: bool = False, quantize=None) -> nn.Module:
    from ..validate import check_adapter
    from .hf import load_model

    check_adapter(adapter, str(adapter.path or "the adapter"))  # before a base is loaded for nothing
    class_name, num_labels = base_class_and_labels(adapter)
    kwargs = {"num_labels": num_labels} if num_labels else {}
    # the label names the head was trained with, so that a merged export's config keeps them
    id2label = (adapter.meta.get("base_model") or {}).get("id2label")
    if num_labels and isinstance(id2label, dict) and len(id2label) == num_labels:
        kwargs["id2label"] = {int(k): v for k, v in id2label.items()}
        kwargs["label2id"] = {v: int(k) for k, v in id2label.items()}
    # a peft adapter names no class, only its task: a SEQ_CLS adapter on a bare encoder folder
    # (architectures ["BertModel"], like MiniLM) needs the classification class to find its head
    task = (adapter.meta.get("base_model") or {}).get("task_type")
    head = PEFT_TASK_HEADS.get(task) if class_name is None else None
    if quantize is None and adapter.meta.get("quantization"):
        # a QLoRA adapter goes back on the 4-bit base it was trained on (eval, re-export as native or
        # peft), loaded in float32 as graft train does, so the weights quantize to the same codes
        import torch

        from .quantize import recorded

        quantize, dtype = recorded(adapter.meta["quantization"]), torch.float32
    if quantize is not None:  # the parameters trained whole stay at full precision, as in training
        kwargs.update(quantize=quantize, keep_unquantized=adapter.train_also)
    if num_labels and adapter.train_also:
        # the adapter brings its head whole, so a base that carries a head for another label count
        # (graft study's base/ layout: an untrained 2-label head) loads with that head re-made at
        # the adapter's size; apply_adapter then puts the trained head in. Checked below that
        # every tensor re-made this way is one the adapter replaces.
        kwargs["ignore_mismatched_sizes"] = True
    model = load_model(base, class_name=class_name, head=head, dtype=dtype, allow_pickle=allow_pickle, **kwargs)
    if kwargs.get("ignore_mismatched_sizes"):
        _check_head_replaced(model, base, adapter, num_labels)
    return model


def _check_head_replaced(model: nn.Module, base: str | Path, adapter: AdapterFile, num_labels: int) -> None:
    from ..assets import model_dir
    from ..errors import ConfigError
    from ..tensors import Checkpoint

    try:
        ckpt = Checkpoint(model_dir(base))
    except FileFormatError:  # pickled weights: transformers compared the shapes itself
        return
    stored = set(ckpt.keys())
    for key, value in model.state_dict().items():
        if key in stored and tuple(ckpt.shape(key)) != tuple(value.shape) and key not in adapter.train_also:
            raise ConfigError(f"{base} has a classification head for another label count than the adapter's {num_labels}, and the "
                              f"adapter does not replace its tensor {key}; use the model without its head (the bare encoder)")


def export_merged(adapter_path: str | Path, base: str | Path, out: str | Path, *, max_shard_size: str | int = "2GB",
                  overwrite: bool = False, force: bool = False, allow_pickle: bool = False) -> Path:
    """Fold an adapter into its base and write a normal HF model folder."""
    from ..outputs import check_output
    from .hf import save_model_folder
    from .native import versions

    check_output(out, [("adapter", adapter_path), ("base", base)])
    adapter = read_adapter(adapter_path, allow_pickle)
    refuse_weight_op(adapter.method, adapter.meta.get("config") or {}, "export --merged")
    quantization = adapter.meta.get("quantization")
    if quantization:  # QLoRA: fold onto dequant(quant(W)), what the adapter was trained against
        import torch

        from ..outputs import note
        from .quantize import NOTE, dequantize_model, recorded

        q = recorded(quantization)
        # float32 as graft train loads it: the same weights quantize to the same codes and scales
        model = load_base_for(adapter, base, dtype=torch.float32, allow_pickle=allow_pickle, quantize=q)
        dequantize_model(model)
        note(NOTE.format(what=f"adapter {adapter_path}", quant=q.describe()))
    else:
        model = load_base_for(adapter, base, allow_pickle=allow_pickle)
    apply_adapter(model, adapter, force=force)
    unload(model, merge=True)
    if quantization:
        model.to(torch.bfloat16)
        model.config.dtype = torch.bfloat16
    provenance = {"produced_by": "graft export --merged", "adapter": str(adapter_path), "base": str(base),
                  "method": adapter.method, "adapter_config": adapter.meta.get("config"), "versions": versions()}
    if quantization:
        provenance["folded_onto"] = f"the dequantized {q.describe()} base weights (what the QLoRA adapter was trained against)"
    return save_model_folder(model, out, tokenizer_from=base, provenance=provenance, max_shard_size=max_shard_size, overwrite=overwrite)


__all__ = ["AdapterFile", "adapter_format", "read_adapter", "save_adapter", "load_adapter", "export_merged", "write_native", "write_peft"]
