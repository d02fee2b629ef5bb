"""LoHa and LoKr (methods/loha.py, methods/lokr.py): peft parity both ways on transformers models and
on a tiny CNN (Conv2d, incl. the effective-conv2d CP form), the formulas against hand computations,
LyCORIS's factorization, the training-time dropouts, one-line refusals, and a training run that learns."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch import nn

import graftkit as gk
from conftest import logits, tiny_gpt2, tiny_inputs, tiny_llama
from graftkit.errors import GraftError, UnsupportedError
from graftkit.methods.loha import loha_formula
from graftkit.methods.lokr import factorization, lokr_formula
from test_bad_input import check_cli_error, check_error
from test_peft_parity import perturb
from test_train import assets, cls_recipe, losses  # noqa: F401  (assets is a fixture)

peft = pytest.importorskip("peft")

ATOL = 1e-5
IDS = tiny_inputs()

# id: (peft config class, kwargs in peft's names; graftkit's configs take the same names)
CASES = {
    "loha": ("LoHaConfig", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 2},
                                alpha_pattern={"v_proj": 3}, rank_dropout=0.2, module_dropout=0.1)),
    "lokr": ("LoKrConfig", dict(r=2, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], decompose_both=True,
                                rank_pattern={"up_proj": 16})),
    "lokr-factor": ("LoKrConfig", dict(r=3, alpha=5, target_modules=["q_proj", "down_proj"], decompose_factor=4,
                                       rank_dropout=0.3, rank_dropout_scale=True, module_dropout=0.2)),
}


def peft_model(case: str, seed: int = 3):
    cls, kw = CASES[case]
    model = peft.get_peft_model(tiny_llama(), getattr(peft, cls)(**kw, task_type="CAUSAL_LM", init_weights=False))
    assert perturb([p for p in model.parameters() if p.requires_grad], seed) > 0
    return model.eval()


@pytest.mark.parametrize("case", CASES)
def test_peft_folder_loads_and_exports_back(case, tmp_path):
    """(a) peft folder -> graftkit: same logits; (b) graftkit -> peft folder -> peft: same logits."""
    pm = peft_model(case)
    ref = logits(pm, IDS)
    assert (ref - logits(tiny_llama(), IDS)).abs().max() > 1e-2  # the adapter really acts
    pm.save_pretrained(tmp_path / "peft")
    model = gk.load_adapter(tiny_llama(), tmp_path / "peft")
    assert gk.get_state(model).method == CASES[case][0][:4].lower()
    torch.testing.assert_close(logits(model, IDS), ref, atol=ATOL, rtol=0)
    gk.save_adapter(model, tmp_path / "again", format="peft")
    back = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "again").eval()
    torch.testing.assert_close(logits(back, IDS), ref, atol=ATOL, rtol=0)
    # the odd ranks and alphas survived both conversions
    _, kw = CASES[case]
    theirs = back.peft_config["default"]
    assert (theirs.r, theirs.alpha) == (kw["r"], kw["alpha"]) and len(theirs.rank_pattern) == 2 * len(kw.get("rank_pattern", {}))


@pytest.mark.parametrize("case", ["loha", "lokr"])
def test_merged_export_and_graft_merge_equal_peft_merge_and_unload(case, tmp_path):
    """(c) export --merged (the live site's merge) and graft merge (the saved tensors' formula) of a peft
    folder both equal peft's merge_and_unload."""
    from merge_helpers import load_folder

    tiny_llama().save_pretrained(tmp_path / "base")
    pm = peft_model(case)
    pm.save_pretrained(tmp_path / "peft")
    theirs = pm.merge_and_unload().eval()
    out = gk.export_merged(tmp_path / "peft", tmp_path / "base", tmp_path / "merged")
    ours = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(ours, IDS), logits(theirs, IDS), atol=ATOL, rtol=0)
    merged = load_folder(gk.merge({"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"), "dtype": "float32",
                                   "models": [{"model": str(tmp_path / "peft"), "parameters": {"weight": 1.0}}]}, tmp_path / "tm"))
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(merged[key], value, atol=ATOL, rtol=0)


