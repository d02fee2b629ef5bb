"""One validation path (issue 11): merge, export, eval and import-peft refuse the same bad adapter
the same way (base fingerprint with --force, shapes naming the key and both shapes, NaN/Inf naming
the key); ``graft merge --dry-run`` refuses what the real run refuses and shows the shell command a
``search:`` runs; index files stay in their folder; bad tokenizer sources, remote-code folders,
folders without config.json and mistyped numbers are one-line errors.

Each command-line case runs ``graft`` in-process (``cli.main``) and asserts exit 2, exactly one
stderr line ``graft: error: ...`` with the expected words, nothing written under the inputs' root
and every input byte-identical; a few run the real subprocess too.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import graftkit as gk
from conftest import tiny_llama
from graftkit import cli
from graftkit.errors import AdapterError, ConfigError, GraftError
from graftkit.validate import check_adapter, parse_size
from test_bad_input import graft, tree

Q_A = "model.layers.0.self_attn.q_proj.weight.lora_A"


# -- inputs ---------------------------------------------------------------------------------------

def _damage(src: Path, dst: Path, weights: str, change) -> Path:
    shutil.copytree(src, dst)
    t = load_file(str(dst / weights))
    change(t)
    save_file(t, str(dst / weights), metadata={"format": "pt"})
    return dst


def _edit_json(folder: Path, name: str, change) -> Path:
    data = json.loads((folder / name).read_text())
    change(data)
    (folder / name).write_text(json.dumps(data))
    return folder


def _nan(key_part: str, value=float("nan")):
    def change(t):
        key = next(k for k in sorted(t) if key_part in k)
        t[key][0, 0] = value
    return change


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Two tiny Llama bases (same architecture, different weights), a LoRA made on the first in
    both formats, and broken copies of them."""
    r = tmp_path_factory.mktemp("validation")
    tiny_llama(0).save_pretrained(r / "base")
    tiny_llama(1).save_pretrained(r / "other")
    model = gk.inject(tiny_llama(0), gk.LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for p in gk.trainable_parameters(model):
            p.add_(0.1)
    gk.save_adapter(model, r / "ad")
    gk.save_adapter(model, r / "peft", format="peft")
    _damage(r / "ad", r / "ad_nan", "adapter.safetensors", _nan(Q_A))
    _damage(r / "ad", r / "ad_rank", "adapter.safetensors", lambda t: t.__setitem__(Q_A, torch.randn(3, 32)))
    _damage(r / "ad", r / "ad_width", "adapter.safetensors", lambda t: t.__setitem__(Q_A, torch.randn(4, 40)))
    _damage(r / "peft", r / "peft_inf", "adapter_model.safetensors", _nan("lora_B", float("inf")))
    _damage(r / "peft", r / "peft_rank", "adapter_model.safetensors",
            lambda t: t.__setitem__(next(k for k in sorted(t) if "lora_B" in k), torch.randn(32, 3)))
    _edit_json(_damage(r / "peft", r / "peft_r", "adapter_model.safetensors", lambda t: None),
               "adapter_config.json", lambda c: c.__setitem__("r", "four"))
    # model folders that must be refused
    shutil.copytree(r / "base", r / "noconfig")
    (r / "noconfig" / "config.json").unlink()
    for name, target in (("escape", "../other/model.safetensors"), ("absolute", str(r / "other" / "model.safetensors"))):
        shutil.copytree(r / "base", r / name)
        keys = list(load_file(str(r / "base" / "model.safetensors")))
        (r / name / "model.safetensors").unlink()
        (r / name / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {k: target for k in keys}}))
    shutil.copytree(r / "base", r / "remote")
    _edit_json(r / "remote", "config.json", lambda c: c.update(model_type="xmodel", architectures=["XModel"],
                                                                auto_map={"AutoConfig": "configuration_x.XConfig",
                                                                          "AutoModelForCausalLM": "modeling_x.XModel"}))
    (r / "notok").mkdir()
    (r / "notok" / "README.md").write_text("no tokenizer here\n")
    (r / "tok").mkdir()
    (r / "tok" / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    return r


@pytest.fixture(autouse=True)
def _no_progress_bars():
    """In-process, transformers was imported before cli.main could turn its "Loading weights" bars
    off; they would be extra stderr lines the one-line assertion counts."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    yield
    logging.enable_progress_bar()


def recipe(root: Path, name: str, models, *, method: str = "task_arithmetic", base: str | None = "base", **extra) -> str:
    cfg = {"merge_method": method, **({"base_model": str(root / base)} if base else {}),
           "models": [{"model": str(root / m), "parameters": p} for m, p in models], **extra}
    path = root / f"{name}.yml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return str(path)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def fails(capsys, root: Path, *argv, needles=()) -> str:
    """``graft ARGV`` exits 2 with one ``graft: error:`` line holding every needle, writes nothing
    and leaves every input byte-identical."""
    before = snapshot(root)
    code, _, err = run_cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("graft: error:"), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert snapshot(root) == before, "the failed command wrote or changed files"
    assert not (root / "out").exists()
    return lines[0]


# -- one set of adapter checks, every command -------------------------------------------------------

NAN = ("NaN/Inf", Q_A)
WIDTH = (Q_A, "(4, 40)", "(4, 32)")
RANK = (Q_A, "(3, 32)", "(32, 4)")

CASES = [
    # (id, argv with {r} for the root, recipe models or None, needles)
    ("export-merged-nan", ["export", "{r}/ad_nan", "--base", "{r}/base", "--merged", "{r}/out"], NAN),
    ("export-peft-nan", ["export", "{r}/ad_nan", "--base", "{r}/base", "--peft", "{r}/out"], NAN),
    ("export-width", ["export", "{r}/ad_width", "--base", "{r}/base", "--merged", "{r}/out"], WIDTH),
    ("export-width-forced", ["export", "{r}/ad_width", "--base", "{r}/base", "--merged", "{r}/out", "--force"], WIDTH),
    ("export-rank", ["export", "{r}/ad_rank", "--base", "{r}/base", "--merged", "{r}/out"], RANK),
    ("export-other-base", ["export", "{r}/ad", "--base", "{r}/other", "--merged", "{r}/out"], ("different base model", "--force")),
    ("import-peft-inf", ["import-peft", "{r}/peft_inf", "{r}/out"], ("NaN/Inf", "lora_B")),
    ("import-peft-inf-base", ["import-peft", "{r}/peft_inf", "{r}/out", "--base", "{r}/base"], ("NaN/Inf", "lora_B")),
    ("import-peft-r-four", ["import-peft", "{r}/peft_r", "{r}/out"], ("adapter_config.json", "r is 'four'", "integer")),
    ("import-peft-rank", ["import-peft", "{r}/peft_rank", "{r}/out"], ("q_proj", "(32, 3)", "ranks")),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_adapter_checks_on_the_command_line(capsys, root, case):
    _, argv, needles = case
    fails(capsys, root, *[a.format(r=root) for a in argv], needles=needles)


MERGE_CASES = [
    ("nan", "ad_nan", "base", NAN),
    ("width", "ad_width", "base", WIDTH),
    ("rank", "ad_rank", "base", RANK),
    ("other-base", "ad", "other", ("ad", "different base model", "q_proj", "--force")),
    ("peft-inf", "peft_inf", "base", ("NaN/Inf", "lora_B")),
]


@pytest.mark.parametrize("dry", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("case", MERGE_CASES, ids=lambda c: c[0])
def test_merge_makes_the_same_adapter_checks(capsys, root, case, dry):
    name, adapter, base, needles = case
    cfg = recipe(root, f"m-{name}", [(adapter, {"weight": 1.0})], base=base)
    fails(capsys, root, "merge", cfg, root / "out", *(["--dry-run"] if dry else []), needles=needles)


def test_merge_force_takes_an_adapter_onto_another_base(capsys, root, tmp_path):
    cfg = recipe(root, "m-forced", [("ad", {"weight": 1.0})], base="other")
    code, out, err = run_cli(capsys, "merge", cfg, tmp_path / "forced", "--force")
    assert code == 0, err
    merged = load_file(str(tmp_path / "forced" / "model.safetensors"))
    other = load_file(str(root / "other" / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[key], other[key]) and torch.equal(merged["model.norm.weight"], other["model.norm.weight"])
    # --force skips the fingerprint only: a NaN adapter is still refused
    cfg = recipe(root, "m-forced-nan", [("ad_nan", {"weight": 1.0})], base="base")
    fails(capsys, root, "merge", cfg, root / "out", "--force", needles=NAN)


def test_every_checking_command_has_force():
    parser = cli.build_parser()
    for argv in (["merge", "c.yml", "o"], ["export", "a", "--base", "b", "--merged", "o"], ["eval", "e.yml"],
                 ["import-peft", "p", "o", "--base", "b"]):
        assert parser.parse_args([*argv, "--force"]).force is True


@pytest.mark.parametrize("loader", ["native", "peft"])
def test_library_refuses_a_nan_adapter_with_its_key(root, loader):
    path = root / ("ad_nan" if loader == "native" else "peft_inf")
    model = tiny_llama(0)
    with pytest.raises(AdapterError, match="NaN/Inf") as ei:
        gk.load_adapter(model, path)
    assert "\n" not in str(ei.value) and str(path) in str(ei.value)
    assert gk.get_state(model) is None  # untouched


def _adapter(root: Path):
    from graftkit.io import read_adapter

    return read_adapter(root / "ad")


@pytest.mark.parametrize("damage, needles", [
    (lambda a: a.meta["target_options"][Q_A[:-7]].__setitem__("r", 8), ("r=8", "rank 4")),
    (lambda a: a.tensors.__setitem__(Q_A.replace("lora_A", "lora_magnitude_vector"), torch.ones(5)), ("lora_magnitude_vector", "(5,)", "(32, 4)")),
    (lambda a: a.tensors.pop(Q_A.replace("lora_A", "lora_B")), ("no tensor", "lora_B")),
    (lambda a: a.tensors.__setitem__(Q_A, torch.ones(4, 32, 1)), ("2-D", "(4, 32, 1)")),
    (lambda a: a.tensors[Q_A].__setitem__((1, 1), float("-inf")), NAN),
], ids=["r-in-json", "magnitude", "missing-B", "3-d", "inf"])
def test_check_adapter_names_what_is_wrong(root, damage, needles):
    adapter = _adapter(root)
    check_adapter(adapter, "ad")  # the intact adapter passes
    damage(adapter)
    with pytest.raises(AdapterError) as ei:
        check_adapter(adapter, "ad")
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith("ad: ")
    for needle in needles:
        assert needle in msg, msg


def test_eval_force_flag_is_applied(capsys, tmp_path, monkeypatch):
    """graft eval's fingerprint message suggests --force: the flag exists and reaches every model."""
    import graftkit.eval.runner as runner

    seen = {}

    def fake_evaluate(cfg, out, **kw):
        seen["force"] = [m.force for m in cfg.models]
        return {"models": [], "failures": [], "scores": {}}

    monkeypatch.setattr(runner, "evaluate", fake_evaluate)
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "a", "label": "x"}\n')
    (tmp_path / "e.yml").write_text(json.dumps({"models": [{"name": "a", "path": "x"}, {"name": "b", "path": "y"}],
                                                "tasks": [{"name": "t", "kind": "classification", "file": str(data)}],
                                                "output": str(tmp_path / "o")}))
    code, _, err = run_cli(capsys, "eval", tmp_path / "e.yml", "--force", "--no-progress")
    assert code == 0, err
    assert seen["force"] == [True, True]
    run_cli(capsys, "eval", tmp_path / "e.yml", "--no-progress")
    assert seen["force"] == [False, False]


