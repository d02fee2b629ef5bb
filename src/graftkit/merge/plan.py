"""Planning a merge: from a config to the keys, the inputs and the method per key.

:func:`build_plan` opens every input (headers only), checks that they fit together (architecture,
vocabulary, tensor names and shapes, the tokenizer source) and orders the tensors by their place
in the files; :func:`key_params` resolves the method's parameters for one tensor (filters,
gradients over the layers, per-tensor seeds). Nothing here reads a tensor's values except
:func:`scan_finite`, the NaN/Inf check of ``--dry-run``.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, FileFormatError, GraftError
from ..tensors import Checkpoint
from .config import MergeConfig, exclude_matcher, load_config, resolve
from ..tensors import NAME_TO_ST, nbytes, st_dtype

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
    slices: Any = None   # a slices.SlicePlan for a ``slices:`` config: the inputs are its source positions
    vocab: Any = None    # a vocab.VocabPlan when the inputs' vocabulary rows were aligned to the output's

    def layer_t(self, key: str) -> float:
        """mergekit's gradient position of a tensor: layer index / (layers - 1); 0 outside layers."""
        if self.slices is not None:
            return self.slices.layer_t(key)
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


def read_model_config(path: str) -> dict:
    from ..files import path_kind, read_json

    p = Path(path) / "config.json"
    if path_kind(p) is not None:  # a FIFO or folder named config.json is reported, not skipped
        return read_json(p, "model config", mapping=True)
    return {}


