"""A merge method defined here only, registered for the test, and used through `graft merge`:
everything the executor needs comes from the registered object, so no other file is edited.

The toy method picks, per entry, the task-vector entry of largest magnitude across the models and
rescales the result to the largest task-vector norm of the tensor times ``scale``. The rescale
depends on the whole tensor, so merging it in row chunks would give a different answer: the test
catches a method that is chunked without having declared it may be.
"""
from __future__ import annotations

import pytest
import torch
import yaml

from graftkit.cli import main
from graftkit.registry import MERGES
from merge_helpers import load_folder, make_models

NAME = "toy_maxmag"


def toy_maxmag(base: torch.Tensor, deltas: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
    """Per entry the delta of largest magnitude, scaled to ``scale`` x the largest delta norm."""
    pick = deltas.abs().argmax(dim=0, keepdim=True)
    merged = deltas.gather(0, pick)[0]
    target = deltas.reshape(deltas.shape[0], -1).norm(dim=1).max()
    return base + scale * merged * (target / merged.norm().clamp_min(1e-12))


@pytest.fixture
def toy():
    import graftkit.merge  # noqa: F401  (the built-in methods register first)
    from graftkit.merge._common import register

    register(NAME, model_params=(), global_params=("scale",))(toy_maxmag)
    try:
        yield MERGES.get(NAME)
    finally:
        MERGES.unregister(NAME)
    assert NAME not in MERGES


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("toy_models"), n=2)


def write(tmp_path, models, **params):
    cfg = {"merge_method": NAME, "base_model": str(models["base"]), "dtype": "float32",
           "models": [{"model": str(models["ft0"])}, {"model": str(models["ft1"])}], "parameters": params}
    path = tmp_path / "toy.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def by_hand(models, scale: float) -> dict[str, torch.Tensor]:
    base, fts = load_folder(models["base"]), [load_folder(models[f"ft{i}"]) for i in range(2)]
    out = {}
    for key, b in base.items():
        d = torch.stack([f[key].float() - b.float() for f in fts])
        flat = d.reshape(2, -1)
        pick = torch.where(flat[0].abs() >= flat[1].abs(), flat[0], flat[1])  # argmax keeps the first on a tie
        target = flat.norm(dim=1).max()
        out[key] = b + scale * (pick * (target / pick.norm().clamp_min(1e-12))).view_as(b)
    return out


def test_declares_nothing_and_gets_the_safe_defaults(toy):
    assert toy.params[0].name == "scale" and toy.params[0].kind is float and toy.params[0].default == 1.0
    assert not toy.params[0].per_model and not toy.params[0].required
    assert (toy.chunkable, toy.thresholded, toy.base_as_input, toy.nan_propagating, toy.fused) == (False, False, False, False, None)
    assert toy.needs_all_inputs_at_once


def test_output_equals_the_merge_by_hand_even_above_the_chunk_size(toy, models, tmp_path, monkeypatch):
    # 64 elements per chunk: every tensor of the tiny Llama (the embedding has 3072) is larger,
    # so a method chunked without declaring it would be rescaled per chunk and come out wrong
    monkeypatch.setenv("GRAFT_MERGE_CHUNK", "64")
    assert main(["merge", str(write(tmp_path, models, scale=0.5)), str(tmp_path / "out")]) == 0
    got, want = load_folder(tmp_path / "out"), by_hand(models, 0.5)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=key)
    assert max(t.numel() for t in want.values()) > 64
    # scale is a global parameter taken from the signature: 0.5 was applied, not its default 1.0
    assert not torch.allclose(got["model.embed_tokens.weight"], by_hand(models, 1.0)["model.embed_tokens.weight"])


