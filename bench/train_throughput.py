"""Training throughput: ``graft train`` vs peft + transformers ``Trainer``, same data and config.

(a) LoRA r=16 (alpha 32, q/k/v/o/gate/up/down) chat SFT of SmolLM2-135M-Instruct on
    reasoning-gym gsm_symbolic problems, every sequence exactly 256 tokens (prompt + chain of
    thought, truncated), loss on the response tokens only, batch 4, AdamW lr 1e-4, fp32;
(b) full fine-tuning of MiniLM (all-MiniLM-L6-v2) + a new 5-way head on BBC News topics,
    128 tokens, batch 32, AdamW lr 5e-5, fp32.

Both sides get the identical tokenized examples in the identical order (no shuffling, no
padding since every sequence has the same length). Each framework runs in its own fresh
subprocess, one after the other in this invocation, so that peak RSS is per framework.
Throughput = tokens of the timed steps (after ``--warmup`` untimed steps) / their wall time.
Achieved FLOP/s uses the same model-FLOP count for both (``k * N * tokens``: N = base
weights of the Linear layers (matmuls per token; embedding lookups excluded), k = 6 for full fine-tuning, 4 for LoRA where frozen weights
need no weight gradient) divided by this machine's measured float32 matmul peak.

With ``--precision bf16`` both sides train under bf16 autocast (graftkit ``optim.precision:
bf16``, the Trainer ``bf16=True``); the default is fp32.

    python bench/train_throughput.py                    # both cases, fp32 (~2-10 minutes on 2 cores)
    python bench/train_throughput.py --precision bf16   # both cases, bf16 autocast on both sides
    python bench/train_throughput.py --case a --steps 3 # quick
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

from _measure import peak_rss_mb, reset_peak_rss

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "a": {"model": "smollm2", "task": "causal-lm", "seq": 256, "batch": 4, "lr": 1e-4,
          "title": "LoRA r=16 SFT, SmolLM2-135M, 256 tokens, batch 4"},
    "b": {"model": "minilm", "task": "classification", "seq": 128, "batch": 32, "lr": 5e-5,
          "title": "full fine-tuning, MiniLM + 5-way head, 128 tokens, batch 32"},
}





def make_data(case: str, folder: Path, n: int) -> Path:
    """JSONL rows cut to ``seq`` tokens by the recipe's max_length (case a: chat; case b: text)."""
    rows = []
    if case == "a":
        import reasoning_gym

        for x in reasoning_gym.create_dataset("gsm_symbolic", size=4 * n, seed=3):
            prompt = x["question"]
            cot = (x["metadata"]["answer_cot"] + f"\n#### {x['answer']}\n") * 4  # long enough to be cut at 256 tokens
            rows.append({"prompt": prompt, "response": cot})
            if len(rows) == n:
                break
    else:
        from graftkit.data import bbc_news

        for text, label in bbc_news()[:: max(1, 2225 // n)][:n]:
            rows.append({"text": text, "label": label})
    path = folder / f"{case}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe_for(case: str, data: Path, out: Path, steps: int, precision: str = "fp32") -> dict:
    c = CASES[case]
    r = {"model": c["model"], "task": c["task"], "data": {"train": str(data), "max_length": c["seq"]},
         "optim": {"lr": c["lr"], "batch_size": c["batch"], "max_steps": steps, "max_grad_norm": 1.0, "schedule": "constant", "seed": 0,
                   "precision": precision},
         "output": {"dir": str(out)}}
    if case == "a":
        r["data"].update(prompt_field="prompt", response_field="response")
        r["method"] = {"method": "lora", "r": 16, "lora_alpha": 32, "targets": TARGETS}
    else:
        r["method"] = {"method": "full"}
    return r


def examples(case: str, data: Path, steps: int):
    """The tokenized examples graftkit trains on (the Trainer gets the same ones)."""
    from graftkit.train import parse_recipe
    from graftkit.train.data import prepare

    import graftkit as gk

    c = CASES[case]
    r = parse_recipe(recipe_for(case, data, Path("unused"), steps))
    return prepare(r, gk.load_tokenizer(c["model"]), c["seq"])


def worker(framework: str, case: str, data: str, steps: int, warmup: int, precision: str = "fp32") -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    c = CASES[case]
    total = steps + warmup
    times: list[float] = []
    tokens: list[int] = []
    if framework == "graftkit":
        from rich.console import Console

        from graftkit.train import parse_recipe
        from graftkit.train.loop import Run

        out = Path(tempfile.mkdtemp()) / "run"
        run = Run(parse_recipe(recipe_for(case, Path(data), out, total, precision)), console=Console(quiet=True), progress=False)
        run.setup()
        n_params = matmul_params(run.model)
        reset_peak_rss()
        losses = []
        for step in range(total):
            t = time.perf_counter()
            loss, tok = run.train_step(step)
            dt = time.perf_counter() - t
            losses.append(loss)
            if step >= warmup:
                times.append(dt)
                tokens.append(tok)
    else:
        import peft
        import transformers

        import graftkit as gk

        prepared = examples(case, Path(data), total)
        tok = gk.load_tokenizer(c["model"])
        torch.manual_seed(0)
        if case == "a":
            model = gk.load_model(c["model"], dtype=torch.float32)
            model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM"))
            rows = [{"input_ids": e["input_ids"], "attention_mask": [1] * len(e["input_ids"]), "labels": e["labels"]} for e in prepared.train]
        else:
            labels = prepared.labels
            model = gk.load_model(c["model"], head="classification", num_labels=len(labels))
            rows = [{"input_ids": e["input_ids"], "attention_mask": [1] * len(e["input_ids"]), "labels": e["label"]} for e in prepared.train]
        n_params = matmul_params(model)
        model.config.use_cache = False
        tok.pad_token = tok.pad_token or tok.eos_token
        collator = transformers.DataCollatorForSeq2Seq(tok, padding=True) if case == "a" else transformers.DataCollatorWithPadding(tok)

        class Timer(transformers.TrainerCallback):
            seen = 0

            def on_step_begin(self, args, state, control, **kw):
                self.t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                self.seen += 1
                if self.seen > warmup:
                    times.append(time.perf_counter() - self.t)
                    tokens.append(c["batch"] * c["seq"])

        args = transformers.TrainingArguments(
            output_dir=tempfile.mkdtemp(), per_device_train_batch_size=c["batch"], max_steps=total, learning_rate=c["lr"],
            lr_scheduler_type="constant", max_grad_norm=1.0, weight_decay=0.0, logging_steps=10_000, save_strategy="no",
            report_to=[], dataloader_num_workers=0, seed=0, use_cpu=True, disable_tqdm=True, bf16=precision == "bf16")

        class InOrder(transformers.Trainer):  # graftkit's order is seeded too; the order does not change the cost
            def _get_train_sampler(self, *a, **k):
                return torch.utils.data.SequentialSampler(self.train_dataset)

        import datasets

        trainer = InOrder(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), data_collator=collator, callbacks=[Timer()])
        reset_peak_rss()
        trainer.train()
        losses = []
    seconds = sum(times)
    return {"framework": framework, "tokens_per_s": sum(tokens) / seconds, "seconds_per_step": seconds / len(times),
            "peak_rss_mb": peak_rss_mb(), "n_params": n_params, "tokens": sum(tokens), "steps": len(times),
            "first_loss": losses[0] if losses else None}


def matmul_params(model) -> int:
    """Weights used in a matmul per token: every nn.Linear's (a tied LM head counts: it is a
    matmul; embedding lookups do not). LoRA factors are left out on both sides."""
    from torch import nn

    return sum(m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and "lora_" not in name and "graft_adapter" not in name)


def matmul_peak() -> float:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(10):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=["a", "b", "both"], default="both")
    p.add_argument("--steps", type=int, default=8, help="timed steps per framework")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="both sides: fp32, or bf16 autocast (graftkit optim.precision bf16, Trainer bf16=True)")
    p.add_argument("--worker", nargs=3, metavar=("FRAMEWORK", "CASE", "DATA"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker[0], a.worker[1], a.worker[2], a.steps, a.warmup, a.precision)))
        return
    import torch

    peak = matmul_peak()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; "
          f"measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    folder = Path(tempfile.mkdtemp())
    rows = []
    for case in (["a", "b"] if a.case == "both" else [a.case]):
        data = make_data(case, folder, CASES[case]["batch"] * (a.steps + a.warmup))
        res = {}
        for fw in ("graftkit", "trainer"):
            proc = subprocess.run([sys.executable, __file__, "--worker", fw, case, str(data), "--steps", str(a.steps), "--warmup", str(a.warmup),
                                   "--precision", a.precision],
                                  capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                sys.exit(f"{fw} worker failed:\n{proc.stderr[-3000:]}")
            res[fw] = json.loads(line[0][7:])
        k = 4 if case == "a" else 6
        for fw in res:
            res[fw]["flops_fraction"] = k * res[fw]["n_params"] * res[fw]["tokens_per_s"] / peak
        g, t = res["graftkit"], res["trainer"]
        print(f"\n({case}) {CASES[case]['title']}, {a.precision}")
        print(f"  {'':10} {'tokens/s':>10} {'s/step':>8} {'peak RSS MB':>12} {'FLOP/s / peak':>14}")
        for fw, r in res.items():
            print(f"  {fw:10} {r['tokens_per_s']:10.1f} {r['seconds_per_step']:8.2f} {r['peak_rss_mb']:12.0f} {r['flops_fraction']:14.3f}")
        print(f"  ratio graftkit/trainer: tokens/s {g['tokens_per_s'] / t['tokens_per_s']:.2f}x, peak RSS {g['peak_rss_mb'] / t['peak_rss_mb']:.2f}x")
        rows.append((case, res))
    print("\nRESULTS " + json.dumps({"peak_flops": peak, "cases": {c: r for c, r in rows}}))


if __name__ == "__main__":
    main()
