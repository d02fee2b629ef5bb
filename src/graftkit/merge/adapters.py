"""Adapters as merge inputs: an adapter folder (native or peft) of a method that declares
``merge_deltas`` (LoRA family, IA3, ...) seen as a model.

An adapter input is read whole (it is small), and each tensor of the model it describes is
produced on request as ``base[key] + delta(key)``, with the delta computed by the method's own
``merge_deltas`` (e.g. :func:`graftkit.methods.lora.lora_delta`, the same functions the live
sites use), so no merged model copy is ever written or held. Targets keep their layer kind in ``adapter.json``
(``target_kinds``); without it a non-square target is unambiguous and a square one is an error.
``train_also`` tensors (heads trained whole) replace the base tensor.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UnsupportedError
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

        from ..tensors import ST_TO_TORCH, st_dtype

        return getattr(torch, ST_TO_TORCH[st_dtype(self.base.dtype(key))])

    def get(self, key: str):
        if key in self.whole:
            return self.whole[key] if key not in self.base.files else self.whole[key].to(self.base_dtype(key))
        return self.adapted(key)

    def adapted(self, key: str):
        raise NotImplementedError


class AdapterSource(OnBase):
    """``base + adapter`` for an adapter (native or peft) whose method declares ``merge_deltas``, read as a Checkpoint."""

    def __init__(self, path: str | Path, base: Checkpoint, exclude=None, force: bool = False):
        from ..fingerprint import check_probes
        from ..io import read_adapter
        from ..methods import method_named, registered_methods
        from ..methods.base import SavedTarget
        from ..validate import check_adapter, check_fits

        self.path = Path(path)
        self.base = base
        self.adapter = read_adapter(path)
        self.method = self.adapter.method
        method = method_named(self.method)
        if method is None or method.merge_deltas is None:
            usable = ", ".join(m.name for m in registered_methods() if m.merge_deltas is not None)
            raise UnsupportedError(f"{path} is a {self.method} adapter; merge inputs can be adapters of {usable} "
                                   "(export others merged first: graft export ADAPTER --base BASE --merged OUT)")
        meta = self.adapter.meta
        config = meta.get("config") or {}
        kinds = meta.get("target_kinds") or {}
        options = meta.get("target_options") or {}
        # base tensor name -> its delta, computed on request by the method's own function
        self.deltas: dict = {}
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
            shape = tuple(base.shape(name))
            prefix = f"{name}."
            slots = {k[len(prefix):]: v for k, v in self.adapter.tensors.items() if k.startswith(prefix) and "." not in k[len(prefix):]}

            def fits(kind, feedforward=False, _name=name, _shape=shape):
                check_fits(self.adapter, _name, kind, _shape, f"the base model {base.path}", feedforward=feedforward, where=str(path))

            self.deltas.update(method.merge_deltas(SavedTarget(
                name, slots, config, options.get(name) or {}, kinds.get(name), shape, base.files, str(path), fits,
                self.adapter.tensors)))
        # the factors of each target, for outputs that re-factor the deltas (merge output: adapter)
        self.targets: dict[str, tuple] = {k: (d.kind, *d.factors) for k, d in self.deltas.items() if d.factors}
        self.whole = {name: self.adapter.tensors[f"{name}.value"] for name in self.adapter.train_also
                      if f"{name}.value" in self.adapter.tensors and not skip(name)}
        self.files = base.files
        self.headers = base.headers
        # a QLoRA adapter (graftkit.io.quantize) stands for the model it trained: its delta on the
        # dequantized 4-bit weights, not on the base's own
        self.quantization = meta.get("quantization") or None
        self.requantized = set(self.quantization.get("quantized") or []) if self.quantization else set()
        if self.quantization:
            from ..io.quantize import NOTE, bnb
            from ..outputs import note

            bnb("a QLoRA adapter (trained on a 4-bit base)")  # before the merge starts, not inside it

            note(NOTE.format(what=f"adapter {path}", quant=self.quantization.get("quant_type", "nf4").upper())
                  .replace(", and written in bfloat16", ""))

    def adapter_keys(self) -> list[str]:
        """The tensor names the adapter itself touches (targets and heads trained whole)."""
        return [*self.adapter.targets, *self.adapter.train_also]

    def adapted(self, key: str):
        w = self.base.get(key)
        d = self.deltas.get(key)
        if not w.dtype.is_floating_point or (d is None and key not in self.requantized):
            return w
        if key in self.requantized:
            from ..io.quantize import requantize

            base = requantize(w, self.quantization)
        else:
            base = w.float()
        return (base if d is None else base + d.fn(w)).to(w.dtype)


def is_adapter(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "adapter.json").exists() or (p / "adapter_config.json").exists())
