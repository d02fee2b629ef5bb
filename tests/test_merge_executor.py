"""The streaming executor, config and CLI of `graft merge` on tiny Llama folders."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
import transformers
import yaml

import graftkit as gk
from graftkit.cli import main
from merge_helpers import load_folder, make_models

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("models"))


def recipe(models, method="ties", **extra):
    cfg = {"merge_method": method, "base_model": str(models["base"]),
           "models": [{"model": str(models[f"ft{i}"]), "parameters": {"weight": w, "density": 0.5}}
                      for i, w in enumerate([1.0, 0.5, 0.8])],
           "dtype": "float32"}
    cfg.update(extra)
    return cfg


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_merge_writes_a_loadable_hf_folder_with_provenance(models, tmp_path, ids):
    out = gk.merge(recipe(models, out_dtype="bfloat16"), tmp_path / "merged")
    names = sorted(p.name for p in out.iterdir())
    assert {"config.json", "model.safetensors", "mergekit_config.yml", "graft_provenance.json"} <= set(names)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    assert yaml.safe_load((out / "mergekit_config.yml").read_text())["merge_method"] == "ties"
    # equals the per-tensor function applied by hand
    import importlib
    M = importlib.import_module("graftkit.merge")  # gk.merge is the merge() function, not the package

    base, fts = load_folder(models["base"]), [load_folder(models[f"ft{i}"]) for i in range(3)]
    merged = load_folder(out)
    key = "model.layers.1.mlp.up_proj.weight"
    want = M.ties_merge(base[key], torch.stack([f[key] - base[key] for f in fts]), weight=[1.0, 0.5, 0.8], density=0.5)
    assert torch.equal(merged[key], want.to(torch.bfloat16))


def test_sharded_output_has_an_index_and_loads(models, tmp_path, ids):
    cfg = recipe(models, "task_arithmetic", max_shard_size=20_000)
    cfg["models"] = [{"model": str(models["ft0"])}]
    out = gk.merge(cfg, tmp_path / "m")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    single = load_folder(models["ft0"])
    merged = load_folder(out)
    assert all(torch.allclose(merged[k], single[k], atol=1e-6) for k in single)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_live_input_tensors_are_bounded(models, tmp_path, monkeypatch):
    """Count input tensors alive at once: at most threads x (inputs + base), never the model."""
    from graftkit.tensors import Checkpoint

    live, peak = [0], [0]
    real_get = Checkpoint.get

    def counting_get(self, key):
        t = real_get(self, key)
        live[0] += 1
        peak[0] = max(peak[0], live[0])

        def gone(counter=live):
            counter[0] -= 1

        weakref.finalize(t, gone)
        return t

    monkeypatch.setattr(Checkpoint, "get", counting_get)
    gk.merge(recipe(models), tmp_path / "m", threads=1)
    n_keys = len(load_folder(models["base"]))
    assert peak[0] <= 4, peak[0]          # one key at a time: base + 3 models
    assert n_keys * 4 > 20 * peak[0]      # the model is far larger than what was held
    live[0] = peak[0] = 0
    gk.merge(recipe(models), tmp_path / "m2", threads=2)
    assert peak[0] <= 8, peak[0]


def test_dry_run_is_fast_and_does_not_import_torch(models, tmp_path):
    cfg = write_yaml(tmp_path / "m.yml", recipe(models))
    code = ("import sys, time; t = time.perf_counter(); from graftkit.cli import main; "
            f"rc = main(['merge', {str(cfg)!r}, {str(tmp_path / 'o')!r}, '--dry-run']); "
            "print('TORCH', 'torch' in sys.modules, time.perf_counter() - t); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "peak memory" in r.stdout and "model.layers.0.mlp.up_proj.weight" in r.stdout
    flag, seconds = r.stdout.strip().splitlines()[-1].split()[1:]
    assert flag == "False"
    assert not (tmp_path / "o").exists()


def test_cli_merge_and_existing_output(models, tmp_path, capsys):
    cfg = write_yaml(tmp_path / "m.yml", recipe(models, "dare_ties", seed=3))
    assert main(["merge", str(cfg), str(tmp_path / "o")]) == 0
    first = load_folder(tmp_path / "o")
    assert main(["merge", str(cfg), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and len(err.strip().splitlines()) == 1
    assert main(["merge", str(cfg), str(tmp_path / "o"), "--overwrite"]) == 0
    again = load_folder(tmp_path / "o")
    assert all(torch.equal(first[k], again[k]) for k in first)  # seeded DARE is reproducible


def test_killed_merge_leaves_no_complete_looking_output(models, tmp_path):
    cfg = write_yaml(tmp_path / "m.yml", recipe(models))
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "graftkit.cli", "merge", str(cfg), str(out), "--threads", "1"],
                            env={**ENV, "_GRAFT_MERGE_DELAY": "0.2"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".o.tmp-*/model.safetensors")):
        time.sleep(0.05)
    assert list(tmp_path.glob(".o.tmp-*")), "the merge never started writing"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not out.exists()
    # a later run still works and replaces nothing it should not
    assert main(["merge", str(cfg), str(out)]) == 0
    assert (out / "model.safetensors").exists()


# -- bad input: one line, exit 2, nothing written ------------------------------------------------

def run_bad(tmp_path, capsys, cfg: dict) -> str:
    path = write_yaml(tmp_path / "bad.yml", cfg)
    out = tmp_path / "bad_out"
    capsys.readouterr()  # drop what building the inputs printed
    rc = main(["merge", str(path), str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()
    assert not list(tmp_path.glob(".bad_out*"))
    return err


def test_bad_unknown_keys(models, tmp_path, capsys):
    assert "unknown key" in run_bad(tmp_path, capsys, {**recipe(models), "merge_methd": "ties"})
    cfg = recipe(models)
    cfg["models"][0]["parameters"]["densty"] = 0.5
    assert "densty" in run_bad(tmp_path, capsys, cfg)
    assert "'t'" in run_bad(tmp_path, capsys, recipe(models, parameters={"t": 0.5}))
    assert "unknown merge method" in run_bad(tmp_path, capsys, recipe(models, "tiez"))


def test_bad_missing_base(models, tmp_path, capsys):
    cfg = recipe(models)
    del cfg["base_model"]
    assert "needs a base_model" in run_bad(tmp_path, capsys, cfg)


@pytest.mark.parametrize("density", [0.0, 1.5, -0.1])
def test_bad_density_out_of_range(models, tmp_path, capsys, density):
    cfg = recipe(models)
    cfg["models"][1]["parameters"]["density"] = density
    assert "density" in run_bad(tmp_path, capsys, cfg)


def test_bad_weights(models, tmp_path, capsys):
    cfg = recipe(models, "linear")
    del cfg["base_model"]
    for m, w in zip(cfg["models"], [1.0, -0.5, -0.5]):
        m["parameters"] = {"weight": w}
    assert "sum to" in run_bad(tmp_path, capsys, cfg)
    cfg["models"][0]["parameters"]["weight"] = float("nan")
    assert "finite" in run_bad(tmp_path, capsys, cfg)


def _save_variant(models, tmp_path, name, edit) -> Path:
    model = transformers.AutoModelForCausalLM.from_pretrained(models["ft0"])
    edit(model)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def test_bad_shape_mismatch_names_key_and_shapes(models, tmp_path, capsys):
    cfg = recipe(models)
    other = tmp_path / "other"
    sd = load_folder(models["ft0"])
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(65, 32)
    other.mkdir()
    from safetensors.torch import save_file

    save_file(sd, str(other / "model.safetensors"))
    (other / "config.json").write_text((models["ft0"] / "config.json").read_text())
    cfg["models"][2]["model"] = str(other)
    err = run_bad(tmp_path, capsys, cfg)
    assert "model.layers.1.mlp.up_proj.weight" in err and "(64, 32)" in err and "(65, 32)" in err


def test_bad_architecture(models, tmp_path, capsys):
    from conftest import tiny_gpt2

    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    cfg = recipe(models)
    cfg["models"][0]["model"] = str(tmp_path / "gpt2")
    assert "architecture" in run_bad(tmp_path, capsys, cfg)


def test_bad_vocab_size_points_to_tokenizer_source(models, tmp_path, capsys):
    model = transformers.AutoModelForCausalLM.from_pretrained(models["ft0"])
    model.resize_token_embeddings(100)
    model.save_pretrained(tmp_path / "bigvocab")
    cfg = recipe(models)
    cfg["models"][0]["model"] = str(tmp_path / "bigvocab")
    err = run_bad(tmp_path, capsys, cfg)
    assert "vocab" in err and "tokenizer_source" in err


def test_bad_nan_names_key_and_model(models, tmp_path, capsys):
    sd = load_folder(models["ft1"])
    sd["model.layers.0.self_attn.q_proj.weight"][3, 4] = float("nan")
    bad = tmp_path / "nan"
    bad.mkdir()
    from safetensors.torch import save_file

    save_file(sd, str(bad / "model.safetensors"))
    (bad / "config.json").write_text((models["ft1"] / "config.json").read_text())
    cfg = recipe(models)
    cfg["models"][1]["model"] = str(bad)
    err = run_bad(tmp_path, capsys, cfg)
    assert "model.layers.0.self_attn.q_proj.weight" in err and str(bad) in err and "NaN" in err


def test_bad_corrupt_shard(models, tmp_path, capsys):
    import shutil

    bad = tmp_path / "corrupt"
    shutil.copytree(models["ft2"], bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    cfg = recipe(models)
    cfg["models"][2]["model"] = str(bad)
    assert "truncated or corrupt" in run_bad(tmp_path, capsys, cfg)


def test_bad_missing_input_and_bad_yaml(models, tmp_path, capsys):
    cfg = recipe(models)
    cfg["models"][0]["model"] = str(tmp_path / "nope")
    assert "does not exist" in run_bad(tmp_path, capsys, cfg)
    path = tmp_path / "broken.yml"
    path.write_text("merge_method: [ties\n")
    rc = main(["merge", str(path), str(tmp_path / "x")])
    assert rc == 2 and "not valid YAML" in capsys.readouterr().err


def test_disk_full_mid_write_leaves_nothing(models, tmp_path):
    """RLIMIT_FSIZE makes the output file unwritable past a size, as a full disk would."""
    cfg = write_yaml(tmp_path / "m.yml", recipe(models))
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); from graftkit.cli import main; "
            f"sys.exit(main(['merge', {str(cfg)!r}, {str(tmp_path / 'o')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "magnitude_prune", "linear"])
def test_row_chunked_large_tensors_give_the_same_result(models, tmp_path, monkeypatch, method):
    cfg = recipe(models, method)
    if method in ("linear", "task_arithmetic"):
        for m in cfg["models"]:
            m["parameters"].pop("density")
    if method == "linear":
        del cfg["base_model"]
    whole = load_folder(gk.merge(cfg, tmp_path / "whole"))
    monkeypatch.setenv("GRAFT_MERGE_CHUNK", "500")  # every matrix runs in row chunks
    chunked = load_folder(gk.merge(cfg, tmp_path / "chunked"))
    for k in whole:
        assert torch.allclose(whole[k], chunked[k], atol=1e-7, rtol=0), k


def test_dare_chunked_is_seeded_and_keeps_its_share(models, tmp_path, monkeypatch):
    monkeypatch.setenv("GRAFT_MERGE_CHUNK", "500")
    cfg = recipe(models, "dare_linear", seed=5)
    a = load_folder(gk.merge(cfg, tmp_path / "a"))
    b = load_folder(gk.merge(cfg, tmp_path / "b"))
    base = load_folder(models["base"])
    key = "model.embed_tokens.weight"
    assert torch.equal(a[key], b[key])
    unchanged = (a[key] == base[key]).float().mean().item()
    assert abs(unchanged - 0.5**3) < 0.05


def test_global_scope_ties_equals_ties_on_the_flattened_model(models, tmp_path):
    cfg = recipe(models, parameters={"scope": "global"})
    merged = load_folder(gk.merge(cfg, tmp_path / "g"))
    import importlib
    M = importlib.import_module("graftkit.merge")  # gk.merge is the merge() function, not the package

    base = load_folder(models["base"])
    fts = [load_folder(models[f"ft{i}"]) for i in range(3)]
    keys = sorted(base)
    flat_base = torch.cat([base[k].reshape(-1) for k in keys])
    flat = torch.stack([torch.cat([f[k].reshape(-1) - base[k].reshape(-1) for k in keys]) for f in fts])
    want = M.ties_merge(flat_base, flat, weight=[1.0, 0.5, 0.8], density=0.5)
    got = torch.cat([merged[k].reshape(-1) for k in keys])
    assert torch.allclose(got, want, atol=1e-6)
    # and it differs from per-tensor trimming
    per_tensor = load_folder(gk.merge(recipe(models), tmp_path / "t"))
    assert not all(torch.equal(per_tensor[k], merged[k]) for k in keys)


def test_pickled_bin_inputs_need_allow_pickle(models, tmp_path, capsys):
    sd = load_folder(models["ft0"])
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(sd, legacy / "pytorch_model.bin")
    (legacy / "config.json").write_text((models["ft0"] / "config.json").read_text())
    cfg = recipe(models)
    cfg["models"][0]["model"] = str(legacy)
    assert "pickled" in run_bad(tmp_path, capsys, cfg)
    path = write_yaml(tmp_path / "ok.yml", cfg)
    assert main(["merge", str(path), str(tmp_path / "o"), "--allow-pickle"]) == 0
    want = load_folder(gk.merge(recipe(models), tmp_path / "ref"))  # safetensors: the fused kernels
    got = load_folder(tmp_path / "o")  # a pickled input: the torch reference functions
    assert all(torch.equal(want[k], got[k]) for k in want)  # the two paths agree bit for bit
