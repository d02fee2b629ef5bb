"""Adapter-space output: the merged per-key deltas of LoRA inputs, written back as a LoRA.

When every input is a LoRA-family adapter (``output: adapter``, ``rank: r``), each adapted
tensor is merged exactly like a full model (the inputs enter as ``base + delta`` from their
factors, so TIES/DARE see the true deltas and no A/B cross-term shortcut is taken), the merged
delta ``D`` (canonical (out, in) view) is factored by a truncated SVD
``D ~ U_r S_r V_r^T``, and stored as ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T`` with
``lora_alpha = r`` (scaling 1). The relative error ``|D - B A|_F / |D|_F`` is reported per key
and overall (``merge.relative_error`` in ``adapter.json``; ``graft merge`` prints it); it is 0 up to float rounding when ``r`` is at
least the rank of ``D`` (e.g. the sum of the input ranks for a linear merge).

``rank: auto`` with ``max_error: X`` gives each key the smallest rank whose error is at most X
(per-target ``r`` in ``target_options``; peft's ``rank_pattern`` on export). When an input is
DoRA (or ``dora: true``) the output is a DoRA adapter: magnitude ``||W'||_c`` of the merged
weight and a rank-r direction delta fitted to it; a DoRA input's row rescaling is not low rank,
so a plain LoRA cannot hold it. The factoring is shared with ``graft extract-lora``
(:mod:`.extract_lora`).
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
        raise ConfigError("output: adapter needs rank: R (the rank of the LoRA to write), or rank: auto with max_error: X")
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
    from ..io.native import AdapterFile, write_native
    from ..layers import to_matrix
    from .compute import merge_rows
    from .extract_lora import adapter_meta, error_report, factor, factor_dora
    from .plan import key_params

    kinds = check_plan(plan)
    cfg = plan.config
    rank = cfg.rank
    sources = [plan.ckpts[p] for p in plan.inputs]
    data = getattr(plan, "statistics", None) if plan.spec.data is not None else None
    # a DoRA input rescales whole rows (not low rank): by default the output keeps a magnitude too
    dora = cfg.dora if cfg.dora is not None else any(t[4] is not None for s in sources for t in s.targets.values())
    how = {"max_error": cfg.max_error} if rank == "auto" else {"rank": rank}
    factors = {}
    for name in sorted(kinds):
        kind = kinds[name]
        base = plan.ckpts[plan.base].get(name).float()
        params = key_params(plan, name)
        if data is not None:  # a data-aware method (lorahub): this key's result of the pre-pass (merge/data.py)
            params[data.keyword] = data.for_key(name)
        merged = merge_rows(plan, name, params)
        if dora:
            factors[name] = (kind, factor_dora(to_matrix(kind, base), to_matrix(kind, merged), **how))
        else:
            factors[name] = (kind, factor(to_matrix(kind, merged - base), **how))
    errors = error_report(factors)
    first = sources[0].adapter.meta
    record = {"merge": {"merge_method": plan.spec.name, "inputs": plan.inputs, "rank": rank,
                        **({"max_error": cfg.max_error} if rank == "auto" else {}), "dora": dora,
                        "ranks": {k: f.rank for k, (_, f) in factors.items()}, "relative_error": errors,
                        **({"data": data.info} if data is not None else {})}}
    meta, tensors = adapter_meta(factors, dora=dora, base_model=first.get("base_model") or {}, record=record)
    write_native(AdapterFile(meta, tensors), out, overwrite)
    plan.stats["relative_error"] = errors["overall"]
    return Path(out)
