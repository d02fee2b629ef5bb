"""Adapter soups: averaging the tensors of adapters that change activations.

Chronopoulou et al., 2023, "AdapterSoup: Weight Averaging to Improve Generalization of
Pretrained Language Models" (Findings of EACL): adapters trained on different domains, on one
frozen model and with one architecture, are averaged parameter by parameter,
``phi = sum_i w_i phi_i / sum_i w_i``, and the average runs as a single adapter (no ensemble).

A bottleneck adapter (or any method without a weight delta) cannot be folded into the base, so
a weight-space merge has nothing to work on; what it has is its own tensors. ``graft merge``
routes a config whose inputs are such adapters here:

* ``merge_method: linear`` - the weighted average of each adapter tensor (AdapterSoup's soup;
  ``normalize: false`` gives the plain weighted sum);
* ``merge_method: task_arithmetic`` - ``phi_0 + lambda * sum_i w_i (phi_i - phi_0)``, where
  ``phi_0`` is an adapter given as ``base_model``: the adapter the inputs were all trained from.
  An adapter has no base tensors of its own, and no constant stands in for them: a zero
  up-projection is the start of a fresh adapter, but its down-projection starts random (a
  different draw per run), so ``phi_i - 0`` is not what training changed. The base model's
  folder is therefore refused as base_model here, with that reason.

Any merge method that is a weighted sum of its inputs (its declared fused kernel keeps every
entry and elects no signs, and it draws nothing at random) works the same way; the others (TIES,
DARE, ...) trim or elect the entries of weight deltas and are refused in one line.

The one-line rule: the adapters share one method, one config (the method's config dicts are
equal), one base (the base-model fingerprint in adapter.json; ``--force`` skips this one) and
one set of targets (names, per-target options, tensors and their shapes). Anything else is
refused, naming what differs. The output is an adapter folder of the same method whose tensors
are the merged ones; its adapter.json records the soup.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import ConfigError, GraftError, UnsupportedError
from .config import MergeConfig, load_config

_LAYER = re.compile(r"\.(?:layers|h|layer|block|blocks)\.(\d+)\.")


class SoupError(GraftError):
    """Adapters that cannot go into one soup."""


def _native_meta(path: str) -> dict | None:
    """A native adapter folder's adapter.json, or None (a model, a peft folder, or unreadable:
    the ordinary merge path reports those)."""
    from .adapters import is_adapter

    p = Path(path)
    if not is_adapter(p) or not (p / "adapter.json").is_file():
        return None
    try:
        meta = json.loads((p / "adapter.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _has_weight_delta(meta: dict) -> bool:
    from ..methods import method_named

    method = method_named(meta.get("method"))
    if method is None:
        return True
    try:
        return method.weight_delta(meta.get("config") or {})
    except GraftError:  # a broken config: the ordinary path names it
        return True


def is_soup(cfg: MergeConfig) -> bool:
    """Whether a merge config's inputs include an adapter without a weight delta."""
    paths = [m.model for m in cfg.models] + ([cfg.base_model] if cfg.base_model else [])
    return any(meta is not None and not _has_weight_delta(meta) for meta in map(_native_meta, dict.fromkeys(paths)))


def soup_methods() -> list[str]:
    """Merge methods that are weighted sums of their inputs (what a soup can compute)."""
    from ..registry import MERGES

    return [n for n in MERGES if _is_weighted_sum(MERGES.get(n))]


def _is_weighted_sum(spec) -> bool:
    fused = spec.fused
    return fused is not None and fused.keep == "all" and not fused.consensus and not spec.random


