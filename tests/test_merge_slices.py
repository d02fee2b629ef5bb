"""``slices:`` (layer stacking, frankenmerges, per-slice merges): the layer plan and config rewrite
as pure functions, outputs that load in transformers and generate, parity with the real mergekit
0.1.5 (one subprocess for every recipe), and the bad inputs."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
import yaml

import graftkit as gk
from graftkit.cli import main
from graftkit.errors import ConfigError
from graftkit.merge.config import load_config
from graftkit.merge.slices import OutLayer, plan_layers, rewrite_config
from merge_helpers import load_folder, make_models, run_mergekit



def src(path, a, b, **params):
    return {"model": str(path), "layer_range": [a, b], **({"parameters": params} if params else {})}


def recipes(m):
    base, ft0, ft1 = m["base"], m["ft0"], m["ft1"]
    return {
        # A 5-layer frankenmerge of two 2-layer models: ft0's layers, ft1's, then ft0's last again
        "stack": {"merge_method": "passthrough",
                  "slices": [{"sources": [src(ft0, 0, 2)]}, {"sources": [src(ft1, 0, 2)]}, {"sources": [src(ft0, 1, 2)]}]},
        "scaled": {"merge_method": "passthrough",
                   "slices": [{"sources": [src(ft1, 1, 2)]}, {"sources": [src(ft0, 0, 2, scale=0.5)]}]},
        "linear": {"merge_method": "linear",
                   "slices": [{"sources": [src(ft0, 0, 1, weight=0.3), src(ft1, 1, 2, weight=0.7)]},
                              {"sources": [src(ft0, 1, 2), src(ft1, 0, 1)], "parameters": {"weight": 0.5}},
                              {"sources": [src(ft1, 0, 2, weight=[0.2, 0.9]), src(ft0, 0, 2)]}],
                   "parameters": {"weight": 1.0}},
        "slerp": {"merge_method": "slerp", "base_model": str(base),
                  "slices": [{"sources": [src(base, 0, 2), src(ft0, 0, 2)], "parameters": {"t": [0.1, 0.9]}},
                             {"sources": [src(ft1, 1, 2), src(base, 0, 1)], "parameters": {"t": 0.3}}]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": str(base),
                            "slices": [{"sources": [src(base, 0, 2), src(ft0, 0, 2, weight=0.7), src(ft1, 0, 2, weight=0.4)]},
                                       {"sources": [src(base, 1, 2), src(ft0, 1, 2, weight=1.0), src(ft1, 0, 1, weight=-0.5)]}],
                            "parameters": {"lambda": 0.9}},
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("slices"), n=2, scale=0.05)


@pytest.fixture(scope="module")
def outputs(models, tmp_path_factory):
    pytest.importorskip("mergekit")
    root = tmp_path_factory.mktemp("slices_parity")
    jobs, paths = [], {}
    for name, cfg in recipes(models).items():
        path = root / f"{name}.yml"
        path.write_text(yaml.safe_dump({**cfg, "dtype": "float32"}))
        paths[name] = path
        jobs.append((str(path), str(root / f"mk_{name}")))
    run_mergekit(jobs)
    return {name: (root / f"mk_{name}", gk.merge(path, root / f"gk_{name}")) for name, path in paths.items()}


# -- pure functions ---------------------------------------------------------------------------------

def test_plan_layers_renumbers_and_places_gradients():
    cfg = load_config({"merge_method": "passthrough",
                       "slices": [{"sources": [src("a", 1, 4)]}, {"sources": [src("b", 0, 1)]}, {"sources": [src("a", 3, 5)]}]})
    layers = plan_layers(cfg, cfg.method(), {"a": 5, "b": 2})
    assert [lay.sources for lay in layers] == [[("a", 1)], [("a", 2)], [("a", 3)], [("b", 0)], [("a", 3)], [("a", 4)]]
    assert [lay.slice for lay in layers] == [0, 0, 0, 1, 2, 2]
    assert [lay.t for lay in layers] == [0.0, 0.5, 1.0, 1.0, 0.0, 1.0]  # t runs over each slice; 1 for a one-layer slice


def test_plan_layers_puts_the_slice_base_first():
    cfg = load_config({"merge_method": "task_arithmetic", "base_model": "base",
                       "slices": [{"sources": [src("ft", 2, 4), src("base", 0, 2)]}]})
    layers = plan_layers(cfg, cfg.method(), {"ft": 4, "base": 2})
    assert [lay.sources for lay in layers] == [[("base", 0), ("ft", 2)], [("base", 1), ("ft", 3)]]


def test_out_of_range_layers_are_a_config_error():
    cfg = load_config({"merge_method": "passthrough", "slices": [{"sources": [src("a", 0, 2)]}, {"sources": [src("b", 1, 3)]}]})
    with pytest.raises(ConfigError, match=r"slices\[1\]\.sources\[0\].*\[1, 3\].*out of range.*b, which has 2 layers"):
        plan_layers(cfg, cfg.method(), {"a": 2, "b": 2})


def test_rewrite_config_sets_the_count_and_per_layer_lists():
    donor = {"num_hidden_layers": 3, "layer_types": ["full", "sliding", "full"], "architectures": ["X"],
             "mlp_only_layers": [1], "hidden_size": 8}
    other = {"num_hidden_layers": 2, "layer_types": ["sliding", "sliding"], "mlp_only_layers": [0]}
    layers = [OutLayer(0, [("a", 2)], 0.0), OutLayer(0, [("b", 0)], 0.0), OutLayer(1, [("a", 1)], 0.0), OutLayer(1, [("b", 1)], 1.0)]
    out = rewrite_config(donor, layers, {"a": donor, "b": other})
    assert out["num_hidden_layers"] == 4
    assert out["layer_types"] == ["full", "sliding", "sliding", "sliding"]  # from each layer's own model
    assert out["mlp_only_layers"] == [1, 2]  # b's layer 0 and a's layer 1, renumbered
    assert out["architectures"] == ["X"] and out["hidden_size"] == 8
    assert donor["num_hidden_layers"] == 3  # the donor's dict is not changed


@pytest.mark.parametrize("cfg, needle", [
    ({"slices": [{"sources": [src("a", 2, 2)]}]}, "empty or negative"),
    ({"slices": [{"sources": [src("a", -1, 2)]}]}, "empty or negative"),
    ({"slices": [{"sources": [src("a", 0, 2), src("b", 0, 2)]}]}, "at most 1 model per slice"),
    ({"slices": []}, "slices: is empty"),
    ({"slices": [{"sources": [src("a", 0, 1)]}], "models": [{"model": "a"}]}, "both models: and slices:"),
    ({"merge_method": "linear", "slices": [{"sources": [src("a", 0, 2), src("b", 0, 3)]}]}, "different numbers of layers"),
    ({"merge_method": "linear", "slices": [{"sources": [src("a", 0, 2), src("b", 0, 2)]}, {"sources": [src("a", 0, 2)]}]},
     "split the merge in two"),
    ({"merge_method": "task_arithmetic", "base_model": "z", "slices": [{"sources": [src("a", 0, 2)]}]}, "not one of its sources"),
    ({"merge_method": "slerp", "slices": [{"sources": [src("a", 0, 2), src("b", 0, 2)]}]}, "needs a base model"),
    ({"slices": [{"sources": [src("a", 0, 2, weight=1.0)]}]}, "unknown parameter 'weight'"),
    ({"slices": [{"sources": [src("a", 0, 2)]}], "output": "adapter", "rank": 2}, "output: adapter does not take slices"),
])
def test_bad_slice_configs(cfg, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config({"merge_method": "passthrough", **cfg})


def test_passthrough_copies_its_one_model_and_scales_it():
    from graftkit.merge.passthrough import passthrough

    x = torch.randn(4, 3).to(torch.bfloat16)
    out = passthrough(None, [x], scale=[None])
    assert out.dtype == torch.float32 and torch.equal(out, x.float())
    assert torch.equal(passthrough(None, [x], scale=[0.5]), x.float() * 0.5)
    assert torch.equal(x, x.clone())  # the input is not changed in place
    y = x.float()
    passthrough(None, [y], scale=[2.0])
    assert torch.equal(y, x.float())


def test_passthrough_takes_one_model_without_slices(models, tmp_path):
    with pytest.raises(ConfigError, match="at most 1 model.*slices:"):
        load_config({"merge_method": "passthrough", "models": [{"model": str(models["ft0"])}, {"model": str(models["ft1"])}]})
    out = gk.merge({"merge_method": "passthrough", "models": [{"model": str(models["ft1"]), "parameters": {"scale": 2.0}}]},
                   tmp_path / "p")
    a, b = load_folder(models["ft1"]), load_folder(out)
    assert sorted(a) == sorted(b) and all(torch.equal(b[k], a[k] * 2) for k in a)


# -- real merges ------------------------------------------------------------------------------------

def test_frankenmerge_loads_generates_and_equals_the_stacked_model(models, tmp_path):
    out = gk.merge(recipes(models)["stack"], tmp_path / "stack")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 5
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert len(merged.model.layers) == 5
    # the same model assembled by hand from the two fine-tunes' layers
    sd0, sd1 = load_folder(models["ft0"]), load_folder(models["ft1"])
    want = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**cfg, "num_hidden_layers": 5})).eval()
    state = {k: v for k, v in sd0.items() if ".layers." not in k}
    for j, (sd, i) in enumerate([(sd0, 0), (sd0, 1), (sd1, 0), (sd1, 1), (sd0, 1)]):
        state.update({k.replace(f".layers.{i}.", f".layers.{j}."): v for k, v in sd.items() if f".layers.{i}." in k})
    want.load_state_dict(state, strict=False)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, want(ids).logits, rtol=0, atol=0)
        gen = merged.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 9)
    prov = json.loads((out / "graft_provenance.json").read_text())
    assert prov["merge_method"] == "passthrough"


def test_dry_run_shows_the_layers(models, tmp_path, capsys):
    path = tmp_path / "s.yml"
    path.write_text(yaml.safe_dump(recipes(models)["stack"]))
    capsys.readouterr()
    assert main(["merge", str(path), str(tmp_path / "o"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "5 output layers" in text and f"{models['ft1']} 0-1" in text
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", list(recipes({"base": "b", "ft0": "x", "ft1": "y"})))
def test_parity_with_mergekit(outputs, name):
    mk, ours = outputs[name]
    a, b = load_folder(mk), load_folder(ours)
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-6, msg=lambda m, k=k: f"{name} {k}: {m}")
    mk_cfg, our_cfg = (json.loads((p / "config.json").read_text()) for p in (mk, ours))
    assert our_cfg["num_hidden_layers"] == mk_cfg["num_hidden_layers"]


def bad_cli(tmp_path, capsys, cfg) -> str:
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    rc = main(["merge", str(path), str(tmp_path / "bad_out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("graft: error:"), err
    assert not (tmp_path / "bad_out").exists() and not list(tmp_path.glob(".bad_out*"))
    return err


def test_cli_out_of_range_layers(models, tmp_path, capsys):
    cfg = {"merge_method": "passthrough", "slices": [{"sources": [src(models["ft0"], 0, 2)]}, {"sources": [src(models["ft1"], 1, 4)]}]}
    err = bad_cli(tmp_path, capsys, cfg)
    assert "[1, 4]" in err and "out of range" in err and "2 layers" in err
    # --dry-run refuses it too
    path = tmp_path / "bad.yml"
    assert main(["merge", str(path), str(tmp_path / "bad_out"), "--dry-run"]) == 2


def test_cli_slice_of_another_architecture(models, tmp_path, capsys):
    from conftest import tiny_gpt2

    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    cfg = {"merge_method": "passthrough", "slices": [{"sources": [src(models["ft0"], 0, 2)]}, {"sources": [src(tmp_path / "gpt2", 0, 1)]}]}
    err = bad_cli(tmp_path, capsys, cfg)
    assert "architecture" in err


def test_per_layer_config_lists_follow_the_layers(tmp_path):
    """A Qwen2 model with per-layer attention types: the output's layer_types list is rebuilt from the
    layers it stacked, so transformers loads it with the right attention per layer."""
    torch.manual_seed(0)
    types = ["full_attention", "sliding_attention", "full_attention"]
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64, use_sliding_window=True, sliding_window=4,
                                   layer_types=types)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "q")
    recipe = {"merge_method": "passthrough", "slices": [{"sources": [src(tmp_path / "q", 0, 2)]}, {"sources": [src(tmp_path / "q", 1, 3)]}]}
    out = gk.merge(recipe, tmp_path / "out")
    written = json.loads((out / "config.json").read_text())
    assert written["num_hidden_layers"] == 4
    assert written["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.layer_types == written["layer_types"] and len(model.model.layers) == 4
    with torch.no_grad():
        assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)
