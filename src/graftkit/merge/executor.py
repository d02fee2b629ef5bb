"""The streaming merge executor behind ``graft merge`` and :func:`graftkit.merge`.

For every tensor name it reads only that tensor from each input (safetensors are memory-mapped,
one tensor at a time through :class:`graftkit.tensors.Checkpoint`), computes in float32 with the
method's per-tensor function, casts to the output dtype and hands the result to a
:class:`~graftkit.merge.writer.ShardWriter`, which writes it to its precomputed place in the
output shard at once. A thread pool works on several tensors at a time; each worker holds one
tensor per input plus the method's temporaries, so peak memory is
O(threads x inputs x largest tensor), never O(model).

The output folder (shards + index, ``config.json``, the tokenizer from ``tokenizer_source``,
``mergekit_config.yml`` with the recipe and ``graft_provenance.json``) is written into a
temporary sibling folder and renamed into place only when everything succeeded.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, FileFormatError, GraftError, UnsupportedError
from ..outputs import atomic_dir, check_output
from ..tensors import Checkpoint
from .config import MergeConfig, exclude_matcher, load_config, resolve
from .writer import NAME_TO_ST, ST_TO_TORCH, ShardWriter, nbytes, st_dtype

VOCAB_HINTS = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_in", "embed_out", "shared")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "vocab.txt", "chat_template.jinja", "spiece.model")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
LAYER_RE = __import__("re").compile(r"\.(?:layers|h|layer|blocks)\.(\d+)\.")


class MergeError(GraftError):
    """The inputs of a merge do not fit together, or hold bad values."""


@dataclass
class Plan:
    config: MergeConfig
    spec: Any
    base: str | None
    inputs: list[str]                    # the tensors handed to the method, in order
    ckpts: dict[str, Checkpoint]
    keys: list[str]
    shapes: dict[str, tuple]
    in_dtypes: dict[str, str]
    out_dtypes: dict[str, str]
    reference: str
    input_bytes: int = 0
    stats: dict = field(default_factory=dict)
    num_layers: int = 0

    def layer_t(self, key: str) -> float:
        """mergekit's gradient position of a tensor: layer index / (layers - 1); 0 outside layers."""
        m = LAYER_RE.search(key)
        if not m or self.num_layers <= 0:
            return 0.0
        return int(m.group(1)) / (self.num_layers - 1) if self.num_layers > 1 else 1.0
    global_thresholds: list | None = None
    excluded: list = field(default_factory=list)  # tensor names left out by ``exclude``

    def merged(self, key: str) -> bool:
        return self.in_dtypes[key] in FLOAT_DTYPES

    def peak_bytes(self, threads: int) -> int:
        """Rough upper bound of the working memory (beyond the interpreter and torch)."""
        largest = max((nbytes("F32", s) for s in self.shapes.values()), default=0)
        n = len(self.inputs)
        from .fused import CHUNK, unsupported

        if unsupported(self) is None:
            # fused kernels: a chunk of each mapped input and of the output; TIES' thresholds map
            # the base and one model whole
            per_worker = 4 * CHUNK * (n + 2)
            if self.spec.fused.keep == "threshold":
                per_worker = max(per_worker, 2 * max(nbytes(self.in_dtypes[k], s) for k, s in self.shapes.items()))
        elif self.spec.chunkable:
            chunk = min(largest, 4 * chunk_elements(self.spec))
            # per worker: n float32 deltas + base + ~3 temporaries per chunk; the threshold pass
            # of a large tensor holds one model's float32 delta, its magnitudes and the base
            per_worker = max(chunk * (n + 5), 3 * largest if self.spec.thresholded else 0)
        else:
            per_worker = largest * (2 * n + 5)
        return threads * per_worker


def _read_config_json(path: str) -> dict:
    from ..files import path_kind, read_json

    p = Path(path) / "config.json"
    if path_kind(p) is not None:  # a FIFO or folder named config.json is reported, not skipped
        return read_json(p, "model config", mapping=True)
    return {}


def _open(path: str, base: Checkpoint | None = None, allow_pickle: bool = False, exclude=None, force: bool = False,
          require_config: bool = True):
    """``require_config``: a merge writes an HF folder, so its model inputs must carry config.json;
    readers that only compare weights (analysis/similarity.py) do not need it."""
    from .adapters import AdapterSource, is_adapter

    p = Path(path)
    if is_adapter(p):
        if base is None:
            raise ConfigError(f"{path} is an adapter: merging it needs base_model (the model it was trained on)")
        from .peft_fold import PeftFoldSource, needs_fold

        if needs_fold(p):  # a peft method graftkit lacks: peft folds it into the base, module by module
            return PeftFoldSource(p, base, exclude=exclude)
        return AdapterSource(p, base, exclude=exclude, force=force)
    if not p.exists():
        raise FileFormatError(f"merge input {path} does not exist")
    if p.is_dir() and require_config:
        check_model_folder(p)
    return Checkpoint(p, allow_pickle=allow_pickle)


