"""``init_from``: start a run's adapter from a saved one (PVP), and record where it came from.

PVP (Song et al., "PVP: Pre-trained Visual Parameter-Efficient Tuning", papers-000.md #3)
trains the PEFT modules (prompts, LoRA, adapters) on upstream data with the backbone frozen,
then uses those trained modules - instead of a random initialisation - as the start of the
downstream PEFT run. In graftkit that second stage is the recipe option ``init_from: PATH``:
after the recipe's method is injected, every tensor of the new adapter is copied from the
saved adapter at PATH (a graftkit adapter folder, a ``graft train`` output folder holding one,
or a peft folder graftkit reads). Nothing else changes: the optimizer, schedule and data are
the recipe's, so ``init_from`` works with every method.

The source must fit exactly, else one line says what differs:

- the same method (``lora`` cannot start a ``houlsby`` run);
- the same base model: the source's recorded base fingerprint (``adapter.json``
  ``base_model.fingerprint``, see :mod:`graftkit.fingerprint`) is checked against this model's
  weights; a peft folder records none, so only its shapes are checked (with a warning);
- the same shape: the same targets, and every tensor the same shape (LoRA rank, bottleneck
  width, prompt length and width).

Heads trained whole (``train_also``, e.g. a classifier) are copied when the source has the same
head for the same labels; a source trained on other labels leaves this run's head fresh (a
warning says so), since its rows would mean other classes.

The saved adapter records its lineage in ``adapter.json`` (``lineage.init_from``: the source
path, the sha256 of its files, its method and base fingerprint, and the source's own lineage).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AdapterError, ConfigError, FileFormatError, GraftError

# the files of a graftkit or peft adapter folder that decide its contents
_ADAPTER_FILES = ("adapter.json", "adapter.safetensors", "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


@dataclass
class Source:
    """A saved adapter a run reads (``init_from``, a distillation teacher or reference)."""

    role: str  # how the recipe names it in messages: "init_from", "distill.teacher", ...
    path: Path
    adapter: Any  # graftkit.io.native.AdapterFile
    sha256: str
    warnings: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.adapter.method

    @property
    def fingerprint(self) -> dict | None:
        return (self.adapter.meta.get("base_model") or {}).get("fingerprint")

    def record(self) -> dict[str, Any]:
        fp = self.fingerprint or {}
        return {"path": str(self.path), "sha256": self.sha256, "method": self.method,
                "base_fingerprint": fp.get("structure"), "base_model": (self.adapter.meta.get("base_model") or {}).get("name_or_path"),
                "lineage": self.adapter.meta.get("lineage")}


def _resolve(path: str | Path) -> Path:
    """A ``graft train`` output folder stands for the adapter it saved (``<run>/adapter``)."""
    p = Path(path).expanduser()
    if p.is_dir() and not any((p / n).exists() for n in ("adapter.json", "adapter_config.json")) and (p / "adapter").is_dir():
        return p / "adapter"
    return p


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for name in _ADAPTER_FILES:
        f = folder / name
        if f.is_file():
            h.update(name.encode() + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def read_source(path: str | Path, role: str) -> Source:
    """Read the adapter at ``path``; a folder that is not one is a one-line error naming ``role``."""
    from ..io import read_adapter

    folder = _resolve(path)
    try:
        adapter = read_adapter(folder)
    except GraftError as exc:
        raise type(exc)(f"{role} {path}: {exc}") from None
    return Source(role, folder.resolve(), adapter, _digest(folder))


def _show(v: Any) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else repr(v)


def _config_diff(source: dict, here: dict) -> str:
    keys = [k for k in sorted(set(source) | set(here)) if source.get(k) != here.get(k)]
    return ", ".join(f"{k} {_show(source.get(k))} there, {_show(here.get(k))} here" for k in keys[:3])


def _slots(model: nn.Module) -> dict[str, tuple[Any, str]]:
    """Saved key -> (site, slot) of the model's adapter, as ``adapter.json`` names them."""
    from ..adapter import sites

    return {f"{name}.{slot}": (site, slot) for name, site in sites(model).items() for slot in site.slots}


