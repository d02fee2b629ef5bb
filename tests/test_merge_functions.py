"""Golden (hand-computed) and property tests of the per-tensor merge functions."""
from __future__ import annotations

import math

import pytest
import torch

import importlib
M = importlib.import_module("graftkit.merge")  # gk.merge is the merge() function, not the package
from graftkit.registry import MERGES

B = torch.tensor([1.0, 2.0, 3.0, 4.0])


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol, rtol=0)


# -- golden values (worked by hand in the comments) ---------------------------------------------

def test_linear_golden_weighted_and_negative():
    models = torch.tensor([[1.0, 2.0, 3.0], [3.0, -2.0, 1.0]])
    # (1*[1,2,3] + 3*[3,-2,1]) / 4 = [10,-4,6]/4
    assert close(M.linear_merge(None, models, weight=[1, 3]), [2.5, -1.0, 1.5])
    # normalize off: the weighted sum; a negative weight subtracts
    assert close(M.linear_merge(None, models, weight=[1, -1], normalize=False), [-2.0, 4.0, 2.0])
    # weights summing to zero are not divided by (mergekit)
    assert close(M.linear_merge(None, models, weight=[1, -1]), [-2.0, 4.0, 2.0])


def test_task_arithmetic_golden():
    d = torch.tensor([[1.0, -1.0, 0.5, 0.0], [2.0, 1.0, -0.5, 0.0]])
    # base + 1*d0 + 0.5*d1 = [1+1+1, 2-1+.5, 3+.5-.25, 4]
    assert close(M.task_arithmetic(B, d, weight=[1, 0.5]), [3.0, 1.5, 3.25, 4.0])
    # lambda scales the merged delta; zero weight drops a model
    assert close(M.task_arithmetic(B, d, weight=[1, 0], **{"lambda": 2.0}), [3.0, 0.0, 4.0, 4.0])
    # normalize divides by the weight sum 1.5
    assert close(M.task_arithmetic(B, d, weight=[1, 0.5], normalize=True), B + torch.tensor([2.0, -0.5, 0.25, 0.0]) / 1.5)


def test_ties_golden_trim_elect_disjoint_mean():
    d = torch.tensor([[0.9, -0.1, 0.5, -0.6, 0.3],
                      [-0.4, 0.2, -0.8, -0.7, 0.05],
                      [0.3, 0.15, 0.6, 0.1, -0.2]])
    base = torch.zeros(5)
    # density 0.6 -> k = int(0.6*5) = 3 per model:
    # m0 keeps 0.9, 0.5, -0.6     -> [0.9, 0, 0.5, -0.6, 0]
    # m1 keeps -0.4, -0.8, -0.7   -> [-0.4, 0, -0.8, -0.7, 0]
    # m2 keeps 0.3, 0.6, -0.2     -> [0.3, 0, 0.6, 0, -0.2]
    # sums: [0.8, 0, 0.3, -1.3, -0.2] -> signs [+, + (zero sum), +, -, -]
    # e0: agree 0.9, 0.3 -> 0.6; e1: nobody -> 0; e2: 0.5, 0.6 -> 0.55; e3: -0.6,-0.7 -> -0.65; e4: -0.2
    out = M.ties_merge(base, d, density=0.6)
    assert close(out, [0.6, 0.0, 0.55, -0.65, -0.2])
    # weights: w = [1, 2, 1]; weighted m1 = [-0.8, 0, -1.6, -1.4, 0]; sums [0.4, 0, -0.5, -2.0, -0.2]
    # e0 (+): (0.9*1 + 0.3*1)/2 = 0.6; e2 (-): -1.6/2 = -0.8; e3 (-): (-0.6 - 1.4)/3; e4: -0.2/1
    out = M.ties_merge(base, d, density=0.6, weight=[1, 2, 1])
    assert close(out, [0.6, 0.0, -0.8, -2.0 / 3, -0.2])
    # normalize off: the sum over the agreeing models, lambda 0.5
    out = M.ties_merge(base, d, density=0.6, weight=[1, 2, 1], normalize=False, **{"lambda": 0.5})
    assert close(out, [0.6, 0.0, -0.8, -1.0, -0.1])


