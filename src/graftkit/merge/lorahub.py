"""LoRAHub: a gradient-free search of the combination weights of several LoRA adapters.

Huang et al. 2023, "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition"
(arXiv:2307.13269). Given LoRA adapters ``(A_i, B_i)`` of one base model and ``k`` labelled
examples of a task, the composed adapter is, per target,

    A = sum_i w_i A_i,    B = sum_i w_i s_i B_i

(the paper's element-wise composition of the LoRA modules; ``s_i`` is adapter i's own scaling
``alpha / r`` (``alpha / sqrt(r)`` for rsLoRA), folded into ``B`` so adapters trained with
different alphas compose as their deltas do; with one common scaling it is the paper's
``s (sum w_i B_i)(sum w_i A_i)``). The composed delta ``B A`` is quadratic in ``w``: ``w`` and ``-w``
give the same adapter, so the weight a LoRA gets is ``|w_i|``. An adapter without a target contributes zero there; the
adapters must share the rank of every target they share.

``w`` minimises ``L(w) + l1 * sum_i |w_i|`` - the mean cross-entropy of the adapted model on the
data block's labelled examples (classification: of the gold label through the task's head; causal
LM: of the answer tokens after the prompt) plus the paper's L1 penalty (``l1`` 0.05; the paper's
equation sums ``|w_i|``, its released code divides that sum by the number of adapters: set
``l1: 0.05 / n`` for the code's value). The search is CMA-ES (the ``cma`` package; the paper uses
Nevergrad's NGOpt, which picks a CMA-type search at this size) from ``w = 0`` (the paper's start)
with step size ``sigma`` inside ``[-1.5, 1.5]`` (the paper's bounds), for ``budget`` evaluations
(the paper's 40). The uniform combination ``w_i = 1/n`` is injected into the first generation, so
the result - the best point evaluated - is never worse on the objective than the uniform mix.
Seeded (the config's ``seed``): the same inputs and seed give the same weights.

Cost: ``budget`` forward passes over the ``k`` examples, no backward; memory one model.

Output: ``output: adapter`` writes the composed LoRA as a native graftkit adapter (rank = the
inputs' rank, ``lora_alpha = r`` since the scalings are folded in), loadable like any adapter;
``output: model`` (the default) writes the base with the composed LoRA folded in, through the
normal streaming merge engine (:func:`lorahub` per tensor). Either way the weights, the
objective of the uniform mix and of the result, and the search settings are recorded
(``adapter.json``'s ``merge`` entry / ``graft_provenance.json``). mergekit has no such method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ._common import register

BOUND = 1.5  # the paper's search box [-1.5, 1.5]
_TARGETS = {"classification": "the gold label", "generation": "the answer tokens", "perplexity": "every next token"}


def check(cfg) -> None:
    """Config-time refusals (also ``--dry-run`` and a study's recipe check): an existing input that
    is not an adapter folder (a full model) cannot be composed factor by factor."""
    from pathlib import Path

    from ..errors import ConfigError
    from .adapters import is_adapter

    for m in cfg.models:
        if m.model != cfg.base_model and Path(m.model).exists() and not is_adapter(m.model):
            raise ConfigError(f"lorahub combines LoRA adapters, but {m.model} is a full model; give LoRA adapter folders as models "
                              "(full models: use adamerging or task_arithmetic)")


@register("lorahub", global_params=("budget", "l1", "sigma", "batch_size"), paper="arXiv:2307.13269", data="lorahub",
          check=check)
def lorahub(base, deltas, *, composed=None, budget: int = 40, l1: float = 0.05, sigma: float = 0.5, batch_size: int = 16):
    """``base + B A`` of the composed LoRA for this tensor (``composed``: its dense delta, from the
    search; ``None`` for a tensor no adapter targets: the base). The task vectors ``deltas`` of the
    inputs are not used: a composition of factors is not a combination of deltas."""
    return base.clone() if composed is None else base + composed


class LoraTarget:
    """One target's factors across the adapters: kind, per-adapter ``A_i`` (r, in) and ``s_i B_i``
    (out, r), ``None`` where an adapter lacks the target."""

    def __init__(self, name: str, kind: str, a: list, b: list):
        self.name, self.kind, self.a, self.b = name, kind, a, b

    @property
    def rank(self) -> int:
        return next(x.shape[0] for x in self.a if x is not None)

    def compose(self, w: Sequence[float]):
        """``(A, B)`` of the weighted composition (float32)."""
        import torch

        a = sum(float(wi) * x for wi, x in zip(w, self.a) if x is not None)
        b = sum(float(wi) * x for wi, x in zip(w, self.b) if x is not None)
        return torch.as_tensor(a), torch.as_tensor(b)

    def delta(self, w: Sequence[float], shape) -> Any:
        from ..layers import from_matrix

        a, b = self.compose(w)
        return from_matrix(self.kind, b @ a, shape)


def lora_targets(sources: list, paths: list[str]) -> dict[str, LoraTarget]:
    """The targets of LoRA adapter sources (:class:`~graftkit.merge.adapters.AdapterSource`), checked:
    every input a plain LoRA (not DoRA), one layer kind and one rank per target."""
    from ..errors import ConfigError
    from ..methods import method_named
    from .adapters import AdapterSource

    for s, p in zip(sources, paths):
        if not isinstance(s, AdapterSource) or not method_named(s.method).low_rank_factors:
            what = f"a {s.method} adapter" if isinstance(s, AdapterSource) else "a full model"
            raise ConfigError(f"lorahub combines LoRA adapters, but {p} is {what}; give LoRA adapter folders as models "
                              "(full models: use adamerging or task_arithmetic)")
        if any(f[4] is not None for f in s.targets.values()):
            raise ConfigError(f"lorahub combines plain LoRA factors, but {p} is a DoRA adapter (its magnitude vector does not "
                              "compose); use adamerging or task_arithmetic on DoRA inputs")
    names = sorted({n for s in sources for n in s.targets})
    out = {}
    for name in names:
        kinds = {s.targets[name][0] for s in sources if name in s.targets}
        if len(kinds) > 1:
            raise ConfigError(f"lorahub: the adapters disagree on the layer kind of {name} ({', '.join(sorted(kinds))})")
        a, b, ranks = [], [], {}
        for s, p in zip(sources, paths):
            if name not in s.targets:
                a.append(None)
                b.append(None)
                continue
            _kind, fa, fb, scaling, _mag = s.targets[name]
            ranks[p] = fa.shape[0]
            a.append(fa.float())
            b.append(fb.float() * float(scaling))
        if len(set(ranks.values())) > 1:
            shown = ", ".join(f"{p}: r={r}" for p, r in ranks.items())
            raise ConfigError(f"lorahub composes A and B factor by factor, so the adapters need one rank per target; {name} has "
                              f"{shown} - train them with one r (or merge them with task_arithmetic)")
        out[name] = LoraTarget(name, kinds.pop(), a, b)
    return out


@dataclass
class SearchResult:
    weights: list[float]
    objective: float
    loss: float
    uniform_objective: float
    evaluations: int
    history: list[dict]


def search(objective: Callable[[Sequence[float]], float], n: int, *, budget: int = 40, l1: float = 0.05, sigma: float = 0.5,
           seed: int = 0) -> SearchResult:
    """Minimise ``objective(w) + l1 * sum|w|`` over ``w`` in ``[-1.5, 1.5]^n`` with CMA-ES from 0,
    the uniform ``1/n`` injected first; the best point evaluated wins (ties: the first)."""
    import cma
    import numpy as np

    history: list[dict] = []

    def score(w) -> float:
        w = [float(x) for x in np.clip(np.asarray(w, dtype=np.float64), -BOUND, BOUND)]
        loss = float(objective(w))
        total = loss + l1 * sum(abs(x) for x in w)
        history.append({"weights": w, "loss": loss, "objective": total})
        return total

    uniform = [1.0 / n] * n
    if n == 1:  # CMA-ES needs two dimensions; one weight is a line search on the same budget
        grid = np.linspace(-BOUND, BOUND, max(2, budget - 1))
        for w in [uniform, *([float(x)] for x in grid)]:
            score(w)
    else:
        options = {"bounds": [-BOUND, BOUND], "seed": int(seed) % (2**31 - 2) + 1, "maxfevals": budget, "verbose": -9,
                   "verb_log": 0, "verb_disp": 0}
        es = cma.CMAEvolutionStrategy([0.0] * n, sigma, options)
        es.inject([uniform], force=True)
        while len(history) < budget and not es.stop():
            xs = es.ask()
            xs = xs[: budget - len(history)] if len(history) + len(xs) > budget else xs
            values = [score(x) for x in xs]
            if len(values) < es.popsize:
                break
            es.tell(xs, values)
    best = min(range(len(history)), key=lambda i: (history[i]["objective"], i))
    first_uniform = next(h for h in history if h["weights"] == uniform)
    h = history[best]
    return SearchResult(h["weights"], h["objective"], h["loss"], first_uniform["objective"], len(history), history)


# -- the pre-pass over the merge config's data block -------------------------------------------------

def batch_loss(logits, labels):
    """Mean cross-entropy: class logits (B, C) against ids (B,), or causal-LM logits (B, T, V) against
    per-position targets (B, T) (-100: no target; position t predicts token t + 1, as
    :func:`graftkit.merge.data.encode` lays them out) - the mean over the batch's target tokens."""
    import torch

    if logits.dim() == 2:
        return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="mean")
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100, reduction="mean")


