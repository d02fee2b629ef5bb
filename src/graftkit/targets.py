"""Choosing parameters by name.

A target pattern is matched against each parameter's full name and against the name of the
module that owns it (the parameter name minus its last part):

* ``re:<regex>`` - the regex must match the whole parameter or module name;
* anything else is a glob (``*``, ``?``, ``[...]``) that may match the whole name or any
  dotted suffix of it, so ``q_proj`` selects ``model.layers.3.self_attn.q_proj.weight`` the
  way peft's ``target_modules`` does, and ``layers.0.*`` selects everything in block 0;
* ``all-linear`` - every Linear / Conv1D weight except the output head (as in peft).

``layers`` narrows the selection to transformer blocks: a list of block indices, or
``"top:k"`` / ``"bottom:k"``. ``module_types`` narrows it to owners of the given class names
(``Linear``, ``Conv1D``, ``Embedding``, ``Conv2d``, ...).

The result is an explicit sorted list of parameter names, saved with the adapter so that
loading never re-interprets the patterns.
"""
from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from torch import nn

from .errors import TargetError
from .layers import is_conv1d

_BLOCK_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class ParamInfo:
    name: str  # full parameter name, e.g. model.layers.0.self_attn.q_proj.weight
    module_name: str  # owner module, e.g. model.layers.0.self_attn.q_proj
    pname: str  # attribute on the owner, e.g. weight
    module: nn.Module
    param: nn.Parameter


def iter_params(model: nn.Module) -> list[ParamInfo]:
    """All base parameters (tied aliases reported once, under their first name)."""
    out = []
    seen: set[int] = set()
    for mname, module in model.named_modules():
        if ".graft_adapter" in f".{mname}" or mname.endswith("graft_adapter"):
            continue
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{mname}.{pname}" if mname else pname
            out.append(ParamInfo(full, mname, pname, module, param))
    return out


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """Second names of shared tensors -> the name they are reported under."""
    first: dict[int, str] = {}
    alias: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first and first[id(param)] != name:
            alias[name] = first[id(param)]
        else:
            first.setdefault(id(param), name)
    return alias


def block_index(name: str) -> int | None:
    m = _BLOCK_RE.search(name)
    return int(m.group(1)) if m else None


def _suffixes(name: str) -> Iterable[str]:
    parts = name.split(".")
    for i in range(len(parts)):
        yield ".".join(parts[i:])


def pattern_matches(pattern: str, info: ParamInfo) -> bool:
    names = (info.name, info.module_name)
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return any(rx.fullmatch(n) for n in names)
    return any(fnmatch.fnmatchcase(s, pattern) for n in names if n for s in _suffixes(n))


# task heads that peft's all-linear also leaves out (they are new, and trained whole)
TASK_HEADS = ("classifier", "score", "lm_head")


def _output_head_names(model: nn.Module) -> set[str]:
    heads: set[str] = {name for name, _ in model.named_children() if name in TASK_HEADS}
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is not None:
        for mname, module in model.named_modules():
            if module is head:
                heads.add(mname)
    return heads


def _select_layers(infos: list[ParamInfo], layers) -> list[ParamInfo]:
    indices = [block_index(i.name) for i in infos]
    present = sorted({i for i in indices if i is not None})
    if not present:
        raise TargetError("'layers' was given but no parameter name has a block index (layers.N / h.N / layer.N); drop 'layers' or target names directly")
    wanted = wanted_layers(present, layers)
    return [i for i, idx in zip(infos, indices) if idx in wanted]


