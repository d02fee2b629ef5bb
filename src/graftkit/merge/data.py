"""The statistics pre-pass of the data-aware merges (fisher, regmean, ...).

A method that declares ``data="<kind>"`` (see :class:`~graftkit.merge._common.MergeMethod`) gets,
for every tensor it merges, one statistics tensor per input model, computed on examples before the
merge starts:

* ``"gram"`` (RegMean): for every ``nn.Linear`` (and GPT-2 ``Conv1D``, marked: its weight is
  stored (in, out)) whose weight is merged, the Gram matrix of its
  inputs, ``X^T X / N`` with ``X`` the (N, in) rows fed to the layer over the examples' non-padding
  tokens (a classifier head fed one pooled row per example counts examples). Stored under the
  layer's weight key, shape (in, in). See :func:`gram_matrices`.
* ``"fisher"`` (Fisher merging): the diagonal Fisher information of every parameter that gets a
  gradient, the mean over examples of the squared per-example gradient of a log-likelihood. See
  :func:`fisher_diagonals` for which log-likelihood.

The examples come from the merge config's ``data:`` block (:class:`~graftkit.merge.config.DataBlock`),
read by the task loader of ``graft eval`` (:func:`graftkit.eval.tasks.load_task`), so a task file
or task spec that ``graft eval`` takes works here unchanged; every input may have its own task
(``models[i].data``) - the papers compute each model's statistics on its own task.

Memory stays bounded: the models are run one at a time (each loaded as ``graft eval`` loads it:
an HF folder, or the base with an adapter applied), each model's statistics are written to a
temporary safetensors file and the model is dropped before the next one is loaded; the merge then
reads the statistics key by key, memory-mapped, like the weights. Peak memory is one model, its
statistics and (Fisher) its gradients.

Other pre-pass kinds register with :func:`register_prepass`.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..errors import ConfigError, EvalError, GraftError

DEFAULT_EXAMPLES = 64
DEFAULT_BATCH = 8
HEADS = {"classification": "classification", "generation": "causal-lm", "perplexity": "causal-lm"}


# -- the examples --------------------------------------------------------------------------------

def model_kind(path: str, base: str | None = None) -> str:
    """``"classification"`` or ``"causal-lm"``: the head of a merge input (an adapter's is its base's)."""
    from ..io.hf import HEAD_SUFFIXES, model_config
    from .adapters import is_adapter

    source = base if is_adapter(Path(path)) and base else path
    archs = [str(a) for a in (getattr(model_config(source), "architectures", None) or [])]
    for kind, suffixes in HEAD_SUFFIXES.items():
        if any(a.endswith(suffixes) for a in archs):
            return kind
    raise ConfigError(f"{source} is a {archs[0] if archs else 'model without architectures in config.json'}; data-aware merges run "
                      "sequence classifiers (*ForSequenceClassification) and causal LMs (*ForCausalLM)")


def task_for(block, kind: str, where: str):
    """The eval task of a data block for a model with head ``kind`` (first ``examples`` rows)."""
    from ..eval.config import ClassificationTask, PerplexityTask, parse_task

    examples = block.examples or DEFAULT_EXAMPLES
    if isinstance(block.task, str):
        cls = ClassificationTask if kind == "classification" else PerplexityTask
        task = cls(name="merge-data", file=block.task)
    else:
        spec = dict(block.task)
        spec.setdefault("name", "merge-data")
        task = parse_task(spec, f"{where}: data.task")
    if task.kind == "code":
        raise ConfigError(f"{where}: data task {task.name!r} is a code task, which holds no text to compute statistics on; "
                          "give a classification, generation or perplexity task")
    if HEADS[task.kind] != kind:
        raise ConfigError(f"{where}: data task {task.name!r} is a {task.kind} task but the model is a "
                          f"{'sequence classifier' if kind == 'classification' else 'causal LM'}; give a task of the model's own kind "
                          f"({'classification' if kind == 'classification' else 'perplexity or generation'})")
    if block.fisher == "expected" and task.kind != "classification":
        raise ConfigError(f"{where}: fisher: expected sums over the labels of a classification task; {task.kind} data take "
                          "fisher: empirical (the text's own tokens)")
    return task.model_copy(update={"limit": examples})


@dataclass
class Example:
    ids: list[int]
    label: int | None = None  # classification: the output index of the row's label
    targets: list[int] | None = None  # causal LM: the token to predict at each position (-100: none)


def encode(task, model, tok, where: str, head=None) -> list[Example]:
    """The task's rows as token ids (tokenized as ``graft eval`` does), with their labels; a
    classification task needs ``head`` (:class:`graftkit.eval.models.Head`, the model's own
    trained classifier), whose labels the task's labels must be."""
    from ..eval.models import pad_id
    from ..eval.tasks import load_task
    from ..train.data import model_position_limit

    data = load_task(task)
    limit = model_position_limit(model)
    max_length = min(task.max_length, limit) if limit and getattr(task, "max_length", None) else (
        getattr(task, "max_length", None) or limit)
    if task.kind == "classification":
        if head is None:
            raise EvalError(f"{where}: the model has no trained classification head (its checkpoint holds no classifier "
                            "weights), so classification data cannot be scored on it; give fine-tuned classifiers")
        index = head.index()
        bad = next((label for label in data.references if label not in index), None)
        if bad is not None:
            shown = ", ".join(head.labels[:12]) + (", ..." if len(head.labels) > 12 else "")
            raise EvalError(f"{where}: label {bad!r} in {task.file} is not one of the model's {len(head.labels)} labels ({shown}); "
                            "the data are for another task - give each model the task it was fine-tuned on")
        if getattr(model.config, "pad_token_id", None) is None:  # decoder classifiers pool the last non-pad token
            model.config.pad_token_id = pad_id(tok)
        ids = tok(data.texts, truncation=False, add_special_tokens=True)["input_ids"]
        return [Example(list(x[:max_length]), label=index[r]) for x, r in zip(ids, data.references)]
    if task.kind == "perplexity":
        ids = tok(data.texts, add_special_tokens=True)["input_ids"]
        out = [Example(list(x[:max_length]), targets=list(x[1:max_length]) + [-100]) for x in ids]
    else:  # generation: the prompt (as graft eval encodes it) followed by its reference answer
        from ..eval.generate import encode_prompts

        prompts = encode_prompts(tok, data.texts, chat=task.chat, system_prompt=task.system_prompt,
                                 max_prompt_length=task.max_prompt_length, where=where)
        answers = tok([" " + a for a in data.references], add_special_tokens=False)["input_ids"]
        out = []
        for p, a in zip(prompts, answers):
            seq = (list(p) + list(a))[:max_length]
            # position i predicts token i + 1: only the answer's tokens are targets
            targets = ([-100] * (len(p) - 1) + list(a) + [-100])[:len(seq)]
            out.append(Example(seq, targets=targets))
    out = [e for e in out if any(t != -100 for t in e.targets)]
    if not out:
        raise EvalError(f"{where}: every text of {task.file} is too short to predict a token from; give longer texts")
    return out


