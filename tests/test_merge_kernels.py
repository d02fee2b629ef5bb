"""The fused merge kernels against the torch reference functions they replace in the executor."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from graftkit.merge import kernels as K
from graftkit.merge._common import finish
from graftkit.merge.linear import linear, task_arithmetic
from graftkit.merge.ties import ties

BIG = 5 * K._SAMPLE  # above this the threshold search brackets the k-th value from a sample


def raw(t: torch.Tensor) -> np.ndarray:
    """A torch tensor's bits as the kernels read them (bf16 -> uint16, float32 -> uint32)."""
    view = {torch.bfloat16: torch.int16, torch.float32: torch.int32}[t.dtype]
    return t.contiguous().view(view).numpy().view({torch.bfloat16: np.uint16, torch.float32: np.uint32}[t.dtype]).reshape(-1)


def from_raw(a: np.ndarray, dtype) -> torch.Tensor:
    return torch.from_numpy(a.view({np.uint16: np.int16, np.uint32: np.int32}[a.dtype.type]).copy()).view(dtype)


def inputs(n: int, models: int, dtype, seed: int = 0, step: float = 0.01):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 0.05).to(dtype)
    fts = [(base.float() + torch.randn(n, generator=g) * step).to(dtype) for _ in range(models)]
    return base, fts


def run_merge_deltas(base, fts, weights, *, mode, consensus, normalize, lam=1.0, thresholds=None, density=None,
                     seed=7, offset=0, rescale=True):
    m = len(fts)
    w = np.asarray(weights, dtype=np.float64)
    coefs = w.copy()
    bounds = np.full(m, 1 << 32, dtype=np.uint64)
    if density is not None:
        for i, d in enumerate(density):
            bounds[i] = round(d * 2**32)
            if rescale and d < 1:
                coefs[i] = w[i] / d
    thr = np.full(m, np.nan, dtype=np.float32) if thresholds is None else np.asarray(thresholds, dtype=np.float32)
    out = np.empty(base.numel(), dtype=raw(base).dtype)
    bad = K.merge_deltas(raw(base), tuple(raw(f) for f in fts), w, coefs, mode, thr, bounds,
                           np.arange(seed, seed + m, dtype=np.uint64), offset, consensus, normalize, lam, out)
    return from_raw(out, base.dtype), bad


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit for bit: the kernels do the reference's float32 operations in the same order, with the
    same fused multiply-adds (the executor runs the reference functions with ``inplace=True``)."""
    assert got.dtype == want.dtype
    diff = (got != want).sum().item()
    assert diff == 0, f"{diff} of {got.numel()} elements differ; max |diff| {(got.float() - want.float()).abs().max().item()}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [37, 4096 * 3 + 5, BIG + 123])
def test_kth_largest_is_exact(dtype, n):
    base, fts = inputs(n, 3, dtype, seed=n)
    ks = np.array([1, n // 3, n], dtype=np.int64)
    got = K.kth_largest_deltas(raw(base), tuple(raw(f) for f in fts), ks)
    for i, (f, k) in enumerate(zip(fts, ks)):
        mags = (f.float() - base.float()).abs()
        assert got[i] == float(torch.kthvalue(mags, n - int(k) + 1).values), (i, k)


def test_kth_largest_with_heavy_ties_and_skipped_models():
    n = BIG + 1000
    base = torch.zeros(n, dtype=torch.bfloat16)
    few = torch.tensor([0.0, 0.25, 0.5, 1.0])[torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(0))]
    fts = [few.to(torch.bfloat16), torch.full((n,), 0.5, dtype=torch.bfloat16)]
    got = K.kth_largest_deltas(raw(base), tuple(raw(f) for f in fts), np.array([n // 2, 0], dtype=np.int64))
    assert got[0] == float(torch.kthvalue(few, n - n // 2 + 1).values)
    assert np.isnan(got[1])  # k = 0: no threshold asked


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("weights,normalize,lam", [([0.5, 0.3, 0.2], True, 1.0), ([1.0, 0.0, -0.4], True, 1.0),
                                                   ([0.7, 0.6, 0.9], False, 0.6)])
def test_ties_matches_the_reference(dtype, weights, normalize, lam):
    n = BIG + 77
    base, fts = inputs(n, 3, dtype)
    density = [0.5, 0.2, 1.0]
    ks = np.array([max(1, int(d * n)) if d < 1 else 0 for d in density], dtype=np.int64)
    thr = K.kth_largest_deltas(raw(base), tuple(raw(f) for f in fts), ks)
    got, bad = run_merge_deltas(base, fts, weights, mode=K.KEEP_ABOVE, consensus=True, normalize=normalize, lam=lam,
                                  thresholds=thr)
    deltas = torch.stack([f.float() - base.float() for f in fts])
    want = ties(base.float(), deltas, weight=weights, density=density, normalize=normalize, inplace=True,
                **{"lambda": lam}).to(dtype)
    assert bad == 0
    assert_same(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_and_linear_match_the_reference(dtype, normalize):
    base, fts = inputs(10_000, 3, dtype)
    weights = [0.5, -0.3, 0.9]
    got, bad = run_merge_deltas(base, fts, weights, mode=K.KEEP_ALL, consensus=False, normalize=normalize, lam=0.8)
    deltas = torch.stack([f.float() - base.float() for f in fts])
    want = task_arithmetic(base.float(), deltas, weight=weights, normalize=normalize, inplace=True,
                           **{"lambda": 0.8}).to(dtype)
    assert bad == 0
    assert_same(got, want)
    out = np.empty(base.numel(), dtype=raw(base).dtype)
    assert K.weighted_average(tuple(raw(f) for f in fts), np.array(weights), normalize, out) == 0
    assert_same(from_raw(out, dtype), linear(None, fts, weight=weights, normalize=normalize).to(dtype))


def keep_mask(n: int, density: float, seed: int, offset: int = 0) -> torch.Tensor:
    """The kernel's DARE keep-mask, read back: base 0, one model of all ones, weight 1, no rescale."""
    ones = torch.ones(n, dtype=torch.float32)
    got, _ = run_merge_deltas(torch.zeros(n), [ones], [1.0], mode=K.KEEP_RANDOM, consensus=False, normalize=False,
                              density=[density], seed=seed, offset=offset, rescale=False)
    return got == 1


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_keeps_the_density_share_and_is_seeded(density):
    n = 200_000
    mask = keep_mask(n, density, seed=3)
    sigma = (density * (1 - density) / n) ** 0.5
    assert abs(mask.float().mean().item() - density) < 5 * sigma
    assert torch.equal(mask, keep_mask(n, density, seed=3))
    assert not torch.equal(mask, keep_mask(n, density, seed=4))
    # counter-based: a chunk merged alone at its offset draws the same mask as the whole call
    assert torch.equal(mask[60_000:70_000], keep_mask(10_000, density, seed=3, offset=60_000))


