"""VeRA (methods/vera.py): the formula by hand, the shared random pair saved exactly once (or
regenerated from its key), peft VERA parity both ways with the installed peft, bad files in one line,
and a short classification run whose loss goes down."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import graftkit as gk
from graftkit.errors import AdapterError, FileFormatError, UnsupportedError
from graftkit.methods.vera import projection, vera_formula
from conftest import logits, tiny_gpt2, tiny_inputs, tiny_llama
from test_train import assets, cls_recipe, losses  # noqa: F401  (assets is a fixture)

peft = pytest.importorskip("peft")

ATOL = 1e-5
IDS = tiny_inputs()
BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"]}


def vera(model: str, **kw) -> dict:
    return {"method": "vera", "r": 4, "targets": TARGETS[model], **kw}


@torch.no_grad()
def perturb(params, seed: int = 3, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g) * scale)


def make_peft(model: str, save_projection: bool = True, key: int = 0):
    cfg = peft.VeraConfig(r=4, target_modules=TARGETS[model], save_projection=save_projection, projection_prng_key=key,
                          init_weights=False, task_type="CAUSAL_LM", fan_in_fan_out=model == "gpt2")
    pm = peft.get_peft_model(BUILD[model](), cfg)
    perturb([p for p in pm.parameters() if p.requires_grad])
    return pm.eval()


# -- the math ----------------------------------------------------------------------------------

def test_projection_is_peft_draw():
    from peft.tuners.vera.model import _kaiming_init

    g = torch.Generator(device="cpu").manual_seed(7)
    want_a, want_b = _kaiming_init((5, 24), generator=g), _kaiming_init((17, 5), generator=g)
    a, b = projection(5, 17, 24, 7)
    assert torch.equal(a, want_a) and torch.equal(b, want_b)
    assert not torch.equal(projection(5, 17, 24, 8)[0], a)  # the key matters


def test_formula_by_hand():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 9, generator=g), torch.randn(8, 3, generator=g)
    lb, ld = torch.randn(5, generator=g), torch.randn(3, generator=g)
    w = torch.zeros(5, 7)  # a (out 5, in 7) linear weight: slices A[:, :7] and B[:5]
    want = torch.zeros(5, 7)
    for i in range(5):
        for j in range(7):
            want[i, j] = sum(lb[i] * b[i, k] * ld[k] * a[k, j] for k in range(3))
    got = vera_formula("linear", w, {"vera_lambda_b": lb, "vera_lambda_d": ld, "vera_A": a, "vera_B": b}, {})
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # GPT-2's Conv1D stores (in, out): the same canonical delta
    got = vera_formula("conv1d", w.t(), {"vera_lambda_b": lb, "vera_lambda_d": ld, "vera_A": a, "vera_B": b}, {})
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_shared_pair_is_one_frozen_tensor_and_only_vectors_train():
    model = gk.inject(tiny_llama(), vera("llama"))
    sites = list(gk.sites(model).values())
    a, b = sites[0].shared()
    assert a.shape == (4, 64) and b.shape == (32, 4)  # the largest in (down_proj: 64) and out (32)
    assert all(s.shared()[0] is a and s.shared()[1] is b for s in sites)
    assert not a.requires_grad and not b.requires_grad
    trainable = gk.trainable_parameters(model)
    assert sum(p.numel() for p in trainable) == sum(s.out_features + 4 for s in sites)
    assert torch.equal(logits(model, IDS), logits(tiny_llama(), IDS))  # lambda_b = 0: the identity


# -- saved once, or regenerated ----------------------------------------------------------------

@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_shared_pair_saved_exactly_once(model, tmp_path):
    m = gk.inject(BUILD[model](), vera(model, init_weights=False))
    out = logits(m, IDS)
    gk.save_adapter(m, tmp_path / "a")
    keys = list(load_file(str(tmp_path / "a" / "adapter.safetensors")))
    assert len([k for k in keys if k.endswith(".vera_A")]) == 1 and len([k for k in keys if k.endswith(".vera_B")]) == 1
    assert len([k for k in keys if k.endswith(".vera_lambda_b")]) == len(gk.sites(m))
    fresh = gk.load_adapter(BUILD[model](), tmp_path / "a")
    assert torch.equal(logits(fresh, IDS), out)


def test_inspect_counts_the_vectors_as_trainable(tmp_path, capsys):
    from graftkit.cli import main as graft_main

    m = gk.inject(tiny_llama(), vera("llama"))
    gk.save_adapter(m, tmp_path / "a")
    capsys.readouterr()
    assert graft_main(["inspect", str(tmp_path / "a"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["trainable_parameters"] == sum(p.numel() for p in gk.trainable_parameters(m)) == 6 * 4 + 2 * (32 + 16 + 32)


def test_unsaved_pair_is_regenerated_from_the_key(tmp_path):
    m = gk.inject(tiny_llama(), vera("llama", init_weights=False, save_projection=False, projection_prng_key=11))
    out = logits(m, IDS)
    gk.save_adapter(m, tmp_path / "a")
    keys = list(load_file(str(tmp_path / "a" / "adapter.safetensors")))
    assert not any(k.endswith((".vera_A", ".vera_B")) for k in keys)
    meta = json.loads((tmp_path / "a" / "adapter.json").read_text())
    assert all(o["projection"] == [32, 64] for o in meta["target_options"].values())
    assert torch.equal(logits(gk.load_adapter(tiny_llama(), tmp_path / "a"), IDS), out)
    # a merge without the model regenerates the same pair
    tiny_llama().save_pretrained(tmp_path / "base")
    merged = transformers.AutoModelForCausalLM.from_pretrained(gk.export_merged(tmp_path / "a", tmp_path / "base", tmp_path / "m")).eval()
    torch.testing.assert_close(logits(merged, IDS), out, atol=ATOL, rtol=0)


# -- peft parity -------------------------------------------------------------------------------

CASES = [("llama", True), ("llama", False), ("gpt2", True), ("gpt2", False)]


@pytest.mark.parametrize("model,save", CASES)
def test_peft_folder_loads_into_graftkit_and_back(model, save, tmp_path):  # (a) and (b)
    pm = make_peft(model, save, key=3)
    ref = logits(pm, IDS)
    assert (ref - logits(BUILD[model](), IDS)).abs().max() > 1e-2
    pm.save_pretrained(tmp_path / "peft")
    ours = gk.load_adapter(BUILD[model](), tmp_path / "peft")
    torch.testing.assert_close(logits(ours, IDS), ref, atol=ATOL, rtol=0)
    gk.save_adapter(ours, tmp_path / "again", format="peft")
    keys = list(load_file(str(tmp_path / "again" / "adapter_model.safetensors")))
    assert ("base_model.vera_A" in keys) == save
    back = peft.PeftModel.from_pretrained(BUILD[model](), tmp_path / "again").eval()
    torch.testing.assert_close(logits(back, IDS), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_merged_export_matches_peft_merge_and_unload(model, tmp_path):  # (c)
    BUILD[model]().save_pretrained(tmp_path / "base")
    pm = make_peft(model)
    pm.save_pretrained(tmp_path / "peft")
    out = gk.export_merged(tmp_path / "peft", tmp_path / "base", tmp_path / "merged")
    ours = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(ours, IDS), logits(pm.merge_and_unload().eval(), IDS), atol=ATOL, rtol=0)


def test_native_adapter_exported_to_peft(tmp_path):  # (d)
    m = gk.inject(tiny_gpt2(), vera("gpt2", projection_prng_key=9))
    perturb(gk.trainable_parameters(m), seed=5)
    ref = logits(m, IDS)
    gk.save_adapter(m, tmp_path / "peft", format="peft")
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(theirs, IDS), ref, atol=ATOL, rtol=0)
    gk.merge_adapter(m)
    torch.testing.assert_close(logits(theirs.merge_and_unload(), IDS), logits(m, IDS), atol=ATOL, rtol=0)


# -- bad input: one line each --------------------------------------------------------------------

def _edit_peft(path, cfg=None, drop=()):
    if cfg:
        data = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**data, **cfg}))
    if drop:
        t = load_file(str(path / "adapter_model.safetensors"))
        save_file({k: v for k, v in t.items() if k not in drop}, str(path / "adapter_model.safetensors"))


@pytest.mark.parametrize("cfg,drop,error,needle", [
    ({"bias": "vera_only"}, (), UnsupportedError, "bias='vera_only'"),
    ({"use_fancy_thing": True}, (), UnsupportedError, "use_fancy_thing=True"),
    ({"r": 5}, (), FileFormatError, "r=5"),
    ({}, ("base_model.vera_A",), FileFormatError, "has no base_model.vera_A"),
    ({"projection_prng_key": "zero"}, (), FileFormatError, "projection_prng_key"),
])
def test_bad_peft_folder_is_one_line(cfg, drop, error, needle, tmp_path):
    make_peft("llama").save_pretrained(tmp_path / "p")
    _edit_peft(tmp_path / "p", cfg, drop)
    model = tiny_llama()
    with pytest.raises(error) as exc:
        gk.load_adapter(model, tmp_path / "p")
    assert needle in str(exc.value) and "\n" not in str(exc.value)
    assert gk.get_state(model) is None


def _native(tmp_path, **kw):
    m = gk.inject(tiny_llama(), vera("llama", init_weights=False, **kw))
    gk.save_adapter(m, tmp_path / "a")
    return tmp_path / "a", load_file(str(tmp_path / "a" / "adapter.safetensors"))


def test_corrupt_native_vectors_are_one_line(tmp_path):
    path, t = _native(tmp_path)
    key = next(k for k in t if k.endswith("vera_lambda_d"))
    save_file({**t, key: torch.zeros(6)}, str(path / "adapter.safetensors"))
    with pytest.raises(AdapterError, match=r"r=4 but .*vera_lambda_d holds 6 values"):
        gk.load_adapter(tiny_llama(), path)


def test_missing_shared_pair_is_one_line(tmp_path):
    path, t = _native(tmp_path)
    save_file({k: v for k, v in t.items() if not k.endswith(".vera_A")}, str(path / "adapter.safetensors"))
    with pytest.raises(AdapterError, match=r"save_projection: true\) but has no \*\.vera_A"):
        gk.load_adapter(tiny_llama(), path)


def test_pair_too_small_for_the_base_is_one_line(tmp_path):
    path, t = _native(tmp_path)
    a = next(k for k in t if k.endswith(".vera_A"))
    save_file({**t, a: t[a][:, :40].contiguous()}, str(path / "adapter.safetensors"))
    tiny_llama().save_pretrained(tmp_path / "base")
    with pytest.raises(AdapterError, match=r"vera_A has shape \(4, 40\) but this model needs \(4, 64\)"):
        gk.export_merged(path, tmp_path / "base", tmp_path / "m")
    with pytest.raises(AdapterError, match=r"vera_A has shape \(4, 40\)"):
        gk.load_adapter(tiny_llama(), path)
    assert not (tmp_path / "m").exists()
    # a graft merge reads the checkpoint's shapes only: the pair must cover every target it slices
    from graftkit.io import read_adapter
    from graftkit.validate import check_fits

    with pytest.raises(AdapterError, match="too small for the base weight"):
        check_fits(read_adapter(path), a[: -len(".vera_A")], "linear", (32, 64), "the base")


def test_peft_folder_without_pair(tmp_path):
    """export --merged loads the base, so the pair is drawn for its targets (equal to peft's merge); a graft
    merge reads only checkpoint headers and cannot size the pair: refused in one line."""
    from graftkit.merge.adapters import AdapterSource
    from graftkit.tensors import Checkpoint

    pm = make_peft("llama", save_projection=False, key=4)
    pm.save_pretrained(tmp_path / "p")
    tiny_llama().save_pretrained(tmp_path / "base")
    out = gk.export_merged(tmp_path / "p", tmp_path / "base", tmp_path / "m")
    ours = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(ours, IDS), logits(pm.merge_and_unload().eval(), IDS), atol=ATOL, rtol=0)
    with pytest.raises(UnsupportedError, match="saved without its projections") as exc:
        AdapterSource(tmp_path / "p", Checkpoint(tmp_path / "base"))
    assert "\n" not in str(exc.value)
    # re-saved from a model it records the pair's size, and then merges without one
    gk.save_adapter(gk.load_adapter(tiny_llama(), tmp_path / "p"), tmp_path / "native")
    src = AdapterSource(tmp_path / "native", Checkpoint(tmp_path / "base"))
    merged = ours.state_dict()
    for name in src.deltas:
        torch.testing.assert_close(src.adapted(name).float(), merged[name].float(), atol=ATOL, rtol=0)


def test_cli_refuses_bad_peft_folder(tmp_path, capsys):
    from graftkit.cli import main as graft_main

    make_peft("llama").save_pretrained(tmp_path / "p")
    _edit_peft(tmp_path / "p", {"bias": "all"})
    code = graft_main(["import-peft", str(tmp_path / "p"), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("graft: error: ") and "bias='all'" in err[0]
    assert not (tmp_path / "out").exists()


# -- training ------------------------------------------------------------------------------------

def test_a_classification_run_lowers_the_loss(assets, tmp_path):
    from graftkit.train import parse_recipe, train

    rec = cls_recipe(assets, tmp_path / "run", method={"method": "vera", "r": 16, "targets": ["query", "value", "dense"],
                                                       "train_also": ["classifier"]},
                     optim={"lr": 2e-2, "epochs": 2, "warmup_steps": 0}, eval={"every": None})
    summary = train(parse_recipe(rec))
    seen = losses(tmp_path / "run")
    assert sum(seen[-4:]) / 4 < sum(seen[:4]) / 4, seen
    saved = load_file(str(tmp_path / "run" / "adapter" / "adapter.safetensors"))
    assert len([k for k in saved if k.endswith(".vera_A")]) == 1
    assert summary["trainable_parameters"] < 5000