# -- merge: dry-run == real run, search command shown --------------------------------------------------

@pytest.mark.parametrize("dry", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("source, needles", [
    ("{r}/notok", ("notok", "no tokenizer files")),
    ("{r}/missing", ("missing", "not a folder")),
], ids=["no-tokenizer-files", "missing"])
def test_tokenizer_source_checks(capsys, root, source, needles, dry):
    cfg = recipe(root, "m-tok", [("ad", {"weight": 1.0})], tokenizer_source=source.format(r=root))
    fails(capsys, root, "merge", cfg, root / "out", *(["--dry-run"] if dry else []), needles=needles)


def test_tokenizer_source_with_a_tokenizer_is_copied(capsys, root, tmp_path):
    cfg = recipe(root, "m-tok-ok", [("ad", {"weight": 1.0})], tokenizer_source=str(root / "tok"))
    code, _, err = run_cli(capsys, "merge", cfg, tmp_path / "m")
    assert code == 0, err
    assert (tmp_path / "m" / "vocab.txt").read_text() == (root / "tok" / "vocab.txt").read_text()


def test_dry_run_lists_the_search_command(capsys, root):
    marker = root / "search-ran"
    cmd = f"touch {marker} && echo 0.5"
    cfg = recipe(root, "m-search", [("ad", {"weight": 1.0})], search={"grid": {"lambda": [0.5, 1.0, 1.5]}, "command": cmd})
    code, out, err = run_cli(capsys, "merge", cfg, root / "out", "--dry-run")
    assert code == 0, err
    assert "3 trial merge(s)" in out and cmd in out and "shell" in out
    assert not marker.exists() and not (root / "out").exists()  # listed, not run
    # a search block without a command: the real run refuses it, so the dry run does too
    cfg = recipe(root, "m-search-nocmd", [("ad", {"weight": 1.0})], search={"grid": {"lambda": [0.5]}})
    fails(capsys, root, "merge", cfg, root / "out", "--dry-run", needles=("search.command",))


def test_dry_run_refuses_an_adapter_output_the_run_refuses(capsys, root):
    # output: adapter needs LoRA adapters as every input: a full model is refused before merging
    cfg = recipe(root, "m-to-adapter", [("other", {"weight": 1.0})], output="adapter", rank=2)
    fails(capsys, root, "merge", cfg, root / "out", "--dry-run", needles=("output: adapter",))


# -- model folders --------------------------------------------------------------------------------------

@pytest.mark.parametrize("folder, needles", [
    ("escape", ("../other/model.safetensors", "outside the model folder")),
    ("absolute", ("outside the model folder",)),
], ids=["dotdot", "absolute"])
def test_index_may_not_point_outside_its_folder(capsys, root, folder, needles):
    cfg = recipe(root, f"m-{folder}", [(folder, {"weight": 1.0})])
    fails(capsys, root, "merge", cfg, root / "out", needles=needles)
    fails(capsys, root, "merge", cfg, root / "out", "--dry-run", needles=needles)
    fails(capsys, root, "export", root / "ad", "--base", root / folder, "--merged", root / "out", needles=needles)
    fails(capsys, root, "inspect", root / folder, needles=needles)


def test_sharded_index_inside_its_folder_still_reads(root, tmp_path):
    from graftkit.tensors import Checkpoint

    shutil.copytree(root / "base", tmp_path / "sharded")
    tensors = load_file(str(tmp_path / "sharded" / "model.safetensors"))
    (tmp_path / "sharded" / "model.safetensors").unlink()
    names = sorted(tensors)
    (tmp_path / "sharded" / "sub").mkdir()
    save_file({k: tensors[k] for k in names[:5]}, str(tmp_path / "sharded" / "sub" / "a.safetensors"))
    save_file({k: tensors[k] for k in names[5:]}, str(tmp_path / "sharded" / "b.safetensors"))
    weight_map = {k: ("sub/a.safetensors" if i < 5 else "b.safetensors") for i, k in enumerate(names)}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ckpt = Checkpoint(tmp_path / "sharded")
    assert sorted(ckpt.keys()) == names and torch.equal(ckpt.get(names[0]), tensors[names[0]])


def test_merge_input_without_config_json(capsys, root):
    cfg = recipe(root, "m-noconfig", [("noconfig", {"weight": 1.0})])
    fails(capsys, root, "merge", cfg, root / "out", needles=("noconfig", "config.json"))
    fails(capsys, root, "merge", cfg, root / "out", "--dry-run", needles=("noconfig", "config.json"))


def test_remote_code_folder_says_trust_remote_code_is_off(capsys, root):
    fails(capsys, root, "export", root / "ad", "--base", root / "remote", "--merged", root / "out",
          needles=("auto_map", "trust_remote_code", "xmodel"))
    # the library readers that train and eval use say the same (not transformers' multi-line ValueError)
    from graftkit.errors import UnsupportedError
    from graftkit.io.hf import load_model, load_tokenizer, model_config

    for read in (load_tokenizer, model_config, load_model):
        with pytest.raises(UnsupportedError, match="trust_remote_code off") as ei:
            read(root / "remote")
        assert "\n" not in str(ei.value)
    assert type(model_config(root / "base")).__name__ == "LlamaConfig"


# -- mistyped values ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, params, extra, needles", [
    ("ties", {"weight": 1.0, "density": "half"}, {}, ("density", "'half'", "number")),
    ("ties", {"weight": 1.0, "density": True}, {}, ("density", "True", "number")),
    ("ties", {"weight": 1.0}, {"parameters": {"normalize": "yes"}}, ("normalize", "true or false")),
    ("ties", {"weight": 1.0}, {"parameters": {"scope": 3}}, ("scope",)),
    ("breadcrumbs", {"weight": 1.0, "density": 0.5, "gamma": 0.6}, {}, ("gamma 0.6", "density 0.5", "> 1")),
    ("breadcrumbs", {"weight": 1.0, "gamma": 0.6}, {"parameters": {"density": 0.5}}, ("gamma 0.6", "density 0.5")),
    ("task_arithmetic", {"weight": 0.0}, {}, ("every model weight is 0", "base_model")),
    ("dare_ties", {"weight": 0, "density": 0.5}, {}, ("every model weight is 0",)),
    ("linear", {"weight": 0.0}, {"parameters": {"normalize": False}}, ("every model weight is 0", "zeros")),
    ("task_arithmetic", {"weight": 1.0}, {"max_shard_size": "10XB"}, ("'10XB'", "not a size")),
    ("task_arithmetic", {"weight": 1.0}, {"max_shard_size": 0}, ("more than 0",)),
    ("task_arithmetic", {"weight": 1.0}, {"search": {"grid": {"weight": [0.0, 1.0]}, "command": "true"}}, ("search.grid.weight", "0")),
    ("ties", {"weight": 1.0}, {"search": {"grid": {"density": ["half"]}, "command": "true"}}, ("grid.density", "'half'")),
], ids=["density-half", "density-bool", "normalize-word", "scope-number", "crumbs-model", "crumbs-global", "ta-zero",
        "dare-zero", "linear-zero", "shard-unit", "shard-zero", "grid-zero-weight", "grid-word"])
