"""Multi-stage merges (graft merge-multi): parity with the real mergekit-multi on a two-stage
recipe, dependency order, lazy re-runs, and every bad input as one line with nothing written."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from graftkit.cli import main
from graftkit.merge.api import run_multi
from graftkit.merge.multi import read_stages, stage_order
from merge_helpers import load_folder, make_models
from test_outputs import cli_fails

pytest.importorskip("mergekit")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("multi"), scale=0.02)


def two_stages(m, final_weight=0.5) -> str:
    """Stage "soup" (TIES of ft0, ft1) is used by the final merge as its base and as a model,
    written before it in the file order that is NOT the dependency order."""
    final = {"merge_method": "task_arithmetic", "base_model": "soup", "dtype": "float32",
             "models": [{"model": str(m["ft2"]), "parameters": {"weight": final_weight}}, {"model": "soup", "parameters": {"weight": 0.0}}]}
    soup = {"name": "soup", "merge_method": "ties", "base_model": str(m["base"]), "dtype": "float32",
            "models": [{"model": str(m[f"ft{i}"]), "parameters": {"weight": 1.0, "density": 0.5}} for i in range(2)]}
    return yaml.safe_dump_all([final, soup], sort_keys=False)


def test_two_stages_equal_mergekit_multi(models, tmp_path):
    cfg = tmp_path / "multi.yml"
    cfg.write_text(two_stages(models))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    exe = Path(sys.executable).parent / "mergekit-multi"
    r = subprocess.run([str(exe), str(cfg), "-I", str(tmp_path / "mk_stages"), "--out-path", str(tmp_path / "mk_out"),
                        "--no-copy-tokenizer"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    done = run_multi(cfg, tmp_path / "gk_stages", tmp_path / "gk_out", log=lambda s: None)
    assert set(done) == {"soup", None}
    for ours, theirs in (("gk_stages/soup", "mk_stages/soup"), ("gk_out", "mk_out")):
        a, b = load_folder(tmp_path / ours), load_folder(tmp_path / theirs)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-7, msg=k)
    # the final merge really is ft2's delta over the soup, added to the soup: a hand-computed key
    key = "model.layers.0.mlp.up_proj.weight"
    soup, ft2, out = load_folder(tmp_path / "gk_stages/soup")[key], load_folder(models["ft2"])[key], load_folder(tmp_path / "gk_out")[key]
    torch.testing.assert_close(out, soup + 0.5 * (ft2 - soup), rtol=0, atol=1e-6)
    # each stage's recipe is written with the stage references resolved to folders
    written = yaml.safe_load((tmp_path / "gk_out" / "mergekit_config.yml").read_text())
    assert written["base_model"] == str(tmp_path / "gk_stages" / "soup")


def test_lazy_skips_an_unchanged_stage_and_reruns_a_changed_one(models, tmp_path):
    cfg = tmp_path / "multi.yml"
    cfg.write_text(two_stages(models))
    run_multi(cfg, tmp_path / "stages", tmp_path / "out", log=lambda s: None)
    shard = next((tmp_path / "stages" / "soup").glob("*.safetensors"))
    stamp = shard.stat().st_mtime_ns
    lines = []
    run_multi(cfg, tmp_path / "stages", tmp_path / "out", overwrite=True, log=lines.append)
    assert "skipped" in lines[0] and next((tmp_path / "stages" / "soup").glob("*.safetensors")).stat().st_mtime_ns == stamp
    first = load_folder(tmp_path / "stages" / "soup")
    stages = list(yaml.safe_load_all(cfg.read_text()))
    stages[1]["models"][0]["parameters"]["density"] = 0.9  # the stage's recipe changed: rebuilt, not reused
    cfg.write_text(yaml.safe_dump_all(stages, sort_keys=False))
    lines = []
    run_multi(cfg, tmp_path / "stages", tmp_path / "out", overwrite=True, log=lines.append)
    assert "skipped" not in lines[0]
    key = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(first[key], load_folder(tmp_path / "stages" / "soup")[key])


def test_stage_order_follows_the_references():
    stages = [(None, {"base_model": "b", "models": [{"model": "a"}]}), ("a", {"models": [{"model": "/x"}]}),
              ("b", {"models": [{"model": "a"}], "tokenizer_source": "a"})]
    assert [n for n, _ in stage_order(stages)] == ["a", "b", None]


def write(path: Path, docs) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False) if isinstance(docs, list) else docs)
    return path


@pytest.mark.parametrize("case", ["cycle", "duplicate", "two_unnamed", "no_out", "out_without_final", "bad_name", "empty",
                                  "not_a_mapping"])
def test_bad_multi_files_are_one_line_errors(models, tmp_path, capsys, case):
    base = str(models["base"])
    rec = lambda **kw: {"merge_method": "linear", "models": [{"model": base, "parameters": {"weight": 1.0}}], **kw}  # noqa: E731
    docs, args, needle = {
        "cycle": ([{"name": "a", **rec(models=[{"model": "b"}])}, {"name": "b", **rec(models=[{"model": "a"}])}, rec()],
                  ["--out-path", tmp_path / "o"], "circle: a -> b -> a"),
        "duplicate": ([{"name": "a", **rec()}, {"name": "a", **rec()}], [], "two stages are named 'a'"),
        "two_unnamed": ([rec(), rec()], ["--out-path", tmp_path / "o"], "only the final merge may be unnamed"),
        "no_out": ([{"name": "a", **rec()}, rec()], [], "give --out-path"),
        "out_without_final": ([{"name": "a", **rec()}], ["--out-path", tmp_path / "o"], "no unnamed final merge"),
        "bad_name": ([{"name": "../up", **rec()}], [], "not a plain folder name"),
        "empty": ("# nothing\n", [], "holds no recipe"),
        "not_a_mapping": ("- 1\n- 2\n", [], "not a merge recipe"),
    }[case]
    cfg = write(tmp_path / "multi.yml", docs)
    cli_fails(capsys, tmp_path, "merge-multi", cfg, "-I", tmp_path / "stages", *args, needles=(needle,))


def test_a_foreign_folder_in_the_stage_dir_is_never_overwritten(models, tmp_path, capsys):
    cfg = write(tmp_path / "multi.yml", [{"name": "a", "merge_method": "linear",
                                          "models": [{"model": str(models["ft0"]), "parameters": {"weight": 1.0}}]}])
    (tmp_path / "stages" / "a").mkdir(parents=True)
    (tmp_path / "stages" / "a" / "notes.txt").write_text("mine")
    cli_fails(capsys, tmp_path, "merge-multi", cfg, "-I", tmp_path / "stages", needles=("is not a graft merge output",))
    assert (tmp_path / "stages" / "a" / "notes.txt").read_text() == "mine"


def test_cli_runs_the_stages(models, tmp_path, capsys):
    cfg = tmp_path / "multi.yml"
    cfg.write_text(two_stages(models))
    assert main(["merge-multi", str(cfg), "-I", str(tmp_path / "st"), "--out-path", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "2 stage(s) done" in out and (tmp_path / "out" / "config.json").is_file()
    assert [n for n, _ in read_stages(cfg)] == [None, "soup"]
