"""Adapter-space output: the merged per-key deltas of LoRA inputs, written back as a LoRA.

When every input is a LoRA-family adapter (``output: adapter``, ``rank: r``), each adapted
tensor is merged exactly like a full model (the inputs enter as ``base + delta`` from their
factors, so TIES/DARE see the true deltas and no A/B cross-term shortcut is taken), the merged
delta ``D`` (canonical (out, in) view) is factored by a truncated SVD
``D ~ U_r S_r V_r^T``, and stored as ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T`` with
``lora_alpha = r`` (scaling 1). The relative error ``|D - B A|_F / |D|_F`` is reported per key
and overall (``merge.relative_error`` in ``adapter.json``; ``graft merge`` prints it); it is 0 up to float rounding when ``r`` is at
least the rank of ``D`` (e.g. the sum of the input ranks for a linear merge).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError


def check_plan(plan) -> dict[str, str]:
    """The checks of ``output: adapter`` that need only the opened inputs (also run by --dry-run);
    returns the layer kind of every target."""
    from .adapters import AdapterSource

    cfg = plan.config
    rank = cfg.rank
    if rank is None:
        raise ConfigError("output: adapter needs rank: R (the rank of the LoRA to write)")
    sources = [plan.ckpts[p] for p in plan.inputs]
    if not plan.base or not all(isinstance(s, AdapterSource) for s in sources):
        raise ConfigError("output: adapter needs a base_model and LoRA adapters as every input (models: are adapter folders)")
    from ..methods import method_named

    if not all(getattr(method_named(s.method), "low_rank_factors", False) for s in sources):
        raise ConfigError("output: adapter needs LoRA-family inputs (LoRA, rsLoRA, DoRA); IA3 inputs can be merged to a full model")
    if any(s.whole for s in sources):
        raise ConfigError("output: adapter cannot carry tensors trained whole (train_also / modules_to_save); merge to a full model")
    kinds: dict[str, str] = {}
    for s in sources:
        for name, (kind, *_rest) in s.targets.items():
            if kinds.setdefault(name, kind) != kind:
                raise ConfigError(f"the adapters disagree on the layer kind of {name} ({kinds[name]} vs {kind})")
    return kinds


def merge_to_adapter(plan, out: Path, overwrite: bool = False) -> Path:
    import torch

    from ..io.native import AdapterFile, versions, write_native
    from ..layers import matrix_shape, to_matrix
    from .compute import merge_rows
    from .plan import key_params

    kinds = check_plan(plan)
    cfg = plan.config
    rank = cfg.rank
    sources = [plan.ckpts[p] for p in plan.inputs]
    data = getattr(plan, "statistics", None) if plan.spec.data is not None else None
    tensors, options, report = {}, {}, {}
    num = den = 0.0
    for name in sorted(kinds):
        kind = kinds[name]
        base = plan.ckpts[plan.base].get(name).float()
        params = key_params(plan, name)
        if data is not None:  # a data-aware method (lorahub): this key's result of the pre-pass (merge/data.py)
            params[data.keyword] = data.for_key(name)
        merged = merge_rows(plan, name, params)
        delta = to_matrix(kind, merged - base).double()
        r = min(rank, *delta.shape)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        root = s[:r].sqrt()
        b = (u[:, :r] * root).float()
        a = (root[:, None] * vh[:r]).float()
        err = float(torch.linalg.matrix_norm(delta - b.double() @ a.double()))
        norm = float(torch.linalg.matrix_norm(delta))
        num += err**2
        den += norm**2
        report[name] = err / norm if norm > 0 else 0.0
        if r < rank:  # pad to the requested rank with zeros so every target has rank r
            out_f, in_f = matrix_shape(kind, base.shape)
            a = torch.cat([a, torch.zeros(rank - r, in_f)])
            b = torch.cat([b, torch.zeros(out_f, rank - r)], dim=1)
        tensors[f"{name}.lora_A"] = a.contiguous()
        tensors[f"{name}.lora_B"] = b.contiguous()
        options[name] = {"r": rank, "lora_alpha": float(rank)}
    overall = (num / den) ** 0.5 if den > 0 else 0.0
    first = sources[0].adapter.meta
    meta = {
        "format": "graftkit-adapter", "format_version": 1, "method": "lora",
        "config": {"r": rank, "lora_alpha": float(rank), "targets": sorted(kinds)},
        "targets": sorted(kinds), "target_options": options, "train_also": [], "target_kinds": kinds,
        "base_model": first.get("base_model") or {}, "versions": versions(),
        "merge": {"merge_method": plan.spec.name, "inputs": plan.inputs, "rank": rank,
                  "relative_error": {"overall": overall, "per_key": report},
                  **({"data": data.info} if data is not None else {})},
    }
    write_native(AdapterFile(meta, tensors), out, overwrite)
    plan.stats["relative_error"] = overall
    return Path(out)
