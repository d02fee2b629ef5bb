"""AdaLoRA: peft parity of the SVD-form delta (both directions, merged), the budgeted rank allocation
against peft's own RankAllocator on the same training, export as a LoRA with the final ranks, bad input."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

import graftkit as gk
from conftest import logits, tiny_gpt2, tiny_inputs, tiny_llama
from graftkit.errors import ConfigError, FileFormatError, UnsupportedError
from graftkit.methods.adalora import AdaLoRAConfig, RankBudget, export_lora
from test_train import assets, cls_recipe  # noqa: F401  (assets is a fixture)

peft = pytest.importorskip("peft")

ATOL = 1e-5
IDS = tiny_inputs()
CASES = {
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
}


def make_peft(case: str, seed: int = 3, **over):
    build, kw = CASES[case]
    cfg = peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=6, total_step=10, task_type="CAUSAL_LM", **{**kw, **over})
    pm = peft.get_peft_model(build(), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # E starts at zero: perturb every tensor so a dropped or rescaled one shows
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return pm.eval()


def mask_some(pm) -> dict:
    """Zero a few triplets and record them as peft's rank_pattern (what a trained AdaLoRA saves)."""
    pattern = {}
    with torch.no_grad():
        for i, (n, p) in enumerate((n, p) for n, p in pm.base_model.model.named_parameters() if "lora_E" in n):
            keep = torch.tensor([True, i % 2 == 0, True, i % 3 != 0])
            p.masked_fill_(~keep.view(-1, 1), 0.0)
            pattern[n] = keep.tolist()
    pm.peft_config["default"].rank_pattern = pattern
    return pattern


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("pruned", [False, True])
def test_peft_folder_loads_and_exports_back(case, pruned, tmp_path):
    build = CASES[case][0]
    pm = make_peft(case)
    if pruned:
        mask_some(pm)
    ref = logits(pm, IDS)
    assert (ref - logits(build(), IDS)).abs().max() > 1e-2
    pm.save_pretrained(tmp_path / "peft")
    model = gk.load_adapter(build(), tmp_path / "peft")  # (a)
    torch.testing.assert_close(logits(model, IDS), ref, atol=ATOL, rtol=0)
    if pruned:  # peft saved the kept triplets only: the sites have the pattern's ranks
        assert sorted({s.r for s in gk.sites(model).values()}) == [2, 3, 4]
    gk.save_adapter(model, tmp_path / "again", format="peft")  # (b)
    back = peft.PeftModel.from_pretrained(build(), tmp_path / "again").eval()
    torch.testing.assert_close(logits(back, IDS), ref, atol=ATOL, rtol=0)
    gk.save_adapter(model, tmp_path / "native")
    torch.testing.assert_close(logits(gk.load_adapter(build(), tmp_path / "native"), IDS), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_merged_export_matches_merge_and_unload(case, tmp_path):  # (c)
    build = CASES[case][0]
    build().save_pretrained(tmp_path / "base")
    pm = make_peft(case)
    mask_some(pm)
    pm.save_pretrained(tmp_path / "peft")
    out = gk.export_merged(tmp_path / "peft", tmp_path / "base", tmp_path / "merged")
    ours = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(ours, IDS), logits(pm.merge_and_unload().eval(), IDS), atol=ATOL, rtol=0)


def test_graftkit_adapter_loads_in_peft(tmp_path):
    """A native graftkit AdaLoRA (non-identity init) exported to peft: the same logits there."""
    model = gk.inject(tiny_llama(), {"method": "adalora", "targets": ["q_proj", "up_proj"], "init_r": 3, "target_r": 1,
                                     "lora_alpha": 5, "init_lora_weights": False})
    ref = logits(model, IDS)
    assert (ref - logits(tiny_llama(), IDS)).abs().max() > 1e-2
    gk.save_adapter(model, tmp_path / "peft", format="peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADALORA" and cfg["init_r"] == 3 and cfg["lora_alpha"] == 5
    back = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(back, IDS), ref, atol=ATOL, rtol=0)


# -- the rank allocation against peft's RankAllocator ------------------------------------------------