class Soup:
    """A checked adapter soup: the inputs, read whole (adapters are small), and the method."""

    def __init__(self, cfg: MergeConfig, allow_pickle: bool = False, force: bool = False):
        from ..io import read_adapter
        from ..validate import check_adapter

        self.cfg = cfg
        self.spec = spec = cfg.method()
        paths = [m.model for m in cfg.models]
        kind = next(m for m in map(_native_meta, [*paths, *([cfg.base_model] if cfg.base_model else [])])
                    if m is not None and not _has_weight_delta(m))
        label = f"{kind['method']} adapters"
        if not _is_weighted_sum(spec):
            raise UnsupportedError(
                f"merge_method {spec.name} cannot merge {label}: they change activations and have no weight delta, and {spec.name} "
                f"trims or elects the entries of weight deltas; average them in an adapter soup with merge_method "
                f"{' or '.join(soup_methods())}")
        if cfg.output == "adapter":
            raise ConfigError(f"output: adapter writes a merge as a LoRA; an adapter soup of {label} already writes an adapter of their "
                              "method - remove output and rank")
        for key, what in (("search", "search"), ("exclude", "exclude"), ("tokenizer_source", "tokenizer_source"), ("rank", "rank")):
            if key in cfg.model_fields_set and getattr(cfg, key):
                raise ConfigError(f"{what} does not apply to an adapter soup of {label} (it writes an adapter folder of their method); remove it")
        self.base_path = cfg.base_model if spec.needs_base else None
        self.inputs = [p for p in paths if p != self.base_path] if spec.inputs == "delta" else list(paths)
        if not self.inputs:
            raise ConfigError(f"an adapter soup needs at least one adapter besides base_model; list the {label} under models")
        for p in dict.fromkeys([*self.inputs, *([self.base_path] if self.base_path else [])]):
            if _native_meta(p) is None:
                if p == self.base_path:
                    raise ConfigError(
                        f"merge_method {spec.name} on {label} needs base_model to be the adapter they were all trained from, but {p} "
                        "is not a graftkit adapter folder: an adapter has no base tensors, and no constant replaces them (its "
                        "down-projection starts random), so use merge_method linear or give that starting adapter")
                raise SoupError(f"{p} is not a graftkit adapter folder, but other inputs are {label}; an adapter soup's inputs "
                                "are all adapters of one method, config and base")
        self.adapters = {p: read_adapter(p, allow_pickle) for p in dict.fromkeys([*self.inputs, *([self.base_path] if self.base_path else [])])}
        for p, a in self.adapters.items():
            check_adapter(a, p)  # complete, consistent, finite: as every command checks an adapter
        ref_path = self.inputs[0]
        ref = self.adapters[ref_path]
        for p, a in self.adapters.items():
            if p != ref_path:
                _same(ref_path, ref, p, a, force)
        self.reference = ref
        self.method = ref.method
        if cfg.base_model and not spec.needs_base and _native_meta(cfg.base_model) is None and not force:
            self._check_base_model(cfg.base_model, allow_pickle)
        self.keys = list(ref.tensors)
        layers = [int(m.group(1)) for k in self.keys for m in [_LAYER.search(k)] if m]
        self.num_layers = max(layers) + 1 if layers else 0

    def _check_base_model(self, path: str, allow_pickle: bool) -> None:
        """A model folder as base_model of a linear soup: the adapters must have been trained on it."""
        from ..fingerprint import check_probes
        from ..tensors import Checkpoint

        base = Checkpoint(Path(path), allow_pickle=allow_pickle)
        for p, a in self.adapters.items():
            meta = a.meta.get("base_model") or {}
            check_probes(lambda n: base.get(n) if n in base.files else None, meta.get("fingerprint"), meta.get("name_or_path"),
                         where=f"{p}: ")

    # -- the merge ---------------------------------------------------------------------------
    def layer_t(self, key: str) -> float:
        m = _LAYER.search(key)
        if not m or self.num_layers <= 1:
            return 0.0 if not m or self.num_layers <= 0 else 1.0
        return int(m.group(1)) / (self.num_layers - 1)

    def params(self, key: str) -> dict:
        """The method's parameters for one tensor, resolved as a model merge resolves them
        (per-model values, filter lists, per-layer gradients)."""
        from .plan import resolve_params

        return resolve_params(self.cfg, self.spec, self.inputs, key, self.layer_t(key))

    def tensors(self) -> dict:
        import torch

        from ..tensors import NAME_TO_ST, ST_TO_TORCH

        want = self.cfg.out_dtype or self.cfg.dtype
        out = {}
        for key in self.keys:
            raw = [self.adapters[p].tensors[key] for p in self.inputs]
            params = self.params(key)
            if self.spec.inputs == "delta":
                base = self.adapters[self.base_path].tensors[key].float()
                merged = self.spec.fn(base, torch.stack([t.float() - base for t in raw]), **params)
            elif self.spec.needs_all_inputs_at_once:
                merged = self.spec.fn(None, torch.stack([t.float() for t in raw]), **params)
            else:
                merged = self.spec.fn(None, raw, **params)
            if not bool(torch.isfinite(merged).all()):
                raise SoupError(f"{key}: the soup has NaN/Inf values (the inputs are finite); check the weights and lambda")
            dtype = getattr(torch, ST_TO_TORCH[NAME_TO_ST[want]]) if want else raw[0].dtype
            out[key] = merged.to(dtype).contiguous()
        return out

    def describe(self) -> str:
        n = sum(t.numel() for t in self.reference.tensors.values())
        base = f" from {self.base_path}" if self.base_path else ""
        return (f"adapter soup: {self.spec.name} of {len(self.inputs)} {self.method} adapters{base} "
                f"({len(self.keys)} tensors, {n:,} parameters each) -> an adapter folder of the same method")

    def write(self, out: str | Path, overwrite: bool = False) -> Path:
        from ..io.native import AdapterFile, versions, write_native

        meta = {k: v for k, v in self.reference.meta.items() if k not in ("versions", "soup", "merge")}
        per_model = {m.model: m.parameters for m in self.cfg.models}
        meta["soup"] = {
            "merge_method": self.spec.name,
            "paper": "AdapterSoup (Chronopoulou et al., 2023)",
            "models": [{"model": str(p), "parameters": _plain(per_model.get(p, {}))} for p in self.inputs],
            "base": str(self.base_path) if self.base_path else None,
            "parameters": _plain(self.cfg.parameters),
        }
        meta["versions"] = versions()
        return write_native(AdapterFile(meta, self.tensors()), out, overwrite)


