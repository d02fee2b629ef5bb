"""Tests aimed at one-line bugs that the other tests let through (issue 11, section 10): each one
names the planted bug it catches. bench/mutation.py plants them (and more) one at a time.

Merge checks run on both executor paths: the fused numba kernels (safetensors inputs, the
default) and the torch reference functions (``GRAFT_MERGE_KERNELS=torch``, also what fp16,
``.bin`` and adapter inputs take)."""
from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch

import graftkit as gk
from graftkit.merge import kernels as K
from merge_helpers import load_folder, make_models

M = importlib.import_module("graftkit.merge")  # gk.merge is the merge() function, not the package

PATHS = ["fused", "torch"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("guard_models"))


def run(models, tmp_path, monkeypatch, path: str, method: str, weights, density=None, **extra) -> tuple[dict, dict]:
    """``gk.merge`` of ft0.. with ``weights`` on ``path``; the merged tensors and the deltas' dict."""
    if path == "torch":
        monkeypatch.setenv("GRAFT_MERGE_KERNELS", "torch")
    else:
        monkeypatch.delenv("GRAFT_MERGE_KERNELS", raising=False)
    entries = []
    for i, w in enumerate(weights):
        params = {"weight": w}
        if density is not None:
            params["density"] = density
        entries.append({"model": str(models[f"ft{i}"]), "parameters": params})
    cfg = {"merge_method": method, "base_model": str(models["base"]), "models": entries, "dtype": "float32", **extra}
    out = gk.merge(cfg, tmp_path / f"{method}-{path}")
    kernels = json.loads((out / "graft_provenance.json").read_text())["stats"]["kernels"]
    assert (kernels == "fused") == (path == "fused"), kernels
    return load_folder(out), load_folder(models["base"])


def flat_deltas(merged: dict, base: dict) -> torch.Tensor:
    return torch.cat([(merged[k].float() - base[k].float()).reshape(-1) for k in sorted(base)])


def slope(y: torch.Tensor, x: torch.Tensor) -> float:
    """The least-squares slope of ``y`` on ``x`` through the origin."""
    return float(torch.dot(y.double(), x.double()) / torch.dot(x.double(), x.double()))


# -- DARE's rescale (catches w*d for w/d in fused.py, and no rescale in dare.py) -------------------

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_merged_delta_has_the_scale_of_the_undropped_sum(models, tmp_path, monkeypatch, path, method):
    """DARE keeps each entry with probability d and divides survivors by d, so the merged delta
    is an unbiased estimate of the undropped weighted sum: slope about 1 (density 0.4 without the
    rescale gives 0.4; multiplying by d instead of dividing gives 0.16). dare_ties with one model
    has no sign conflicts, so the same holds."""
    weights = [0.7, 0.5, -0.4] if method == "dare_linear" else [0.8]
    merged, base = run(models, tmp_path, monkeypatch, path, method, weights, density=0.4, seed=3)
    fts = [load_folder(models[f"ft{i}"]) for i in range(len(weights))]
    undropped = sum(w * flat_deltas(ft, base) for w, ft in zip(weights, fts))
    got = flat_deltas(merged, base)
    assert abs(slope(got, undropped) - 1.0) < 0.1
    # and it did drop: about 1 - 0.4 of one model's entries are back at the base
    if len(weights) == 1:
        assert abs((got == 0).float().mean().item() - 0.6) < 0.05


# -- dare_ties elects signs (catches dare_ties run as dare_linear) -------------------------------

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("normalize", [False, True])
def test_dare_ties_at_density_1_equals_ties(models, tmp_path, monkeypatch, path, normalize):
    weights = [1.0, 0.5, 0.8]
    extra = {"parameters": {"normalize": normalize}}
    a, base = run(models, tmp_path, monkeypatch, path, "dare_ties", weights, density=1.0, seed=1, **extra)
    b, _ = run(models, tmp_path, monkeypatch, path, "ties", weights, density=1.0, **extra)
    c, _ = run(models, tmp_path, monkeypatch, path, "dare_linear", weights, density=1.0, seed=1, **extra)
    for k in base:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    # the fine-tunes disagree in sign often enough that the election changes the result
    assert float((flat_deltas(a, base) - flat_deltas(c, base)).abs().max()) > 1e-3


