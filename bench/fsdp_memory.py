"""Memory per process of 2-process training: DDP (torchrun) vs FSDP2 (accelerate's FSDP config).

Full fine-tuning of SmolLM2-135M (chat SFT on reasoning-gym gsm_symbolic, 128 tokens,
batch 1 per process, AdamW, fp32), a few steps, the same recipe both ways:

    DDP:  python -m torch.distributed.run --nproc_per_node 2 -m graftkit.cli train R.yaml
    FSDP: python -m accelerate.commands.launch --use_fsdp --fsdp_version 2 --num_processes 2 \\
              -m graftkit.cli train R.yaml

Every process of a DDP run holds the whole model, its gradients and both AdamW moments
(4 x 4 bytes per parameter, plus DDP's gradient buckets); under FSDP2 each holds half of
each. The launcher's worker processes are sampled every 50 ms (psutil) for their resident
memory; the table gives the largest single process and the largest sum over the two. The
loss curves of the two runs are printed too: they should agree (same global batches).

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
    launcher = psutil.Process(proc.pid)
    peak_one = peak_sum = 0
    while proc.poll() is None:
        try:
            rss = [p.memory_info().rss for p in launcher.children(recursive=True) if "graftkit.cli" in " ".join(p.cmdline())]
        except psutil.Error:
            rss = []
        if rss:
            peak_one, peak_sum = max(peak_one, max(rss)), max(peak_sum, sum(rss))
        time.sleep(0.05)
    out = proc.stdout.read()
    if proc.returncode != 0:
        sys.exit(f"{kind} run failed:\n{out[-3000:]}")
    return {"peak_process_mb": peak_one / 2**20, "peak_total_mb": peak_sum / 2**20, "seconds": time.perf_counter() - t0,
            "sharded": "FSDP2 sharded" in out}


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
    print("| run | sharded | peak RSS, largest process (MB) | peak RSS, both processes (MB) | wall s | losses |")
    print("|---|---|---|---|---|---|")
    for kind, r in results.items():
        print(f"| {kind} | {r['sharded']} | {r['peak_process_mb']:.0f} | {r['peak_total_mb']:.0f} | {r['seconds']:.1f} | {r['losses']} |")
    d, f = results["DDP"], results["FSDP2"]
    print(f"FSDP2 / DDP peak per process: {f['peak_process_mb'] / d['peak_process_mb']:.2f}; "
          f"both processes: {f['peak_total_mb'] / d['peak_total_mb']:.2f}; "
          f"max loss difference {max(abs(a - b) for a, b in zip(d['losses'], f['losses'])):.2e}")


if __name__ == "__main__":
    main()
