"""FLoRA (methods/flora.py): the Tucker delta by hand, a tiny CNN built here (Conv2d kernels keep
their 4 modes) and Linear layers, the live site against the merge engine's formula, save/load, a
training run, and the bad inputs (a rank larger than its mode) in one line."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import graftkit as gk
from graftkit.errors import AdapterError, ConfigError, GraftError
from graftkit.methods.flora import flora_formula, tucker
from test_bad_input import check_error
from test_train import assets, cls_recipe, losses  # noqa: F401  (assets is a fixture)


class TinyCNN(nn.Module):
    """Conv2d 3x3 -> grouped Conv2d 3x3 -> 1x1 Conv2d -> Linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.group = nn.Conv2d(6, 6, 3, padding=1, groups=2)
        self.point = nn.Conv2d(6, 4, 1)
        self.head = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = torch.relu(self.group(h))
        return self.head(torch.tanh(self.point(h)).flatten(1))


def cnn(seed: int = 0) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN().eval()


X = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(1))
Y = torch.tensor([0, 1, 2, 1])
TARGETS = ["conv", "group", "point", "head"]


def randomize(model, seed: int = 4, std: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gk.trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


# -- the math by hand -----------------------------------------------------------------------------------

def test_tucker_of_a_kernel_equals_einsum():
    g = torch.Generator().manual_seed(0)
    core = torch.randn(2, 3, 2, 1, generator=g)
    us = [torch.randn(n, r, generator=g) for n, r in ((5, 2), (4, 3), (3, 2), (3, 1))]
    want = torch.einsum("pqab,op,iq,ya,xb->oiyx", core, *us)
    got = tucker(core, us)
    assert got.shape == (5, 4, 3, 3)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # the formula: scaled, in the canonical (out, in*kh*kw) view of a Conv2d kernel
    slots = {"flora_core": core, **{f"flora_U{i}": u for i, u in enumerate(us)}}
    d = flora_formula("conv2d", torch.zeros(5, 4, 3, 3), slots, {"scale": 2.5})
    torch.testing.assert_close(d, 2.5 * want.flatten(1), atol=1e-5, rtol=0)


def test_tucker_of_known_tensors():
    # a matrix: U0 G U1^T written out by hand
    core = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    u0 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    u1 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    want = torch.tensor([[1.0, 4.0], [3.0, 8.0], [4.0, 12.0]])
    assert torch.equal(tucker(core, [u0, u1]), want)
    # linear and GPT-2 Conv1D both give the (out, in) view: the same matrix, scaled
    for kind in ("linear", "conv1d"):
        assert torch.equal(flora_formula(kind, torch.zeros(1), {"flora_core": core, "flora_U0": u0, "flora_U1": u1}, {"scale": 0.5}),
                           0.5 * want)
    # a 1x1x1x1 core: the outer product of the four factor columns, entry by entry
    a, b, c, d = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0, 0.5]), torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.0, -2.0])
    full = tucker(torch.full((1, 1, 1, 1), 3.0), [a[:, None], b[:, None], c[:, None], d[:, None]])
    assert full[1, 0, 0, 2].item() == 3.0 * 2.0 * 3.0 * 2.0 * -2.0
    assert torch.equal(full, 3.0 * a[:, None, None, None] * b[None, :, None, None] * c[None, None, :, None] * d[None, None, None, :])


# -- a tiny CNN and Linear layers -------------------------------------------------------------------------

def test_cnn_sites_keep_the_kernel_modes():
    model = gk.inject(cnn(), {"method": "flora", "r": 2, "targets": TARGETS})
    shapes = {n: s.slot_shapes() for n, s in gk.sites(model).items()}
    # a 3x3 kernel keeps its spatial modes at full rank unless kernel_r says otherwise
    assert shapes["conv.weight"] == {"flora_core": (2, 2, 3, 3), "flora_U0": (6, 2), "flora_U1": (3, 2), "flora_U2": (3, 3), "flora_U3": (3, 3)}
    assert shapes["group.weight"]["flora_U1"] == (3, 2)  # in/groups
    assert shapes["point.weight"]["flora_core"] == (2, 2, 1, 1)
    assert shapes["head.weight"] == {"flora_core": (2, 2), "flora_U0": (3, 2), "flora_U1": (100, 2)}  # LoRA-like, r x r core
    small = gk.inject(cnn(), {"method": "flora", "r": [2, 2, 1, 2], "targets": ["conv"]})
    assert gk.sites(small)["conv.weight"].slot_shapes()["flora_core"] == (2, 2, 1, 2)
    kr = gk.inject(cnn(), {"method": "flora", "r": 2, "kernel_r": 2, "targets": ["conv"]})
    assert gk.sites(kr)["conv.weight"].slot_shapes()["flora_core"] == (2, 2, 2, 2)


