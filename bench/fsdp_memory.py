"""Memory per process of 2-process training: DDP (torchrun) vs FSDP2 (accelerate's FSDP config).

Full fine-tuning of SmolLM2-135M (chat SFT on reasoning-gym gsm_symbolic, 128 tokens,
batch 1 per process, AdamW, fp32), a few steps, the same recipe both ways:

    DDP:  python -m torch.distributed.run --nproc_per_node 2 -m graftkit.cli train R.yaml
    FSDP: python -m accelerate.commands.launch --use_fsdp --fsdp_version 2 --num_processes 2 \\
              -m graftkit.cli train R.yaml

Every process of a DDP run holds the whole model, its gradients and both AdamW moments
(4 x 4 bytes per parameter, plus DDP's gradient buckets); under FSDP2 each holds half of
each. The launcher's worker processes are sampled every 50 ms (psutil) for their resident
memory, split at the moment the run prints its start line: set-up (loading, adapter
injection, sharding) and training. The table gives the largest single process and the
largest sum over the two for each. Both runs load the whole model in every process before
anything is sharded, and freed memory is not always handed back to the OS, so set-up peaks
are alike and the training peaks carry some of set-up's. The loss curves are printed too:
they should agree (same global batches).

    python bench/fsdp_memory.py [--steps 4]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml


def make_data(path: Path, n: int) -> None:
    import reasoning_gym

    rows = [{"prompt": x["question"], "response": x["metadata"]["answer_cot"]}
            for x in reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def launch(kind: str, recipe: Path, port: int) -> list[str]:
    tail = ["-m", "graftkit.cli", "train", str(recipe), "--no-progress"]
    if kind == "DDP":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), *tail]
    return [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), *tail]


def run(kind: str, recipe: Path, port: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(launch(kind, recipe, port), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    launcher = psutil.Process(proc.pid)
    peak = {"setup": [0, 0], "training": [0, 0]}  # largest process, both processes
    while proc.poll() is None:
        try:
            rss = [p.memory_info().rss for p in launcher.children(recursive=True) if "graftkit.cli" in " ".join(p.cmdline())]
        except psutil.Error:
            rss = []
        # the run prints its "graft train: ..." line when set-up (load, inject, shard) is done
        phase = peak["training" if any(ln.startswith("graft train:") for ln in lines) else "setup"]
        if rss:
            phase[0], phase[1] = max(phase[0], max(rss)), max(phase[1], sum(rss))
        time.sleep(0.05)
    reader.join()
    out = "".join(lines)
    if proc.returncode != 0:
        sys.exit(f"{kind} run failed:\n{out[-3000:]}")
    return {"setup_mb": [v / 2**20 for v in peak["setup"]], "training_mb": [v / 2**20 for v in peak["training"]],
            "seconds": time.perf_counter() - t0, "sharded": "FSDP2 sharded" in out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fsdp_memory_"))
    make_data(root / "train.jsonl", 2 * args.steps)
    results = {}
    for i, kind in enumerate(("DDP", "FSDP2")):
        recipe = {"model": "smollm2", "task": "causal-lm",
                  "data": {"train": str(root / "train.jsonl"), "prompt_field": "prompt", "response_field": "response", "max_length": 128},
                  "method": {"method": "full"},
                  "optim": {"lr": 1e-5, "batch_size": 1, "max_steps": args.steps, "schedule": "constant", "seed": 0},
                  "output": {"dir": str(root / kind)}}
        path = root / f"{kind}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        results[kind] = run(kind, path, 29400 + os.getpid() % 500 + i)
        results[kind]["losses"] = [round(json.loads(x)["loss"], 5) for x in (root / kind / "metrics.jsonl").read_text().splitlines()
                                   if '"loss"' in x]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {__import__('torch').__version__}, "
          f"accelerate {__import__('accelerate').__version__}")
    print("| run | sharded | set-up peak RSS, largest process / both (MB) | training peak RSS, largest process / both (MB) | wall s | losses |")
    print("|---|---|---|---|---|---|")
    for kind, r in results.items():
        (s1, s2), (t1, t2) = r["setup_mb"], r["training_mb"]
        print(f"| {kind} | {r['sharded']} | {s1:.0f} / {s2:.0f} | {t1:.0f} / {t2:.0f} | {r['seconds']:.1f} | {r['losses']} |")
    d, f = results["DDP"], results["FSDP2"]
    print(f"FSDP2 / DDP training peak, largest process: {f['training_mb'][0] / d['training_mb'][0]:.2f}; "
          f"both: {f['training_mb'][1] / d['training_mb'][1]:.2f}; "
          f"max loss difference {max(abs(a - b) for a, b in zip(d['losses'], f['losses'])):.2e}")


if __name__ == "__main__":
    main()
