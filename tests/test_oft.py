"""OFT and BOFT: the orthogonality of their rotations (golden), parity with the installed peft's
current formulation (its folders load with the same logits, graftkit's exports load in peft, merged
exports equal ``merge_and_unload``), merged == unmerged on every layer kind they claim, one-line
refusals of peft variants they do not implement, and a tiny training run whose loss goes down."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch import nn

import graftkit as gk
from graftkit.cli import main as graft_main
from graftkit.errors import ConfigError, UnsupportedError
from graftkit.methods.boft import boft_blocks, butterfly_matrix, butterfly_perms, butterfly_rotate
from graftkit.methods.oft import block_size_for, cayley, coft_project, oft_blocks, skew
from conftest import logits, tiny_inputs, tiny_llama
from test_train import assert_one_line_error, assets, cls_recipe, losses  # noqa: F401  (assets is a fixture)

peft = pytest.importorskip("peft")
from peft.tuners.boft import layer as boft_layer  # noqa: E402

ATOL = 1e-5
IDS = tiny_inputs()


class _BlockDiag:
    """Stands in for peft's CUDA block-diagonal extension (``fbd_cuda.forward``) on the CPU, so the
    installed peft builds BOFT with more than one butterfly factor (without it, peft drops to one)."""

    @staticmethod
    def forward(x):
        return [torch.stack([torch.block_diag(*x[n].unbind(0)) for n in range(x.shape[0])])]

    @staticmethod
    def backward(grad, x):
        h = x.shape[-1]
        return [torch.stack([grad[:, j * h:(j + 1) * h, j * h:(j + 1) * h] for j in range(x.shape[1])], 1)]


@pytest.fixture(autouse=True)
def peft_boft_without_cuda(monkeypatch):
    # peft tries to build its CUDA extension for every BOFT layer (a compiler run each) and without it uses
    # one butterfly factor: the tests take that CPU path directly, whatever the machine has
    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: None)


# -- golden: the rotations are orthogonal ----------------------------------------------------------

def _random_skew_vec(blocks: int, b: int, scale: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(blocks, b * (b - 1) // 2, generator=g, dtype=torch.float64) * scale


@pytest.mark.parametrize("b", [2, 5, 8])
def test_exact_cayley_is_orthogonal(b):
    q = skew(_random_skew_vec(3, b, 0.7), b)
    assert torch.equal(q, -q.transpose(-2, -1))
    r = cayley(q, neumann=False, terms=0)
    eye = torch.eye(b, dtype=r.dtype).expand_as(r)
    torch.testing.assert_close(r.transpose(-2, -1) @ r, eye, atol=1e-12, rtol=0)
    torch.testing.assert_close(r @ r.transpose(-2, -1), eye, atol=1e-12, rtol=0)
    assert (r - eye).abs().max() > 0.1  # a real rotation, not the identity
    # the Cayley map's definition: R (I + Q) = I - Q
    torch.testing.assert_close(r @ (eye + q), eye - q, atol=1e-12, rtol=0)


def test_cayley_neumann_is_peft_series_and_near_orthogonal():
    b = 6
    q = skew(_random_skew_vec(4, b, 0.02), b)
    eye = torch.eye(b, dtype=q.dtype).expand_as(q)
    r = cayley(q, neumann=True, terms=5)
    # peft 0.21's series: I + 2Q + 2Q^2 + 2Q^3 + Q^4
    q2 = q @ q
    torch.testing.assert_close(r, eye + 2 * q + 2 * q2 + 2 * q2 @ q + q2 @ q2, atol=1e-14, rtol=0)
    # orthogonal up to the truncation (its error falls as |Q|^4: 1e-4 less for a Q ten times smaller),
    # and the exact form's transpose in the limit of many terms
    def err(q):
        r = cayley(q, neumann=True, terms=5)
        return (r.transpose(-2, -1) @ r - eye).abs().max().item()

    assert err(q) < 1e-3 and err(q / 10) < err(q) * 2e-4
    long = cayley(q, neumann=True, terms=30)
    torch.testing.assert_close(long, cayley(q, neumann=False, terms=0).transpose(-2, -1), atol=1e-13, rtol=0)
    assert torch.equal(cayley(q, neumann=True, terms=1), eye)
    torch.testing.assert_close(cayley(q, neumann=True, terms=2), eye + 2 * q, atol=0, rtol=0)


def test_coft_keeps_blocks_in_the_eps_ball():
    vec = _random_skew_vec(4, 5, 1.0).float()
    vec[0] *= 1e-7  # already inside the ball: kept
    out = coft_project(vec, 5, 6e-5)
    norms = skew(out, 5).flatten(1).norm(dim=1)
    radius = 6e-5 / 2  # eps / sqrt(4 blocks)
    assert torch.all(norms <= radius * (1 + 1e-5))
    torch.testing.assert_close(out[0], vec[0])
    torch.testing.assert_close(norms[1:], torch.full((3,), radius), rtol=1e-5, atol=0)


@pytest.mark.parametrize("settings", [
    {"block_size": 4, "use_cayley_neumann": False},
    {"block_size": 4, "use_cayley_neumann": False, "block_share": True},
])
def test_oft_rotation_of_a_layer_is_orthogonal(settings):
    in_f = 16
    rows = 1 if settings.get("block_share") else in_f // 4
    blocks = oft_blocks(_random_skew_vec(rows, 4, 0.5).float(), settings, in_f)
    full = torch.block_diag(*blocks.unbind(0))
    torch.testing.assert_close(full.t() @ full, torch.eye(in_f), atol=1e-5, rtol=0)
    assert blocks.shape == (4, 4, 4)


@pytest.mark.parametrize("n, blocks, size, factors", [(32, 4, 8, 3), (24, 6, 4, 2), (16, 4, 4, 1)])
def test_butterfly_is_orthogonal_and_its_permutations_are_peft_s(n, blocks, size, factors):
    perms = butterfly_perms(n, blocks, size, factors)
    for i, p in enumerate(perms):  # peft's own permutation builder, factor by factor
        want = boft_layer.BOFTLayer.block_butterfly_perm(None, n, int(blocks / 2 ** i), int(size / 2), factors - 1)
        assert torch.equal(p, want)
    g = torch.Generator().manual_seed(1)
    r = boft_blocks(torch.randn(factors, blocks, size, size, generator=g) * 0.5)
    m = butterfly_matrix(r, perms)
    torch.testing.assert_close(m.t() @ m, torch.eye(n), atol=1e-5, rtol=0)
    if factors > 1:  # the butterfly connects inputs across blocks: M is not block-diagonal
        assert m[:size, size:].abs().max() > 1e-3
    x = torch.randn(3, 5, n, generator=g)
    torch.testing.assert_close(butterfly_rotate(x, r, perms), x @ m, atol=1e-5, rtol=0)


# -- peft parity ------------------------------------------------------------------------------------

# id: (method, peft kwargs in peft's names; graftkit's configs take the same keys)
CASES = {
    "oft-neumann": ("oft", dict(oft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "oft-cayley-share": ("oft", dict(r=2, oft_block_size=0, target_modules=["k_proj", "up_proj"], use_cayley_neumann=False,
                                     block_share=True)),
    "oft-coft": ("oft", dict(oft_block_size=16, target_modules=["q_proj", "o_proj"], coft=True, eps=0.5,
                             num_cayley_neumann_terms=3)),
    "oft-adjusted": ("oft", dict(oft_block_size=12, target_modules=["v_proj", "gate_proj"])),  # 32 inputs: 8 and 16 tie, peft picks 8
    "boft": ("boft", dict(boft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "boft-butterfly": ("boft", dict(boft_block_num=4, boft_block_size=0, boft_n_butterfly_factor=2,
                                    target_modules=["q_proj", "up_proj"])),
}


def _butterfly(case: str) -> bool:
    return CASES[case][1].get("boft_n_butterfly_factor", 1) > 1


def peft_config(case: str):
    method, kw = CASES[case]
    cls = peft.OFTConfig if method == "oft" else peft.BOFTConfig
    return cls(**kw, task_type="CAUSAL_LM", init_weights=False)


@torch.no_grad()
def perturb(params, seed: int = 3, scale: float = 0.05) -> int:
    g = torch.Generator().manual_seed(seed)
    n = 0
    for p in params:
        p.add_(torch.randn(p.shape, generator=g) * scale)
        n += 1
    return n


def make_peft(case: str, monkeypatch):
    if _butterfly(case):
        monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: _BlockDiag)
    model = peft.get_peft_model(tiny_llama(), peft_config(case))
    assert perturb([p for p in model.parameters() if p.requires_grad]) > 0
    return model.eval()


def _adapted(ref: torch.Tensor) -> None:
    assert (ref - logits(tiny_llama(), IDS)).abs().max() > 1e-2  # parity below must not be vacuous


@pytest.mark.parametrize("case", CASES)
def test_peft_folder_loads_into_graftkit_and_exports_back(case, tmp_path, monkeypatch):  # (a) and (b)
    pm = make_peft(case, monkeypatch)
    ref = logits(pm, IDS)
    _adapted(ref)
    pm.save_pretrained(tmp_path / "peft")
    model = gk.load_adapter(tiny_llama(), tmp_path / "peft")
    assert gk.get_state(model).method == CASES[case][0]
    torch.testing.assert_close(logits(model, IDS), ref, atol=ATOL, rtol=0)
    if case == "oft-adjusted":
        assert {s.block_size for s in gk.sites(model).values()} == {8}
    if _butterfly(case):
        assert {s.factors for s in gk.sites(model).values()} == {2}
    gk.save_adapter(model, tmp_path / "again", format="peft")
    back = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "again").eval()
    torch.testing.assert_close(logits(back, IDS), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["oft-neumann", "oft-cayley-share", "boft", "boft-butterfly"])
def test_merged_export_matches_peft_merge_and_unload(case, tmp_path, monkeypatch):  # (c)
    tiny_llama().save_pretrained(tmp_path / "base")
    pm = make_peft(case, monkeypatch)
    pm.save_pretrained(tmp_path / "peft")
    out = gk.export_merged(tmp_path / "peft", tmp_path / "base", tmp_path / "merged")
    ours = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    theirs = pm.merge_and_unload().eval()
    torch.testing.assert_close(logits(ours, IDS), logits(theirs, IDS), atol=ATOL, rtol=0)


@pytest.mark.parametrize("method, cfg", [
    ("oft", {"oft_block_size": 8, "targets": ["q_proj", "down_proj"], "coft": True, "eps": 2.0}),
    ("boft", {"boft_block_size": 4, "boft_n_butterfly_factor": 3, "targets": ["v_proj", "up_proj"]}),
])
def test_native_adapter_exported_to_peft(method, cfg, tmp_path, monkeypatch):  # (d)
    model = gk.inject(tiny_llama(), {"method": method, "init_weights": False, **cfg})
    perturb(gk.trainable_parameters(model), seed=5)
    ref = logits(model, IDS)
    _adapted(ref)
    gk.save_adapter(model, tmp_path / "native")
    fresh = gk.load_adapter(tiny_llama(), tmp_path / "native")
    torch.testing.assert_close(logits(fresh, IDS), ref, atol=0, rtol=0)
    gk.save_adapter(fresh, tmp_path / "peft", format="peft")
    if method == "boft":
        monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: _BlockDiag)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(theirs, IDS), ref, atol=ATOL, rtol=0)
    gk.merge_adapter(model)
    torch.testing.assert_close(logits(theirs.merge_and_unload(), IDS), logits(model, IDS), atol=ATOL, rtol=0)


# -- merged == unmerged, on every kind ---------------------------------------------------------------

class ConvNet(nn.Module):
    """Conv2d (BOFT's dense-delta path) -> Linear, biases non-zero."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 3, kernel_size=2, padding=1, stride=1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        h = torch.tanh(self.conv(x))  # (b, 3, 3, 3) from (b, 2, 2, 2)
        return self.fc(h.flatten(1)[:, :24])


@pytest.mark.parametrize("method, cfg", [
    ("oft", {"oft_block_size": 4, "targets": ["fc"], "use_cayley_neumann": False}),
    ("boft", {"boft_block_size": 2, "boft_n_butterfly_factor": 2, "targets": ["conv", "fc"]}),
])
def test_merged_equals_unmerged_and_unmerge_restores(method, cfg):
    x = torch.randn(4, 2, 2, 2, generator=torch.Generator().manual_seed(2))
    model = ConvNet().eval()
    base_out = model(x).detach()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gk.inject(model, {"method": method, "init_weights": False, **cfg})
    with torch.no_grad():
        out = model(x)
    assert (out - base_out).abs().max() > 1e-3
    delta = gk.materialize_delta(model)
    gk.merge_adapter(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), out, atol=1e-5, rtol=0)
        for name, d in delta.items():
            torch.testing.assert_close(model.get_parameter(name) - before[name], d, atol=1e-6, rtol=0)
    gk.unmerge_adapter(model)
    for k, v in before.items():
        torch.testing.assert_close(model.state_dict()[k], v, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method, cfg", [
    ("oft", {"oft_block_size": 4, "module_dropout": 0.5}),
    ("boft", {"boft_block_size": 4, "boft_n_butterfly_factor": 2, "boft_dropout": 0.5}),
])
def test_block_dropout_sets_blocks_to_identity_in_training_only(method, cfg):
    model = gk.inject(tiny_llama(), {"method": method, "init_weights": False, "targets": ["q_proj"], **cfg})
    site = next(iter(gk.sites(model).values()))
    eye = torch.eye(4)
    get = site.rotation if method == "oft" else site.rotation_blocks
    with torch.no_grad():
        model.eval()
        assert not any(torch.equal(b, eye) for b in get().reshape(-1, 4, 4))
        model.train()
        blocks = get().reshape(-1, 8, 4, 4)  # (factors, 8 blocks of 4 over 32 inputs)
    identity = [[torch.equal(b, eye) for b in f] for f in blocks]
    assert [sum(f) for f in identity] in ([4], [4, 0], [0, 4])  # int(0.5 x 8) blocks, of one factor


