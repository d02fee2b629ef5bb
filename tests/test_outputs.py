"""No data loss: every command's output is checked against its inputs, built beside its target and
swapped in only when complete; a killed run's leftovers are removed by the next run.

The command-line cases run the real ``graft`` process; faults are injected with a prelude (code
run in the same process before the CLI) or with bad input (a NaN weight, a NaN loss).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import graftkit as gk
from conftest import tiny_llama
from graftkit.cli import main
from graftkit.errors import ConfigError, FileFormatError
from graftkit.outputs import Staged, atomic_dir, check_output, clean_stale, write_text_atomic
from merge_helpers import make_models
from test_bad_input import CLI_ENV
from test_train import _recipe_file, assets, cls_recipe  # noqa: F401  (assets is a fixture)

def snap(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (links as their target): equal means untouched."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = b"-> " + os.readlink(p).encode()
        elif p.is_file():
            out[rel] = p.read_bytes()
        else:
            out[rel] = b"<dir>"
    return out


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).rglob("*") if ".tmp-" in p.name or ".old-" in p.name)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# -- the shared machinery --------------------------------------------------------------------------

def test_old_output_stays_until_the_new_one_is_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    staged = Staged(out, overwrite=True)
    (staged.path / "new.txt").write_text("new")
    assert (out / "old.txt").read_text() == "old" and not (out / "new.txt").exists()
    staged.commit()
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert leftovers(tmp_path) == []


def test_a_failure_inside_leaves_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"] and leftovers(tmp_path) == []


def test_a_failed_swap_puts_the_old_output_back(tmp_path, monkeypatch):
    import graftkit.outputs as outputs

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real, calls = os.replace, []

    def replace(src, dst):  # the old output is moved aside, then moving the new one in fails
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace)
    with pytest.raises(OSError):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert len(calls) == 3  # aside, in (failed), back
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"] and leftovers(tmp_path) == []


def test_overwrite_onto_a_file_leaves_no_hidden_copy(tmp_path):
    target = tmp_path / "out"
    target.write_text("a file")
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "x").write_text("new")
    assert target.is_dir() and (target / "x").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    write_text_atomic(tmp_path / "f.json", "1")
    write_text_atomic(tmp_path / "f.json", "2")
    assert (tmp_path / "f.json").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json", "out"]


def test_existing_output_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileFormatError, match="already exists"):
        Staged(tmp_path / "out")
    assert leftovers(tmp_path) == []


def test_stale_leftovers_of_dead_processes_are_removed_and_reported(tmp_path, capsys):
    from graftkit.outputs import _host_tag

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    gone, alive, h = dead_pid(), os.getppid(), _host_tag()
    other_host = "0000" if h != "0000" else "ffff"
    stale = [f".out.tmp-{gone}-{h}0123", f".out.old-{gone}-{h}4567"]
    for name in stale:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / f".out.tmp-{gone}-{h}89ab").write_text("a stale file")  # a file output's temporary
    kept = [f".out.tmp-{alive}-{h}0123",  # a run still writing it
            f".out.tmp-{gone}-{other_host}0123",  # another machine's (a shared folder): its pid means nothing here
            f".other.tmp-{gone}-{h}0123",  # another output's
            ".out.tmp-0123abcd",  # no process id: cannot tell whether it is in use
            f".out.tmp-{gone}-{h}0123.json",  # not the exact pattern
            f".out.tmp-{gone}-xyz"]
    for name in kept:
        (tmp_path / name).mkdir()
    removed = clean_stale(out)
    assert sorted(p.name for p in removed) == sorted([*stale, f".out.tmp-{gone}-{h}89ab"])
    assert {p.name for p in tmp_path.iterdir()} == {"out", *kept}
    assert (out / "keep.txt").read_text() == "mine"
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("graft: note: removed ") and str(gone) in line for line in err)


def test_old_output_is_restored_when_a_kill_came_between_the_renames(tmp_path, capsys):
    from graftkit.outputs import _host_tag

    gone, h = dead_pid(), _host_tag()
    aside = tmp_path / f".out.old-{gone}-{h}0123"
    aside.mkdir()
    (aside / "model.safetensors").write_bytes(b"the old output")
    (tmp_path / f".out.tmp-{gone}-{h}4567").mkdir()  # the new one, maybe complete, maybe not
    clean_stale(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"the old output"
    assert "restored" in capsys.readouterr().err


@pytest.mark.parametrize("where, how", [("same", "is"), ("inside", "lies inside"), ("parent", "contains"), ("link", "is")])
def test_output_overlapping_an_input_is_refused(tmp_path, where, how):
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "link").symlink_to(model)
    out = {"same": model, "inside": model / "sub", "parent": tmp_path / "models", "link": tmp_path / "link"}[where]
    before = snap(tmp_path)
    with pytest.raises(ConfigError) as ei:
        check_output(out, [("model", "not-a-path-alias"), ("model", model)])
    msg = str(ei.value)
    assert "\n" not in msg and f"output {out} {how} the model {model}" in msg
    assert snap(tmp_path) == before
    check_output(tmp_path / "elsewhere", [("model", model)])  # a sibling is fine


def test_hard_link_to_an_input_is_the_input(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a", "label": "x"}\n')
    os.link(data, tmp_path / "copy.jsonl")
    with pytest.raises(ConfigError, match="is the training data"):
        check_output(tmp_path / "copy.jsonl", [("training data", data)])


# -- inputs the output would destroy, per command ----------------------------------------------------

@pytest.fixture(autouse=True)
def _no_transformers_bars():
    """The CLI turns transformers' bars off before it imports transformers; in this process it
    is imported already, and its bars would be extra stderr lines."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    yield
    transformers.utils.logging.enable_progress_bar()