def _plain(value: Any) -> Any:
    """Parameter values as JSON (filter entries are pydantic models)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value.model_dump() if hasattr(value, "model_dump") else value


def _first_difference(a: Any, b: Any) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in [*a, *(k for k in b if k not in a)]:
            if a.get(k, "<absent>") != b.get(k, "<absent>"):
                return f"{k} {_short(a.get(k, '<absent>'))} vs {_short(b.get(k, '<absent>'))}"
    return f"{_short(a)} vs {_short(b)}"


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def _same(ref_path: str, ref, path: str, other, force: bool) -> None:
    """Refuse ``other`` unless it is an adapter of ``ref``'s method, config, base and targets."""
    if other.method != ref.method:
        raise SoupError(f"{path} is a {other.method} adapter but {ref_path} is a {ref.method} adapter; an adapter soup "
                        "averages adapters of one method only")
    if other.meta.get("config") != ref.meta.get("config"):
        raise SoupError(f"{path} and {ref_path} differ in their {ref.method} config ({_first_difference(ref.meta.get('config'), other.meta.get('config'))}); "
                        "an adapter soup averages adapters of one config only")
    if not force:
        fa = (ref.meta.get("base_model") or {}).get("fingerprint")
        fb = (other.meta.get("base_model") or {}).get("fingerprint")
        if fa != fb:
            names = [(m.get("base_model") or {}).get("name_or_path") for m in (ref.meta, other.meta)]
            shown = f" ({names[1]} vs {names[0]})" if any(names) else ""
            raise SoupError(f"{path} and {ref_path} were trained on different base models{shown}: their base-model fingerprints "
                            f"differ ({_first_difference(fa or {}, fb or {})}); an adapter soup averages adapters of one base only "
                            "(pass --force if you really mean to mix them)")
    for key, what in (("targets", "targets"), ("target_options", "per-target options"), ("train_also", "parameters trained whole")):
        if other.meta.get(key) != ref.meta.get(key):
            raise SoupError(f"{path} and {ref_path} differ in their {what} ({_first_difference(ref.meta.get(key), other.meta.get(key))}); "
                            "an adapter soup averages adapters of the same targets only")
    for key, t in ref.tensors.items():
        got = other.tensors.get(key)
        if got is None:
            raise SoupError(f"{path} has no tensor {key}, which {ref_path} has; an adapter soup averages adapters of the same targets only")
        if tuple(got.shape) != tuple(t.shape):
            raise SoupError(f"{key} is {tuple(got.shape)} in {path} but {tuple(t.shape)} in {ref_path}; the adapters differ in size")
    extra = [k for k in other.tensors if k not in ref.tensors]
    if extra:
        raise SoupError(f"{path} has a tensor {extra[0]} that {ref_path} lacks; an adapter soup averages adapters of the same targets only")


def run_soup(cfg: MergeConfig, out: str | Path, *, overwrite: bool = False, allow_pickle: bool = False, force: bool = False) -> Path:
    return Soup(cfg, allow_pickle=allow_pickle, force=force).write(out, overwrite=overwrite)


def adapter_soup(adapters: list, out: str | Path, *, merge_method: str = "linear", weights: list[float] | None = None,
                 base: str | Path | None = None, parameters: dict | None = None, overwrite: bool = False,
                 force: bool = False) -> Path:
    """Average adapters of one activation-space method, config and base into a new adapter folder
    (the Python form of ``graft merge`` on such adapters). ``weights``: one per adapter (default
    1 each); ``base``: the adapter they were trained from (``task_arithmetic``) or the base model
    (checked against their fingerprints); ``parameters``: the method's global parameters
    (``normalize``, ``lambda``)."""
    from ..outputs import check_output
    from .plan import merge_inputs

    adapters = [str(a) for a in adapters]
    if weights is not None and len(weights) != len(adapters):
        raise ConfigError(f"adapter_soup: {len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    config: dict[str, Any] = {
        "merge_method": merge_method,
        "models": [{"model": a, **({"parameters": {"weight": weights[i]}} if weights is not None else {})} for i, a in enumerate(adapters)],
        "parameters": dict(parameters or {}),
    }
    if base is not None:
        config["base_model"] = str(base)
    cfg = load_config(config)
    if not is_soup(cfg):
        raise UnsupportedError("adapter_soup averages adapters without a weight delta (bottleneck adapters and the like); these "
                               "inputs merge in weight space: use gk.merge with the base model as base_model")
    check_output(out, merge_inputs(cfg))
    if Path(out).exists() and not overwrite:
        from ..errors import FileFormatError

        raise FileFormatError(f"{out} already exists; choose another output folder or pass overwrite=True")
    return run_soup(cfg, out, overwrite=overwrite, force=force)
