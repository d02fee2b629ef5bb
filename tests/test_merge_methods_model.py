"""The model-space interpolation methods (nuslerp, multislerp, karcher, nearswap, arcee_fusion):
golden values computed by hand on tiny tensors, properties (endpoints, one-model identity,
symmetry), their config errors, and parity with the real mergekit 0.1.5 on tiny Llama folders
(one mergekit subprocess for every recipe)."""
from __future__ import annotations

import math

import pytest
import torch
import yaml

import graftkit as gk
from graftkit.errors import ConfigError, GraftError
from graftkit.merge.config import load_config
from graftkit.registry import MERGES

METHODS = ("nuslerp", "multislerp", "karcher", "nearswap", "arcee_fusion")


def fn(name):
    return MERGES.get(name).fn


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol, rtol=0)


def rand(shape=(6, 5), n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn((n, *shape), generator=g)


# -- nearswap ---------------------------------------------------------------------------------

def test_nearswap_golden():
    a = torch.tensor([0.0, 0.0, 1.0, 2.0])
    b = torch.tensor([0.05, 1.0, 1.0, -2.0])
    # gap <= t: b; gap 1: a + 0.1 * (b - a); equal: unchanged; gap 4: w = 0.025 -> 0.025 * -2 + 0.975 * 2
    assert close(fn("nearswap")(a, torch.stack([a, b]), t=0.1), [0.05, 0.1, 1.0, 1.9], 1e-6)


def test_nearswap_moves_each_entry_by_at_most_t():
    base, other = rand(n=1)
    other = base + other[0] * 0.3
    for t in (0.0, 0.05, 0.2):
        out = fn("nearswap")(base, torch.stack([base, other]), t=t)
        assert close((out - base).abs(), torch.minimum((other - base).abs(), torch.tensor(t)), 1e-6)
    assert torch.equal(fn("nearswap")(base, torch.stack([base, other]), t=0.0), base)


# -- arcee_fusion -----------------------------------------------------------------------------

def test_arcee_fusion_golden_keeps_only_the_outlier():
    a = torch.full((1, 8), 0.5)
    diff = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 5.0]])
    # one row: importance = |diff| * KL (one positive KL for the row). Order statistics at
    # floor(q * 7): Q1 = 0.2, median = 0.4, Q3 = 0.6 -> fence 0.4 + 1.5 * 0.4 = 1.0 (times KL): only 5.0
    out = fn("arcee_fusion")(a, torch.stack([a, a + diff]))
    assert close(out, a + diff * torch.tensor([0, 0, 0, 0, 0, 0, 0, 1.0]), 1e-6)


def test_arcee_fusion_keeps_entries_at_the_fence():
    a = torch.zeros(2, 4)
    b = torch.tensor([[0.1, 0.1, 0.1, 0.1], [1.0, 0.0, 0.0, 0.0]])
    # row 0 shifts every logit equally: its softmax is unchanged, KL = 0, importance 0; row 1 has one
    # nonzero importance. The three quantiles are 0, the fence is 0, and importance >= 0 keeps all
    assert torch.equal(fn("arcee_fusion")(a, torch.stack([a, b])), b)


def test_arcee_fusion_weighs_changes_by_their_row_kl():
    a = torch.zeros(2, 8)
    a[1, 1] = 20.0  # row 1's softmax is one-hot on column 1: shifting column 0 barely moves it (KL ~ e^-20)
    small = torch.linspace(0.01, 0.02, 8)
    b = a + small
    b[:, 0] = a[:, 0] + 1.0  # the same change of 1.0 in both rows
    out = fn("arcee_fusion")(a, torch.stack([a, b]))
    assert out[0, 0] == b[0, 0]  # where the row's distribution moves, the change is important
    assert out[1, 0] == a[1, 0]  # the same change where it does not is dropped
    assert torch.equal(out[:, 1:], a[:, 1:])  # the small changes are under the fence


# -- nuslerp ----------------------------------------------------------------------------------

