"""``graft train``: recipes, data, loop, outputs, checkpoints, exact resume, 2 processes, bad input.

Tiny BERT / Llama models built in code with the packaged MiniLM tokenizer (real, local), saved
to tmp folders; toy data written as JSONL / CSV / Parquet.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
import yaml

import graftkit as gk
from graftkit.cli import main as graft_main
from graftkit.errors import TrainingError
from graftkit.tensors import read_safetensors
from graftkit.train import load_recipe, parse_recipe, train
from graftkit.train.data import IGNORE, prepare

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
CHAT_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} [SEP] {% endfor %}"
                 "{% if add_generation_prompt %}[assistant] {% endif %}")
WORDS = {"pos": "good great fine happy nice lovely".split(), "neg": "bad awful sad poor ugly grim".split()}


def _rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        y = rng.choice(["pos", "neg"])
        out.append({"text": " ".join(rng.choice(WORDS[y]) for _ in range(6)), "label": y})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A tiny BERT (no dropout) and a tiny Llama with the MiniLM tokenizer, plus toy data."""
    root = tmp_path_factory.mktemp("train_assets")
    tok = gk.load_tokenizer("minilm")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    transformers.BertModel(cfg).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "llama")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(root / "llama")
    write_jsonl(root / "cls_train.jsonl", _rows(48, 0))
    write_jsonl(root / "cls_val.jsonl", _rows(16, 1))
    rng = random.Random(2)
    chat = []
    for _ in range(48):
        w = rng.choice(WORDS["pos"] + WORDS["neg"])
        chat.append({"prompt": f"repeat {w}", "response": f"{w} {w}", "answer": w, "task": rng.choice(["a", "b", "b", "b"])})
    write_jsonl(root / "chat.jsonl", chat)
    write_jsonl(root / "text.jsonl", [{"text": " ".join(r["text"] for r in _rows(4, i))} for i in range(24)])
    return root


def cls_recipe(assets: Path, out: Path, **over) -> dict:
    r = {"model": str(assets / "bert"), "task": "classification",
         "data": {"train": str(assets / "cls_train.jsonl"), "validation": str(assets / "cls_val.jsonl"), "max_length": 16},
         "method": {"method": "full"}, "optim": {"lr": 3e-3, "batch_size": 4, "epochs": 3, "warmup_steps": 2},
         "eval": {"every": 6}, "output": {"dir": str(out)}}
    for k, v in over.items():
        r[k] = {**r[k], **v} if isinstance(v, dict) and isinstance(r.get(k), dict) and k != "method" else v
    return r


def chat_recipe(assets: Path, out: Path, **over) -> dict:
    r = {"model": str(assets / "llama"), "task": "causal-lm",
         "data": {"train": str(assets / "chat.jsonl"), "validation": str(assets / "chat.jsonl"), "prompt_field": "prompt",
                  "response_field": "response", "max_length": 32},
         "method": {"method": "lora", "r": 4, "lora_alpha": 8, "targets": ["q_proj", "v_proj", "up_proj", "down_proj"],
                    "train_also": ["lm_head"]},
         "optim": {"lr": 1e-2, "batch_size": 8, "epochs": 3}, "eval": {"every": 6, "limit": 16}, "output": {"dir": str(out)}}
    for k, v in over.items():
        r[k] = {**r[k], **v} if isinstance(v, dict) and isinstance(r.get(k), dict) and k != "method" else v
    return r


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# -- training works -----------------------------------------------------------------------------

