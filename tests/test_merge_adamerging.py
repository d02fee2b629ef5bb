"""AdaMerging (merge/adamerging.py): coefficients learned by entropy minimisation on the data block.

Tiny BERT classifiers with the packaged MiniLM tokenizer: a base and two "experts" (the base plus
noise, each with its own classifier head), merged with their heads excluded, so each task is read
out through its own expert's head (the paper's multi-task setting)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import graftkit as gk
from conftest import tiny_bert
from eval_helpers import TEXTS, bert, cls_file, save
from graftkit.cli import main
from graftkit.merge import adamerging as am
from merge_helpers import load_folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adamerging")
    tok = gk.load_tokenizer("minilm")
    paths = {"base": save(bert(tok, seed=0), tok, root / "base")}
    for i in range(2):
        m = bert(tok, seed=0)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for n, p in m.named_parameters():  # a task vector, and a head of its own
                p.add_(torch.randn(p.shape, generator=g) * (0.5 if n.startswith("classifier") else 0.05))
        paths[f"e{i}"] = save(m, tok, root / f"e{i}")
    paths["data"] = cls_file(root)
    paths["root"] = root
    return paths


def recipe(folders, method="adamerging", data=True, **parameters) -> dict:
    cfg = {"merge_method": method, "base_model": folders["base"], "dtype": "float32", "exclude": ["classifier.*"],
           "models": [{"model": folders["e0"]}, {"model": folders["e1"]}], "parameters": parameters}
    if data:
        cfg["data"] = {"task": folders["data"], "examples": 7, "batch_size": 4}
    return cfg


def entropy_of(folder: str, heads: list[str]) -> float:
    """The mean entropy of a merged folder's class probabilities on the data texts, each head in
    turn (every text alone, no padding): measured apart from the search's own bookkeeping."""
    from graftkit.eval.config import ModelSpec
    from graftkit.eval.models import install_head, load, read_head

    loaded = load(ModelSpec(name="m", path=folder), "classification")
    tok = gk.load_tokenizer(folder)
    values = []
    for head in heads:
        install_head(loaded.model, read_head(head, loaded.model))
        with torch.no_grad():
            for text in TEXTS:
                logp = torch.log_softmax(loaded.model(input_ids=torch.tensor([tok(text)["input_ids"]])).logits[0], -1)
                values.append(float(-(logp.exp() * logp).sum()))
    return sum(values) / len(values)


def test_entropy_goes_down_and_the_coefficients_are_recorded(folders, tmp_path):
    out = gk.merge(recipe(folders, steps=12, lr=0.05), tmp_path / "ada")
    heads = [folders["e0"], folders["e1"]]
    start = gk.merge(recipe(folders, "task_arithmetic", data=False, weight=0.3), tmp_path / "start")  # the search's start
    before, after = entropy_of(str(start), heads), entropy_of(str(out), heads)
    assert after < before - 0.01, (before, after)
    prov = json.loads((Path(out) / "graft_provenance.json").read_text())
    info = json.dumps(prov)
    learned = next(x for x in _walk(prov) if isinstance(x, dict) and "coefficients" in x)
    assert learned["entropy_after"] < learned["entropy_before"], info
    assert abs(learned["entropy_before"] - before) < 1e-3 and abs(learned["entropy_after"] - after) < 1e-3, (learned, before, after)
    coefficients = learned["coefficients"]  # one group per merged tensor (the authors' layer-wise), 2 models each
    merged = [k for k in load_folder(Path(out)) if not k.startswith("classifier")]
    assert set(coefficients) == set(merged)
    assert all(len(v) == 2 and all(0 <= x <= 1 for x in v) for v in coefficients.values())
    assert any(abs(x - 0.3) > 1e-3 for v in coefficients.values() for x in v)
    # the written tensors are base + sum_k c_k tau_k with the recorded coefficients
    base, e0, e1, got = (load_folder(Path(p)) for p in (folders["base"], folders["e0"], folders["e1"], out))
    for k, (c0, c1) in coefficients.items():
        want = base[k] + c0 * (e0[k] - base[k]) + c1 * (e1[k] - base[k])
        torch.testing.assert_close(got[k], want, rtol=0, atol=2e-6)


def _walk(x):
    yield x
    if isinstance(x, dict):
        for v in x.values():
            yield from _walk(v)
    elif isinstance(x, list):
        for v in x:
            yield from _walk(v)


def test_equal_coefficients_are_task_arithmetic(folders, tmp_path):
    """Layer-wise with no step: every coefficient is ``init``, which is task arithmetic at that weight."""
    ada = load_folder(gk.merge(recipe(folders, steps=0, init=0.4, granularity="layer"), tmp_path / "ada"))
    ta = load_folder(gk.merge(recipe(folders, "task_arithmetic", data=False, weight=0.4), tmp_path / "ta"))
    assert set(ada) == set(ta)
    for k in ta:
        torch.testing.assert_close(ada[k], ta[k], rtol=0, atol=1e-6)


