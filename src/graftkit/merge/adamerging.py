"""AdaMerging: task arithmetic whose coefficients are learned on unlabeled data.

Yang et al. 2024, "AdaMerging: Adaptive Model Merging for Multi-Task Learning" (ICLR 2024,
arXiv:2310.02575). The merged model is

    theta(key) = theta_0(key) + sum_k lambda_k[g(key)] * tau_k(key),    tau_k = theta_k - theta_0

with one coefficient per task vector (``granularity: task``, task-wise AdaMerging) or one per task
vector and parameter group (layer-wise AdaMerging): ``granularity: tensor`` gives every tensor its
own coefficients, as the authors' released code does (their "layer" is each parameter tensor of the
network); ``granularity: layer`` shares them within a transformer block (the tensors outside the
blocks - embeddings, final norm - form one more group). Every coefficient starts at ``init``
(the paper's 0.3) and is clamped to ``[0, 1]`` in the forward, as the authors' code does.

The coefficients minimise the Shannon entropy of the merged model's predictions on unlabeled
inputs (the merge config's ``data:`` block; the rows' labels are not used, though ``graft eval``'s
task loader still checks that a classification file has them): for a
sequence-classification model the entropy of the class probabilities (through each task's own
head when the tasks have their own heads, as in the paper); for a causal LM the entropy of the
next-token distribution at the end of each prompt (a generation task: the position that predicts
the answer's first token - the answer itself is never used; a text task: after its last token). Each step takes one batch of every task and minimises the sum of their
mean entropies with Adam (``lr``, paper 1e-3) for ``steps`` steps (paper: 500; default 300).

The forward runs with :func:`torch.func.functional_call` over merged parameters computed from the
coefficients; the model itself is loaded once (the base) and never copied. Each merged tensor is
an autograd node of its own (:func:`_mix_function`) that keeps no task vector for the backward: it reads
them again from the inputs (``dL/dlambda_k = <dL/dtheta, tau_k>``), so a step holds one merged
copy of the model plus activations, whatever the number of inputs. When all task vectors fit in
``CACHE_BYTES`` they are read once and kept in memory instead (the same values, faster steps).

After the search the learned coefficients are written with the model: every tensor is merged by
:func:`adamerging` (task arithmetic with that tensor's coefficients) through the normal streaming
engine, and ``graft_provenance.json`` records the coefficients, the entropy before and after, and
the settings. mergekit has no such method.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ._common import column, register

GRANULARITIES = ("task", "layer", "tensor")
CACHE_BYTES = 1 << 30  # keep the task vectors in memory below this (float32 bytes of all of them)
_LAYER = re.compile(r"\.(?:layers|h|layer|blocks)\.(\d+)\.")


def check(cfg) -> None:
    """Config-time refusals (also ``--dry-run`` and a study's recipe check)."""
    groups_for([], str(cfg.parameters.get("granularity", "tensor")))


@register("adamerging", global_params=("granularity", "init", "steps", "lr", "batch_size"), paper="arXiv:2310.02575",
          data="adamerging", check=check)
def adamerging(base, deltas, *, coefficients=None, granularity: str = "tensor", init: float = 0.3, steps: int = 300,
               lr: float = 1e-3, batch_size: int = 16):
    """``base + sum_k c_k tau_k`` with this tensor's learned ``coefficients`` (one per model, from
    the search); the other parameters configure the search (without coefficients: ``init``)."""
    lam = [init] * deltas.shape[0] if coefficients is None else [float(v) for v in coefficients]
    return base + (deltas * column(lam, deltas)).sum(dim=0)


# -- the coefficient search ----------------------------------------------------------------------

def groups_for(keys: Sequence[str], granularity: str) -> tuple[list[int], list[str]]:
    """The coefficient group of every key, and the groups' names."""
    if granularity not in GRANULARITIES:
        from ..errors import ConfigError

        raise ConfigError(f"adamerging: granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
    if granularity == "task":
        return [0] * len(keys), ["all"]
    if granularity == "tensor":
        return list(range(len(keys))), list(keys)
    names: list[str] = []
    index: dict[str, int] = {}
    out = []
    for k in keys:
        m = _LAYER.search(k)
        name = f"layer {int(m.group(1))}" if m else "outside the layers"
        if name not in index:
            index[name] = len(names)
            names.append(name)
        out.append(index[name])
    return out, names


def _mix_function():
    """``base + lam @ deltas`` as an autograd function that reads the deltas again in its backward
    instead of saving them (see the module docstring)."""
    import torch as T

    class Mix(T.autograd.Function):
        @staticmethod
        def forward(ctx, lam, base, read):
            deltas = read()
            ctx.read = read
            return base + T.tensordot(lam, deltas, dims=1)

        @staticmethod
        def backward(ctx, grad):
            deltas = ctx.read()
            return deltas.reshape(deltas.shape[0], -1) @ grad.reshape(-1), None, None

    return Mix


@dataclass
class Batch:
    """One batch of unlabeled inputs: the model's keyword inputs, the parameters that replace the
    model's own for it (a task's classifier head; may be empty) and, for a causal LM, the position
    whose next-token distribution counts in each row (``None``: class logits)."""

    inputs: dict
    head: dict
    positions: Any = None
    labels: Any = None  # LoRAHub's loss: class ids (B,), or token targets (B, T) with -100 where none


def entropy(logits, positions=None):
    """Mean Shannon entropy (nats) of the predicted distributions: class logits ``(B, C)``, or
    causal-LM logits ``(B, T, V)`` read at ``positions`` (one index per row)."""
    import torch as T

    if positions is not None:
        logits = logits[T.arange(logits.shape[0]), positions]
    logp = T.log_softmax(logits.to(T.promote_types(logits.dtype, T.float32)), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


class TaskVectors:
    """The merged tensors as functions of the coefficients.

    ``base(key)`` gives the base tensor, ``delta(key)`` the ``(n, *shape)`` float32 task vectors;
    both are read from the merge inputs on request (kept in memory when they fit the cache)."""

    def __init__(self, keys: Sequence[str], base: Callable, delta: Callable, n: int, cache: bool):
        self.keys = list(keys)
        self.n = n
        self._base = base
        self._delta = delta
        self.cached = cache
        self.bases = {k: base(k) for k in self.keys}
        self.deltas = {k: delta(k) for k in self.keys} if cache else {}
        # a tensor no input changes (the embeddings of LoRA inputs) is the base whatever the
        # coefficients: left out of the graph, it costs no mix and no weight gradient
        self.unchanged = {k for k, d in self.deltas.items() if not bool(d.any())}
        for k in self.unchanged:
            del self.deltas[k]
        self.mix = _mix_function()

    def read(self, key: str):
        return self.deltas[key] if self.cached else self._delta(key)

    def params(self, lam, groups: Sequence[int]) -> dict:
        """Merged tensors for coefficients ``lam`` (G, n), differentiable in ``lam``."""
        return {k: self.bases[k] if k in self.unchanged else self.mix.apply(lam[g], self.bases[k], (lambda k=k: self.read(k)))
                for k, g in zip(self.keys, groups)}


def clamp(raw):
    return raw.clamp(0.0, 1.0)


def run_model(model, params: dict, batch: Batch):
    from torch.func import functional_call

    return functional_call(model, {**params, **batch.head}, args=(), kwargs=batch.inputs).logits


def mean_entropy(model, vectors: TaskVectors, lam, groups, streams: list[list[Batch]]) -> float:
    """The mean entropy over every batch of every stream at coefficients ``lam`` (no gradient)."""
    import torch as T

    with T.no_grad():
        params = vectors.params(clamp(lam), groups)
        values = [float(entropy(run_model(model, params, b), b.positions)) for s in streams for b in s]
    return sum(values) / max(1, len(values))


def learn(model, vectors: TaskVectors, groups: Sequence[int], n_groups: int, streams: list[list[Batch]], *,
          init: float = 0.3, steps: int = 300, lr: float = 1e-3, progress: Callable[[int, float], None] | None = None) -> dict:
    """Minimise the summed per-stream entropy over the coefficients; returns the clamped
    coefficients ``(G, n)`` and the mean entropy on all batches before and after."""
    import torch as T

    dtype = next(iter(vectors.bases.values())).dtype if vectors.bases else T.float32
    raw = T.full((n_groups, vectors.n), float(init), dtype=dtype, requires_grad=True)
    before = mean_entropy(model, vectors, raw.detach(), groups, streams)
    opt = T.optim.Adam([raw], lr=lr)
    trace = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        params = vectors.params(clamp(raw), groups)
        loss = sum(entropy(run_model(model, params, s[step % len(s)]), s[step % len(s)].positions) for s in streams)
        loss.backward()
        opt.step()
        del params
        trace.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, trace[-1])
    lam = clamp(raw.detach())
    after = mean_entropy(model, vectors, lam, groups, streams)
    return {"lambdas": lam, "entropy_before": before, "entropy_after": after, "loss_trace": trace}


# -- the pre-pass over the merge config's data block -------------------------------------------------

@dataclass
class Stream:
    """One task's batches for the merged model: from the data block of one input (each input's own
    task when they differ), run through that input's classifier head."""

    name: str
    task: Any
    batches: list
    examples: int


def head_keys_excluded(plan, model) -> bool:
    """Whether the model's classifier head is left out of the merge (``exclude``), so that each
    task is read out with its own expert's head, as in the papers' multi-task setting."""
    from ..eval.models import head_keys

    keys, _ = head_keys(model)
    merged = set(plan.keys)
    return not any(k in merged for k in keys)


def open_base(plan, method: str):
    """The base model (as ``graft eval`` loads it, float32) with its head kind and tokenizer; every
    input's data task is checked against that kind first (before a model is loaded for nothing)."""
    from ..errors import ConfigError
    from .data import load_input, model_kind, task_for

    cfg = plan.config
    base = cfg.base_model
    kind = model_kind(base)
    for path in plan.inputs:
        block = cfg.data_for(path)
        if block is None or block.task is None:
            raise ConfigError(f"merge_method {method} needs data for every input; {path} has no data task "
                              "(add 'data: {task: TASK_FILE_OR_SPEC, examples: N}')")
        task_for(block, kind, f"{method} data for {path}")
    loaded, tok = load_input(base, None, 0, kind)
    return loaded, tok, kind


def streams_for(plan, loaded, tok, kind: str, method: str, batch_size: int, labelled: bool) -> list[Stream]:
    """The data block of every input as batches, one stream per distinct task (inputs sharing one
    block share its stream); each carries the head that reads it out (the input's own classifier
    when heads are excluded from the merge, else the merged model's own)."""
    import json as _json

    from ..errors import ConfigError
    from ..eval.models import pad_id, read_head
    from .data import DEFAULT_BATCH, batches, encode, task_for

    cfg, model = plan.config, loaded.model
    own_heads = kind == "classification" and head_keys_excluded(plan, model)
    seen: dict[str, Stream] = {}
    out: list[Stream] = []
    for path in plan.inputs:
        block = cfg.data_for(path)
        if block is None or block.task is None:
            raise ConfigError(f"merge_method {method} needs data for every input; {path} has no data task "
                              "(add 'data: {task: TASK_FILE_OR_SPEC, examples: N}')")
        where = f"{method} data for {path}"
        task = task_for(block, kind, where)
        ident = _json.dumps([block.model_dump(mode="json"), path if own_heads else None], sort_keys=True, default=str)
        if ident in seen:
            continue
        head = None
        if kind == "classification":
            head = read_head(path, model) if own_heads else loaded.own
        examples = encode(task, model, tok, where, head)
        pad = pad_id(tok)
        rows = batches(examples, block.batch_size or batch_size or DEFAULT_BATCH, pad)
        head_tensors = {k: v.float() for k, v in head.tensors.items()} if (head is not None and own_heads) else {}
        prepared = []
        for b in rows:
            inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
            positions = None
            if kind != "classification":
                if task.kind == "generation":  # the position that predicts the answer's first token
                    positions = (b["targets"] != -100).int().argmax(dim=1)
                else:  # text: the distribution after its last token
                    positions = b["attention_mask"].sum(dim=1) - 1
            batch = Batch(inputs, head_tensors, positions)
            if labelled:
                batch.labels = b["label"] if kind == "classification" else b["targets"]
            prepared.append(batch)
        stream = Stream(f"{task.name} ({task.file})", task, prepared, len(examples))
        seen[ident] = stream
        out.append(stream)
    return out


def forward_keys(plan, model) -> list[str]:
    """The merged float tensors that are parameters of the loaded model (a tied copy counts once)."""
    from ..errors import ConfigError

    params = dict(model.named_parameters())
    keys = [k for k in plan.keys if plan.merged(k) and k in params]
    if not keys:
        some = next(iter(plan.keys), "-")
        raise ConfigError(f"none of the merged tensors (e.g. {some}) is a parameter of the model loaded from "
                          f"{plan.config.base_model} (e.g. {next(iter(params), '-')}); the checkpoint's names do not match its architecture")
    return keys


class Learned:
    """The pre-pass result handed to the per-key merge (the :class:`graftkit.merge.data.Statistics`
    interface): ``for_key(key)`` gives that tensor's coefficients, one per input."""

    kind = "adamerging"
    keyword = "coefficients"

    def __init__(self, keys: list[str], groups: list[int], lambdas, info: dict):
        self.table = {k: [float(x) for x in lambdas[g]] for k, g in zip(keys, groups)}
        self.info = [info]

    def keys(self) -> set[str]:
        return set(self.table)

    def for_key(self, key: str):
        return self.table.get(key)

    def cleanup(self) -> None:
        pass


def read_vectors(plan, keys: list[str]) -> TaskVectors:
    """The task vectors of ``keys`` as the merge reads them (:func:`graftkit.merge.compute.read_input`)."""
    import torch as T

    from .compute import read_input

    def base(k):
        return read_input(plan, plan.base, k).float()

    def delta(k):
        b = base(k)
        return T.stack([read_input(plan, p, k).float() - b for p in plan.inputs])

    n = len(plan.inputs)
    size = 4 * n * sum(math.prod(plan.shapes[k]) for k in keys)
    return TaskVectors(keys, base, delta, n, cache=size <= CACHE_BYTES)


def collect(plan, workdir=None, log: Callable[[str], None] | None = None) -> Learned:
    """Learn the coefficients of ``plan`` (an adamerging merge) on its data block."""
    import time

    import torch as T

    t0 = time.perf_counter()
    cfg, spec = plan.config, plan.spec
    settings = {name: cfg.parameters.get(name, default) for name, default in spec.global_params.items()}
    granularity = str(settings["granularity"])
    steps, lr, init = int(settings["steps"]), float(settings["lr"]), float(settings["init"])
    if steps < 0 or not lr > 0 or not 0 <= init <= 1:
        from ..errors import ConfigError

        raise ConfigError(f"adamerging: steps {steps}, lr {lr}, init {init}: steps must be >= 0, lr > 0 and init in [0, 1] "
                          "(the coefficients are clamped to [0, 1])")
    all_keys = [k for k in plan.keys if plan.merged(k)]
    groups_all, names = groups_for(all_keys, granularity)
    loaded, tok, kind = open_base(plan, spec.name)
    model = loaded.model
    streams = streams_for(plan, loaded, tok, kind, spec.name, int(settings["batch_size"]), labelled=False)
    keys = forward_keys(plan, model)
    index = {k: i for i, k in enumerate(all_keys)}
    vectors = read_vectors(plan, keys)
    groups = [groups_all[index[k]] for k in keys]
    every = 0 if steps < 10 else max(1, steps // 10)

    def report(step, value):
        if log is not None and every and step % every == 0:
            log(f"adamerging step {step}/{steps}: summed entropy {value:.4f}")

    with T.enable_grad():
        result = learn(model, vectors, groups, len(names), [s.batches for s in streams], init=init, steps=steps, lr=lr,
                       progress=report)
    lam = result["lambdas"]
    info = {"granularity": granularity, "init": init, "steps": steps, "lr": lr, "optimizer": "Adam",
            "objective": "entropy of " + ("the class probabilities" if kind == "classification" else
                                          "the next-token distribution at the end of each prompt"),
            "entropy_before": result["entropy_before"], "entropy_after": result["entropy_after"],
            "inputs": list(plan.inputs),
            "coefficients": {name: [round(float(x), 6) for x in lam[g]] for g, name in enumerate(names)},
            "data": [{"task": s.name, "examples": s.examples} for s in streams],
            "cached_task_vectors": vectors.cached, "seconds": round(time.perf_counter() - t0, 2)}
    if log is not None:
        log(f"adamerging: entropy {result['entropy_before']:.4f} -> {result['entropy_after']:.4f} over {steps} steps "
            f"({len(names)} coefficient group(s) x {len(plan.inputs)} models, {info['seconds']:.1f} s)")
    return Learned(all_keys, groups_all, lam, info)


def _register() -> None:
    from .data import register_prepass

    register_prepass("adamerging", Learned.keyword, joint=True)(collect)


_register()