def test_classification_full_finetune_learns_and_saves(assets, tmp_path):
    out = tmp_path / "run"
    summary = train(parse_recipe(cls_recipe(assets, out, output={"export": ["merged"]})), progress=False)
    ls = losses(out)
    assert len(ls) == 36 and sum(ls[-4:]) / 4 < 0.75 * sum(ls[:4]) / 4
    assert summary["val_accuracy"] >= 0.9
    assert {p.name for p in out.iterdir()} >= {"adapter", "merged", "metrics.jsonl", "run.json", "recipe.yaml"}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    assert json.loads((out / "run.json").read_text())["status"] == "done"
    # the adapter (with its new head) loads onto a fresh base and reproduces the validation accuracy
    model = gk.load_model(assets / "bert", head="classification", num_labels=2)
    gk.load_adapter(model, out / "adapter")
    tok = gk.load_tokenizer(assets / "bert")
    rows = [json.loads(x) for x in (assets / "cls_val.jsonl").read_text().splitlines()]
    enc = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        pred = model.eval()(**enc).logits.argmax(-1)
    labels = json.loads((out / "adapter" / "adapter.json").read_text())["base_model"]["id2label"]
    acc = sum(labels[str(int(p))] == r["label"] for p, r in zip(pred, rows)) / len(rows)
    assert acc == pytest.approx(summary["val_accuracy"])
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(merged(**enc).logits, model(**enc).logits, atol=1e-5)