def wanted_layers(present: list[int], layers) -> set[int]:
    """The block indices a ``layers`` value selects among the sorted indices ``present``:
    a list of indices, ``"top:K"`` or ``"bottom:K"``; out-of-range values are refused in one line."""
    if isinstance(layers, str):
        m = re.fullmatch(r"(top|bottom):(\d+)", layers)
        if not m:
            raise TargetError(f"bad layers value {layers!r}: use a list of block indices, 'top:K' or 'bottom:K'")
        k = int(m.group(2))
        if not 1 <= k <= len(present):
            raise TargetError(f"layers {layers!r}: the model has {len(present)} blocks ({present[0]}..{present[-1]}); choose K in 1..{len(present)}")
        return set(present[-k:] if m.group(1) == "top" else present[:k])
    wanted = set(layers)
    missing = wanted - set(present)
    if missing:
        raise TargetError(f"layers {sorted(missing)} do not exist; the model has blocks {present[0]}..{present[-1]}")
    return wanted


def resolve_targets(
    model: nn.Module,
    targets: Sequence[str],
    *,
    exclude: Sequence[str] = (),
    module_types: Sequence[str] | None = None,
    layers=None,
    eligible: Callable[[ParamInfo], bool],
    what: str,
    skip: Iterable[str] = (),
) -> list[ParamInfo]:
    """Resolve patterns to parameters ``what`` can adapt; a pattern that selects none is an error."""
    infos = [i for i in iter_params(model) if i.name not in set(skip)]
    candidates = [i for i in infos if eligible(i)]
    heads = _output_head_names(model)
    aliases = tied_aliases(model)
    chosen: dict[str, ParamInfo] = {}
    for pattern in targets:
        if pattern == "all-linear":
            hits = [
                i for i in candidates
                if i.pname == "weight" and (isinstance(i.module, nn.Linear) or is_conv1d(i.module)) and i.module_name not in heads
            ]
        else:
            hits = [i for i in candidates if pattern_matches(pattern, i)]
        if not hits:
            raise TargetError(_nothing_matched(pattern, what, candidates, infos, aliases))
        for i in hits:
            chosen[i.name] = i
    selected = [i for i in chosen.values() if not any(pattern_matches(p, i) for p in exclude)]
    if module_types:
        types = set(module_types)
        selected = [i for i in selected if type(i.module).__name__ in types]
    if layers is not None:
        selected = _select_layers(selected, layers)
    if not selected:
        raise TargetError(f"targets {list(targets)} select no parameter for {what} after exclude/module_types/layers; loosen them")
    return sorted(selected, key=lambda i: i.name)


def _nothing_matched(pattern, what, candidates, infos, aliases) -> str:
    eligible = {i.name for i in candidates}
    for alias, real in aliases.items():
        # only when the shared tensor itself could be adapted: BitFit's '*' on T5 (no biases, tied
        # embeddings) must say there is nothing to adapt, not point at the embedding
        if real in eligible and pattern_matches(pattern, ParamInfo(alias, alias.rsplit(".", 1)[0], alias.rsplit(".", 1)[-1], nn.Module(), None)):
            return f"target {pattern!r} names {alias}, which is tied to {real} (one shared tensor); target {real!r} instead, or untie the weights (tie_word_embeddings=False)"
    pool = sorted({i.name for i in candidates} | {i.module_name for i in candidates})
    close = difflib.get_close_matches(pattern, pool, n=3, cutoff=0.3)
    if not close:
        # compare against the last name parts too: users usually type short names
        short = {n.split(".")[-1]: n for n in pool}
        close = [short[c] for c in difflib.get_close_matches(pattern.split(".")[-1], list(short), n=3, cutoff=0.3)]
    if not candidates:
        return f"target {pattern!r}: the model has no parameter that {what} can adapt"
    hint = f"; closest names: {', '.join(close)}" if close else f"; e.g. {', '.join(pool[:3])}"
    return f"target {pattern!r} matches no parameter that {what} can adapt{hint}"


def find_param(model: nn.Module, name: str) -> ParamInfo:
    """Look up one parameter by its full name (used when loading a saved, resolved list)."""
    mname, _, pname = name.rpartition(".")
    try:
        module = model.get_submodule(mname) if mname else model
    except AttributeError:
        module = None
    param = module._parameters.get(pname) if module is not None else None
    if param is None:
        raise TargetError(f"the model has no parameter {name!r}; was the adapter made for another architecture?")
    return ParamInfo(name, mname, pname, module, param)