def test_mistyped_merge_values(capsys, root, method, params, extra, needles):
    models = [("ad", params), ("ad", params)] if method == "linear" else [("ad", params)]
    cfg = recipe(root, f"m-{method}", models, method=method, base=None if method == "linear" else "base", **extra)
    fails(capsys, root, "merge", cfg, root / "out", needles=needles)
    fails(capsys, root, "merge", cfg, root / "out", "--dry-run", needles=needles)


def test_breadcrumbs_within_range_and_nonzero_weights_still_merge(root):
    from graftkit.merge.config import load_config

    base = str(root / "base")
    load_config({"merge_method": "breadcrumbs", "base_model": base,
                 "models": [{"model": "x", "parameters": {"weight": 1.0, "density": 0.5, "gamma": 0.5}}]})
    load_config({"merge_method": "breadcrumbs", "base_model": base,  # density 1: no mask, gamma unused
                 "models": [{"model": "x", "parameters": {"weight": 1.0, "density": 1.0, "gamma": 0.2}}]})
    load_config({"merge_method": "task_arithmetic", "base_model": base,
                 "models": [{"model": "x", "parameters": {"weight": 0.0}}, {"model": "y", "parameters": {"weight": 0.5}}]})
    load_config({"merge_method": "ties", "base_model": base, "parameters": {"scope": "global", "normalize": 1},
                 "models": [{"model": "x", "parameters": {"weight": 1.0, "density": [0.3, 0.6]}}]})


