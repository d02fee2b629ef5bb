"""Binary masks over a model's tensors, stored bit-packed, tied to the base they were made on.

Skill localization (``graft localize``) and TALL-mask compression (``graft compress``) both end
with one boolean mask per tensor. Stored as bool they cost a byte per entry; packed eight to a
byte (``numpy.packbits``, big-endian bit order, row-major over the flattened tensor) they cost an
eighth. A mask file is one safetensors file:

* one ``uint8`` tensor per key, ``ceil(numel / 8)`` bytes, the last byte zero-padded;
* metadata ``graftkit_masks`` = JSON ``{"version": 1, "shapes": {key: [dims]}, "base_fingerprint": fp}``.

A mask means nothing on another base (the delta it selects from would differ), so the file
records the base's fingerprint (:func:`base_fingerprint`: the same fields an adapter's
``base_model.fingerprint`` has, computed from checkpoint tensors rather than a live model) and
:func:`load_masks` refuses a file whose fingerprint does not match the expected one.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import torch

from ..errors import FileFormatError, GraftError

META_KEY = "graftkit_masks"
VERSION = 1


class MaskError(GraftError):
    """A mask file does not fit the base it is used with, or a mask is malformed."""


# -- packing ------------------------------------------------------------------------------------
def pack_mask(mask: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A bool tensor -> (uint8 tensor of ``ceil(numel/8)`` bytes, original shape)."""
    if mask.dtype != torch.bool:
        raise MaskError(f"a mask must be a bool tensor, got {mask.dtype}; compare the scores with a threshold first")
    flat = mask.detach().reshape(-1).cpu().numpy()
    return torch.from_numpy(np.packbits(flat)), tuple(mask.shape)


def unpack_mask(packed: torch.Tensor, shape: Iterable[int]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`."""
    shape = tuple(int(d) for d in shape)
    n = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (n + 7) // 8:
        raise MaskError(
            f"a packed mask for shape {list(shape)} must be {(n + 7) // 8} uint8 bytes, got {packed.numel()} of "
            f"{packed.dtype}; the mask file is corrupt, write it again"
        )
    bits = np.unpackbits(packed.cpu().numpy(), count=n)
    return torch.from_numpy(bits.astype(np.bool_)).reshape(shape)


# -- base fingerprint from checkpoint tensors ---------------------------------------------------
def base_fingerprint(read: Callable[[str], torch.Tensor], shapes: Mapping[str, Iterable[int]]) -> dict:
    """The fingerprint of a base over the tensors ``shapes`` names (the masked ones): their count,
    a hash of every (name, shape) and probe values read as :mod:`graftkit.fingerprint` reads them,
    so :func:`graftkit.fingerprint.check_probes` can compare them."""
    from ..fingerprint import PROBE_TENSORS, probe_values

    names = sorted(shapes)
    h = hashlib.sha256()
    total = 0
    for name in names:
        shape = tuple(int(d) for d in shapes[name])
        total += math.prod(shape)
        h.update(f"{name}:{shape}\n".encode())
    step = max(1, len(names) // PROBE_TENSORS)
    picked = names[::step][:PROBE_TENSORS]
    probes, dtype = {}, "float32"
    for name in picked:
        t = read(name)
        dtype = str(t.dtype).replace("torch.", "")
        probes[name] = probe_values(t)
    return {"num_parameters": total, "structure": h.hexdigest()[:16], "dtype": dtype, "probe": probes}


def check_base(fp: Mapping | None, expected: Mapping, path: str | Path) -> None:
    """Refuse a mask file whose recorded base is not ``expected`` (structure and probe values)."""
    if not fp:
        raise MaskError(f"{path} records no base fingerprint; it is not a graftkit mask file, make it again with graft localize")
    if fp.get("structure") != expected.get("structure"):
        raise MaskError(
            f"{path} was made for a different base model ({fp.get('num_parameters', 0):,} masked parameters, structure "
            f"{fp.get('structure')}; this base has {expected.get('num_parameters', 0):,}, structure {expected.get('structure')}); "
            "use the masks made for this base"
        )
    exp_probe = expected.get("probe") or {}
    same_dtype = fp.get("dtype") == expected.get("dtype")
    rtol, atol = (1e-6, 1e-7) if same_dtype else (1e-2, 1e-3)
    for name, values in (fp.get("probe") or {}).items():
        want = exp_probe.get(name)
        if want is None:
            continue
        if len(want) != len(values) or not torch.allclose(torch.tensor(values, dtype=torch.float32),
                                                           torch.tensor(want, dtype=torch.float32), rtol=rtol, atol=atol):
            raise MaskError(f"{path} was made for a different base model: the weights of {name} differ; use the masks made for this base")


# -- files --------------------------------------------------------------------------------------
def save_masks(path: str | Path, masks: Mapping[str, torch.Tensor], base_fingerprint: Mapping) -> Path:
    """Write bool ``masks`` bit-packed to ``path`` (safetensors); written to a temporary sibling
    then renamed, so a failure leaves no half-written file."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors, shapes = {}, {}
    for key, mask in masks.items():
        tensors[key], shapes[key] = pack_mask(mask)
    meta = {META_KEY: json.dumps({"version": VERSION, "shapes": {k: list(v) for k, v in shapes.items()},
                                  "base_fingerprint": dict(base_fingerprint)})}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_mask_meta(path: str | Path) -> dict:
    """The ``graftkit_masks`` metadata of a mask file (shapes, base fingerprint), without the tensors."""
    from ..tensors import check_safetensors_header

    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"mask file {path} does not exist; give the .safetensors file graft localize wrote")
    header = check_safetensors_header(path)
    raw = (header.get("__metadata__") or {}).get(META_KEY)
    try:
        meta = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or not isinstance(meta.get("shapes"), dict):
        raise FileFormatError(f"{path} is not a graftkit mask file (no {META_KEY} metadata); give a file graft localize or graft compress wrote")
    if meta.get("version") != VERSION:
        raise FileFormatError(f"{path} is a mask file of version {meta.get('version')}; this graftkit reads version {VERSION}")
    return meta


def load_masks(path: str | Path, expected_fingerprint: Mapping | None) -> dict[str, torch.Tensor]:
    """Read a mask file back to bool tensors; with ``expected_fingerprint`` (from
    :func:`base_fingerprint` on the base in use) refuse a file made for another base."""
    from safetensors.torch import load_file

    meta = read_mask_meta(path)
    if expected_fingerprint is not None:
        check_base(meta.get("base_fingerprint"), expected_fingerprint, path)
    packed = load_file(str(path))
    shapes = meta["shapes"]
    if set(packed) != set(shapes):
        raise FileFormatError(f"{path}: the packed tensors and the recorded shapes name different keys; the mask file is corrupt, write it again")
    return {k: unpack_mask(packed[k], shapes[k]) for k in shapes}
