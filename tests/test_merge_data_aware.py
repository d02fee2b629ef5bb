"""Data-aware merges: RegMean and Fisher merging, their statistics pre-pass (merge/data.py) and
the ``data:`` block of a merge config."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import graftkit as gk
from graftkit.merge import data as mdata
from graftkit.merge.fisher import fisher
from graftkit.merge.regmean import regmean
from eval_helpers import GOLD, LABELS, TEXTS, bert, save, write_jsonl


# -- the closed forms ----------------------------------------------------------------------------

def _closed_form(ws, grams, alpha=1.0):
    """W* = (sum_t G_t W_t^T)^T (sum_t G_t)^-1 with G_t's off-diagonals scaled by alpha, by torch.linalg.solve."""
    reduced = [alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g)) for g in grams]
    return torch.linalg.solve(sum(reduced), sum(g @ w.T for g, w in zip(reduced, ws))).T


def test_regmean_is_the_closed_form_of_one_linear_layer():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    xs = [torch.randn(40, 5, generator=g, dtype=torch.float64) * (i + 1) for i in range(3)]
    grams = [x.T @ x for x in xs]
    out = regmean(None, torch.stack(ws).float(), grams=[gr.float() for gr in grams], alpha=1.0)
    want = _closed_form(ws, grams)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    # it is the least-squares optimum: the gradient of sum_t ||X_t W^T - X_t W_t^T||^2 vanishes there
    def grad_at(w):
        w = w.double().clone().requires_grad_(True)
        sum(((x @ w.T - x @ wt.T) ** 2).sum() for x, wt in zip(xs, ws)).backward()
        return w.grad.abs().max().item()

    assert grad_at(out) < 1e-4 * grad_at(torch.stack(ws).mean(0))
    # alpha scales the off-diagonal entries of every Gram matrix (the paper's reduce_non_diagonal_ratio)
    half = regmean(None, torch.stack(ws).float(), grams=[gr.float() for gr in grams], alpha=0.5)
    torch.testing.assert_close(half.double(), _closed_form(ws, grams, 0.5), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(half, out, atol=1e-3)


def test_regmean_with_equal_grams_is_the_average():
    g = torch.Generator().manual_seed(1)
    models = torch.randn(4, 6, 5, generator=g)
    x = torch.randn(30, 5, generator=g)
    gram = x.T @ x
    out = regmean(None, models, grams=[gram] * 4, alpha=0.7)
    torch.testing.assert_close(out, models.mean(0), rtol=1e-5, atol=1e-5)
    # per-model weights scale the Gram matrices: equal Grams give the weighted average
    out = regmean(None, models, grams=[gram] * 4, weight=[1, 2, 3, 4])
    torch.testing.assert_close(out, (models * torch.tensor([1., 2, 3, 4]).view(4, 1, 1)).sum(0) / 10, rtol=1e-5, atol=1e-5)
    # no statistics (a bias, a norm): the weighted average
    torch.testing.assert_close(regmean(None, models[:, 0], weight=[1, 1, 2, 0]), (models[0, 0] + models[1, 0] + 2 * models[2, 0]) / 4)


def test_fisher_is_the_fisher_weighted_average():
    models = torch.tensor([[1.0, 2.0, 3.0], [5.0, -2.0, 0.0]])
    fishers = [torch.tensor([3.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 4.0])]
    out = fisher(None, models, fishers=fishers, weight=[1.0, 2.0])
    # entry 0: (1*3*1 + 2*1*5) / (3 + 2); entry 1: no Fisher anywhere -> the weighted average; entry 2: (1*1*3 + 2*4*0) / (1 + 8)
    torch.testing.assert_close(out, torch.tensor([13 / 5, (2 - 4) / 3, 3 / 9]))
    same = [torch.tensor([0.5, 2.0, 7.0])] * 2
    torch.testing.assert_close(fisher(None, models, fishers=same), models.mean(0))
    torch.testing.assert_close(fisher(None, models), models.mean(0))


# -- the statistics ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return gk.load_tokenizer("minilm")


def _examples(tok, texts, labels=None):
    ids = tok(texts, add_special_tokens=True)["input_ids"]
    return [mdata.Example(list(x), label=l) for x, l in zip(ids, labels or [None] * len(ids))]


def test_gram_matrices_skip_padding(tok):
    model = bert(tok, seed=3)
    ex = _examples(tok, TEXTS[:4])
    names = ["bert.encoder.layer.0.attention.self.query", "classifier"]
    padded = mdata.gram_matrices(model, mdata.batches(ex, 4, tok.pad_token_id), names)
    alone = [mdata.gram_matrices(model, mdata.batches([e], 1, tok.pad_token_id), names) for e in ex]
    for n in names:
        torch.testing.assert_close(padded[n][0], sum(a[n][0] for a in alone), rtol=1e-6, atol=1e-6)
        assert padded[n][1] == sum(a[n][1] for a in alone)
    assert padded[names[0]][1] == sum(len(e.ids) for e in ex)  # one row per real token
    assert padded["classifier"][1] == 4  # the pooled head: one row per example


def test_fisher_diagonals_by_hand(tok):
    model = bert(tok, seed=4)
    ex = _examples(tok, TEXTS[:3], [0, 2, 1])
    p = dict(model.named_parameters())["classifier.weight"]

    def grads(e):
        out = []
        for y in range(3):
            model.zero_grad()
            p.requires_grad_(True)
            logp = torch.log_softmax(model(input_ids=torch.tensor([e.ids])).logits[0], -1)
            g, = torch.autograd.grad(logp[y], [p])
            out.append((g, logp[y].exp().item()))
        return out

    per = [grads(e) for e in ex]
    empirical = sum(gy[e.label][0] ** 2 for gy, e in zip(per, ex)) / 3
    expected = sum(sum(pr * g ** 2 for g, pr in gy) for gy in per) / 3
    for mode, want in (("empirical", empirical), ("expected", expected)):
        got = mdata.fisher_diagonals(model, mdata.batches(ex, 2, tok.pad_token_id), mode)["classifier.weight"]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
    assert not torch.allclose(empirical, expected)