def open_input(path: str, base: Checkpoint | None = None, allow_pickle: bool = False, exclude=None, force: bool = False,
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


def open_model_folder(path, role: str, error: type[GraftError]) -> tuple[Checkpoint, dict]:
    """A Hugging Face model folder's tensors and config.json; ``role`` names it in the one-line
    ``error`` when it is not a folder (or has no config.json)."""
    p = Path(path)
    if not p.is_dir():
        raise error(f"{role} {path} is not a folder; give a Hugging Face model folder")
    check_model_folder(p)
    return Checkpoint(p), read_model_config(str(p))


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
    if spec.base_as_input and cfg.base_model:  # without needs_base the base is optional (nuslerp): absent, not an input
        inputs = [cfg.base_model] + [m.model for m in cfg.models if m.model != cfg.base_model]
    elif spec.inputs == "model":
        inputs = [m.model for m in cfg.models]
    else:
        inputs = [m.model for m in cfg.models if m.model != cfg.base_model]
    paths = list(dict.fromkeys([p for p in [base, *inputs] if p]))
    excluded = exclude_matcher(cfg.exclude)
    ckpts = {}
    if cfg.base_model:
        ckpts[cfg.base_model] = open_input(cfg.base_model, allow_pickle=allow_pickle)
    for p in paths:
        if p not in ckpts:
            ckpts[p] = open_input(p, ckpts.get(cfg.base_model), allow_pickle, excluded, force)
    sliced = vocab = None
    if cfg.slices is not None:  # each source position of the slices is one input (merge/slices.py)
        from .slices import build_slice_plan, referenced_models, uses_base

        sources = {p: open_input(p, allow_pickle=allow_pickle) for p in referenced_models(cfg)}
        sliced = build_slice_plan(cfg, spec, sources, read_model_config)
        ckpts = dict(sliced.ckpts)
        dirs = {p: Path(p) for p in sources}
        if cfg.tokenizer_source is not None:  # each vocabulary tensor aligned over the models that supply it
            from .vocab import build_slice_vocab_plan

            vocab = build_slice_vocab_plan(cfg.tokenizer_source, cfg, sliced, sources, dirs,
                                           check_tokenizer_folder(cfg.tokenizer_source))
            if vocab is not None:
                ckpts.update(vocab.ckpts)
                sliced.ckpts = dict(vocab.ckpts)
        else:
            from .vocab import check_one_vocabulary, check_same_rows

            check_one_vocabulary(list(sources), dirs)
            check_same_rows(sources)
        base = sliced.slots[0] if uses_base(spec) else None
        inputs = sliced.slots[1:] if spec.needs_base and not spec.base_as_input else list(sliced.slots)
        paths = list(sliced.slots)
    elif cfg.tokenizer_source is not None:  # vocabularies that differ are aligned by token (merge/vocab.py)
        from .vocab import build_vocab_plan

        folder = check_tokenizer_folder(cfg.tokenizer_source)
        aligned = list(dict.fromkeys([p for p in [cfg.base_model, *inputs] if p]))
        dirs = {p: input_dir(ckpts[p], p) for p in aligned}
        vocab = build_vocab_plan(cfg.tokenizer_source, aligned, ckpts, dirs, cfg.base_model, folder)
        if vocab is not None:
            ckpts.update(vocab.ckpts)
    elif len(inputs) > 1 or base:  # no tokenizer_source: the inputs must share one vocabulary, token for token
        from .vocab import check_one_vocabulary

        shared = list(dict.fromkeys([p for p in [cfg.base_model, *inputs] if p]))
        check_one_vocabulary(shared, {p: input_dir(ckpts[p], p) for p in shared})
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
    ref_cfg = read_model_config(reference)
    for p in paths:
        if p == reference:
            continue
        other = read_model_config(p)
        for field_name in ("model_type", "architectures"):
            if ref_cfg.get(field_name) and other.get(field_name) and ref_cfg[field_name] != other[field_name]:
                raise MergeError(f"{p} is a {other[field_name]} model but {reference} is a {ref_cfg[field_name]} ({field_name}); only models of one architecture can be merged")
        rv, ov = ref_cfg.get("vocab_size"), other.get("vocab_size")
        if rv and ov and rv != ov and vocab is None:
            raise MergeError(f"vocab size differs: {reference} has {rv} tokens, {p} has {ov}; add 'tokenizer_source: union' to merge "
                             "models of different vocabularies (their embedding rows are aligned by token)")
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
                                     "add 'tokenizer_source: union' to merge models of different vocabularies (their embedding "
                                     "rows are aligned by token)")
                raise MergeError(f"shape mismatch at {k}: {tuple(ref.shape(k))} in {reference} vs {tuple(c.shape(k))} in {p}; "
                                 f"the models differ in architecture or size{_exclude_hint(k)}")
    # read in file order, so each shard is walked front to back
    on_disk = ref if isinstance(ref, Checkpoint) else getattr(ref, "base", None)  # an adapter's base holds its tensors

    def file_order(k):
        if isinstance(on_disk, Checkpoint) and on_disk.is_safetensors and k in on_disk.files:
            f, lo, _ = on_disk.byte_range(k)
            return (str(f), lo)
        return (str(ref.files.get(k, "")), 0)

    keys = sorted(keys, key=file_order)
    shapes = {k: tuple(ref.shape(k)) for k in keys}
    in_dtypes = {k: st_dtype(ref.dtype(k)) for k in keys}
    want = cfg.out_dtype or cfg.dtype
    out_dtypes = {k: (NAME_TO_ST[want] if want and in_dtypes[k] in FLOAT_DTYPES else in_dtypes[k]) for k in keys}
    input_bytes = sum(nbytes(st_dtype(ckpts[p].dtype(k)), shapes[k]) for p in paths for k in keys)
    plan = Plan(cfg, spec, base, inputs, ckpts, keys, shapes, in_dtypes, out_dtypes, reference, input_bytes)
    plan.excluded = left_out
    plan.num_layers = int(ref_cfg.get("num_hidden_layers") or ref_cfg.get("n_layer") or 0)
    plan.slices, plan.vocab = sliced, vocab
    tokenizer_dir(plan)
    return plan


def _exclude_hint(key: str) -> str:
    owner = key.rsplit(".", 1)[0] if "." in key else key
    return (f"; if {key} is task-specific (e.g. a classification head), leave it out of the merge with "
            f"exclude: [\"{owner}.*\"]")


def default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def seed_for(seed: int | None, key: str) -> int | None:
    if seed is None:
        return None
    return (int(seed) * 2_654_435_761 + zlib.crc32(key.encode())) % (2**62)


def key_params(plan: Plan, key: str) -> dict:
    cfg, spec = plan.config, plan.spec
    if plan.slices is not None:  # the parameters of the tensor's slice: its sources' over the slice's over the top level's
        cfg = plan.slices.view(key)
    params = resolve_params(cfg, spec, plan.inputs[1:] if spec.base_as_input and plan.base else plan.inputs, key, plan.layer_t(key))
    if spec.random:
        params["seed"] = seed_for(cfg.parameters.get("seed", cfg.seed), key)
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