def test_cnn_identity_merge_unmerge_save_load(tmp_path):
    base = cnn()
    with torch.no_grad():
        base_out = base(X)
    model = gk.inject(cnn(), {"method": "flora", "r": 2, "scale": 1.5, "targets": TARGETS})
    with torch.no_grad():
        assert torch.equal(model(X), base_out), "a zero core must leave the model as it was"
    randomize(model)
    with torch.no_grad():
        out = model(X)
    assert (out - base_out).abs().max() > 1e-2
    # the delta of every target is the Tucker product of its own tensors, by einsum
    delta = gk.materialize_delta(model)
    for name, site in gk.sites(model).items():
        s = site.slot_tensors()
        if site.kind == "conv2d":
            want = torch.einsum("pqab,op,iq,ya,xb->oiyx", s["flora_core"], s["flora_U0"], s["flora_U1"], s["flora_U2"], s["flora_U3"])
        else:
            want = s["flora_U0"] @ s["flora_core"] @ s["flora_U1"].t()
        torch.testing.assert_close(delta[name], 1.5 * want, atol=1e-5, rtol=0)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    gk.merge_adapter(model)
    with torch.no_grad():
        torch.testing.assert_close(model(X), out, atol=1e-5, rtol=0)
    for name in delta:
        torch.testing.assert_close(model.state_dict()[name], weights[name] + delta[name], atol=1e-6, rtol=0)
    gk.unmerge_adapter(model)
    for k, v in weights.items():
        torch.testing.assert_close(model.state_dict()[k], v, atol=1e-6, rtol=0)
    gk.save_adapter(model, tmp_path / "a")
    fresh = gk.load_adapter(cnn(), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(fresh(X), out)


def test_saved_targets_merge_like_the_live_sites(tmp_path):
    """graft merge's input (the saved tensors through the same formula) equals the live delta."""
    from graftkit.io import read_adapter
    from graftkit.methods import method_named
    from graftkit.methods.base import SavedTarget

    model = gk.inject(cnn(), {"method": "flora", "r": [3, 2, 2, 1], "targets": ["conv", "group"]})
    randomize(model)
    live = gk.materialize_delta(model)
    gk.save_adapter(model, tmp_path / "a")
    adapter = read_adapter(tmp_path / "a")
    method = method_named("flora")
    base = cnn().state_dict()
    for name in adapter.targets:
        prefix = f"{name}."
        slots = {k[len(prefix):]: v for k, v in adapter.tensors.items() if k.startswith(prefix)}
        t = SavedTarget(name, slots, adapter.meta["config"], adapter.meta["target_options"][name], adapter.meta["target_kinds"][name],
                        tuple(base[name].shape), base, "a", lambda kind, feedforward=False: None, adapter.tensors)
        (d,) = method.merge_deltas(t).values()
        assert d.kind == "conv2d"
        torch.testing.assert_close(d.fn(base[name]), live[name], atol=1e-6, rtol=0)


def test_linear_factored_forward_equals_the_dense_delta():
    lin = nn.Linear(7, 5)
    model = gk.inject(nn.Sequential(lin), {"method": "flora", "r": [3, 2], "targets": ["0"]})
    randomize(model)
    site = gk.sites(model)["0.weight"]
    x = torch.randn(2, 4, 7)
    dense = x @ site.delta_matrix(site.base).t()
    torch.testing.assert_close(site.factored_output(x), dense, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ (lin.weight + site.delta()["weight"]).t() + lin.bias, atol=1e-6, rtol=0)


def test_cnn_trains_from_the_core_first():
    model = gk.inject(cnn(), {"method": "flora", "r": 2, "targets": TARGETS}).train()
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(model(X), Y).backward()
    site = gk.sites(model)["conv.weight"]
    # a zero core: only the core has a gradient at the first step (as LoRA's B)
    assert site.flora_core.grad.abs().max() > 0
    assert site.flora_U0.grad.abs().max() == 0 and site.flora_U2.grad.abs().max() == 0
    opt = torch.optim.Adam(gk.trainable_parameters(model), lr=3e-2)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(model(X), Y)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    assert site.flora_U0.grad.abs().max() > 0, "the factors train once the core is non-zero"


# -- bad input, one line --------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg, needles", [
    ({"r": 7, "targets": ["conv"]}, ("mode out", "size 6", "rank 7")),   # conv: out=6
    ({"r": [2, 2, 4, 3], "targets": ["conv"]}, ("mode kh", "size 3", "rank 4")),
    ({"r": 2, "kernel_r": 5, "targets": ["conv"]}, ("mode kh", "size 3")),
    ({"r": [2, 2, 1], "targets": ["conv"]}, ("3 ranks", "4 Tucker modes")),
    ({"r": [2, 2], "targets": ["conv"]}, ("2 ranks", "4 Tucker modes")),
])
def test_rank_larger_than_a_mode_is_one_line_and_leaves_the_model(cfg, needles):
    model = cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as ei:
        gk.inject(model, {"method": "flora", **cfg})
    check_error(ei, ConfigError, "conv.weight", *needles)
    assert not _has_state(model), "a refused inject must leave no adapter behind"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(p.requires_grad for p in model.parameters())


