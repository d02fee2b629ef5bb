"""Classification: softmax over the head's labels, argmax prediction; accuracy, macro-F1, ECE.

Texts are tokenized once per tokenizer (see :class:`graftkit.eval.runner.EvalCache`), sorted
by length and cut into batches, so a batch pads to nearly its own length instead of the
longest text of the file. Each example's probabilities are kept in the predictions file
(``probs``, in the head's label order) for calibration and flip analyses.

Metrics (:mod:`graftkit.eval.metrics`): accuracy; macro-F1 over the head's labels (a label
neither predicted nor present is skipped); expected calibration error with 15 equal-width
confidence bins, ``sum_b |B|/N * |acc(B) - conf(B)|``.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..errors import EvalError
from .models import Head


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, so memory peaks at once)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def right_pad(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def gold_ids(references: list[str], head: Head, file: str) -> list[int]:
    index = head.index()
    for label in references:
        if label not in index:
            shown = ", ".join(head.labels[:12]) + (", ..." if len(head.labels) > 12 else "")
            raise EvalError(f"label {label!r} in {file} is not one of the labels of {head.source} ({shown}); "
                            "give a head trained on this task's labels with `head:`")
    return [index[label] for label in references]


@torch.inference_mode()
def predict_probs(model: nn.Module, encoded: list[list[int]], *, pad: int, batch_size: int, max_length: int | None,
                  advance: Callable[[int], None] | None = None) -> np.ndarray:
    """(N, labels) softmax probabilities, in the order of ``encoded``."""
    device = next(model.parameters()).device
    seqs = [ids[:max_length] if max_length else ids for ids in encoded]
    probs: list[np.ndarray | None] = [None] * len(seqs)
    for batch in length_batches([len(s) for s in seqs], batch_size):
        ids, mask = right_pad([seqs[i] for i in batch], pad, device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        p = torch.softmax(logits, dim=-1).cpu().numpy()
        for j, i in enumerate(batch):
            probs[i] = p[j]
        if advance is not None:
            advance(1)
    return np.stack(probs)  # type: ignore[arg-type]


def score(probs: np.ndarray, gold: list[int], head: Head, references: list[str]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    from .metrics import accuracy, expected_calibration_error, macro_f1

    pred = probs.argmax(axis=1)
    gold_arr = np.asarray(gold)
    metrics = {
        "accuracy": float(accuracy(pred, gold_arr)),
        "macro_f1": float(macro_f1(pred, gold_arr, labels=list(range(len(head.labels))))),
        "ece": float(expected_calibration_error(probs, gold_arr)),
    }
    rows = [{"id": i, "prediction": head.labels[int(p)], "reference": ref, "score": float(int(p) == g),
             "probs": [round(float(x), 6) for x in pr]}
            for i, (p, g, ref, pr) in enumerate(zip(pred, gold, references, probs))]
    return metrics, rows