def test_rank_allocation_equals_peft(tmp_path):
    """Train the same AdaLoRA in peft (update_and_allocate after each step) and in graftkit (the
    RankBudget hooks), from the same tensors on the same batches: the orthogonality loss, the budget at
    every step and the triplets kept at every step agree, and so do the tensors at the end."""
    T = 8
    cfg = peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=6, total_step=T, tinit=1, tfinal=2, deltaT=2,
                             target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM", orth_reg_weight=0.3, beta2=0.6)
    pm = peft.get_peft_model(tiny_llama(), cfg)
    pm.train()
    model = gk.inject(tiny_llama(), {"method": "adalora", "targets": ["q_proj", "v_proj", "up_proj"], "init_r": 4, "target_r": 2,
                                     "lora_alpha": 6, "total_step": T, "tinit": 1, "tfinal": 2, "deltaT": 2, "orth_reg_weight": 0.3})
    model.train()
    peft_params = dict(pm.base_model.model.named_parameters())
    ours = {n: s for n, s in gk.sites(model).items()}
    with torch.no_grad():  # the same start (peft's random P, Q; E random too so the first steps differ per triplet)
        g = torch.Generator().manual_seed(0)
        for name, site in ours.items():
            module = name.rsplit(".", 1)[0]
            for slot in ("lora_A", "lora_B", "lora_E"):
                p = peft_params[f"{module}.{slot}.default"]
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                getattr(site, slot).copy_(p)
    hooks = RankBudget(AdaLoRAConfig(targets=["x"], init_r=4, target_r=2, lora_alpha=6, total_step=T, tinit=1, tfinal=2,
                                     deltaT=2, orth_reg_weight=0.3, beta2=0.6))
    hooks.start(model, None, [], T)
    opt_p = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.05)
    opt_g = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    data = torch.Generator().manual_seed(5)
    kept_history = []
    for step in range(T):
        ids = torch.randint(1, 96, (4, 9), generator=data)
        loss_p = pm(input_ids=ids, labels=ids).loss  # peft adds the orthogonality term to the loss
        task = model(input_ids=ids, labels=ids).loss
        loss_g = task + hooks.extra_loss(model)
        torch.testing.assert_close(loss_g, loss_p, atol=1e-5, rtol=0)
        loss_p.backward()
        loss_g.backward()
        hooks.before_update(model, step)
        opt_p.step()
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)  # as the loop does: the hooks kept the gradients they need
        budget, _ = pm.base_model.rankallocator.budget_schedule(step + 1)
        pm.base_model.update_and_allocate(step + 1)
        opt_p.zero_grad()
        assert hooks.after_update(model, step) is False
        assert hooks.budget(step + 1)[0] == budget
        ipt = pm.base_model.rankallocator
        for name in (ours if hooks.ema else ()):  # the sensitivity and uncertainty averages (reset at T - tfinal)
            module = name.rsplit(".", 1)[0]
            for slot in ("lora_A", "lora_B", "lora_E"):
                n = f"{module}.{slot}.default"
                torch.testing.assert_close(hooks.ema[f"{name}.{slot}"], ipt.exp_avg_ipt[n], atol=1e-7, rtol=1e-4)
                torch.testing.assert_close(hooks.unc[f"{name}.{slot}"], ipt.exp_avg_unc[n], atol=1e-7, rtol=1e-4)
        theirs = {n.rsplit(".lora_E", 1)[0]: (p.view(-1) != 0) for n, p in peft_params.items() if ".lora_E." in n}
        mine = {n.rsplit(".", 1)[0]: (s.lora_E.view(-1) != 0) for n, s in ours.items()}
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), step
        kept_history.append(sum(int(v.sum()) for v in mine.values()))
    # the budget really shrank to target_r per layer and the final pattern held through the last tfinal steps
    assert kept_history[0] == 4 * len(ours) and kept_history[-1] == kept_history[-2] == kept_history[-3] == 2 * len(ours)
    assert min(kept_history[1:T - 2]) < 4 * len(ours)
    for name, site in ours.items():
        module = name.rsplit(".", 1)[0]
        for slot in ("lora_A", "lora_B", "lora_E"):
            torch.testing.assert_close(getattr(site, slot), peft_params[f"{module}.{slot}.default"], atol=1e-5, rtol=0)
    report = hooks.report(model)
    assert report["initial_budget"] == 4 * len(ours) and report["target_budget"] == report["kept_ranks"] == 2 * len(ours)
    assert sum(report["rank_pattern"].values()) == 2 * len(ours)