def test_chat_sft_masks_prompt_and_lora_learns(assets, tmp_path):
    recipe = parse_recipe(chat_recipe(assets, tmp_path / "run", output={"export": ["peft"]}, optim={"epochs": 6}))
    tok = gk.load_tokenizer(assets / "llama")
    data = prepare(recipe, tok, 64)
    ex = data.train[0]
    head = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok(tok.apply_chat_template([{"role": "user", "content": json.loads((assets / "chat.jsonl").read_text().splitlines()[0])["prompt"]}],
                                               tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"])
    assert head.endswith("[assistant] ")
    assert ex["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:] and len(ex["labels"]) > n_prompt
    assert tok.decode(ex["input_ids"][n_prompt:]).split()[:2] == json.loads((assets / "chat.jsonl").read_text().splitlines()[0])["response"].split()
    summary = train(recipe, progress=False)
    ls = losses(tmp_path / "run")
    assert sum(ls[-3:]) / 3 < 0.6 * sum(ls[:3]) / 3
    assert summary["val_token_accuracy"] > 0.2  # chance is 1 / 30,522
    assert (tmp_path / "run" / "adapter-peft" / "adapter_config.json").exists()
    model = gk.load_model(assets / "llama")
    gk.load_adapter(model, tmp_path / "run" / "adapter")
    assert gk.get_state(model).method == "lora"


def test_plain_text_packing_blocks(assets, tmp_path):
    r = parse_recipe(chat_recipe(assets, tmp_path / "run", data={"train": str(assets / "text.jsonl"), "validation": None,
                                                                  "prompt_field": None, "response_field": None, "max_length": 16},
                                 optim={"max_steps": 3, "batch_size": 2}))
    tok = gk.load_tokenizer(assets / "llama")
    data = prepare(r, tok, 64)
    stream = []
    for row in (assets / "text.jsonl").read_text().splitlines():
        stream += tok(json.loads(row)["text"], add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    assert all(len(b["input_ids"]) == 16 for b in data.train) and len(data.train) == len(stream) // 16
    assert [t for b in data.train for t in b["input_ids"]] == stream[: 16 * len(data.train)]
    assert train(r, progress=False)["steps"] == 3


def test_csv_and_parquet_inputs(assets, tmp_path):
    import pandas as pd

    rows = [json.loads(x) for x in (assets / "cls_train.jsonl").read_text().splitlines()]
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "t.parquet")
    tok = gk.load_tokenizer(assets / "bert")
    got = []
    for name in ("t.csv", "t.parquet"):
        r = parse_recipe(cls_recipe(assets, tmp_path / "o", data={"train": str(tmp_path / name), "validation": None}))
        got.append(prepare(r, tok, 64).train)
    assert got[0] == got[1] and len(got[0]) == 48


def test_bf16_and_gradient_checkpointing_run(assets, tmp_path):
    r = chat_recipe(assets, tmp_path / "run", optim={"max_steps": 4, "precision": "bf16", "gradient_checkpointing": True},
                    eval={"every": None})
    s = train(parse_recipe(r), progress=False)
    assert s["steps"] == 4 and all(map(lambda x: x == x, losses(tmp_path / "run")))


# -- checkpoints and exact resume ---------------------------------------------------------------

GRAFT = [sys.executable, "-m", "graftkit.cli"]


def _recipe_file(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_kill_and_resume_is_bitwise_identical(assets, tmp_path):
    """Kill a real training process after its second checkpoint, resume, compare with an uninterrupted run."""
    base = chat_recipe(assets, tmp_path / "x", method={"method": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
                                                       "targets": ["q_proj", "v_proj"]},
                       optim={"epochs": 6, "batch_size": 4, "grad_accum": 2, "schedule": "cosine", "warmup_steps": 3, "weight_decay": 0.01},
                       eval={"every": 12}, output={"checkpoint_every": 4})
    full = {**base, "output": {**base["output"], "dir": str(tmp_path / "full")}}
    killed = {**base, "output": {**base["output"], "dir": str(tmp_path / "killed")}}
    train(parse_recipe(full), progress=False)

    f = _recipe_file(tmp_path / "killed.yaml", killed)
    # slow the killed run down a little per step so the kill lands mid-run, after a checkpoint
    env = {**ENV, "GRAFT_TEST_STEP_SLEEP": "0.15"}
    proc = subprocess.Popen([*GRAFT, "train", str(f), "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpts.exists() and len([p for p in ckpts.iterdir() if p.name.startswith("step-")]) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "adapter").exists()
    res = subprocess.run([*GRAFT, "train", str(f), "--resume", "--no-progress"], env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "resuming from" in res.stdout
    assert_same_run(tmp_path / "full", tmp_path / "killed")


def assert_same_run(a_dir: Path, b_dir: Path) -> list[dict]:
    """The two runs saved bitwise-equal adapters and logged the same metrics (timings aside)."""
    a = read_safetensors(a_dir / "adapter" / "adapter.safetensors")
    b = read_safetensors(b_dir / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda path: [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in path.read_text().splitlines()]  # noqa: E731
    ma, mb = strip(a_dir / "metrics.jsonl"), strip(b_dir / "metrics.jsonl")
    assert ma == mb
    return ma


def test_nan_loss_stops_and_keeps_last_checkpoint(assets, tmp_path):
    r = parse_recipe(cls_recipe(assets, tmp_path / "run", optim={"lr": 1e30, "max_grad_norm": None, "epochs": 4},
                                output={"checkpoint_every": 1}))
    with pytest.raises(TrainingError, match=r"loss became (nan|inf).*last good checkpoint is .*step-"):
        train(r, progress=False)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "failed"
    assert not (tmp_path / "run" / "adapter").exists()
    last = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    assert all(torch.isfinite(t).all() for t in read_safetensors(last / "trainable.safetensors").values())


# -- two processes ------------------------------------------------------------------------------

def test_two_processes_match_one(assets, tmp_path):
    """torchrun with 2 CPU processes (DDP over gloo), batch 2 each, vs 1 process with batch 4:
    the same global batches, so the loss curves agree to float32 reduction-order noise (< 1e-4)."""
    r1 = cls_recipe(assets, tmp_path / "one", optim={"batch_size": 4, "epochs": 1}, eval={"every": None})
    r2 = cls_recipe(assets, tmp_path / "two", optim={"batch_size": 2, "epochs": 1}, eval={"every": None})
    f = _recipe_file(tmp_path / "two.yaml", r2)
    port = str(29500 + os.getpid() % 1000)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                          "-m", "graftkit.cli", "train", str(f), "--no-progress"], env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "2 process(es)" in res.stdout
    assert_one_process_matches(r1, tmp_path / "one", tmp_path / "two")


def assert_one_process_matches(recipe: dict, one_dir: Path, two_dir: Path) -> None:
    """Run ``recipe`` in this process and compare its 12 losses with the 2-process run's."""
    train(parse_recipe(recipe), progress=False)
    one, two = losses(one_dir), losses(two_dir)
    assert len(one) == len(two) == 12
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-4
    assert one[-1] < one[0]


def accelerate_fsdp(recipe_file: Path, *extra: str, version: int = 2, env: dict | None = None, processes: int = 2,
                    **popen) -> list[str] | subprocess.Popen:
    """``accelerate launch --use_fsdp`` with ``processes`` CPU processes: accelerate only starts
    them, graftkit reads the FSDP config and shards with FSDP2 (the path GPU runs take too)."""
    port = str(29500 + (os.getpid() + 7 * version + 13 * processes + len(extra)) % 1000)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", str(version), "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port,
           "-m", "graftkit.cli", "train", str(recipe_file), "--no-progress", *extra]
    return subprocess.Popen(cmd, env=env or ENV, **popen) if popen else cmd


def kill_launch_after_checkpoints(proc, out: Path, count: int) -> None:
    """SIGKILL a multi-process launch (launcher and every worker) once ``count`` checkpoints of
    ``out`` exist, and check it did not finish first."""
    import psutil

    ckpts = out / "checkpoints"
    deadline = time.time() + 180
    while time.time() < deadline and not (ckpts.exists() and len([p for p in ckpts.iterdir() if p.name.startswith("step-")]) >= count):
        time.sleep(0.05)
    # the workers run in sessions of their own: kill the launcher and every process under it
    workers = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    for p in workers:
        p.kill()
    psutil.wait_procs(workers, timeout=30)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "adapter").exists(), "the run finished before it could be killed"


# -- bad input: one line, exit 2, nothing lost ------------------------------------------------

def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = graft_main(["train", *map(str, args), "--no-progress"])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("graft: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def done_run(assets, tmp_path_factory) -> tuple[Path, dict]:
    """A finished run (with a checkpoint) whose folder the bad-input tests must leave untouched."""
    root = tmp_path_factory.mktemp("done")
    r = cls_recipe(assets, root / "out", optim={"epochs": 1}, eval={"every": None}, output={"checkpoint_every": 4})
    f = _recipe_file(root / "r.yaml", r)
    assert graft_main(["train", str(f), "--no-progress"]) == 0
    return f, r


@pytest.mark.parametrize("mutate, needles", [
    (lambda r: r["data"].update(lables=["a"]), ["recipe section 'data'", "unknown key 'lables'", "did you mean 'labels'", "label_field"]),
    (lambda r: r.update(optimiser={}), ["unknown key 'optimiser'", "did you mean 'optim'", "accepted keys:"]),
    (lambda r: r["method"].update(rank=4), ["method:", "unknown key 'rank'", "accepted keys:"]),
    (lambda r: r["optim"].update(lr="fast"), ["optim", "lr"]),
    (lambda r: r.update(task="regression"), ["task", "causal-lm", "classification"]),
])
def test_bad_recipe_keys(assets, tmp_path, capsys, mutate, needles):
    r = cls_recipe(assets, tmp_path / "out")
    mutate(r)
    code, _, err = run_cli(capsys, _recipe_file(tmp_path / "r.yaml", r))
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, needles", [
    ("optim.lrr=1e-3", ["override 'optim.lrr'", "did you mean 'optim.lr'", "accepted keys", "batch_size"]),
    ("optimm.lr=1e-3", ["override 'optimm.lr'", "did you mean 'optim'", "accepted", "output"]),
    ("optim.batch_size=-1", ["optim", "batch_size"]),
    ("method.rr=3", ["method:", "unknown key 'rr'"]),
    ("lr", ["not key=value"]),
])
def test_bad_overrides(assets, tmp_path, capsys, override, needles):
    f = _recipe_file(tmp_path / "r.yaml", cls_recipe(assets, tmp_path / "out", method={"method": "lora", "targets": ["query"]}))
    code, _, err = run_cli(capsys, f, override)
    assert_one_line_error(code, err, *needles)


def test_override_changes_the_recipe(assets, tmp_path):
    f = _recipe_file(tmp_path / "r.yaml", cls_recipe(assets, tmp_path / "out"))
    r = load_recipe(f, ["optim.lr=0.5", "method.method=lora", "method.r=2", "output.export=[merged]"])
    assert r.optim.lr == 0.5 and r.method == {"method": "lora", "r": 2} and r.output.export == ["merged"]


def test_missing_recipe_and_bad_yaml(tmp_path, capsys):
    code, _, err = run_cli(capsys, tmp_path / "nope.yaml")
    assert_one_line_error(code, err, "does not exist")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    code, _, err = run_cli(capsys, tmp_path / "bad.yaml")
    assert_one_line_error(code, err, "not valid YAML", "line")


def test_missing_data_file(assets, tmp_path, capsys):
    r = cls_recipe(assets, tmp_path / "out", data={"train": str(tmp_path / "missing.jsonl")})
    code, _, err = run_cli(capsys, _recipe_file(tmp_path / "r.yaml", r))
    assert_one_line_error(code, err, "missing.jsonl", "does not exist")
    assert not (tmp_path / "out").exists()


def test_label_absent_from_some_rows(assets, tmp_path, capsys):
    rows = _rows(20, 3)
    del rows[7]["label"]
    r = cls_recipe(assets, tmp_path / "out", data={"train": str(write_jsonl(tmp_path / "t.jsonl", rows))})
    code, _, err = run_cli(capsys, _recipe_file(tmp_path / "r.yaml", r))
    assert_one_line_error(code, err, "line 8", "'label'")


def test_validation_label_train_lacks(assets, tmp_path, capsys):
    val = _rows(8, 4) + [{"text": "so so", "label": "neutral"}]
    r = cls_recipe(assets, tmp_path / "out", data={"validation": str(write_jsonl(tmp_path / "v.jsonl", val))})
    code, _, err = run_cli(capsys, _recipe_file(tmp_path / "r.yaml", r))
    assert_one_line_error(code, err, "'neutral'", "training labels")


def test_too_long_sequences_are_truncated_with_a_warning(assets, tmp_path, capsys):
    rows = _rows(16, 5)
    rows[0]["text"] = " ".join(["good"] * 200)  # 202 tokens; the model has 64 positions
    r = cls_recipe(assets, tmp_path / "out", data={"train": str(write_jsonl(tmp_path / "t.jsonl", rows)), "max_length": 512},
                   optim={"max_steps": 2}, eval={"every": None})
    code, out, err = run_cli(capsys, _recipe_file(tmp_path / "r.yaml", r))
    assert code == 0, err
    assert "max_length 512 exceeds the model's limit of 64" in out
    assert "1 of 32 texts are longer than 64 tokens and were truncated"  # train + validation in out


def test_output_folder_with_another_run_is_refused(assets, done_run, tmp_path, capsys):
    f, r = done_run
    out = Path(r["output"]["dir"])
    before = snapshot(out)
    other = _recipe_file(tmp_path / "other.yaml", {**r, "optim": {**r["optim"], "lr": 0.5}})
    code, _, err = run_cli(capsys, other)
    assert_one_line_error(code, err, "already holds a training run", "--resume", "--overwrite")
    code, _, err = run_cli(capsys, other, "--resume")  # resume from a checkpoint of a different recipe
    assert_one_line_error(code, err, "different recipe", "optim.lr: 0.003 -> 0.5")
    code, _, err = run_cli(capsys, f)  # even the same recipe does not silently overwrite
    assert_one_line_error(code, err, "already holds")
    assert snapshot(out) == before


def test_output_folder_with_other_files_is_refused(assets, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    f = _recipe_file(tmp_path / "r.yaml", cls_recipe(assets, out, optim={"max_steps": 1}))
    code, _, err = run_cli(capsys, f)
    assert_one_line_error(code, err, "not a graftkit training run")
    code, _, err = run_cli(capsys, f, "--resume")
    assert_one_line_error(code, err, "cannot resume")
    assert (out / "notes.txt").read_text() == "mine"
    code, _, err = run_cli(capsys, f, "--overwrite")
    assert code == 0 and (out / "adapter").exists() and not (out / "notes.txt").exists()


def test_overwrite_refused_input_keeps_the_old_run(assets, done_run, tmp_path, capsys):
    """--overwrite with a recipe that fails its checks (missing data) must not delete the old run."""
    f, r = done_run
    out = Path(r["output"]["dir"])
    before = snapshot(out)
    bad = _recipe_file(tmp_path / "bad.yaml", {**r, "data": {**r["data"], "train": str(tmp_path / "gone.jsonl")}})
    code, _, err = run_cli(capsys, bad, "--overwrite")
    assert_one_line_error(code, err, "gone.jsonl")
    assert snapshot(out) == before


def test_peft_export_of_full_refused_up_front(assets, tmp_path, capsys):
    f = _recipe_file(tmp_path / "r.yaml", cls_recipe(assets, tmp_path / "out", output={"export": ["peft"]}))
    code, _, err = run_cli(capsys, f)
    assert_one_line_error(code, err, "peft has no format for 'full'")
    assert not (tmp_path / "out").exists()


def test_frozen_head_chunked_loss_trains_like_the_full_logits(assets, tmp_path, monkeypatch):
    """With the LM head frozen, training takes the chunked cross-entropy (graftkit.train.linear_ce);
    the loss curve equals a run through F.cross_entropy of the full logits (float32)."""
    from graftkit.train import linear_ce

    method = {"method": "lora", "r": 4, "lora_alpha": 8, "targets": ["q_proj", "v_proj", "up_proj", "down_proj"]}
    fast = chat_recipe(assets, tmp_path / "fast", method=method, optim={"max_steps": 6}, eval={"every": None})
    train(parse_recipe(fast), progress=False)
    calls = []

    def plain(hidden, linear, targets, chunk=linear_ce.CHUNK_ROWS):
        calls.append(len(targets))
        return torch.nn.functional.cross_entropy(linear(hidden).float(), targets, reduction="none")

    monkeypatch.setattr(linear_ce, "frozen_linear_cross_entropy", plain)
    slow = chat_recipe(assets, tmp_path / "slow", method=method, optim={"max_steps": 6}, eval={"every": None})
    train(parse_recipe(slow), progress=False)
    assert len(calls) == 6  # the training steps went through the patched function
    a, b = losses(tmp_path / "fast"), losses(tmp_path / "slow")
    assert len(a) == 6 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5


def test_bf16_lora_with_frozen_head_and_exact_match_eval(assets, tmp_path):
    """bf16: frozen Linear weights held in bf16, chunked loss, and greedy generation for the
    exact-match eval (under autocast) all run; the saved adapter loads on a float32 base."""
    r = chat_recipe(assets, tmp_path / "run", method={"method": "lora", "r": 4, "lora_alpha": 8, "targets": ["q_proj", "v_proj"]},
                    data={"answer_field": "answer"}, optim={"max_steps": 4, "precision": "bf16"},
                    eval={"every": 4, "exact_match": True, "max_new_tokens": 4, "limit": 4})
    train(parse_recipe(r), progress=False)
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "val_exact_match" in x]
    assert evals and 0.0 <= evals[-1]["val_exact_match"] <= 1.0
    model = transformers.AutoModelForCausalLM.from_pretrained(assets / "llama")
    gk.load_adapter(model, tmp_path / "run" / "adapter")
    assert all(p.dtype == torch.float32 for p in model.parameters())
