"""LoRA initialisations (``init_lora_weights`` / ``init``): PiSSA, its fast variant, OLoRA and EVA.

* PiSSA / OLoRA start exactly as the installed peft (A, B and the residual base within 1e-5);
* a trained PiSSA/OLoRA adapter is saved as a plain LoRA against the ORIGINAL base (rank 2r): on a
  fresh original base it gives the trained model's logits and materialized delta, in graftkit and
  in peft, and a peft folder converted by peft loads with peft's logits;
* EVA's components and rank redistribution equal peft's ``get_eva_state_dict`` on the same batch
  (up to peft's randomized incremental PCA: cosine > 0.999 per component);
* a ``graft train`` run with each initialisation learns;
* bad input is one line.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from torch import nn

import graftkit as gk
from graftkit.errors import ConfigError, UnsupportedError
from graftkit.methods import lora_init
from conftest import logits, tiny_bert, tiny_inputs, tiny_llama
from test_train import assets, cls_recipe, losses  # noqa: F401  (assets is a fixture)

peft = pytest.importorskip("peft")

ATOL = 1e-5
IDS = tiny_inputs()
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "intermediate.dense"]}
BUILD = {"llama": tiny_llama, "bert": tiny_bert}


def _peft_module(site_name: str) -> str:
    return "base_model.model." + site_name.rsplit(".", 1)[0]


@torch.no_grad()
def _train_noise(model, seed: int = 3, scale: float = 0.1) -> None:
    """Stands in for training: every trainable tensor moves."""
    g = torch.Generator().manual_seed(seed)
    for p in gk.trainable_parameters(model):
        p.add_(torch.randn(p.shape, generator=g) * scale)


def _pissa(model_name: str, init: str, **kw):
    cfg = {"method": "lora", "r": 4, "lora_alpha": 8, "targets": TARGETS[model_name], "init": init, **kw}
    return gk.inject(BUILD[model_name](), cfg)


# -- PiSSA / OLoRA start ------------------------------------------------------------------

@pytest.mark.parametrize("model_name", ["llama", "bert"])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_start_equals_peft(model_name, init):
    ours = _pissa(model_name, init)
    theirs = peft.get_peft_model(BUILD[model_name](), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[model_name],
                                                                       init_lora_weights=init))
    params = dict(theirs.named_parameters())
    sites = gk.sites(ours)
    assert len(sites) == 2 * len(TARGETS[model_name])
    for name, site in sites.items():
        key = _peft_module(name)
        torch.testing.assert_close(site.lora_A, params[f"{key}.lora_A.default.weight"], atol=ATOL, rtol=0)
        torch.testing.assert_close(site.lora_B, params[f"{key}.lora_B.default.weight"], atol=ATOL, rtol=0)
        torch.testing.assert_close(site.base, params[f"{key}.base_layer.weight"], atol=ATOL, rtol=0)
    # the residual plus s B0 A0 is the original model: the start changes nothing
    torch.testing.assert_close(logits(ours, IDS), logits(BUILD[model_name](), IDS), atol=ATOL, rtol=0)


def test_pissa_principal_part_golden():
    """s B A is the best rank-r approximation (Eckart-Young): its error is the tail of the spectrum."""
    w = torch.randn(12, 9, generator=torch.Generator().manual_seed(0))
    a, b = lora_init.pissa_factors(w, 3, 0.5)
    s = torch.linalg.svdvals(w)
    assert torch.linalg.matrix_norm(w - 0.5 * b @ a).item() == pytest.approx(s[3:].square().sum().sqrt().item(), rel=1e-5)
    torch.testing.assert_close(a @ a.t(), torch.diag(s[:3] / 0.5), atol=1e-5, rtol=0)  # A A^T = S_r / s
    a, b = lora_init.olora_factors(w, 3)
    torch.testing.assert_close(b.t() @ b, torch.eye(3), atol=1e-6, rtol=0)  # B has orthonormal columns


def test_pissa_niter_equals_peft_on_the_same_random_state():
    """The fast variant is randomized (torch.svd_lowrank): from the same generator state both give the same factors."""
    from peft.tuners.lora.layer import Linear as PeftLinear

    base = nn.Linear(24, 20)
    layer = PeftLinear(copy.deepcopy(base), "default", peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False), r=4, lora_alpha=8)
    torch.manual_seed(11)
    layer.pissa_init("default", "pissa_niter_3")
    torch.manual_seed(11)
    a, b = lora_init.pissa_factors(base.weight.detach(), 4, 8 / 4, niter=3)
    torch.testing.assert_close(a, layer.lora_A["default"].weight, atol=ATOL, rtol=0)
    torch.testing.assert_close(b, layer.lora_B["default"].weight, atol=ATOL, rtol=0)
    torch.testing.assert_close(base.weight - 2.0 * b @ a, layer.base_layer.weight, atol=ATOL, rtol=0)


# -- saving against the original base ----------------------------------------------------

@pytest.mark.parametrize("init,kw", [("pissa", {}), ("olora", {"use_rslora": True, "rank_pattern": {"v_proj": 2}}),
                                     ("pissa_niter_2", {"alpha_pattern": {"down_proj": 3}})])
def test_saved_adapter_equals_the_trained_model(init, kw, tmp_path):
    model = _pissa("llama", init, **kw)
    _train_noise(model)
    want = logits(model, IDS)
    want_delta = gk.materialize_delta(model)
    original = tiny_llama()
    assert (want - logits(original, IDS)).abs().max() > 1e-2  # it did change the model
    gk.save_adapter(model, tmp_path / "native")
    gk.save_adapter(model, tmp_path / "peft", format="peft")

    meta = json.loads((tmp_path / "native" / "adapter.json").read_text())
    assert meta["config"]["init_lora_weights"] is True and meta["lora_init"]["init_lora_weights"] == init
    assert "rank 2r" in meta["lora_init"]["converted"]
    for name, site in gk.sites(model).items():
        assert meta["target_options"][name]["r"] == 2 * site.r

    fresh = gk.load_adapter(tiny_llama(), tmp_path / "native")
    torch.testing.assert_close(logits(fresh, IDS), want, atol=ATOL, rtol=0)
    got_delta = gk.materialize_delta(fresh)
    assert got_delta.keys() == want_delta.keys()
    for k in want_delta:
        torch.testing.assert_close(got_delta[k], want_delta[k], atol=ATOL, rtol=0)
        # the delta is against the original weights: original + delta = the trained model's merged weight
    gk.unload(model, merge=True)
    for k, d in want_delta.items():
        torch.testing.assert_close(original.state_dict()[k] + d, model.state_dict()[k], atol=ATOL, rtol=0)

    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    torch.testing.assert_close(logits(theirs, IDS), want, atol=ATOL, rtol=0)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["init_lora_weights"] is True


def test_peft_converted_folder_loads_and_merges_as_peft(tmp_path):
    """peft trains the same PiSSA adapter and saves it converted; graftkit reads that folder with peft's
    logits, and graftkit's merge of its own trained model equals peft's merge_and_unload."""
    cfg = dict(r=4, lora_alpha=8, target_modules=TARGETS["llama"])
    ours = _pissa("llama", "pissa")
    _train_noise(ours)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**cfg, init_lora_weights="pissa"))
    theirs.peft_config["default"].init_lora_weights = True  # peft's recipe: save the start as a plain LoRA
    theirs.save_pretrained(tmp_path / "start")
    theirs.peft_config["default"].init_lora_weights = "pissa"
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, site in gk.sites(ours).items():
            params[f"{_peft_module(name)}.lora_A.default.weight"].copy_(site.lora_A)
            params[f"{_peft_module(name)}.lora_B.default.weight"].copy_(site.lora_B)
    want = logits(theirs, IDS)
    torch.testing.assert_close(logits(ours, IDS), want, atol=ATOL, rtol=0)
    theirs.save_pretrained(tmp_path / "unconverted")
    theirs.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "start"))
    loaded = gk.load_adapter(tiny_llama(), tmp_path / "converted")
    torch.testing.assert_close(logits(loaded, IDS), want, atol=ATOL, rtol=0)
    # a folder whose factors only fit peft's residual base is refused by name
    with pytest.raises(UnsupportedError, match="init_lora_weights='pissa'.*path_initial_model_for_weight_conversion"):
        gk.load_adapter(tiny_llama(), tmp_path / "unconverted")
    merged = theirs.merge_and_unload().state_dict()
    gk.unload(ours, merge=True)
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, merged[k], atol=ATOL, rtol=0)


def test_disabled_and_unload_give_the_original_model():
    original = tiny_llama()
    base_out = logits(original, IDS)
    model = _pissa("llama", "olora")
    _train_noise(model)
    trained = logits(model, IDS)
    with gk.disabled(model):  # the original model, not the residual one
        torch.testing.assert_close(logits(model, IDS), base_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits(model, IDS), trained, atol=0, rtol=0)
    gk.unload(model, merge=False)
    for k, v in original.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, atol=ATOL, rtol=0)


def test_meta_device_injection_counts_like_plain_lora():
    from graftkit.train.params import skeleton

    cfg = tiny_llama().config
    counts = []
    for init in (True, "pissa"):
        model = skeleton(type(tiny_llama()), cfg)
        gk.inject(model, {"method": "lora", "r": 4, "targets": TARGETS["llama"], "init_lora_weights": init})
        counts.append(gk.count_parameters(model))
    assert counts[0] == counts[1]


# -- EVA ----------------------------------------------------------------------------------

def _eva_batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 96, (8, 32), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 20:] = 0
    labels = ids.clone()
    labels[1, :6] = -100  # a prompt: left out of the SVD (use_label_mask)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_eva_equals_peft(tmp_path):
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    batch = _eva_batch()
    ours = gk.inject(tiny_llama(), {"method": "lora", "r": 4, "lora_alpha": 8, "targets": targets, "init": "eva"})
    ranks = lora_init.eva_init(ours, [batch])
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="eva"))
    initialize_lora_eva_weights(theirs, [batch], show_progress_bar=False)
    modules = dict(theirs.named_modules())
    assert len(set(ranks.values())) > 1, "the redistribution moved ranks"
    state = gk.get_state(ours)
    for name, site in gk.sites(ours).items():
        layer = modules[_peft_module(name)]
        u = layer.lora_A["default"].weight
        assert ranks[name] == u.shape[0] == site.r  # the same rank per layer
        cos = torch.nn.functional.cosine_similarity(site.lora_A, u, dim=1)
        assert cos.min() > 0.999, (name, cos)  # the same components, same signs (peft: randomized incremental PCA)
        assert not site.lora_B.any()
        assert site.scaling == pytest.approx(layer.scaling["default"])  # adjust_scaling_factors: alpha follows the rank
        assert state.options[name]["lora_alpha"] == pytest.approx(8 * site.r / 4)
    torch.testing.assert_close(logits(ours, IDS), logits(tiny_llama(), IDS), atol=0, rtol=0)  # B = 0: the base model
    # trained, the redistributed ranks and alphas reach peft's rank_pattern / alpha_pattern
    _train_noise(ours)
    gk.save_adapter(ours, tmp_path / "peft", format="peft")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded, IDS), logits(ours, IDS), atol=ATOL, rtol=0)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 6)
        self.b = nn.Linear(8, 6)

    def forward(self, x1, x2):
        return self.a(x1) + self.b(x2)


def test_eva_rank_zero_removes_the_layer(tmp_path):
    """Layer a's inputs have two dominant directions, b's are isotropic: a's two components win the whole
    budget (2 x r=1, rho=2) and b loses its LoRA, as in peft."""
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(64, 8, generator=g) * torch.tensor([10.0, 8.0] + [0.1] * 6)
    x2 = torch.randn(64, 8, generator=g)
    model = gk.inject(TwoInputs(), {"method": "lora", "r": 1, "lora_alpha": 2, "targets": ["a", "b"], "init": "eva"})
    assert lora_init.eva_init(model, [{"x1": x1, "x2": x2}]) == {"a.weight": 2, "b.weight": 0}
    state = gk.get_state(model)
    assert state.targets == ["a.weight"] and list(gk.sites(model)) == ["a.weight"]
    assert state.options["a.weight"] == {"r": 2, "lora_alpha": 4.0}
    _train_noise(model)
    gk.save_adapter(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter.json").read_text())
    assert meta["lora_init"]["init_lora_weights"] == "eva" and meta["config"]["init_lora_weights"] is True
    fresh = gk.load_adapter(TwoInputs().requires_grad_(False), tmp_path / "a", force=True)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "graft_adapter" not in k}, strict=False)
    torch.testing.assert_close(fresh(x1, x2), model(x1, x2), atol=ATOL, rtol=0)


def test_eva_without_data_is_one_line(tmp_path):
    model = gk.inject(tiny_llama(), {"method": "lora", "r": 2, "targets": ["q_proj"], "init": "eva"})
    for use in (lambda: logits(model, IDS), lambda: gk.save_adapter(model, tmp_path / "a"),
                lambda: gk.save_adapter(model, tmp_path / "p", format="peft")):
        with pytest.raises(ConfigError) as exc:
            use()
        assert "\n" not in str(exc.value) and "graft train" in str(exc.value) and "eva_init(model, batches)" in str(exc.value)
    assert not (tmp_path / "a").exists() and not (tmp_path / "p").exists()
    with pytest.raises(ConfigError, match="pass batches"):
        lora_init.eva_init(model, [])
    lora_init.eva_init(model, [{"input_ids": IDS}])
    torch.testing.assert_close(logits(model, IDS), logits(tiny_llama(), IDS), atol=0, rtol=0)


# -- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("cfg,needle", [
    ({"init": "pisa"}, "init_lora_weights 'pisa' is not known; valid: true, false, gaussian, pissa, pissa_niter_<N> (N >= 1), olora, eva"),
    ({"init_lora_weights": "pissa_niter_0"}, "valid:"),
    ({"init": "corda"}, "valid:"),
    ({"init": "eva", "eva_config": {"tau": 0.5}}, "eva_config.tau is not supported"),
    ({"init": "pissa", "eva_config": {"rho": 2}}, "eva_config is set but init_lora_weights is 'pissa'"),
    ({"init": "eva", "eva_config": {"rho": 0.5}}, "rho"),
])
def test_bad_config_is_one_line(cfg, needle):
    with pytest.raises(ConfigError) as exc:
        gk.inject(tiny_llama(), {"method": "lora", "targets": ["q_proj"], **cfg})
    assert needle in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("cfg,needle", [
    ({"init": "pissa", "use_dora": True}, "with use_dora is not supported"),
    ({"init": "olora", "targets": ["embed_tokens"]}, "works on linear layers"),
    ({"method": "deft", "init": "eva"}, "not supported by method deft"),
])
def test_unsupported_combination_is_one_line_and_leaves_the_model(cfg, needle):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedError, match=needle):
        gk.inject(model, {"method": "lora", "targets": ["q_proj"], **cfg})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_cli_unknown_init_is_one_line(assets, tmp_path, capsys):
    from graftkit.cli import main

    recipe = cls_recipe(assets, tmp_path / "run", method={"method": "lora", "r": 2, "targets": ["query"], "init": "svd"})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("graft: error: ") and "pissa_niter_<N>" in err[0], err
    assert not (tmp_path / "run").exists()


# -- graft train ----------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["pissa", "olora", "eva"])
def test_graft_train_learns_with_each_init(init, assets, tmp_path):
    from graftkit.train import parse_recipe, train

    out = tmp_path / "run"
    method = {"method": "lora", "r": 4, "lora_alpha": 8, "targets": ["query", "value", "dense"], "init": init}
    if init == "eva":
        method["eva_config"] = {"batches": 3}
    summary = train(parse_recipe(cls_recipe(assets, out, method=method, optim={"lr": 1e-2}, eval={"every": None})), progress=False)
    ls = losses(out)
    assert sum(ls[-4:]) / 4 < 0.8 * sum(ls[:4]) / 4, ls
    meta = json.loads((out / "adapter" / "adapter.json").read_text())
    assert meta["lora_init"]["init_lora_weights"] == init and meta["config"]["init_lora_weights"] is True
    if init == "eva":
        report = summary["method_report"]
        assert report["eva_rank_total"] == 4 * (len(meta["targets"]) + report["eva_layers_removed"])  # the budget, sum(r)
        assert report["eva_rank_max"] >= 4
    # the saved adapter on the original base reproduces the trained model's validation accuracy
    model = gk.load_model(assets / "bert", head="classification", num_labels=2)
    gk.load_adapter(model, out / "adapter")
    tok = gk.load_tokenizer(assets / "bert")
    rows = [json.loads(x) for x in (assets / "cls_val.jsonl").read_text().splitlines()]
    enc = tok([r["text"] for r in rows], padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        pred = model.eval()(**enc).logits.argmax(-1)
    labels = meta["base_model"]["id2label"]
    acc = sum(labels[str(int(p))] == r["label"] for p, r in zip(pred, rows)) / len(rows)
    assert acc == pytest.approx(summary["val_accuracy"])
