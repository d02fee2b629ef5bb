"""della, della_linear, model_stock, sce, ram and ramplus_tl: golden values on hand-computed tensors,
properties, parity with the real mergekit 0.1.5 (one subprocess runs every recipe, as in
test_merge_parity.py), and their bad inputs (one line, exit 2)."""
from __future__ import annotations

import math

import pytest
import torch
import yaml

import graftkit as gk
import graftkit.merge as M
from graftkit.cli import main
from graftkit.merge.della import keep_probabilities
from merge_helpers import load_folder, make_models, run_mergekit


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol, rtol=0)


def _rand(n=3, shape=(6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn((n, *shape), generator=g) * 0.1


# -- della / della_linear -------------------------------------------------------------------------

def test_della_keep_probabilities_rank_each_row():
    # ascending |x| ranks 0, 2, 1 in a row of 3: p = (0.5 - 0.1) + 2 * 0.1 * r / 2
    assert close(keep_probabilities(torch.tensor([0.1, -0.5, 0.3]), 0.5, 0.1), [0.4, 0.6, 0.5])
    # a matrix ranks each row on its own (mergekit's dim 1), not the whole tensor
    got = keep_probabilities(torch.tensor([[1.0, 2.0], [-30.0, 10.0]]), 0.5, 0.2)
    assert close(got, [[0.3, 0.7], [0.7, 0.3]])
    # a row of one entry has no ranks: density (mergekit stops with a probability error)
    assert close(keep_probabilities(torch.tensor([[3.0], [1.0]]), 0.4, 0.2), [[0.4], [0.4]])
    # higher ranks: along dimension 1 (mergekit's), for every index of the others
    x = torch.randn(2, 5, 3)
    got = keep_probabilities(x, 0.5, 0.2)
    ranks = x.abs().argsort(dim=1).argsort(dim=1).float()
    assert got.shape == x.shape and close(got, 0.3 + 0.4 * ranks / 4)


def test_della_keeps_large_entries_more_often_and_rescales_to_the_l1_norm(monkeypatch):
    import graftkit.merge.della as della_module

    monkeypatch.setattr(della_module, "CHUNK", 1000)  # rows ranked and drawn two at a time
    _, d = _rand(n=1, shape=(50, 400))
    base = torch.zeros(50, 400)  # the merged delta exactly, no base rounding in the way
    out = M.della_linear(base, d, density=0.5, epsilon=0.3, seed=3) - base
    kept = out != 0
    order = d[0].abs().argsort(dim=1)
    low = kept.gather(1, order[:, :40]).float().mean().item()  # the smallest tenth of each row: p in [0.2, 0.26]
    high = kept.gather(1, order[:, -40:]).float().mean().item()  # the largest tenth: p in [0.74, 0.8]
    assert abs(low - 0.23) < 0.03 and abs(high - 0.77) < 0.03, (low, high)
    assert abs(kept.float().mean().item() - 0.5) < 0.01
    assert math.isclose(out.abs().sum().item(), d.abs().sum().item(), rel_tol=1e-5)  # L1 rescale
    scale = (out[kept] / d[0][kept])
    assert torch.allclose(scale, scale[0].expand_as(scale)) and scale[0] > 1  # one factor per tensor
    raw = M.della_linear(base, d, density=0.5, epsilon=0.3, seed=3, rescale=False) - base
    assert torch.equal(raw != 0, kept) and torch.equal(raw[kept], d[0][kept])  # no rescale: the survivors as they are


def test_della_is_seeded_per_model():
    base, d = _rand(n=2, shape=(20, 30))
    a = M.della_merge(base, d, density=0.5, epsilon=0.1, seed=5)
    # the engine's in-place call (its own buffer) draws the same masks
    assert close(M.della_merge(base, d.clone(), density=0.5, epsilon=0.1, seed=5, inplace=True), a)
    for shape in [(4, 3, 5), (7,)]:  # a 3-D tensor ranks along dimension 1; the L1 norm survives the rescale
        b3, d3 = _rand(n=2, shape=shape)
        out = M.della_linear(torch.zeros(shape), d3[:1], density=0.5, epsilon=0.2, seed=1)
        assert out.shape == shape and math.isclose(out.abs().sum().item(), d3[0].abs().sum().item(), rel_tol=1e-5)
        assert ((out != 0) == (M.della_linear(torch.zeros(shape), d3[:1], density=0.5, epsilon=0.2, seed=1, rescale=False) != 0)).all()
    assert torch.equal(a, M.della_merge(base, d, density=0.5, epsilon=0.1, seed=5))
    assert not torch.equal(a, M.della_merge(base, d, density=0.5, epsilon=0.1, seed=6))


def test_della_epsilon_zero_draws_dares_mask():
    base, d = _rand(n=3, shape=(30, 20))
    w = [1.0, 0.5, -0.7]
    got = M.della_linear(base, d, weight=w, density=0.4, epsilon=0.0, rescale=False, seed=9)
    assert torch.equal(got, M.dare_linear(base, d, weight=w, density=0.4, rescale=False, seed=9))


def test_della_density_one_is_ties_and_task_arithmetic():
    base, d = _rand()
    w = [1.0, 0.6, -0.3]
    assert torch.equal(M.della_merge(base, d, weight=w, seed=1), M.ties_merge(base, d, weight=w, density=1.0))
    assert torch.equal(M.della_linear(base, d, weight=w, seed=1), M.task_arithmetic(base, d, weight=w))
    assert close(M.della_merge(base, d[:1], weight=[1.0], seed=1), base + d[0])  # one model: that model


# -- model_stock ----------------------------------------------------------------------------------

def test_model_stock_golden():
    base = torch.zeros(2)
    # cos = 1/sqrt 2, t = 2 cos / (1 + cos) = 0.828427; theta = t * mean = t * [1, 0.5]
    got = M.model_stock_merge(base, torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    t = 2 * 2**-0.5 / (1 + 2**-0.5)
    assert close(got, [t, t / 2])
    # orthogonal offsets: cos 0, t 0 -> the base
    assert close(M.model_stock_merge(base, torch.tensor([[1.0, 0.0], [0.0, 2.0]])), [0.0, 0.0])


def test_model_stock_filter_wise_takes_each_row():
    base = torch.ones(2, 2)
    d = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, -1.0]]])
    # whole tensor: cos 0 -> base; per row: row 0 parallel (t 1, the mean), row 1 opposite (singular -> t 0, the base)
    assert close(M.model_stock_merge(base, d), base)
    assert close(M.model_stock_merge(base, d, filter_wise=True), [[2.0, 1.0], [1.0, 1.0]])
    # a vector is one filter
    v, dv = _rand(n=3, shape=(7,))
    assert close(M.model_stock_merge(v, dv, filter_wise=True), M.model_stock_merge(v, dv))