def cli(capsys, *args) -> tuple[int, list[str]]:
    """``graft ARGS`` in this process (a subprocess would spend seconds importing torch per case)."""
    capsys.readouterr()  # what the set-up printed (transformers' save bars) is not this command's
    code = main([str(a) for a in args])
    return code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def cli_fails(capsys, root: Path, *args, needles=()) -> str:
    """``graft ARGS`` exits 2 with exactly one ``graft: error:`` line, and no byte under ``root`` changes."""
    before = snap(root)
    code, err = cli(capsys, *args)
    assert code == 2 and len(err) == 1 and err[0].startswith("graft: error: "), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    assert snap(root) == before and leftovers(root) == []
    return err[0]


def refused(capsys, root: Path, *args, needles=()) -> None:
    """Refused as an output that would destroy an input, naming both paths."""
    line = cli_fails(capsys, root, *args, needles=("destroy what the run reads", *needles))
    assert line.startswith("graft: error: output ")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return make_models(tmp_path_factory.mktemp("outputs_models"), n=2)


def merge_yaml(path: Path, models: dict[str, Path], **extra) -> Path:
    cfg = {"merge_method": "task_arithmetic", "base_model": str(models["base"]),
           "models": [{"model": str(models[f"ft{i}"]), "parameters": {"weight": 0.5}} for i in range(2)], **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_merge_output_overlapping_an_input_is_refused(models, tmp_path, capsys):
    root = models["base"].parent
    cfg = merge_yaml(tmp_path / "m.yml", models)
    refused(capsys, root, "merge", cfg, models["ft0"], "--overwrite", needles=(f"is the model {models['ft0']}",))
    refused(capsys, root, "merge", cfg, root, "--overwrite", needles=("contains the base_model",))
    refused(capsys, root, "merge", cfg, models["base"] / "merged", "--overwrite", needles=("lies inside the base_model",))
    (tmp_path / "link").symlink_to(models["ft1"])
    refused(capsys, root, "merge", cfg, tmp_path / "link", "--overwrite", needles=(str(models["ft1"]),))
    tok = merge_yaml(tmp_path / "t.yml", models, tokenizer_source=str(tmp_path / "tok"))
    (tmp_path / "tok").mkdir()
    refused(capsys, tmp_path, "merge", tok, tmp_path, "--overwrite", needles=("contains the merge config",))


@pytest.fixture
def adapter_and_base(tmp_path) -> tuple[Path, Path]:
    model = gk.inject(tiny_llama(0), gk.LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for p in gk.trainable_parameters(model):
            p.add_(0.1)
    tiny_llama(0).save_pretrained(tmp_path / "base")
    return gk.save_adapter(model, tmp_path / "adapter"), tmp_path / "base"


def test_export_and_import_output_overlapping_an_input_is_refused(adapter_and_base, tmp_path, capsys):
    adapter, base = adapter_and_base
    for flag in ("--merged", "--peft", "--native"):
        refused(capsys, tmp_path, "export", adapter, "--base", base, flag, adapter, "--overwrite", needles=("is the adapter",))
    refused(capsys, tmp_path, "export", adapter, "--base", base, "--merged", base, "--overwrite", needles=("is the base",))
    refused(capsys, tmp_path, "export", adapter, "--base", base, "--native", tmp_path, "--overwrite", needles=("contains the adapter",))
    peft_dir = gk.save_adapter(gk.load_adapter(tiny_llama(0), adapter), tmp_path / "peft", format="peft")
    refused(capsys, tmp_path, "import-peft", peft_dir, peft_dir, "--overwrite", needles=("is the peft adapter",))
    refused(capsys, tmp_path, "import-peft", peft_dir, peft_dir / "native", "--overwrite", needles=("lies inside the peft adapter",))
    refused(capsys, tmp_path, "import-peft", peft_dir, base, "--base", base, "--overwrite", needles=("is the base",))
    refused(capsys, tmp_path, "import-peft", peft_dir, tmp_path, "--overwrite", needles=("contains the peft adapter",))


def test_train_output_overlapping_an_input_is_refused(assets, tmp_path, capsys):  # noqa: F811
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_bytes((assets / "cls_train.jsonl").read_bytes())
    for out, needle in [(data, "contains the training data"), (data / "train.jsonl", "is the training data"),
                        (assets / "bert", "is the model"), (assets / "bert" / "run", "lies inside the model")]:
        r = cls_recipe(assets, out)
        r["data"]["train"] = str(data / "train.jsonl")
        f = _recipe_file(tmp_path / "r.yaml", r)
        before = snap(assets)
        refused(capsys, tmp_path, "train", f, "--overwrite", "--no-progress", needles=(needle, str(out)))
        assert snap(assets) == before


@pytest.fixture(scope="module")
def tok():
    return gk.load_tokenizer("minilm")


def eval_setup(root: Path, tok, name="m") -> Path:
    from eval_helpers import bert, cls_file, save

    save(bert(tok, bias=[0.0, 2.0, 0.0]), tok, root / "models" / name)
    (root / "data").mkdir(exist_ok=True)
    cfg = {"models": [{"name": name, "path": str(root / "models" / name)}],
           "tasks": [{"name": "topic", "kind": "classification", "file": cls_file(root / "data")}]}
    (root / "eval.yaml").write_text(yaml.safe_dump(cfg))
    return root / "eval.yaml"


def test_eval_output_overlapping_an_input_is_refused(tmp_path, tok, capsys):
    cfg = eval_setup(tmp_path, tok)
    refused(capsys, tmp_path, "eval", cfg, "--out", tmp_path / "models", "--overwrite", needles=("is the model 'm'",))
    refused(capsys, tmp_path, "eval", cfg, "--out", tmp_path / "models" / "m", "--overwrite", needles=("lies inside the model 'm'",))
    refused(capsys, tmp_path, "eval", cfg, "--out", tmp_path / "data", "--overwrite", needles=("contains the file of task 'topic'",))
    # OUT/<model> is what --overwrite replaces: here it would be the task file's folder
    data_cfg = yaml.safe_load(cfg.read_text())
    data_cfg["models"][0]["name"] = "data"
    (tmp_path / "e2.yaml").write_text(yaml.safe_dump(data_cfg))
    refused(capsys, tmp_path, "eval", tmp_path / "e2.yaml", "--out", tmp_path, "--overwrite", needles=("contains the file of task 'topic'",))


# -- a failed --overwrite keeps the old output, per command ------------------------------------------

def test_failed_merge_overwrite_keeps_the_old_output(models, tmp_path, capsys):
    cfg = merge_yaml(tmp_path / "m.yml", models)
    out = tmp_path / "out"
    assert cli(capsys, "merge", cfg, out)[0] == 0
    nan = tmp_path / "nan"
    nan.mkdir()
    for f in models["ft1"].iterdir():
        (nan / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(nan / "model.safetensors"))
    key = sorted(weights)[-1]  # late in the merge: the new output is half written when it fails
    weights[key][0] = float("nan")
    save_file(weights, str(nan / "model.safetensors"), metadata={"format": "pt"})
    bad = merge_yaml(tmp_path / "bad.yml", {**models, "ft1": nan})
    cli_fails(capsys, tmp_path, "merge", bad, out, "--overwrite", needles=("nan",))


def full_disk(monkeypatch) -> None:
    """Every safetensors write fails after writing part of its file (graftkit's and transformers')."""
    import safetensors.torch
    import transformers.modeling_utils

    def full(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)


@pytest.mark.parametrize("flag", ["--merged", "--peft", "--native"])
def test_failed_export_overwrite_keeps_the_old_output(adapter_and_base, tmp_path, capsys, monkeypatch, flag):
    adapter, base = adapter_and_base
    out = tmp_path / "out"
    assert cli(capsys, "export", adapter, "--base", base, flag, out)[0] == 0
    before = snap(tmp_path)
    full_disk(monkeypatch)
    code, err = cli(capsys, "export", adapter, "--base", base, flag, out, "--overwrite")
    assert code != 0 and len(err) == 1 and "No space left" in err[0], err
    assert snap(tmp_path) == before and leftovers(tmp_path) == []


def test_failed_import_peft_overwrite_keeps_the_old_output(adapter_and_base, tmp_path, capsys, monkeypatch):
    adapter, _ = adapter_and_base
    peft_dir = gk.save_adapter(gk.load_adapter(tiny_llama(0), adapter), tmp_path / "peft", format="peft")
    out = tmp_path / "native"
    assert cli(capsys, "import-peft", peft_dir, out)[0] == 0
    before = snap(tmp_path)
    with monkeypatch.context() as m:
        full_disk(m)
        code, err = cli(capsys, "import-peft", peft_dir, out, "--overwrite")
        assert code != 0 and len(err) == 1 and "No space left" in err[0], err
    assert snap(tmp_path) == before and leftovers(tmp_path) == []
    assert cli(capsys, "import-peft", peft_dir, out, "--overwrite")[0] == 0  # a working overwrite replaces it
    assert leftovers(tmp_path) == []


def test_overwrite_onto_a_file_from_the_cli_leaves_no_hidden_file(models, adapter_and_base, tmp_path, capsys):
    adapter, _ = adapter_and_base
    peft_dir = gk.save_adapter(gk.load_adapter(tiny_llama(0), adapter), tmp_path / "peft", format="peft")
    for args in (("merge", merge_yaml(tmp_path / "m.yml", models)), ("import-peft", peft_dir)):
        target = tmp_path / f"{args[0]}.out"
        target.write_text("a file in the way")
        before = {p.name for p in tmp_path.iterdir()}
        assert cli(capsys, *args, target, "--overwrite")[0] == 0
        assert target.is_dir() and {p.name for p in tmp_path.iterdir()} == before


def test_failed_eval_overwrite_keeps_the_old_results(tmp_path, tok, capsys):
    cfg = eval_setup(tmp_path, tok)
    assert cli(capsys, "eval", cfg, "--out", tmp_path / "out", "--no-progress")[0] == 0
    before = snap(tmp_path / "out")  # OUT/m and summary.json
    # the model's weights break: the rerun fails for that model, and its old results stay
    weights = tmp_path / "models" / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code, err = cli(capsys, "eval", cfg, "--out", tmp_path / "out", "--overwrite", "--no-progress")
    assert code == 2 and len(err) == 1 and "model 'm' failed" in err[0], err
    assert snap(tmp_path / "out") == before and leftovers(tmp_path) == []
    # every model failed in a fresh folder: nothing is written at all
    code, err = cli(capsys, "eval", cfg, "--out", tmp_path / "fresh", "--no-progress")
    assert code == 2 and len(err) == 1 and not (tmp_path / "fresh").exists(), err


def train_recipe(assets: Path, out: Path, tmp_path: Path, **over) -> Path:  # noqa: F811
    r = cls_recipe(assets, out, eval={"every": None}, **over)
    return _recipe_file(tmp_path / f"r{len(list(tmp_path.glob('r*.yaml')))}.yaml", r)


def test_failed_train_overwrite_keeps_the_old_run(assets, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    good = train_recipe(assets, out, tmp_path, optim={"max_steps": 2})
    assert cli(capsys, "train", good, "--no-progress")[0] == 0
    nan = train_recipe(assets, out, tmp_path, optim={"lr": 1e30, "max_grad_norm": None, "max_steps": 4},
                       output={"checkpoint_every": 1})
    cli_fails(capsys, tmp_path, "train", nan, "--overwrite", "--no-progress",
              needles=("loss became", f"{out} still holds the previous run"))


# -- SIGKILL ----------------------------------------------------------------------------------------

# each tensor takes 0.1 s to finish, and the first finished one creates a file the test waits for
SLOW_MERGE = ("import os, time, graftkit.merge.write as w\n"
              "real = w.ShardWriter.finish\n"
              "def slow(self, key):\n"
              "    open(os.environ['GRAFT_TEST_SIGNAL'], 'a').close()\n"
              "    time.sleep(0.1)\n"
              "    real(self, key)\n"
              "w.ShardWriter.finish = slow")


def weight_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", ".json") and p.name != "graft_provenance.json"}


@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_sigkill_mid_merge_then_rerun(models, tmp_path, capsys, existing):
    cfg = merge_yaml(tmp_path / "m.yml", models)
    reference = tmp_path / "reference"
    assert cli(capsys, "merge", cfg, reference, "--threads", "1")[0] == 0
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "old.txt").write_text("the previous output")
    before = snap(out) if existing else None
    signal_file = tmp_path / "started"
    cmd = [sys.executable, "-c", f"{SLOW_MERGE}\nimport sys\nfrom graftkit.cli import main\nsys.exit(main())",
           "merge", str(cfg), str(out), "--threads", "1", *(["--overwrite"] if existing else [])]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env={**CLI_ENV, "GRAFT_TEST_SIGNAL": str(signal_file)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not signal_file.exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the merge ended before the kill"
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(stale) == 1 and list(stale[0].glob("*.safetensors")), "the kill should land while the merge writes"
    if existing:
        assert snap(out) == before  # the previous output is intact
    else:
        assert not out.exists()  # nothing that looks complete
    code, err = cli(capsys, "merge", cfg, out, "--threads", "1", *(["--overwrite"] if existing else []))
    assert code == 0, err
    assert len(err) == 1 and err[0].startswith("graft: note: removed") and stale[0].name in err[0], err
    assert leftovers(tmp_path) == []
    assert weight_bytes(out) == weight_bytes(reference) and not (out / "old.txt").exists()


def test_sigkill_mid_overwrite_training_keeps_the_old_run(assets, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    old = train_recipe(assets, out, tmp_path, optim={"max_steps": 2})
    assert cli(capsys, "train", old, "--no-progress")[0] == 0
    before = snap(out)
    new = train_recipe(assets, out, tmp_path, optim={"lr": 1e-3, "max_steps": 12}, output={"checkpoint_every": 2})
    proc = subprocess.Popen([sys.executable, "-m", "graftkit.cli", "train", str(new), "--overwrite", "--no-progress"], cwd=tmp_path,
                            env={**CLI_ENV, "GRAFT_TEST_STEP_SLEEP": "0.2"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    staged = []
    while time.time() < deadline and proc.poll() is None:
        staged = [p for p in tmp_path.iterdir() if p.name.startswith(".run.tmp-")]
        if staged and list((staged[0] / "checkpoints").glob("step-*")):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    assert staged and (staged[0] / "run.json").exists()  # the new run was under way, beside the old one
    assert snap(out) == before
    code, err = cli(capsys, "train", new, "--overwrite", "--no-progress")
    assert code == 0, err
    assert len(err) == 1 and err[0].startswith("graft: note: removed") and staged[0].name in err[0], err
    assert leftovers(tmp_path) == []
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "done" and run["recipe"]["optim"]["lr"] == 1e-3
    assert run["summary"]["outputs"]["adapter"] == str(out / "adapter") and (out / "adapter" / "adapter.safetensors").exists()


def test_study_folder_overlapping_an_input_is_refused(tmp_path, capsys):
    from test_study import study_recipe

    base = tmp_path / "base"
    tiny_llama(0).save_pretrained(base)  # only its path matters: the check comes before anything loads
    for out, needles in [(tmp_path / "data", ("contains the", "file of study task 'topic'")),
                         (base / "study", ("lies inside the base model",)), (base, ("is the base model",))]:
        recipe = study_recipe(tmp_path, base, output=str(out))
        path = tmp_path / "study.yaml"
        path.write_text(yaml.safe_dump(recipe))
        refused(capsys, tmp_path, "study", path, "--no-progress", needles=needles)


def test_two_process_overwrite_replaces_the_run(assets, tmp_path, capsys):  # noqa: F811
    """Under torchrun every process must write into the same staging folder (process 0 names it)."""
    out = tmp_path / "run"
    assert cli(capsys, "train", train_recipe(assets, out, tmp_path, optim={"max_steps": 2}), "--no-progress")[0] == 0
    new = train_recipe(assets, out, tmp_path, optim={"batch_size": 2, "max_steps": 4}, output={"checkpoint_every": 2})
    port = str(29500 + (os.getpid() + 501) % 1000)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                          "-m", "graftkit.cli", "train", str(new), "--overwrite", "--no-progress"], cwd=tmp_path, env=CLI_ENV,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "done" and run["processes"] == 2 and run["summary"]["steps"] == 4
    assert (out / "checkpoints" / "step-000002").is_dir() and (out / "adapter").is_dir()
    assert leftovers(tmp_path) == []