def test_ties_negative_weight_flips_the_vote():
    d = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    # weighted: [1,2] and [-3,-6]; sums [-2,-4] elect -; only model 1 agrees: (-3)/(-3) = 1 ... per mergekit
    # the divisor is the sum of the agreeing weights (-3), so the result is -3*[1,2]/-3 = [1, 2]
    assert close(M.ties_merge(torch.zeros(2), d, weight=[1, -3]), [1.0, 2.0])


def test_dare_density_one_and_golden_rescale():
    d = torch.tensor([[0.2, -0.4, 0.6, 0.8]])
    assert close(M.dare_linear(B, d, density=1.0), B + d[0])
    out = M.dare_linear(torch.zeros(4), d, density=0.5, seed=3)
    kept = out != 0
    # survivors are exactly 2x their delta (1/density), the rest are 0
    assert close(out[kept], 2 * d[0][kept])


def test_breadcrumbs_golden_band():
    d = torch.tensor([[0.1, -0.9, 0.3, 0.5, -0.2, 0.7, 0.05, -0.4, 0.6, 0.8]])
    # numel 10, density 0.5 -> target 5, gamma 0.1 -> n_top 1, n_bot 10-5-1 = 4
    # ascending |d|: .05 .1 .2 .3 | .4 .5 .6 .7 .8 | .9 -> keep ranks 4..8: -0.4, 0.5, 0.6, 0.7, 0.8
    out = M.breadcrumbs_merge(torch.zeros(10), d, density=0.5, gamma=0.1)
    assert close(out, [0, 0, 0, 0.5, 0, 0.7, 0, -0.4, 0.6, 0.8])
    # gamma 0 = plain top-k magnitude
    out = M.breadcrumbs_merge(torch.zeros(10), d, density=0.3, gamma=0.0)
    assert close(out, [0, -0.9, 0, 0, 0, 0, 0, 0, 0, 0.8]) is False  # top-3 is .9, .8, .7
    assert close(out, [0, -0.9, 0, 0, 0, 0.7, 0, 0, 0, 0.8])


def test_breadcrumbs_ties_golden():
    d = torch.tensor([[0.5, -0.2, 0.3], [-0.1, -0.4, 0.6]])
    # density 1 keeps all; weighted sums [0.4, -0.6, 0.9]: e0 + -> 0.5; e1 - -> -0.6 (normalize off); e2 -> 0.9
    assert close(M.breadcrumbs_ties(torch.zeros(3), d, density=1.0), [0.5, -0.6, 0.9])
    assert close(M.breadcrumbs_ties(torch.zeros(3), d, density=1.0, normalize=True), [0.5, -0.3, 0.45])


def test_magnitude_prune_golden():
    d = torch.tensor([[0.5, -0.2, 0.3, 0.0], [-0.1, -0.4, 0.6, 0.2]])
    # k = int(0.5*4) = 2: m0 keeps 0.5, 0.3; m1 keeps -0.4, 0.6; sum = [0.5, -0.4, 0.9, 0]
    assert close(M.magnitude_prune(torch.zeros(4), d, density=0.5), [0.5, -0.4, 0.9, 0.0])
    assert close(M.magnitude_prune(torch.zeros(4), d, density=0.5, rescale=True), [1.0, -0.8, 1.8, 0.0])


def test_slerp_golden():
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.0, 1.0])
    out = M.slerp_merge(a, torch.stack([a, b]), t=0.5)
    # 90 degrees apart: sin(pi/4)/sin(pi/2) for both
    assert close(out, [math.sqrt(0.5), math.sqrt(0.5)])
    # different norms: coefficients apply to the raw tensors
    out = M.slerp_merge(a, torch.stack([a, 3 * b]), t=0.5)
    assert close(out, [math.sqrt(0.5), 3 * math.sqrt(0.5)])
    # nearly parallel: linear interpolation
    out = M.slerp_merge(a, torch.stack([a, 2 * a]), t=0.25)
    assert close(out, [1.25, 0.0])