def batches(examples: list[Example], batch_size: int, pad: int) -> list[dict[str, Any]]:
    """Right-padded batches of similar length (as ``graft eval`` batches them)."""
    import torch

    from ..eval.classify import length_batches, right_pad

    out = []
    for group in length_batches([len(e.ids) for e in examples], batch_size):
        ids, mask = right_pad([examples[i].ids for i in group], pad, "cpu")
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if examples[group[0]].label is not None:
            batch["label"] = torch.tensor([examples[i].label for i in group])
        if examples[group[0]].targets is not None:
            targets = torch.full(ids.shape, -100, dtype=torch.long)
            for j, i in enumerate(group):
                targets[j, : len(examples[i].targets)] = torch.tensor(examples[i].targets)
            batch["targets"] = targets
        out.append(batch)
    return out


# -- the statistics ------------------------------------------------------------------------------

IN_OUT = ".__in_out__"  # marker key: this weight is stored (in, out) - GPT-2's Conv1D - not nn.Linear's (out, in)


def _conv1d():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return ()
    return (Conv1D,)


def linear_layers(model, keys: Iterable[str] | None = None) -> list[str]:
    """Names of the ``nn.Linear`` modules and transformers' ``Conv1D`` modules (GPT-2: a linear
    layer whose weight is stored (in, out)) whose ``<name>.weight`` is in ``keys``, when given."""
    from torch import nn

    kinds = (nn.Linear, *_conv1d())
    wanted = None if keys is None else set(keys)
    return [name for name, m in model.named_modules()
            if isinstance(m, kinds) and (wanted is None or f"{name}.weight" in wanted)]