@pytest.mark.parametrize("consensus", [True, False], ids=["dare_ties", "dare_linear"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dare_matches_the_reference_under_the_same_masks(consensus, dtype):
    n = 20_000
    base, fts = inputs(n, 3, dtype)
    weights, density = [0.5, 0.3, -0.2], [0.5, 0.25, 1.0]
    got, bad = run_merge_deltas(base, fts, weights, mode=K.KEEP_RANDOM, consensus=consensus, normalize=True,
                                  density=density, seed=11)
    masks = [keep_mask(n, d, seed=11 + i) for i, d in enumerate(density)]
    dropped = torch.stack([(f.float() - base.float()) * m for f, m in zip(fts, masks)])
    # the reference's in-place DARE: the 1/density rescale folded into the weighted sums
    want = finish(base.float(), dropped, weights, consensus=consensus, normalize=True, lam=1.0, inplace=True,
                  scale=[1 / d for d in density]).to(dtype)
    assert bad == 0
    assert_same(got, want)


@pytest.mark.parametrize("mode,consensus", [(K.KEEP_ALL, False), (K.KEEP_ABOVE, True), (K.KEEP_RANDOM, True)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_input_always_reaches_the_count(mode, consensus, bad):
    """Masks multiply and clamps keep NaN, so a NaN/Inf input is never trimmed or dropped away."""
    base, fts = inputs(5000, 2, torch.bfloat16)
    fts[1][1234] = bad
    thresholds = [1e30, 1e30]  # trims everything finite
    got, count = run_merge_deltas(base, fts, [1.0, 1.0], mode=mode, consensus=consensus, normalize=True,
                                  thresholds=thresholds, density=[0.001, 0.001])
    assert count >= 1 and not torch.isfinite(got[1234])
    out = np.empty(5000, dtype=np.uint16)
    assert K.weighted_average(tuple(raw(f) for f in fts), np.array([0.5, 0.5]), True, out) == 1


def test_an_overflowing_sum_is_counted():
    big = [torch.full((10,), 3e38, dtype=torch.float32)] * 2
    _, count = run_merge_deltas(torch.zeros(10), big, [1.0, 1.0], mode=K.KEEP_ALL, consensus=False, normalize=False)
    assert count == 10


def test_fused_merge_never_imports_torch(tmp_path):
    """The point of the fused path: a merge of safetensors models runs without torch's import."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    paths = []
    for name in ("base", "a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        save_file({"w": rng.standard_normal((64, 32)).astype(np.float32), "step": np.array([3], dtype=np.int64)},
                  str(folder / "model.safetensors"))
        (folder / "config.json").write_text('{"model_type": "toy"}')  # a merge input must say what model it is
        paths.append(str(folder))
    cfg = {"merge_method": "ties", "base_model": paths[0], "dtype": "float32",
           "models": [{"model": p, "parameters": {"weight": 0.5, "density": 0.5}} for p in paths[1:]]}
    code = ("import sys, json; from graftkit.merge.api import run_merge; "
            f"out = run_merge({cfg!r}, {str(tmp_path / 'out')!r}, progress=False); "
            "print(json.dumps({'torch': 'torch' in sys.modules, "
            "'kernels': json.load(open(out / 'graft_provenance.json'))['stats']['kernels']}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == '{"torch": false, "kernels": "fused"}'
    from safetensors.numpy import load_file

    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert got["step"].tolist() == [3]  # the integer tensor is copied from the base as is