def check_model_folder(p: Path) -> None:
    """A model folder must say what model it is: without config.json the output would have none
    either (nothing could load it), and the architecture checks would have nothing to compare."""
    if not (p / "config.json").is_file():
        raise FileFormatError(f"merge input {p} has no config.json, so it is not a Hugging Face model folder; "
                              "add the config.json of the model its weights belong to, or give the right folder")


def build_plan(config: Any, allow_pickle: bool = False, force: bool = False) -> Plan:
    """Open every input (headers only), check that they fit together, and order the work.

    Every check of a real run that needs no tensor values runs here (adapters, read whole, are
    checked for NaN/Inf too); ``--dry-run`` adds :func:`scan_finite` for the full-model inputs,
    whose values the real run checks as it merges each tensor."""
    cfg = load_config(config)
    spec = cfg.method()
    base = cfg.base_model if spec.needs_base or spec.base_as_input else None
    if spec.base_as_input:
        inputs = [cfg.base_model] + [m.model for m in cfg.models if m.model != cfg.base_model]
    elif spec.inputs == "model":
        inputs = [m.model for m in cfg.models]
    else:
        inputs = [m.model for m in cfg.models if m.model != cfg.base_model]
    paths = list(dict.fromkeys([p for p in [base, *inputs] if p]))
    excluded = exclude_matcher(cfg.exclude)
    ckpts = {}
    if cfg.base_model:
        ckpts[cfg.base_model] = _open(cfg.base_model, allow_pickle=allow_pickle)
    for p in paths:
        if p not in ckpts:
            ckpts[p] = _open(p, ckpts.get(cfg.base_model), allow_pickle, excluded, force)
    left_out: list[str] = []
    if excluded is not None:
        every = dict.fromkeys(k for c in ckpts.values() for k in [*c.keys(), *getattr(c, "adapter_keys", lambda: [])()])
        unmatched = excluded.unmatched(every)
        if unmatched:
            raise ConfigError(f"exclude pattern {unmatched[0]!r} matches no tensor of the inputs (e.g. {next(iter(every), '-')}); "
                              "fix or remove it")
        left_out = [k for k in every if excluded(k)]
    reference = base or inputs[0]
    ref = ckpts[reference]
    ref_cfg = _read_config_json(reference)
    for p in paths:
        if p == reference:
            continue
        other = _read_config_json(p)
        for field_name in ("model_type", "architectures"):
            if ref_cfg.get(field_name) and other.get(field_name) and ref_cfg[field_name] != other[field_name]:
                raise MergeError(f"{p} is a {other[field_name]} model but {reference} is a {ref_cfg[field_name]} ({field_name}); only models of one architecture can be merged")
        rv, ov = ref_cfg.get("vocab_size"), other.get("vocab_size")
        if rv and ov and rv != ov:
            raise MergeError(f"vocab size differs: {reference} has {rv} tokens, {p} has {ov}; graftkit merges models with one vocabulary "
                             "(tokenizer_source picks whose tokenizer files are copied, it does not resize embeddings)")
    skip = set(left_out)
    keys = [k for k in ref.keys() if k not in skip]
    key_set = set(keys)
    for p in paths:
        c = ckpts[p]
        if p == reference:
            continue
        missing = [k for k in keys if k not in c.files]
        if missing:
            raise MergeError(f"{p} has no tensor {missing[0]} (which {reference} has); the models differ in architecture"
                             f"{_exclude_hint(missing[0])}")
        extra = [k for k in c.keys() if k not in key_set and k not in skip]
        if extra:
            raise MergeError(f"{p} has a tensor {extra[0]} that {reference} lacks; the models differ in architecture"
                             f"{_exclude_hint(extra[0])}")
        for k in keys:
            if c.shape(k) != ref.shape(k):
                if any(h in k for h in VOCAB_HINTS) and c.shape(k)[1:] == ref.shape(k)[1:]:
                    raise MergeError(f"vocab size differs at {k}: {tuple(ref.shape(k))} in {reference} vs {tuple(c.shape(k))} in {p}; "
                                     "graftkit merges models with one vocabulary (tokenizer_source only picks the tokenizer files to copy)")
                raise MergeError(f"shape mismatch at {k}: {tuple(ref.shape(k))} in {reference} vs {tuple(c.shape(k))} in {p}; "
                                 f"the models differ in architecture or size{_exclude_hint(k)}")
    # read in file order, so each shard is walked front to back
    def file_order(k):
        f = ref.files[k]
        header = ref.headers.get(f, {})
        return (str(f), header.get(k, {}).get("data_offsets", [0])[0])

    keys = sorted(keys, key=file_order)
    shapes = {k: tuple(ref.shape(k)) for k in keys}
    in_dtypes = {k: st_dtype(ref.dtype(k)) for k in keys}
    want = cfg.out_dtype or cfg.dtype
    out_dtypes = {k: (NAME_TO_ST[want] if want and in_dtypes[k] in FLOAT_DTYPES else in_dtypes[k]) for k in keys}
    input_bytes = sum(nbytes(st_dtype(ckpts[p].dtype(k)), shapes[k]) for p in paths for k in keys)
    plan = Plan(cfg, spec, base, inputs, ckpts, keys, shapes, in_dtypes, out_dtypes, reference, input_bytes)
    plan.excluded = left_out
    plan.num_layers = int(ref_cfg.get("num_hidden_layers") or ref_cfg.get("n_layer") or 0)
    tokenizer_dir(plan)
    return plan


