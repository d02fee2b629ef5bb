"""Training data: local files read by :mod:`graftkit.files`, tokenized, batched.

* classification: ``text_field`` -> ``input_ids``, ``label_field`` -> a class index (the label
  set comes from the training file, sorted, unless ``data.labels`` lists it);
* chat SFT (``prompt_field`` + ``response_field``): the tokenizer's chat template renders the
  user turn (plus an optional system prompt) and the assistant turn; the loss is taken on the
  assistant tokens only (every other label is -100);
* plain-text LM (``text_field`` only): documents are tokenized, joined with the EOS token and,
  with ``packing``, cut into blocks of exactly ``max_length`` tokens.

Two kinds of packing, both filling rows of ``max_length`` tokens so that no compute goes to padding:

* ``data.packing`` (plain text): the documents are one stream cut into blocks; a block may start
  mid-document, and its tokens attend to the end of the document before them (the classic
  pre-training recipe).
* ``data.pack_examples`` (chat SFT, or plain text with ``packing`` off): whole examples are placed
  into rows (:func:`pack`), each with position ids restarting at 0 and attention kept inside it;
  the first token of an example is never a target of the one before. Training on a packed row
  gives each example the loss and gradient it would get alone (tests/test_packing.py).

Sequences longer than ``max_length`` (or than the model's own position limit) are truncated,
with one warning that says how many were.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .. import files
from ..errors import ConfigError
from .recipe import Recipe

IGNORE = -100


@dataclass
class Prepared:
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    labels: list[str] | None = None  # classification
    tasks: list[str] | None = None  # multi-task
    max_length: int = 0
    warnings: list[str] = field(default_factory=list)


def read_rows(path: str | Path, fmt: str = "auto") -> list[dict[str, Any]]:
    """All rows of a local JSONL / JSON / CSV / Parquet file, as dicts (see :mod:`graftkit.files`)."""
    return files.read_rows(path, fmt, name="data file", hint=" or set data.format")


def _field(rows: list[dict], name: str, path: str, what: str) -> list[Any]:
    if rows and name not in rows[0] and all(name not in r for r in rows):
        raise ConfigError(f"{path} has no field {name!r} ({what}); its fields are: {', '.join(sorted(rows[0]))}")
    values = []
    for i, r in enumerate(rows):
        v = r.get(name)
        if v is None or (isinstance(v, float) and v != v):
            raise ConfigError(f"{path}: {files.where(rows, i)} has no value for field {name!r} ({what}); fix or remove that row")
        values.append(v)
    return values


def model_position_limit(model) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


class Truncation:
    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0
        self.total = 0

    def __call__(self, ids: list[int]) -> list[int]:
        self.total += 1
        if len(ids) > self.limit:
            self.count += 1
            return ids[: self.limit]
        return ids


def prepare(recipe: Recipe, tokenizer, limit: int | None) -> Prepared:
    """Read and tokenize the recipe's data; ``limit`` is the model's position limit (if any)."""
    d = recipe.data
    warnings: list[str] = []
    max_length = d.max_length
    if limit is not None and max_length > limit:
        warnings.append(f"data.max_length {max_length} exceeds the model's limit of {limit} positions; using {limit}")
        max_length = limit
    train_rows = read_rows(d.train, d.format)
    if not train_rows:
        raise ConfigError(f"{d.train} holds no rows")
    if d.limit:
        train_rows = train_rows[: d.limit]
    if recipe.augment is not None and recipe.augment.eda is not None:
        from .augment import augment_rows

        # the rows are checked before copies renumber them, so an error names the file's own line
        chat = d.prompt_field is not None
        wanted = {d.prompt_field: "prompt", d.response_field: "response"} if chat else {d.text_field: "text", d.label_field: "label"}
        for name, what in {**wanted, **({d.task_field: "task"} if d.task_field else {})}.items():
            _field(train_rows, name, d.train, what)
        if not chat:
            files.check_label_types(train_rows, d.label_field, d.train)
        train_rows = augment_rows(train_rows, d.prompt_field if chat else d.text_field, recipe.augment.eda, recipe.optim.seed)
    val_rows = read_rows(d.validation, d.format) if d.validation else []
    if recipe.eval.limit:
        val_rows = val_rows[: recipe.eval.limit]
    out = Prepared([], [], max_length=max_length, warnings=warnings)

    tasks = None
    if d.task_field:
        names = [str(v) for v in _field(train_rows, d.task_field, d.train, "task")]
        tasks = sorted(set(names))
        out.tasks = tasks
        index = {t: i for i, t in enumerate(tasks)}
        train_task = [index[t] for t in names]
        if val_rows:
            vnames = [str(v) for v in _field(val_rows, d.task_field, d.validation, "task")]
            unknown = sorted(set(vnames) - set(tasks))
            if unknown:
                raise ConfigError(f"{d.validation} has task(s) {', '.join(map(repr, unknown))} that {d.train} lacks")
            val_task = [index[t] for t in vnames]

    if recipe.task == "classification":
        trunc = Truncation(max_length)
        texts = [str(t) for t in _field(train_rows, d.text_field, d.train, "text")]
        labels = [str(v) for v in _field(train_rows, d.label_field, d.train, "label")]
        files.check_label_types(train_rows, d.label_field, d.train)
        names = list(d.labels) if d.labels else sorted(set(labels))
        unknown = sorted(set(labels) - set(names))
        if unknown:
            raise ConfigError(f"{d.train} has label(s) {', '.join(map(repr, unknown[:5]))} not in data.labels ({', '.join(names)})")
        if len(names) < 2:
            raise ConfigError(f"{d.train} has only one label ({names[0]!r}); classification needs at least two")
        out.labels = names
        index = {n: i for i, n in enumerate(names)}
        enc = tokenizer(texts, truncation=False, add_special_tokens=True)["input_ids"]
        out.train = [{"input_ids": trunc(ids), "label": index[y]} for ids, y in zip(enc, labels)]
        if val_rows:
            vtexts = [str(t) for t in _field(val_rows, d.text_field, d.validation, "text")]
            vlabels = [str(v) for v in _field(val_rows, d.label_field, d.validation, "label")]
            files.check_label_types(val_rows, d.label_field, d.validation)
            unknown = sorted(set(vlabels) - set(names))
            if unknown:
                raise ConfigError(f"{d.validation} has label(s) {', '.join(map(repr, unknown[:5]))} that the training labels "
                                  f"({', '.join(names)}) lack; the model cannot predict them")
            venc = tokenizer(vtexts, truncation=False, add_special_tokens=True)["input_ids"]
            out.validation = [{"input_ids": trunc(ids), "label": index[y]} for ids, y in zip(venc, vlabels)]
        if trunc.count:
            warnings.append(f"{trunc.count} of {trunc.total} texts are longer than {max_length} tokens and were truncated")
    elif d.prompt_field:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"the tokenizer of {recipe.tokenizer or recipe.model} has no chat template; "
                              "chat SFT (data.prompt_field) needs one: give a tokenizer folder with one, or use plain text (data.text_field)")
        trunc = Truncation(max_length)
        out.train = [_chat_example(tokenizer, p, r, d.system_prompt, trunc) for p, r in zip(
            _field(train_rows, d.prompt_field, d.train, "prompt"), _field(train_rows, d.response_field, d.train, "response"))]
        if val_rows:
            prompts = _field(val_rows, d.prompt_field, d.validation, "prompt")
            out.validation = [_chat_example(tokenizer, p, r, d.system_prompt, trunc) for p, r in zip(
                prompts, _field(val_rows, d.response_field, d.validation, "response"))]
            if recipe.eval.exact_match:
                answers = _field(val_rows, d.answer_field, d.validation, "answer")
                for ex, p, a in zip(out.validation, prompts, answers):
                    ex["prompt_ids"] = _render(tokenizer, _messages(p, None, d.system_prompt), add_generation_prompt=True)
                    ex["answer"] = str(a)
        if trunc.count:
            warnings.append(f"{trunc.count} of {trunc.total} chat examples are longer than {max_length} tokens and were truncated")
    else:
        texts = [str(t) for t in _field(train_rows, d.text_field, d.train, "text")]
        blocks = d.packing and not d.pack_examples  # pack_examples keeps each document whole instead
        out.train = _lm_blocks(tokenizer, texts, max_length, blocks, warnings, train_task if tasks else None)
        if val_rows:
            vtexts = [str(t) for t in _field(val_rows, d.text_field, d.validation, "text")]
            out.validation = _lm_blocks(tokenizer, vtexts, max_length, blocks, warnings, val_task if tasks else None)
        if not out.train:
            raise ConfigError(f"{d.train} gives no full block of {max_length} tokens; lower data.max_length or add text")

    if tasks and not (recipe.task == "causal-lm" and not d.prompt_field):
        for ex, t in zip(out.train, train_task):
            ex["task"] = t
        for ex, t in zip(out.validation, val_task if val_rows else []):
            ex["task"] = t
    if d.pack_examples:  # training rows only: validation is scored (and generated from) per example
        out.train = pack(out.train, max_length)
    return out


def pack(examples: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Whole examples placed into rows of at most ``max_length`` tokens (best fit, longest first:
    deterministic, and rows come out nearly full). Each row holds ``input_ids``, ``labels`` and
    ``position_ids``; the position ids restart at 0 at each example, which is how the model tells
    the examples apart (see loop._model_inputs), and each example's first label is IGNORE so that
    its first token is not a target of the example before it (alone, it is never a target)."""
    import bisect

    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row), sorted: the best fit is the first with enough room
    for i in order:
        n = len(examples[i]["input_ids"])
        if n == 0:
            continue
        at = bisect.bisect_left(room, (n, -1))
        if at == len(room):
            rows.append([i])
            free, row = max_length - n, len(rows) - 1
        else:
            free, row = room.pop(at)
            rows[row].append(i)
            free -= n
        if free > 0:
            bisect.insort(room, (free, row))
    out = []
    for members in rows:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in members:
            e = examples[i]
            ids.extend(e["input_ids"])
            labels.append(IGNORE)
            labels.extend(e["labels"][1:len(e["input_ids"])])
            positions.extend(range(len(e["input_ids"])))
        out.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return out


