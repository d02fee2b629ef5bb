"""What fine-tuning changed, tensor by tensor: norms, sparsity, ranks, spectra, intruders.

For a base ``theta_0`` and fine-tunes ``theta_i = theta_0 + delta_i`` this module streams the
checkpoints one tensor name at a time (inputs opened like the merge executor opens them, so a
LoRA/IA3 adapter folder is ``base + materialized delta``) and records per tensor

* ``norm = ||delta||_F`` and ``relative = ||delta||_F / ||theta_0||_F``;
* sparsity at thresholds ``t``: the share of entries with ``|delta| <= t`` (``t = 0``: exact zeros);
* for each 2-d delta, its singular values (float32 SVD of that one matrix), the stable rank
  ``||M||_F^2 / sigma_max^2`` and the effective rank of Roy & Vetterli (2007, "The effective
  rank: a measure of effective dimensionality"), ``exp(H(p))`` with ``p_i = sigma_i / sum sigma``;
* intruder dimensions of the fine-tuned matrix against the base (analysis/intruder.py).

Aggregates go by layer index and by module type, both read from the tensor name
(``model.layers.3.self_attn.q_proj.weight`` -> layer 3, module ``self_attn.q_proj``). Memory is
one base tensor, its singular vectors and one delta at a time; nothing is flattened across tensors.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

from ..errors import ConfigError, GraftError
from ..progress import counting_bar
from .against_base import Wording, open_against_base, read_against
from .intruder import EPSILON, TOP_K, left_singular_vectors, max_cosines

if TYPE_CHECKING:
    import torch

THRESHOLDS = (0.0, 1e-6, 1e-4, 1e-2)
_LAYER = re.compile(r"\.(\d+)\.")


class InspectError(GraftError):
    """The deltas of one inspection do not line up with their base (keys, shapes, values)."""


# -- pure math -----------------------------------------------------------------------------------
def _svals(m: "torch.Tensor") -> "torch.Tensor":
    import torch

    if m.dim() != 2:
        raise ValueError(f"a rank needs a matrix; got a tensor of shape {tuple(m.shape)}")
    return torch.linalg.svdvals(m.float())


def stable_rank_from(s: "torch.Tensor") -> float:
    """``sum sigma^2 / sigma_max^2`` from singular values (0 for a zero matrix)."""
    if s.numel() == 0 or float(s.max()) == 0.0:
        return 0.0
    s = s.double()
    return float((s * s).sum() / (s.max() ** 2))


def effective_rank_from(s: "torch.Tensor") -> float:
    """``exp(-sum p log p)``, ``p = sigma / sum sigma`` (0 for a zero matrix; ``0 log 0 = 0``)."""
    total = float(s.double().sum()) if s.numel() else 0.0
    if total == 0.0:
        return 0.0
    p = s.double() / total
    p = p[p > 0]
    return float(math.exp(float(-(p * p.log()).sum())))


def stable_rank(m: "torch.Tensor") -> float:
    """Stable rank ``||M||_F^2 / ||M||_2^2`` of a matrix: between 1 and its rank, 0 for a zero matrix."""
    return stable_rank_from(_svals(m))


def effective_rank(m: "torch.Tensor") -> float:
    """Effective rank (Roy & Vetterli 2007) of a matrix: the exponential of the Shannon entropy of its
    singular values normalised to sum 1; equals r for r equal nonzero singular values."""
    return effective_rank_from(_svals(m))


# Entries per slice of the two whole-tensor reductions below: 4M (32 MB in float64). A 0.5B model's
# embedding (136M entries) in one piece would cost another 1.1 GB for the float64 copy of the norm.
CHUNK = 1 << 22


def _slices(t: "torch.Tensor") -> Iterable["torch.Tensor"]:
    flat = t.reshape(-1)
    return (flat[i:i + CHUNK] for i in range(0, flat.numel(), CHUNK))


def frobenius_norm(t: "torch.Tensor") -> float:
    """``||t||_F`` accumulated in float64, one slice at a time (no float64 copy of the whole tensor)."""
    return math.sqrt(sum(float(part.double().square().sum()) for part in _slices(t)))


def sparsity_at(delta: "torch.Tensor", thresholds: Iterable[float]) -> dict[float, float]:
    """The share of entries with ``|delta| <= t`` for each threshold ``t`` (counted slice by slice)."""
    ts = [float(t) for t in thresholds]
    n = delta.numel()
    if not n:
        return {t: 1.0 for t in ts}
    counts = dict.fromkeys(ts, 0)
    for part in _slices(delta):
        a = part.abs()
        for t in ts:
            counts[t] += int((a <= t).sum())
    return {t: counts[t] / n for t in ts}


def layer_and_module(name: str) -> tuple[int | None, str]:
    """Layer index and module type from a tensor name. The first ``.N.`` component is the layer;
    the module type is what follows it, without the parameter's ``.weight`` (other parameter
    names such as ``.bias`` are kept, so biases aggregate apart from weights)."""
    m = _LAYER.search(name)
    rest = name[m.end():] if m else name
    if rest.endswith(".weight"):
        rest = rest[: -len(".weight")]
    return (int(m.group(1)) if m else None), rest


# -- streaming -----------------------------------------------------------------------------------
def _labels(deltas: Mapping[str, str | Path] | Iterable[str | Path]) -> dict[str, str]:
    if isinstance(deltas, Mapping):
        return {str(k): str(v) for k, v in deltas.items()}
    paths = [str(p) for p in deltas]
    parts = [Path(p).resolve().parts or (p,) for p in paths]
    # the shortest path tail that tells the inputs apart: experts/lora/bbc/adapter and experts/full/bbc/adapter
    # read as lora/bbc/adapter and full/bbc/adapter, not as adapter twice
    depth = [1] * len(paths)
    while True:
        names = ["/".join(x[-d:]) for x, d in zip(parts, depth)]
        clash = [i for i, nm in enumerate(names) if names.count(nm) > 1 and depth[i] < len(parts[i])]
        if not clash:
            break
        for i in clash:
            depth[i] += 1
    out: dict[str, str] = {}  # only the same path given twice still clashes
    for name, p in zip(names, paths):
        label, i = name, 2
        while label in out:
            label, i = f"{name}#{i}", i + 1
        out[label] = p
    return out


WORDING = Wording(
    role="delta", error=InspectError,
    hint="inspect fine-tunes of this one base, or --exclude the tensor if it is a task head (e.g. --exclude 'classifier.*')",
    empty="inspect --deltas needs at least one fine-tuned model or adapter folder",
    instead="pass the model it was trained on as --base",
    nothing_left="no tensors left to inspect: --exclude {patterns} removes every floating-point tensor of {base}")


def _tensor_stats(key: str, w0: "torch.Tensor", w: "torch.Tensor", thresholds: tuple[float, ...], base_u,
                  k: int, epsilon: float, base_norm: float) -> dict:
    import torch

    if torch.equal(w.float(), w0) and bool(torch.isfinite(w0).all()):
        # untouched (a LoRA's non-target, often the largest tensor: the embedding): no delta to allocate
        delta, norm, sparsity = None, 0.0, dict.fromkeys(map(float, thresholds), 1.0)
    else:
        delta = w.float() - w0
        if not bool(torch.isfinite(delta).all()):
            raise InspectError(f"tensor {key} holds NaN or Inf in the delta; the checkpoint is broken, re-train or re-export it")
        norm, sparsity = frobenius_norm(delta), sparsity_at(delta, thresholds)
    layer, module = layer_and_module(key)
    row = {"name": key, "layer": layer, "module": module, "shape": list(w0.shape), "numel": w0.numel(),
           "norm": norm, "base_norm": base_norm, "relative": (norm / base_norm) if base_norm > 0 else None,
           "sparsity": {str(t): v for t, v in sparsity.items()}}
    if w0.dim() == 2:
        if norm == 0.0:  # an untouched matrix (a LoRA's non-target): no spectrum, no intruder, no SVD to pay
            row.update(singular_values=[], stable_rank=0.0, effective_rank=0.0, intruders=0, max_cosines=[])
        else:
            s = torch.linalg.svdvals(delta)
            cos = max_cosines(base_u, w.float(), k)
            row.update(singular_values=s.tolist(), stable_rank=stable_rank_from(s), effective_rank=effective_rank_from(s),
                       intruders=sum(1 for c in cos if c < epsilon), max_cosines=cos)
    return row


def _aggregate(rows: list[dict], by: str, thresholds: tuple[float, ...]) -> list[dict]:
    groups: dict = {}
    for r in rows:
        groups.setdefault(r[by], []).append(r)
    out = []
    for key in sorted(groups, key=lambda g: (g is None, g if g is not None else 0) if by == "layer" else str(g)):
        rs = groups[key]
        n = sum(r["numel"] for r in rs)
        d2 = sum(r["norm"] ** 2 for r in rs)
        b2 = sum(r["base_norm"] ** 2 for r in rs)
        mats = [r for r in rs if "stable_rank" in r and r["norm"] > 0]
        out.append({by: key, "tensors": len(rs), "numel": n, "norm": math.sqrt(d2),
                    "relative": math.sqrt(d2 / b2) if b2 > 0 else None,
                    "sparsity": {str(t): sum(r["sparsity"][str(t)] * r["numel"] for r in rs) / n if n else 1.0
                                 for t in thresholds},
                    "matrices": len(mats),
                    "stable_rank": (sum(r["stable_rank"] for r in mats) / len(mats)) if mats else None,
                    "effective_rank": (sum(r["effective_rank"] for r in mats) / len(mats)) if mats else None,
                    "intruders": sum(r.get("intruders", 0) for r in rs)})
    return out


def inspect_deltas(base: str | Path, deltas: Mapping[str, str | Path] | Iterable[str | Path], *,
                   thresholds: Iterable[float] = THRESHOLDS, top_k: int = TOP_K, epsilon: float = EPSILON,
                   exclude: Iterable[str] = (), similarity: bool = True, progress: bool = False) -> dict:
    """Delta statistics of every model in ``deltas`` against ``base`` (one streaming pass; the base's
    singular vectors are computed once per matrix and shared by all deltas), plus task-vector
    similarity and sign conflicts (analysis/similarity.py) when there are two or more deltas.

    Returns ``{"base", "thresholds", "top_k", "epsilon", "models": {name: {"path", "tensors",
    "by_layer", "by_module", "total"}}, "similarity": dict | None}``.
    """
    import torch

    thr = tuple(sorted({float(t) for t in thresholds}))
    if not thr or any(t < 0 or not math.isfinite(t) for t in thr):
        raise ConfigError(f"sparsity thresholds must be finite and >= 0, got {list(thresholds)}")
    if not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"top_k must be a positive integer (the paper uses 10), got {top_k!r}")
    if not (0 < float(epsilon) <= 1):
        raise ConfigError(f"epsilon is a cosine threshold in (0, 1] (the paper's default 0.5), got {epsilon!r}")
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    paths = _labels(deltas)
    base, base_ckpt, ckpts, keys = open_against_base(base, paths, patterns, WORDING)

    rows: dict[str, list[dict]] = {n: [] for n in paths}
    with counting_bar("delta statistics", len(keys), progress) as advance:
        for key in keys:
            w0 = base_ckpt.get(key).float()
            base_norm = frobenius_norm(w0)
            base_u = None
            for n, c in ckpts.items():
                w = read_against(c, key, w0, n, WORDING)
                if w0.dim() == 2 and base_u is None and not torch.equal(w.float(), w0):
                    base_u = left_singular_vectors(w0)
                rows[n].append(_tensor_stats(key, w0, w, thr, base_u, top_k, float(epsilon), base_norm))
                del w
            del w0, base_u
            advance()

    models = {}
    for n, rs in rows.items():
        total = _aggregate([{**r, "all": "all"} for r in rs], "all", thr)[0]
        total.pop("all")
        models[n] = {"path": paths[n], "tensors": rs, "by_layer": _aggregate(rs, "layer", thr),
                     "by_module": _aggregate(rs, "module", thr), "total": total}
    sim = None
    if similarity and len(paths) >= 2:
        from .similarity import task_vector_similarity

        sim = task_vector_similarity(base, paths, exclude=patterns, progress=progress)
    return {"base": str(base), "thresholds": list(thr), "top_k": top_k, "epsilon": float(epsilon),
            "models": models, "similarity": sim}


def delta_statistics(base: str | Path, model: str | Path, **kwargs) -> dict:
    """Statistics of one fine-tune (HF folder, safetensors file or adapter folder) against ``base``:
    the ``models`` entry of :func:`inspect_deltas` for it."""
    kwargs.setdefault("similarity", False)
    res = inspect_deltas(base, [model], **kwargs)
    return next(iter(res["models"].values()))