def _head_fits(model: nn.Module, source: Source, head: str) -> bool:
    from ..adapter import get_state

    base = source.adapter.meta.get("base_model") or {}
    mine = get_state(model).base
    if "id2label" in mine or "id2label" in base:  # a classifier: the rows must mean the same classes
        return mine.get("id2label") == base.get("id2label")
    return True


def check_source(model: nn.Module, source: Source, *, base_name: str | None = None) -> dict[str, torch.Tensor]:
    """Check that ``source`` fits the adapter injected in ``model``; return the tensors to copy
    (saved key -> tensor). Raises one line on another method, base model or shape."""
    from ..adapter import require_state
    from ..fingerprint import check_fingerprint

    state = require_state(model)
    role, where = source.role, f"{source.role} {source.path}"
    if source.method != state.method:
        raise ConfigError(f"{where} is a {source.method} adapter but this recipe trains {state.method}; "
                          f"{role} needs an adapter of the same method (or change method: to {source.method})")
    fp = source.fingerprint
    if fp:
        from ..adapter import sites
        from ..fingerprint import check_probes
        from ..methods.inplace import DeltaSite
        from ..targets import iter_params

        # methods that train weights in place (full, BitFit, LN tuning) have changed the live
        # weights once init_from copied its source in: the base's values are the sites' theta0
        pristine = {name: site.theta0 for name, site in sites(model).items() if isinstance(site, DeltaSite)}
        params = {i.name: i.param for i in iter_params(model)}
        try:
            check_fingerprint(model, {**fp, "probe": {}}, set(source.adapter.train_also), base_name)  # names and shapes
            check_probes(lambda name: pristine.get(name, params.get(name)), fp, base_name)
        except AdapterError:
            raise AdapterError(f"{where} was trained on a different base model than {base_name or 'this model'} "
                               f"(its base fingerprint {fp.get('structure')} does not match this model's weights); "
                               f"give an adapter trained on this base, or train from the base it was made on") from None
    else:
        source.warnings.append(f"{where} records no base fingerprint (a peft folder): only its shapes are checked against this model")
    heads_here, heads_there = set(state.train_also), set(source.adapter.train_also)
    targets_here, targets_there = list(state.targets), list(source.adapter.targets)
    config_here = state.config.model_dump(mode="json")
    config_there = source.adapter.meta.get("config") or {}
    if set(targets_here) != set(targets_there):
        missing = sorted(set(targets_here) - set(targets_there))
        extra = sorted(set(targets_there) - set(targets_here))
        what = (f"has no tensors for {len(missing)} of this run's targets, e.g. {missing[0]}" if missing
                else f"adapts {len(extra)} target(s) this run does not, e.g. {extra[0]}")
        diff = _config_diff(config_there, config_here)
        raise ConfigError(f"{where} {what}; use the targets it was trained with{f' ({diff})' if diff else ''}")
    copy: dict[str, torch.Tensor] = {}
    fresh_heads: list[str] = []
    for key, (site, slot) in _slots(model).items():
        owner = key[: -len(slot) - 1]
        if owner in heads_here:
            if owner not in heads_there or not _head_fits(model, source, owner) or key not in source.adapter.tensors \
                    or tuple(source.adapter.tensors[key].shape) != tuple(site.slot_shapes()[slot]):
                fresh_heads.append(owner)
                continue
        elif key not in source.adapter.tensors:
            raise ConfigError(f"{where} has no tensor {key}; it was made with other settings ({_config_diff(config_there, config_here) or 'same config'}) "
                              "- use the settings it was trained with")
        got, want = tuple(source.adapter.tensors[key].shape), tuple(site.slot_shapes()[slot])
        if got != want:
            diff = _config_diff(config_there, config_here)
            raise ConfigError(f"{where}: tensor {key} is {got} there but {want} in this run (another rank, width or length"
                              f"{': ' + diff if diff else ''}); use the settings it was trained with")
        copy[key] = source.adapter.tensors[key]
    ignored = sorted(heads_there - heads_here)
    if ignored:
        source.warnings.append(f"{where} also trained {', '.join(ignored)} whole, which this run does not train (train_also): "
                               "those tensors are not copied, so the run starts from the base's values there")
    if fresh_heads:
        source.warnings.append(f"{where}: its head ({', '.join(sorted(set(fresh_heads)))}) was trained for other labels or is absent; "
                               "this run's head starts fresh")
    shape_keys = {k: v for k, v in config_here.items() if k not in ("targets", "train_also") and config_there.get(k) != v}
    if shape_keys:
        source.warnings.append(f"{where} was trained with other settings ({_config_diff(config_there, config_here)}); "
                               "its tensors fit and are used as they are")
    return copy