def test_model_stock_properties():
    base, d = _rand(n=3)
    same = d[:1].expand(3, -1, -1).clone()
    assert close(M.model_stock_merge(base, same), base + d[0])  # identical offsets: cos 1, t 1
    perm = d[[2, 0, 1]]
    for fw in (False, True):
        assert close(M.model_stock_merge(base, perm, filter_wise=fw), M.model_stock_merge(base, d, filter_wise=fw))
    # k = 3, cos = -1/2 puts 1 + 2 cos at 0: no estimate, the base
    e = torch.tensor([[1.0, 0.0], [-0.5, 3**0.5 / 2], [-0.5, -(3**0.5) / 2]])
    assert close(M.model_stock_merge(torch.zeros(2), e), [0.0, 0.0])


# -- sce ------------------------------------------------------------------------------------------

def test_sce_golden():
    base = torch.zeros(4)
    d = torch.tensor([[2.0, 1.0, 0.0, -1.0], [4.0, -3.0, 1.0, 1.0]])
    # weights mean(tau^2) = 1.5, 6.75 -> 2/11, 9/11; signs elected [+, -, +, + (zero sum)]
    w1, w2 = 1.5 / 8.25, 6.75 / 8.25
    assert close(M.sce_merge(base, d), [2 * w1 + 4 * w2, -3.0, 1.0, 1.0])
    # variances [1, 4, 0.25, 2.25]: select_topk 0.5 keeps entries 1 and 3 in every task vector
    d = torch.tensor([[2.0, 1.0, 0.0, -1.0], [4.0, -3.0, 1.0, 2.0]])
    assert close(M.sce_merge(base, d, select_topk=0.5), [0.0, -3.0, 0.0, 2.0])
    assert close(M.sce_merge(base, d, select_topk=0.75), [(2 * 1.5 + 4 * 7.25) / 8.75, -3.0, 0.0, 2.0])