def test_native_adapter_trains_saves_and_exports_to_peft(tmp_path):
    """(d) a graftkit LoKr made natively (decompose_both, a full W2 on one layer) loads in peft, and peft's
    merge of that export equals graftkit's."""
    model = gk.inject(tiny_llama(), {"method": "lokr", "r": 2, "alpha": 6, "decompose_both": True, "targets": ["k_proj", "up_proj"],
                                     "rank_pattern": {"up_proj": 8}, "init_weights": False})
    assert perturb(gk.trainable_parameters(model), seed=5) > 0
    ref = logits(model, IDS)
    gk.save_adapter(model, tmp_path / "native")
    gk.save_adapter(gk.load_adapter(tiny_llama(), tmp_path / "native"), tmp_path / "peft", format="peft")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(theirs, IDS), ref, atol=ATOL, rtol=0)
    gk.merge_adapter(model)
    torch.testing.assert_close(logits(theirs.merge_and_unload(), IDS), logits(model, IDS), atol=ATOL, rtol=0)


# -- Conv2d, on a tiny CNN built here ---------------------------------------------------------------

class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.point = nn.Conv2d(8, 6, 1)
        self.group = nn.Conv2d(6, 6, 3, groups=2)
        self.head = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.head(self.group(torch.relu(self.point(torch.relu(self.conv(x))))).flatten(1))


CNN_CASES = {
    "loha-cp": ("LoHaConfig", dict(r=2, alpha=3, use_effective_conv2d=True)),
    "loha-flat": ("LoHaConfig", dict(r=3, alpha=4)),
    "lokr-cp": ("LoKrConfig", dict(r=1, alpha=2, use_effective_conv2d=True, decompose_both=True, rank_pattern={"point": 4})),
    "lokr-full": ("LoKrConfig", dict(r=8, alpha=2)),
}
CNN_X = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", CNN_CASES)
def test_conv2d_parity_with_peft(case, tmp_path):
    from graftkit.io.peft import read_peft
    from graftkit.methods import method_named
    from graftkit.methods.base import SavedTarget

    cls, kw = CNN_CASES[case]
    pm = peft.get_peft_model(TinyCNN(), getattr(peft, cls)(**kw, target_modules=["conv", "point", "group", "head"], init_weights=False))
    perturb([p for p in pm.parameters() if p.requires_grad])
    pm.eval()
    with torch.no_grad():
        ref = pm(CNN_X)
        assert (ref - TinyCNN()(CNN_X)).abs().max() > 1e-2
    pm.save_pretrained(tmp_path / "peft")
    model = gk.load_adapter(TinyCNN().eval(), tmp_path / "peft")
    assert {s.kind for s in gk.sites(model).values()} == {"conv2d", "linear"}
    with torch.no_grad():
        torch.testing.assert_close(model(CNN_X), ref, atol=ATOL, rtol=0)
    gk.save_adapter(model, tmp_path / "again", format="peft")
    back = peft.PeftModel.from_pretrained(TinyCNN(), tmp_path / "again").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(CNN_X), ref, atol=ATOL, rtol=0)
    # merged weights: the live merge, and the saved tensors' formula (no target_kinds from peft for flat
    # conv factors: the 4-D base weight decides), both equal peft's merge_and_unload
    theirs = pm.merge_and_unload().state_dict()
    gk.merge_adapter(model)
    adapter = read_peft(tmp_path / "peft")
    method = method_named(adapter.method)
    base = TinyCNN().state_dict()
    for name in adapter.targets:
        torch.testing.assert_close(model.state_dict()[name], theirs[name], atol=ATOL, rtol=0)
        prefix = f"{name}."
        slots = {k[len(prefix):]: v for k, v in adapter.tensors.items() if k.startswith(prefix)}
        t = SavedTarget(name, slots, adapter.meta["config"], adapter.meta["target_options"][name], adapter.meta["target_kinds"].get(name),
                        tuple(base[name].shape), base, "peft", lambda kind, feedforward=False: None, adapter.tensors)
        (delta,) = method.merge_deltas(t).values()
        torch.testing.assert_close(base[name] + delta.fn(base[name]), theirs[name], atol=ATOL, rtol=0)


# -- the formulas against hand computations ------------------------------------------------------------

