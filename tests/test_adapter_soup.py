"""Adapter soups (merge/soup.py) and the command-line refusals of weight-only operations on
adapters that change activations."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import graftkit as gk
from conftest import logits, tiny_inputs, tiny_llama
from graftkit.errors import ConfigError, UnsupportedError
from graftkit.io.native import AdapterFile, apply_adapter
from graftkit.merge.soup import SoupError, adapter_soup
from test_train import assets, cls_recipe  # noqa: F401  (module fixture: a tiny BERT with a tokenizer, toy data)

IDS = tiny_inputs()
HOULSBY = {"method": "houlsby", "reduction_factor": 4}
CLI_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def trained(path: Path, config: dict = HOULSBY, seed: int = 0, model_seed: int = 0, start: Path | None = None) -> Path:
    """An adapter as if trained: ``start``'s tensors (or a fresh adapter) plus seeded noise."""
    model = gk.load_adapter(tiny_llama(model_seed), start) if start else gk.inject(tiny_llama(model_seed), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gk.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return gk.save_adapter(model, path)


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("soup")
    return [trained(root / f"a{i}", seed=i) for i in range(3)]


def soup_config(models, method="linear", weights=None, **extra) -> dict:
    return {"merge_method": method, **extra,
            "models": [{"model": str(m), **({"parameters": {"weight": weights[i]}} if weights else {})} for i, m in enumerate(models)]}


def test_linear_soup_is_the_weighted_average_and_runs(three, tmp_path):
    out = gk.merge(soup_config(three, weights=[1.0, 2.0, 3.0]), tmp_path / "soup")
    soup = gk.read_adapter(out)
    inputs = [gk.read_adapter(p) for p in three]
    assert soup.method == "houlsby" and soup.meta["config"] == inputs[0].meta["config"]
    assert soup.targets == inputs[0].targets and soup.meta["soup"]["merge_method"] == "linear"
    assert sorted(soup.tensors) == sorted(inputs[0].tensors)
    hand = {k: (1 * inputs[0].tensors[k] + 2 * inputs[1].tensors[k] + 3 * inputs[2].tensors[k]) / 6 for k in soup.tensors}
    for k, t in soup.tensors.items():
        torch.testing.assert_close(t, hand[k], rtol=1e-6, atol=1e-7)
    # the soup loads onto the base and runs as one adapter: the hand-averaged tensors' output
    model = gk.load_adapter(tiny_llama(), out)
    expected = logits(apply_adapter(tiny_llama(), AdapterFile(inputs[0].meta, hand)), IDS)
    torch.testing.assert_close(logits(model, IDS), expected)
    assert not torch.allclose(logits(model, IDS), logits(tiny_llama(), IDS), atol=1e-3)
    # the Python function is the same merge (uniform weights by default)
    fn = gk.read_adapter(gk.adapter_soup(three, tmp_path / "fn"))
    for k, t in fn.tensors.items():
        torch.testing.assert_close(t, sum(a.tensors[k] for a in inputs) / 3, rtol=1e-6, atol=1e-7)


def test_task_arithmetic_is_relative_to_the_starting_adapter(tmp_path):
    start = trained(tmp_path / "start", seed=9)
    a, b = trained(tmp_path / "a", seed=1, start=start), trained(tmp_path / "b", seed=2, start=start)
    out = gk.merge(soup_config([a, b], "task_arithmetic", weights=[1.0, 0.5], base_model=str(start), parameters={"lambda": 0.5}),
                   tmp_path / "soup")
    s, ta, tb = (gk.read_adapter(p).tensors for p in (start, a, b))
    for k, t in gk.read_adapter(out).tensors.items():
        torch.testing.assert_close(t, s[k] + 0.5 * (1.0 * (ta[k] - s[k]) + 0.5 * (tb[k] - s[k])), rtol=1e-6, atol=1e-6)
    # the base model's folder is no starting adapter: refused, saying why
    tiny_llama().save_pretrained(tmp_path / "base")
    with pytest.raises(ConfigError, match="needs base_model to be the adapter they were all trained from.*down-projection starts random"):
        gk.merge(soup_config([a, b], "task_arithmetic", base_model=str(tmp_path / "base")), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_linear_soup_checks_a_model_base(three, tmp_path):
    tiny_llama(seed=5).save_pretrained(tmp_path / "other")
    with pytest.raises(gk.GraftError, match="different base model|base model"):
        gk.merge(soup_config(three, base_model=str(tmp_path / "other")), tmp_path / "x")
    tiny_llama().save_pretrained(tmp_path / "base")
    gk.merge(soup_config(three, base_model=str(tmp_path / "base")), tmp_path / "ok")


def test_dry_run_describes_the_soup(three, tmp_path):
    from graftkit.merge.api import dry_run

    text = dry_run(soup_config(three), tmp_path / "out")
    assert "adapter soup: linear of 3 houlsby adapters" in text and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> dict[str, Path]:
    """Adapters that do not go with ``three``."""
    root = tmp_path_factory.mktemp("odd")
    lora = gk.inject(tiny_llama(), gk.LoRAConfig(r=2, targets=["q_proj"]))
    tiny_llama().save_pretrained(root / "model")
    return {
        "config": trained(root / "config", {"method": "houlsby", "reduction_factor": 8}),
        "method": trained(root / "method", {"method": "pfeiffer", "reduction_factor": 4}),
        "base": trained(root / "base", model_seed=3),
        "lora": gk.save_adapter(lora, root / "lora"),
        "model": root / "model",
    }


@pytest.mark.parametrize("which,method,error,needles", [
    ("config", "linear", SoupError, ["differ in their houlsby config", "reduction_factor 4.0 vs 8.0"]),
    ("method", "linear", SoupError, ["is a pfeiffer adapter but", "is a houlsby adapter", "one method only"]),
    ("base", "linear", SoupError, ["trained on different base models", "fingerprints differ"]),
    ("lora", "linear", SoupError, ["is a lora adapter but", "one method only"]),
    ("model", "linear", SoupError, ["is not a graftkit adapter folder", "houlsby adapters"]),
    (None, "ties", UnsupportedError, ["merge_method ties cannot merge houlsby adapters", "no weight delta", "linear or task_arithmetic"]),
    (None, "dare_linear", UnsupportedError, ["merge_method dare_linear cannot merge houlsby adapters"]),
])
def test_soup_refusals(three, odd, tmp_path, which, method, error, needles):
    models = [*three[:2], odd[which]] if which else three
    extra = {"base_model": str(odd["model"])} if method != "linear" else {}
    with pytest.raises(error) as err:
        gk.merge(soup_config(models, method, **extra), tmp_path / "out")
    msg = str(err.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    assert not (tmp_path / "out").exists()


def test_force_mixes_bases(three, odd, tmp_path):
    gk.merge(soup_config([three[0], odd["base"]]), tmp_path / "out", force=True)
    assert gk.read_adapter(tmp_path / "out").method == "houlsby"


def test_soup_of_weight_delta_adapters_is_refused(odd, tmp_path):
    with pytest.raises(UnsupportedError, match="merge in weight space"):
        adapter_soup([odd["lora"], odd["lora"]], tmp_path / "out")


@pytest.mark.parametrize("extra,needle", [
    ({"exclude": ["lm_head"]}, "exclude does not apply to an adapter soup"),
    ({"output": "adapter", "rank": 4}, "output: adapter writes a merge as a LoRA"),
])
def test_soup_refuses_options_it_cannot_honour(three, tmp_path, extra, needle):
    with pytest.raises(ConfigError, match=needle):
        gk.merge({**soup_config(three), **extra}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_soup_of_compose_adapters(tmp_path):
    config = {"method": "compose", "methods": [{"method": "parallel_adapter", "reduction_factor": 4},
                                               {"method": "lora", "targets": ["q_proj"], "r": 2}]}
    a, b = trained(tmp_path / "a", config, seed=1), trained(tmp_path / "b", config, seed=2)
    soup = gk.read_adapter(adapter_soup([a, b], tmp_path / "soup"))
    ta, tb = gk.read_adapter(a).tensors, gk.read_adapter(b).tensors
    for k, t in soup.tensors.items():
        torch.testing.assert_close(t, (ta[k] + tb[k]) / 2)
    gk.load_adapter(tiny_llama(), tmp_path / "soup")


# -- the command line: real ``graft`` processes ----------------------------------------------------

def graft(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graftkit.cli", *map(str, args)], cwd=cwd, env=CLI_ENV,
                          capture_output=True, text=True, timeout=120)


def refused(res: subprocess.CompletedProcess, *needles: str) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("graft: error: "), res.stderr
    assert all(n in lines[0] for n in needles), lines[0]


def test_cli_merge_writes_a_soup(three, tmp_path, capsys):
    from graftkit.cli import main

    (tmp_path / "soup.yml").write_text(yaml.safe_dump(soup_config(three)))
    assert main(["merge", str(tmp_path / "soup.yml"), str(tmp_path / "soup")]) == 0
    assert "adapter soup written to" in capsys.readouterr().out
    assert json.loads((tmp_path / "soup" / "adapter.json").read_text())["soup"]["merge_method"] == "linear"


def test_cli_weight_only_refusals(three, tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    # export --merged of a houlsby adapter
    refused(graft("export", three[0], "--base", tmp_path / "base", "--merged", tmp_path / "m", cwd=tmp_path),
            "export --merged needs a weight delta", "houlsby adapter has none")
    assert not (tmp_path / "m").exists()
    # a TIES merge of houlsby adapters
    (tmp_path / "ties.yml").write_text(yaml.safe_dump(soup_config(three, "ties", base_model=str(tmp_path / "base"))))
    refused(graft("merge", tmp_path / "ties.yml", tmp_path / "t", cwd=tmp_path), "merge_method ties cannot merge houlsby adapters")
    assert not (tmp_path / "t").exists()


def test_cli_recipe_exporting_a_houlsby_adapter_merged_is_refused(assets, tmp_path):
    recipe = cls_recipe(assets, tmp_path / "run", method=HOULSBY, output={"export": ["merged"]})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    refused(graft("train", tmp_path / "r.yaml", "--no-progress", cwd=tmp_path), "output.export merged", "houlsby adapter has none",
            "drop merged from output.export")
    assert not (tmp_path / "run").exists()