# -- PCB with different tasks (catches intra-balancing without the n factor) ----------------------

def test_pcb_golden_two_different_tasks():
    d = torch.tensor([[-1.0, 2.0, 0.5, -1.0], [3.0, -2.0, 3.0, 2.0]])
    # d = 4: |T_i| is clamped to [sorted[0], sorted[int(4 * 0.9999) - 1] = sorted[2]]:
    #   |T_1| = [1, 2, .5, 1] -> [1, 1, .5, 1];   |T_2| = [3, 2, 3, 2] -> unchanged
    # sum_j T_j = [2, 0, 3.5, 1]
    # T_1: intra = exp(2 minmax^2) = [e^2, e^2, 1, e^2]; inter = tanh(T_1 * sum) = tanh([-2, 0, 1.75, -1])
    #      score = [-7.1233, 0, 0.94138, -5.6275] -> minmax = [0, 0.88327, 1, 0.18548]
    # T_2: intra = [e^2, 1, e^2, 1]; inter = tanh([6, 0, 10.5, 2]) -> score [7.38897, 0, 7.38906, 0.96403]
    #      -> minmax = [0.99999, 0, 1, 0.13047]
    # merged = (clamped_1 s_1 + clamped_2 s_2) / (s_1 + s_2):
    #   [3, 1 (T_1's clamped 2 -> 1), (0.5 + 3) / 2, (-0.18548 + 2 * 0.13047) / 0.31594 = 0.23884]
    # (without the n = 2 in intra the last entry would be 1.0897)
    out = M.pcb_merge(torch.zeros(4), d, density=1.0)
    torch.testing.assert_close(out, torch.tensor([3.0, 1.0, 1.75, 0.23884]), atol=1e-4, rtol=0)
    # density 0.75: per task, scores below the 1 - 0.75 quantile - sorted index int(4 * 0.25) = 1, the
    # second smallest - are raised to it (-5.6275 and 0.96403), so two entries per task score 0:
    #   s_1 = minmax([-5.6275, 0, 0.94138, -5.6275]) = [0, 0.8567, 1, 0], s_2 = [0.99999, 0, 1, 0]
    #   merged = [3, 1, 1.75, 0 / 1e-12 -> 0]  (the quantile of the density itself, index 3, zeroes all)
    out = M.pcb_merge(torch.zeros(4), d, density=0.75)
    torch.testing.assert_close(out, torch.tensor([3.0, 1.0, 1.75, 0.0]), atol=1e-4, rtol=0)


# -- SLERP of anti-parallel tensors ----------------------------------------------------------------

def test_slerp_of_anti_parallel_tensors_is_linear():
    """mergekit falls back to linear interpolation when |cos| > 0.9995, anti-parallel included
    (acos(-1) = pi and sin(pi) ~ 0 would blow up the spherical coefficients)."""
    a = torch.tensor([1.0, -2.0, 0.5, 3.0])
    out = M.slerp_merge(a, torch.stack([a, -2 * a]), t=0.3)
    torch.testing.assert_close(out, 0.7 * a + 0.3 * (-2 * a), atol=1e-6, rtol=0)  # = 0.1 a
    # nearly anti-parallel (cos ~ -0.99995) is linear too
    b = -a + torch.tensor([0.0, 0.0, 0.03, 0.0])
    torch.testing.assert_close(M.slerp_merge(a, torch.stack([a, b]), t=0.5), 0.5 * (a + b), atol=1e-6, rtol=0)
    # and a clearly obtuse pair is spherical: the norm does not collapse as the chord's does
    c = torch.tensor([-1.0, 0.0, 0.0, 0.0])
    e = torch.tensor([0.0, 1.0, 0.0, 0.0])
    mid = M.slerp_merge(c, torch.stack([c, -c * 0.5 + e * 0.5 * 3**0.5]), t=0.5)  # 120 degrees apart
    torch.testing.assert_close(torch.linalg.vector_norm(mid), torch.tensor(1.0), atol=1e-6, rtol=0)