def test_loha_formula_by_hand():
    g = torch.Generator().manual_seed(0)
    w1a, w1b, w2a, w2b = (torch.randn(s, generator=g) for s in ((3, 2), (2, 4), (3, 2), (2, 4)))
    got = loha_formula("linear", torch.zeros(3, 4), {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b},
                       {"r": 2, "alpha": 5.0})
    want = torch.empty(3, 4)
    for o in range(3):
        for i in range(4):
            want[o, i] = 2.5 * sum(w1a[o, p] * w1b[p, i] for p in range(2)) * sum(w2a[o, p] * w2b[p, i] for p in range(2))
    torch.testing.assert_close(got, want)
    # the CP form of a conv kernel: rebuild[o, i, y, x] = sum_pq T[p, q, y, x] Wa[p, o] Wb[q, i], per factor
    t1, t2 = torch.randn(2, 2, 3, 3, generator=g), torch.randn(2, 2, 3, 3, generator=g)
    a1, b1, a2, b2 = (torch.randn(s, generator=g) for s in ((2, 5), (2, 4), (2, 5), (2, 4)))
    got = loha_formula("conv2d", torch.zeros(5, 4, 3, 3), {"hada_t1": t1, "hada_w1_a": a1, "hada_w1_b": b1, "hada_t2": t2,
                                                          "hada_w2_a": a2, "hada_w2_b": b2}, {"r": 2, "alpha": 1.0})

    def rebuild(t, a, b, o, i, y, x):
        return sum(t[p, q, y, x] * a[p, o] * b[q, i] for p in range(2) for q in range(2))

    o, i, y, x = 4, 1, 2, 0
    want = 0.5 * rebuild(t1, a1, b1, o, i, y, x) * rebuild(t2, a2, b2, o, i, y, x)
    assert got.shape == (5, 4 * 9)
    torch.testing.assert_close(got[o, i * 9 + y * 3 + x], want)


def test_lokr_formula_by_hand():
    g = torch.Generator().manual_seed(0)
    w1, w2a, w2b = torch.randn(2, 3, generator=g), torch.randn(4, 1, generator=g), torch.randn(1, 5, generator=g)
    got = lokr_formula("linear", torch.zeros(8, 15), {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b}, {"r": 1, "alpha": 3.0})
    w2 = w2a @ w2b
    for i in range(2):
        for j in range(4):
            for p in range(3):
                for q in range(5):  # kron: block (i, p) is w1[i, p] * W2
                    assert torch.isclose(got[i * 4 + j, p * 5 + q], 3.0 * w1[i, p] * w2[j, q])


def test_factorization_is_lycoris():
    from peft.tuners.lokr.layer import factorization as theirs

    assert factorization(256) == (16, 16) and factorization(128) == (8, 16) and factorization(127) == (1, 127)
    assert factorization(128, 4) == (4, 32) and factorization(12, 5) == (3, 4) and factorization(32, 16) == (16, 2)
    for dim in range(1, 400):
        for f in (-1, 1, 2, 3, 4, 5, 8, 16, 24):
            assert factorization(dim, f) == theirs(dim, f), (dim, f)


# -- training-time dropouts ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_dropouts_act_in_training_only(method):
    model = gk.inject(tiny_llama(), {"method": method, "r": 2, "targets": ["q_proj", "v_proj"], "init_weights": False,
                                     "rank_dropout": 0.5, "module_dropout": 0.3})
    plain = gk.inject(tiny_llama(), {"method": method, "r": 2, "targets": ["q_proj", "v_proj"], "init_weights": False})
    for a, b in zip(gk.trainable_parameters(model), gk.trainable_parameters(plain)):
        with torch.no_grad():
            b.copy_(a)
    model.eval()
    torch.testing.assert_close(logits(model, IDS), logits(plain.eval(), IDS), atol=0, rtol=0)
    model.train()
    torch.manual_seed(0)
    one = model(input_ids=IDS).logits
    two = model(input_ids=IDS).logits
    assert (one - two).abs().max() > 1e-4  # a different draw of dropped rows / layers per forward


# -- refusals ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case,option", [("loha", "use_tucker"), ("lokr", "use_scalar")])
def test_peft_folder_with_an_unknown_variant_option_is_one_line(case, option, tmp_path):
    pm = peft_model(case)
    pm.save_pretrained(tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    cfg[option] = True  # a LyCORIS variant peft 0.21's LoHa / LoKr do not have
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(cfg))
    model = tiny_llama()
    with pytest.raises(UnsupportedError) as ei:
        gk.load_adapter(model, tmp_path / "peft")
    check_error(ei, UnsupportedError, case.upper(), f"{option}=True")
    assert gk.get_state(model) is None
    check_cli_error(tmp_path, "import-peft", tmp_path / "peft", tmp_path / "native", needles=(option,))


