"""``graft train --resume`` checks what the checkpoint was made from, and run.json tells the truth.

* a changed data file, label set or base model is a one-line refusal naming what changed;
* a killed run's run.json reads "interrupted" on the next look; a live one keeps others out;
* a failed run (disk full while checkpointing, Ctrl-C) records why, and the CLI says it in one line.

Tiny BERT classification runs (see test_train.py's ``assets``), 4 steps each.
"""
from __future__ import annotations

import errno
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from test_train import ENV, GRAFT, _recipe_file, _rows, assets, assert_one_line_error, cls_recipe, snapshot, write_jsonl  # noqa: F401

from graftkit.cli import main as graft_main
from graftkit.train import parse_recipe, train
from graftkit.train.runstate import owner, read_run


def small(assets: Path, tmp: Path, **over) -> dict:
    """24 training rows, 4 steps of 4, a checkpoint every 2 steps."""
    data = {"train": str(write_jsonl(tmp / "train.jsonl", _rows(24, 7))), "validation": None, **over.pop("data", {})}
    optim = {"max_steps": 4, "epochs": 1, **over.pop("optim", {})}
    return cls_recipe(assets, tmp / "out", data=data, optim=optim, eval={"every": None}, output={"checkpoint_every": 2}, **over)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = graft_main([*map(str, args)])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture
def trained(assets, tmp_path) -> tuple[Path, dict]:
    """A finished run with checkpoints at steps 2 (and the recipe file that made it)."""
    r = small(assets, tmp_path)
    train(parse_recipe(r), progress=False)
    return _recipe_file(tmp_path / "r.yaml", r), r


# -- resume checks its inputs -----------------------------------------------------------------------

def test_resume_refuses_a_cut_data_file(trained, tmp_path, capsys):
    f, r = trained
    out = Path(r["output"]["dir"])
    rows = [json.loads(x) for x in Path(r["data"]["train"]).read_text().splitlines()]
    write_jsonl(Path(r["data"]["train"]), rows[:6])
    before = snapshot(out)
    code, _, err = run_cli(capsys, "train", f, "--resume", "--no-progress")
    assert_one_line_error(code, err, "cannot resume", f"data file {r['data']['train']} (data.train) changed", "24 -> 6 examples",
                          "restore the file", "--overwrite")
    assert snapshot(out) == before


def test_resume_refuses_an_added_label_by_name(trained, capsys):
    f, r = trained
    out = Path(r["output"]["dir"])
    with open(r["data"]["train"], "a") as fh:
        fh.write(json.dumps({"text": "so so meh", "label": "neutral"}) + "\n")
    before = snapshot(out)
    code, _, err = run_cli(capsys, "train", f, "--resume", "--no-progress")
    assert_one_line_error(code, err, "cannot resume", "labels changed: added 'neutral'", "were neg, pos; now neg, neutral, pos",
                          "train.jsonl")
    assert "shape" not in err
    assert snapshot(out) == before


def test_resume_refuses_a_changed_base_model(assets, tmp_path, capsys):
    model_dir = tmp_path / "base"
    base = transformers.AutoModel.from_pretrained(assets / "bert")
    base.save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (assets / "bert" / name).exists():
            (model_dir / name).write_bytes((assets / "bert" / name).read_bytes())
    r = small(assets, tmp_path, model=str(model_dir))
    train(parse_recipe(r), progress=False)
    with torch.no_grad():  # the same architecture, other weights: another pretrained model of one family
        for p in base.parameters():
            p.add_(0.01)
    base.save_pretrained(model_dir)
    out = Path(r["output"]["dir"])
    before = snapshot(out)
    code, _, err = run_cli(capsys, "train", _recipe_file(tmp_path / "r.yaml", r), "--resume", "--no-progress")
    assert_one_line_error(code, err, "cannot resume", f"the base model {model_dir} changed", "the weights of", "restore it")
    assert snapshot(out) == before