def test_slerp_anti_parallel_matches_mergekit():
    mk = pytest.importorskip("mergekit.merge_methods.slerp")
    a = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    b = -2 * a
    want = mk.slerp(torch.tensor(0.3), a, b)
    torch.testing.assert_close(M.slerp_merge(a, torch.stack([a, b]), t=0.3), want, atol=1e-6, rtol=0)


# -- a negative weight sum under normalize (fused kernel and torch) --------------------------------

def _raw(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int32).numpy().view(np.uint32)


def _from_raw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.view(np.int32).copy()).view(torch.float32)


def fused_deltas(base, fts, weights, *, consensus, normalize, lam=1.0):
    m = len(fts)
    w = np.asarray(weights, dtype=np.float64)
    out = np.empty(base.numel(), dtype=np.uint32)
    bad = K.merge_deltas(_raw(base), tuple(_raw(f) for f in fts), w, w.copy(), K.KEEP_ALL, np.full(m, np.nan, np.float32),
                         np.full(m, 1 << 32, dtype=np.uint64), np.zeros(m, dtype=np.uint64), 0, consensus, normalize, lam, out)
    assert bad == 0
    return _from_raw(out)


def test_negative_weight_sum_is_divided_by_under_normalize():
    base = torch.tensor([1.0, 2.0, 3.0])
    fts = [torch.tensor([2.0, 2.0, 1.0]), torch.tensor([0.0, 4.0, 3.0])]  # tau = [1, 0, -2], [-1, 2, 0]
    weights = [1.0, -3.0]  # sum -2
    # (1*[1,0,-2] - 3*[-1,2,0]) / -2 = [4, -6, -2] / -2 = [-2, 3, 1]
    want = base + torch.tensor([-2.0, 3.0, 1.0])
    deltas = torch.stack([f - base for f in fts])
    torch.testing.assert_close(M.task_arithmetic(base, deltas, weight=weights, normalize=True), want)
    torch.testing.assert_close(M.task_arithmetic(base, deltas.clone(), weight=weights, normalize=True, inplace=True), want)
    torch.testing.assert_close(fused_deltas(base, fts, weights, consensus=False, normalize=True), want)
    # linear soups: (1*[2,2,1] - 3*[0,4,3]) / -2 = [2, -10, -8] / -2 = [-1, 5, 4]
    want_lin = torch.tensor([-1.0, 5.0, 4.0])
    torch.testing.assert_close(M.linear_merge(None, torch.stack(fts), weight=weights), want_lin)
    out = np.empty(3, dtype=np.uint32)
    assert K.weighted_average(tuple(_raw(f) for f in fts), np.asarray(weights), True, out) == 0
    torch.testing.assert_close(_from_raw(out), want_lin)


# -- TIES on an exact zero sum elects + (as mergekit: majority_sign = sum >= 0) --------------------

def test_ties_elects_plus_on_an_exact_zero_sum():
    base = torch.zeros(3)
    fts = [torch.tensor([1.0, 2.0, -1.0]), torch.tensor([-1.0, -1.0, 1.0])]
    # weighted sums: [0, 1, 0] -> elected [+, +, +]; agreeing models: [0], [0], [1]
    deltas = torch.stack(fts)
    for normalize, want in ((True, [1.0, 2.0, 1.0]), (False, [1.0, 2.0, 1.0])):
        want = torch.tensor(want)
        torch.testing.assert_close(M.ties_merge(base, deltas, normalize=normalize), want)
        torch.testing.assert_close(M.ties_merge(base, deltas.clone(), normalize=normalize, inplace=True), want)
        torch.testing.assert_close(fused_deltas(base, fts, [1.0, 1.0], consensus=True, normalize=normalize), want)
    # with weights [2, 1]: sums [1, 3, -1] -> [+, +, -]; normalize divides by the agreeing weights
    want = torch.tensor([1.0, 2.0, -1.0])
    torch.testing.assert_close(M.ties_merge(base, deltas, weight=[2.0, 1.0]), want)
    torch.testing.assert_close(fused_deltas(base, fts, [2.0, 1.0], consensus=True, normalize=True), want)


