"""Base-model fingerprints: catch an adapter loaded onto the wrong base.

A fingerprint records the base's parameter count, a hash of every (name, shape) pair, and a
few probe values read at fixed positions of some adapted tensors. Names and shapes must
match exactly; probe values must match to dtype precision (exact within 1e-6 when the
dtype is the one the adapter was made on, within bf16 rounding otherwise), so the same base
loaded in another precision still fits while a different pretrained model does not.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import torch
from torch import nn

from .errors import AdapterError
from .layers import is_quantized, logical_shape
from .targets import iter_params
from .validate import FORCE_HINT

PROBE_TENSORS = 6
PROBE_VALUES = 16


def _structure(model: nn.Module, skip: set[str]) -> tuple[int, str]:
    h = hashlib.sha256()
    total = 0
    for info in iter_params(model):
        if info.name in skip:
            continue
        shape = logical_shape(info.param)  # a 4-bit base (QLoRA) has the structure of its full-precision original
        total += shape.numel()
        h.update(f"{info.name}:{tuple(shape)}\n".encode())
    return total, h.hexdigest()[:16]


def probe_values(param: torch.Tensor) -> list[float]:
    """The few values of a tensor a base-model fingerprint records (what adapters, masks and bundles compare)."""
    if param.is_meta:  # a model built without weights (parameter counts) has no values to probe
        return []
    if is_quantized(param):  # QLoRA: the values the adapter was trained against
        from .io.quantize import dequantize

        param = dequantize(param)
    flat = param.detach().reshape(-1)
    # float32 positions, as adapters already saved recorded them; past 2**24 elements the last
    # one can round up to numel, one past the end, hence the clamp
    idx = torch.linspace(0, flat.numel() - 1, min(PROBE_VALUES, flat.numel())).long().clamp_(max=flat.numel() - 1).to(flat.device)
    return [float(v) for v in flat[idx].float().cpu()]


def fingerprint(model: nn.Module, targets: list[str], skip: set[str]) -> dict:
    total, digest = _structure(model, skip)
    params = {i.name: i.param for i in iter_params(model)}
    step = max(1, len(targets) // PROBE_TENSORS)
    probes = {name: probe_values(params[name]) for name in targets[::step][:PROBE_TENSORS]}
    dtype = str(next(iter(params.values())).dtype).replace("torch.", "") if params else "float32"
    fp = {"num_parameters": total, "structure": digest, "dtype": dtype, "probe": probes}
    quantized = next((p for p in params.values() if is_quantized(p)), None)
    if quantized is not None:  # QLoRA: the probes are dequantized values, which a full-precision base matches once quantized
        state = quantized.quant_state
        fp["quantized"] = {"quant_type": state.quant_type, "double_quant": bool(state.nested), "blocksize": int(state.blocksize)}
    return fp


def check_fingerprint(model: nn.Module, fp: dict | None, skip: set[str], base_name: str | None) -> None:
    if not fp:
        return
    where = f" ({base_name})" if base_name else ""
    total, digest = _structure(model, skip)
    if digest != fp["structure"]:
        raise AdapterError(
            f"this adapter was made for a different base model{where}: {fp['num_parameters']:,} base parameters "
            f"with structure {fp['structure']}, this model has {total:,} with structure {digest}; load it onto the base it was trained on"
        )
    params = {i.name: i.param for i in iter_params(model)}
    check_probes(params.get, fp, base_name)


def check_probes(read: Callable[[str], "torch.Tensor | None"], fp: dict | None, base_name: str | None, where: str = "") -> None:
    """Compare the probe values of ``fp`` with the tensors ``read(name)`` returns (a live model's
    parameters, or a checkpoint's tensors when there is no model: the merge engine). A name
    ``read`` does not know is the shape checks' business, not this one's."""
    if not fp:
        return
    origin = f" ({base_name})" if base_name else ""
    for name, values in (fp.get("probe") or {}).items():
        tensor = read(name)
        if tensor is None:
            continue
        got = probe_values(tensor)
        same_dtype = str(tensor.dtype).replace("torch.", "") == fp.get("dtype")
        rtol, atol = (1e-6, 1e-7) if same_dtype else (1e-2, 1e-3)

        def fits(got: list[float]) -> bool:
            return len(got) == len(values) and torch.allclose(torch.tensor(got), torch.tensor(values, dtype=torch.float32), rtol=rtol, atol=atol)

        if not fits(got) and fp.get("quantized") and not is_quantized(tensor):
            # made on a 4-bit base (QLoRA), checked against the full-precision one: quantize it the same way
            from .io.quantize import requantize

            got = probe_values(requantize(tensor, fp["quantized"]))
        if not fits(got):
            raise AdapterError(
                f"{where}this adapter was made for a different base model{origin}: the weights of {name} differ from the ones "
                f"it was trained on; load it onto its own base, or {FORCE_HINT}"
            )