def test_oft_rotation_preserves_neuron_angles():
    """OFT's point: the adapted weight's rows keep their norms and pairwise angles (W R^T R W^T = W W^T)."""
    model = gk.inject(tiny_llama(), {"method": "oft", "oft_block_size": 8, "targets": ["q_proj"], "init_weights": False,
                                     "use_cayley_neumann": False})
    perturb(gk.trainable_parameters(model), scale=0.3)
    name = next(iter(gk.sites(model)))
    w = model.get_parameter(name).detach().clone()
    gk.merge_adapter(model)
    merged = model.get_parameter(name).detach()
    assert (merged - w).abs().max() > 1e-2
    torch.testing.assert_close(merged @ merged.t(), w @ w.t(), atol=1e-5, rtol=0)


# -- bad input --------------------------------------------------------------------------------------

def _peft_folder(tmp_path, monkeypatch, case: str, **cfg_over) -> str:
    pm = make_peft(case, monkeypatch)
    pm.save_pretrained(tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(cfg_over)
    path.write_text(json.dumps(cfg))
    return str(tmp_path / "peft")


@pytest.mark.parametrize("case, over, needles", [
    ("oft-neumann", {"bias": "oft_only"}, ["bias='oft_only'", "OFT", "bias='none'"]),
    ("boft", {"bias": "all"}, ["bias='all'", "BOFT"]),
    ("oft-neumann", {"peft_version": "0.17.1"}, ["0.17.1", "use_cayley_neumann", "0.18.0"]),
])
def test_unsupported_peft_variant_is_one_line(case, over, needles, tmp_path, monkeypatch, capsys):
    folder = _peft_folder(tmp_path, monkeypatch, case, **over)
    with pytest.raises(UnsupportedError):
        gk.load_adapter(tiny_llama(), folder)
    capsys.readouterr()
    code = graft_main(["import-peft", folder, str(tmp_path / "native")])
    assert_one_line_error(code, capsys.readouterr().err, *needles)
    assert not (tmp_path / "native").exists()


def test_peft_oft_on_an_embedding_is_refused_by_name(tmp_path, capsys):
    pm = peft.get_peft_model(tiny_llama(), peft.OFTConfig(oft_block_size=8, target_modules=["embed_tokens", "q_proj"]))
    pm.save_pretrained(tmp_path / "peft")
    code = graft_main(["import-peft", str(tmp_path / "peft"), str(tmp_path / "native")])
    assert_one_line_error(code, capsys.readouterr().err, "oft_embedding_R", "embedding")


@pytest.mark.parametrize("cfg, needles", [
    ({"method": "oft", "r": 2, "oft_block_size": 8}, ["r=2", "oft_block_size=8", "one of"]),
    ({"method": "boft", "boft_block_size": 5}, ["boft_block_size=5", "does not divide", "q_proj"]),
    ({"method": "boft", "boft_block_size": 8, "boft_n_butterfly_factor": 4}, ["boft_n_butterfly_factor", "64"]),
    ({"method": "boft", "boft_block_num": 0, "boft_block_size": 0}, ["one of boft_block_size or boft_block_num"]),
])
def test_bad_config_is_one_line(cfg, needles):
    with pytest.raises(ConfigError) as err:
        gk.inject(tiny_llama(), {"targets": ["q_proj"], **cfg})
    msg = str(err.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)


def test_conv1d_adapter_export_to_peft_is_refused(tmp_path):
    from conftest import tiny_gpt2

    model = gk.inject(tiny_gpt2(), {"method": "oft", "oft_block_size": 8, "targets": ["c_attn"]})
    with pytest.raises(UnsupportedError, match="Conv1D.*format='native'"):
        gk.save_adapter(model, tmp_path / "p", format="peft")
    assert not (tmp_path / "p").exists()


def test_block_size_follows_peft_adjustment():
    from peft.tuners.oft.layer import OFTLayer

    def adjust(n, want):
        return want if n % want == 0 and want <= n else OFTLayer.adjust_oft_parameters(None, n, want)

    for n, want in [(32, 12), (48, 32), (64, 7), (30, 64), (96, 5), (32, 8)]:
        assert block_size_for(n, 0, want) == adjust(n, want)
        assert block_size_for(n, want, 0) == n // adjust(n, want)
    assert block_size_for(48, 0, 32) == 24  # the nearer divisor below wins a tie-free pick


# -- training ---------------------------------------------------------------------------------------

# a rotation-only adapter on the tiny random BERT needs a much larger rate than LoRA to move in a few
# steps (peft's OFT and BOFT train step for step the same: test_training_steps_equal_peft_s)
@pytest.mark.parametrize("method, lr", [
    ({"method": "oft", "oft_block_size": 16, "targets": ["query", "key", "value", "dense"], "train_also": ["classifier"]}, 0.1),
    ({"method": "boft", "boft_block_size": 8, "boft_n_butterfly_factor": 2, "boft_dropout": 0.1,
      "targets": ["query", "key", "value", "dense"], "train_also": ["classifier"]}, 0.3),
])
def test_training_lowers_the_loss(assets, tmp_path, method, lr):
    from graftkit.io import read_adapter
    from graftkit.train import train

    rec = cls_recipe(assets, tmp_path / "run", method=method, optim={"lr": lr, "epochs": 4, "weight_decay": 0.0},
                     eval={"every": None})
    summary = train(rec, progress=False)
    seen = losses(tmp_path / "run")
    epoch = len(seen) // 4  # an epoch's mean loss is over the whole training set
    assert sum(seen[-epoch:]) < 0.8 * sum(seen[:epoch])
    assert summary["val_accuracy"] >= 0.75  # chance: 0.5
    saved = read_adapter(tmp_path / "run" / "adapter")
    assert saved.method == method["method"] and any(k.endswith(("oft_R", "boft_R")) for k in saved.tensors)


@pytest.mark.parametrize("case", ["oft-coft", "oft-cayley-share", "boft-butterfly"])
def test_training_steps_equal_peft_s(case, tmp_path, monkeypatch):
    """The same start, the same batches, five Adam steps: the same losses as peft's (the gradients,
    COFT's in-place projection and the butterfly included)."""
    pm = make_peft(case, monkeypatch)
    pm.save_pretrained(tmp_path / "peft")
    ours = gk.load_adapter(tiny_llama(), tmp_path / "peft")
    ids = torch.randint(0, 96, (4, 9), generator=torch.Generator().manual_seed(4))

    def steps(model, params):
        model.train()
        opt = torch.optim.Adam(params, lr=1e-2)
        out = []
        for _ in range(5):
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        return out

    theirs = steps(pm, [p for p in pm.parameters() if p.requires_grad])
    mine = steps(ours, gk.trainable_parameters(ours))
    assert theirs[-1] < theirs[0] - 1e-3
    assert mine == pytest.approx(theirs, abs=1e-5)