# -- DoRA gradients equal peft's (the weight norm is a constant for backward, DoRA sec. 4.3) -------

def test_dora_gradients_match_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from conftest import tiny_inputs, tiny_llama

    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"],
                                                           use_dora=True, init_lora_weights=False))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B non-zero and magnitudes off the weight norms, so every term has a gradient
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(tmp_path / "peft")
    ours = gk.load_adapter(tiny_llama(), tmp_path / "peft")
    ids = tiny_inputs()
    proj = torch.randn(96, generator=torch.Generator().manual_seed(4))
    for model in (pm, ours):
        for p in model.parameters():
            p.requires_grad_(False)
    sites = gk.sites(ours)
    pairs = []
    for name, site in sites.items():
        module = pm.base_model.model.get_submodule(name.rsplit(".", 1)[0])
        for ours_p, theirs_p in ((site.lora_A, module.lora_A["default"].weight), (site.lora_B, module.lora_B["default"].weight),
                                 (site.lora_magnitude_vector, module.lora_magnitude_vector["default"].weight)):
            ours_p.requires_grad_(True)
            theirs_p.requires_grad_(True)
            pairs.append((f"{name}:{tuple(theirs_p.shape)}", ours_p, theirs_p))
    assert len(pairs) == 3 * 6
    for model in (pm, ours):
        (model(input_ids=ids).logits @ proj).square().mean().backward()
    for name, a, b in pairs:
        assert a.grad is not None and b.grad is not None, name
        assert b.grad.abs().max() > 1e-4, name  # a vacuous zero gradient would compare equal
        torch.testing.assert_close(a.grad.reshape(b.grad.shape), b.grad, atol=1e-6, rtol=1e-4, msg=name)