def _exclude_hint(key: str) -> str:
    owner = key.rsplit(".", 1)[0] if "." in key else key
    return (f"; if {key} is task-specific (e.g. a classification head), leave it out of the merge with "
            f"exclude: [\"{owner}.*\"]")


def describe(plan: Plan, threads: int | None = None, max_keys: int = 12) -> str:
    """The plan as text (``graft merge --dry-run``)."""
    threads = threads or plan.config.threads or default_threads()
    cfg, spec = plan.config, plan.spec
    gb = 1e9
    lines = [f"method        {spec.name} ({'needs a base' if spec.needs_base else 'no base'}; {spec.paper or 'see docs/merge.md'})"]
    if plan.base:
        lines.append(f"base          {plan.base}")
    for p in plan.inputs:
        params = next((m.parameters for m in cfg.models if m.model == p), {})
        lines.append(f"input         {p}  {plan.ckpts[p].size_on_disk() / gb:.3f} GB  {json.dumps(params, default=str)}")
    lines.append(f"parameters    {json.dumps(cfg.parameters, default=str)}")
    from .search import describe_search

    lines.extend(describe_search(cfg))
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


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _seed_for(seed: int | None, key: str) -> int | None:
    if seed is None:
        return None
    return (int(seed) * 2_654_435_761 + zlib.crc32(key.encode())) % (2**62)


def key_params(plan: Plan, key: str) -> dict:
    cfg, spec = plan.config, plan.spec
    params = resolve_params(cfg, spec, plan.inputs[1:] if spec.base_as_input else plan.inputs, key, plan.layer_t(key))
    if spec.random:
        params["seed"] = _seed_for(cfg.parameters.get("seed", cfg.seed), key)
    return params


def resolve_params(cfg, spec, method_inputs: list[str], key: str, t: float) -> dict:
    """The merge method's parameters for tensor ``key`` at layer position ``t``: per-model values
    (one per input, in order), global values, filter lists and gradients resolved; also used by
    adapter soups."""
    params: dict[str, Any] = {}
    per_model = {m.model: m.parameters for m in cfg.models}
    for name, default in spec.model_params.items():
        values = []
        for p in method_inputs:
            raw = per_model.get(p, {}).get(name, cfg.parameters.get(name, default))
            v = resolve(raw, key, t)
            values.append(default if v is None else v)
        params[name] = values
    for name, default in spec.global_params.items():
        if name in spec.model_params:
            continue
        v = resolve(cfg.parameters.get(name, default), key, t)
        params[name] = default if v is None else v
    params.pop("int8_mask", None)
    params.pop("scope", None)
    for p in spec.params:  # the declared kind of a whole-number or required parameter (slerp's t, k)
        if not p.per_model and (p.kind is int or p.required and p.kind is float) and params.get(p.name) is not None:
            params[p.name] = p.kind(params[p.name])
    return params


