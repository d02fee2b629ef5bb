"""How alike the task vectors of several fine-tunes of one base model are.

A fine-tune is ``theta_i = theta_0 + tau_i``; its task vector ``tau_i`` is the whole-model
delta (Ilharco et al. 2023, "Editing Models with Task Arithmetic"). For T experts this module
streams the checkpoints one tensor name at a time and accumulates, over every floating-point
tensor that is not excluded,

* the Gram matrix ``G_ij = <tau_i, tau_j>``; cosine similarity ``G_ij / sqrt(G_ii G_jj)``
  (0 when either norm is 0), task-vector norms ``sqrt(G_ii)``;
* sign conflicts: among the entries where ``tau_i`` and ``tau_j`` are both nonzero, the share
  whose signs are opposite. TIES-Merging (Yadav et al. 2023, "Resolving Interference When Merging
  Models") shows that such opposite-sign entries cancel each other in a plain sum and motivates
  electing one sign per parameter; a high share predicts interference in a merge.

Inputs are opened exactly as the merge executor opens them (analysis/against_base.py, shared with
``graft inspect --deltas``; :func:`graftkit.merge.plan.open_input`):
an HF model folder (sharded safetensors + index) or a LoRA/IA3 adapter folder (native or peft),
which becomes ``base + materialized delta`` one tensor at a time. Memory stays
O(experts x largest tensor) in float32; the Gram and count matrices are accumulated in float64
over row chunks small enough that float32 sign products stay exact integers.

Non-floating-point tensors (integer buffers such as ``position_ids``) carry no task vector and
are skipped; tensors matching an ``exclude`` glob (task heads of different shapes, e.g.
``classifier.*``) are skipped on purpose. Anything else that does not line up is an error.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

from ..errors import GraftError
from ..progress import counting_bar
from .against_base import Wording, open_against_base, read_against

if TYPE_CHECKING:
    import torch

# float32 sums of +-1/0 products are exact integers below 2**24; stay well under it
CHUNK = 1 << 22


class SimilarityError(GraftError):
    """The experts of a task-vector comparison do not line up with their base (keys, shapes, values)."""


# -- pure math (tensors in, tensors out; no I/O) -----------------------------------------------
def _chunks(deltas: "torch.Tensor", chunk: int) -> Iterable["torch.Tensor"]:
    flat = deltas.reshape(deltas.shape[0], -1)
    for s in range(0, flat.shape[1], chunk):
        yield flat[:, s:s + chunk]


def gram_update(gram: "torch.Tensor", deltas: "torch.Tensor", chunk: int = CHUNK) -> "torch.Tensor":
    """Add ``D D^T`` to ``gram`` (T x T, float64) in place, for stacked deltas ``D`` of shape (T, ...).

    Each chunk is multiplied in float64 so a long tensor does not lose the small cross terms.
    """
    for part in _chunks(deltas, chunk):
        p = part.double()
        gram.add_(p @ p.T)
    return gram


def sign_conflict_counts(deltas: "torch.Tensor", chunk: int = CHUNK) -> tuple["torch.Tensor", "torch.Tensor"]:
    """For stacked deltas (T, ...): ``(both, opposite)``, T x T float64 counts of the entries where
    ``tau_i`` and ``tau_j`` are both nonzero, and of those where their signs are opposite.

    With ``s = sign(D)``: ``|s| |s|^T`` counts both-nonzero entries and ``s s^T`` is
    agreements minus disagreements among them, so ``opposite = (both - s s^T) / 2``.
    """
    import torch

    t = deltas.shape[0]
    both = torch.zeros((t, t), dtype=torch.float64)
    opposite = torch.zeros((t, t), dtype=torch.float64)
    for part in _chunks(deltas, min(chunk, CHUNK)):
        s = part.float().sign()
        nz = s.abs()
        b = (nz @ nz.T).double()
        both.add_(b)
        opposite.add_((b - (s @ s.T).double()) / 2)
    return both, opposite


def cosine_from_gram(gram: "torch.Tensor") -> list[list[float]]:
    """``G_ij / sqrt(G_ii G_jj)``, 0 where either norm is 0 (a task vector that is all zeros)."""
    g = gram.tolist()
    n = len(g)
    out = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            d = math.sqrt(max(g[i][i], 0.0) * max(g[j][j], 0.0))
            out[i][j] = 0.0 if d == 0 else max(-1.0, min(1.0, g[i][j] / d))
    return out


def conflict_share(both: "torch.Tensor", opposite: "torch.Tensor") -> list[list[float]]:
    """``opposite / both`` per pair; 0 where the two deltas share no nonzero entry."""
    b, o = both.tolist(), opposite.tolist()
    return [[(o[i][j] / b[i][j]) if b[i][j] > 0 else 0.0 for j in range(len(b))] for i in range(len(b))]


# -- streaming over checkpoints ------------------------------------------------------------------
WORDING = Wording(
    role="expert", error=SimilarityError,
    hint="exclude it (e.g. exclude=['classifier.*']) if it is a task head, else compare experts of one base model",
    empty="task_vector_similarity needs at least one expert; pass {name: model or adapter folder}",
    instead="pass the model it was trained on as base and the adapters as experts",
    nothing_left="no tensors left to compare: exclude={patterns} removes every floating-point tensor of {base}")


def task_vector_similarity(base: str | Path, experts: Mapping[str, str | Path], *, exclude: Iterable[str] = (),
                           progress: bool = False) -> dict:
    """Cosine similarity and sign-conflict shares of the experts' task vectors against ``base``.

    Returns ``{"tasks": [names], "cosine": T x T, "sign_conflict": T x T, "norms": [T], "keys": n}``
    where ``keys`` is the number of tensors that entered the comparison.
    """
    import torch

    if isinstance(exclude, str):
        exclude = [exclude]
    patterns = list(exclude)
    names = list(experts)
    _, base_ckpt, ckpts, keys = open_against_base(base, {n: str(experts[n]) for n in names}, patterns, WORDING)

    t = len(names)
    gram = torch.zeros((t, t), dtype=torch.float64)
    both = torch.zeros((t, t), dtype=torch.float64)
    opposite = torch.zeros((t, t), dtype=torch.float64)
    with counting_bar("task vectors", len(keys), progress) as advance:
        for k in keys:
            w0 = base_ckpt.get(k).float()  # subtract in float32 whatever the stored dtype
            stack = torch.empty((t, *w0.shape), dtype=torch.float32)
            for i, name in enumerate(names):
                torch.sub(read_against(ckpts[name], k, w0, name, WORDING), w0, out=stack[i])
            if not bool(torch.isfinite(stack).all()):
                bad = next(names[i] for i in range(t) if not bool(torch.isfinite(stack[i]).all()))
                raise SimilarityError(f"tensor {k} of expert {bad} (or of the base) holds NaN or Inf; "
                                      "the checkpoint is broken, re-train or re-export it")
            gram_update(gram, stack)
            b, o = sign_conflict_counts(stack)
            both += b
            opposite += o
            del stack
            advance()
    return {"tasks": names, "cosine": cosine_from_gram(gram), "sign_conflict": conflict_share(both, opposite),
            "norms": [math.sqrt(max(v, 0.0)) for v in gram.diagonal().tolist()], "keys": len(keys)}