def test_consensus_golden():
    d = torch.tensor([[1.0, 0.1, -0.5], [0.8, -0.6, 0.5], [0.0, 0.05, 0.4]])
    # tau_MTL = [1.8, -0.45, 0.4]; masks with lambda 0.4: |tau_i| >= 0.4|tau_MTL - tau_i|
    # m0: 1 >= .32 Y; .1 >= .22 N; .5 >= .36 Y      m1: .8 >= .4 Y; .6 >= .06 Y; .5 >= .04 Y
    # m2: 0 >= .72 N; .05 >= .2 N; .4 >= 0 Y        counts [2, 1, 3] -> keep e0, e2
    out = M.consensus_ta(torch.zeros(3), d)
    assert close(out, [1.8, 0.0, 0.4])
    out = M.consensus_ta(torch.zeros(3), d, k=3)
    assert close(out, [0.0, 0.0, 0.4])


def test_pcb_golden_two_tasks():
    d = torch.tensor([[1.0, 2.0, 4.0], [1.0, 2.0, 4.0]])
    # d = 3: |T| is clamped to [sorted[0], sorted[int(3*0.9999 - 1)] = sorted[1]] = [1, 2] -> [1, 2, 2]
    # intra = exp(2 * minmax([1,2,2])^2) = [1, e^2, e^2]; inter = tanh(T * sum) = tanh([2, 8, 32])
    # score row = [0.964, 7.389*0.9999998, 7.389] -> minmax = [0, ~1, 1]
    # merged = sum(clamped * scale) / sum(scale) = [0 (no score), 2, 2]
    out = M.pcb_merge(torch.zeros(3), d, density=1.0)
    assert close(out, [0.0, 2.0, 2.0], 1e-5)
    assert close(M.pcb_merge(torch.ones(3), d, density=1.0, **{"lambda": 0.5}), [1.0, 2.0, 2.0], 1e-5)
    # density 0.5 on d = 3: floor = sorted(score)[int(3 * 0.5)] = the middle score -> it scores 0 too
    out = M.pcb_merge(torch.zeros(3), d, density=0.5)
    assert close(out, [0.0, 0.0, 2.0], 1e-5)


# -- properties -------------------------------------------------------------------------------

DELTA_METHODS = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
                 "magnitude_prune", "consensus_ta", "consensus_ties"]


def _rand(n=3, shape=(6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn((n, *shape), generator=g) * 0.1


@pytest.mark.parametrize("name", DELTA_METHODS + ["pcb"])
def test_weight_zero_gives_base(name):
    base, d = _rand()
    spec = MERGES.get(name)
    kw = {"weight": [0.0, 0.0, 0.0]}
    if "density" in spec.model_params:
        kw["density"] = [0.5] * 3
    if name in ("ties", "consensus_ties"):
        kw["normalize"] = False  # a zero-weight mean is 0/0
    out = spec.fn(base, d, **kw)
    assert close(out, base)


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
                                  "magnitude_prune", "linear"])
def test_single_model_weight_one_gives_that_model(name):
    base, d = _rand(n=1)
    spec = MERGES.get(name)
    if spec.inputs == "model":
        out = spec.fn(None, (base + d[0]).unsqueeze(0), weight=[1.0])
    else:
        kw = {"weight": [1.0]}
        if name.startswith("breadcrumbs"):
            kw["gamma"] = [0.0]
        out = spec.fn(base, d, **kw)
    assert close(out, base + d[0], 1e-6)


def test_slerp_endpoints():
    base, d = _rand(n=1)
    other = base + d[0]
    assert close(M.slerp_merge(base, torch.stack([base, other]), t=0.0), base)
    assert close(M.slerp_merge(base, torch.stack([base, other]), t=1.0), other, 1e-5)


def test_ties_density_one_without_conflicts_is_task_arithmetic():
    base, d = _rand()
    d = d.abs()  # every model pushes the same way: no sign conflicts
    w = [0.5, 1.0, 2.0]
    assert close(M.ties_merge(base, d, weight=w, density=1.0), M.task_arithmetic(base, d, weight=w, normalize=True), 1e-6)
    assert close(M.ties_merge(base, d, weight=w, normalize=False), M.task_arithmetic(base, d, weight=w), 1e-6)