@pytest.mark.parametrize("argv, needles", [
    (["merge", "{cfg}", "{r}/out", "--threads", "-3"], ("--threads", "-3", "1 or more")),
    (["merge", "{cfg}", "{r}/out", "--threads", "0"], ("--threads", "0 must be 1 or more")),
    (["merge", "{cfg}", "{r}/out", "--threads", "two"], ("--threads", "'two'")),
    (["export", "{r}/ad", "--base", "{r}/base", "--merged", "{r}/out", "--max-shard-size", "10XB"], ("--max-shard-size", "'10XB'", "not a size")),
    (["export", "{r}/ad", "--base", "{r}/base", "--merged", "{r}/out", "--max-shard-size", "0"], ("--max-shard-size", "more than 0")),
], ids=["threads-negative", "threads-zero", "threads-word", "shard-unit", "shard-zero"])
def test_bad_arguments_are_refused_at_parsing(capsys, root, argv, needles, monkeypatch):
    import graftkit.io.hf as hf

    def no_load(*a, **k):  # refused before any model loads
        raise AssertionError("a model was loaded before the argument was checked")

    monkeypatch.setattr(hf, "load_model", no_load)
    cfg = recipe(root, "m-args", [("ad", {"weight": 1.0})])
    fails(capsys, root, *[a.format(r=root, cfg=cfg) for a in argv], needles=needles)


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1GiB") == 2**30 and parse_size("500mb") == 5 * 10**8
    assert parse_size(1234) == 1234 and parse_size("1.5KB") == 1500
    for bad in ("10XB", "GB", "-1GB", "0", 0, True, ""):
        with pytest.raises(ConfigError):
            parse_size(bad)


