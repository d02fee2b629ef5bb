"""GreenTrainer: the FLOPs model, the importance estimate, the selection against brute force, and a
``graft train`` run that trains only what it selected."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

import graftkit as gk
from graftkit.errors import ConfigError
from graftkit.methods.greentrainer import GreenTrainerConfig, GreenTrainerTraining, backward_flops, select_tensors, tensor_flops
from conftest import tiny_bert, tiny_inputs
from test_train import assets, cls_recipe  # noqa: F401  (assets is a fixture)


def brute_force(t_dy, t_dw, imp, budget, forced):
    best, chosen = -np.inf, None
    for bits in itertools.product([0, 1], repeat=len(t_dw)):
        s = np.array(bits, bool)
        if (forced & ~s).any() or backward_flops(t_dy, t_dw, s) > budget:
            continue
        value = imp[s & ~forced].sum()
        if value > best:
            best, chosen = value, s
    return best, chosen


@pytest.mark.parametrize("seed", range(12))
def test_selection_is_the_best_subset_under_the_budget(seed):
    """Integer costs and budget = units, so the knapsack's rounding is exact: the DP must find the
    brute-force optimum (importance sum) and stay within the budget."""
    rng = np.random.default_rng(seed)
    n = 9
    t_dy = rng.integers(0, 30, n).astype(float)
    t_dw = rng.integers(1, 30, n).astype(float)
    imp = rng.normal(size=n)
    forced = np.zeros(n, bool)
    forced[-1] = seed % 2 == 0  # a head at the top, trained whole
    budget = float(rng.integers(40, 200))
    if backward_flops(t_dy, t_dw, forced) > budget:
        budget = backward_flops(t_dy, t_dw, forced) + 10
    got = select_tensors(t_dy, t_dw, imp, budget, forced, units=int(budget))
    want, _ = brute_force(t_dy, t_dw, imp, budget, forced)
    assert backward_flops(t_dy, t_dw, got) <= budget
    assert (got[forced]).all()
    assert imp[got & ~forced].sum() == pytest.approx(max(want, 0.0))


def test_backward_flops_counts_the_tail_down_to_the_deepest_tensor():
    t_dy = np.array([1.0, 10.0, 100.0, 1000.0])
    t_dw = np.array([2.0, 20.0, 200.0, 2000.0])
    # training tensor 1 alone: its own weight gradient plus the activation gradient through 1, 2 and 3
    assert backward_flops(t_dy, t_dw, np.array([0, 1, 0, 0], bool)) == 20 + 10 + 100 + 1000
    assert backward_flops(t_dy, t_dw, np.array([0, 0, 0, 1], bool)) == 2000 + 1000
    assert backward_flops(t_dy, t_dw, np.ones(4, bool)) == t_dy.sum() + t_dw.sum()


def test_budget_below_the_forced_tensors_is_refused():
    with pytest.raises(ValueError):
        select_tensors(np.array([1.0, 5.0]), np.array([1.0, 5.0]), np.ones(2), 6.0, np.array([False, True]))


def test_tensor_flops_by_hand():
    """A tiny BERT on one batch of 2 x 7 tokens: a linear weight costs 2 N in out both ways, its bias N out,
    a LayerNorm weight N d (dw) and 4 N d (dy), the word embedding N d and no dy; the attention product
    (8 B L^2 d) is charged to the last projection before the output (value)."""
    model = tiny_bert()
    ids = tiny_inputs(batch=2, length=7)
    names = [n for n, p in model.named_parameters()]
    order, t_dy, t_dw = tensor_flops(model, lambda: model(ids), names)
    dy, dw = dict(zip(order, t_dy)), dict(zip(order, t_dw))
    h = model.config.hidden_size
    n = 2 * 7
    q = "bert.encoder.layer.0.attention.self.query.weight"
    v = "bert.encoder.layer.0.attention.self.value.weight"
    assert dw[q] == dy[q] == 2 * n * h * h
    assert dw["bert.encoder.layer.0.attention.self.query.bias"] == n * h
    assert dy["bert.encoder.layer.0.attention.self.query.bias"] == 0
    assert dy[v] == 2 * n * h * h + 8 * 2 * 7 * 7 * h
    ln = "bert.encoder.layer.0.attention.output.LayerNorm.weight"
    assert (dw[ln], dy[ln]) == (n * h, 4 * n * h)
    emb = "bert.embeddings.word_embeddings.weight"
    assert (dw[emb], dy[emb]) == (n * h, 0)
    assert order.index(emb) < order.index(q) < order.index("classifier.weight")
    # the pooler and classifier see one row per example
    assert dw["classifier.weight"] == 2 * 2 * model.classifier.weight.numel()


def test_importance_is_minus_g1_dot_dw0():
    """On a two-tensor model the estimate equals the hand computation: one AdamW first step (lr * g / (|g| + eps))
    then the gradient at the moved weights, I = -sum g1 * dw0, normalised by max |I|; the weights come back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    gk.inject(model, {"method": "greentrainer", "targets": ["*"]})
    x, y = torch.randn(5, 3), torch.randn(5, 2)

    def forward(batch):
        return ((model(batch["x"]) - batch["y"]) ** 2).mean()

    training = GreenTrainerTraining(GreenTrainerConfig(flops_budget=1.0))
    training.lr, training.forward, training.batches = 0.1, forward, [{"x": x, "y": y}]
    training.order = [n for n, _ in model.named_parameters() if "graft_adapter" not in n]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = training.importance(model)

    params = [p for n, p in model.named_parameters() if n in training.order]
    g0 = torch.autograd.grad(forward({"x": x, "y": y}), params)
    dw0 = [-0.1 * g / (g.abs() + 1e-8) for g in g0]
    moved = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with torch.no_grad():
        for p, w, d in zip(moved.parameters(), params, dw0):
            p.copy_(w + d)
    g1 = torch.autograd.grad(((moved(x) - y) ** 2).mean(), list(moved.parameters()))
    want = np.array([-float((a * b).sum()) for a, b in zip(g1, dw0)])
    assert got == pytest.approx(want / np.abs(want).max(), rel=1e-5)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_graft_train_trains_only_the_selection(assets, tmp_path):
    from graftkit.io import read_adapter
    from graftkit.train import parse_recipe, train

    rec = cls_recipe(assets, tmp_path / "run", method={"method": "greentrainer", "flops_budget": 0.3},
                     optim={"lr": 3e-3, "epochs": 2})
    summary = train(parse_recipe(rec), progress=False)
    report = summary["method_report"]
    assert report["backward_flops_saved"] >= 0.7 - 1e-9  # the budget: at most 30% of the full backward pass
    assert 0 < report["tensors_trained"] < report["tensors"]
    assert report["backward_gflops_saved_in_run"] > 0
    assert summary["final_loss"] < summary["first_loss"]
    deltas = read_adapter(tmp_path / "run" / "adapter").tensors
    changed = {k for k, t in deltas.items() if k.endswith(".delta") and t.abs().max() > 0}
    # the classifier head trains whole (saved as its value); among the rest only the selected changed
    assert 0 < len(changed) <= report["tensors_trained"]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["summary"]["method_report"]["tensors_trained"] == report["tensors_trained"]


