"""Multi-task fine-tuning with a task-balanced loss (MFTCoder; Liu et al., 2023).

Plain SFT averages the loss over all tokens of a batch, so a task with many (or long)
examples dominates. MFTCoder's balanced loss first averages the token losses *within* each
task present in the batch and then averages those per-task means, giving every task the
same weight whatever its size:

    L = 1/|T| * sum_{t in T} ( sum_{i in t} sum_j l_ij / sum_{i in t} n_i )

For classification each example is one "token". Rows name their task in ``data.task_field``.
"""
from __future__ import annotations

import torch


def balanced_loss(token_loss: torch.Tensor, token_mask: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``token_loss``/``token_mask``: (batch, tokens); ``task``: (batch,). Returns (loss, tasks present)."""
    mask = token_mask.to(token_loss.dtype)
    per_example_sum = (token_loss * mask).sum(-1)
    per_example_n = mask.sum(-1)
    present = torch.unique(task)
    means = []
    for t in present.tolist():
        sel = task == t
        n = per_example_n[sel].sum()
        if n > 0:
            means.append(per_example_sum[sel].sum() / n)
    return torch.stack(means).mean(), len(means)