# -- the real process, for a few cases ----------------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["export", "{r}/ad_nan", "--base", "{r}/base", "--merged", "{r}/out"], Q_A),
    (["import-peft", "{r}/peft_r", "{r}/out"], "'four'"),
    (["merge", "{r}/m-other-base.yml", "{r}/out"], "different base model"),
], ids=["export-nan", "peft-r", "merge-other-base"])
def test_real_process(root, argv, needle):
    recipe(root, "m-other-base", [("ad", {"weight": 1.0})], base="other")
    before = tree(root)
    res = graft(*[a.format(r=root) for a in argv], cwd=root)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("graft: error:") and needle in lines[0], res.stderr
    assert tree(root) == before


@pytest.mark.parametrize("dtype, bad", [(torch.float32, float("nan")), (torch.bfloat16, float("nan")), (torch.float16, float("inf"))],
                         ids=["f32-nan", "bf16-nan", "f16-inf"])
def test_dry_run_finds_nan_in_a_full_model_input(capsys, tmp_path, dtype, bad):
    """The real run refuses a NaN/Inf input tensor while merging; the dry run, which reads no tensor
    through torch, finds it by its bits."""
    key = "model.layers.1.mlp.up_proj.weight"
    for name, seed in (("base", 0), ("ft", 1), ("bad", 1)):
        tiny_llama(seed).to(dtype).save_pretrained(tmp_path / name)
    tensors = load_file(str(tmp_path / "bad" / "model.safetensors"))
    tensors[key][3, 5] = bad
    save_file(tensors, str(tmp_path / "bad" / "model.safetensors"), metadata={"format": "pt"})
    good = recipe(tmp_path, "good", [("ft", {"weight": 1.0})])
    code, out, err = run_cli(capsys, "merge", good, tmp_path / "o", "--dry-run")
    assert code == 0 and "peak memory" in out, err
    cfg = recipe(tmp_path, "nan", [("ft", {"weight": 0.5}), ("bad", {"weight": 0.5})])
    fails(capsys, tmp_path, "merge", cfg, tmp_path / "out", "--dry-run", needles=(key, "bad", "NaN or Inf"))
    fails(capsys, tmp_path, "merge", cfg, tmp_path / "out", needles=(key, "bad", "NaN or Inf"))


def test_inspect_describes_a_broken_adapter_and_warns(capsys, root):
    """inspect still describes it (exit 0), and says on stderr what every other command would refuse."""
    code, out, err = run_cli(capsys, "inspect", root / "ad_nan", "--json")
    assert code == 0, err
    assert Q_A in json.loads(out)["problem"]
    assert err.strip().startswith("graft: warning:") and Q_A in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(capsys, "inspect", root / "ad", "--json")
    assert code == 0 and json.loads(out)["problem"] is None and err == ""
