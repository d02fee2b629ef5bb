"""search: grids and greedy soups, with a Python callable as the evaluation hook."""
from __future__ import annotations

import json
import sys

import pytest
import torch

import graftkit as gk
from graftkit.errors import ConfigError
from graftkit.merge.api import greedy_soup, run_search
from merge_helpers import load_folder, make_models

KEY = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("models"))


def test_grid_search_picks_the_best_point_with_a_callable(models, tmp_path):
    base, ft0 = load_folder(models["base"]), load_folder(models["ft0"])
    target = base[KEY] + 0.5 * (ft0[KEY] - base[KEY])
    seen = []

    def evaluate(folder):  # "validation score": closeness to a known target
        seen.append(folder)
        return -float((load_folder(folder)[KEY] - target).norm())

    cfg = {"merge_method": "task_arithmetic", "base_model": str(models["base"]), "dtype": "float32",
           "models": [{"model": str(models["ft0"])}],
           "search": {"grid": {"lambda": [0.25, 0.5, 1.0], "weight": [1.0, 3.0]}}}
    out = run_search(cfg, tmp_path / "best", evaluate)
    assert len(seen) == 6
    results = json.loads((out / "search_results.json").read_text())
    best = [r for r in results if r["best"]][0]
    assert best["parameters"] == {"lambda": 0.5, "weight": 1.0}
    assert torch.allclose(load_folder(out)[KEY], target, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["best"]  # trials cleaned up
    # gk.merge runs the search too; a command hook scores with a shell command
    cfg["search"] = {"grid": {"lambda": [0.5, 1.0]}, "command": f"{sys.executable} -c \"print(1.0)\""}
    out2 = gk.merge(cfg, tmp_path / "cmd")
    assert len(json.loads((out2 / "search_results.json").read_text())) == 2


def test_search_rejects_unknown_grid_parameters(models, tmp_path):
    cfg = {"merge_method": "ties", "base_model": str(models["base"]), "models": [{"model": str(models["ft0"])}],
           "search": {"grid": {"densty": [0.5]}}}
    with pytest.raises(ConfigError, match="densty"):
        run_search(cfg, tmp_path / "o", lambda p: 0.0)


def test_greedy_soup_skips_a_candidate_that_hurts(models, tmp_path):
    base = load_folder(models["base"])
    good = [load_folder(models[f"ft{i}"]) for i in range(2)]
    # a third candidate far from the others: adding it must lower the score
    bad = {k: v + 5.0 for k, v in base.items()}
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    from safetensors.torch import save_file

    save_file(bad, str(bad_dir / "model.safetensors"))
    (bad_dir / "config.json").write_text((models["base"] / "config.json").read_text())
    target = (good[0][KEY] + good[1][KEY]) / 2

    def evaluate(folder):
        return -float((load_folder(folder)[KEY] - target).norm())

    out = greedy_soup([bad_dir, models["ft0"], models["ft1"]], evaluate, tmp_path / "soup", dtype="float32")
    info = json.loads((out / "search_results.json").read_text())[0]
    assert sorted(info["soup"]) == sorted([str(models["ft0"]), str(models["ft1"])])
    assert torch.allclose(load_folder(out)[KEY], target, atol=1e-6)