class Composed:
    """The pre-pass result handed to the per-key merge (the :class:`graftkit.merge.data.Statistics`
    interface): ``for_key(key)`` is the composed LoRA's dense delta of that tensor (``None`` where no
    adapter has a target)."""

    kind = "lorahub"
    keyword = "composed"

    def __init__(self, targets: dict[str, LoraTarget], shapes: dict, weights: list[float], info: dict):
        self.targets, self.shapes, self.weights = targets, shapes, weights
        self.info = [info]

    def keys(self) -> set[str]:
        return set(self.targets)

    def for_key(self, key: str):
        t = self.targets.get(key)
        return None if t is None else t.delta(self.weights, self.shapes[key])

    def factors(self) -> dict[str, tuple]:
        """``{target: (kind, A, B)}`` of the composition (scaling folded into B)."""
        return {name: (t.kind, *t.compose(self.weights)) for name, t in self.targets.items()}

    def cleanup(self) -> None:
        pass


def collect(plan, workdir=None, log: Callable[[str], None] | None = None) -> Composed:
    """Search the combination weights of ``plan``'s LoRA inputs on its data block."""
    import time

    import torch

    from .adamerging import open_base, run_model, streams_for
    from .compute import read_input

    t0 = time.perf_counter()
    cfg, spec = plan.config, plan.spec
    settings = {name: cfg.parameters.get(name, default) for name, default in spec.global_params.items()}
    budget, l1, sigma = int(settings["budget"]), float(settings["l1"]), float(settings["sigma"])
    if budget < 1 or l1 < 0 or not sigma > 0:
        from ..errors import ConfigError

        raise ConfigError(f"lorahub: budget {budget}, l1 {l1}, sigma {sigma}: the budget must be >= 1, l1 >= 0 and sigma > 0")
    sources = [plan.ckpts[p] for p in plan.inputs]
    targets = lora_targets(sources, list(plan.inputs))
    loaded, tok, kind = open_base(plan, spec.name)
    model = loaded.model
    params = dict(model.named_parameters())
    missing = [name for name in targets if name not in params]
    if missing:
        from ..errors import ConfigError

        raise ConfigError(f"lorahub: the adapters adapt {missing[0]}, which is not a parameter of the model loaded from "
                          f"{cfg.base_model}; the adapters were made for another model")
    streams = streams_for(plan, loaded, tok, kind, spec.name, int(settings["batch_size"]), labelled=True)
    bases = {name: read_input(plan, plan.base, name).float() for name in targets}
    shapes = {name: tuple(plan.shapes[name]) for name in targets}
    examples = sum(s.examples for s in streams)

    def objective(w) -> float:
        """The mean over the tasks of the mean cross-entropy over their examples."""
        with torch.no_grad():
            merged = {name: bases[name] + t.delta(w, shapes[name]) for name, t in targets.items()}
            per_task = []
            for s in streams:
                total = n = 0.0
                for b in s.batches:
                    rows = b.inputs["input_ids"].shape[0]
                    total += float(batch_loss(run_model(model, merged, b), b.labels)) * rows
                    n += rows
                per_task.append(total / max(n, 1))
        return sum(per_task) / len(per_task)

    seed = cfg.seed if cfg.seed is not None else 0
    result = search(objective, len(sources), budget=budget, l1=l1, sigma=sigma, seed=seed)
    info = {"weights": dict(zip(plan.inputs, result.weights)), "loss": result.loss, "objective": result.objective,
            "uniform_objective": result.uniform_objective, "evaluations": result.evaluations, "budget": budget,
            "l1": l1, "sigma": sigma, "seed": seed, "search": "CMA-ES (cma), start w = 0, bounds [-1.5, 1.5], uniform 1/n injected",
            "loss_kind": "cross-entropy of " + " and ".join(sorted({_TARGETS[s.task.kind] for s in streams})),
            "data": [{"task": s.name, "examples": s.examples} for s in streams], "seconds": round(time.perf_counter() - t0, 2)}
    if log is not None:
        shown = ", ".join(f"{w:+.3f}" for w in result.weights)
        log(f"lorahub: weights [{shown}], objective {result.objective:.4f} (uniform mix {result.uniform_objective:.4f}) "
            f"after {result.evaluations} evaluations on {examples} examples ({info['seconds']:.1f} s)")
    return Composed(targets, shapes, result.weights, info)


def _register() -> None:
    from .data import register_prepass

    register_prepass("lorahub", Composed.keyword, joint=True)(collect)


_register()