def test_dare_density_one_is_its_linear_counterpart():
    base, d = _rand()
    w = [0.5, 1.0, -2.0]
    assert close(M.dare_linear(base, d, weight=w, density=1.0, seed=1), M.task_arithmetic(base, d, weight=w))
    assert close(M.dare_ties(base, d, weight=w, density=1.0, seed=1), M.ties_merge(base, d, weight=w, normalize=False))


def test_dare_is_seeded_and_keeps_the_right_share():
    base, d = _rand(n=1, shape=(200, 100))
    a = M.dare_linear(base, d, density=0.3, seed=7)
    assert torch.equal(a, M.dare_linear(base, d, density=0.3, seed=7))
    assert not torch.equal(a, M.dare_linear(base, d, density=0.3, seed=8))
    kept = ((a - base) != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.02
    # unbiased: E[dropped-and-rescaled] = delta; on positive deltas the sum is within 5 sigma
    # (var = sum d^2 (1 - p) / p) of the undropped sum, which is ~50 sigma away from zero
    base, d = _rand(n=1, shape=(400, 500))
    d = d.abs()
    for p, seed in [(0.3, 7), (0.5, 8), (0.1, 9)]:
        got = (M.dare_linear(base, d, density=p, seed=seed) - base).double().sum().item()
        sigma = (d.double().pow(2).sum().item() * (1 - p) / p) ** 0.5
        assert abs(got - d.double().sum().item()) < 5 * sigma, (p, got, d.sum().item(), sigma)


def test_trim_keeps_exactly_k():
    base, d = _rand(n=2, shape=(50, 40))
    out = M.ties_merge(torch.zeros_like(base), d[:1], density=0.25)
    assert int((out != 0).sum()) == int(0.25 * 2000)


def test_every_merge_method_has_golden_or_property_coverage():
    covered = set(DELTA_METHODS) | {"linear", "slerp", "pcb"}
    covered |= {"della", "della_linear", "model_stock", "sce", "ram", "ramplus_tl"}  # tests/test_merge_methods_delta.py
    covered |= {"nuslerp", "multislerp", "karcher", "nearswap", "arcee_fusion"}  # tests/test_merge_methods_model.py
    covered |= {"adamerging", "lorahub"}  # tests/test_merge_adamerging.py, tests/test_merge_lorahub.py
    covered |= {"passthrough"}  # tests/test_merge_slices.py
    covered |= {"fisher", "regmean"}  # tests/test_merge_data_aware.py
    assert set(MERGES.names()) <= covered, set(MERGES.names()) - covered


@pytest.mark.parametrize("quantized", [False, True])
def test_kth_largest_is_exact_on_large_tensors(quantized):
    """The radix selection used for per-tensor trimming returns torch.kthvalue's answer, also with
    the massive ties of bf16 deltas, zeros and denormals."""
    from graftkit.merge._common import kth_largest

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3_000_000, generator=g).abs()
    if quantized:
        x = (x * 0.002).to(torch.bfloat16).float()
        x[::7] = 0.0
        x[1::11] = 1e-40  # denormal
    n = x.numel()
    for k in [1, 7, n // 10, n // 3, n // 2, n - 1, n]:
        assert kth_largest(x, k) == float(torch.kthvalue(x, n - k + 1).values), k


def test_parameter_gradients_and_filters_resolve_like_mergekit():
    from graftkit.merge.config import FilterValue, resolve

    grad = [0.0, 0.5, 0.3, 0.7, 1.0]
    assert resolve(grad, "x", 0.0) == 0.0 and resolve(grad, "x", 1.0) == 1.0
    assert abs(resolve(grad, "x", 0.375) - 0.4) < 1e-12  # 0.375*4 = 1.5: halfway between 0.5 and 0.3
    assert abs(resolve([0.2, 0.8], "x", 0.25) - 0.35) < 1e-12
    entries = [FilterValue(filter="mlp", value=[0.0, 1.0]), FilterValue(value=0.5)]
    assert resolve(entries, "model.layers.3.mlp.up_proj.weight", 0.5) == 0.5
    assert resolve(entries, "model.layers.3.self_attn.q_proj.weight", 0.9) == 0.5
    assert resolve(entries, "model.layers.3.mlp.up_proj.weight", 0.9) == 0.9
