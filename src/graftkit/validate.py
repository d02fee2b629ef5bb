"""The adapter checks every command shares: ``graft merge`` (and its ``--dry-run``), ``graft export``,
``graft eval`` and ``graft import-peft`` all call these functions, so an adapter one of them
refuses is refused by all of them, with the same one-line message.

* :func:`check_adapter` - the file on its own: every factor present, LoRA ranks that agree between
  ``lora_A``, ``lora_B``, the magnitude vector and ``adapter.json``, and no NaN/Inf anywhere
  (the key is named).
* :func:`expected_shapes` / :func:`check_fits` - the adapter against a base weight's shape, for
  callers that have only a checkpoint header (the merge engine); a live model checks the same
  shapes through its sites (:func:`graftkit.io.native.apply_adapter`), with :func:`shape_error`'s
  wording.
* The base-model fingerprint (:mod:`graftkit.fingerprint`): on a live model, or on a checkpoint
  through :func:`graftkit.fingerprint.check_probes`. ``--force`` (``force=True``) skips it on
  every command; nothing skips the shape and value checks.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .errors import AdapterError, ConfigError, FileFormatError

if TYPE_CHECKING:
    from .io.native import AdapterFile

FORCE_HINT = "pass --force (force=True in Python) if you really mean to transplant it"


def shape_error(key: str, got: tuple, want: tuple, base: str, detail: str = "", where: str = "") -> AdapterError:
    return AdapterError(f"{where + ': ' if where else ''}adapter tensor {key} has shape {tuple(got)} but {base} needs {tuple(want)}{detail}; "
                        "the adapter was made for another base model (or is corrupt)")


def first_nonfinite(tensors, skip=None) -> tuple[str, int] | None:
    """``(key, count)`` of the first float tensor of ``(key, tensor)`` pairs holding NaN/Inf, or None."""
    import torch

    for key, t in tensors:
        if skip is not None and skip(key):
            continue
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return key, int((~torch.isfinite(t)).sum())
    return None


def check_finite(adapter: AdapterFile, where: str, skip=None) -> None:
    """No NaN/Inf in any tensor (``skip(target name)``: targets left out of a merge by ``exclude``)."""
    found = first_nonfinite(adapter.tensors.items(), None if skip is None else lambda key: skip(key.rsplit(".", 1)[0]))
    if found is not None:
        raise AdapterError(f"{where}: adapter tensor {found[0]} has {found[1]} NaN/Inf value(s); the adapter is broken "
                           "(a diverged training run?) - retrain or re-save it")


def check_model_finite(model, where: str) -> None:
    """No NaN/Inf in a loaded base model's weights: training from them only fails later, on a NaN loss.
    Parameters only: some architectures keep masks of -inf as buffers."""
    found = first_nonfinite(model.named_parameters())
    if found is not None:
        raise FileFormatError(f"{where}: weight {found[0]} has {found[1]} NaN/Inf value(s); the model is broken "
                              "- re-create or re-download it")


def saved_tensor(adapter: AdapterFile, key: str, where: str):
    t = adapter.tensors.get(key)
    if t is None:
        raise AdapterError(f"{where}: the adapter file has no tensor {key}; it is incomplete - re-save it")
    return t


def check_consistent(adapter: AdapterFile, where: str) -> None:
    """The tensors of each target agree with each other and with ``adapter.json`` (each method
    checks its own slots: ``check_saved`` on the registered method)."""
    from .methods import method_named

    method = method_named(adapter.method)
    options = adapter.meta.get("target_options") or {}
    if method is not None and method.check_saved is not None:
        for name in adapter.targets:
            method.check_saved(adapter, name, options.get(name) or {}, where)
    for name in adapter.train_also:
        saved_tensor(adapter, f"{name}.value", where)


def check_adapter(adapter: AdapterFile, where: str, skip=None) -> None:
    """Every check that needs no base model: complete, consistent, finite."""
    check_consistent(adapter, where)
    check_finite(adapter, where, skip)


def expected_shapes(adapter: AdapterFile, name: str, kind: str, base_shape: tuple, feedforward: bool = False) -> dict[str, tuple]:
    """The shapes the adapter's tensors of target ``name`` must have on a base weight of ``base_shape``."""
    from .methods import method_named

    method = method_named(adapter.method)
    if method is None or method.saved_shapes is None:
        return {}
    return method.saved_shapes(adapter, name, kind, tuple(base_shape), feedforward)


def check_fits(adapter: AdapterFile, name: str, kind: str, base_shape: tuple, base: str, feedforward: bool = False,
               where: str = "") -> None:
    """Refuse an adapter whose factors for ``name`` do not fit a base weight of ``base_shape``."""
    if len(base_shape) < 2:
        raise AdapterError(f"{where + ': ' if where else ''}the adapter targets {name}, which is {tuple(base_shape)} in {base} (not a weight matrix); "
                           "it was made for another base model")
    for key, want in expected_shapes(adapter, name, kind, base_shape, feedforward).items():
        got = tuple(adapter.tensors[key].shape)
        if got != want:
            raise shape_error(key, got, want, base, f" (its weight {name} is {tuple(base_shape)})", where)


# -- argument values shared by the commands ------------------------------------------------------

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "K": 10**3, "M": 10**6, "G": 10**9,
               "T": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str, what: str = "max_shard_size") -> int:
    """A size such as ``2GB``, ``500MB``, ``1.5GiB`` or a number of bytes; positive."""
    if isinstance(value, bool):
        raise ConfigError(f"{what + ' ' if what else ''}{value!r} is not a size; write e.g. 2GB, 500MB or a number of bytes")
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        unit = m.group(2).upper() if m else None
        if unit not in _SIZE_UNITS:
            raise ConfigError(f"{what + ' ' if what else ''}{value!r} is not a size; write e.g. 2GB, 500MB, 1GiB or a number of bytes")
        n = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if n <= 0:
        raise ConfigError(f"{what + ' ' if what else ''}{value!r} must be more than 0 bytes; write e.g. 2GB")
    return n