def test_nuslerp_golden_flat_rows_and_columns():
    x0 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    x1 = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    f = fn("nuslerp")
    m = torch.stack([x0, x1])
    # flattened: cos = 4/5, theta = acos(0.8), t = 1/2: both coefficients sin(theta/2)/sin(theta)
    c = math.sin(math.acos(0.8) / 2) / 0.6
    assert close(f(None, m, weight=[1.0, 1.0]), c * (x0 + x1))
    # rows (the last dim): row 0 orthogonal -> sin(pi/4) each; row 1 colinear -> linear
    s = math.sin(math.pi / 4)
    assert close(f(None, m, weight=[1.0, 1.0], nuslerp_flatten=False), [[s, s], [0.0, 2.0]])
    # columns (mergekit's row_wise = dim 0): column 0 is (1,0) vs (0,0): a zero vector gives cos 0;
    # column 1 is (0,2) vs (1,2): cos = 4 / (2 sqrt 5)
    th = math.acos(4 / (2 * math.sqrt(5)))
    k = math.sin(th / 2) / math.sin(th)
    assert close(f(None, m, weight=[1.0, 1.0], nuslerp_flatten=False, nuslerp_row_wise=True), [[s, k], [0.0, 4 * k]])


def test_nuslerp_weights_set_the_fraction_and_a_base_makes_it_task_vectors():
    f = fn("nuslerp")
    e = torch.eye(2)
    # weights 1:3 -> t = 3/4 on the quarter circle
    assert close(f(None, e, weight=[1.0, 3.0]), [math.sin(math.pi / 8), math.sin(3 * math.pi / 8)])
    assert close(f(None, e, weight=[0.0, 0.0]), f(None, e, weight=[1.0, 1.0]))  # zero total: t = 1/2
    base = torch.tensor([3.0, -1.0])
    assert close(f(base, torch.stack([base, base + e[0], base + e[1]]), weight=[1.0, 3.0]), base + f(None, e, weight=[1.0, 3.0]))