def test_budget_is_cubic():
    hooks = RankBudget(AdaLoRAConfig(targets=["x"], init_r=10, target_r=2, total_step=12, tinit=2, tfinal=2, deltaT=3))
    hooks.init_bgt, hooks.target_bgt, hooks.total = 40, 8, 12
    got = [hooks.budget(t) for t in range(1, 13)]
    theirs = peft.tuners.adalora.RankAllocator.__new__(peft.tuners.adalora.RankAllocator)
    theirs.peft_config, theirs.init_bgt, theirs.target_bgt = hooks.config, 40, 8
    assert got == [theirs.budget_schedule(t) for t in range(1, 13)]
    # by hand: 8 + 32 * (1 - (t - 2) / 8)^3, allocating where t % 3 == 0; the final phase always masks
    assert got == [(40, False), (40, False), (29, True), (21, False), (15, False), (12, True), (9, False), (8, False),
                   (8, True), (8, False), (8, True), (8, True)]


def test_graft_train_allocates_and_exports_as_lora(assets, tmp_path):
    """A real run: the rank allocation leaves target_r triplets per layer on average, the report says
    so, and the adapter exported as a plain LoRA with those ranks gives the same logits."""
    from graftkit.io import read_adapter
    from graftkit.train import parse_recipe, train

    method = {"method": "adalora", "targets": ["query", "value", "intermediate.dense"], "init_r": 4, "target_r": 2,
              "lora_alpha": 8, "tinit": 1, "tfinal": 2, "train_also": ["classifier"]}
    rec = cls_recipe(assets, tmp_path / "run", method=method, optim={"lr": 2e-2, "epochs": 2})
    summary = train(parse_recipe(rec), progress=False)
    assert summary["final_loss"] < summary["first_loss"]
    report = summary["method_report"]
    assert report["initial_budget"] == 4 * 6 and report["target_budget"] == 2 * 6 == report["kept_ranks"]
    ranks = report["rank_pattern"]
    assert len(set(ranks.values())) > 1  # the budget went where the importance was, not 2 per layer
    adapter = tmp_path / "run" / "adapter"
    export_lora(adapter, tmp_path / "lora")
    lora = read_adapter(tmp_path / "lora")
    assert lora.method == "lora"
    assert {n: o["r"] for n, o in lora.meta["target_options"].items()} == {n: max(r, 1) for n, r in ranks.items()}
    ids = torch.randint(1, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    a = gk.load_adapter(gk.load_model(assets / "bert", head="classification", num_labels=2).eval(), adapter)
    b = gk.load_adapter(gk.load_model(assets / "bert", head="classification", num_labels=2).eval(), tmp_path / "lora")
    assert gk.sites(a)["bert.encoder.layer.0.attention.self.query.weight"].r == 4  # (AdaLoRA keeps init_r wide tensors)
    torch.testing.assert_close(logits(b, ids), logits(a, ids), atol=ATOL, rtol=0)


# -- bad input -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("over, needle", [({"target_r": 6}, "target_r=6 is larger than init_r=4"),
                                          ({"total_step": 5, "tinit": 3, "tfinal": 2}, "no budgeting phase"),
                                          ({"beta1": 1.0}, "beta1")])
def test_bad_config_is_one_line(over, needle):
    with pytest.raises(ConfigError, match=needle) as info:
        gk.inject(tiny_llama(), {"method": "adalora", "targets": ["q_proj"], "init_r": 4, "target_r": 2, **over})
    assert "\n" not in str(info.value)


def test_schedule_longer_than_the_run_is_one_line(assets, tmp_path):
    from graftkit.train import parse_recipe, train

    rec = cls_recipe(assets, tmp_path / "run", method={"method": "adalora", "targets": ["query"], "init_r": 4, "target_r": 2,
                                                       "tinit": 50}, optim={"max_steps": 4})
    with pytest.raises(ConfigError, match="no budgeting phase") as info:
        train(parse_recipe(rec), progress=False)
    assert "\n" not in str(info.value)


def test_unsupported_or_corrupt_peft_folder_is_one_line(tmp_path):
    pm = make_peft("llama")
    pm.save_pretrained(tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, "layer_replication": [[0, 1]]}))
    with pytest.raises(UnsupportedError, match="layer_replication") as info:
        gk.load_adapter(tiny_llama(), tmp_path / "peft")
    assert "\n" not in str(info.value)
    # a pattern that disagrees with the saved ranks (the tensors are init_r wide)
    pattern = {"model.layers.0.self_attn.q_proj.lora_E": [True, False, False, True]}
    path.write_text(json.dumps({**cfg, "rank_pattern": pattern}))
    with pytest.raises(FileFormatError, match="has rank 4 but adapter_config.json gives it 2") as info:
        gk.load_adapter(tiny_llama(), tmp_path / "peft")
    assert "\n" not in str(info.value)
