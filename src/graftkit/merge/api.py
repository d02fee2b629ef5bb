"""The front door of merging: :func:`run_merge` (``graft merge``, :func:`graftkit.merge`) and
:func:`dry_run` (``graft merge --dry-run``).

A config is dispatched by what it asks for: adapters without a weight delta to the soup
(:mod:`.soup`), a ``search:`` block to the grid search (:mod:`.search`), ``output: adapter`` to the
LoRA writer (:mod:`.to_adapter`), everything else to the streaming merge (plan -> compute ->
write). The output folder (shards + index, ``config.json``, the tokenizer from
``tokenizer_source``, ``mergekit_config.yml`` with the recipe and ``graft_provenance.json``) is
written into a temporary sibling folder and renamed into place only when everything succeeded.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError, FileFormatError
from ..outputs import atomic_dir, check_output
from ..tensors import nbytes
from .config import load_config
from .plan import Plan, build_plan, default_threads, merge_inputs, scan_finite
from .write import execute, write_metadata


def describe(plan: Plan, threads: int | None = None, max_keys: int = 12) -> str:
    """The plan as text (``graft merge --dry-run``)."""
    threads = threads or plan.config.threads or default_threads()
    cfg, spec = plan.config, plan.spec
    gb = 1e9
    lines = [f"method        {spec.name} ({'needs a base' if spec.needs_base else 'base optional' if spec.base_as_input else 'no base'}; {spec.paper or 'see docs/merge.md'})"]
    if plan.base:
        lines.append(f"base          {plan.base}")
    for p in plan.inputs:
        params = next((m.parameters for m in cfg.models if m.model == p), {})
        lines.append(f"input         {p}  {plan.ckpts[p].size_on_disk() / gb:.3f} GB  {json.dumps(params, default=str)}")
    lines.append(f"parameters    {json.dumps(cfg.parameters, default=str)}")
    if plan.slices is not None:
        from .slices import describe_slices

        lines.extend(describe_slices(plan.slices))
    if plan.vocab is not None:
        v = plan.vocab
        lines.append(f"vocabulary    {v.size} tokens ({cfg.tokenizer_source}; {v.added} beyond the first model's), rows aligned by token "
                     f"in {len(v.keys)} tensor(s); rows each input lacks: {json.dumps(v.filled)}")
    from .search import describe_search

    lines.extend(describe_search(cfg))
    from .data import describe_data

    lines.extend(describe_data(cfg))
    from .fused import unsupported

    slow_reason = unsupported(plan)
    lines.append("compute       " + ("fused kernels (numba), float32" if slow_reason is None
                                     else f"torch reference functions, float32 ({slow_reason})"))
    n_merge = sum(plan.merged(k) for k in plan.keys)
    lines.append(f"tensors       {len(plan.keys)} ({n_merge} merged with {spec.name}, {len(plan.keys) - n_merge} non-float copied from {plan.reference})")
    if plan.excluded:
        shown = ", ".join(plan.excluded[:4]) + (f", ... {len(plan.excluded) - 4} more" if len(plan.excluded) > 4 else "")
        lines.append(f"excluded      {len(plan.excluded)} tensor(s) matching {cfg.exclude} (not read, not written): {shown}")
    for k in plan.keys[:max_keys]:
        how = spec.name if plan.merged(k) else "copy"
        lines.append(f"  {k:<48} {str(list(plan.shapes[k])):<16} {plan.in_dtypes[k]:>5} -> {plan.out_dtypes[k]:<5} {how}")
    if len(plan.keys) > max_keys:
        lines.append(f"  ... {len(plan.keys) - max_keys} more")
    out_bytes = sum(nbytes(plan.out_dtypes[k], plan.shapes[k]) for k in plan.keys)
    lines.append(f"input read    {plan.input_bytes / gb:.3f} GB; output {out_bytes / gb:.3f} GB")
    lines.append(f"peak memory   about {plan.peak_bytes(threads) / gb:.3f} GB ({threads} worker thread(s); O(inputs x largest tensor))")
    return "\n".join(lines)


def dry_run(config: Any, out: str | Path | None = None, *, overwrite: bool = False, threads: int | None = None,
            allow_pickle: bool = False, force: bool = False) -> str:
    """``graft merge --dry-run``: every check :func:`run_merge` makes before it reads tensor values
    (the output folder, the search block, the inputs and their fit, the tokenizer source, an
    adapter output's inputs), then the plan as text. Nothing is written."""
    cfg = load_config(config)
    if out is not None:
        check_output(out, merge_inputs(cfg, config))
        if Path(out).exists() and not overwrite:
            raise FileFormatError(f"{out} already exists; choose another output folder or pass --overwrite")
    from .soup import Soup, is_soup

    if is_soup(cfg):  # adapters without a weight delta: their tensors are averaged (merge/soup.py)
        return Soup(cfg, allow_pickle=allow_pickle, force=force).describe()
    if cfg.search is not None:
        from .search import check_search

        check_search(cfg)
    plan = build_plan(cfg, allow_pickle=allow_pickle, force=force)
    if cfg.output == "adapter":
        from .to_adapter import check_plan

        check_plan(plan)
    try:
        scan_finite(plan)
        return describe(plan, threads=threads)
    finally:
        if plan.vocab is not None:  # the aligned vocabulary rows' temporary files
            plan.vocab.cleanup()


def run_merge(config: Any, out: str | Path | None = None, *, overwrite: bool = False, threads: int | None = None,
              progress: bool | None = None, evaluate=None, allow_pickle: bool = False, force: bool = False) -> Path:
    """Plan, check and run a merge; write the output folder atomically; return its path.
    ``force``: merge adapters even if their base-model fingerprint differs (shapes are still checked)."""
    cfg = load_config(config)  # a bad file is reported here, so the read below cannot fail
    raw = config
    if isinstance(config, (str, Path)):
        from ..files import read_yaml

        raw = read_yaml(config, "merge config")
    if out is None:
        raise ConfigError("no output folder given")
    check_output(out, merge_inputs(cfg, config))
    from .soup import is_soup, run_soup

    if is_soup(cfg):  # adapters without a weight delta: their tensors are averaged (merge/soup.py)
        if Path(out).exists() and not overwrite:
            raise FileFormatError(f"{out} already exists; choose another output folder or pass --overwrite")
        return run_soup(cfg, out, overwrite=overwrite, allow_pickle=allow_pickle, force=force)
    if cfg.search is not None:
        return run_search(cfg, out, evaluate, overwrite=overwrite, threads=threads, force=force)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileFormatError(f"{out} already exists; choose another output folder or pass --overwrite")
    plan = build_plan(cfg, allow_pickle=allow_pickle, force=force)
    from .data import statistics

    # data-aware methods: per-model statistics on examples first, one model at a time (merge/data.py)
    log = (lambda line: print(line, file=sys.stderr)) if progress else None
    with statistics(plan, log=log, target=out) as data_stats:
        if cfg.output == "adapter":
            from .to_adapter import merge_to_adapter

            return merge_to_adapter(plan, out, overwrite=overwrite)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            plan.stats = execute(plan, tmp, threads=threads, progress=progress)
            if data_stats is not None:
                plan.stats["data"] = data_stats.info
            write_metadata(plan, tmp, raw if isinstance(raw, dict) else None)
    if plan.vocab is not None:  # the aligned rows' temporary files (on an error their finalizer removes them)
        plan.vocab.cleanup()
    return out


def run_search(config: Any, out: str | Path, evaluate=None, *, overwrite: bool = False, threads: int | None = None,
               force: bool = False) -> Path:
    """Merge every grid point of the config's ``search:`` block, score each with ``evaluate`` (or
    ``search.command``), keep the best (see :mod:`.search`)."""
    from . import search
    from .data import reuse_statistics

    with reuse_statistics():  # a data-aware method's statistics do not change with the parameters searched
        return search.run_search(config, out, evaluate, merge=run_merge, overwrite=overwrite, threads=threads, force=force)


def greedy_soup(models: list[str | Path], evaluate, out: str | Path, *, overwrite: bool = False, dtype: str | None = None,
                threads: int | None = None) -> Path:
    """Greedy soup (Wortsman et al., 2022): add candidates in order of their own score while the
    uniform soup's score does not drop (see :mod:`.search`)."""
    from . import search

    return search.greedy_soup(models, evaluate, out, merge=run_merge, overwrite=overwrite, dtype=dtype, threads=threads)


def run_multi(config: str | Path, intermediate_dir: str | Path, out: str | Path | None = None, **kwargs) -> dict:
    """A multi-stage merge file (mergekit-multi's format; see :mod:`.multi`): every stage through
    :func:`run_merge`, in dependency order."""
    from . import multi

    return multi.run_multi(config, intermediate_dir, out, merge=run_merge, **kwargs)