def test_sce_weights_turn_uniform_below_mergekits_floor():
    base = torch.zeros(3)
    d = torch.tensor([[1e-4, 2e-4, 0.0], [3e-4, 1e-4, 0.0]])  # sum of mean squares ~ 5e-8 < 1e-6: weights 1/2
    assert close(M.sce_merge(base, d), [2e-4, 1.5e-4, 0.0], 1e-10)
    big = d * 1e3  # the same task vectors, large: weights by squared magnitude (5/15, 10/15)
    assert close(M.sce_merge(base, big), [(0.1 * 5 + 0.3 * 10) / 15, (0.2 * 5 + 0.1 * 10) / 15, 0.0], 1e-6)


def test_sce_variance_is_torch_var_bit_for_bit(monkeypatch):
    import graftkit.merge.sce as sce_module

    monkeypatch.setattr(sce_module, "BLOCK", 1000)  # several blocks
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 5):
        d = torch.randn(n, 60, 70, generator=g) * 0.002 + torch.randn(60, 70, generator=g) * 0.01
        assert torch.equal(sce_module.variance(d), torch.var(d, dim=0, unbiased=False)), n


def test_sce_properties():
    base, d = _rand(n=3)
    assert close(M.sce_merge(base, d[:1]), base + d[0])  # one model, select_topk 1: that model
    assert close(M.sce_merge(base, d[:1], select_topk=0.5), base)  # one model has no variance: nothing selected
    for topk in (1.0, 0.3):
        assert close(M.sce_merge(base, d[[1, 2, 0]], select_topk=topk), M.sce_merge(base, d, select_topk=topk))
        assert torch.equal(M.sce_merge(base, d.clone(), select_topk=topk, inplace=True), M.sce_merge(base, d, select_topk=topk))


# -- ram / ramplus_tl -----------------------------------------------------------------------------

RAM_D = torch.tensor([[1.0, 0.0, 2.0, 1e-6, 4.0, 0.0, -1.0], [3.0, 5.0, 0.0, 0.0, 0.0, 7.0, 0.0]])


def test_ram_golden():
    # shared entry 0 averages, unique entries stay whole, |tau| <= epsilon does not count
    assert close(M.ram_merge(torch.zeros(7), RAM_D), [2.0, 5.0, 2.0, 0.0, 4.0, 7.0, -1.0])
    assert close(M.ram_merge(torch.zeros(7), RAM_D, epsilon=1.5), [3.0, 5.0, 2.0, 0.0, 4.0, 7.0, 0.0])


def test_ramplus_tl_golden():
    # model 0: 1 shared / 3 unique -> rho 1/3; model 1: 1 / 2 -> 0.5, clamped to alpha 0.4
    l0, l1 = 1 + 0.5 / 3, 1 + 0.5 * 0.4
    want = [2.0, 5 * l1, 2 * l0, 0.0, 4 * l0, 7 * l1, -l0]
    assert close(M.ramplus_tl(torch.zeros(7), RAM_D, r=0.5, alpha=0.4), want)
    assert close(M.ramplus_tl(torch.zeros(7), RAM_D, r=0.0), M.ram_merge(torch.zeros(7), RAM_D))  # r 0 is RAM


def test_ram_properties():
    base, d = _rand(n=3)
    for fn in (M.ram_merge, M.ramplus_tl):
        assert close(fn(base, d[[2, 0, 1]]), fn(base, d))
        assert torch.equal(fn(torch.ones(7), RAM_D.clone(), epsilon=0.5, inplace=True), fn(torch.ones(7), RAM_D, epsilon=0.5))  # the engine's buffer
        one = d[:1].clone()
        one[0, 0, :2] = 0.0
        assert close(fn(base, one), base + one[0])  # one model: its changes whole (nothing shared)
    assert close(M.ram_merge(base, d), base + d.mean(dim=0))  # dense deltas: every entry shared by all, the mean


