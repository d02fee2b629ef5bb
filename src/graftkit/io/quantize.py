"""QLoRA: a frozen base held in 4 bit (bitsandbytes NF4 or FP4) with LoRA trained on top.

Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs". The base's Linear
layers are loaded as ``bitsandbytes.nn.Linear4bit`` through transformers' own
``BitsAndBytesConfig`` (quantized while the weights load, so a large base never sits in memory
at full precision); the output embeddings, classifier heads and anything trained whole stay at
full precision. The LoRA factors stay float32 and see the layer's output, so their gradients
are those of a plain Linear holding the *dequantized* weights, which is what the adapter is
trained against.

Merging follows from that: a QLoRA adapter is folded onto ``dequant(quant(W))``, not onto the
original ``W`` (peft issues 2321 and 2105: folding onto the original half-precision weights
gives a model that differs from the one that was trained, silently). The quantization is
recorded in ``adapter.json`` (``quantization``) so that :func:`graftkit.export_merged` can redo
it. bitsandbytes (0.50.2 tested) runs 4-bit on CPU (quantize, forward, backward) as well as on CUDA.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import parse_config
from ..errors import ConfigError, UnsupportedError
from ..layers import is_conv1d, is_quantized
from ..train.recipe import QuantizeConfig

INSTALL_HINT = "pip install 'graftkit[gpu]' (or pip install bitsandbytes)"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
#: classifier heads of *ForSequenceClassification models, trained whole: never quantized
HEADS = ("classifier", "score")
#: what a merge folds onto, printed where a QLoRA adapter is folded
NOTE = ("{what} was trained on a {quant} 4-bit base; it is folded onto the dequantized base weights "
        "(what it was trained against), not onto the original ones, and written in bfloat16")


def as_config(value: QuantizeConfig | dict | None) -> QuantizeConfig | None:
    if value is None or isinstance(value, QuantizeConfig):
        return value
    return parse_config(QuantizeConfig, value)


def recorded(quantization: dict[str, Any]) -> QuantizeConfig:
    """The settings an adapter.json ``quantization`` entry records."""
    try:
        return QuantizeConfig(**{k: quantization[k] for k in QuantizeConfig.model_fields if k in quantization})
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"adapter.json: its quantization entry is not one graftkit reads ({exc}); re-save the adapter") from None


def bnb(what: str = "quantize (QLoRA)"):
    """The bitsandbytes module, or one line saying how to install it."""
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
    except ImportError:
        raise UnsupportedError(f"{what} needs bitsandbytes, which is not installed: {INSTALL_HINT}") from None
    return bitsandbytes


def check_method(method: dict[str, Any]) -> None:
    """Refuse, in one line, a method that cannot train on a 4-bit base."""
    from ..methods import method_named

    name = method.get("method")
    m = method_named(name)
    if m is None:
        return  # the method check names it
    config = {k: v for k, v in method.items() if k != "method"}
    if not m.trains_on_quantized_base(config):
        what = "LoRA with use_dora" if name == "lora" else f"method {name!r}"
        raise ConfigError(f"quantize: {what} cannot train on a 4-bit base (its forward or delta reads the base weights, "
                          "which are packed 4-bit codes there); use method lora (plain or use_rslora), or drop the quantize section")


# -- loading ---------------------------------------------------------------------------------------

def load_kwargs(cls, config, quantize: QuantizeConfig, keep: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The ``from_pretrained`` keywords that load ``cls`` quantized. ``keep``: module names left at
    full precision besides the ones transformers keeps (output embeddings, tied weights)."""
    bnb()
    import transformers
    from transformers.quantizers.base import get_keys_to_not_convert

    with torch.device("meta"):  # transformers' own choice of what stays unquantized, read from a model without weights
        meta = cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)
    conv1d = next((n for n, m in meta.named_modules() if is_conv1d(m)), None)
    if conv1d is not None:
        # bitsandbytes would turn GPT-2's transposed Conv1D into Linear4bit, so the adapter, its
        # merged export and its peft form would no longer match the base's (in, out) layout
        raise UnsupportedError(f"quantize: {type(meta).__name__} has Conv1D layers ({conv1d}), which graftkit does not "
                               "quantize; use QLoRA on a model with Linear layers (Llama, Mistral, Qwen, ...), or drop quantize")
    skip = sorted({*get_keys_to_not_convert(meta), *HEADS, *(k.removesuffix(".weight") for k in keep)})
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize.quant_type,
                                        bnb_4bit_use_double_quant=quantize.double_quant,
                                        bnb_4bit_compute_dtype=DTYPES[quantize.compute_dtype],
                                        llm_int8_skip_modules=skip)
    return {"quantization_config": q}


