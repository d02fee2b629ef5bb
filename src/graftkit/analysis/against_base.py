"""Open a base model and the models compared against it, tensor by tensor.

``graft inspect --deltas`` (delta_stats.py) and task-vector similarity (similarity.py) both read
"fine-tuned minus base" one tensor name at a time. Their inputs are opened as the merge executor
opens them (:func:`graftkit.merge.plan.open_input`: an adapter folder is ``base + its materialized
delta``) and every header is checked against the base before any tensor is read, so a mismatch
costs nothing and writes nothing. Each caller passes its own :class:`Wording`, so its messages name
its own options.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from ..errors import ConfigError, FileFormatError, GraftError

if TYPE_CHECKING:
    import torch

@dataclass(frozen=True)
class Wording:
    role: str                # what one compared model is called: "delta", "expert"
    error: type[GraftError]  # raised for a key or shape that does not line up with the base
    hint: str                # how to fix such a mismatch
    empty: str               # the whole message when no model is given
    instead: str             # after "the base X is an adapter folder; ": what to pass
    nothing_left: str        # the whole message when exclude leaves no tensor; {patterns} and {base} filled in


def excluded(key: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def open_against_base(base: str | Path, inputs: Mapping[str, str], patterns: list[str], wording: Wording):
    """``(base path, base checkpoint, {name: checkpoint}, keys)``: the keys are the base's
    floating-point tensors that ``patterns`` (globs) do not exclude. ``base`` may be a packaged alias
    (``smollm2``); the path returned is then its folder."""
    from ..assets import ALIASES, model_dir
    from ..merge.adapters import is_adapter
    from ..merge.plan import FLOAT_DTYPES, open_input
    from ..tensors import st_dtype

    if not inputs:
        raise ConfigError(wording.empty)
    if str(base) in ALIASES and not Path(base).exists():  # --base smollm2, as every other command takes it
        base = model_dir(base)
    base_path = str(base)
    for label, p in [("base", base_path), *((f"{wording.role} {n}", str(p)) for n, p in inputs.items())]:
        if not Path(p).exists():
            raise FileFormatError(f"{label} {p} does not exist; pass an HF model folder, a safetensors file or an adapter folder")
    if is_adapter(base_path):
        raise ConfigError(f"the base {base_path} is an adapter folder; {wording.instead}")
    base_ckpt = open_input(base_path, require_config=False)
    # an adapter must not even check what is excluded (a head trained whole for another label count)
    skip = {"exclude": lambda key: excluded(key, patterns)} if patterns else {}
    ckpts = {n: open_input(str(p), base_ckpt, require_config=False, **skip) for n, p in inputs.items()}
    keys = [k for k in base_ckpt.keys() if not excluded(k, patterns) and st_dtype(base_ckpt.dtype(k)) in FLOAT_DTYPES]
    base_keys = set(base_ckpt.keys())
    for n, c in ckpts.items():
        have = set(c.keys())
        for k in keys:
            if k not in have:
                raise wording.error(f"{wording.role} {n} ({inputs[n]}) has no tensor {k}, which the base {base_path} has; {wording.hint}")
            check_shape(k, tuple(base_ckpt.shape(k)), tuple(c.shape(k)), n, wording)
        extra = sorted(k for k in have - base_keys if not excluded(k, patterns))
        if extra:
            raise wording.error(f"{wording.role} {n} ({inputs[n]}) has a tensor {extra[0]} that the base {base_path} lacks; {wording.hint}")
    if not keys:
        raise ConfigError(wording.nothing_left.format(patterns=patterns, base=base_path))
    return base_path, base_ckpt, ckpts, keys


def check_shape(key: str, base_shape: tuple, shape: tuple, name: str, wording: Wording) -> None:
    """Called on the headers and again on the tensors read: an adapter's whole-trained head can
    differ from what its header promised."""
    if tuple(shape) != tuple(base_shape):
        raise wording.error(f"shape mismatch at {key}: {tuple(base_shape)} in the base vs {tuple(shape)} in {wording.role} {name}; {wording.hint}")


def read_against(ckpt, key: str, w0: "torch.Tensor", name: str, wording: Wording) -> "torch.Tensor":
    """Tensor ``key`` of a compared model, its shape checked against the base's ``w0``."""
    w = ckpt.get(key)
    check_shape(key, tuple(w0.shape), tuple(w.shape), name, wording)
    return w
