"""The adapter family on one budget: parameters vs accuracy, MiniLM on BBC News topics.

Every method trains MiniLM (all-MiniLM-L6-v2) + a new 5-way head with ``graft train``'s loop on
the same class-balanced split of BBC News (``--train`` articles, ``--heldout`` more held out,
seed 0, as ``examples/make_data.py`` draws it), the same number of steps, batch size, sequence
length, schedule (10% warmup, linear decay) and seed. Per method it reports

* trainable parameters, and their share of the base model's (the new head counts as trainable;
  its 1,925 parameters are in every row);
* held-out accuracy after the last step (``graft train``'s own evaluation);
* step time: the median over the logged steps (tokens / tokens-per-second of each step);
* peak RSS: each method runs in its own fresh subprocess, so the high-water mark is its own
  (the whole process: model load, data, training and evaluation).

Then the forward overhead of unmerged bottleneck adapters: the bare model's forward (no
gradients, one batch of ``--batch`` x ``--max-len`` real tokens) against the same model with a
freshly injected Pfeiffer / Houlsby / parallel adapter, median of ``--reps`` timed forwards each,
bare measured before and after (interleaved rounds, in one subprocess).

Methods (``--methods`` picks some; ones not registered are listed as missing): LoRA r=8 on
query/key/value/dense (the example recipe), Houlsby, Pfeiffer, the parallel adapter (s = 4),
Compacter and Compacter++ (n = 4) at reduction factor 16, LN tuning, the unified view's MAM-style
composition (parallel adapter + LoRA r=4 on query/value), and full fine-tuning as the reference.
Learning rates: ``--lr`` (adapters and LoRA, default 2e-3), full fine-tuning 5e-5, LN tuning
``--ln-lr`` (default 1e-2); ``--sweep`` also runs each adapter method at ``--lr2``.

    python bench/adapters.py                  # 100 steps, batch 8, 128 tokens (2 epochs; 2-4 minutes a method on 2 cores)
    python bench/adapters.py --quick          # 10 steps on 40/40 articles, 64 tokens: a check that it runs
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _measure import peak_rss_mb

LORA = {"method": "lora", "r": 8, "lora_alpha": 16, "targets": ["query", "key", "value", "dense"]}
BOTTLENECK = {"reduction_factor": 16}
METHODS = {
    "lora": LORA,
    "houlsby": {"method": "houlsby", **BOTTLENECK},
    "pfeiffer": {"method": "pfeiffer", **BOTTLENECK},
    "parallel_adapter": {"method": "parallel_adapter", **BOTTLENECK},
    "compacter_pp": {"method": "compacter_pp", **BOTTLENECK, "phm_dim": 4},
    "ln_tuning": {"method": "ln_tuning"},
    "compacter": {"method": "compacter", **BOTTLENECK, "phm_dim": 4},
    "mam": {"method": "compose", "methods": [{"method": "parallel_adapter", **BOTTLENECK},
                                             {"method": "lora", "r": 4, "lora_alpha": 8, "targets": ["query", "value"]}]},
    "full": {"method": "full"},
}
LABELS = {"full": "full fine-tuning", "lora": "LoRA r=8 (q/k/v/dense)", "houlsby": "Houlsby (rf 16)", "pfeiffer": "Pfeiffer (rf 16)",
          "parallel_adapter": "parallel adapter (rf 16, s=4)", "compacter": "Compacter (rf 16, n=4)",
          "compacter_pp": "Compacter++ (rf 16, n=4)", "ln_tuning": "LN tuning", "mam": "MAM: parallel adapter + LoRA r=4 (q/v)"}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def write_data(folder: Path, n_train: int, n_heldout: int) -> tuple[Path, Path]:
    from graftkit.data import bbc_news, stratified_split, text_key

    train, held = stratified_split(bbc_news(), (n_train, n_heldout), seed=0, key=lambda e: text_key(e[0]))
    paths = []
    for name, rows in (("train", train), ("heldout", held)):
        p = folder / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y, *_ in rows))
        paths.append(p)
    return paths[0], paths[1]


def recipe(method: dict, lr: float, a, train: Path, held: Path, out: Path) -> dict:
    return {"model": "minilm", "task": "classification",
            "data": {"train": str(train), "validation": str(held), "max_length": a.max_len},
            "method": method, "optim": {"lr": lr, "batch_size": a.batch, "max_steps": a.steps, "warmup_ratio": 0.1,
                                        "schedule": "linear", "seed": 0},
            "eval": {"every": None, "at_start": False, "batch_size": 64}, "output": {"dir": str(out), "log_every": 1}}


def train_worker(spec: dict) -> dict:
    """One method in this (fresh) process: ``graft train``'s loop, its summary and metrics."""
    import torch
    from rich.console import Console

    torch.set_num_threads(spec["threads"])
    from graftkit.train import parse_recipe, train

    out = Path(spec["recipe"]["output"]["dir"])
    summary = train(parse_recipe(spec["recipe"]), console=Console(stderr=True, highlight=False), progress=spec["progress"])
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["tokens"] / r["tokens_per_s"] for r in steps if r.get("tokens_per_s")]
    import graftkit as gk

    total = sum(p.numel() for p in gk.load_model("minilm").parameters())  # the base encoder, no head
    return {"trainable": summary["trainable_parameters"], "base_params": total, "accuracy": summary.get("val_accuracy"),
            "val_loss": summary.get("val_loss"), "first_loss": summary["first_loss"], "final_loss": summary["final_loss"],
            "step_s": statistics.median(times[1:] or times), "peak_rss_mb": peak_rss_mb(), "seconds": summary["seconds"]}


