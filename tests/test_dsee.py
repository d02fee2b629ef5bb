"""DSEE (methods/dsee.py): ``s (B A + S)`` by hand, S's support chosen from the pretrained weight
(magnitude, a low-rank plus sparse split, random; entries, rows or heads) and stored compactly, the
pruned final weight (live, merged, saved and merged again alike, with the sparsity reached reported),
a training run, and the bad inputs in one line."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import graftkit as gk
from graftkit.errors import AdapterError, ConfigError, GraftError
from graftkit.methods.dsee import dsee_formula, dsee_report, select_support
from test_bad_input import check_error
from test_flora import graft_one_line_error
from test_train import assets, cls_recipe, losses  # noqa: F401  (assets is a fixture)

SETTINGS = {"lora_alpha": 4.0, "sparse_select": "magnitude", "structure": "unstructured", "seed": 0, "decompose_rank": 1}


def net(out_f: int = 6, in_f: int = 5, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_f, out_f))


def randomize(model, seed: int = 4, std: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gk.trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


# -- the math by hand -----------------------------------------------------------------------------------

def test_formula_by_hand():
    a = torch.tensor([[1.0, 0.0, 2.0]])            # r = 1, in = 3
    b = torch.tensor([[1.0], [-1.0]])              # out = 2
    # unstructured: entries (0, 1) and (1, 2) are flat indices 1 and 5
    slots = {"dsee_A": a, "dsee_B": b, "dsee_index": torch.tensor([1, 5]), "dsee_values": torch.tensor([10.0, 20.0])}
    want = 4.0 * torch.tensor([[1.0, 10.0, 2.0], [-1.0, 0.0, 18.0]])
    assert torch.equal(dsee_formula("linear", torch.zeros(2, 3), slots, {"lora_alpha": 4.0}), want)
    # rows: the whole second row of S
    rows = {**slots, "dsee_index": torch.tensor([1]), "dsee_values": torch.tensor([[1.0, 2.0, 3.0]])}
    want = 4.0 * torch.tensor([[1.0, 0.0, 2.0], [0.0, 2.0, 1.0]])
    assert torch.equal(dsee_formula("linear", torch.zeros(2, 3), rows, {"lora_alpha": 4.0}), want)
    # pruned: M * (W + delta) - W with the smallest third of |W + delta| (2 of 6 entries) zeroed
    w = torch.tensor([[0.5, -3.0, 1.0], [2.0, 0.25, -1.5]])
    pruned = dsee_formula("linear", w, slots, {"lora_alpha": 4.0, "prune": 1 / 3})
    full = w + 4.0 * torch.tensor([[1.0, 10.0, 2.0], [-1.0, 0.0, 18.0]])  # [[4.5, 37, 9], [-2, 0.25, 70.5]]
    assert torch.equal(w + pruned, full * torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 1.0]]))


def test_support_by_magnitude_and_by_decomposition():
    # a rank-one weight plus three spikes: the low-rank plus sparse split finds the spikes, magnitude
    # picks the rank-one part's largest entries instead
    u, v = torch.arange(1.0, 7.0), torch.arange(1.0, 6.0)
    w = torch.outer(u, v)
    spikes = torch.tensor([0, 7, 11])  # on small entries, so that magnitude alone misses them
    w.view(-1)[spikes] += torch.tensor([6.0, -6.0, 5.0])
    dec = select_support(w, 3, {**SETTINGS, "sparse_select": "decomposition"}, "w")
    assert torch.equal(dec, spikes)
    mag = select_support(w, 3, SETTINGS, "w")
    assert torch.equal(mag, torch.topk(w.abs().flatten(), 3).indices.sort().values)
    assert not torch.equal(mag, spikes)
    # rows by their norm, heads by the norm of their block of head_dim rows
    rows = select_support(w, 2, {**SETTINGS, "structure": "rows"}, "w")
    assert torch.equal(rows, torch.topk(w.norm(dim=1), 2).indices.sort().values)
    heads = select_support(w, 1, {**SETTINGS, "structure": "heads", "head_dim": 2}, "w")
    assert torch.equal(heads, torch.tensor([4, 5]))  # the last block holds the largest rows
    # random: fixed by the seed and the name
    r1 = select_support(w, 4, {**SETTINGS, "sparse_select": "random"}, "w")
    assert torch.equal(r1, select_support(w, 4, {**SETTINGS, "sparse_select": "random"}, "w"))
    assert not torch.equal(r1, select_support(w, 4, {**SETTINGS, "sparse_select": "random", "seed": 1}, "w"))


@pytest.mark.parametrize("extra", [{}, {"structure": "rows", "num_sparse": 2}, {"structure": "heads", "head_dim": 3, "num_sparse": 1}])
def test_factored_forward_equals_the_dense_delta(extra):
    model = gk.inject(net(), {"method": "dsee", "r": 2, "lora_alpha": 3.0, "num_sparse": 7, "targets": ["0"], **extra})
    randomize(model)
    site = gk.sites(model)["0.weight"]
    x = torch.randn(2, 4, 5)
    dense = x @ site.delta_matrix(site.base).t()
    torch.testing.assert_close(site.factored_output(x), dense, atol=1e-6, rtol=0)
    # the support is where the pretrained weight is largest, and S is non-zero only there
    s = site.delta_matrix(site.base) - 1.5 * site.dsee_B @ site.dsee_A
    assert (s.abs() > 1e-6).sum() <= site.dsee_values.numel()


def test_sparse_delta_is_saved_compactly(tmp_path):
    from graftkit.io import read_adapter

    model = gk.inject(net(12, 10), {"method": "dsee", "r": 2, "sparse_fraction": 0.1, "targets": ["0"]})
    randomize(model)
    gk.save_adapter(model, tmp_path / "a")
    t = read_adapter(tmp_path / "a").tensors
    assert t["0.weight.dsee_index"].dtype == torch.int64 and tuple(t["0.weight.dsee_index"].shape) == (12,)
    assert tuple(t["0.weight.dsee_values"].shape) == (12,)
    assert all(v.numel() < 12 * 10 for v in t.values()), "no dense (out, in) tensor is saved"
    fresh = gk.load_adapter(net(12, 10), tmp_path / "a")
    x = torch.randn(3, 10)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


# -- the pruned final weight ------------------------------------------------------------------------------

def test_pruned_weight_live_merged_saved_and_merged_again(tmp_path):
    from graftkit.io import read_adapter
    from graftkit.methods import method_named
    from graftkit.methods.base import SavedTarget

    base = net(8, 10)
    original = base[0].weight.detach().clone()
    model = gk.inject(net(8, 10), {"method": "dsee", "r": 2, "num_sparse": 5, "prune": 0.4, "targets": ["0"]})
    x = torch.randn(3, 10)
    with torch.no_grad():
        # pruning alone changes the model: 32 of 80 entries are zero in the adapted weight
        pruned = original + gk.materialize_delta(model)["0.weight"]
        assert int((pruned == 0).sum()) == 32
        kept = pruned != 0
        assert original.abs()[kept].min() >= original.abs()[~kept].max(), "the smallest magnitudes are the ones pruned"
    randomize(model)
    with torch.no_grad():
        out = model(x)
    delta = gk.materialize_delta(model)["0.weight"]
    report = dsee_report(model)
    assert report["final_weight_sparsity"] == pytest.approx(0.4) and report["final_weight_zeros"] == 32
    assert report["sparse_entries"] == 5 and report["prune"] == 0.4
    gk.merge_adapter(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), out, atol=1e-6, rtol=0)
    assert int((model[0].weight == 0).sum()) == 32
    assert dsee_report(model)["final_weight_zeros"] == 32
    gk.save_adapter(model, tmp_path / "a")
    gk.unmerge_adapter(model)
    torch.testing.assert_close(model[0].weight, original, atol=1e-6, rtol=0)
    # graft merge's input: the saved tensors through the same formula give the same pruned weight
    adapter = read_adapter(tmp_path / "a")
    slots = {k[len("0.weight."):]: v for k, v in adapter.tensors.items() if k.startswith("0.weight.")}
    t = SavedTarget("0.weight", slots, adapter.meta["config"], adapter.meta["target_options"]["0.weight"], "linear", (8, 10),
                    {"0.weight"}, "a", lambda kind, feedforward=False: None, adapter.tensors)
    (d,) = method_named("dsee").merge_deltas(t).values()
    torch.testing.assert_close(d.fn(original), delta, atol=1e-6, rtol=0)
    assert int((original + d.fn(original) == 0).sum()) == 32


# -- graft train --------------------------------------------------------------------------------------

def test_classification_run_learns_and_reports(assets, tmp_path):
    from graftkit.train import parse_recipe, train

    out = tmp_path / "run"
    method = {"method": "dsee", "r": 4, "num_sparse": 64, "targets": ["query", "value", "dense"]}
    summary = train(parse_recipe(cls_recipe(assets, out, method=method, optim={"lr": 1e-2})), progress=False)
    ls = losses(out)
    assert sum(ls[-4:]) / 4 < 0.8 * sum(ls[:4]) / 4, ls
    report = summary["method_report"]
    assert report["sparse_entries"] == 11 * 64 and report["prune"] is None  # q, v, 3 dense per layer, the pooler
    assert report["final_weight_sparsity"] < 0.01
    assert json.loads((out / "run.json").read_text())["summary"]["method_report"]["sparse_entries"] == 11 * 64


def test_pruned_run_learns_and_exports_the_sparse_weight(assets, tmp_path):
    from safetensors.torch import load_file

    from graftkit.train import parse_recipe, train

    out = tmp_path / "run"
    method = {"method": "dsee", "r": 4, "sparse_fraction": 0.01, "prune": 0.5, "targets": ["query", "value", "dense"]}
    summary = train(parse_recipe(cls_recipe(assets, out, method=method, optim={"lr": 1e-2}, output={"export": ["merged"]})),
                    progress=False)
    assert summary["final_loss"] < summary["first_loss"]
    report = summary["method_report"]
    assert report["final_weight_sparsity"] == pytest.approx(0.5, abs=1e-3)
    merged = {}
    for f in (out / "merged").glob("*.safetensors"):
        merged.update(load_file(f))
    q = next(v for k, v in merged.items() if k.endswith("layer.0.attention.self.query.weight"))
    assert int((q == 0).sum()) == q.numel() // 2


# -- bad input, one line --------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, needles", [
    ({"sparse_fraction": 0}, ("sparse_fraction",)),
    ({"sparse_fraction": 1.5}, ("sparse_fraction",)),
    ({"sparse_fraction": -0.2}, ("sparse_fraction",)),
    ({"prune": 1.0}, ("prune",)),
    ({"num_sparse": 31}, ("num_sparse=31", "30 entries", "0.weight")),
    ({"structure": "rows", "num_sparse": 7}, ("num_sparse=7", "6 rows")),
    ({"structure": "heads"}, ("head_dim",)),
    ({"structure": "heads", "head_dim": 4}, ("head_dim=4", "6 output rows")),
])
def test_bad_sizes_are_one_line_and_leave_the_model(extra, needles):
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as ei:
        gk.inject(model, {"method": "dsee", "r": 2, "targets": ["0"], **extra})
    check_error(ei, ConfigError, *needles)
    from graftkit.adapter import get_state

    assert get_state(model) is None
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_sparse_fraction_out_of_range_in_graft_train_is_one_line(assets, tmp_path, capsys):
    rec = cls_recipe(assets, tmp_path / "run", method={"method": "dsee", "sparse_fraction": 1.2, "targets": ["query"]})
    graft_one_line_error(capsys, tmp_path, rec, "sparse_fraction")


def test_corrupt_saved_index_is_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    model = gk.inject(net(), {"method": "dsee", "r": 2, "num_sparse": 4, "targets": ["0"]})
    gk.save_adapter(model, tmp_path / "a")
    f = tmp_path / "a" / "adapter.safetensors"
    tensors = load_file(f)
    tensors["0.weight.dsee_index"] = torch.tensor([0, 1, 2, 30])  # 6 x 5 weight: 30 is past the end
    save_file(tensors, f)
    with pytest.raises(GraftError) as ei:
        gk.load_adapter(net(), tmp_path / "a")
    check_error(ei, AdapterError, "0.weight.dsee_index", "outside [0, 30)")
