"""Every weight-space method of issue 15 trains the real MiniLM a few steps with ``graft train``
(classification, BBC News) and the training loss goes down. Marked ``real``; short (48 articles, 32
tokens, 8 steps at a constant rate).

The configurations are the benchmark's rows (bench/adapters.py ``METHODS``) on fewer targets where a
row adapts every linear layer, and each row's rate there (``METHOD_LR``; full fine-tuning's for the
in-place methods), raised for these few steps where the benchmark's rate moves the loss too little."""
from __future__ import annotations

import json

import pytest
import torch

import graftkit as gk

pytestmark = pytest.mark.real

QV = ["query", "value"]
ROWS = {
    "lora+pissa": ({"method": "lora", "r": 4, "init": "pissa", "targets": QV}, 5e-3),
    "lora+olora": ({"method": "lora", "r": 4, "init": "olora", "targets": QV}, 5e-3),
    "lora+eva": ({"method": "lora", "r": 4, "init": "eva", "targets": QV}, 5e-3),
    "vera": ({"method": "vera", "r": 64, "targets": QV}, 2e-2),
    "loha": ({"method": "loha", "r": 4, "alpha": 4, "targets": QV}, 5e-3),
    "lokr": ({"method": "lokr", "r": 4, "alpha": 4, "targets": QV}, 5e-3),
    "oft": ({"method": "oft", "oft_block_size": 32, "targets": QV}, 5e-3),
    "boft": ({"method": "boft", "boft_block_size": 4, "targets": QV}, 5e-3),
    "adalora": ({"method": "adalora", "init_r": 6, "target_r": 4, "lora_alpha": 32, "targets": QV}, 5e-3),
    "fourierft": ({"method": "fourierft", "n_frequency": 200, "scaling": 150.0, "targets": QV}, 5e-2),
    "flora": ({"method": "flora", "r": 4, "scale": 4.0, "targets": QV}, 5e-3),
    "dsee": ({"method": "dsee", "r": 4, "lora_alpha": 8, "num_sparse": 16, "targets": QV}, 5e-3),
    "deft": ({"method": "deft", "r": 4, "targets": QV}, 5e-3),
    "light_peft": ({"method": "light_peft", "r": 4, "targets": QV, "prune_step": 2}, 5e-3),
    "lt_sft": ({"method": "lt_sft", "fraction": 0.01, "layers": "top:2"}, 5e-4),
    "diff_pruning": ({"method": "diff_pruning", "layers": "top:2"}, 5e-4),
    "apet": ({"method": "apet", "fraction": 0.05, "layers": "top:2"}, 5e-3),
    "subspace": ({"method": "subspace", "d": 200}, 5e-2),
    "greentrainer": ({"method": "greentrainer", "flops_budget": 0.5}, 2e-4),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from graftkit.data import bbc_news, stratified_split, text_key

    train, held = stratified_split(bbc_news(), (48, 16), seed=0, key=lambda e: text_key(e[0]))
    root = tmp_path_factory.mktemp("bbc")
    for name, rows in (("train", train), ("held", held)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y, *_ in rows))
    return root


def test_every_issue15_method_has_a_row():
    from graftkit.methods import method_named

    names = {cfg["method"] for cfg, _ in ROWS.values()}
    assert all(method_named(n) is not None for n in names)


@pytest.mark.parametrize("row", list(ROWS))
def test_minilm_a_few_steps(row, data, tmp_path):
    from graftkit.train import parse_recipe, train

    method, lr = ROWS[row]
    recipe = {"model": "minilm", "task": "classification",
              "data": {"train": str(data / "train.jsonl"), "validation": str(data / "held.jsonl"), "max_length": 32},
              "method": method, "optim": {"lr": lr, "batch_size": 8, "max_steps": 8, "warmup_steps": 0, "schedule": "constant"},
              "eval": {"every": None, "batch_size": 16}, "output": {"dir": str(tmp_path / "run"), "log_every": 1}}
    summary = train(parse_recipe(recipe), progress=False)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(losses) == 8
    # the mean of the last three steps below the mean of the first three (one step is noisy at batch 8)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert summary["val_accuracy"] is not None