def _messages(prompt: Any, response: Any | None, system: str | None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": str(prompt)})
    if response is not None:
        msgs.append({"role": "assistant", "content": str(response)})
    return msgs


def _render(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _chat_example(tokenizer, prompt, response, system, trunc: Truncation) -> dict[str, Any]:
    """Loss on the assistant turn only: the tokens the full conversation adds to the prompt."""
    head = _render(tokenizer, _messages(prompt, None, system), add_generation_prompt=True)
    full = _render(tokenizer, _messages(prompt, response, system), add_generation_prompt=False)
    if full[: len(head)] != head:  # a template that renders the prompt differently once answered
        tail = tokenizer(str(response) + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
        full = head + tail
    ids = trunc(full)
    labels = [IGNORE] * min(len(head), len(ids)) + ids[len(head):]
    return {"input_ids": ids, "labels": labels}


def _lm_blocks(tokenizer, texts: list[str], max_length: int, packing: bool, warnings: list[str], tasks=None) -> list[dict]:
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if not packing:
        trunc = Truncation(max_length)
        out = [{"input_ids": trunc(ids + ([eos] if eos is not None else [])), "labels": None} for ids in enc]
        for ex in out:
            ex["labels"] = list(ex["input_ids"])
        if tasks is not None:
            for ex, t in zip(out, tasks):
                ex["task"] = t
        if trunc.count:
            warnings.append(f"{trunc.count} of {trunc.total} texts are longer than {max_length} tokens and were truncated")
        return out
    if tasks is not None:
        raise ConfigError("multi-task plain-text LM with packing would mix tasks inside a block; set data.packing=false")
    stream: list[int] = []
    for ids in enc:
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
    n = len(stream) // max_length
    return [{"input_ids": stream[i * max_length:(i + 1) * max_length], "labels": stream[i * max_length:(i + 1) * max_length]} for i in range(n)]


def packing_problem(model) -> str | None:
    """Why ``model`` would not keep packed examples apart, or None: two short examples are run
    packed in one row and alone, and each must get the logits it gets alone. A model whose
    attention ignores position ids for masking, or a method that adds tokens to the sequence
    (prompt and prefix tuning), fails it."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 32
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, vocab, (1, 5), generator=g), torch.randint(0, vocab, (1, 4), generator=g)
    # two rows: flash attention reads packing from position ids only for a batch of one row
    ids = torch.cat([torch.cat([a, b], dim=1), torch.cat([b, a], dim=1)])
    positions = torch.stack([torch.cat([torch.arange(5), torch.arange(4)]), torch.cat([torch.arange(4), torch.arange(5)])])
    param = next(model.parameters(), None)
    if param is not None:  # the model may already sit on its GPU
        a, b, ids, positions = (t.to(param.device) for t in (a, b, ids, positions))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits.float()
            la, lb = model(input_ids=a, use_cache=False).logits, model(input_ids=b, use_cache=False).logits
            alone = torch.cat([torch.cat([la, lb], dim=1), torch.cat([lb, la], dim=1)]).float()
            # other shapes round differently: in bf16 / fp16 that alone moves logits by ~1%; one
            # example seeing another moves them by far more
            tolerance = 1e-4 if la.dtype == torch.float32 else 3e-2
    except Exception as exc:  # noqa: BLE001 - any failure means packing is not supported
        return f"a packed forward fails ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    finally:
        model.train(was_training)
    if packed.shape != alone.shape:
        return "its output has another length than its input"
    if (packed - alone).abs().max() > tolerance * alone.abs().max().clamp(min=1.0):
        return "an example's outputs change when another example is packed before it"
    return None


def collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples to their longest member."""
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"], dtype=torch.long)
        mask[i, : len(e["input_ids"])] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if "label" in examples[0]:
        batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    else:
        labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, : len(e["labels"])] = torch.tensor(e["labels"], dtype=torch.long)
        batch["labels"] = labels
    if "task" in examples[0]:
        batch["task"] = torch.tensor([e["task"] for e in examples], dtype=torch.long)
    if "position_ids" in examples[0]:  # packed rows: the padding after the last example counts as one more from 0
        positions = torch.arange(n).repeat(len(examples), 1)
        for i, e in enumerate(examples):
            k = len(e["position_ids"])
            positions[i, :k] = torch.tensor(e["position_ids"], dtype=torch.long)
            positions[i, k:] -= k
        batch["position_ids"] = positions
    return batch


class Order:
    """Which examples each process sees at each micro-step: a pure function of (seed, epoch,
    position), so a resumed run sees exactly what the uninterrupted one would have.

    Each epoch is a seeded permutation cut into global micro-batches of
    ``batch_size x world`` examples (the last incomplete one is dropped, so every process gets
    the same number of examples); process ``rank`` takes its slice of each.
    """

    def __init__(self, n: int, batch_size: int, world: int, rank: int, seed: int):
        self.n, self.batch_size, self.world, self.rank, self.seed = n, batch_size, world, rank, seed
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch == 0:
            raise ConfigError(f"the training set has {n} examples, fewer than one global batch "
                              f"(optim.batch_size {batch_size} x {world} process(es)); lower the batch size or add data")
        self._cache: tuple[int, list[int]] | None = None

    def permutation(self, epoch: int) -> list[int]:
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = (epoch, torch.randperm(self.n, generator=g).tolist())
        return self._cache[1]

    def micro_batch(self, index: int) -> list[int]:
        """Example indices of global micro-batch ``index`` (counted from the start of training) for this rank."""
        epoch, pos = divmod(index, self.per_epoch)
        perm = self.permutation(epoch)
        start = pos * self.batch_size * self.world + self.rank * self.batch_size
        return perm[start:start + self.batch_size]


Hook = Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]]