def prepare(model: nn.Module, quantize: QuantizeConfig) -> nn.Module:
    """After loading: freeze the 4-bit layers and keep their weights in bitsandbytes' plain layout."""
    for module in quantized_modules(model).values():
        # on CPUs with AVX512-BF16, bitsandbytes repacks a weight in place the first time it runs
        # under no_grad in eval mode; a repacked weight then runs through a kernel with no backward,
        # so training after an evaluation would lose the gradient through every quantized layer
        module.support_avx512bf16_for_cpu = False
        module.weight.requires_grad_(False)
    model.__dict__["_graft_quantize"] = quantize
    return model


# -- inspection --------------------------------------------------------------------------------------

def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_quantized(m.weight)}


def dequantize(param: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' own dequantization of a 4-bit weight, in the dtype it was quantized from."""
    F = bnb("a 4-bit (QLoRA) base").functional

    state = param.quant_state
    data = param.data
    if getattr(state, "packing_format_for_cpu", False):  # repacked for AVX512-BF16 inference
        data, state = F._convert_weight_packed_for_cpu_inverse(data, state)
    return F.dequantize_4bit(data, state)


def requantize(weight: torch.Tensor, how: dict[str, Any]) -> torch.Tensor:
    """``dequant(quant(weight))`` as bitsandbytes computes it for a layer loaded with ``how``
    (quant_type, double_quant, blocksize), in float32."""
    F = bnb("a QLoRA adapter (trained on a 4-bit base)").functional

    data, state = F.quantize_4bit(weight.detach().float(), blocksize=int(how.get("blocksize", 64)),
                                  compress_statistics=bool(how.get("double_quant", True)), quant_type=how.get("quant_type", "nf4"))
    return F.dequantize_4bit(data, state)


def model_quantization(model: nn.Module) -> dict[str, Any] | None:
    """How ``model``'s base is quantized (adapter.json ``quantization``), or None."""
    modules = quantized_modules(model)
    if not modules:
        return None
    set_by = model.__dict__.get("_graft_quantize")
    first = next(iter(modules.values()))
    state = first.weight.quant_state
    compute = {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(getattr(first, "compute_dtype", None), "fp32")
    config = set_by or QuantizeConfig(quant_type=state.quant_type, double_quant=bool(state.nested), compute_dtype=compute)
    return {"library": "bitsandbytes", **config.model_dump(mode="json"), "blocksize": int(state.blocksize),
            "quantized": sorted(f"{n}.weight" for n in modules)}


def dequantize_model(model: nn.Module) -> nn.Module:
    """Swap every 4-bit Linear of ``model`` for a plain Linear holding its dequantized weights."""
    for name, module in quantized_modules(model).items():
        weight = dequantize(module.weight)
        with torch.device("meta"):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        plain.weight = nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            plain.bias = module.bias
        model.set_submodule(name, plain)
    # a plain model from here on: save_pretrained must not write a quantization config
    model.__dict__.pop("_graft_quantize", None)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model


def refuse_live_merge(what: str) -> UnsupportedError:
    return UnsupportedError(f"{what} on a 4-bit base would fold the adapter into packed 4-bit codes and quantize it again "
                            "(lossy); export it merged instead (graft export --merged, gk.export_merged), which folds it onto "
                            "the dequantized weights, or unload it without merging")
