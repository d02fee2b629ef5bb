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


# -- end to end: graft merge with a data: block --------------------------------------------------

CLI_ENV = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}


def graft(*args, cwd):
    return subprocess.run([sys.executable, "-m", "graftkit.cli", *map(str, args)], cwd=cwd, env=CLI_ENV, capture_output=True,
                          text=True, timeout=300)


def _yaml(path: Path, cfg: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def experts(tok, tmp_path_factory):
    """Two tiny BERT classifiers of one base (different fine-tunes: perturbed copies), with the task file."""
    root = tmp_path_factory.mktemp("experts")
    folders = []
    for i in range(2):
        model = bert(tok, seed=0)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        folders.append(save(model, tok, root / f"e{i}"))
    file = write_jsonl(root / "topic.jsonl", [{"text": t, "label": g} for t, g in zip(TEXTS, GOLD)])
    return root, folders, file


def _cfg(method, folders, data, **extra):
    return {"merge_method": method, "models": [{"model": f} for f in folders], "dtype": "float32",
            **({"data": data} if data is not None else {}), **extra}


def _load(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_regmean_end_to_end_with_graft_merge(experts, tok, tmp_path):
    root, folders, file = experts
    task = {"name": "topic", "kind": "classification", "file": file, "max_length": 32}
    cfg = _yaml(tmp_path / "regmean.yaml", _cfg("regmean", folders, {"task": task, "examples": 5, "batch_size": 2},
                                                 parameters={"alpha": 0.8}))
    res = graft("merge", cfg, tmp_path / "out", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    got = _load(tmp_path / "out")
    # by hand: each model's Gram matrices of its Linear inputs on the first 5 texts, alone (no padding)
    models = [transformers.BertForSequenceClassification.from_pretrained(f).eval() for f in folders]
    ids = tok(TEXTS[:5])["input_ids"]
    key = "bert.encoder.layer.1.intermediate.dense"
    grams = []
    for m in models:
        rows = []
        h = m.get_submodule(key).register_forward_pre_hook(lambda mod, a: rows.append(a[0][0].detach()))
        with torch.no_grad():
            for x in ids:
                m(input_ids=torch.tensor([x]))
        h.remove()
        x = torch.cat(rows).double()
        grams.append(x.T @ x / x.shape[0])
    ws = [dict(m.named_parameters())[key + ".weight"].detach().double() for m in models]
    torch.testing.assert_close(got[key + ".weight"].double(), _closed_form(ws, grams, 0.8), rtol=1e-4, atol=1e-5)
    bias = [dict(m.named_parameters())[key + ".bias"].detach() for m in models]
    torch.testing.assert_close(got[key + ".bias"], (bias[0] + bias[1]) / 2)  # not a Linear weight: averaged
    assert not torch.allclose(got[key + ".weight"], (ws[0].float() + ws[1].float()) / 2, atol=1e-4)
    prov = json.loads((tmp_path / "out" / "graft_provenance.json").read_text())
    assert "data" in json.dumps(prov)
    assert not list(tmp_path.glob(".*tmp-*")), "the statistics files were left behind"
    merged = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "out")
    assert torch.isfinite(merged(input_ids=torch.tensor([ids[0]])).logits).all()


def test_fisher_end_to_end(experts, tok, tmp_path, monkeypatch):
    root, folders, file = experts
    made = []
    real = mdata.collect
    monkeypatch.setattr(mdata, "collect", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    out = gk.merge(_cfg("fisher", folders, {"task": file, "examples": 4, "fisher": "empirical"}), tmp_path / "out")
    # the statistics lived in a staging sibling of the output (a killed run's is removed by the next), now gone
    assert made[0].folder.parent == tmp_path and made[0].folder.name.startswith(".out.tmp-") and not made[0].folder.exists()
    got = _load(out)
    models = [transformers.BertForSequenceClassification.from_pretrained(f).eval() for f in folders]
    index = {l: i for i, l in enumerate(LABELS)}
    ex = _examples(tok, TEXTS[:4], [index[g] for g in GOLD[:4]])
    fishers = [mdata.fisher_diagonals(m, [mdata.batches(ex, 4, tok.pad_token_id)[0]], "empirical") for m in models]
    for key in ("classifier.weight", "bert.encoder.layer.0.attention.output.dense.weight"):
        theta = [dict(m.named_parameters())[key].detach() for m in models]
        f = [fi[key].clamp(min=1e-10) for fi in fishers]
        torch.testing.assert_close(got[key], (f[0] * theta[0] + f[1] * theta[1]) / (f[0] + f[1]), rtol=1e-4, atol=1e-6)
        assert not torch.allclose(got[key], (theta[0] + theta[1]) / 2, atol=1e-5)


def test_causal_lm_fisher_and_regmean(tok, tmp_path):
    """Causal LMs: perplexity text (a task file) for RegMean, a generation task's answers for Fisher."""
    folders = []
    for i in range(2):
        torch.manual_seed(i)
        cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                       pad_token_id=tok.pad_token_id)
        folders.append(save(transformers.LlamaForCausalLM(cfg).eval(), tok, tmp_path / f"lm{i}"))
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in TEXTS])
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": t, "answer": g} for t, g in zip(TEXTS, GOLD)])
    reg = _load(gk.merge(_cfg("regmean", folders, {"task": text, "examples": 3}), tmp_path / "reg"))
    fis = _load(gk.merge(_cfg("fisher", folders, {"task": {"name": "qa", "kind": "generation", "file": qa}, "examples": 3}),
                         tmp_path / "fis"))
    models = [_load(f) for f in folders]
    for got in (reg, fis):
        key = "model.layers.0.mlp.down_proj.weight"
        assert torch.isfinite(got[key]).all()
        assert not torch.allclose(got[key], (models[0][key] + models[1][key]) / 2, atol=1e-6)
    norm = "model.norm.weight"  # RegMean averages what is not a Linear weight
    torch.testing.assert_close(reg[norm], (models[0][norm] + models[1][norm]) / 2)


