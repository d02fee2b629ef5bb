"""graft inspect --deltas: delta statistics, ranks, intruder dimensions and the report (issue 17 items 4, 5, 7)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_llama
from graftkit.analysis.delta_stats import (delta_statistics, effective_rank, inspect_deltas, layer_and_module,
                                           sparsity_at, stable_rank)
from graftkit.analysis.intruder import intruder_count
from graftkit.cli import main

Q = "model.layers.0.self_attn.q_proj.weight"
GATE = "model.layers.1.mlp.gate_proj.weight"  # (64, 32): its singular vectors span half of R^64


# -- golden values -------------------------------------------------------------------------------
def test_stable_rank_golden():
    assert stable_rank(torch.diag(torch.tensor([3.0, 4.0]))) == pytest.approx((9 + 16) / 16)
    r1 = torch.outer(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, -1.0]))
    assert stable_rank(r1) == pytest.approx(1.0, abs=1e-6)
    assert stable_rank(torch.eye(5)) == pytest.approx(5.0)
    assert stable_rank(torch.zeros(3, 4)) == 0.0


def test_effective_rank_golden():
    # p = (1/3, 1/3, 1/3, 0): exp(ln 3) = 3
    assert effective_rank(torch.diag(torch.tensor([2.0, 2.0, 2.0, 0.0]))) == pytest.approx(3.0, rel=1e-6)
    # p = (1/4, 3/4): H = 0.25 ln 4 + 0.75 ln(4/3) = 0.5623351; exp(H) = 1.7547654
    assert effective_rank(torch.diag(torch.tensor([1.0, 3.0]))) == pytest.approx(1.7547654, rel=1e-6)
    assert effective_rank(torch.zeros(2, 2)) == 0.0


def test_labels_are_the_shortest_distinct_path_tails(tmp_path):
    from graftkit.analysis.delta_stats import _labels

    a, b, c = tmp_path / "lora" / "bbc" / "adapter", tmp_path / "full" / "bbc" / "adapter", tmp_path / "x" / "merged"
    assert list(_labels([a, b, c])) == ["lora/bbc/adapter", "full/bbc/adapter", "merged"]
    assert list(_labels([a, c])) == ["adapter", "merged"]
    assert len(_labels([a, a])) == 2


def test_sparsity_and_names():
    d = torch.tensor([0.0, 1e-5, 0.5, -2.0])
    assert sparsity_at(d, [0, 1e-4, 1]) == {0.0: 0.25, 1e-4: 0.5, 1.0: 0.75}
    assert layer_and_module("model.layers.3.self_attn.q_proj.weight") == (3, "self_attn.q_proj")
    assert layer_and_module("model.layers.12.mlp.down_proj.bias") == (12, "mlp.down_proj.bias")
    assert layer_and_module("model.embed_tokens.weight") == (None, "model.embed_tokens")


def test_norm_and_sparsity_in_slices_equal_the_whole_tensor(monkeypatch):
    """With slices of 7 entries (the last one short) the float64 norm and the threshold counts are
    those of the whole (5, 11) tensor at once: a dropped or repeated slice changes both."""
    import graftkit.analysis.delta_stats as ds

    monkeypatch.setattr(ds, "CHUNK", 7)
    d = torch.randn(5, 11, generator=torch.Generator().manual_seed(3))
    assert ds.frobenius_norm(d) == pytest.approx(float(torch.linalg.vector_norm(d.double())), rel=1e-12)
    want = {t: float((d.abs() <= t).sum()) / d.numel() for t in (0.0, 0.5, 1.0)}
    assert sparsity_at(d, [0.0, 0.5, 1.0]) == want and 0 < want[0.5] < want[1.0] < 1


def _tall_base():
    """W0 = A diag(5, 4, 3), A an (8, 3) orthonormal basis; ``u`` is orthogonal to span(A)."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    a, u = q[:, :3], q[:, 5]
    return a @ torch.diag(torch.tensor([5.0, 4.0, 3.0])), a, u


def test_intruder_orthogonal_direction_is_one():
    w0, a, u = _tall_base()
    # the first column becomes 5 a1 + 20 u: |cos| to a1 is 5/sqrt(425) < 0.5, to a2 and a3 zero
    wt = w0 + 20 * torch.outer(u, torch.tensor([1.0, 0.0, 0.0]))
    assert intruder_count(w0, wt) == 1
    assert intruder_count(w0, wt, epsilon=0.2) == 0  # the cosine 0.243 is above a lower threshold


