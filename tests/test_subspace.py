"""Random-subspace tuning (theta0 + P z) and ``graft probe intrinsic-dim``.

Golden tests of the math (the Walsh-Hadamard transform against scipy's dense Hadamard matrix,
Fastfood against the dense matrix built from its own parts, unit-norm columns), the saved form
(z and the seed only; the projection is rebuilt from the seed), merging through ``graft merge``,
bad input in one line, training, and the probe on the tiny BERT of tests/test_train.py."""
from __future__ import annotations

import json

import pytest
import scipy.linalg
import torch
import yaml
from safetensors.torch import load_file

import graftkit as gk
from graftkit.adapter import get_state
from graftkit.cli import main as graft_main
from graftkit.errors import ConfigError
from graftkit.methods import subspace
from graftkit.methods.subspace import SLOT, Projection, block_size, fwht
from graftkit.train import parse_recipe, train
from graftkit.train.probe import d_int90, parse_dims, probe_intrinsic_dim
from conftest import logits, tiny_bert, tiny_inputs, tiny_llama
from merge_helpers import load_folder
from test_train import assert_one_line_error, assets, cls_recipe, losses  # noqa: F401  (assets is a fixture)


def hadamard(n: int) -> torch.Tensor:
    return torch.tensor(scipy.linalg.hadamard(n), dtype=torch.float64)


# -- the transforms ------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 4, 32, 64, 256, 2048])  # one factor, two, three (32 x 32 x 2)
def test_fwht_equals_the_dense_hadamard_matrix(n):
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(fwht(x), x @ hadamard(n), atol=1e-10)
    # the backward pass is the same transform (H is symmetric): d/dx <w, H x> = H w
    x.requires_grad_(True)
    w = torch.randn_like(x)
    (fwht(x) * w).sum().backward()
    assert torch.allclose(x.grad, w @ hadamard(n), atol=1e-10)


def test_fwht_refuses_a_length_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.ones(6))


def fastfood_dense(p: Projection) -> torch.Tensor:
    """The D x d matrix of ``p``'s Fastfood blocks, built from its parts with dense matrices:
    rows of block b = H diag(G_b) Pi_b H diag(B_b), first d columns, blocks stacked, cut to D."""
    nb, L = p.signs.shape
    H = hadamard(L)
    blocks = []
    for b in range(nb):
        pi = torch.zeros(L, L, dtype=torch.float64)
        pi[torch.arange(L), p.perm[b]] = 1.0  # (Pi x)_i = x[perm_i]
        blocks.append(H @ torch.diag(p.gauss[b].double()) @ pi @ H @ torch.diag(p.signs[b].double()))
    return torch.cat(blocks)[: p.total, : p.d]


