"""LoRA training step and unmerged inference: graftkit vs peft on SmolLM2-135M.

Same LoRA (r=16, alpha=32, every linear layer of the decoder: q/k/v/o/gate/up/down),
same data (batch 4 x 256 random tokens, seeded), AdamW. Each measurement runs in a fresh
subprocess so that peak RSS is per framework; the frameworks alternate (graftkit, peft,
graftkit, peft, ...) so that background load on the machine hits both alike, and the
median over rounds is reported.

    python bench/lora_step.py                  # full run (a few minutes on 2 cores)
    python bench/lora_step.py --steps 2 --rounds 1 --seq 64   # quick check
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _measure import cpu_name, peak_rss_mb, reset_peak_rss

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def worker(framework: str, steps: int, batch: int, seq: int, infer_reps: int) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    import graftkit as gk

    model = gk.load_model("smollm2", dtype=torch.float32)
    model.config.use_cache = False
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)

    def forward_time() -> float:
        model.eval()
        times = []
        with torch.no_grad():
            model(input_ids=ids)  # warm-up
            for _ in range(infer_reps):
                t = time.perf_counter()
                model(input_ids=ids)
                times.append(time.perf_counter() - t)
        return statistics.median(times)

    bare = forward_time()
    import gc

    gc.collect()
    reset_peak_rss()  # peak RSS below = adapter + training, on top of the same loaded model
    torch.manual_seed(0)
    if framework == "graftkit":
        gk.inject(model, gk.LoRAConfig(r=16, lora_alpha=32, targets=TARGETS))
        params = gk.trainable_parameters(model)
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
        params = [p for p in model.parameters() if p.requires_grad]
    unmerged = forward_time()
    n_trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    losses, times = [], []
    for step in range(steps + 1):  # step 0 is a warm-up, not timed
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        losses.append(float(loss))
        if step:
            times.append(dt)
    # the bare model once more (adapter removed, base weights restored): machine speed drifts,
    # so the overhead compares against the mean of a bare measurement before and after
    if framework == "graftkit":
        gk.unload(model, merge=False)
    else:
        model = model.unload()
    bare = (bare + forward_time()) / 2
    return {"framework": framework, "step_s": statistics.median(times), "bare_forward_s": bare,
            "unmerged_forward_s": unmerged, "peak_rss_mb": peak_rss_mb(), "loss0": losses[0],
            "loss_last": losses[-1], "trainable": n_trainable}


def machine() -> str:
    import torch

    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--infer-reps", type=int, default=5)
    ap.add_argument("--worker", choices=["graftkit", "peft"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.batch, args.seq, args.infer_reps)))
        return

    import graftkit as gk

    gk.model_dir("smollm2")  # build the cached safetensors copy once, outside the timed workers
    runs: dict[str, list[dict]] = {"graftkit": [], "peft": []}
    for r in range(args.rounds):
        for fw in ("graftkit", "peft"):
            cmd = [sys.executable, __file__, "--worker", fw, "--steps", str(args.steps), "--batch", str(args.batch),
                   "--seq", str(args.seq), "--infer-reps", str(args.infer_reps)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            res = json.loads(out)
            runs[fw].append(res)
            print(f"round {r + 1} {fw:8s} step {res['step_s']:.2f}s  rss {res['peak_rss_mb']:.0f} MB  "
                  f"bare fwd {res['bare_forward_s']:.3f}s  unmerged fwd {res['unmerged_forward_s']:.3f}s  "
                  f"loss {res['loss0']:.4f} -> {res['loss_last']:.4f}", flush=True)

    def med(fw: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[fw])

    g, p = "graftkit", "peft"
    print(f"\nmachine: {machine()}")
    print(f"SmolLM2-135M, LoRA r=16 on {'/'.join(TARGETS)}, batch {args.batch}x{args.seq}, AdamW; "
          f"median of {args.rounds} rounds x {args.steps} steps; trainable params graftkit "
          f"{runs[g][0]['trainable']:,} / peft {runs[p][0]['trainable']:,}")
    print(f"initial loss graftkit {runs[g][0]['loss0']:.6f} peft {runs[p][0]['loss0']:.6f} (identity at init: equal)")
    rows = [
        ("train step (s)", med(g, "step_s"), med(p, "step_s")),
        ("peak RSS in training (MB)", med(g, "peak_rss_mb"), med(p, "peak_rss_mb")),
        ("unmerged forward (s)", med(g, "unmerged_forward_s"), med(p, "unmerged_forward_s")),
    ]
    print(f"| {'metric':26s} | {'graftkit':>10s} | {'peft':>10s} | graftkit/peft |")
    print(f"|{'-' * 28}|{'-' * 12}|{'-' * 12}|---------------|")
    for name, a, b in rows:
        print(f"| {name:26s} | {a:10.3f} | {b:10.3f} | {a / b:13.3f} |")
    for fw in (g, p):
        over = med(fw, "unmerged_forward_s") / med(fw, "bare_forward_s") - 1
        print(f"unmerged inference overhead over the bare model, {fw}: {100 * over:+.1f}%")


if __name__ == "__main__":
    main()