def test_peft_folder_whose_rank_disagrees_with_its_config_is_one_line(tmp_path):
    pm = peft_model("loha")
    pm.save_pretrained(tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {}  # down_proj's factors are rank 2, the config now says 4
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(GraftError) as ei:
        gk.load_adapter(tiny_llama(), tmp_path / "peft")
    check_error(ei, GraftError, "down_proj", "rank-2", "r=4")


def test_gpt2_conv1d_adapter_is_native_only(tmp_path):
    model = gk.inject(tiny_gpt2(), {"method": "loha", "r": 2, "targets": ["c_attn"], "init_weights": False})
    ref = logits(model, IDS)
    gk.save_adapter(model, tmp_path / "native")
    torch.testing.assert_close(logits(gk.load_adapter(tiny_gpt2(), tmp_path / "native"), IDS), ref, atol=0, rtol=0)
    with pytest.raises(UnsupportedError) as ei:
        gk.save_adapter(model, tmp_path / "peft", format="peft")
    check_error(ei, UnsupportedError, "Conv1D", "format='native'")
    assert not (tmp_path / "peft").exists()


def test_corrupt_saved_factor_is_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    model = gk.inject(tiny_llama(), {"method": "lokr", "r": 2, "decompose_both": True, "targets": ["q_proj"], "init_weights": False})
    gk.save_adapter(model, tmp_path / "a")
    f = tmp_path / "a" / "adapter.safetensors"
    tensors = load_file(f)
    key = next(k for k in tensors if k.endswith("lokr_w2_b"))
    tensors[key] = torch.zeros(3, tensors[key].shape[1])
    save_file(tensors, f)
    with pytest.raises(GraftError) as ei:
        gk.load_adapter(tiny_llama(), tmp_path / "a")
    check_error(ei, GraftError, "lokr_w2_b", "r=2")


# -- a run learns --------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_classification_run_learns(method, assets, tmp_path):
    from graftkit.train import parse_recipe, train

    out = tmp_path / "run"
    recipe = cls_recipe(assets, out, method={"method": method, "r": 4, "alpha": 8, "targets": ["query", "value", "dense"]},
                        optim={"lr": 3e-2}, output={"export": ["peft"]})
    summary = train(parse_recipe(recipe), progress=False)
    ls = losses(out)
    assert sum(ls[-4:]) / 4 < 0.8 * sum(ls[:4]) / 4, ls
    assert summary["final_loss"] < summary["first_loss"]
    assert (out / "adapter-peft" / "adapter_config.json").exists()
    assert json.loads((out / "adapter-peft" / "adapter_config.json").read_text())["peft_type"] == method.upper()


@pytest.mark.parametrize("method,extra", [("loha", {"r": 3}), ("lokr", {"r": 2, "decompose_both": True}), ("lokr", {"r": 8})])
def test_factored_forward_equals_the_dense_delta(method, extra):
    """The cheaper forward (Khatri-Rao factors for LoHa, vec(W1 X W2^T) for LoKr) is the dense delta's product."""
    import torch.nn.functional as F

    model = gk.inject(tiny_llama(), {"method": method, "targets": ["q_proj", "down_proj"], "init_weights": False, **extra})
    x = {32: torch.randn(2, 5, 32), 64: torch.randn(2, 5, 64)}
    for site in gk.sites(model).values():
        got = site.factored_output(x[site.in_features])
        assert got is not None
        torch.testing.assert_close(got, F.linear(x[site.in_features], site.delta_matrix(site.base)), atol=1e-5, rtol=1e-5)


def test_bad_pattern_regex_is_one_line(tmp_path):
    from graftkit.errors import ConfigError, FileFormatError

    model = tiny_llama()
    with pytest.raises(ConfigError) as ei:
        gk.inject(model, {"method": "lokr", "targets": ["q_proj"], "rank_pattern": {"q_(": 2}})
    check_error(ei, ConfigError, "rank_pattern", "'q_('", "regular expression")
    assert gk.get_state(model) is None
    pm = peft_model("lokr")
    pm.save_pretrained(tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    cfg["alpha_pattern"] = {"up_proj[": 3}
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileFormatError) as ei:
        gk.load_adapter(tiny_llama(), tmp_path / "peft")
    check_error(ei, FileFormatError, "alpha_pattern", "up_proj[")
