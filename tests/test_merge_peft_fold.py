"""peft adapters of methods graftkit does not read natively (LoHa, LoKr, ...) enter a merge by
letting peft fold them into the base, one module at a time: the merge equals peft's own
merge_and_unload of the whole model."""
from __future__ import annotations

import pytest
import torch

import graftkit as gk
from conftest import tiny_llama
from graftkit.errors import GraftError
from merge_helpers import load_folder

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _config(kind: str):
    if kind == "hra":  # (LoHa and LoKr are read natively since issue 15: HRA is the folded method now)
        return peft.HRAConfig(r=4, target_modules=TARGETS, init_weights=False)
    if kind == "loha":
        return peft.LoHaConfig(r=4, alpha=8, target_modules=TARGETS, init_weights=False, rank_pattern={"up_proj": 2})
    return peft.LoKrConfig(r=4, alpha=8, target_modules=TARGETS, init_weights=False, decompose_both=True,
                           rank_pattern={"down_proj": 2})


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("fold") / "base"
    tiny_llama(0).save_pretrained(path)
    return path


def _adapter_and_reference(base_dir, out, kind: str):
    """A real peft adapter on the tiny Llama, and peft's merge_and_unload of the whole model."""
    torch.manual_seed(1)
    model = peft.get_peft_model(tiny_llama(0), _config(kind))
    model.save_pretrained(out)
    with torch.no_grad():
        merged = model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("kind", ["hra", "loha", "lokr"])
@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_folded_peft_adapter_equals_peft_merge_and_unload(base_dir, tmp_path, kind, method):
    reference = _adapter_and_reference(base_dir, tmp_path / kind, kind)
    cfg = {"merge_method": method, "base_model": str(base_dir), "dtype": "float32",
           "models": [{"model": str(tmp_path / kind), "parameters": {"weight": 1.0}}]}
    merged = load_folder(gk.merge(cfg, tmp_path / "out"))
    base = load_folder(base_dir)
    assert set(merged) == set(base)
    changed = 0
    for key, value in merged.items():
        assert torch.allclose(value, reference[key], atol=1e-5, rtol=0), key
        changed += not torch.equal(value, base[key])
    assert changed == 2 * len(TARGETS)  # every adapted weight of both layers moved, nothing else


def test_folded_input_mixes_with_models_and_keeps_the_rng(base_dir, tmp_path):
    reference = _adapter_and_reference(base_dir, tmp_path / "loha", "loha")
    base = load_folder(base_dir)
    state = torch.random.get_rng_state()
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base_dir), "dtype": "float32",
           "models": [{"model": str(tmp_path / "loha"), "parameters": {"weight": 0.5}},
                      {"model": str(base_dir), "parameters": {"weight": 1.0}}]}
    merged = load_folder(gk.merge(cfg, tmp_path / "out"))
    assert torch.equal(torch.random.get_rng_state(), state)
    key = "model.layers.1.self_attn.q_proj.weight"
    assert torch.allclose(merged[key], base[key] + 0.5 * (reference[key] - base[key]), atol=1e-6)


def test_shared_state_methods_and_a_missing_peft_are_one_line_errors(base_dir, tmp_path, monkeypatch):
    # VeRA is read natively now (a merge input of its own); VB-LoRA shares its vector bank across layers too
    model = peft.get_peft_model(tiny_llama(0), peft.VBLoRAConfig(r=4, vector_length=16, num_vectors=32, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "vblora")
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base_dir),
           "models": [{"model": str(tmp_path / "vblora")}]}
    with pytest.raises(GraftError, match="shared across layers") as err:
        gk.merge(cfg, tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()
    import sys

    _adapter_and_reference(base_dir, tmp_path / "hra", "hra")
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    cfg["models"] = [{"model": str(tmp_path / "hra")}]
    with pytest.raises(GraftError, match="pip install peft"):
        gk.merge(cfg, tmp_path / "out")