def _tiny_setup(cache: bool):
    model = tiny_bert(0).double()
    experts = [tiny_bert(0).double() for _ in range(2)]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in experts:
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1)
    base = {k: v.detach() for k, v in model.named_parameters()}
    tuned = [{k: v.detach() for k, v in m.named_parameters()} for m in experts]
    keys = list(base)
    vectors = am.TaskVectors(keys, lambda k: base[k], lambda k: torch.stack([t[k] - base[k] for t in tuned]), 2, cache)
    ids = torch.randint(1, 96, (6, 5), generator=g)
    streams = [[am.Batch({"input_ids": ids[:3]}, {})], [am.Batch({"input_ids": ids[3:]}, {})]]
    return model, vectors, keys, streams


@pytest.mark.parametrize("cache", [False, True])
def test_gradient_matches_finite_differences(cache):
    """d(entropy)/d(lambda) by autograd through the re-reading mix equals central differences (float64)."""
    model, vectors, keys, streams = _tiny_setup(cache)
    groups, names = am.groups_for(keys, "layer")
    lam = (0.2 + 0.6 * torch.rand(len(names), 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64))

    def loss(x):
        params = vectors.params(x, groups)
        return sum(am.entropy(am.run_model(model, params, s[0])) for s in streams)

    x = lam.clone().requires_grad_(True)
    loss(x).backward()
    eps = 1e-6
    for g in range(len(names)):
        for k in range(2):
            up, down = lam.clone(), lam.clone()
            up[g, k] += eps
            down[g, k] -= eps
            with torch.no_grad():
                fd = (float(loss(up)) - float(loss(down))) / (2 * eps)
            assert abs(float(x.grad[g, k]) - fd) <= 1e-6 + 1e-5 * abs(fd), (names[g], k, float(x.grad[g, k]), fd)
    assert float(x.grad.abs().sum()) > 0


def test_learn_lowers_the_entropy_in_memory():
    model, vectors, keys, streams = _tiny_setup(False)
    groups, names = am.groups_for(keys, "task")
    result = am.learn(model, vectors, groups, len(names), streams, steps=10, lr=0.05)
    assert result["entropy_after"] < result["entropy_before"]
    assert result["lambdas"].shape == (1, 2)


def cli_error(capsys, args) -> str:
    capsys.readouterr()
    code = main([str(a) for a in args])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("graft: error: "), err
    return err[0]


def test_bad_inputs(folders, tmp_path, capsys):
    def run(cfg, name):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        line = cli_error(capsys, ["merge", path, tmp_path / name])
        assert not (tmp_path / name).exists()
        return line

    assert "data" in run(recipe(folders, data=False), "nodata")
    wrong = recipe(folders)
    wrong["data"] = {"task": {"kind": "generation", "file": folders["data"], "prompt_field": "text", "reference_field": "label"}}
    line = run(wrong, "kind")
    assert "generation" in line and "classif" in line
    assert "granularity" in run(recipe(folders, granularity="block"), "granularity")


def test_per_tensor_function_golden():
    base = torch.tensor([1.0, 2.0])
    deltas = torch.tensor([[1.0, 0.0], [0.0, -4.0]])
    assert torch.equal(am.adamerging(base, deltas, coefficients=[0.5, 0.25]), torch.tensor([1.5, 1.0]))
    assert torch.equal(am.adamerging(base, deltas, init=0.5), torch.tensor([1.5, 0.0]))  # no search: init for all


def _word_tokenizer():
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 96)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_causal_lm_entropy_of_the_next_token_goes_down(tmp_path):
    """A causal LM (tiny Llama) on a generation task: the entropy at the position that predicts the
    answer's first token goes down; the answers are never used."""
    from eval_helpers import write_jsonl
    from merge_helpers import make_models

    paths = make_models(tmp_path, n=2, scale=0.05)
    tok = _word_tokenizer()
    for p in paths.values():
        tok.save_pretrained(p)
    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": " ".join(f"w{int(i)}" for i in torch.randint(3, 96, (6,), generator=g)), "answer": "w5"} for _ in range(6)]
    task = {"name": "gen", "kind": "generation", "file": write_jsonl(tmp_path / "gen.jsonl", rows)}
    cfg = {"merge_method": "adamerging", "base_model": str(paths["base"]), "dtype": "float32",
           "models": [{"model": str(paths["ft0"])}, {"model": str(paths["ft1"])}],
           "parameters": {"steps": 8, "lr": 0.05, "granularity": "task"}, "data": {"task": task, "batch_size": 3}}
    out = gk.merge(cfg, tmp_path / "ada")
    learned = next(x for x in _walk(json.loads((Path(out) / "graft_provenance.json").read_text()))
                   if isinstance(x, dict) and "coefficients" in x)
    assert learned["entropy_after"] < learned["entropy_before"], learned
    assert "next-token" in learned["objective"] and list(learned["coefficients"]) == ["all"]