def gram_matrices(model, batches: Iterable[dict[str, Any]], linear_names: list[str]) -> dict[str, tuple[Any, int]]:
    """``{name: (X^T X, N)}`` for each named ``nn.Linear``: ``X`` (N, in) stacks every input row the
    layer sees over the batches - one per non-padding token when the layer runs on (batch, tokens,
    in) activations, one per example for a pooled head - and the Gram matrix is summed in float64."""
    import torch

    mask_now: list[Any] = [None]
    grams: dict[str, Any] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def fn(module, args):
            x = args[0].detach()
            mask = mask_now[0]
            if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask]
            x = x.reshape(-1, x.shape[-1]).double()
            g = x.T @ x
            if name in grams:
                grams[name] += g
            else:
                grams[name] = g
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in linear_names]
    try:
        with torch.inference_mode():
            for batch in batches:
                mask_now[0] = batch["attention_mask"].bool()
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return {n: (grams[n], counts[n]) for n in linear_names if n in grams}


def fisher_diagonals(model, batches: Iterable[dict[str, Any]], mode: str = "expected") -> dict[str, Any]:
    """``{param: mean over examples of (d log p / d param)^2}`` (float32), the diagonal Fisher.

    Each example is run alone (a squared gradient of a batch sum is not a sum of squares). Which
    log-likelihood (``mode``):

    * ``"expected"`` (classification; the default there): the Fisher as Matena & Raffel (2022,
      "Merging Models with Fisher-Weighted Averaging", eq. 3) define and compute it for
      classifiers - the expectation over the model's own predictive distribution, taken exactly:
      ``F = 1/N sum_x sum_y p(y|x) (grad log p(y|x))^2``, one backward pass per label;
    * ``"empirical"``: the *empirical* Fisher, the squared gradient of the log-likelihood of the
      data's own answer - the row's label for a classifier, and for a causal LM the sum of the
      log-probabilities of the example's tokens (a generation task's answer tokens). The paper's
      expectation over every possible sequence is not computable, so causal-LM data use this.

    Parameters that never get a gradient are left out (the merge averages them plainly)."""
    import torch

    params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
    was = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    names = list(params)
    tensors = [params[n] for n in names]
    acc: dict[str, Any] = {}
    n_examples = 0

    def add(grads, scale: float) -> None:
        for name, g in zip(names, grads):
            if g is None:
                continue
            g = g.detach().float()
            if name in acc:
                acc[name].addcmul_(g, g, value=scale)  # one pass, no temporary: this loop is most of the cost
            else:
                acc[name] = torch.zeros_like(g).addcmul_(g, g, value=scale)

    try:
        with torch.enable_grad():
            for batch in batches:
                lengths = batch["attention_mask"].sum(dim=1).tolist()
                for j, length in enumerate(lengths):
                    ids = batch["input_ids"][j: j + 1, : int(length)]
                    out = model(input_ids=ids).logits.float()
                    if "label" in batch:
                        logp = torch.log_softmax(out[0], dim=-1)
                        if mode == "expected":
                            probs = logp.detach().exp().tolist()
                            for y, p in enumerate(probs):
                                add(torch.autograd.grad(logp[y], tensors, retain_graph=y < len(probs) - 1, allow_unused=True), p)
                        else:
                            add(torch.autograd.grad(logp[int(batch["label"][j])], tensors, allow_unused=True), 1.0)
                    else:
                        targets = batch["targets"][j, : int(length)]
                        keep = targets != -100
                        logp = torch.log_softmax(out[0][keep], dim=-1)
                        ll = logp.gather(1, targets[keep].unsqueeze(1)).sum()
                        add(torch.autograd.grad(ll, tensors, allow_unused=True), 1.0)
                    n_examples += 1
    finally:
        for n, p in params.items():
            p.requires_grad_(was[n])
    return {n: t.div_(max(1, n_examples)) for n, t in acc.items()}