@torch.no_grad()
def copy_into(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    for key, (site, slot) in _slots(model).items():
        if key in tensors:
            site.load_slots({slot: tensors[key]})


def init_from(model: nn.Module, path: str | Path, *, base_name: str | None = None) -> Source:
    """Copy the adapter saved at ``path`` into the (same-method) adapter injected in ``model``."""
    source = read_source(path, "init_from")
    tensors = check_source(model, source, base_name=base_name)
    before = sum(p.numel() for p in model.parameters() if p.requires_grad)
    copy_into(model, tensors)
    after = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if after != before:  # a reparameterised site (prefix_projection) takes a saved tensor by folding
        source.warnings.append(f"init_from {source.path}: its saved tensors replace this run's reparameterisation "
                               f"(e.g. prefix_projection, saved folded): {after:,} trainable parameters instead of {before:,}")
    return source


def setup_lineage(run, model: nn.Module):
    """``Run.setup``'s hook after injection: initialise from ``init_from``, build the distillation
    teacher, and return (the lineage saved in adapter.json, the :class:`~.distill.Distiller` or None)."""
    r = run.recipe
    if r.distill is not None and run.fsdp:
        raise ConfigError("distill does not run with the model sharded (FSDP): the teacher's tensors are switched into the "
                          "student's, which a shard cannot hold whole; train it on one process or with DDP (no --use_fsdp)")
    source = init_from(model, r.init_from, base_name=r.model)
    run.warnings.extend(source.warnings)
    lineage: dict[str, Any] = {"init_from": source.record()}
    run.inputs["init_from"] = source.sha256  # a changed source changes the run's identity
    if run.resume:
        _check_unchanged(run, "init_from", {"": source})
    distiller = None
    if r.distill is not None:
        from .distill import setup_distill

        distiller, record, warnings = setup_distill(run, model)
        run.warnings.extend(warnings)
        lineage["distill"] = record
        run.inputs["distill"] = {"teacher": record["teacher"]["sha256"],
                                 **({"reference": record["reference"]["sha256"]} if "reference" in record else {})}
        if run.resume:
            _check_unchanged(run, "distill", {k: v["sha256"] for k, v in record.items() if k in ("teacher", "reference")})
        how = "sharing this model" if record["teacher_shares_base"] else "a second copy of the base"
        auto = f" (auto: transferability {record['transferability']:.4f})" if "transferability" in record else ""
        run.console.print(f"distill: teacher {record['teacher']['path']} ({how}), weight {record['weight']:.4g}{auto}, "
                          f"temperature {record['temperature']:g}")
    return lineage, distiller


def _check_unchanged(run, key: str, now: dict[str, Any]) -> None:
    """On --resume: the adapters a run reads must be the ones its checkpoint was made with (the
    teacher decides every later step's loss). Checkpoints older than this record are let through."""
    import json

    from ..errors import TrainingError
    from .checkpoint import STATE, latest_checkpoint

    ckpt = latest_checkpoint(run.out)
    if ckpt is None:
        return
    try:
        recorded = (json.loads((ckpt / STATE).read_text()).get("inputs") or {}).get(key)
    except (OSError, ValueError):
        return  # load_checkpoint names the unreadable file
    if recorded is None:
        return
    if key == "init_from":
        pairs = [("init_from", now[""].path, recorded, now[""].sha256)]
    else:
        paths = {"teacher": run.recipe.distill.teacher, "reference": run.recipe.distill.reference}
        pairs = [(f"distill.{k}", paths[k], recorded.get(k), v) for k, v in now.items()]
    for what, path, old, new in pairs:
        if old is not None and old != new:
            raise TrainingError(f"cannot resume from {ckpt}: the {what} adapter {path} changed since it was written "
                                f"(sha256 {old[:12]} -> {new[:12]}); restore it, or pass --overwrite to start over")