class BiasMLP(torch.nn.Module):
    """Linear layers with non-zero biases (transformers initialises its biases to zero, which hides
    a DoRA that scales the bias with the weight)."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 10)
        self.fc2 = torch.nn.Linear(10, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def bias_mlp():
    torch.manual_seed(0)
    return BiasMLP()


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_dora_with_biases_matches_peft(tmp_path, train):
    """DoRA rescales ``W x`` only: ``m / ||W + s B A|| (W + s B A) x + b`` - the bias stays out of
    the magnitude scaling (peft subtracts it from the base output first)."""
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(bias_mlp(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], use_dora=True,
                                                         init_lora_weights=False))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(tmp_path / "peft")
    ours = gk.load_adapter(bias_mlp(), tmp_path / "peft")
    assert all(float(m.bias.abs().max()) > 0.05 for m in (ours.fc1, ours.fc2))
    pm.train(train)
    ours.train(train)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(8))
    want, got = pm(x), ours(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    want.square().sum().backward()
    got.square().sum().backward()
    for name, site in gk.sites(ours).items():
        module = pm.base_model.model.get_submodule(name.rsplit(".", 1)[0])
        torch.testing.assert_close(site.lora_magnitude_vector.grad, module.lora_magnitude_vector["default"].weight.grad,
                                   atol=1e-5, rtol=1e-4)


# -- peft IA3 on Conv2d with a dotted feedforward_modules entry -------------------------------------

class ConvNet(torch.nn.Module):
    """Conv2d layers at nested paths; ``subblock.conv_b`` also ends with ``block.conv_b``."""

    def __init__(self):
        super().__init__()
        self.block = torch.nn.Module()
        self.block.conv_a = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.block.conv_b = torch.nn.Conv2d(4, 5, 1)
        self.subblock = torch.nn.Module()
        self.subblock.conv_b = torch.nn.Conv2d(5, 3, 1)
        self.conv_b = torch.nn.Conv2d(3, 6, 1)

    def forward(self, x):
        x = torch.tanh(self.block.conv_a(x))
        x = torch.tanh(self.block.conv_b(x))
        x = torch.tanh(self.subblock.conv_b(x))
        return self.conv_b(x)


def conv_net():
    torch.manual_seed(0)
    return ConvNet().eval()


@pytest.mark.parametrize("feedforward", [["block.conv_b"], r".*block\.conv_b"], ids=["suffix-list", "regex"])
def test_peft_ia3_conv2d_with_dotted_feedforward_round_trips(tmp_path, feedforward):
    """peft marks a module feed-forward when its path ends with an entry of the list (plain
    ``str.endswith``, so ``subblock.conv_b`` matches ``block.conv_b`` too; the top-level
    ``conv_b`` does not), or fully matches the regex when it is a string. A Conv2d vector is
    (1, n, 1, 1) either way, so the import can only tell input from output scaling by that rule."""
    peft = pytest.importorskip("peft")
    cfg = peft.IA3Config(target_modules=["conv_a", "conv_b", "block.conv_b"], feedforward_modules=feedforward, init_ia3_weights=False)
    pm = peft.get_peft_model(conv_net(), cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.5)
    pm.eval()
    ff = {n for n, m in pm.base_model.model.named_modules() if getattr(m, "is_feedforward", False)}
    assert ff == {"block.conv_b", "subblock.conv_b"}
    x = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = pm(x)
        assert (want - conv_net()(x)).abs().max() > 1e-2
    pm.save_pretrained(tmp_path / "peft")
    ours = gk.load_adapter(conv_net(), tmp_path / "peft")
    assert {n.rsplit(".", 1)[0] for n, s in gk.sites(ours).items() if s.feedforward} == ff
    with torch.no_grad():
        torch.testing.assert_close(ours(x), want, atol=1e-5, rtol=0)
    gk.save_adapter(ours, tmp_path / "again", format="peft")
    back = peft.PeftModel.from_pretrained(conv_net(), tmp_path / "again").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), want, atol=1e-5, rtol=0)


def test_peft_ia3_bad_feedforward_regex_is_one_line_error(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from graftkit.errors import FileFormatError

    pm = peft.get_peft_model(conv_net(), peft.IA3Config(target_modules=["conv_a"], feedforward_modules=r"block\.conv_a"))
    pm.save_pretrained(tmp_path / "peft")
    cfg_file = tmp_path / "peft" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["feedforward_modules"] = "block.(conv_a"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(FileFormatError, match=r"feedforward_modules 'block.\(conv_a' is not a valid regular expression"):
        gk.load_adapter(conv_net(), tmp_path / "peft")


# -- eval statistics ---------------------------------------------------------------------------

def test_paired_bootstrap_is_a_tie_when_the_interval_spans_zero():
    from graftkit.eval.compare import paired_bootstrap

    a = [1, 1, 0, 1, 0, 1, 0, 0, 1, 0]
    b = [0, 1, 1, 0, 0, 1, 0, 1, 0, 0]  # differences [1, 0, -1, 1, 0, 0, 0, -1, 1, 0]: mean 0.1
    r = paired_bootstrap(a, b, resamples=2000)
    assert r["diff"] == pytest.approx(0.1)
    assert r["low"] < 0 < r["high"]
    assert r["verdict"] == "tie"
    assert paired_bootstrap([1] * 10, [0] * 10, resamples=200)["verdict"] == "win"
    assert paired_bootstrap([0] * 10, [1] * 10, resamples=200)["verdict"] == "loss"


def test_binomial_tail_includes_the_observed_count():
    from graftkit.eval.compare import binomial_tail

    # P(X >= 3), X ~ Bin(5, 1/2) = (C(5,3) + C(5,4) + C(5,5)) / 32 = 16 / 32
    assert binomial_tail(3, 5, 0.5) == pytest.approx(0.5, abs=1e-12)
    # P(X >= 2), X ~ Bin(4, 0.3) = 1 - 0.7^4 - 4 * 0.3 * 0.7^3 = 0.3483
    assert binomial_tail(2, 4, 0.3) == pytest.approx(0.3483, abs=1e-12)
    assert binomial_tail(0, 4, 0.3) == 1.0