def _has_state(model) -> bool:
    from graftkit.adapter import get_state

    return get_state(model) is not None


def graft_one_line_error(capsys, tmp_path, recipe: dict, *needles: str) -> None:
    """``graft train RECIPE`` in this process: exit status 2, one ``graft: error:`` line, no run folder."""
    import yaml

    from graftkit.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    capsys.readouterr()
    assert main(["train", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("graft: error:"), lines
    assert all(n in lines[0] for n in needles), lines[0]
    assert not (tmp_path / "run").exists(), "a refused run wrote its folder"


def test_rank_larger_than_a_mode_in_graft_train_is_one_line(assets, tmp_path, capsys):
    # the tiny BERT's query is 32 x 32
    rec = cls_recipe(assets, tmp_path / "run", method={"method": "flora", "r": 40, "targets": ["query"]})
    graft_one_line_error(capsys, tmp_path, rec, "Tucker rank 40", "mode out", "size 32")


def test_corrupt_saved_factor_is_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    model = gk.inject(cnn(), {"method": "flora", "r": 2, "targets": ["conv"]})
    gk.save_adapter(model, tmp_path / "a")
    f = tmp_path / "a" / "adapter.safetensors"
    tensors = load_file(f)
    tensors["conv.weight.flora_U1"] = torch.zeros(3, 3)
    save_file(tensors, f)
    with pytest.raises(GraftError) as ei:
        gk.load_adapter(cnn(), tmp_path / "a")
    check_error(ei, AdapterError, "conv.weight.flora_U1", "flora_core")


# -- graft train ---------------------------------------------------------------------------------------

def test_classification_run_learns(assets, tmp_path):
    from graftkit.train import parse_recipe, train

    out = tmp_path / "run"
    recipe = cls_recipe(assets, out, method={"method": "flora", "r": 4, "targets": ["query", "value", "dense"]}, optim={"lr": 1e-2})
    summary = train(parse_recipe(recipe), progress=False)
    ls = losses(out)
    assert sum(ls[-4:]) / 4 < 0.8 * sum(ls[:4]) / 4, ls
    assert summary["final_loss"] < summary["first_loss"]
    model = gk.load_model(assets / "bert", head="classification", num_labels=2)
    gk.load_adapter(model, out / "adapter")
    cores = [s.slot_shapes()["flora_core"] for s in gk.sites(model).values() if "flora_core" in s.slots]
    assert len(cores) == 2 * 5 + 1 and set(cores) == {(4, 4)}  # query, value and 3 dense per layer, the pooler
