"""FourierFT (methods/fourierft.py): peft parity both ways (Linear and GPT-2's Conv1D, per-module
n_frequency), the formula against a hand-written inverse DFT, the seeded entries as peft draws them,
the start (random by default, zero with init_weights), one-line refusals, and a training run that learns."""
from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

import graftkit as gk
from conftest import logits, tiny_gpt2, tiny_inputs, tiny_llama
from graftkit.errors import ConfigError, GraftError, UnsupportedError
from graftkit.methods.fourierft import fourier_formula, spectral_entries
from test_bad_input import check_cli_error, check_error
from test_peft_parity import perturb
from test_train import assets, cls_recipe, losses  # noqa: F401  (assets is a fixture)

peft = pytest.importorskip("peft")

ATOL = 1e-5
IDS = tiny_inputs()
BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2}
CASES = {
    # a full module name as a pattern key selects that one module (peft's fallback lookup); a plain suffix
    # (".*\.c_fc$") every c_fc
    "llama": dict(n_frequency=50, scaling=20.0, random_loc_seed=5, target_modules=["q_proj", "down_proj"],
                  n_frequency_pattern={"model.layers.1.mlp.down_proj": 30}),
    "gpt2": dict(n_frequency=40, scaling=30.0, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, n_frequency_pattern={"c_fc": 25}),
}


def peft_model(case: str, seed: int = 3):
    model = peft.get_peft_model(BUILD[case](), peft.FourierFTConfig(**CASES[case], task_type="CAUSAL_LM"))
    assert perturb([p for p in model.parameters() if p.requires_grad], seed) > 0
    return model.eval()


@pytest.mark.parametrize("case", CASES)
def test_peft_folder_loads_and_exports_back(case, tmp_path):
    """(a) peft folder -> graftkit: same logits; (b) graftkit -> peft folder -> peft: same logits."""
    pm = peft_model(case)
    ref = logits(pm, IDS)
    assert (ref - logits(BUILD[case](), IDS)).abs().max() > 1e-2
    pm.save_pretrained(tmp_path / "peft")
    model = gk.load_adapter(BUILD[case](), tmp_path / "peft")
    sizes = sorted({s.fourierft_spectrum.numel() for s in gk.sites(model).values()})
    assert len(sizes) == 2  # the pattern's odd n_frequency survived
    torch.testing.assert_close(logits(model, IDS), ref, atol=ATOL, rtol=0)
    gk.save_adapter(model, tmp_path / "again", format="peft")
    back = peft.PeftModel.from_pretrained(BUILD[case](), tmp_path / "again").eval()
    torch.testing.assert_close(logits(back, IDS), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_merged_export_and_graft_merge_equal_peft_merge_and_unload(case, tmp_path):
    from merge_helpers import load_folder

    BUILD[case]().save_pretrained(tmp_path / "base")
    pm = peft_model(case)
    pm.save_pretrained(tmp_path / "peft")
    theirs = pm.merge_and_unload().eval()
    out = gk.export_merged(tmp_path / "peft", tmp_path / "base", tmp_path / "merged")
    ours = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(ours, IDS), logits(theirs, IDS), atol=ATOL, rtol=0)
    merged = load_folder(gk.merge({"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"), "dtype": "float32",
                                   "models": [{"model": str(tmp_path / "peft"), "parameters": {"weight": 1.0}}]}, tmp_path / "tm"))
    state = theirs.state_dict()
    for key, value in merged.items():
        if key in state:
            torch.testing.assert_close(value, state[key], atol=ATOL, rtol=0)


def test_native_adapter_with_a_per_module_size_exports_to_peft(tmp_path):
    model = gk.inject(tiny_llama(), {"method": "fourierft", "n_frequency": 64, "scaling": 25.0, "random_loc_seed": 11,
                                     "targets": ["k_proj", "up_proj"], "n_frequency_pattern": {"model.layers.0.mlp.up_proj": 33}})
    assert perturb(gk.trainable_parameters(model), seed=5) > 0
    ref = logits(model, IDS)
    gk.save_adapter(model, tmp_path / "native")
    gk.save_adapter(gk.load_adapter(tiny_llama(), tmp_path / "native"), tmp_path / "peft", format="peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["n_frequency_pattern"] == {"model.layers.0.mlp.up_proj": 33} and cfg["random_loc_seed"] == 11
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(theirs, IDS), ref, atol=ATOL, rtol=0)
    gk.merge_adapter(model)
    torch.testing.assert_close(logits(theirs.merge_and_unload(), IDS), logits(model, IDS), atol=ATOL, rtol=0)


# -- the math --------------------------------------------------------------------------------------