@pytest.mark.parametrize("total,d", [(100, 5), (64, 16), (37, 37), (1000, 1)])
def test_fastfood_equals_its_dense_equivalent(total, d, monkeypatch):
    monkeypatch.setattr(subspace, "CHUNK", 32)  # several chunks of blocks (or one block each) per projection
    p = Projection("fastfood", total, d, seed=3)
    assert p.signs.shape[1] == block_size(d) >= d
    dense = fastfood_dense(p)
    z = torch.randn(d, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(p(z).double(), dense @ z.double(), atol=1e-5)
    assert torch.allclose(p.dense_matrix().double(), dense, atol=1e-5)
    # the backward pass (the inverse permutation, H again): d/dz <w, P z> = P^T w
    z.requires_grad_(True)
    w = torch.randn(total, generator=torch.Generator().manual_seed(2))
    (p(z) * w).sum().backward()
    assert torch.allclose(z.grad.double(), dense.t() @ w.double(), atol=1e-5)


def test_fastfood_columns_have_unit_norm():
    # exactly 1 when D is a multiple of the block (each block is unit-norm before the cut), and
    # close to 1 on average when the last block is cut
    p = Projection("fastfood", 8 * 16, 13, seed=0)
    assert torch.allclose(p.dense_matrix().norm(dim=0), torch.ones(13), atol=1e-5)
    cut = Projection("fastfood", 5000, 100, seed=1).dense_matrix().norm(dim=0)
    assert abs(cut.pow(2).mean().item() - 1) < 0.02


def test_dense_projection_columns_have_unit_norm_and_follow_the_seed():
    p = Projection("dense", 500, 20, seed=5)
    assert p.matrix.shape == (500, 20)
    assert torch.allclose(p.matrix.norm(dim=0), torch.ones(20), atol=1e-6)
    assert torch.equal(Projection("dense", 500, 20, seed=5).matrix, p.matrix)
    assert not torch.equal(Projection("dense", 500, 20, seed=6).matrix, p.matrix)


# -- the method ----------------------------------------------------------------------------------

def subspace_model(**cfg):
    model = tiny_bert(0)
    torch.manual_seed(0)
    gk.inject(model, {"method": "subspace", "d": 24, "init_weights": False, **cfg})
    return model


@pytest.mark.parametrize("projection", ["dense", "fastfood"])
def test_saved_file_holds_z_and_the_seed_only_and_reload_rebuilds_the_delta(tmp_path, projection):
    model = subspace_model(projection=projection, seed=11)
    path = gk.save_adapter(model, tmp_path / "a")
    tensors = load_file(path / "adapter.safetensors")
    first = get_state(model).targets[0]
    assert list(tensors) == [f"{first}.{SLOT}"] and tensors[f"{first}.{SLOT}"].shape == (24,)
    meta = json.loads((path / "adapter.json").read_text())
    assert meta["config"]["seed"] == 11 and meta["config"]["d"] == 24
    assert {o["projection"] for o in meta["target_options"].values()} == {projection}
    total = sum(p.numel() for n, p in tiny_bert(0).named_parameters())
    assert all(o["total"] == total for o in meta["target_options"].values())
    want = gk.materialize_delta(model)
    fresh = tiny_bert(0)
    gk.load_adapter(fresh, path)
    got = gk.materialize_delta(fresh)
    assert want.keys() == got.keys() and len(want) == len(meta["targets"])
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert sum(t.numel() for t in want.values()) == total
    # the delta comes from the seed: another seed with the same z is another delta
    meta["config"]["seed"] = 12
    (path / "adapter.json").write_text(json.dumps(meta))
    other = tiny_bert(0)
    gk.load_adapter(other, path)
    k = next(iter(want))
    assert not torch.allclose(gk.materialize_delta(other)[k], want[k])


def test_merged_equals_unmerged_and_graft_merge_equals_the_materialized_model(tmp_path):
    model = subspace_model(projection="fastfood")
    ids = tiny_inputs()
    unmerged = logits(model, ids)
    gk.merge_adapter(model)
    assert torch.allclose(logits(model, ids), unmerged, atol=1e-5)
    gk.unmerge_adapter(model)
    tiny_bert(0).save_pretrained(tmp_path / "base")
    gk.save_adapter(model, tmp_path / "a")
    full = gk.export_merged(tmp_path / "a", tmp_path / "base", tmp_path / "full")
    cfg = lambda m: {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"), "dtype": "float32",  # noqa: E731
                     "models": [{"model": str(m), "parameters": {"weight": 1.0}}]}
    a = load_folder(gk.merge(cfg(tmp_path / "a"), tmp_path / "from_adapter"))  # the saved z through merge_deltas
    b = load_folder(gk.merge(cfg(full), tmp_path / "from_full"))
    base = load_folder(tmp_path / "base")
    delta = gk.materialize_delta(model)
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    k = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.allclose(a[k] - base[k], delta[k], atol=1e-6) and delta[k].abs().max() > 0


def test_one_projection_per_forward_and_micro_batches_train():
    """P z is formed once per forward (shared by every site) and again after each backward, so
    gradient accumulation over micro-batches works; z gets P^T g."""
    model = subspace_model().eval()  # no dropout: the two passes must see the same function
    z = next(p for p in model.parameters() if p.requires_grad)
    for _ in range(2):  # two micro-batches with the same z: each builds its own graph
        model(input_ids=tiny_inputs()).logits.pow(2).mean().backward()
    g2 = z.grad.clone()
    z.grad = None
    model(input_ids=tiny_inputs()).logits.pow(2).mean().backward()
    assert torch.allclose(g2, 2 * z.grad, atol=1e-7) and z.grad.abs().max() > 0


def test_d_larger_than_the_parameters_is_one_line(assets, tmp_path, capsys):  # noqa: F811
    total = sum(p.numel() for p in tiny_llama(0).parameters())
    model = tiny_llama(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=f"d = {total + 1} is larger than the {total:,} parameters"):
        gk.inject(model, {"method": "subspace", "d": total + 1})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert get_state(model) is None
    # the same through graft train: one line, exit 2
    r = cls_recipe(assets, tmp_path / "run", method={"method": "subspace", "d": 10**9})
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(r))
    code = graft_main(["train", str(f), "--no-progress"])
    assert_one_line_error(code, capsys.readouterr().err, "d = 1000000000 is larger than the", "parameters")


def test_bad_dims_are_one_line(assets, tmp_path, capsys):  # noqa: F811
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(cls_recipe(assets, tmp_path / "run")))
    for dims, needle in (("10,x", "'x' is not a whole number"), ("10,0", "0 is not a subspace dimension"), (",", "--dims is empty")):
        with pytest.raises(SystemExit) as exc:
            graft_main(["probe", "intrinsic-dim", str(f), "--dims", dims])
        assert_one_line_error(exc.value.code, capsys.readouterr().err, needle)
    assert parse_dims("1000, 10,100,10") == [10, 100, 1000]
    assert not (tmp_path / "run").exists() and not (tmp_path / "run-probe").exists()


