"""Merging models whose vocabularies differ: ``tokenizer_source: union`` (or ``base``, or a folder).

The output vocabulary is

* ``union``: the base model's tokenizer (the top-level ``base_model``, else the first model), then
  every ordinary token of the other models that the base lacks, in the order the models are listed
  and, within a model, by token id, then every added token (special tokens, chat markers) of any
  model that is still missing - mergekit's ``build_union_tokenizer``;
* ``base`` or a folder: that tokenizer, unchanged.

Every embedding-like tensor (the input embeddings and the LM head: a name with ``embed_tokens``,
``lm_head``, ``wte``, ... whose first axis is the vocabulary) of every input is re-indexed to the
output vocabulary by token string, before the merge method sees it. A token a model has keeps that
model's row. A token a model lacks gets (mergekit's ``PermutedVocabulary`` rule):

1. the row of the only model that has it, when exactly one does;
2. else the base model's row, when the base is an input and has it (so its task vector is 0);
3. else the mean of the rows of the models that have it;
4. zeros when no model has it (a token only the ``tokenizer_source`` folder knows).

Rows past a model's embedding size (padding ids of its tokenizer) count as missing. The merged
tokenizer is the output vocabulary's tokenizer, saved with ``save_pretrained``, and
``vocab_size`` in config.json is its length. Means are taken in float32 and stored in the input's
dtype (mergekit computes them in the load dtype).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, FileFormatError, UnsupportedError

VOCAB_HINTS = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_in", "embed_out", "shared")


@dataclass
class Vocab:
    """A tokenizer's vocabulary as plain data: token -> id, the added tokens (content -> their
    settings, an ``AddedToken``) and the model's embedding rows (ids at or past it are unused)."""
    tokens: dict[str, int]
    added: dict[str, Any] = field(default_factory=dict)
    rows: int | None = None

    def usable(self) -> dict[str, int]:
        limit = self.rows if self.rows is not None else len(self.tokens)
        return {t: i for t, i in self.tokens.items() if i < limit}


def union_additions(base: Vocab, others: list[Vocab]) -> tuple[list[str], list[Any]]:
    """What ``union`` adds to the base tokenizer: the ordinary tokens it lacks (first mention
    order over base, then the others, each by id) and the added tokens, first settings winning."""
    added: dict[str, Any] = {}
    ordinary: dict[str, None] = {}
    for v in [base, *others]:
        usable = v.usable()
        for tok, _ in sorted(usable.items(), key=lambda kv: kv[1]):
            ordinary.setdefault(tok)
        for tok, info in v.added.items():
            if tok in usable and tok not in added:
                added[tok] = info
    base_tokens = base.usable()
    new = [t for t in ordinary if t not in added and t not in base_tokens]
    return new, list(added.values())


def permutation(out: dict[str, int], model: Vocab) -> list[int]:
    """For each output id, the model's row of that token, or -1 when the model lacks it."""
    have = model.usable()
    perm = [-1] * (max(out.values()) + 1 if out else 0)
    for tok, i in out.items():
        perm[i] = have.get(tok, -1)
    return perm


def check_contiguous(out: dict[str, int], where: str) -> None:
    ids = sorted(out.values())
    if ids != list(range(len(ids))):
        raise UnsupportedError(f"the merged tokenizer ({where}) has gaps or repeats in its token ids, so its embedding rows "
                               "cannot be laid out; use a tokenizer whose ids run 0..N-1")


def check_overlap(perms: list[list[int]], names: list[str]) -> None:
    """Models that share no token cannot be aligned into one meaningful embedding: refuse."""
    import numpy as np

    present = np.array(perms) >= 0
    for k in range(1, len(names)):
        if not np.any(present[0] & present[k]):
            raise ConfigError(f"{names[k]} shares no token with {names[0]} (their tokenizers have nothing in common), so "
                              "tokenizer_source: union would stack unrelated embeddings; merge models of one tokenizer family")


def align_rows(tensors: list, perms: list[list[int]], base_index: int | None):
    """Every model's vocabulary tensor (rows on axis 0) re-indexed to the output ids, with the
    missing rows filled by the module's rule (donor, base, mean, zero). float32 results."""
    import torch

    idx = torch.tensor(perms, dtype=torch.long)                      # (models, out rows)
    present = idx >= 0
    gathered = [t[idx[k].clamp(min=0)].float() for k, t in enumerate(tensors)]  # the rows, then float32: no whole-tensor copy
    shape = (idx.shape[1],) + tuple(tensors[0].shape[1:])
    mask_shape = (-1,) + (1,) * (len(shape) - 1)
    total = torch.zeros(shape, dtype=torch.float32)
    for k, g in enumerate(gathered):
        total = total + torch.where(present[k].view(mask_shape), g, torch.zeros((), dtype=torch.float32))
    count = present.sum(0)
    fill = total / count.clamp(min=1).to(torch.float32).view(mask_shape)  # one model: its row; none: 0
    if base_index is not None:
        use_base = (present[base_index] & (count >= 2)).view(mask_shape)
        fill = torch.where(use_base, gathered[base_index], fill)
    return [torch.where(present[k].view(mask_shape), g, fill) for k, g in enumerate(gathered)]