def test_mistyped_parameter_is_one_line_naming_it(toy, models, tmp_path, capsys):
    capsys.readouterr()
    assert main(["merge", str(write(tmp_path, models, scale="big")), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("graft: error:") and "'scale'" in err and "number" in err, err
    assert not (tmp_path / "out").exists()
    assert main(["merge", str(write(tmp_path, models, sclae=1.0)), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'sclae'" in err and "scale" in err.split("accepted:")[1], err


def test_a_required_parameter_comes_from_a_signature_without_default(models, tmp_path, capsys):
    import graftkit.merge  # noqa: F401
    from graftkit.merge._common import register

    def toy_required(base, deltas, *, strength: float, flip: bool):
        return base + (-strength if flip else strength) * deltas.mean(dim=0)

    register(NAME, global_params=("strength", "flip"))(toy_required)
    try:
        assert MERGES.get(NAME).params[0].required and MERGES.get(NAME).params[1].kind is bool
        capsys.readouterr()
        assert main(["merge", str(write(tmp_path, models, flip=True)), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "parameters.strength" in err, err
        # the kind of a parameter without a default comes from its annotation: a switch, not a number
        assert main(["merge", str(write(tmp_path, models, strength=1.0, flip=3)), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "'flip'" in err and "true or false" in err, err
        assert not (tmp_path / "out").exists()
    finally:
        MERGES.unregister(NAME)


def test_dry_run_shows_the_method_and_the_reference_path(toy, models, tmp_path, capsys):
    capsys.readouterr()
    assert main(["merge", str(write(tmp_path, models, scale=2.0)), str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"method        {NAME}" in out
    assert f"{NAME} has no fused kernel" in out
    assert f"merged with {NAME}" in out
    assert not (tmp_path / "out").exists()


def test_a_signature_name_that_is_not_a_keyword_fails_the_registration():
    import graftkit.merge  # noqa: F401
    from graftkit.merge._common import register

    with pytest.raises(RuntimeError, match="'strength' is not a keyword"):
        register(NAME, global_params=("strength",))(toy_maxmag)
    assert NAME not in MERGES


def test_the_builtin_methods_declare_what_the_old_name_tables_said():
    """The fused kernels run exactly the methods they ran before capabilities moved onto the
    methods (bit-identical outputs rest on it), and so do chunking, thresholds and the NaN shortcut."""
    import graftkit.merge  # noqa: F401

    def having(flag):
        return {n for n in MERGES if getattr(MERGES.get(n), flag)}

    assert having("fused") == {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"}
    assert having("chunkable") == {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "nearswap",
                                   "passthrough"}
    assert having("thresholded") == {"ties", "magnitude_prune"}
    assert having("nan_propagating") == {"task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune",
                                         "breadcrumbs", "breadcrumbs_ties", "passthrough"}
    assert having("base_as_input") == {"slerp", "nearswap", "arcee_fusion", "nuslerp", "multislerp", "karcher"}
    assert {n for n in MERGES if not MERGES.get(n).needs_all_inputs_at_once} == {"linear", "passthrough"}
    kernels = {n: MERGES.get(n).fused for n in having("fused")}
    assert [n for n, k in kernels.items() if k.consensus] and {n for n, k in kernels.items() if k.consensus} == {"ties", "dare_ties"}
    assert {n for n, k in kernels.items() if k.keep == "threshold"} == {"ties"}
    assert {n for n, k in kernels.items() if k.keep == "random"} == {"dare_linear", "dare_ties"}


def test_a_study_refuses_a_method_that_takes_the_base_as_an_input(toy):
    """graft study merges several experts; a method whose base is one of its two inputs (slerp) is
    refused by what it declares, and a method that declares nothing goes through."""
    from graftkit.errors import ConfigError
    from graftkit.eval.study import MergeRun, merge_config

    with pytest.raises(ConfigError, match="slerp takes the base as one of exactly two inputs") as info:
        merge_config(MergeRun(method="slerp", parameters={"t": 0.5}), "base", ["a", "b"], exclude=[], grid=False)
    assert "\n" not in str(info.value)
    cfg = merge_config(MergeRun(method=NAME, parameters={"scale": 2.0}), "base", ["a", "b"], exclude=[], grid=False)
    assert cfg["merge_method"] == NAME and cfg["parameters"] == {"scale": 2.0}
