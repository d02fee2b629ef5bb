"""Light-PEFT: which heads/neurons/modules/ranks the early pruning removes, that the physically smaller
model computes what the masked one did, a real run (loss, report), save/load/merge of a pruned
adapter on the original base, and bad input."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

import graftkit as gk
from conftest import tiny_bert, tiny_inputs, tiny_llama
from graftkit.errors import ConfigError, UnsupportedError
from graftkit.methods.light_peft import EarlyPruning, LightPEFTConfig, find_blocks, prune_structure, smallest
from test_train import assets, cls_recipe  # noqa: F401  (assets is a fixture)

IDS = tiny_inputs()
BERT_TARGETS = ["query", "value", "attention.output.dense", "intermediate.dense", "layer.*.output.dense"]


def light(model, **over):
    cfg = {"method": "light_peft", "r": 4, "lora_alpha": 8, "targets": BERT_TARGETS, "init_lora_weights": False, **over}
    return gk.inject(model, cfg)


def hooks_for(model, **over) -> EarlyPruning:
    cfg = LightPEFTConfig(targets=["x"], **over)
    h = EarlyPruning(cfg)
    h.start(model, lambda b: model(input_ids=b).logits.float().pow(2).mean(), [IDS], 20)
    return h


def out(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_smallest_keeps_one_per_group():
    scores = {"a": torch.tensor([0.1, 0.2, 0.9]), "b": torch.tensor([0.05, 0.8])}
    assert smallest(scores, 0.4) == {"a": [0], "b": [0]}  # 2 of 5: the two smallest
    # 4 of 5 wanted, but each group keeps one: a's two smallest and b's smallest go
    assert smallest(scores, 0.8) == {"a": [0, 1], "b": [0]}
    assert smallest(scores, 0.1) == {}


def test_pruning_picks_the_smallest_masks_and_taylor_scores():
    model = light(tiny_bert(), module_prune_ratio=0.0)
    h = hooks_for(model, head_prune_ratio=0.25, ffn_prune_ratio=0.5, rank_prune_ratio=0.25)
    names = [b.name for b in find_blocks(model)]
    assert names == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    with torch.no_grad():
        h.masks[names[0]][0].copy_(torch.tensor([1.0, 0.1, 0.5, -0.9]))  # |m| ranks heads: 1 (0.1) is the smallest
        h.masks[names[1]][0].copy_(torch.tensor([0.8, -0.05, 1.0, 0.7]))  # ... and 1 (0.05) overall
        for i, name in enumerate(names):
            h.masks[name][1].copy_(torch.arange(64, dtype=torch.float) + 100 * i)  # layer 0's low neurons go first
    sites = gk.sites(model)
    # every module gets rank scores 0..3 with unit 2 lowest, except one module whose units are all tiny
    tiny = "bert.encoder.layer.1.attention.self.value.weight"
    h.taylor = {n: (torch.full((4,), 1e-6) if n == tiny else torch.tensor([3.0, 2.0, 0.5, 4.0])) for n in sites}
    h.prune(model)
    state = gk.get_state(model) if hasattr(gk, "get_state") else model.__dict__["_graft_state"]
    assert state.config.pruned_heads == {names[0]: [1], names[1]: [1]}
    # 64 of 128 neurons, all from layer 0 but its last (each layer keeps one), then layer 1's smallest
    assert state.config.pruned_neurons == {names[0]: list(range(63)), names[1]: [0]}
    q = model.bert.encoder.layer[0].attention.self.query
    assert q.weight.shape == (24, 32) and sites["bert.encoder.layer.0.attention.self.query.weight"].lora_B.shape[0] == 24
    assert model.bert.encoder.layer[0].output.dense.weight.shape == (32, 1)
    # 25% of the 40 rank units: the tiny module loses 3 (keeps one), then the lowest-scored unit 2 of the next modules
    ranks = {n: s.r for n, s in gk.sites(model).items() if hasattr(s, "lora_A")}
    assert ranks[tiny] == 1 and sum(4 - r for r in ranks.values()) == 10
    assert h.numbers["heads_pruned"] == 2 and h.numbers["heads"] == 8
    assert h.numbers["ffn_neurons_pruned"] == 64 and h.numbers["lora_ranks_pruned"] == 10


def test_module_pruning_drops_the_least_important_module():
    model = light(tiny_bert())
    with torch.no_grad():  # one module's update is tiny next to its base output
        s = gk.sites(model)["bert.encoder.layer.1.attention.self.value.weight"]
        s.lora_B.mul_(1e-4)
    h = hooks_for(model, module_prune_ratio=0.1)  # 1 of 10 modules
    h.prune(model)
    assert "bert.encoder.layer.1.attention.self.value.weight" not in gk.sites(model)
    assert len(gk.sites(model)) == 9 and h.numbers["lora_modules_pruned"] == 1
    assert min(h.module_ratios, key=h.module_ratios.get) == "bert.encoder.layer.1.attention.self.value.weight"


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_pruned_model_equals_masked_model(arch):
    """Removing heads and neurons (and the LoRA rows/columns on them) computes exactly what the
    model with 0/1 masks on those heads and neurons computes."""
    if arch == "bert":
        model = light(tiny_bert())
        heads = {"bert.encoder.layer.0": [0, 2], "bert.encoder.layer.1": [3]}
        neurons = {"bert.encoder.layer.0": [1, 5, 7], "bert.encoder.layer.1": list(range(40))}
    else:
        torch.manual_seed(0)  # multi-head attention (heads can go) and a gated FFN
        cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
        model = gk.inject(transformers.LlamaForCausalLM(cfg).eval(), {"method": "light_peft", "r": 3, "init_lora_weights": False,
                          "targets": ["q_proj", "o_proj", "up_proj", "down_proj"]})
        heads = {"model.layers.0": [1], "model.layers.1": [0, 1, 2]}
        neurons = {"model.layers.0": [0, 63], "model.layers.1": [3, 4, 5, 6]}
    masked = copy.deepcopy(model)
    h = hooks_for(masked)
    with torch.no_grad():
        for name, (hm, fm) in h.masks.items():
            hm.fill_(1.0)
            fm.fill_(1.0)
            hm[heads.get(name, [])] = 0.0
            fm[neurons.get(name, [])] = 0.0
    ref = out(masked)
    assert (ref - out(model)).abs().max() > 1e-3  # the masks change the model
    prune_structure(model, heads, neurons)
    torch.testing.assert_close(out(model), ref, atol=1e-5, rtol=0)
    before = sum(p.numel() for p in masked.parameters())
    assert sum(p.numel() for p in model.parameters()) < before


def test_graft_train_prunes_early_reports_and_round_trips(assets, tmp_path):
    from graftkit.train import parse_recipe, train

    method = {"method": "light_peft", "r": 4, "lora_alpha": 8, "targets": ["query", "value", "intermediate.dense"],
              "head_prune_ratio": 0.25, "ffn_prune_ratio": 0.5, "module_prune_ratio": 0.2, "rank_prune_ratio": 0.25,
              "prune_step": 4, "importance_batches": 2, "train_also": ["classifier"]}
    rec = cls_recipe(assets, tmp_path / "run", method=method, optim={"lr": 1e-2, "epochs": 2})
    summary = train(parse_recipe(rec), progress=False)
    assert summary["final_loss"] < summary["first_loss"]
    rep = summary["method_report"]
    assert rep["pruned_at_step"] == 4
    assert rep["heads_pruned"] == 2 and rep["heads"] == 8 and rep["ffn_neurons_pruned"] == 64 and rep["ffn_neurons"] == 128
    assert rep["lora_modules_pruned"] == 1 and rep["lora_modules"] == 6
    # 2 heads x 8 x (3 rows of 32 + bias, 1 column of 32) and 64 neurons x (32 + bias + 32), from the encoder
    removed = 2 * 8 * (3 * 33 + 32) + 64 * 65
    assert rep["parameters_before"] - rep["parameters_after"] == removed  # the foundation model's (the adapter's apart)
    assert abs(rep["parameters_saved"] - (1 - rep["parameters_after"] / rep["parameters_before"])) < 1e-12
    assert rep["trainable_after"] < rep["trainable_before"]
    assert rep["step_s_before"] > 0 and rep["step_s_after"] > 0 and "step_time_saved" in rep
    # the saved adapter is the smaller model: loading it prunes a fresh base the same way, and graft
    # merge's delta on the ORIGINAL base gives the same logits
    adapter = tmp_path / "run" / "adapter"
    loaded = gk.load_adapter(gk.load_model(assets / "bert", head="classification", num_labels=2).eval(), adapter)
    assert loaded.bert.encoder.layer[0].intermediate.dense.out_features + loaded.bert.encoder.layer[1].intermediate.dense.out_features == 64
    ids = torch.randint(1, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = loaded(input_ids=ids).logits
    gk.load_model(assets / "bert", head="classification", num_labels=2).save_pretrained(tmp_path / "base")
    merged = gk.export_merged(adapter, tmp_path / "base", tmp_path / "merged")
    full = transformers.AutoModelForSequenceClassification.from_pretrained(merged).eval()
    assert full.bert.encoder.layer[0].intermediate.dense.out_features == 64  # original shapes, pruned units zeroed
    with torch.no_grad():
        torch.testing.assert_close(full(input_ids=ids).logits, want, atol=1e-5, rtol=0)
    # graft merge reads the saved adapter as per-key deltas on the original base (no model is built)
    spec = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
            "models": [{"model": str(adapter), "parameters": {"weight": 1.0}}]}
    by_merge = transformers.AutoModelForSequenceClassification.from_pretrained(gk.merge(spec, tmp_path / "merge")).eval()
    with torch.no_grad():
        torch.testing.assert_close(by_merge(input_ids=ids).logits, want, atol=1e-5, rtol=0)
    # unloading: merged -> the original shapes computing the pruned function; not merged -> the original base
    with torch.no_grad():
        gk.unload(loaded, merge=True)
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, atol=1e-5, rtol=0)
        plain = gk.load_model(assets / "bert", head="classification", num_labels=2).eval()
        again = gk.unload(gk.load_adapter(gk.load_model(assets / "bert", head="classification", num_labels=2).eval(), adapter), merge=False)
        for (n, p), (_, q) in zip(again.named_parameters(), plain.named_parameters()):
            if not n.startswith("classifier"):  # (the classifier was trained whole: unloading puts the base's back)
                assert torch.equal(p, q), n


# -- bad input ---------------------------------------------------------------------------------------

def test_bad_input_is_one_line():
    cases = [
        (lambda: hooks_for(light(tiny_bert()), prune_step=20), ConfigError, "no training after pruning"),
        (lambda: hooks_for(gk.inject(tiny_llama(), {"method": "light_peft", "targets": ["q_proj"]}), head_prune_ratio=0.5),
         UnsupportedError, "grouped-query attention"),
        (lambda: hooks_for(gk.inject(torch.nn.Sequential(torch.nn.Linear(8, 8)), {"method": "light_peft", "targets": ["0"]}),
                           ffn_prune_ratio=0.5), UnsupportedError, "BERT- and Llama-style"),
        (lambda: light(tiny_bert(), use_dora=True), ConfigError, "plain LoRA"),
        (lambda: light(tiny_bert(), head_prune_ratio=1.0), ConfigError, "head_prune_ratio"),
    ]
    for make, err, needle in cases:
        with pytest.raises(err, match=needle) as info:
            make()
        assert "\n" not in str(info.value)


def test_estimation_trains_the_masks_and_sums_taylor_scores():
    """Before pruning: the masks get the task's gradient plus the L1 penalty and move (their own
    Adam), and each rank unit's score is |sum A_i. dL/dA_i. + sum B_.i dL/dB_.i| summed over steps."""
    model = light(tiny_bert())
    h = hooks_for(model, mask_l1=0.5)
    h.lr = None
    penalty = h.extra_loss(model)
    assert torch.allclose(penalty, torch.tensor(0.5 * 2.0))  # mean |m| is 1 for heads and for neurons
    want = {}
    for step in range(2):
        loss = model(input_ids=IDS).logits.float().pow(2).mean() + h.extra_loss(model)
        loss.backward()
        for n, s in gk.sites(model).items():
            unit = ((s.lora_A * s.lora_A.grad).sum(1) + (s.lora_B * s.lora_B.grad).sum(0)).abs()
            want[n] = want.get(n, 0) + unit.detach()
        h.before_update(model, step)
        for p in gk.trainable_parameters(model):
            p.grad = None
    for n in want:
        torch.testing.assert_close(h.taylor[n], want[n])
    heads, ffn = next(iter(h.masks.values()))
    assert heads.grad is None and (heads - 1).abs().max() > 0 and (ffn - 1).abs().max() > 0