def test_formula_is_the_inverse_dft_by_hand():
    out_f, in_f, n, seed, scaling = 3, 4, 5, 9, 7.0
    c = torch.randn(n, generator=torch.Generator().manual_seed(0))
    got = fourier_formula("linear", torch.zeros(out_f, in_f), {"fourierft_spectrum": c}, {"random_loc_seed": seed, "scaling": scaling})
    rows, cols = spectral_entries(out_f, in_f, n, seed)
    assert len({(int(u), int(v)) for u, v in zip(rows, cols)}) == n  # n distinct entries
    want = torch.zeros(out_f, in_f, dtype=torch.float64)
    for j in range(out_f):
        for k in range(in_f):
            # Re(1/(MN) sum c e^{+2 pi i (u j / M + v k / N)}) for real c
            want[j, k] = sum(float(c[t]) * math.cos(2 * math.pi * (int(rows[t]) * j / out_f + int(cols[t]) * k / in_f))
                             for t in range(n)) * scaling / (out_f * in_f)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    # Conv1D's stored (in, out) weight: the same (out, in) delta (peft's fan_in_fan_out)
    torch.testing.assert_close(fourier_formula("conv1d", torch.zeros(in_f, out_f), {"fourierft_spectrum": c},
                                               {"random_loc_seed": seed, "scaling": scaling}), got)


def test_entries_are_peft_s():
    pm = peft.get_peft_model(tiny_gpt2(), peft.FourierFTConfig(n_frequency=40, random_loc_seed=123, target_modules=["c_attn"],
                                                                 fan_in_fan_out=True))
    layer = pm.base_model.model.transformer.h[0].attn.c_attn
    assert torch.equal(spectral_entries(96, 32, 40, 123), layer.indices["default"])


def test_start_is_random_by_default_and_zero_with_init_weights():
    from graftkit.methods import method_named

    base = logits(tiny_llama(), IDS)
    torch.manual_seed(0)
    default = gk.inject(tiny_llama(), {"method": "fourierft", "n_frequency": 64, "scaling": 20.0, "targets": ["q_proj"]})
    assert (logits(default, IDS) - base).abs().max() > 1e-3
    zero = gk.inject(tiny_llama(), {"method": "fourierft", "n_frequency": 64, "scaling": 20.0, "targets": ["q_proj"], "init_weights": True})
    torch.testing.assert_close(logits(zero, IDS), base, atol=0, rtol=0)
    method = method_named("fourierft")
    assert not method.identity_at_init and method.identity_for({"init_weights": True})


# -- refusals ---------------------------------------------------------------------------------------

def test_peft_folder_training_biases_is_one_line(tmp_path):
    pm = peft.get_peft_model(tiny_llama(), peft.FourierFTConfig(n_frequency=20, target_modules=["q_proj"], bias="all"))
    pm.save_pretrained(tmp_path / "peft")
    model = tiny_llama()
    with pytest.raises(UnsupportedError) as ei:
        gk.load_adapter(model, tmp_path / "peft")
    check_error(ei, UnsupportedError, "FOURIERFT", "bias='all'")
    assert gk.get_state(model) is None
    check_cli_error(tmp_path, "import-peft", tmp_path / "peft", tmp_path / "native", needles=("bias='all'",))


def test_too_many_frequencies_is_one_line():
    model = tiny_llama()
    with pytest.raises(ConfigError) as ei:
        gk.inject(model, {"method": "fourierft", "n_frequency": 32 * 32 + 1, "targets": ["q_proj"]})
    check_error(ei, ConfigError, "n_frequency=1025", "1024")
    assert gk.get_state(model) is None


def test_corrupt_spectrum_is_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    model = gk.inject(tiny_llama(), {"method": "fourierft", "n_frequency": 16, "targets": ["q_proj"]})
    gk.save_adapter(model, tmp_path / "a")
    f = tmp_path / "a" / "adapter.safetensors"
    tensors = load_file(f)
    key = next(iter(tensors))
    tensors[key] = torch.zeros(17)
    save_file(tensors, f)
    with pytest.raises(GraftError) as ei:
        gk.load_adapter(tiny_llama(), tmp_path / "a")
    check_error(ei, GraftError, "n_frequency=16", "17")


# -- a run learns -----------------------------------------------------------------------------------

def test_classification_run_learns(assets, tmp_path):
    from graftkit.train import parse_recipe, train

    out = tmp_path / "run"
    recipe = cls_recipe(assets, out, method={"method": "fourierft", "n_frequency": 100, "scaling": 100.0,
                                             "targets": ["query", "value", "dense"]},
                        optim={"lr": 3e-2}, output={"export": ["peft"]})
    summary = train(parse_recipe(recipe), progress=False)
    ls = losses(out)
    assert sum(ls[-4:]) / 4 < 0.5 * sum(ls[:4]) / 4, ls
    assert summary["final_loss"] < summary["first_loss"]
    assert json.loads((out / "adapter-peft" / "adapter_config.json").read_text())["peft_type"] == "FOURIERFT"