@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
def test_nuslerp_endpoints_and_symmetry(flatten, row_wise):
    f = fn("nuslerp")
    base, x = rand(n=2)
    kw = dict(nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    assert close(f(None, x, weight=[1.0, 0.0], **kw), x[0])
    assert close(f(None, x, weight=[0.0, 2.0], **kw), x[1])
    assert close(f(None, x, weight=[0.3, 0.7], **kw), f(None, x.flip(0), weight=[0.7, 0.3], **kw))
    with_base = torch.stack([base, base + x[0], base + x[1]])
    assert close(f(base, with_base, weight=[1.0, 0.0], **kw), base + x[0])


def test_nuslerp_flattened_is_slerp_by_the_weight_fraction():
    base, x = rand(n=1)
    other = base + 0.8 * x[0]  # not parallel: slerp's linear fallback does not apply
    pair = torch.stack([base, other])
    for t in (0.1, 0.5, 0.85):
        assert close(fn("nuslerp")(None, pair, weight=[1 - t, t]), fn("slerp")(base, pair, t=t))


# -- multislerp -------------------------------------------------------------------------------

def test_multislerp_golden():
    f = fn("multislerp")
    e = torch.eye(2)
    # equal weights: the normalised mean of the unit vectors, scaled by the mean norm
    assert close(f(None, e, weight=[1.0, 1.0]), [1 / math.sqrt(2)] * 2)
    # weights 1:3 -> direction of (0.25, 0.75), not nuslerp's geodesic 3/4 point
    d = math.hypot(0.25, 0.75)
    assert close(f(None, e, weight=[1.0, 3.0]), [0.25 / d, 0.75 / d])
    # norms 2 and 1: the direction of e1 + e2, the mean norm 1.5
    assert close(f(None, torch.stack([2 * e[0], e[1]]), weight=[1.0, 1.0]), [1.5 / math.sqrt(2)] * 2)
    # normalize_weights off: the scale is sum w_i |v_i| with the raw weights
    assert close(f(None, e, weight=[1.0, 1.0], normalize_weights=False), [2 / math.sqrt(2)] * 2)


def test_multislerp_properties():
    f = fn("multislerp")
    base, x = rand(n=3)
    assert torch.equal(f(None, x[:1], weight=[0.5]), x[0])  # one model: itself
    assert torch.equal(f(base, torch.stack([base, x[0]]), weight=[0.5]), x[0])
    same = torch.stack([x[0]] * 3)
    assert close(f(None, same, weight=[1.0, 2.0, 3.0]), x[0])
    perm = [2, 0, 1]
    assert close(f(None, x, weight=[1.0, 1.0, 1.0]), f(None, x[perm], weight=[1.0, 1.0, 1.0]))
    with_base = torch.cat([base[None], base + x])
    assert close(f(base, with_base, weight=[1.0, 2.0, 1.0]), base + f(None, x, weight=[1.0, 2.0, 1.0]))
    # two antipodal task vectors with equal weights: the linear fallback, here the base itself
    assert close(f(None, torch.stack([x[0], -x[0]]), weight=[1.0, 1.0]), torch.zeros_like(x[0]))


def test_multislerp_three_cancelling_directions_are_a_merge_error():
    e = torch.eye(3)
    vs = torch.stack([e[0], -e[0], e[1] - e[1]])  # e0, -e0 and a zero vector: the weighted mean vanishes
    with pytest.raises(GraftError, match="multislerp: the weighted mean of the unit vectors"):
        fn("multislerp")(None, vs, weight=[1.0, 1.0, 1.0])


# -- karcher ----------------------------------------------------------------------------------

def test_karcher_golden_mean_angle_on_a_circle():
    e = torch.eye(2)
    # unit vectors at 0, 0 and 90 degrees: on a circle the Karcher mean is the mean angle, 30
    # degrees, while the normalised Euclidean mean is at atan(1/2) = 26.57 degrees
    vs = torch.stack([e[0], e[0], e[1]])
    assert close(fn("karcher")(None, vs), [math.cos(math.pi / 6), math.sin(math.pi / 6)])
    assert close(fn("karcher")(None, vs, max_iter=0), torch.tensor([2.0, 1.0]) / math.sqrt(5))
    # the scale is the mean norm (3, 3 and 3 here -> 3)
    assert close(fn("karcher")(None, 3 * vs), [3 * math.cos(math.pi / 6), 3 * math.sin(math.pi / 6)], 1e-5)


def test_karcher_properties():
    f = fn("karcher")
    base, x = rand(n=3)
    assert torch.equal(f(None, x[:1]), x[0])
    assert close(f(None, torch.stack([x[0]] * 3)), x[0])
    assert close(f(None, x), f(None, x[[1, 2, 0]]))
    # two inputs: the geodesic midpoint of the directions, at the mean norm
    u, v = x[0] / x[0].norm(), x[1] / x[1].norm()
    mid = (u + v) / (u + v).norm()
    assert close(f(None, x[:2]), mid * (x[0].norm() + x[1].norm()) / 2)
    # tiny inputs take no part in the direction but count in the mean norm
    with_zero = torch.stack([x[0], torch.zeros_like(x[0])])
    assert close(f(None, with_zero), x[0] / 2)
    assert torch.equal(f(None, torch.zeros(2, 3)), torch.zeros(3))


# -- registration and config errors ----------------------------------------------------------

def test_declared_inputs():
    for name in ("nuslerp", "multislerp", "karcher"):
        spec = MERGES.get(name)
        assert spec.base_as_input and not spec.needs_base and spec.inputs == "model", name
    for name in ("nearswap", "arcee_fusion"):
        spec = MERGES.get(name)
        assert spec.base_as_input and spec.needs_base and (spec.min_models, spec.max_models) == (2, 2), name
    assert MERGES.get("nearswap").chunkable and not MERGES.get("arcee_fusion").chunkable


def cfg(method, models, base="B", **params):
    out = {"merge_method": method, "models": [{"model": m, "parameters": p} for m, p in models], "parameters": params}
    if base:
        out["base_model"] = base
    return out


W = {"weight": 1.0}


@pytest.mark.parametrize("recipe,message", [
    (cfg("nuslerp", [("A", W)]), "nuslerp needs at least 2 model"),
    (cfg("nuslerp", [("A", W), ("C", W), ("D", W)]), "nuslerp takes exactly 2 model"),
    (cfg("nuslerp", [("B", {}), ("A", W), ("C", W), ("D", W)], base="B"), "nuslerp takes exactly 2 model"),
    (cfg("nuslerp", [("A", W), ("C", {})], base=None), "nuslerp needs weight for every model"),
    (cfg("nuslerp", [("A", W), ("C", W)], nuslerp_row_wise=True), "nuslerp_row_wise: true has no effect"),
    (cfg("nuslerp", [("A", W), ("C", W)], nuslerp_flatten="no"), "must be true or false"),
    (cfg("multislerp", [("A", {})]), "multislerp needs weight for every model"),
    (cfg("multislerp", [("A", {"weight": 1.0}), ("C", {"weight": -1.0})]), "weights sum to 0"),
    (cfg("multislerp", [("A", W), ("C", W)], eps=0), "eps 0 must be > 0"),
    (cfg("multislerp", [("A", {"weight": 0}), ("C", {"weight": 0.0})], normalize_weights=False), "every multislerp weight is 0"),
    (cfg("multislerp", [], base="B"), "multislerp needs at least 1 model"),
    (cfg("karcher", [("A", {}), ("C", {})], max_iter=-1), "karcher max_iter -1 must be >= 0"),
    (cfg("karcher", [("A", {}), ("C", {})], tol=-0.1), "karcher tol -0.1 must be >= 0"),
    (cfg("karcher", [("A", {"weight": 1.0})]), "unknown parameter 'weight'"),
    (cfg("nearswap", [("A", {})], t=1.5), "t 1.5 is out of range"),
    (cfg("nearswap", [("A", {})], t=-0.001), "t -0.001 is out of range"),
    (cfg("nearswap", [("A", {})]), "nearswap needs parameters.t"),
    (cfg("nearswap", [("A", {}), ("C", {})], t=0.1), "takes the base_model and exactly one other model"),
    (cfg("nearswap", [("A", {})], base=None, t=0.1), "nearswap needs a base_model"),
    (cfg("arcee_fusion", [("A", {})], base=None), "arcee_fusion needs a base_model"),
    (cfg("arcee_fusion", [("A", {}), ("C", {})]), "takes the base_model and exactly one other model"),
    (cfg("arcee_fusion", [("A", {})], t=0.5), "unknown parameter 't'"),
])
def test_bad_configs_are_one_line_config_errors(recipe, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(recipe)
    assert "\n" not in str(info.value)


def test_good_configs_pass():
    load_config(cfg("nuslerp", [("A", W), ("C", W)], base=None))
    load_config(cfg("nuslerp", [("B", {}), ("A", W), ("C", W)], nuslerp_flatten=False, nuslerp_row_wise=True))
    load_config(cfg("multislerp", [("A", {})], base=None, weight=1.0))  # a top-level weight covers every model
    load_config(cfg("karcher", [("A", {})], base=None))
    load_config(cfg("nuslerp", [("A", {"weight": 0}), ("C", {"weight": 0})]))  # a ratio: all 0 is t = 1/2, as in mergekit


def test_cli_reports_a_bad_nearswap_t_on_one_line(tmp_path, capsys):
    from graftkit.cli import main

    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(cfg("nearswap", [("A", {})], t=2.0)))
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("graft: error:") and "t 2.0 is out of range" in err[0]
    assert not (tmp_path / "out").exists()


# -- parity with mergekit 0.1.5 ---------------------------------------------------------------

def parity_recipes(m):
    ft = [str(m[f"ft{i}"]) for i in range(3)]
    base = str(m["base"])

    def models(weights, **extra):
        return [{"model": p, "parameters": {"weight": w, **extra}} for p, w in zip(ft, weights)]

    gradient = [{"filter": "mlp", "value": [0.2, 0.9]}, {"filter": "self_attn", "value": 0.75}, {"value": 0.4}]
    return {
        "nuslerp_flat": {"merge_method": "nuslerp", "models": models([0.4, 0.6])},
        "nuslerp_rows_base": {"merge_method": "nuslerp", "base_model": base, "models": models([1.0, 0.5]),
                              "parameters": {"nuslerp_flatten": False}},
        "nuslerp_cols_base": {"merge_method": "nuslerp", "base_model": base, "models": models([0.7, 0.3]),
                              "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
        # several fractions per tensor: weight 1 - t on the first model, a filter list / gradient t on the second
        "nuslerp_as_slerp": {"merge_method": "nuslerp", "models": [{"model": base, "parameters": {"weight": 1.0}},
                                                                   {"model": ft[1], "parameters": {"weight": gradient}}]},
        "multislerp_base": {"merge_method": "multislerp", "base_model": base, "models": models([1.0, 0.6, 0.3])},
        "multislerp_raw": {"merge_method": "multislerp", "models": models([0.5, 0.3, 0.4]),
                           "parameters": {"normalize_weights": False}},
        "karcher_base": {"merge_method": "karcher", "base_model": base, "models": [{"model": p} for p in ft[:2]]},
        "karcher": {"merge_method": "karcher", "models": [{"model": p} for p in ft], "parameters": {"max_iter": 20, "tol": 1e-6}},
        "nearswap": {"merge_method": "nearswap", "base_model": base, "models": [{"model": base}, {"model": ft[0]}],
                     "parameters": {"t": 0.01}},
        "nearswap_filtered": {"merge_method": "nearswap", "base_model": base, "models": [{"model": ft[2]}],
                              "parameters": {"t": [{"filter": "mlp", "value": 0.03}, {"value": [0.0, 0.005]}]}},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": base, "models": [{"model": base}, {"model": ft[1]}]},
    }


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    pytest.importorskip("mergekit")
    from merge_helpers import load_folder, make_models, run_mergekit

    root = tmp_path_factory.mktemp("model_parity")
    m = make_models(root, scale=0.02)
    jobs, paths = [], {}
    for name, recipe in parity_recipes(m).items():
        path = root / f"{name}.yml"
        path.write_text(yaml.safe_dump({**recipe, "dtype": "float32"}))
        paths[name] = path
        jobs.append((str(path), str(root / f"mk_{name}")))
    run_mergekit(jobs)
    out = {name: (load_folder(root / f"mk_{name}"), load_folder(gk.merge(path, root / f"gk_{name}"))) for name, path in paths.items()}
    out["_inputs"] = {k: load_folder(p) for k, p in m.items()}
    out["_recipes"] = paths
    return out


PARITY = ["nuslerp_flat", "nuslerp_rows_base", "nuslerp_cols_base", "nuslerp_as_slerp", "multislerp_base", "multislerp_raw",
          "karcher_base", "karcher", "nearswap", "nearswap_filtered", "arcee_fusion"]


@pytest.mark.parametrize("name", PARITY)
def test_equal_to_mergekit(parity, name):
    theirs, ours = parity[name]
    assert set(theirs) == set(ours)
    for key in theirs:
        # float32 in and out: equal up to float32 rounding of a different summation order
        assert torch.allclose(ours[key], theirs[key].to(ours[key].dtype), atol=2e-6, rtol=1e-5), (name, key)


def test_parity_recipes_are_not_trivial(parity):
    """Each recipe really mixes its inputs (a merge that returned one input unchanged would pass
    parity against a mergekit that did the same by accident of the recipe)."""
    inputs = parity["_inputs"]
    key = "model.layers.1.mlp.up_proj.weight"
    for name in PARITY:
        ours = parity[name][1][key]
        assert not any(torch.equal(ours, t[key]) for t in inputs.values()), name
    # arcee_fusion keeps some of ft1's changes and drops others; nearswap swaps some entries whole
    base, ft1, ft0 = inputs["base"][key], inputs["ft1"][key], inputs["ft0"][key]
    fused = parity["arcee_fusion"][1][key]
    assert 0 < int((fused == ft1).sum()) < ft1.numel() and int((fused == base).sum()) > 0
    swapped = parity["nearswap"][1][key]
    assert 0 < int((swapped == ft0).sum()) < ft0.numel()


def test_nearswap_in_row_chunks_equals_mergekit(parity, tmp_path, monkeypatch):
    """nearswap declares itself elementwise: merged 100 elements at a time (each matrix in chunks of
    rows, base rows first in the stack) it is still mergekit's output, bit for bit."""
    from merge_helpers import load_folder

    monkeypatch.setenv("GRAFT_MERGE_CHUNK", "100")
    theirs = parity["nearswap"][0]
    ours = load_folder(gk.merge(parity["_recipes"]["nearswap"], tmp_path / "chunked"))
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_dry_run_lists_an_optional_base_first(parity, tmp_path, capsys):
    from graftkit.cli import main

    assert main(["merge", str(parity["_recipes"]["nuslerp_rows_base"]), str(tmp_path / "o"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("method        nuslerp (base optional;")
    inputs = [ln.split()[1] for ln in lines if ln.startswith("input ") and not ln.startswith("input read")]
    assert len(inputs) == 3 and inputs[0].endswith("base")
    assert main(["merge", str(parity["_recipes"]["nuslerp_flat"]), str(tmp_path / "p"), "--dry-run"]) == 0
    inputs = [ln.split()[1] for ln in capsys.readouterr().out.splitlines() if ln.startswith("input ") and not ln.startswith("input read")]
    assert len(inputs) == 2 and not any(p.endswith("base") for p in inputs)