def chunk_elements(spec=None) -> int:
    """Elements per row chunk of a large tensor (``GRAFT_MERGE_CHUNK`` overrides). Methods that
    trim by magnitude need an extra read of every model to find a chunked tensor's thresholds, so
    they chunk only above 4M elements (the MLP matrices of a 0.5B model stay whole); the others
    gain from small chunks that stay in cache (the benchmark's recipes, warm cache: linear 2.1 s and
    413 MB at 1M vs 2.4 s and 739 MB at 4M; ties 7.2 s at 4M vs 7.8 s at 1M; bench/RESULTS.md)."""
    default = 1 << 22 if spec is not None and spec.thresholded else 1 << 20
    return int(os.environ.get("GRAFT_MERGE_CHUNK", default))


def model_dir(plan: Plan, path: str) -> Path:
    """The model folder behind an input: an adapter's base model folder, else the input itself
    (config.json, generation config and tokenizer files come from there); for a slice config, the
    model whose config.json the output starts from."""
    if plan.slices is not None and path in plan.slices.ckpts:
        return Path(plan.slices.donor)
    return input_dir(plan.ckpts.get(path), path)


def input_dir(ckpt, path: str) -> Path:
    base = getattr(ckpt, "base", None)
    return Path(base.path) if isinstance(base, Checkpoint) else Path(path)


def tokenizer_dir(plan: Plan) -> Path:
    """The folder whose tokenizer files the output gets (checked by build_plan, so --dry-run refuses
    what the real run would). The default, the base's own folder, may hold none (a bare checkpoint);
    a folder the recipe names must hold a tokenizer, or the output would silently have none."""
    source = plan.config.tokenizer_source
    if source in (None, "base", "union"):  # union: the vocabularies agree (else plan.vocab writes the merged tokenizer)
        return model_dir(plan, plan.base or plan.inputs[0])
    return check_tokenizer_folder(source)


def check_tokenizer_folder(source: str | None) -> Path | None:
    """The folder a ``tokenizer_source`` names (``None`` for base / union / unset); it must hold a tokenizer."""
    if source in (None, "base", "union"):
        return None
    folder = Path(source)
    if not folder.is_dir():
        raise ConfigError(f"tokenizer_source {source} is not a folder; use 'base' or a model folder")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileFormatError(f"tokenizer_source {source} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                              "name a folder that has a tokenizer, or use 'base'")
    return folder


def merge_inputs(cfg: MergeConfig, source: Any = None) -> list[tuple[str, Any]]:
    """What a merge reads, as ``(label, path)`` for :func:`graftkit.outputs.check_output`."""
    found: list[tuple[str, Any]] = [("merge config", source)] if isinstance(source, (str, Path)) else []
    found.append(("base_model", cfg.base_model))
    found += [("model", m.model) for m in cfg.models]
    if cfg.slices:
        from .slices import referenced_models

        found += [("model", p) for p in referenced_models(cfg)]
    if cfg.tokenizer_source not in (None, "base", "union"):
        found.append(("tokenizer_source", cfg.tokenizer_source))
    return found


_EXPONENT = {"F64": ("<u8", 0x7FF0000000000000), "F32": ("<u4", 0x7F800000), "F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80)}


def scan_finite(plan: Plan, chunk: int = 1 << 24) -> None:
    """The real run's NaN/Inf check, for --dry-run: every float tensor the merge would read, from
    every full-model input, without torch (numpy over the memory-mapped file, one chunk at a time).
    Adapters were already checked whole when opened. It reads the inputs once: a dry run of a large
    merge takes about as long as reading the models from disk."""
    import numpy as np

    for p in dict.fromkeys([plan.base, *plan.inputs]):
        ckpt = plan.ckpts.get(p) if p else None
        if not isinstance(ckpt, Checkpoint) or not ckpt.is_safetensors:
            continue
        for f in ckpt.headers:
            keys = [k for k in plan.keys if ckpt.files.get(k) == f and st_dtype(ckpt.dtype(k)) in _EXPONENT]
            if not keys:
                continue
            data = np.memmap(f, dtype=np.uint8, mode="r")
            try:
                for k in keys:
                    kind, mask = _EXPONENT[st_dtype(ckpt.dtype(k))]
                    _, lo, hi = ckpt.byte_range(k)
                    bits = data[lo:hi].view(kind)
                    for i in range(0, bits.size, chunk):
                        part = bits[i:i + chunk]
                        if bool(np.any((part & np.array(mask, dtype=kind)) == np.array(mask, dtype=kind))):
                            raise MergeError(f"{k} in {p} has NaN or Inf values; that input is broken - re-create or re-download it")
            finally:
                del data