class _Progress:
    def __init__(self, total: int, total_bytes: int, enabled: bool):
        self.enabled = enabled
        self.start = time.perf_counter()
        self.read = 0
        self.lock = threading.Lock()
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("merging"), BarColumn(), MofNCompleteColumn(), TextColumn("tensors"),
                                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), transient=True)
            self.task = self.bar.add_task("merge", total=total, rate="")
            self.bar.start()

    def advance(self, nbytes_read: int) -> None:
        with self.lock:
            self.read += nbytes_read
            if self.enabled:
                rate = self.read / 1e9 / max(time.perf_counter() - self.start, 1e-9)
                self.bar.update(self.task, advance=1, rate=f"{rate:.2f} GB/s")

    def stop(self) -> None:
        if self.enabled:
            self.bar.stop()


def chunk_elements(spec=None) -> int:
    """Elements per row chunk of a large tensor (``GRAFT_MERGE_CHUNK`` overrides). Methods that
    trim by magnitude need an extra read of every model to find a chunked tensor's thresholds, so
    they chunk only above 4M elements (the MLP matrices of a 0.5B model stay whole); the others
    gain from small chunks that stay in cache (the benchmark's recipes, warm cache: linear 2.1 s and
    413 MB at 1M vs 2.4 s and 739 MB at 4M; ties 7.2 s at 4M vs 7.8 s at 1M; bench/RESULTS.md)."""
    default = 1 << 22 if spec is not None and spec.thresholded else 1 << 20
    return int(os.environ.get("GRAFT_MERGE_CHUNK", default))


_DATA_STARTS: dict[Path, int] = {}


def _data_start(f: Path, header: dict, fd: int) -> int:
    start = _DATA_STARTS.get(f)
    if start is None:
        end = max((m["data_offsets"][1] for k, m in header.items() if k != "__metadata__"), default=0)
        start = _DATA_STARTS[f] = os.fstat(fd).st_size - end
    return start


def map_bytes(ckpt: Checkpoint, key: str, lo: int, hi: int):
    """Memory-map bytes ``[lo, hi)`` of one tensor's data in its safetensors file (read-only use):
    ``(mapping, offset of byte lo inside it)``. Only that range is mapped; it is unmapped when the
    mapping (and every array viewing it) is dropped."""
    import mmap

    f = ckpt.files[key]
    try:
        fd = os.open(f, os.O_RDONLY)
        try:
            offset = _data_start(f, ckpt.headers[f], fd) + lo
            aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
            return mmap.mmap(fd, hi - lo + offset - aligned, offset=aligned, access=mmap.ACCESS_COPY), offset - aligned
        finally:
            os.close(fd)
    except (OSError, ValueError) as exc:
        raise FileFormatError(f"{f}: tensor {key} could not be read ({exc})") from None