def vocab_keys(keys, shape_of, rows: int) -> list[str]:
    """The tensors indexed by token: a vocabulary name hint and ``rows`` entries on axis 0."""
    return [k for k in keys if any(h in k for h in VOCAB_HINTS) and len(shape_of(k)) >= 1 and shape_of(k)[0] == rows]


# -- tokenizers on disk ---------------------------------------------------------------------------

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model")


def has_tokenizer(folder: Path) -> bool:
    return any((Path(folder) / n).is_file() for n in TOKENIZER_MARKERS)


def load_tokenizer(folder: Path):
    """A model folder's tokenizer (fast, no remote code); a one-line error when it cannot be read."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), use_fast=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad tokenizer folder
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileFormatError(f"the tokenizer in {folder} could not be loaded ({first[:200]}); fix its tokenizer files "
                              "or name another tokenizer_source") from None


def vocab_of(tokenizer, rows: int | None) -> Vocab:
    added = {info.content: info for _, info in sorted(tokenizer.added_tokens_decoder.items())}
    return Vocab(dict(tokenizer.get_vocab()), added, rows)


def union_tokenizer(base_tok, base: Vocab, others: list[Vocab]):
    """The base tokenizer (a reloaded copy: the caller's is not changed) with the union's tokens added."""
    import tempfile

    import transformers

    if len(base.tokens) > (base.rows or len(base.tokens)):
        raise UnsupportedError(f"the base tokenizer has {len(base.tokens)} tokens but its model only {base.rows} embedding rows; "
                               "tokenizer_source: union needs a base whose tokenizer fits its embeddings")
    with tempfile.TemporaryDirectory() as tmp:
        base_tok.save_pretrained(tmp)
        out = transformers.AutoTokenizer.from_pretrained(tmp, use_fast=True, trust_remote_code=False)
    new, added = union_additions(base, others)
    if new:
        out.add_tokens(new)
    for info in added:
        out.add_tokens(info)
    return out


# -- the plan -------------------------------------------------------------------------------------

ALIGN_ROWS = 8192  # output rows aligned at a time
EMBED_HINTS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "shared")
VOCAB_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "added_tokens.json")


@dataclass
class VocabPlan:
    """The output vocabulary and the inputs whose vocabulary rows were re-indexed to it."""
    tokenizer: Any
    size: int
    ckpts: dict[str, Any]          # input -> a checkpoint whose vocabulary tensors are the aligned ones
    keys: list[str]
    filled: dict[str, int]         # input -> rows it lacked (filled by the rule)
    added: int                     # tokens the output has beyond the base tokenizer
    scratch: Any = None            # the temporary folder holding the aligned rows

    def cleanup(self) -> None:
        if self.scratch is not None:
            self.scratch.cleanup()
            self.scratch = None


def embedding_rows(ckpt) -> int | None:
    for k in ckpt.keys():
        if any(h in k for h in EMBED_HINTS) and len(ckpt.shape(k)) == 2:
            return ckpt.shape(k)[0]
    return None


def _same_files(a: Path, b: Path) -> bool:
    for name in VOCAB_FILES:
        fa, fb = Path(a) / name, Path(b) / name
        if fa.is_file() != fb.is_file() or (fa.is_file() and fa.read_bytes() != fb.read_bytes()):
            return False
    return True


def build_vocab_plan(source: str, paths: list[str], ckpts: dict, dirs: dict[str, Path], base: str | None,
                     tokenizer_folder: Path | None = None) -> VocabPlan | None:
    """Align the vocabulary rows of ``paths`` (the base first when the config has one) to the
    output vocabulary of ``source`` (``union``, ``base`` or a folder). ``None`` when nothing has to
    move: every input already has the output's vocabulary (then the tokenizer files are copied)."""
    from ..tensors import Checkpoint

    found = output_vocabulary(source, paths, ckpts, dirs, tokenizer_folder)
    if found is None:
        return None
    out_tok, vocabs, perms, rows, size = found
    first = paths[0]
    moved = [p for p in paths if rows[p] != size or perms[p] != list(range(size))]
    if not moved:
        return None
    check_overlap([perms[p] for p in paths], paths)
    for p in moved:
        if not isinstance(ckpts[p], Checkpoint) or not ckpts[p].is_safetensors:
            raise UnsupportedError(f"{p} needs its vocabulary rows re-indexed for tokenizer_source: {source}, but it is an adapter "
                                   "or a pickled checkpoint; give it as a safetensors model folder")
    ref = ckpts[first]
    keys = vocab_keys(ref.keys(), ref.shape, rows[first])
    for p in paths:
        missing = [k for k in keys if k not in ckpts[p].keys() or ckpts[p].shape(k)[0] != rows[p]]
        if missing:
            raise ConfigError(f"{p} has no vocabulary tensor {missing[0]} with {rows[p]} rows (which {first} has); "
                              "the models differ in architecture")
    import tempfile

    import torch
    from safetensors.torch import save_file

    from .slices import RemappedCheckpoint

    scratch = tempfile.TemporaryDirectory(prefix="graft-vocab-")
    base_index = paths.index(base) if base in paths else None
    aligned: dict[str, dict[str, Any]] = {p: {} for p in moved}
    for k in keys:
        # the inputs stay memory-mapped; the aligned rows are made ALIGN_ROWS at a time, so the extra
        # memory is the moved models' outputs in their own dtype (mergekit holds every input in float32)
        tensors = [ckpts[p].read(k) if isinstance(ckpts[p], Checkpoint) else ckpts[p].get(k) for p in paths]
        for p, src in zip(paths, tensors):
            if p in aligned:
                aligned[p][k] = torch.empty((size, *src.shape[1:]), dtype=src.dtype)
        _align_into([aligned.get(p, {}).get(k) for p in paths], tensors, [perms[p] for p in paths], base_index, size)
        del tensors
    replaced = {}
    for i, p in enumerate(moved):
        f = Path(scratch.name) / f"input{i}.safetensors"
        save_file(aligned.pop(p), str(f))
        rows_ckpt = Checkpoint(f)
        mapping = {k: (ckpts[p], k) for k in ckpts[p].keys()}
        mapping.update({k: (rows_ckpt, k) for k in keys})
        replaced[p] = RemappedCheckpoint(p, mapping)
    filled = {p: sum(1 for i in perms[p] if i < 0) for p in paths}
    added = size - len(vocabs[first].usable())
    return VocabPlan(out_tok, size, replaced, keys, filled, added, scratch)


def _align_into(outs: list, tensors: list, perms: list[list[int]], base_index: int | None, size: int) -> None:
    """``align_rows`` over ``tensors``, ALIGN_ROWS output rows at a time, into the preallocated
    ``outs`` (``None`` for an input whose rows do not move)."""
    for r0 in range(0, size, ALIGN_ROWS):
        r1 = min(size, r0 + ALIGN_ROWS)
        block = align_rows(tensors, [p[r0:r1] for p in perms], base_index)
        for out, t in zip(outs, block):
            if out is not None:
                out[r0:r1] = t


def output_vocabulary(source: str, paths: list[str], ckpts: dict, dirs: dict[str, Path], tokenizer_folder: Path | None):
    """The output tokenizer and each input's permutation to it: ``(tokenizer, vocabs, perms, rows,
    size)``, or ``None`` when every input already has one vocabulary (or none can be compared)."""
    first = paths[0]
    rows = {p: embedding_rows(ckpts[p]) for p in paths}
    out_dir = Path(tokenizer_folder) if tokenizer_folder is not None else dirs[first]
    if all(rows[p] == rows[first] for p in paths) and all(not has_tokenizer(dirs[p]) or _same_files(dirs[p], out_dir) for p in paths):
        return None  # one vocabulary everywhere (or nothing to compare): the tokenizer files are copied
    if not has_tokenizer(dirs[first]):
        if source == "union":
            raise ConfigError(f"tokenizer_source: union needs the tokenizer of {first} (the union starts from it), but "
                              f"{dirs[first]} has no tokenizer files; add them or name a tokenizer folder")
        return None
    toks = {p: load_tokenizer(dirs[p]) for p in paths if has_tokenizer(dirs[p])}
    vocabs = {p: vocab_of(toks[p], rows[p]) if p in toks else Vocab(dict(toks[first].get_vocab()), {}, rows[p]) for p in paths}
    if source == "union":
        out_tok = union_tokenizer(toks[first], vocabs[first], [vocabs[p] for p in paths[1:]])
    elif source == "base":
        out_tok = toks[first]
    else:
        out_tok = load_tokenizer(out_dir)
    out_vocab = dict(out_tok.get_vocab())
    check_contiguous(out_vocab, str(source))
    perms = {p: permutation(out_vocab, vocabs[p]) for p in paths}
    return out_tok, vocabs, perms, rows, len(out_vocab)


def check_one_vocabulary(paths: list[str], dirs: dict[str, Path]) -> None:
    """Without ``tokenizer_source``, inputs whose tokenizers map tokens to other ids would be merged
    row by row as if they agreed: refuse that, pointing to ``union``. Only tokenizers whose files
    differ are loaded; one that cannot be loaded is not judged here (no tokenizer is read then)."""
    with_tok = [p for p in paths if has_tokenizer(dirs[p])]
    if len(with_tok) < 2:
        return
    first = with_tok[0]
    differ = [p for p in with_tok[1:] if not _same_files(dirs[p], dirs[first])]
    if not differ:
        return
    try:
        ref = dict(load_tokenizer(dirs[first]).get_vocab())
    except FileFormatError:
        return
    for p in differ:
        try:
            theirs = dict(load_tokenizer(dirs[p]).get_vocab())
        except FileFormatError:
            continue
        if theirs != ref:
            # the first differing id, so the message is the same on every run (vocab dicts come in hash order)
            moved = [t for t, i in ref.items() if theirs.get(t) != i]
            tok = min(moved, key=ref.get) if moved else min((t for t in theirs if t not in ref), key=theirs.get)
            raise ConfigError(f"{p} and {first} have different vocabularies (token {tok!r} is id {ref.get(tok)} in {first}, "
                              f"{theirs.get(tok)} in {p}); add 'tokenizer_source: union' to merge them with their embedding rows "
                              "aligned by token")


def build_slice_vocab_plan(source: str, cfg, sliced, ckpts: dict, dirs: dict[str, Path],
                           tokenizer_folder: Path | None = None) -> VocabPlan | None:
    """``tokenizer_source`` with ``slices:``: the output vocabulary over every model the slices
    read (``ckpts``: the base first), and each vocabulary tensor of each source position aligned
    over the models that supply that tensor (the first slice's sources for the embeddings, the last
    slice's for the head), as mergekit aligns each tensor's own inputs - so with ``passthrough`` a
    token the embedding's model lacks gets a zero row there. The slice's base is preferred."""
    from ..tensors import Checkpoint
    from .slices import LAYER_KEY, RemappedCheckpoint, slice_base

    paths = list(ckpts)
    found = output_vocabulary(source, paths, ckpts, dirs, tokenizer_folder)
    if found is None:
        return None
    out_tok, vocabs, perms, rows, size = found
    owner = {id(c): p for p, c in ckpts.items()}
    labels = list(sliced.ckpts)
    lead = sliced.ckpts[labels[0]]
    keys = [k for k in lead.keys() if not LAYER_KEY.match(k) and any(h in k for h in VOCAB_HINTS)
            and lead.sources[k][0].shape(lead.sources[k][1])[0] == rows[owner[id(lead.sources[k][0])]]]
    import tempfile

    import torch
    from safetensors.torch import save_file

    aligned: dict[str, dict[str, Any]] = {label: {} for label in labels}
    for k in keys:
        srcs = [sliced.ckpts[label].sources[k] for label in labels]
        models = [owner[id(c)] for c, _ in srcs]
        if all(rows[m] == size and perms[m] == list(range(size)) for m in models):
            continue
        check_overlap([perms[m] for m in models], models)
        base = slice_base(cfg, cfg.slices[sliced.slice_of[k]])
        tensors = [c.read(name) for c, name in srcs]
        outs = [torch.empty((size, *t.shape[1:]), dtype=t.dtype) for t in tensors]
        _align_into(outs, tensors, [perms[m] for m in models], models.index(base) if base in models else None, size)
        for label, out in zip(labels, outs):
            aligned[label][k] = out
        del tensors
    if not any(aligned.values()):
        return None
    scratch = tempfile.TemporaryDirectory(prefix="graft-vocab-")
    replaced = {}
    for i, label in enumerate(labels):
        f = Path(scratch.name) / f"slot{i}.safetensors"
        moved = aligned.pop(label)
        save_file(moved, str(f))
        rows_ckpt = Checkpoint(f)
        replaced[label] = RemappedCheckpoint(label, {**sliced.ckpts[label].sources, **{k: (rows_ckpt, k) for k in moved}})
    filled = {p: sum(1 for i in perms[p] if i < 0) for p in paths}
    return VocabPlan(out_tok, size, replaced, keys, filled, size - len(vocabs[paths[0]].usable()), scratch)


def check_same_rows(ckpts: dict) -> None:
    """Models of one vocabulary have as many embedding rows: a stack of layers from models that
    differ would pair one model's embeddings with another's head."""
    rows = {p: r for p, c in ckpts.items() if (r := embedding_rows(c)) is not None}
    first = next(iter(rows), None)
    other = next((p for p in rows if rows[p] != rows[first]), None)
    if other is not None:
        raise ConfigError(f"vocab size differs: {first} has {rows[first]} embedding rows, {other} has {rows[other]}; add "
                          "'tokenizer_source: union' to merge models of different vocabularies (their rows are aligned by token)")
