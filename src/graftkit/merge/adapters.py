"""Adapters as merge inputs: a LoRA-family or IA3 adapter folder (native or peft) seen as a model.

An adapter input is read whole (it is small), and each tensor of the model it describes is
produced on request as ``base[key] + delta(key)``, with the delta computed from the factors by
:func:`graftkit.methods.lora.lora_delta` / :func:`graftkit.methods.ia3.ia3_delta` (the same
functions the live sites use), so no
merged model copy is ever written or held. Targets keep their layer kind in ``adapter.json``
(``target_kinds``); without it a non-square target is unambiguous and a square one is an error.
``train_also`` tensors (heads trained whole) replace the base tensor.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import AdapterError, UnsupportedError
from ..tensors import Checkpoint


class OnBase:
    """What every adapter input shares: the tensor-reading interface of
    :class:`~graftkit.tensors.Checkpoint` over ``self.base`` (a Checkpoint), where the tensors in
    ``self.whole`` (heads trained whole) replace or add to the base's. Subclasses set ``path``,
    ``base`` and ``whole`` and produce the adapted tensors in :meth:`adapted`."""

    _pickled = None
    path: Path
    base: Checkpoint
    whole: dict

    def keys(self) -> list[str]:
        # a head trained whole that the base lacks is still a tensor of this model: the plan's
        # key check then names it (and suggests ``exclude``) instead of dropping it silently
        return [*self.base.keys(), *(k for k in self.whole if k not in self.base.files)]

    def shape(self, key: str):
        if key in self.whole:  # a head trained whole may have its own shape (another label count)
            return tuple(self.whole[key].shape)
        return self.base.shape(key)

    def dtype(self, key: str) -> str:
        if key not in self.base.files and key in self.whole:
            return str(self.whole[key].dtype).replace("torch.", "")
        return self.base.dtype(key)

    def size_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    def base_dtype(self, key: str):
        import torch

        from .writer import ST_TO_TORCH, st_dtype

        return getattr(torch, ST_TO_TORCH[st_dtype(self.base.dtype(key))])

    def get(self, key: str):
        if key in self.whole:
            return self.whole[key] if key not in self.base.files else self.whole[key].to(self.base_dtype(key))
        return self.adapted(key)

    def adapted(self, key: str):
        raise NotImplementedError


class AdapterSource(OnBase):
    """``base + adapter`` for a LoRA-family or IA3 adapter (native or peft), read as a Checkpoint."""

    def __init__(self, path: str | Path, base: Checkpoint, exclude=None, force: bool = False):
        from ..fingerprint import check_probes
        from ..io import read_adapter
        from ..methods.lora import lora_scaling
        from ..validate import check_adapter, check_fits

        self.path = Path(path)
        self.base = base
        self.adapter = read_adapter(path)
        self.method = self.adapter.method
        if self.method not in ("lora", "ia3"):
            raise UnsupportedError(f"{path} is a {self.method} adapter; merge inputs can be LoRA/rsLoRA/DoRA or IA3 adapters "
                                   "(export others merged first: graft export ADAPTER --base BASE --merged OUT)")
        meta = self.adapter.meta
        config = meta.get("config") or {}
        kinds = meta.get("target_kinds") or {}
        options = meta.get("target_options") or {}
        self.targets: dict[str, tuple] = {}
        self.ia3: dict[str, tuple] = {}  # weight or bias name -> (kind, feedforward, vector, is_bias)
        skip = exclude or (lambda name: False)  # ``exclude``: left out of the merge, never read or checked
        # the checks graft export / eval / import-peft make too (graftkit.validate): the same adapter
        # is refused the same way whichever command reads it
        check_adapter(self.adapter, str(path), skip)
        if not force:
            base_meta = meta.get("base_model") or {}
            check_probes(lambda n: base.get(n) if n in base.files and not skip(n) else None, base_meta.get("fingerprint"),
                         base_meta.get("name_or_path"), where=f"{path}: ")
        for name in self.adapter.targets:
            if skip(name):
                continue
            if name not in base.files:
                raise UnsupportedError(f"{path} adapts {name}, which the base model {base.path} does not have; it was made for another model")
            if self.method == "ia3":
                vec = self.adapter.tensors[f"{name}.ia3_l"]
                ff = bool((options.get(name) or {}).get("feedforward", False))
                shape = tuple(base.shape(name))
                kind = kinds.get(name) or self._infer_ia3_kind(name, shape, vec.numel(), ff)
                check_fits(self.adapter, name, kind, shape, f"the base model {base.path}", feedforward=ff, where=str(path))
                self.ia3[name] = (kind, ff, vec, False)
                bias = name[: -len("weight")] + "bias"
                if not ff and name.endswith(".weight") and bias in base.files:
                    self.ia3[bias] = (kind, ff, vec, True)
                continue
            a = self.adapter.tensors[f"{name}.lora_A"]
            b = self.adapter.tensors[f"{name}.lora_B"]
            shape = tuple(base.shape(name))
            kind = kinds.get(name) or self._infer_kind(name, shape, a, b)
            check_fits(self.adapter, name, kind, shape, f"the base model {base.path}", where=str(path))
            opt = options.get(name, {})
            r = int(opt.get("r", a.shape[0]))
            scaling = lora_scaling(float(opt.get("lora_alpha", config.get("lora_alpha", r))), r, bool(config.get("use_rslora")))
            self.targets[name] = (kind, a, b, scaling, self.adapter.tensors.get(f"{name}.lora_magnitude_vector"))
        self.whole = {name: self.adapter.tensors[f"{name}.value"] for name in self.adapter.train_also
                      if f"{name}.value" in self.adapter.tensors and not skip(name)}
        self.files = base.files
        self.headers = base.headers

    def _infer_kind(self, name: str, shape: tuple, a, b) -> str:
        out_f, in_f = b.shape[0], a.shape[1]
        if len(shape) == 2 and shape[0] != shape[1]:
            if shape == (out_f, in_f):
                return "linear"
            if shape == (in_f, out_f):
                return "conv1d"
            raise AdapterError(f"{self.path}: {name}.lora_A has shape {tuple(a.shape)} and {name}.lora_B {tuple(b.shape)}, which fit "
                               f"neither ({out_f}, {in_f}) nor ({in_f}, {out_f}), but the base weight {name} is {shape}; "
                               "the adapter was made for another base model (or is corrupt)")
        if len(shape) == 4:
            return "conv2d"
        raise UnsupportedError(f"{self.path}: cannot tell how the LoRA of {name} {shape} lies on the weight (no target_kinds in its "
                               "adapter.json); re-save the adapter with this graftkit, or import it from peft again")

    def _infer_ia3_kind(self, name: str, shape: tuple, size: int, ff: bool) -> str:
        if len(shape) == 4:
            return "conv2d"
        if len(shape) == 2 and shape[0] != shape[1]:
            scaled_axis = 1 if ff else 0  # in the (out, in) layout of a linear layer
            return "linear" if shape[scaled_axis] == size else "conv1d"
        raise UnsupportedError(f"{self.path}: cannot tell how the IA3 vector of {name} {shape} lies on the weight (no target_kinds "
                               "in its adapter.json); re-save the adapter with this graftkit, or import it from peft again")

    def adapter_keys(self) -> list[str]:
        """The tensor names the adapter itself touches (targets and heads trained whole)."""
        return [*self.adapter.targets, *self.adapter.train_also]

    def adapted(self, key: str):
        from ..methods.lora import lora_delta

        w = self.base.get(key)
        if key in self.ia3:
            from ..methods.ia3 import ia3_delta

            kind, ff, vec, is_bias = self.ia3[key]
            delta = w.float() * (vec.float() - 1) if is_bias else ia3_delta(kind, ff, w, vec)
            return (w.float() + delta).to(w.dtype)
        if key not in self.targets:
            return w
        kind, a, b, scaling, mag = self.targets[key]
        return (w.float() + lora_delta(kind, w, a, b, scaling, mag)).to(w.dtype) if w.dtype.is_floating_point else w


def is_adapter(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "adapter.json").exists() or (p / "adapter_config.json").exists())