# -- the pre-pass --------------------------------------------------------------------------------

class KeyStatistics(list):
    """One key's statistics, one tensor per model; ``in_out``: the key is a weight stored (in,
    out) (GPT-2's Conv1D) rather than ``nn.Linear``'s (out, in)."""

    in_out = False


@dataclass
class Statistics:
    """Per-model statistics of one merge: one safetensors file per method input (in the order of
    the method's inputs), read one key at a time. ``keyword`` is the method function's keyword
    they are passed under."""

    kind: str
    keyword: str
    files: list[Path]
    folder: Path | None = None
    info: list[dict[str, Any]] = field(default_factory=list)  # per model: examples, task, seconds
    _keys: list[set] = field(default_factory=list)

    def __post_init__(self):
        from safetensors import safe_open

        self._keys = []
        for f in self.files:
            with safe_open(str(f), "pt") as h:
                self._keys.append(set(h.keys()))

    def keys(self) -> set[str]:
        """The keys every model has statistics for."""
        return set.intersection(*self._keys) if self._keys else set()

    def for_key(self, key: str) -> "KeyStatistics | None":
        """The per-model float32 statistics of tensor ``key``; ``None`` unless every model has them."""
        if not all(key in k for k in self._keys):
            return None
        from safetensors import safe_open

        out = KeyStatistics()
        for f in self.files:
            with safe_open(str(f), "pt") as h:
                out.append(h.get_tensor(key).float())
        out.in_out = all(key + IN_OUT in k for k in self._keys)
        return out

    def cleanup(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


@dataclass(frozen=True)
class Prepass:
    kind: str
    keyword: str
    fn: Callable  # fn(model, batches, keys, block, kind) -> {key: tensor}
    joint: bool = False  # fn(plan, workdir, log) -> a Statistics-like result over all inputs at once


PREPASSES: dict[str, Prepass] = {}


def register_prepass(kind: str, keyword: str, joint: bool = False):
    """Register the per-model statistics of ``kind``: ``fn(model, batches, keys, block, head_kind)``
    returns ``{merge key: tensor}`` for one loaded model; the method gets them as ``keyword=[...]``.
    ``joint``: a pre-pass over all inputs together (adamerging, lorahub search the merged model):
    ``fn(plan, workdir, log)`` returns an object with :class:`Statistics`' ``kind``, ``keyword``,
    ``info``, ``for_key(key)`` and ``cleanup()``."""
    def decorate(fn):
        PREPASSES[kind] = Prepass(kind, keyword, fn, joint)
        return fn
    return decorate


@register_prepass("gram", "grams")
def _grams(model, batches, keys, block, head_kind):
    names = linear_layers(model, keys)
    if not names:
        raise ConfigError("regmean: no nn.Linear layer of the model is among the merged tensors, so the merge would be plain "
                          "averaging; merge with linear instead")
    out = {f"{n}.weight": (g / max(1, count)).float() for n, (g, count) in gram_matrices(model, batches, names).items()}
    import torch

    conv = _conv1d()
    for n in names:
        if conv and isinstance(model.get_submodule(n), conv) and f"{n}.weight" in out:
            out[f"{n}.weight{IN_OUT}"] = torch.ones(1)
    return out


@register_prepass("fisher", "fishers")
def _fishers(model, batches, keys, block, head_kind):
    mode = block.fisher or ("expected" if head_kind == "classification" else "empirical")
    wanted = set(keys)
    return {n: t for n, t in fisher_diagonals(model, batches, mode).items() if n in wanted}


def input_spec(path: str, base: str | None, index: int):
    """The ``graft eval`` model spec of one merge input: an HF folder, or the base with an adapter."""
    from ..eval.config import ModelSpec
    from .adapters import is_adapter

    if is_adapter(Path(path)):
        if not base:
            raise ConfigError(f"{path} is an adapter: its statistics need base_model (the model it was trained on)")
        return ModelSpec(name=f"input{index}", path=base, adapter=path)
    return ModelSpec(name=f"input{index}", path=path)


def load_input(path: str, base: str | None, index: int, kind: str):
    """One merge input in float32 on the CPU, loaded by ``graft eval``'s loader
    (:class:`graftkit.eval.models.LoadedModel`: the model and its own head), and its tokenizer."""
    from ..eval.models import load, load_tokenizer, tokenizer_folder

    spec = input_spec(path, base, index)
    return load(spec, kind), load_tokenizer(tokenizer_folder(spec))


def collect(plan, workdir: str | Path | None = None, log: Callable[[str], None] | None = None,
            folder: str | Path | None = None) -> Statistics:
    """Run the pre-pass of ``plan.spec.data`` over every method input, one model at a time; each
    model's statistics go to a temporary safetensors file (removed by :meth:`Statistics.cleanup`)
    in ``folder`` (created), or a fresh temporary folder in ``workdir``."""
    import gc
    import time

    from safetensors.torch import save_file

    from ..eval.models import pad_id

    cfg, spec = plan.config, plan.spec
    prepass = PREPASSES.get(spec.data)
    if prepass is None:
        raise ConfigError(f"merge_method {spec.name} asks for {spec.data!r} statistics, which no pre-pass computes "
                          f"(known: {', '.join(sorted(PREPASSES))})")
    if prepass.joint:
        return prepass.fn(plan, workdir, log)
    names = list(plan.inputs)
    base = cfg.base_model
    if folder is not None:
        folder = Path(folder)
        folder.mkdir(parents=True)
    else:
        folder = Path(tempfile.mkdtemp(prefix=".graft-stats-", dir=str(workdir) if workdir else None))
    files, info = [], []
    merged_keys = [k for k in plan.keys if plan.merged(k)]
    try:
        for i, path in enumerate(names):
            where = f"data for {path}"
            block = cfg.data_for(path)
            if block is None or block.task is None:
                raise ConfigError(f"merge_method {spec.name} needs data for every input; {path} has no data task")
            t0 = time.perf_counter()
            kind = model_kind(path, base)
            task = task_for(block, kind, where)
            loaded, tok = load_input(path, base, i, kind)
            model = loaded.model
            examples = encode(task, model, tok, where, loaded.own)
            stats = prepass.fn(model, batches(examples, block.batch_size or DEFAULT_BATCH, pad_id(tok)), merged_keys, block, kind)
            shapes = getattr(plan, "shapes", {})
            stats = {k: v.contiguous() for k, v in stats.items()}
            if not stats:
                raise GraftError(f"{where}: no {spec.data} statistics name a merged tensor (the model's parameter names do not "
                                 f"match the checkpoint's, e.g. {merged_keys[0] if merged_keys else '-'})")
            for k, v in stats.items():
                if spec.data == "fisher" and k in shapes and tuple(v.shape) != tuple(shapes[k]):
                    raise GraftError(f"{where}: the Fisher of {k} has shape {tuple(v.shape)} but the tensor is {tuple(shapes[k])}")
            f = folder / f"{i}.safetensors"
            save_file(stats, str(f), metadata={"kind": spec.data, "input": str(path), "examples": str(len(examples))})
            info.append({"input": str(path), "task": task.name, "file": str(task.file), "examples": len(examples),
                         "tensors": len(stats), "seconds": round(time.perf_counter() - t0, 2)})
            if log is not None:
                log(f"{spec.data} statistics of {path}: {len(examples)} examples of {task.file}, {len(stats)} tensors "
                    f"({info[-1]['seconds']:.1f} s)")
            files.append(f)
            del model, loaded, stats
            gc.collect()
        return Statistics(spec.data, prepass.keyword, files, folder, info)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


_REUSE: list[dict] = []  # the open reuse_statistics() scopes, innermost last: key -> statistics


def _reuse_key(plan):
    """What a per-model pre-pass depends on: its kind, the inputs, their data and the merged
    tensors - not the method's parameters, which a search varies. ``None``: never reused (a joint
    pre-pass may depend on the parameters)."""
    prepass = PREPASSES.get(plan.spec.data)
    if prepass is None or prepass.joint:
        return None
    cfg = plan.config
    blocks = []
    for p in plan.inputs:
        block = cfg.data_for(p)
        blocks.append(json.dumps(block.model_dump() if block is not None else None, sort_keys=True, default=str))
    return (plan.spec.data, tuple(plan.inputs), cfg.base_model, tuple(blocks), tuple(k for k in plan.keys if plan.merged(k)))


@contextlib.contextmanager
def reuse_statistics() -> Iterator[None]:
    """Within this scope, merges that need the same statistics (a search over a data-aware
    method's parameters) compute them once; their files are removed when the scope ends."""
    scope: dict = {}
    _REUSE.append(scope)
    try:
        yield
    finally:
        _REUSE.remove(scope)
        for stats in scope.values():
            stats.cleanup()


@contextlib.contextmanager
def statistics(plan, workdir: str | Path | None = None, log: Callable[[str], None] | None = None,
               target: str | Path | None = None) -> Iterator[Statistics | None]:
    """``plan.statistics`` set for the duration of a merge (``None`` for a method without data);
    the temporary files are removed afterwards, whatever happens (inside a
    :func:`reuse_statistics` scope: when the scope ends). With ``target`` (the output folder)
    they are written to a staging sibling of it (:func:`graftkit.outputs.stage_path`), which the
    next run for that output removes if this process is killed."""
    if getattr(plan.spec, "data", None) is None:
        yield None
        return
    key = _reuse_key(plan) if _REUSE else None
    scope = _REUSE[-1] if key is not None else None
    stats = scope.get(key) if scope is not None else None
    if stats is None:
        # kept statistics outlive this merge's output folder's parent (a search's staging folder): system temp
        if scope is None and target is not None:
            from ..outputs import stage_path

            stats = collect(plan, log=log, folder=stage_path(target))
        else:
            stats = collect(plan, None if scope is not None else workdir, log)
        if scope is not None:
            scope[key] = stats
    plan.statistics = stats
    try:
        yield stats
    finally:
        plan.statistics = None
        if scope is None:
            stats.cleanup()


def describe_data(cfg) -> list[str]:
    """``graft merge --dry-run`` lines for the data block."""
    if cfg.data is None and not any(m.data is not None for m in cfg.models):
        return []
    lines = []
    for m in cfg.models:
        block = cfg.data_for(m.model)
        if block is not None:
            task = block.task if isinstance(block.task, str) else json.dumps(block.task, default=str)
            lines.append(f"data          {m.model}: {block.examples or DEFAULT_EXAMPLES} examples of {task}")
    return lines