def test_intruder_inside_span_is_zero():
    w0, a, _ = _tall_base()
    # any unit vector of a 3-d span has |cos| >= 1/sqrt(3) > 0.5 to one of its basis vectors
    wt = w0 + 20 * torch.outer(a[:, 0], torch.tensor([0.0, 1.0, 0.0]))
    assert intruder_count(w0, wt) == 0
    assert intruder_count(w0, w0.clone()) == 0


# -- a tiny model whose delta is known ------------------------------------------------------------
def _save(model, path):
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    base = tiny_llama(0)
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    base_dir = _save(base, root / "base")

    # ft_a: a rank-1 change along the top singular pair of q_proj (no intruder), a strong new
    # direction outside gate_proj's column space on its top right singular vector (so every other
    # singular vector stays the base's: exactly one intruder) and 3 entries of the final norm
    w_q = sd[Q]
    uq, sq, vq = torch.linalg.svd(w_q)
    dq = 3.0 * torch.outer(uq[:, 0], vq[0])
    w_g = sd[GATE]
    ug, _, vg = torch.linalg.svd(w_g, full_matrices=True)
    dg = 50.0 * torch.outer(ug[:, 40], vg[0])
    ft = tiny_llama(0)
    with torch.no_grad():
        ft.state_dict()[Q].add_(dq)
        ft.state_dict()[GATE].add_(dg)
        ft.state_dict()["model.norm.weight"][:3] += 0.5
    a_dir = _save(ft, root / "ft_a")

    ft_b = tiny_llama(0)  # a different small change, for similarity
    with torch.no_grad():
        ft_b.state_dict()[Q].add_(-dq)
    b_dir = _save(ft_b, root / "ft_b")

    bad = tiny_llama(0)
    bad.config.intermediate_size = 48
    import transformers

    bad = transformers.LlamaForCausalLM(bad.config)
    bad_dir = _save(bad, root / "bad")
    return {"base": base_dir, "a": a_dir, "b": b_dir, "bad": bad_dir, "dq": dq, "dg": dg, "w_q": w_q, "w_g": w_g,
            "root": root}


def test_statistics_of_a_known_delta(models):
    st = delta_statistics(models["base"], models["a"], thresholds=[0.0, 1e-3])
    rows = {r["name"]: r for r in st["tensors"]}
    q, g = rows[Q], rows[GATE]
    assert q["norm"] == pytest.approx(3.0, rel=1e-4)
    assert q["relative"] == pytest.approx(3.0 / float(models["w_q"].norm()), rel=1e-4)
    assert q["singular_values"][0] == pytest.approx(3.0, rel=1e-4)
    assert q["stable_rank"] == pytest.approx(1.0, abs=1e-4)
    assert q["effective_rank"] == pytest.approx(1.0, abs=1e-2)
    assert q["intruders"] == 0
    assert g["norm"] == pytest.approx(50.0, rel=1e-4)
    assert g["intruders"] == 1
    # every other tensor is untouched
    norm = rows["model.norm.weight"]
    assert norm["norm"] == pytest.approx(math.sqrt(0.75)) and "stable_rank" not in norm
    assert norm["sparsity"] == {"0.0": pytest.approx(1 - 3 / 32), "0.001": pytest.approx(1 - 3 / 32)}
    untouched = [r for n, r in rows.items() if n not in (Q, GATE, "model.norm.weight")]
    assert untouched and all(r["norm"] == 0 and r["sparsity"]["0.0"] == 1.0 for r in untouched)
    layers = {r["layer"]: r for r in st["by_layer"]}
    assert layers[0]["norm"] == pytest.approx(3.0, rel=1e-4) and layers[1]["norm"] == pytest.approx(50.0, rel=1e-4)
    assert layers[0]["intruders"] == 0 and layers[1]["intruders"] == 1
    assert layers[None]["norm"] == pytest.approx(math.sqrt(0.75))  # embeddings, final norm, head
    mods = {r["module"]: r for r in st["by_module"]}
    assert mods["self_attn.q_proj"]["norm"] == pytest.approx(3.0, rel=1e-4)
    assert mods["mlp.gate_proj"]["stable_rank"] == pytest.approx(1.0, abs=1e-4)
    assert mods["self_attn.k_proj"]["norm"] == 0 and mods["self_attn.k_proj"]["stable_rank"] is None
    assert st["total"]["norm"] == pytest.approx(math.sqrt(9 + 2500 + 0.75), rel=1e-4)
    assert st["total"]["intruders"] == 1