def test_training_in_the_subspace_lowers_the_loss_and_can_freeze_the_head(assets, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    summary = train(parse_recipe(cls_recipe(assets, out, method={"method": "subspace", "d": 64, "head": "freeze"},
                                            optim={"lr": 5e-2, "grad_accum": 2, "batch_size": 2})), progress=False)
    ls = losses(out)
    assert sum(ls[-4:]) / 4 < sum(ls[:4]) / 4
    assert summary["trainable_parameters"] == 64  # z alone: the frozen head does not train
    assert summary["method_report"]["d"] == 64 and summary["method_report"]["head"] == "freeze"
    saved = load_file(out / "adapter" / "adapter.safetensors")
    assert [k for k in saved if k.endswith(".value")] and [k for k in saved if k.endswith(SLOT)]  # the (frozen) head and z


# -- the probe -----------------------------------------------------------------------------------

def test_d_int90_is_the_smallest_d_reaching_90_percent_of_full():
    runs = [{"d": 1000, "score": 0.95}, {"d": 10, "score": 0.5}, {"d": 100, "score": 0.9}, {"d": 50, "score": None},
            {"d": 30, "score": 0.899}]
    assert d_int90(runs, 1.0) == 100  # 0.9 of 1.0 counts as reached; 0.899 does not; order does not matter
    assert d_int90(runs, 0.8) == 30
    assert d_int90([{"d": 10, "score": 0.95}, {"d": 100, "score": 0.5}], 1.0) == 10  # not monotone: still the smallest
    assert d_int90(runs, 1.2) is None


def test_probe_on_the_tiny_bert(assets, tmp_path, capsys):  # noqa: F811
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(cls_recipe(assets, tmp_path / "run", method={"method": "lora", "r": 2, "targets": ["query"]},
                                           optim={"max_steps": 6}, eval={"every": None})))
    out = tmp_path / "probe"
    code = graft_main(["probe", "intrinsic-dim", str(f), "--dims", "256,4", "--out", str(out), "--full-lr", "3e-3",
                       "--subspace-lr", "5e-2", "--no-progress"])
    text = capsys.readouterr().out
    assert code == 0
    result = json.loads((out / "probe.json").read_text())
    assert result["metric"] == "val_accuracy" and result["fraction"] == 0.9
    assert result["full"]["source"] == "trained" and 0 <= result["full"]["score"] <= 1
    assert result["full_lr"] == 3e-3 and result["subspace_lr"] == 5e-2 and result["budget"]["steps"] == 6
    assert [r["d"] for r in result["runs"]] == [4, 256]
    for r in result["runs"]:
        assert r["trainable"] == r["d"] and r["projection"] in ("dense", "fastfood") and r["D"] > 256
        assert r["of_full"] == pytest.approx(r["score"] / result["full"]["score"])
        assert (out / f"d{r['d']}" / "adapter" / "adapter.json").is_file()
    assert result["threshold"] == pytest.approx(0.9 * result["full"]["score"])
    assert result["d_int90"] == d_int90(result["runs"], result["full"]["score"])
    assert (out / "probe.png").stat().st_size > 0
    val = [json.loads(x)["label"] for x in (assets / "cls_val.jsonl").read_text().splitlines()]
    assert result["chance"] == max(val.count(y) for y in set(val)) / len(val)  # the majority label's share
    assert ("warning" in result) == (result["full"]["score"] < result["chance"] + 0.1 * (1 - result["chance"]))
    assert "d_int90" in text
    # a given full score skips that run; a non-empty output folder needs --overwrite
    with pytest.raises(ConfigError, match="not empty"):
        probe_intrinsic_dim(parse_recipe(yaml.safe_load(f.read_text())), [4], out, full_score=0.5)
    again = probe_intrinsic_dim(parse_recipe(yaml.safe_load(f.read_text())), [4], out, full_score=2.0, subspace_lr=5e-2,
                                overwrite=True, progress=False)
    assert again["full"] == {"score": 2.0, "source": "given"} and again["d_int90"] is None and "warning" not in again
    near_chance = probe_intrinsic_dim(parse_recipe(yaml.safe_load(f.read_text())), [4], out, full_score=again["chance"],
                                      subspace_lr=5e-2, overwrite=True, progress=False)
    assert "not meaningful" in near_chance["warning"]
    assert json.loads((out / "probe.json").read_text())["warning"] == near_chance["warning"]