def _read(plan: Plan, path: str, key: str, rows: tuple[int, int] | None):
    """One tensor (or rows of it) of one input as a torch tensor over a memory map of just its bytes."""
    ckpt = plan.ckpts[path]
    if ckpt._pickled is not None or not isinstance(ckpt, Checkpoint):
        t = ckpt.get(key)
        return t if rows is None else t[rows[0]:rows[1]]
    import torch

    meta = ckpt.headers[ckpt.files[key]][key]
    dtype = getattr(torch, ST_TO_TORCH.get(meta["dtype"], ""), None)
    shape = list(meta["shape"])
    lo, hi = meta["data_offsets"]
    if rows is not None and shape:
        row_bytes = (hi - lo) // max(1, shape[0])
        lo, hi = lo + rows[0] * row_bytes, lo + rows[1] * row_bytes
        shape[0] = rows[1] - rows[0]
    if dtype is None or hi <= lo:
        t = ckpt.get(key)
        return t if rows is None else t[rows[0]:rows[1]]
    mapped, start = map_bytes(ckpt, key, lo, hi)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(mapped, dtype=dtype, count=(hi - lo) // itemsize, offset=start).view(shape)


def _merge_rows(plan: Plan, key: str, torch, params: dict, rows: tuple[int, int] | None):
    spec = plan.spec
    names = plan.inputs
    base = None
    if plan.base and spec.inputs == "delta":
        base = _read(plan, plan.base, key, rows).float()
        if not spec.nan_propagating:
            _check_finite(torch, base.reshape(1, -1), key, [plan.base])
    shape = plan.shapes[key] if rows is None else (rows[1] - rows[0], *plan.shapes[key][1:])
    if not spec.needs_all_inputs_at_once:  # accumulates the raw tensors itself (linear): no float32 stack
        raw = [_read(plan, p, key, rows) for p in names]
        out = spec.fn(None, raw, **params)
        if not bool(torch.isfinite(out.sum())):
            _check_finite(torch, torch.stack([r.float().reshape(-1) for r in raw]), key, names)
        return out
    stack = torch.empty((len(names), *shape), dtype=torch.float32)
    for i, p in enumerate(names):
        if spec.inputs == "delta":
            stack[i].copy_(_read(plan, p, key, rows)).sub_(base)  # widen, then subtract: 3x faster than a mixed-dtype sub
        else:
            stack[i].copy_(_read(plan, p, key, rows))
    if not spec.nan_propagating:
        _check_finite(torch, stack.reshape(len(names), -1), key, names)
    if spec.inputs == "delta":
        if _takes_inplace(spec.fn):
            params = {**params, "inplace": True}  # the stack is ours: let the method reuse it
        out = spec.fn(base, stack, **params)
    else:
        out = spec.fn(stack[0] if spec.base_as_input else None, stack, **params)
    del stack
    if not bool(torch.isfinite(out.sum())) and not bool(torch.isfinite(out).all()):
        for p in [*([plan.base] if plan.base else []), *names]:  # name the input that brought the NaN/Inf
            if not bool(torch.isfinite(_read(plan, p, key, rows).float()).all()):
                raise MergeError(f"{key} in {p} has NaN or Inf values; that input is broken - re-create or re-download it")
        raise MergeError(f"{key}: the merged tensor has NaN/Inf values (the inputs are finite); check the weights and lambda")
    return out


def _thresholds(plan: Plan, key: str, torch, density: list) -> list:
    """Per-model magnitude thresholds over the whole tensor, one model at a time."""
    from ._common import kth_largest

    shape = plan.shapes[key]
    numel = 1
    for d in shape:
        numel *= d
    step = max(1, chunk_elements(plan.spec) // max(1, numel // shape[0]))
    mag = torch.empty(shape, dtype=torch.float32)  # the only full-size buffer, reused per model
    out = []
    for p, d in zip(plan.inputs, density):
        if d >= 1:
            out.append(None)
            continue
        for r0 in range(0, shape[0], step):
            rows = (r0, min(shape[0], r0 + step))
            part = mag[rows[0]:rows[1]]
            part.copy_(_read(plan, p, key, rows)).sub_(_read(plan, plan.base, key, rows).float()).abs_()
        out.append(kth_largest(mag.reshape(-1), max(1, int(d * numel))))
    return out


HIST_BINS, HIST_LO, HIST_HI = 1 << 16, -80.0, 16.0


def global_thresholds(plan: Plan, torch) -> list:
    """``scope: global`` TIES: per model, the exact magnitude of its k-th largest delta entry over
    the whole model (k = density x all float entries), in two streaming passes per model: a
    histogram of log2|delta| finds the bin holding the k-th value, a second pass collects that
    bin's few values and selects inside it. One tensor of one model in memory at a time."""
    from ._common import kth_largest

    keys = [k for k in plan.keys if plan.merged(k)]
    out = []
    base_path = plan.base
    width = (HIST_HI - HIST_LO) / HIST_BINS
    for i, p in enumerate(plan.inputs):
        density = key_params(plan, keys[0])["density"][i]
        if density >= 1:
            out.append(None)
            continue

        def logs(key):
            mag = torch.sub(plan.ckpts[p].get(key), plan.ckpts[base_path].get(key).float()).abs_().reshape(-1)
            return mag, torch.log2(mag).clamp_(HIST_LO, HIST_HI - width / 2)

        counts = torch.zeros(HIST_BINS, dtype=torch.float64)
        total = 0
        for key in keys:
            mag, lg = logs(key)
            counts += torch.histc(lg, HIST_BINS, HIST_LO, HIST_HI).double()
            total += mag.numel()
        k = max(1, int(density * total))
        above = torch.flip(counts, [0]).cumsum(0)  # above[j] = entries in the top j+1 bins
        j = int(torch.searchsorted(above, torch.tensor([float(k)], dtype=torch.float64)))
        b = HIST_BINS - 1 - j
        higher = int(above[j - 1]) if j > 0 else 0
        lo, hi = HIST_LO + b * width, HIST_LO + (b + 1) * width
        band = []
        for key in keys:
            mag, lg = logs(key)
            sel = (lg >= lo) & (lg < hi) if b < HIST_BINS - 1 else lg >= lo
            band.append(mag[sel])
        band = torch.cat(band)
        need = k - higher
        out.append(kth_largest(band, need) if 0 < need <= band.numel() else float(band.max()))
    return out


def _merge_key(plan: Plan, key: str, torch) -> Any:
    spec = plan.spec
    if not plan.merged(key):
        return plan.ckpts[plan.reference].get(key)
    out_dtype = getattr(torch, ST_TO_TORCH[plan.out_dtypes[key]])
    params = key_params(plan, key)
    if plan.global_thresholds is not None:
        params["threshold"] = plan.global_thresholds
    shape = plan.shapes[key]
    numel = 1
    for d in shape:
        numel *= d
    limit = chunk_elements(spec)
    if numel <= limit or not spec.chunkable or len(shape) < 1 or shape[0] < 2:
        return _merge_rows(plan, key, torch, params, None).to(out_dtype)
    if spec.thresholded and "threshold" not in params:
        params = {**params, "threshold": _thresholds(plan, key, torch, params["density"])}
    step = max(1, limit // max(1, numel // shape[0]))
    out = torch.empty(shape, dtype=out_dtype)
    for c, r0 in enumerate(range(0, shape[0], step)):
        chunk = dict(params)
        if chunk.get("seed") is not None:
            chunk["seed"] = (chunk["seed"] * 31 + c) % (2**62)  # DARE: a fresh, reproducible mask per chunk
        out[r0:r0 + step] = _merge_rows(plan, key, torch, chunk, (r0, min(shape[0], r0 + step)))
    return out


def _takes_inplace(fn) -> bool:
    import inspect

    return "inplace" in inspect.signature(fn).parameters


def _check_finite(torch, rows, key: str, names: list[str]) -> None:
    sums = rows.sum(dim=1)
    if bool(torch.isfinite(sums).all()):
        return
    for i, name in enumerate(names):
        if not bool(torch.isfinite(sums[i])) and not bool(torch.isfinite(rows[i]).all()):
            raise MergeError(f"{key} in {name} has NaN or Inf values; that input is broken - re-create or re-download it")


def _keep_freed_memory() -> None:
    """Ask glibc to reuse freed blocks instead of returning them to the OS after every tensor:
    fresh mmap-ed blocks must be page-faulted and zeroed again, which cost about a third of the
    merge time. Peak memory is unchanged (the same blocks are reused)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, int(os.environ.get("GRAFT_MMAP_THRESHOLD", 1 << 30)))  # M_MMAP_THRESHOLD
        libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD
        libc.mallopt(-8, 1)  # M_ARENA_MAX: the workers share freed blocks instead of each keeping its own
    except (OSError, AttributeError):
        pass


class _Prefetcher:
    """Reads ahead of the workers on a cold page cache: a daemon thread asks the kernel
    (``posix_fadvise(WILLNEED)``) to start reading the next tensors' bytes of every input while the
    workers compute, so they rarely wait on the disk. At most ``ahead`` bytes beyond the tensors
    already started; the memory is the page cache's (evictable), not the process's."""

    def __init__(self, plan: Plan, used: list[str], ahead: int = 512 << 20):
        self.ranges: list[list[tuple[int, int, int]]] = []
        self.fds: dict[Path, int] = {}
        starts: dict[Path, int] = {}
        for key in plan.keys:
            todo = []
            for p in used:
                ckpt = plan.ckpts[p]
                if not isinstance(ckpt, Checkpoint) or ckpt._pickled is not None or key not in ckpt.files:
                    continue
                f = ckpt.files[key]
                header = ckpt.headers[f]
                if f not in starts:
                    try:
                        self.fds[f] = os.open(f, os.O_RDONLY)
                    except OSError:
                        continue
                    end = max((m["data_offsets"][1] for k, m in header.items() if k != "__metadata__"), default=0)
                    starts[f] = os.fstat(self.fds[f]).st_size - end
                lo, hi = header[key]["data_offsets"]
                todo.append((self.fds[f], starts[f] + lo, hi - lo))
            self.ranges.append(todo)
        self.ahead = ahead
        self.started = 0
        self.stop = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="graft-prefetch", daemon=True)
        if hasattr(os, "posix_fadvise") and self.fds:
            self.thread.start()

    def _run(self) -> None:
        sizes = [sum(r[2] for r in todo) for todo in self.ranges]
        for i, todo in enumerate(self.ranges):
            with self.cond:
                while not self.stop and i > self.started and sum(sizes[self.started:i]) > self.ahead:
                    self.cond.wait(0.5)
                if self.stop:
                    return
            for fd, offset, length in todo:
                try:
                    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
                except OSError:
                    return

    def begin(self) -> None:
        with self.cond:
            self.started += 1
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.stop = True
            self.cond.notify()
        if self.thread.is_alive():
            self.thread.join()
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


def _merge_key_fused(plan: Plan, key: str, writer: ShardWriter) -> None:
    from . import fused

    if not plan.merged(key):
        fused.copy_key(plan, key, writer)
        return
    if fused.merge_key(plan, key, key_params(plan, key), writer):
        import torch  # a NaN/Inf: the reference path names the input that brought it, and raises

        writer.write(key, _merge_key(plan, key, torch))
    writer.finish(key)


def execute(plan: Plan, folder: Path, threads: int | None = None, progress: bool | None = None) -> dict:
    """Merge every tensor of ``plan`` into shards under ``folder``; return timing statistics.

    The fused kernels (:mod:`.fused`) do the tensors when the method and inputs allow it; then
    torch is never imported. Otherwise the torch reference functions do them."""
    from . import fused

    slow_reason = fused.unsupported(plan)
    torch = None
    if slow_reason is not None:
        import torch
    threads = threads or plan.config.threads or default_threads()
    _keep_freed_memory()
    entries = [(k, plan.out_dtypes[k], plan.shapes[k]) for k in plan.keys]
    writer = ShardWriter(folder, entries, plan.config.max_shard_size)
    if progress is None:
        progress = sys.stderr.isatty()
    bar = _Progress(len(plan.keys), plan.input_bytes, progress)
    used = [p for p in dict.fromkeys([plan.base, *plan.inputs]) if p]
    per_key_bytes = {k: sum(nbytes(st_dtype(plan.ckpts[p].dtype(k)), plan.shapes[k]) for p in used) for k in plan.keys}
    start = time.perf_counter()
    torch_threads = torch.get_num_threads() if torch is not None else 0
    delay = float(os.environ.get("_GRAFT_MERGE_DELAY", "0") or 0)  # test hook: make a merge slow enough to kill

    prefetch = _Prefetcher(plan, used)

    def work(key: str) -> None:
        prefetch.begin()
        if delay:
            time.sleep(delay)
        if torch is None:
            _merge_key_fused(plan, key, writer)
        else:
            out = _merge_key(plan, key, torch)
            writer.write(key, out)
            del out
        bar.advance(per_key_bytes[key])

    if plan.spec.thresholded and plan.config.parameters.get("scope", "tensor") == "global":
        plan.global_thresholds = global_thresholds(plan, torch)
        plan.stats["global_thresholds"] = plan.global_thresholds
    try:
        if threads == 1:
            for k in plan.keys:
                work(k)
        else:
            from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

            if torch is not None:
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // threads))
            pool = ThreadPoolExecutor(threads, thread_name_prefix="graft-merge")
            try:
                futures = [pool.submit(work, k) for k in plan.keys]
                wait(futures, return_when=FIRST_EXCEPTION)
                for f in futures:
                    if f.done() and not f.cancelled() and f.exception() is not None:
                        raise f.exception()
            finally:  # on an error or Ctrl-C, drop the queued tensors instead of finishing them
                pool.shutdown(wait=True, cancel_futures=True)
    except BaseException:
        writer.abort()
        raise
    finally:
        prefetch.close()
        if torch is not None:
            torch.set_num_threads(torch_threads)
        bar.stop()
    writer.close()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "input_bytes": plan.input_bytes, "gb_per_s": plan.input_bytes / 1e9 / max(seconds, 1e-9),
            "tensors": len(plan.keys), "threads": threads,
            "kernels": "fused" if torch is None else f"torch reference ({slow_reason})"}


def _model_dir(plan: Plan, path: str) -> Path:
    """The model folder behind an input: an adapter's base model folder, else the input itself
    (config.json, generation config and tokenizer files come from there)."""
    base = getattr(plan.ckpts.get(path), "base", None)
    return Path(base.path) if isinstance(base, Checkpoint) else Path(path)


def tokenizer_dir(plan: Plan) -> Path:
    """The folder whose tokenizer files the output gets (checked by build_plan, so --dry-run refuses
    what the real run would). The default, the base's own folder, may hold none (a bare checkpoint);
    a folder the recipe names must hold a tokenizer, or the output would silently have none."""
    source = plan.config.tokenizer_source
    if source == "union":
        raise UnsupportedError("tokenizer_source: union is not supported; merge models that share a vocabulary and use 'base' or a model folder")
    if source in (None, "base"):
        return _model_dir(plan, plan.base or plan.inputs[0])
    folder = Path(source)
    if not folder.is_dir():
        raise ConfigError(f"tokenizer_source {source} is not a folder; use 'base' or a model folder")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileFormatError(f"tokenizer_source {source} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                              "name a folder that has a tokenizer, or use 'base'")
    return folder


def _write_metadata(plan: Plan, folder: Path, raw_config: Any) -> None:
    cfg = plan.config
    reference = _model_dir(plan, plan.reference)
    config = _read_config_json(str(reference))
    if config:
        want = cfg.out_dtype or cfg.dtype
        if want:
            config["torch_dtype"] = want
            if "dtype" in config:
                config["dtype"] = want
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = reference / "generation_config.json"
    if gen.is_file():
        shutil.copy2(gen, folder / gen.name)
    tok_dir = tokenizer_dir(plan)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copy2(tok_dir / name, folder / name)
    import yaml

    recipe = raw_config if isinstance(raw_config, dict) else cfg.model_dump(mode="json", exclude_defaults=True)
    (folder / "mergekit_config.yml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    from .. import __version__

    provenance = {"produced_by": "graft merge", "graftkit": __version__, "merge_method": plan.spec.name,
                  "base_model": plan.base, "inputs": plan.inputs, "excluded": plan.excluded, "stats": plan.stats}
    (folder / "graft_provenance.json").write_text(json.dumps(provenance, indent=2, default=str) + "\n")


def merge_inputs(cfg: MergeConfig, source: Any = None) -> list[tuple[str, Any]]:
    """What a merge reads, as ``(label, path)`` for :func:`graftkit.outputs.check_output`."""
    found: list[tuple[str, Any]] = [("merge config", source)] if isinstance(source, (str, Path)) else []
    found.append(("base_model", cfg.base_model))
    found += [("model", m.model) for m in cfg.models]
    if cfg.tokenizer_source not in (None, "base", "union"):
        found.append(("tokenizer_source", cfg.tokenizer_source))
    return found


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
    scan_finite(plan)
    return describe(plan, threads=threads)


# bit masks of the exponent: all ones means Inf or NaN (numpy has no bfloat16, so BF16 is read as bits)
_EXPONENT = {"F64": ("<u8", 0x7FF0000000000000), "F32": ("<u4", 0x7F800000), "F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80)}


def scan_finite(plan: Plan, chunk: int = 1 << 24) -> None:
    """The real run's NaN/Inf check, for --dry-run: every float tensor the merge would read, from
    every full-model input, without torch (numpy over the memory-mapped file, one chunk at a time).
    Adapters were already checked whole when opened. It reads the inputs once: a dry run of a large
    merge takes about as long as reading the models from disk."""
    import numpy as np

    for p in dict.fromkeys([plan.base, *plan.inputs]):
        ckpt = plan.ckpts.get(p) if p else None
        if not isinstance(ckpt, Checkpoint) or ckpt._pickled is not None:
            continue
        for f, header in ckpt.headers.items():
            keys = [k for k in plan.keys if ckpt.files.get(k) == f and st_dtype(header[k]["dtype"]) in _EXPONENT]
            if not keys:
                continue
            with open(f, "rb") as fh:
                start = 8 + int.from_bytes(fh.read(8), "little")
            data = np.memmap(f, dtype=np.uint8, mode="r")
            try:
                for k in keys:
                    kind, mask = _EXPONENT[st_dtype(header[k]["dtype"])]
                    lo, hi = header[k]["data_offsets"]
                    bits = data[start + lo:start + hi].view(kind)
                    for i in range(0, bits.size, chunk):
                        part = bits[i:i + chunk]
                        if bool(np.any((part & np.array(mask, dtype=kind)) == np.array(mask, dtype=kind))):
                            raise MergeError(f"{k} in {p} has NaN or Inf values; that input is broken - re-create or re-download it")
            finally:
                del data


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
        from .search import run_search

        return run_search(cfg, out, evaluate, overwrite=overwrite, threads=threads, force=force)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileFormatError(f"{out} already exists; choose another output folder or pass --overwrite")
    plan = build_plan(cfg, allow_pickle=allow_pickle, force=force)
    if cfg.output == "adapter":
        from .to_adapter import merge_to_adapter

        return merge_to_adapter(plan, out, overwrite=overwrite)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        plan.stats = execute(plan, tmp, threads=threads, progress=progress)
        _write_metadata(plan, tmp, raw if isinstance(raw, dict) else None)
    return out