# -- bad input -----------------------------------------------------------------------------------

def _cli_error(tmp_path, cfg: dict, *needles):
    path = _yaml(tmp_path / "bad.yaml", cfg)
    res = graft("merge", path, tmp_path / "out", cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("graft: error:"), res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*tmp-*"))


def test_data_aware_merge_without_data(experts, tmp_path):
    _cli_error(tmp_path, _cfg("regmean", experts[1], None), "regmean", "data:")


def _api_error(tmp_path, cfg: dict, cls, *needles):
    """The same failure through graftkit.merge (the CLI turns it into one line and exit 2)."""
    from graftkit.errors import GraftError

    with pytest.raises(cls) as info:
        gk.merge(cfg, tmp_path / "out")
    msg = str(info.value)
    assert isinstance(info.value, GraftError) and info.value.exit_code == 2 and "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*tmp-*"))


def test_data_for_another_task(experts, tmp_path):
    from graftkit.errors import ConfigError, EvalError

    file = write_jsonl(tmp_path / "weather.jsonl", [{"text": "rain again", "label": "weather"}])
    _api_error(tmp_path, _cfg("fisher", experts[1], {"task": file}), EvalError, "'weather'", "another task")
    task = {"name": "qa", "kind": "perplexity", "file": experts[2]}  # a task whose kind does not match the models' head
    _api_error(tmp_path, _cfg("regmean", experts[1], {"task": task}), ConfigError, "perplexity", "sequence classifier")


def test_data_block_on_a_method_without_data(experts):
    from graftkit.errors import ConfigError
    from graftkit.merge.config import load_config

    with pytest.raises(ConfigError, match="uses no data"):
        load_config(_cfg("linear", experts[1], {"task": experts[2]}))
    with pytest.raises(ConfigError, match="alpha"):
        load_config(_cfg("regmean", experts[1], {"task": experts[2]}, parameters={"alpha": 1.5}))
    with pytest.raises(ConfigError, match="no data task"):  # one model's own block without a task, no top-level one
        load_config({"merge_method": "fisher", "models": [{"model": experts[1][0], "data": {"task": experts[2]}},
                                                          {"model": experts[1][1], "data": {"examples": 3}}]})


