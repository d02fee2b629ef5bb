"""Task-vector similarity: hand-computed cosine / sign-conflict values, streaming over HF folders,
exclusion globs, adapters seen as their merged models, and every bad input."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

import graftkit as gk
from conftest import tiny_bert, tiny_llama
from graftkit.analysis import SimilarityError, task_vector_similarity
from merge_helpers import lora_with_head
from graftkit.analysis.similarity import conflict_share, cosine_from_gram, gram_update, sign_conflict_counts
from graftkit.errors import ConfigError, FileFormatError

T1 = [1.0, -2.0, 0.0, 3.0]
T2 = [2.0, 1.0, 0.0, -1.0]
T3 = [0.0, 0.0, 0.0, 0.0]


def _expected_pair():
    # G11 = 14, G22 = 6, G12 = 2 - 2 + 0 - 3 = -3; both nonzero at 0, 1, 3; signs differ at 1 and 3
    return -3 / math.sqrt(14 * 6), 2 / 3


def test_pure_helpers_hand_computed():
    deltas = torch.tensor([T1, T2, T3])
    gram = gram_update(torch.zeros(3, 3, dtype=torch.float64), deltas, chunk=3)  # chunked: 3 + 1 columns
    assert gram.tolist() == [[14, -3, 0], [-3, 6, 0], [0, 0, 0]]
    both, opposite = sign_conflict_counts(deltas, chunk=2)
    assert both.tolist() == [[3, 3, 0], [3, 3, 0], [0, 0, 0]]
    assert opposite.tolist() == [[0, 2, 0], [2, 0, 0], [0, 0, 0]]
    cos = cosine_from_gram(gram)
    want_cos, want_conf = _expected_pair()
    assert cos[0][1] == pytest.approx(want_cos) and cos[1][0] == pytest.approx(want_cos)
    assert cos[0][0] == pytest.approx(1.0) and cos[2][2] == 0.0 and cos[0][2] == 0.0  # zero task vector -> 0
    conf = conflict_share(both, opposite)
    assert conf[0][1] == pytest.approx(want_conf) and conf[0][0] == 0.0 and conf[0][2] == 0.0


def test_matrix_shaped_deltas_accumulate_like_flat_ones():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(3, 5, 7, generator=g)
    gram = gram_update(torch.zeros(3, 3, dtype=torch.float64), d)
    flat = d.reshape(3, -1).double()
    assert torch.allclose(gram, flat @ flat.T)
    both, opposite = sign_conflict_counts(d)
    s = d.reshape(3, -1).sign()
    assert opposite[0, 1] == int(((s[0] * s[1]) < 0).sum()) and both[0, 1] == 35


def _folder(path, tensors):
    path.mkdir(parents=True)
    save_file({k: torch.tensor(v) for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


def test_folders_hand_computed_across_two_tensors(tmp_path):
    # the task vectors T1..T3 split over two tensors (+ an integer buffer, which is skipped)
    base = _folder(tmp_path / "base", {"a.weight": [[1.0, 1.0]], "b.weight": [1.0, 1.0], "pos": [0, 1]})
    def expert(name, tau):
        return _folder(tmp_path / name, {"a.weight": [[1 + tau[0], 1 + tau[1]]], "b.weight": [1 + tau[2], 1 + tau[3]], "pos": [0, 1]})
    out = task_vector_similarity(base, {"x": expert("x", T1), "y": expert("y", T2), "z": expert("z", T3)})
    want_cos, want_conf = _expected_pair()
    assert out["tasks"] == ["x", "y", "z"] and out["keys"] == 2
    assert out["cosine"][0][1] == pytest.approx(want_cos, abs=1e-6)
    assert out["sign_conflict"][1][0] == pytest.approx(want_conf)
    assert out["norms"] == pytest.approx([math.sqrt(14), math.sqrt(6), 0.0], abs=1e-6)
    assert out["cosine"][2] == [0.0, 0.0, 0.0]


def _bert_state(seed=0, num_labels=3):
    return {k: v.detach().clone() for k, v in tiny_bert(seed, num_labels).state_dict().items()}


def test_hf_folders_match_a_direct_computation(tmp_path):
    tiny_bert(0).save_pretrained(tmp_path / "base")
    base_sd = _bert_state()
    taus = {}
    for i, name in enumerate(["bbc", "imdb", "ag"]):
        model = tiny_bert(0)
        g = torch.Generator().manual_seed(10 + i)
        tau = {}
        with torch.no_grad():
            for k, p in model.named_parameters():
                d = torch.randn(p.shape, generator=g) * 0.01
                if i == 1:  # correlated with the first expert: shares its delta plus noise
                    d = d * 0.5 + taus["bbc"][k]
                p.add_(d)
                tau[k] = d
        model.save_pretrained(tmp_path / name)
        taus[name] = tau
    out = task_vector_similarity(tmp_path / "base", {n: tmp_path / n for n in taus})
    flat = torch.stack([torch.cat([taus[n][k].reshape(-1) for k in sorted(taus[n])]) for n in taus]).double()
    gram = flat @ flat.T
    norms = gram.diagonal().sqrt()
    cos = gram / torch.outer(norms, norms)
    s = flat.sign()
    conf = ((s[0] * s[2]) < 0).sum() / ((s[0] != 0) & (s[2] != 0)).sum()
    assert torch.allclose(torch.tensor(out["cosine"], dtype=torch.float64), cos, atol=1e-4)
    assert out["cosine"][0][1] > 0.5 > abs(out["cosine"][0][2])
    # float32 storage rounds tiny deltas, so a handful of near-zero entries may flip: compare loosely
    assert out["sign_conflict"][0][2] == pytest.approx(float(conf), abs=0.01)
    assert out["norms"] == pytest.approx(norms.tolist(), rel=1e-3)
    float_keys = [k for k in base_sd if base_sd[k].is_floating_point()]
    assert out["keys"] == len(float_keys)


def test_exclude_skips_heads_of_other_shapes(tmp_path):
    tiny_bert(0, num_labels=3).save_pretrained(tmp_path / "base")
    for name, labels, seed in [("a", 4, 1), ("b", 2, 2)]:
        model = tiny_bert(0, num_labels=labels)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for k, p in model.named_parameters():
                if not k.startswith("classifier"):
                    p.add_(torch.randn(p.shape, generator=g) * 0.01)
        model.save_pretrained(tmp_path / name)
    experts = {"a": tmp_path / "a", "b": tmp_path / "b"}
    with pytest.raises(SimilarityError, match=r"shape mismatch at classifier\.(weight|bias).*exclude"):
        task_vector_similarity(tmp_path / "base", experts)
    out = task_vector_similarity(tmp_path / "base", experts, exclude=["classifier.*"])
    ref = task_vector_similarity(tmp_path / "base", experts, exclude="classifier.*")  # a single string works too
    assert out == ref
    n_float = sum(1 for k, v in _bert_state().items() if v.is_floating_point() and not k.startswith("classifier"))
    assert out["keys"] == n_float
    assert abs(out["cosine"][0][1]) < 0.2 and 0.3 < out["sign_conflict"][0][1] < 0.7  # independent noise


def _lora(tmp_path, name, seed, fmt="native"):
    model = tiny_llama(0)
    torch.manual_seed(seed)
    gk.inject(model, gk.LoRAConfig(init_lora_weights=False, r=4, lora_alpha=8, targets=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for site in gk.sites(model).values():
            site.lora_B.mul_(0.05)
    gk.save_adapter(model, tmp_path / name, format=fmt)
    return tmp_path / name


def test_lora_adapters_equal_their_merged_models(tmp_path):
    tiny_llama(0).save_pretrained(tmp_path / "base")
    adapters = {"math": _lora(tmp_path, "a0", 1), "code": _lora(tmp_path, "a1", 2, fmt="peft")}
    full = {n: gk.export_merged(p, tmp_path / "base", tmp_path / f"full_{n}") for n, p in adapters.items()}
    from_adapters = task_vector_similarity(tmp_path / "base", adapters)
    from_full = task_vector_similarity(tmp_path / "base", full)
    assert from_adapters["tasks"] == from_full["tasks"] == ["math", "code"]
    assert from_adapters["keys"] == from_full["keys"]
    for field in ("cosine", "sign_conflict"):
        assert torch.allclose(torch.tensor(from_adapters[field]), torch.tensor(from_full[field]), atol=1e-5), field
    assert from_adapters["norms"] == pytest.approx(from_full["norms"], rel=1e-5)
    assert from_adapters["norms"][0] > 0
    # mixing an adapter with a full folder works as well
    mixed = task_vector_similarity(tmp_path / "base", {"math": adapters["math"], "code": full["code"]}, progress=True)
    assert mixed["cosine"][0][1] == pytest.approx(from_full["cosine"][0][1], abs=1e-5)


# -- bad inputs --------------------------------------------------------------------------------
def test_no_experts(tmp_path):
    base = _folder(tmp_path / "base", {"w": [1.0]})
    with pytest.raises(ConfigError, match="at least one expert"):
        task_vector_similarity(base, {})


def test_missing_paths(tmp_path):
    base = _folder(tmp_path / "base", {"w": [1.0]})
    with pytest.raises(FileFormatError, match="expert x .*does not exist"):
        task_vector_similarity(base, {"x": tmp_path / "nope"})
    with pytest.raises(FileFormatError, match="base .*does not exist"):
        task_vector_similarity(tmp_path / "nope", {"x": base})


def test_adapter_as_base(tmp_path):
    tiny_llama(0).save_pretrained(tmp_path / "base")
    adapter = _lora(tmp_path, "a", 1)
    with pytest.raises(ConfigError, match="is an adapter folder"):
        task_vector_similarity(adapter, {"x": tmp_path / "base"})


def test_missing_and_extra_tensors_are_errors(tmp_path):
    base = _folder(tmp_path / "base", {"w": [1.0, 2.0], "v": [1.0]})
    short = _folder(tmp_path / "short", {"w": [1.0, 2.0]})
    with pytest.raises(SimilarityError, match="expert s .*has no tensor v"):
        task_vector_similarity(base, {"s": short})
    longer = _folder(tmp_path / "long", {"w": [1.0, 2.0], "v": [1.0], "head.weight": [3.0]})
    with pytest.raises(SimilarityError, match="has a tensor head.weight that the base"):
        task_vector_similarity(base, {"l": longer})
    assert task_vector_similarity(base, {"l": longer}, exclude=["head.*"])["keys"] == 2
    # an excluded key may also be absent from an expert
    assert task_vector_similarity(base, {"s": short}, exclude=["v"])["keys"] == 1


def test_shape_mismatch_names_the_key(tmp_path):
    base = _folder(tmp_path / "base", {"w": [1.0, 2.0]})
    other = _folder(tmp_path / "o", {"w": [1.0, 2.0, 3.0]})
    with pytest.raises(SimilarityError, match=r"shape mismatch at w: \(2,\) in the base vs \(3,\) in expert o"):
        task_vector_similarity(base, {"o": other})


def test_exclude_everything(tmp_path):
    base = _folder(tmp_path / "base", {"w": [1.0]})
    with pytest.raises(ConfigError, match="no tensors left"):
        task_vector_similarity(base, {"x": base}, exclude=["*"])


def test_non_finite_expert(tmp_path):
    base = _folder(tmp_path / "base", {"w": [1.0, 2.0]})
    bad = _folder(tmp_path / "bad", {"w": [float("nan"), 2.0]})
    ok = _folder(tmp_path / "ok", {"w": [1.5, 2.0]})
    with pytest.raises(SimilarityError, match="tensor w of expert bad .*NaN or Inf"):
        task_vector_similarity(base, {"ok": ok, "bad": bad})


def test_identical_expert_and_base_gives_zeros(tmp_path):
    base = _folder(tmp_path / "base", {"w": [1.0, 2.0]})
    ok = _folder(tmp_path / "ok", {"w": [1.5, 2.0]})
    out = task_vector_similarity(base, {"same": base, "ok": ok})
    assert out["cosine"] == [[0.0, 0.0], [0.0, 1.0]] and out["norms"][0] == 0.0
    assert out["sign_conflict"] == [[0.0, 0.0], [0.0, 0.0]]


def test_lora_with_a_head_trained_whole_needs_exclude(tmp_path):
    tiny_bert(0, num_labels=3).save_pretrained(tmp_path / "base")
    adapters, deltas = {}, {}
    for name, labels, seed in [("five", 5, 1), ("two", 2, 2)]:
        adapters[name], deltas[name] = lora_with_head(tmp_path / name, labels, seed, "native" if labels == 5 else "peft")
    with pytest.raises(SimilarityError, match=r"classifier\.(weight|bias).*exclude"):
        task_vector_similarity(tmp_path / "base", adapters)
    out = task_vector_similarity(tmp_path / "base", adapters, exclude=["classifier.*"])
    # the same numbers from the live models' materialized deltas (keys the adapters leave alone are 0)
    keys = sorted(deltas["five"])
    assert keys == sorted(deltas["two"]) and not any(k.startswith("classifier") for k in keys)
    a, b = (torch.cat([deltas[n][k].double().reshape(-1) for k in keys]) for n in ("five", "two"))
    assert out["cosine"][0][1] == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=1e-4)
    both = (a != 0) & (b != 0)
    assert out["sign_conflict"][0][1] == pytest.approx(float(((a * b) < 0).sum() / both.sum()), abs=0.01)
    assert out["norms"] == pytest.approx([float(a.norm()), float(b.norm())], rel=1e-4)