def test_similarity_of_two_deltas(models):
    res = inspect_deltas(models["base"], [models["a"], models["b"]])
    assert list(res["models"]) == ["ft_a", "ft_b"]
    sim = res["similarity"]
    # <dq + dg + dn, -dq> / (||dq + dg + dn|| ||dq||) with dq, dg and dn on different tensors
    assert sim["cosine"][0][1] == pytest.approx(-3.0 / math.sqrt(9 + 2500 + 0.75), rel=1e-3)
    assert sim["sign_conflict"][0][1] == pytest.approx(1.0)


def test_report_names_every_section(models, tmp_path, capsys):
    out = tmp_path / "rep"
    rc = main(["inspect", "--deltas", models["a"], models["b"], "--base", models["base"], "--out", str(out)])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "ft_a" in lines[0] and "1 intruders" in lines[0]
    html, md = (out / "report.html").read_text(), (out / "report.md").read_text()
    for title in ("Overview", "By layer", "By module type", "Spectra", "Intruder dimensions", "Task-vector similarity"):
        assert title in html and f"## {title}" in md
    for fig in ("spectra", "intruders", "similarity"):
        assert (out / "report_files" / f"{fig}.png").stat().st_size > 1000
        assert f"report_files/{fig}.png" in md


def test_deltas_of_different_shapes_refused(models, tmp_path, capsys):
    out = tmp_path / "rep"
    rc = main(["inspect", "--deltas", models["a"], models["bad"], "--base", models["base"], "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("graft: error: shape mismatch at model.layers.0.mlp")
    assert "delta bad" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("argv, says", [
    (["--deltas", "A"], "needs --base"),
    (["P", "--deltas", "A", "--base", "B"], "either PATH or --deltas"),
    (["--base", "B"], "path argument is required"),
    ([], "path argument is required"),
])
def test_inspect_flag_misuse(argv, says, capsys):
    assert main(["inspect", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("graft: error:") and says in err[0]


def test_missing_delta_refused(models, tmp_path, capsys):
    rc = main(["inspect", "--deltas", str(tmp_path / "nope"), "--base", models["base"], "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "does not exist" in err[0]
    assert not (tmp_path / "o").exists()


def test_base_may_be_a_packaged_alias(capsys):
    from graftkit.assets import model_dir

    # the base model itself as the "fine-tune": every delta is zero, so no SVD is paid
    rc = main(["inspect", "--deltas", str(model_dir("minilm")), "--base", "minilm", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["base"] == str(model_dir("minilm"))
    assert next(iter(res["models"].values()))["total"]["norm"] == 0.0


def test_lora_adapter_is_its_low_rank_delta(models, tmp_path):
    import graftkit as gk

    model = tiny_llama(0)
    torch.manual_seed(3)
    gk.inject(model, gk.LoRAConfig(init_lora_weights=False, r=4, lora_alpha=8, targets=["q_proj", "up_proj"]))
    with torch.no_grad():
        for site in gk.sites(model).values():
            site.lora_B.mul_(0.05)
    gk.save_adapter(model, tmp_path / "lora")
    merged = gk.export_merged(tmp_path / "lora", models["base"], tmp_path / "merged")
    res = inspect_deltas(models["base"], {"lora": tmp_path / "lora", "merged": merged}, thresholds=[0.0])
    a, m = ({r["name"]: r for r in res["models"][n]["tensors"]} for n in ("lora", "merged"))
    assert a.keys() == m.keys()
    for name, r in a.items():
        assert r["norm"] == pytest.approx(m[name]["norm"], rel=1e-4, abs=1e-6), name
    q = a[Q]
    assert q["norm"] > 0 and 1.0 <= q["stable_rank"] <= 4.0 + 1e-4
    assert q["singular_values"][4] < 1e-4 * q["singular_values"][0]  # rank 4: nothing past the fourth
    assert a["model.layers.0.self_attn.k_proj.weight"]["norm"] == 0  # not a target
    assert res["similarity"]["cosine"][0][1] == pytest.approx(1.0, abs=1e-5)