def test_resume_with_unchanged_inputs_continues(trained, capsys):
    f, r = trained
    code, out, err = run_cli(capsys, "train", f, "--resume", "--no-progress")
    assert code == 0, err
    assert "resuming from" in out and "step-000002" in out
    run = json.loads((Path(r["output"]["dir"]) / "run.json").read_text())
    assert run["status"] == "done" and run["inputs"]["labels"] == ["neg", "pos"]
    assert run["inputs"]["data"]["train"]["examples"] == 24 and len(run["inputs"]["data"]["train"]["sha256"]) == 64
    state = json.loads((Path(r["output"]["dir"]) / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["inputs"] == run["inputs"] and state["run_fingerprint"] == run["run_fingerprint"]


def test_checkpoint_without_recorded_inputs_resumes_with_a_warning(trained, capsys):
    """Checkpoints written before the hashes existed: resumed, with a warning that nothing was checked."""
    f, r = trained
    state_file = Path(r["output"]["dir"]) / "checkpoints" / "step-000002" / "state.json"
    state = json.loads(state_file.read_text())
    del state["inputs"], state["run_fingerprint"]
    state_file.write_text(json.dumps(state))
    code, out, err = run_cli(capsys, "train", f, "--resume", "--no-progress")
    assert code == 0, err
    assert "records no hashes of its data and base model" in out and "resuming from" in out


# -- run.json: running, interrupted, failed -----------------------------------------------------------

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _running_record(out: Path, **who) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({"status": "running", "owner": {**owner(), **who}}))


@pytest.mark.parametrize("who, status", [
    ({}, "running"),  # this very process: alive
    ({"pid": None}, "running"),  # no usable pid: cannot tell, left as recorded
    ({"host": "elsewhere.example"}, "running"),  # another machine: cannot tell from here
    ("dead", "interrupted"),
    ({"proc_start": -1}, "interrupted"),  # the pid lives, but it is another process now
    ({"boot_id": "0000-old-boot"}, "interrupted"),
])
def test_read_run_reports_a_gone_process_as_interrupted(tmp_path, who, status):
    if who == "dead":
        who = {"pid": _dead_pid()}
    if "boot_id" in who and not Path("/proc/sys/kernel/random/boot_id").exists():
        pytest.skip("no boot id on this system")
    _running_record(tmp_path, **who)
    rec = read_run(tmp_path)
    assert rec["status"] == status
    assert ("interrupted" in rec) == (status == "interrupted")
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "running"  # reading changes nothing


def test_killed_run_reads_interrupted_and_a_live_one_keeps_others_out(assets, tmp_path, capsys):
    r = small(assets, tmp_path, optim={"max_steps": 10_000})
    f = _recipe_file(tmp_path / "r.yaml", r)
    out = Path(r["output"]["dir"])
    proc = subprocess.Popen([*GRAFT, "train", str(f), "--no-progress"], env={**ENV, "GRAFT_TEST_STEP_SLEEP": "0.2"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "checkpoints" / "step-000002").exists() and proc.poll() is None:
            time.sleep(0.05)
        assert read_run(out)["status"] == "running"
        # a second run onto the folder of a live one is refused, even with --overwrite
        code, _, err = run_cli(capsys, "train", f, "--overwrite", "--no-progress")
        assert_one_line_error(code, err, "is in use", f"process {proc.pid} on {socket.gethostname()}")
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    rec = read_run(out)
    assert rec["status"] == "interrupted" and f"process {proc.pid}" in rec["interrupted"]
    code, shown, err = run_cli(capsys, "inspect", out)
    assert code == 0, err
    assert "interrupted (its process" in shown and "step-000002" in shown
    code, _, err = run_cli(capsys, "train", f, "--no-progress")
    assert_one_line_error(code, err, "already holds a training run (interrupted); pass --resume")


def test_disk_full_while_checkpointing_is_one_line_and_recorded(assets, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def full(tensors, filename, *a, **k):
        if filename.endswith("optimizer.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    r = small(assets, tmp_path)
    out = Path(r["output"]["dir"])
    code, _, err = run_cli(capsys, "train", _recipe_file(tmp_path / "r.yaml", r), "--no-progress")
    want = f"no space left on device while writing {out / 'checkpoints' / 'step-000002' / 'optimizer.safetensors'}; free space or choose another output.dir"
    assert_one_line_error(code, err, want)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and run["error"] == want
    assert not list((out / "checkpoints").iterdir())  # the half-written checkpoint is gone
    assert not (out / "adapter").exists()


def test_disk_full_reported_by_safetensors_itself(assets, tmp_path, capsys, monkeypatch):
    """safetensors writes from Rust and reports a full disk in its own error type."""
    import safetensors
    import safetensors.torch

    def full(tensors, filename, *a, **k):
        raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    r = small(assets, tmp_path)
    out = Path(r["output"]["dir"])
    code, _, err = run_cli(capsys, "train", _recipe_file(tmp_path / "r.yaml", r), "--no-progress")
    assert_one_line_error(code, err, f"no space left on device while writing {out / 'checkpoints' / 'step-000002' / 'trainable.safetensors'}")
    assert read_run(out)["status"] == "failed"


def test_ctrl_c_records_interrupted(assets, tmp_path, monkeypatch):
    from graftkit.train import loop

    calls = []

    def stop(self, step):
        calls.append(step)
        if step == 3:
            raise KeyboardInterrupt
        return real(self, step)

    real = loop.Run.train_step
    monkeypatch.setattr(loop.Run, "train_step", stop)
    r = small(assets, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train(parse_recipe(r), progress=False)
    rec = read_run(Path(r["output"]["dir"]))
    assert rec["status"] == "interrupted" and "Ctrl-C" in rec["error"]


def test_failed_run_in_this_process_does_not_block_the_next(assets, tmp_path, monkeypatch):
    """A run.json left "running" by an earlier run of this same process (its record could not be
    written) is not taken for a live run: the process is this one, and it is not training."""
    r = small(assets, tmp_path)
    out = Path(r["output"]["dir"])
    _running_record(out)
    with pytest.raises(Exception, match="already holds a training run \\(running\\)"):
        train(parse_recipe(r), progress=False)
    assert train(parse_recipe(r), overwrite=True, progress=False)["steps"] == 4
    assert read_run(out)["status"] == "done" and read_run(out)["owner"]["host"] == socket.gethostname()


def test_nan_loss_records_the_one_line_reason(assets, tmp_path, capsys):
    r = small(assets, tmp_path, optim={"lr": 1e30, "max_grad_norm": None, "max_steps": 12})
    code, _, err = run_cli(capsys, "train", _recipe_file(tmp_path / "r.yaml", r), "--no-progress")
    assert_one_line_error(code, err, "loss became")
    rec = read_run(Path(r["output"]["dir"]))
    assert rec["status"] == "failed" and err.strip() == f"graft: error: {rec['error']}"


def test_folder_of_other_files_does_not_suggest_resume(assets, tmp_path, capsys):
    """--resume cannot continue what is not a run, so the refusal must not offer it."""
    r = small(assets, tmp_path)
    out = Path(r["output"]["dir"])
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "train", _recipe_file(tmp_path / "r.yaml", r), "--no-progress")
    assert_one_line_error(code, err, "not a graftkit training run", "--overwrite")
    assert "--resume" not in err and (out / "notes.txt").read_text() == "mine"