def overhead_worker(spec: dict) -> dict:
    """Median forward time of the bare model and of the model with each unmerged adapter."""
    import torch

    torch.set_num_threads(spec["threads"])
    import graftkit as gk
    from graftkit.data import bbc_news

    tok = gk.load_tokenizer("minilm")
    texts = [t for t, *_ in bbc_news()[:: 2225 // spec["batch"]][: spec["batch"]]]
    enc = tok(texts, truncation=True, max_length=spec["max_len"], padding="max_length", return_tensors="pt")
    model = gk.load_model("minilm").eval()

    def timed() -> float:
        with torch.no_grad():
            model(**enc)  # warm-up
            ts = []
            for _ in range(spec["reps"]):
                t = time.perf_counter()
                model(**enc)
                ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    out: dict[str, list[float]] = {"bare": []}
    for _ in range(spec["rounds"]):  # bare and adapted interleaved, so drift on the machine hits both
        out["bare"].append(timed())
        for name in spec["methods"]:
            gk.inject(model, {"method": name, **BOTTLENECK})
            out.setdefault(name, []).append(timed())
            gk.unload(model, merge=False)  # an activation adapter has no weights to fold in
    out["bare"].append(timed())
    return {k: statistics.median(v) for k, v in out.items()}


def run_worker(kind: str, spec: dict) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, json.dumps(spec)], stdout=subprocess.PIPE, text=True, env=env)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        return {"error": f"exit {proc.returncode}"}
    return json.loads(line[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--train", type=int, default=400, help="training articles (class-balanced)")
    p.add_argument("--heldout", type=int, default=200, help="held-out articles (class-balanced, disjoint)")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate of LoRA and the adapters")
    p.add_argument("--lr2", type=float, default=5e-4, help="the second learning rate of --sweep")
    p.add_argument("--ln-lr", type=float, default=1e-2, help="learning rate of LN tuning")
    p.add_argument("--full-lr", type=float, default=5e-5, help="learning rate of full fine-tuning")
    p.add_argument("--sweep", action="store_true", help="also run every adapter method at --lr2 and keep the better held-out accuracy")
    p.add_argument("--reps", type=int, default=7, help="timed forwards per overhead measurement")
    p.add_argument("--rounds", type=int, default=3, help="interleaved bare/adapted rounds of the overhead measurement")
    p.add_argument("--no-overhead", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads per worker (on a machine shared with other jobs 1 is faster and steadier)")
    p.add_argument("--quick", action="store_true", help="10 steps, 40/40 articles, batch 8, 64 tokens, 1 overhead round")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        fn = train_worker if a.worker[0] == "train" else overhead_worker
        print("RESULT " + json.dumps(fn(json.loads(a.worker[1]))), flush=True)
        return
    if a.quick:
        a.steps, a.train, a.heldout, a.batch, a.max_len, a.rounds, a.reps = 10, 40, 40, 8, 64, 1, 3

    import torch
    import transformers

    import graftkit.methods  # noqa: F401  (registers the methods)
    from graftkit.registry import METHODS as REGISTERED

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, {a.threads} torch thread(s) per worker; torch {torch.__version__}, "
          f"transformers {transformers.__version__}; load average before: {os.getloadavg()[0]:.1f}")
    print(f"command: python bench/{Path(__file__).name} {' '.join(sys.argv[1:])}")
    print(f"budget per method: {a.steps} steps x batch {a.batch} x {a.max_len} tokens; BBC News {a.train} train / {a.heldout} held out; "
          f"lr {a.lr:g} (LN tuning {a.ln_lr:g}, full {a.full_lr:g}){f', sweep also {a.lr2:g}' if a.sweep else ''}\n", flush=True)
    folder = Path(tempfile.mkdtemp())
    train_path, held_path = write_data(folder, a.train, a.heldout)
    need = lambda m: METHODS[m]["method"] if METHODS[m]["method"] != "compose" else "compose"  # noqa: E731
    missing = [m for m in a.methods if need(m) not in REGISTERED]
    rows = {}
    header = ("| method | trainable params | % of base | held-out accuracy | lr | step time (s) | peak RSS (MB) |\n"
              "|---|---|---|---|---|---|---|")

    def row(m: str, r: dict) -> str:
        if "error" in r:
            return f"| {LABELS[m]} | failed ({r['error']}) | | | | | |"
        return (f"| {LABELS[m]} | {r['trainable']:,} | {100 * r['trainable'] / r['base_params']:.3f}% | {r['accuracy']:.3f} | {r['lr']:g} | "
                f"{r['step_s']:.3f} | {r['peak_rss_mb']:.0f} |")

    print(header, flush=True)
    for m in [m for m in a.methods if m not in missing]:
        lr = a.full_lr if m == "full" else a.ln_lr if m == "ln_tuning" else a.lr
        lrs = [lr] + ([a.lr2] if a.sweep and m not in ("full", "ln_tuning") else [])
        best = None
        for lr_ in lrs:
            print(f"== {LABELS[m]}, lr {lr_:g}", file=sys.stderr, flush=True)
            spec = {"recipe": recipe(METHODS[m], lr_, a, train_path, held_path, folder / f"{m}-{lr_:g}"), "progress": True,
                    "threads": a.threads}
            res = {**run_worker("train", spec), "lr": lr_}
            if "error" not in res and (best is None or "error" in best or (res["accuracy"] or 0) > (best["accuracy"] or 0)):
                best = res
            best = best or res
        rows[m] = best
        print(row(m, best), flush=True)  # as each method ends: a long run stopped early keeps its rows
    print("\n" + header)
    for m, r in rows.items():
        print(row(m, r))
    for m in missing:
        print(f"| {LABELS[m]} | not registered | | | | | |")
    result = {"rows": rows, "missing": missing}
    if not a.no_overhead:
        names = [n for n in ("pfeiffer", "houlsby", "parallel_adapter") if n in REGISTERED]
        print(f"\nforward overhead of unmerged adapters (batch {a.batch} x {a.max_len}, median of {a.reps} forwards, {a.rounds} rounds):",
              flush=True)
        ov = run_worker("overhead", {"methods": names, "batch": a.batch, "max_len": a.max_len, "reps": a.reps, "rounds": a.rounds,
                                     "threads": a.threads})
        if "error" in ov:
            print(f"  failed ({ov['error']})")
        else:
            print(f"  bare model: {ov['bare'] * 1000:.1f} ms")
            for n in names:
                print(f"  {n}: {ov[n] * 1000:.1f} ms ({100 * (ov[n] / ov['bare'] - 1):+.1f}% over the bare model)")
        result["overhead"] = ov
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    print("RESULTS " + json.dumps(result))


if __name__ == "__main__":
    main()