def test_study_passes_each_experts_task_as_its_data():
    from graftkit.errors import ConfigError
    from graftkit.eval.study import MergeRun, merge_config

    tasks = [{"name": "a", "kind": "classification", "file": "a/train.jsonl"}, {"name": "b", "kind": "classification", "file": "b/train.jsonl"}]
    cfg = merge_config(MergeRun(method="regmean", data={"examples": 16, "split": "validation"}), "base", ["ea", "eb"],
                       exclude=["classifier.*"], grid=False, data_tasks=tasks)
    assert [m["data"] for m in cfg["models"]] == [{"task": tasks[0], "examples": 16}, {"task": tasks[1], "examples": 16}]
    assert "data" not in merge_config(MergeRun(method="ties"), "base", ["ea", "eb"], exclude=[], grid=False,
                                      data_tasks=tasks)["models"][0]
    with pytest.raises(ConfigError, match="uses no data"):
        merge_config(MergeRun(method="linear", data={"examples": 4}), "base", ["ea", "eb"], exclude=[], grid=False, data_tasks=tasks)


def test_dry_run_names_the_data(experts):
    from graftkit.merge.api import dry_run

    text = dry_run(_cfg("regmean", experts[1], {"task": experts[2], "examples": 3}))
    assert "regmean" in text and f"3 examples of {experts[2]}" in text


def test_a_search_computes_the_statistics_once(experts, tmp_path, monkeypatch):
    """A grid over regmean's alpha needs the same Gram matrices at every point: one pre-pass,
    its files removed when the search ends; each trial still differs by alpha."""
    collected = []
    real = mdata.collect

    def counting(plan, *a, **k):
        collected.append(real(plan, *a, **k))
        return collected[-1]

    monkeypatch.setattr(mdata, "collect", counting)
    scores = iter([0.2, 0.9])
    trials = []

    def evaluate(folder):
        trials.append(_load(folder)["bert.encoder.layer.0.attention.self.query.weight"].clone())
        return next(scores)

    cfg = _cfg("regmean", experts[1], {"task": experts[2], "examples": 3}, search={"grid": {"alpha": [0.5, 1.0]}})
    out = gk.merge(cfg, tmp_path / "out", evaluate=evaluate)
    assert len(collected) == 1 and not collected[0].folder.exists() and mdata._REUSE == []
    assert len(trials) == 2 and not torch.allclose(trials[0], trials[1])
    torch.testing.assert_close(_load(out)["bert.encoder.layer.0.attention.self.query.weight"], trials[1])


def test_regmean_solves_gpt2_conv1d_layers_in_their_orientation(tok, tmp_path):
    """GPT-2 stores its linear layers (in, out) (transformers' Conv1D): W* = (sum G_t)^-1 sum G_t W_t;
    c_proj of the attention is square, so only the layout marker tells the two forms apart."""
    folders = []
    for i in range(2):
        torch.manual_seed(i)
        cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_embd=16, n_layer=1, n_head=2, n_positions=64)
        folders.append(save(transformers.GPT2LMHeadModel(cfg).eval(), tok, tmp_path / f"g{i}"))
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in TEXTS])
    got = _load(gk.merge(_cfg("regmean", folders, {"task": text, "examples": 3}, parameters={"alpha": 1.0}), tmp_path / "out"))
    key = "transformer.h.0.attn.c_proj"
    grams, ws = [], []
    for f in folders:
        m = transformers.GPT2LMHeadModel.from_pretrained(f).eval()
        rows = []
        h = m.get_submodule(key).register_forward_pre_hook(lambda mod, a: rows.append(a[0][0].detach()))
        with torch.no_grad():
            for x in tok(TEXTS[:3])["input_ids"]:
                m(input_ids=torch.tensor([x]))
        h.remove()
        x = torch.cat(rows).double()
        grams.append(x.T @ x / x.shape[0])
        ws.append(dict(m.named_parameters())[key + ".weight"].detach().double())
    want = torch.linalg.solve(sum(grams), sum(g @ w for g, w in zip(grams, ws)))
    torch.testing.assert_close(got[key + ".weight"].double(), want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got[key + ".weight"].double(), _closed_form(ws, grams), atol=1e-4)  # read as (out, in)
