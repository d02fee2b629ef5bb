"""What a training run was made from, so that ``--resume`` can refuse when it changed.

The recipe's own fingerprint (:meth:`Recipe.fingerprint`) covers the settings; a checkpoint
also depends on the *contents* of what those settings point at. Each checkpoint's
``state.json`` (and ``run.json``) records

* ``data``: for each data file of the recipe (``train``, ``validation``) its path, size in bytes,
  sha256 of its bytes, and how many examples it gave;
* ``model``: the base model's fingerprint (:mod:`graftkit.fingerprint`, the one adapters carry:
  parameter count, a hash of every name and shape, probe values of the adapted tensors);
* ``labels``: the class labels in head order (classification).

Hashes are computed afresh on every start, streaming the file: nothing is cached, so a file
changed behind an unchanged modification time is still caught.

A checkpoint written before these records existed has none; resuming from it is allowed with
a warning that the inputs could not be checked (refusing would strand runs that cannot be
given the records after the fact).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

CHUNK = 1 << 20
START_OVER = "or pass --overwrite to start over"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def data_record(files: dict[str, str], examples: dict[str, int]) -> dict[str, dict[str, Any]]:
    """``{"train": {"path", "bytes", "sha256", "examples"}, ...}`` for the recipe's data files."""
    out = {}
    for role, path in files.items():
        p = Path(path)
        out[role] = {"path": str(path), "bytes": p.stat().st_size, "sha256": file_sha256(p), "examples": examples.get(role)}
    return out


def fingerprint(record: dict[str, Any]) -> str:
    """One hash over the recorded inputs (recipe fingerprint, data hashes, model fingerprint, labels)."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def _count(n: Any, what: str) -> str:
    return f"{n:,} {what}" if isinstance(n, int) else f"? {what}"


def _change(a: Any, b: Any, what: str) -> str:
    """``24 -> 6 examples``."""
    show = lambda n: f"{n:,}" if isinstance(n, int) else "?"  # noqa: E731
    return f"{show(a)} -> {show(b)} {what}"


def data_change(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """A description of the first data file whose contents differ, or ``None``."""
    for role in sorted(set(old) | set(new)):
        a, b = old.get(role), new.get(role)
        if a is None or b is None:
            which = (b or a)["path"]
            return f"data.{role} {which} was {'added' if a is None else 'removed'}"
        if a["sha256"] != b["sha256"]:
            sizes = _change(a.get("bytes"), b.get("bytes"), "bytes")
            if a.get("examples") != b.get("examples"):
                sizes += ", " + _change(a.get("examples"), b.get("examples"), "examples")
            return f"data file {b['path']} (data.{role}) changed ({sizes}, sha256 {a['sha256'][:12]} -> {b['sha256'][:12]})"
    return None


def label_change(old: list[str] | None, new: list[str] | None) -> str | None:
    if old is None or new is None or list(old) == list(new):
        return None
    added = [x for x in new if x not in old]
    removed = [x for x in old if x not in new]
    parts = [f"added {', '.join(map(repr, added))}"] if added else []
    parts += [f"removed {', '.join(map(repr, removed))}"] if removed else []
    what = "; ".join(parts) if parts else "same labels in another order"
    return f"labels changed: {what} (were {', '.join(old)}; now {', '.join(new)})"


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN probes compare equal to themselves


def model_change(old: dict[str, Any] | None, new: dict[str, Any] | None) -> str | None:
    if not old or not new or _same(old, new):
        return None
    if old.get("structure") != new.get("structure") or old.get("num_parameters") != new.get("num_parameters"):
        return (f"{_count(old.get('num_parameters'), 'parameters')} with structure {old.get('structure')} -> "
                f"{_count(new.get('num_parameters'), 'parameters')} with structure {new.get('structure')}")
    if old.get("dtype") != new.get("dtype"):
        return f"its weights load as {new.get('dtype')}, not {old.get('dtype')}"
    for name, values in (old.get("probe") or {}).items():
        if not _same((new.get("probe") or {}).get(name), values):
            return f"the weights of {name} differ"
    return "its fingerprint differs"


def check(recorded: dict[str, Any], current: dict[str, Any], where: str, model: str) -> str | None:
    """The one-line refusal for resuming ``current`` from a checkpoint that recorded ``recorded``.

    Labels come first: a label added to the training file also changes the file's hash, and the
    label is what the user needs to hear about."""
    change = label_change(recorded.get("labels"), current.get("labels"))
    if change:
        data = data_change(recorded.get("data") or {}, current.get("data") or {})
        cause = f" ({data})" if data else ""
        return f"cannot resume from {where}: {change}{cause}; restore the data it was trained on, {START_OVER}"
    change = data_change(recorded.get("data") or {}, current.get("data") or {})
    if change:
        return f"cannot resume from {where}: {change} since it was written; restore the file, {START_OVER}"
    change = model_change(recorded.get("model"), current.get("model"))
    if change:
        return f"cannot resume from {where}: the base model {model} changed since it was written ({change}); restore it, {START_OVER}"
    return None