# -- parity with mergekit -------------------------------------------------------------------------


W = [1.0, 0.6, -0.3]


def recipes(m):
    ft = [str(m[f"ft{i}"]) for i in range(3)]
    base = str(m["base"])
    per = lambda extra: [{"model": p, "parameters": {"weight": w, **extra}} for p, w in zip(ft, W)]  # noqa: E731
    plain = [{"model": p} for p in ft]
    return {
        "della_d1": {"merge_method": "della", "base_model": base, "models": per({"density": 1.0})},
        "della_linear_d1": {"merge_method": "della_linear", "base_model": base, "models": per({}), "parameters": {"lambda": 0.7}},
        "della": {"merge_method": "della", "base_model": base, "models": per({"density": 0.5, "epsilon": 0.2})},
        "della_linear_one": {"merge_method": "della_linear", "base_model": base,
                             "models": [{"model": ft[0], "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.3}}]},
        "model_stock": {"merge_method": "model_stock", "base_model": base, "models": plain},
        "model_stock_fw": {"merge_method": "model_stock", "base_model": base, "models": plain[:2], "parameters": {"filter_wise": True}},
        "sce": {"merge_method": "sce", "base_model": base, "models": plain},
        "sce_topk": {"merge_method": "sce", "base_model": base, "models": plain, "parameters": {"select_topk": 0.4}},
        "ram": {"merge_method": "ram", "base_model": base, "models": plain},
        "ram_sparse": {"merge_method": "ram", "base_model": base, "models": plain, "parameters": {"epsilon": 0.02}},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": base, "models": plain,
                       "parameters": {"epsilon": 0.015, "r": 0.5, "alpha": 0.3}},
    }


EXACT = ["della_d1", "della_linear_d1", "model_stock", "model_stock_fw", "sce", "sce_topk", "ram", "ram_sparse", "ramplus_tl"]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    pytest.importorskip("mergekit")
    root = tmp_path_factory.mktemp("parity_delta")
    m = make_models(root, scale=0.02)
    jobs, cfgs = [], {}
    for name, cfg in recipes(m).items():
        path = root / f"{name}.yml"
        path.write_text(yaml.safe_dump({**cfg, "dtype": "float32"}))
        cfgs[name] = path
        jobs.append((str(path), str(root / f"mk_{name}")))
    run_mergekit(jobs)
    out = {name: (load_folder(root / f"mk_{name}"), load_folder(gk.merge(path, root / f"gk_{name}"))) for name, path in cfgs.items()}
    return out, m


@pytest.mark.parametrize("name", EXACT)
def test_equal_to_mergekit(outputs, name):
    (theirs, ours), m = outputs[0][name], outputs[1]
    assert set(theirs) == set(ours)
    base = load_folder(m["base"])
    moved = 0
    for key in theirs:
        assert torch.allclose(ours[key], theirs[key].to(ours[key].dtype), atol=2e-6, rtol=1e-5), (name, key)
        moved += not torch.equal(ours[key], base[key])
    assert moved > 0  # the merge did something (a method that returned the base would pass the comparison only with a broken peer)


def test_della_matches_mergekit_in_distribution(outputs):
    results, m = outputs
    base, ft0 = load_folder(m["base"]), load_folder(m["ft0"])
    theirs, ours = results["della_linear_one"]
    for key in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
        tau = ft0[key] - base[key]
        order = tau.abs().argsort(dim=1)
        q = order.shape[1] // 4
        stats = []
        for merged in (ours[key], theirs[key]):
            d = merged - base[key]
            kept = d != 0
            # L1 rescale: the pruned delta has the unpruned one's L1 norm (both tools, per tensor)
            assert math.isclose(d.abs().sum().item(), tau.abs().sum().item(), rel_tol=1e-4)
            stats.append((kept.float().mean().item(), kept.gather(1, order[:, :q]).float().mean().item(),
                          kept.gather(1, order[:, -q:]).float().mean().item()))
        # kept share 0.5; the smallest quarter of each row p in [0.2, 0.35], the largest [0.65, 0.8]; the masks
        # are random (unseeded in both tools), so each share may miss its mean by 5 standard errors of its count
        def ok(got: float, p: float, n: int) -> bool:
            return abs(got - p) < 5 * math.sqrt(p * (1 - p) / n)

        n_all, n_quarter = tau.numel(), tau.shape[0] * q
        for share, low, high in stats:
            assert ok(share, 0.5, n_all) and ok(low, 0.275, n_quarter) and ok(high, 0.725, n_quarter), stats
        assert not torch.equal(ours[key], theirs[key])  # genuinely random masks
    theirs, ours = results["della"]
    key = "model.layers.0.mlp.up_proj.weight"
    fts = [load_folder(m[f"ft{i}"])[key] - base[key] for i in range(3)]
    d_ours, d_theirs = ours[key] - base[key], theirs[key] - base[key]
    # nobody kept an entry: (1 - 0.5)^3 in expectation for either tool
    zeros = [(d == 0).float().mean().item() for d in (d_ours, d_theirs)]
    assert all(abs(z - 0.125) < 0.04 for z in zeros), zeros
    assert abs(d_ours.abs().mean().item() / d_theirs.abs().mean().item() - 1) < 0.1
    ties_full = sum(w * f for w, f in zip(W, fts))
    for d in (d_ours, d_theirs):
        assert torch.corrcoef(torch.stack([d.flatten(), ties_full.flatten()]))[0, 1].item() > 0.5


# -- bad input: one line, exit 2, nothing written -------------------------------------------------

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("bad_models"), n=2)


def run_bad(tmp_path, capsys, cfg: dict) -> str:
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump({"dtype": "float32", **cfg}))
    out = tmp_path / "bad_out"
    capsys.readouterr()
    rc = main(["merge", str(path), str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("graft: error:") and "Traceback" not in err, err
    assert not out.exists()
    return err


def _cfg(m, method, base=True, params=None, **model_params):
    cfg = {"merge_method": method, "models": [{"model": str(m[f"ft{i}"]), "parameters": dict(model_params)} for i in range(2)]}
    if base:
        cfg["base_model"] = str(m["base"])
    if params:
        cfg["parameters"] = params
    return cfg


@pytest.mark.parametrize("density,epsilon,word", [(0.1, 0.15, "density - epsilon > 0"), (0.9, 0.15, "density + epsilon < 1"),
                                                  (0.5, 1.2, "epsilon 1.2 is out of range"), (1.5, 0.1, "density 1.5 is out of range"),
                                                  (0.0, 0.1, "density 0.0 is out of range")])
def test_bad_della_density_and_epsilon(small, tmp_path, capsys, density, epsilon, word):
    for method in ("della", "della_linear"):
        assert word in run_bad(tmp_path, capsys, _cfg(small, method, density=density, epsilon=epsilon))
    # the default epsilon (0.15) counts too
    assert "lower epsilon" in run_bad(tmp_path, capsys, _cfg(small, "della", density=0.1))


@pytest.mark.parametrize("method", ["della", "della_linear", "model_stock", "sce", "ram", "ramplus_tl"])
def test_bad_missing_base(small, tmp_path, capsys, method):
    assert "needs a base_model" in run_bad(tmp_path, capsys, _cfg(small, method, base=False))


def test_bad_model_stock_one_model_and_sce_topk(small, tmp_path, capsys):
    cfg = _cfg(small, "model_stock")
    cfg["models"] = cfg["models"][:1]
    assert "at least 2 model(s)" in run_bad(tmp_path, capsys, cfg)
    for topk in (0.0, 1.5):
        assert "select_topk" in run_bad(tmp_path, capsys, _cfg(small, "sce", params={"select_topk": topk}))
    assert "unknown parameter 'weight'" in run_bad(tmp_path, capsys, _cfg(small, "sce", weight=1.0))  # sce takes no weights
    assert "'filter_wise'" in run_bad(tmp_path, capsys, _cfg(small, "model_stock", params={"filter_wise": "rows"}))
    assert "epsilon -0.1 is out of range" in run_bad(tmp_path, capsys, _cfg(small, "ram", params={"epsilon": -0.1}))
    assert "'r'" in run_bad(tmp_path, capsys, _cfg(small, "ramplus_tl", params={"r": "high"}))