@pytest.mark.parametrize("budget, needle", [(0, "flops_budget"), (1.5, "flops_budget"), (1e-9, "raise flops_budget")])
def test_bad_budget_is_one_line(assets, tmp_path, budget, needle):
    from graftkit.train import parse_recipe, train

    rec = cls_recipe(assets, tmp_path / "run", method={"method": "greentrainer", "flops_budget": budget})
    with pytest.raises(ConfigError, match=needle) as info:
        train(parse_recipe(rec), progress=False)
    assert "\n" not in str(info.value)


def test_reselection_rebuilds_the_optimizer_on_the_same_schedule(assets, tmp_path):
    """Selecting again every step: the loop rebuilds the optimizer when the selection changes, and the
    learning rate of every step still follows the recipe's schedule (as a run that never reselects)."""
    from graftkit.train import parse_recipe, train

    def lrs(out):
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["lr"] for r in rows if "loss" in r]

    method = {"method": "greentrainer", "flops_budget": 0.3, "importance_batches": 2}
    optim = {"lr": 3e-3, "max_steps": 8, "warmup_steps": 2}
    once = train(parse_recipe(cls_recipe(assets, tmp_path / "once", method=method, optim=optim)), progress=False)
    again = train(parse_recipe(cls_recipe(assets, tmp_path / "again", method={**method, "reselect_every": 1}, optim=optim)),
                  progress=False)
    assert once["method_report"]["selections"] == 1
    assert again["method_report"]["selections"] == 8 - 1 + 1  # the start, then after every step but the last
    assert again["method_report"]["selection_changes"] > 0  # so the optimizer really was rebuilt
    assert lrs(tmp_path / "again") == pytest.approx(lrs(tmp_path / "once"))
    assert lrs(tmp_path / "once")[:4] == pytest.approx([1.5e-3, 3e-3, 3e-3, 3e-3 * (1 - 1 / 6)])
