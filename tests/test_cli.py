"""The ``graft`` command line, run as real subprocesses on tiny models saved to tmp_path."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

import graftkit as gk
from conftest import logits, tiny_inputs, tiny_llama

peft = pytest.importorskip("peft")

IDS = tiny_inputs()
# tiny models: one thread per CLI process, so it does not fight the test process for the cores
CLI_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
GRAFT = [sys.executable, "-m", "graftkit.cli"]


def graft(*args, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([*GRAFT, *map(str, args)], cwd=cwd, env=CLI_ENV, capture_output=True, text=True, timeout=120)
    if ok:
        assert res.returncode == 0, res.stderr
        assert "Traceback" not in res.stderr
    return res


@pytest.fixture
def base(tmp_path) -> Path:
    tiny_llama().save_pretrained(tmp_path / "base")
    return tmp_path / "base"


@pytest.fixture
def native(tmp_path):
    """(folder, in-memory adapted model) for a perturbed native LoRA on tiny_llama()."""
    model = gk.inject(tiny_llama(), gk.LoRAConfig(r=4, lora_alpha=8, targets=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in gk.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return gk.save_adapter(model, tmp_path / "native"), model


@pytest.fixture
def peft_dir(tmp_path):
    """(folder, peft model) for a perturbed peft LoRA on tiny_llama()."""
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                            init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft", pm


# -- start-up ------------------------------------------------------------------------------------

def test_help(tmp_path):
    t = time.perf_counter()
    res = graft("--help", cwd=tmp_path)
    print(f"graft --help: {time.perf_counter() - t:.2f} s")
    for command in ("inspect", "export", "import-peft"):
        assert command in res.stdout
    entry = Path(sys.executable).parent / "graft"
    if entry.exists():  # the installed console script
        res = subprocess.run([str(entry), "export", "--help"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "--merged" in res.stdout and "--peft" in res.stdout


def test_cli_import_is_light(tmp_path):
    code = ("import sys, graftkit.cli as c\n"
            "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('LOADED', [m for m in ('torch', 'transformers', 'safetensors', 'peft') if m in sys.modules])")
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    print(f"import graftkit.cli + --help: {time.perf_counter() - t:.2f} s")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "LOADED []"


# -- inspect -------------------------------------------------------------------------------------

def test_inspect_model_folder(base, tmp_path):
    model = tiny_llama()
    n = sum(p.numel() for p in model.parameters())
    info = json.loads(graft("inspect", base, "--json", cwd=tmp_path).stdout)
    assert info["kind"] == "model" and info["model_type"] == "llama"
    assert info["parameters"] == n and info["trainable_parameters"] == n
    assert info["tensors"] == len(model.state_dict()) and info["files"] == 1
    text = graft("inspect", base, cwd=tmp_path).stdout
    assert f"{n:,} in {len(model.state_dict())} tensors" in text
    assert "LlamaForCausalLM" in text


def test_inspect_native_adapter(native, tmp_path):
    folder, model = native
    trainable, total = gk.count_parameters(model)
    info = json.loads(graft("inspect", folder, "--json", cwd=tmp_path).stdout)
    assert (info["kind"], info["format"], info["method"]) == ("adapter", "native", "lora")
    assert info["trainable_parameters"] == trainable
    assert info["base_parameters"] == total
    assert info["targets"] == 6 and len(info["target_names"]) == 6  # 3 modules x 2 layers
    assert info["config"]["r"] == 4
    text = graft("inspect", folder, cwd=tmp_path).stdout
    assert f"{trainable:,} ({100 * trainable / total:.3f}% of {total:,} base parameters)" in text
    assert "targets" in text and "6: " in text


def test_inspect_peft_adapter(peft_dir, tmp_path):
    folder, pm = peft_dir
    trainable, _ = pm.get_nb_trainable_parameters()
    info = json.loads(graft("inspect", folder, "--json", cwd=tmp_path).stdout)
    assert (info["kind"], info["format"], info["method"]) == ("adapter", "peft", "lora")
    assert info["trainable_parameters"] == trainable
    assert info["targets"] == 4
    text = graft("inspect", folder, cwd=tmp_path).stdout
    assert f"{trainable:,}" in text and "(peft)" in text and "4: " in text
    # a peft folder does not record the size of its base
    assert info["base_parameters"] in (None, sum(p.numel() for p in tiny_llama().parameters()))


# -- export / import -----------------------------------------------------------------------------

def test_export_merged(native, base, tmp_path):
    folder, model = native
    ref = logits(model, IDS)
    out = tmp_path / "merged"
    res = graft("export", folder, "--base", base, "--merged", out, "--max-shard-size", "40KB", cwd=tmp_path)
    assert str(out) in res.stdout
    shards = sorted(out.glob("model*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    provenance = json.loads((out / "graft_provenance.json").read_text())
    assert provenance["method"] == "lora"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(loaded, IDS), ref, atol=1e-5, rtol=0)
    gk.merge_adapter(model)  # the merged folder equals the in-memory merge, weight by weight
    state = loaded.state_dict()
    for name, value in model.state_dict().items():
        if "graft_adapter" not in name:
            torch.testing.assert_close(state[name], value, atol=1e-6, rtol=0)
    assert not list(tmp_path.glob(".*tmp-*"))


def test_export_peft(native, base, tmp_path):
    folder, model = native
    out = tmp_path / "as-peft"
    graft("export", folder, "--base", base, "--peft", out, cwd=tmp_path)
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), out).eval()
    torch.testing.assert_close(logits(theirs, IDS), logits(model, IDS), atol=1e-5, rtol=0)


def test_export_native_from_peft(peft_dir, base, tmp_path):
    folder, pm = peft_dir
    out = tmp_path / "as-native"
    graft("export", folder, "--base", base, "--native", out, cwd=tmp_path)
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["method"] == "lora" and meta["base_model"]["fingerprint"]
    model = gk.load_adapter(tiny_llama(), out)
    torch.testing.assert_close(logits(model, IDS), logits(pm, IDS), atol=1e-5, rtol=0)


def test_import_peft(peft_dir, base, tmp_path):
    folder, pm = peft_dir
    out = tmp_path / "imported"
    res = graft("import-peft", folder, out, "--base", base, cwd=tmp_path)
    assert "lora, 4 targets" in res.stdout
    model = gk.load_adapter(tiny_llama(), out)  # fingerprint recorded from --base: it checks
    torch.testing.assert_close(logits(model, IDS), logits(pm, IDS), atol=1e-5, rtol=0)
    with pytest.raises(gk.GraftError):
        gk.load_adapter(tiny_llama(seed=1), out)
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["base_model"]["fingerprint"]["num_parameters"] == sum(p.numel() for p in tiny_llama().parameters())
