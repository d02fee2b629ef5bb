"""`exclude:` in the merge config: task-specific tensors (classification heads of different label
counts) are left out of the merge - not read, not shape-checked, not written."""
from __future__ import annotations

import importlib

import pytest
import torch
import transformers

import graftkit as gk
from conftest import tiny_bert
from graftkit.cli import main
from graftkit.errors import ConfigError, GraftError
from merge_helpers import load_folder, lora_with_head

M = importlib.import_module("graftkit.merge")  # gk.merge is the merge() function, not the package


def _noisy_bert(num_labels: int, seed: int):
    model = tiny_bert(0, num_labels=num_labels)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


@pytest.fixture(scope="module")
def cls_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    tiny_bert(0, num_labels=2).save_pretrained(root / "base")
    _noisy_bert(5, 1).save_pretrained(root / "ft5")
    _noisy_bert(2, 2).save_pretrained(root / "ft2")
    return root


def _cfg(root, inputs=("ft5", "ft2"), **extra):
    cfg = {"merge_method": "ties", "base_model": str(root / "base"), "dtype": "float32",
           "models": [{"model": str(root / m), "parameters": {"weight": w, "density": 0.5}} for m, w in zip(inputs, [1.0, 0.6])]}
    cfg.update(extra)
    return cfg


def test_heads_of_different_label_counts_merge_with_exclude(cls_models, tmp_path, ids, monkeypatch):
    from graftkit.tensors import Checkpoint

    read, get, map_range = [], Checkpoint.get, Checkpoint.map_range
    monkeypatch.setattr(Checkpoint, "get", lambda self, key: read.append(key) or get(self, key))
    monkeypatch.setattr(Checkpoint, "map_range", lambda self, key, *a: read.append(key) or map_range(self, key, *a))
    out = gk.merge(_cfg(cls_models, exclude=["classifier.*"]), tmp_path / "m")
    monkeypatch.undo()
    assert read and not any(k.startswith("classifier.") for k in read)  # excluded tensors are never read
    merged = load_folder(out)
    assert not any(k.startswith("classifier.") for k in merged)
    base = load_folder(cls_models / "base")
    assert set(merged) == {k for k in base if not k.startswith("classifier.")}
    key = "bert.encoder.layer.1.intermediate.dense.weight"
    fts = [load_folder(cls_models / m) for m in ("ft5", "ft2")]
    want = M.ties_merge(base[key], torch.stack([f[key] - base[key] for f in fts]), weight=[1.0, 0.6], density=0.5)
    assert torch.allclose(merged[key], want, atol=1e-7)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out, num_labels=4)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (ids.shape[0], 4) and torch.isfinite(logits).all()
    assert gk.merge(_cfg(cls_models, exclude=["re:classifier\\..*"]), tmp_path / "rx").exists()


def test_without_exclude_the_error_names_the_key_both_shapes_and_exclude(cls_models, tmp_path):
    with pytest.raises(GraftError) as err:
        gk.merge(_cfg(cls_models), tmp_path / "m")
    msg = str(err.value)
    # the first mismatching key (bias or weight, in file order) with both shapes
    assert ("classifier.bias" in msg and "(2,)" in msg and "(5,)" in msg) or ("classifier.weight" in msg and "(2, 32)" in msg and "(5, 32)" in msg)
    assert 'exclude: ["classifier.*"]' in msg
    assert "\n" not in msg
    assert not (tmp_path / "m").exists()


def test_a_pattern_that_matches_nothing_is_a_one_line_error(cls_models, tmp_path):
    with pytest.raises(ConfigError) as err:
        gk.merge(_cfg(cls_models, exclude=["classifier.*", "clasifier_head.*"]), tmp_path / "m")
    assert "'clasifier_head.*'" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="regular expression"):
        gk.merge(_cfg(cls_models, exclude=["re:classifier.("]), tmp_path / "m")


def test_dry_run_lists_the_excluded_tensors(cls_models, tmp_path, capsys):
    import yaml

    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(_cfg(cls_models, exclude=["classifier"])))
    assert main(["merge", str(path), str(tmp_path / "out"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "excluded      2 tensor(s)" in text and "classifier.bias" in text and "classifier.weight" in text


@pytest.fixture(scope="module")
def head_adapters(cls_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    made = [lora_with_head(root / "a5", 5, 1, "native", 1.0), lora_with_head(root / "a2", 2, 2, "peft", 1.0)]
    head_adapters.deltas = [d for _, d in made]
    return [str(a) for a, _ in made]


def head_adapters_deltas():
    return head_adapters.deltas


def _adapter_cfg(cls_models, adapters, **extra):
    cfg = {"merge_method": "task_arithmetic", "base_model": str(cls_models / "base"), "dtype": "float32",
           "models": [{"model": a, "parameters": {"weight": w}} for a, w in zip(adapters, [0.5, 0.5])]}
    cfg.update(extra)
    return cfg


def test_lora_inputs_with_heads_trained_whole_merge_with_exclude(cls_models, head_adapters, tmp_path, ids):
    with pytest.raises(GraftError, match=r"classifier\.(weight|bias).*\(5.*exclude"):
        gk.merge(_adapter_cfg(cls_models, head_adapters), tmp_path / "bad")
    out = gk.merge(_adapter_cfg(cls_models, head_adapters, exclude=["classifier.*"]), tmp_path / "m")
    merged = load_folder(out)
    assert not any(k.startswith("classifier.") for k in merged)
    # base + the weighted sum of the live adapters' deltas (as their LoRA layers compute them)
    base = load_folder(cls_models / "base")
    assert set(merged) == {k for k in base if not k.startswith("classifier.")}
    deltas = head_adapters_deltas()
    assert deltas[0] and set(deltas[0]) == set(deltas[1])
    for k in merged:
        want = base[k] + sum(0.5 * d[k] for d in deltas) if k in deltas[0] else base[k]
        assert torch.allclose(merged[k], want, atol=1e-6), k
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out, num_labels=2)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_adapter_output_with_heads_trained_whole_and_exclude(cls_models, head_adapters, tmp_path):
    with pytest.raises(GraftError, match="exclude"):
        gk.merge(_adapter_cfg(cls_models, head_adapters, output="adapter", rank=4), tmp_path / "bad")
    out = gk.merge(_adapter_cfg(cls_models, head_adapters, output="adapter", rank=4, exclude=["classifier"]), tmp_path / "a")
    adapter = gk.io.read_adapter(out)
    assert adapter.train_also == [] and not any("classifier" in k for k in adapter.tensors)
    assert all(".attention.self." in t for t in adapter.targets)
