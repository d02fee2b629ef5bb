"""How well does ``output: adapter`` hold a merge of LoRA-family adapters at a given rank?

Three adapters on SmolLM2-135M (q_proj and v_proj of all 30 layers): LoRA r=4, rsLoRA r=8 and
DoRA r=2 (random factors, deltas of a few percent of the weights; the DoRA magnitude is its
weight norm times 1 + 2% noise, ``--drift``, as a trained DoRA drifts). Each merge (task arithmetic, TIES at
density 0.5) is written as a full model and as an adapter at rank 14 (= 4 + 8 + 2), both as a
plain LoRA (``dora: false``) and as a DoRA adapter (the default with a DoRA input). Reported:
the SVD relative error of the adapter's delta (``merge.relative_error.overall``) and, with the
adapter exported to peft and loaded by ``PeftModel``, the logit difference to the full merged
model on 8 prompts: ``|l_peft - l_full| / |l_full - l_base|`` (Frobenius over all positions
and the vocabulary: how much of the merge's own effect on the logits is lost) and
``|l_peft - l_full| / |l_full|``.

    .venv/bin/python bench/adapter_output_rank.py [--model smollm2] [--rank 14] [--drift 0.02]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import graftkit as gk
from graftkit.assets import model_dir
from graftkit.io.hf import load_model, load_tokenizer

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at", "Once upon a time, a small robot",
           "The derivative of x squared is", "In 1969, astronauts", "To make bread you need", "The largest planet is"]
INPUTS = [("lora", {"r": 4, "lora_alpha": 8}), ("rslora", {"r": 8, "lora_alpha": 8, "use_rslora": True}),
          ("dora", {"r": 2, "lora_alpha": 4, "use_dora": True})]


def make_adapters(base: Path, root: Path, drift: float = 0.02) -> list[Path]:
    out = []
    for i, (name, cfg) in enumerate(INPUTS):
        model = load_model(base)
        torch.manual_seed(10 + i)
        gk.inject(model, gk.LoRAConfig(init_lora_weights=False, targets=["q_proj", "v_proj"], **cfg))
        with torch.no_grad():
            for site in gk.sites(model).values():
                w = site.base.float()
                lora = site.lora_B.float() @ site.lora_A.float() * site.scaling
                site.lora_B.mul_(0.03 * w.norm() / lora.norm())  # a delta of ~3% of the weight
                if site.dora:
                    norm = (w + site.lora_B.float() @ site.lora_A.float() * site.scaling).norm(dim=1)
                    site.lora_magnitude_vector.copy_(norm * (1 + drift * torch.randn_like(norm)))
        gk.save_adapter(model, root / name)
        out.append(root / name)
    return out


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[mask.bool()]


def main() -> None:
    from peft import PeftModel

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rank", type=int, default=14)
    ap.add_argument("--drift", type=float, default=0.02, help="the DoRA magnitude's relative noise around its weight norm")
    args = ap.parse_args()
    torch.set_num_threads(1)  # a busy 2-core machine: more threads only contend
    base = model_dir(args.model)
    tok = load_tokenizer(base)
    tok.pad_token = tok.pad_token or tok.eos_token
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    l_base = logits(load_model(base).eval(), ids, mask)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapters = make_adapters(base, root, args.drift)
        for method, params in (("task_arithmetic", {}), ("ties", {"density": 0.5})):
            cfg = {"merge_method": method, "base_model": str(base), "dtype": "float32",
                   "models": [{"model": str(a), "parameters": {"weight": 1.0, **params}} for a in adapters]}
            full = gk.merge(cfg, root / f"{method}_full")
            l_full = logits(load_model(full).eval(), ids, mask)
            for dora in (False, True):
                t = time.perf_counter()
                out = gk.merge({**cfg, "output": "adapter", "rank": args.rank, "dora": dora}, root / f"{method}_{dora}")
                seconds = time.perf_counter() - t
                err = json.loads((out / "adapter.json").read_text())["merge"]["relative_error"]["overall"]
                model = load_model(base)
                gk.load_adapter(model, out)
                gk.save_adapter(model, root / f"{method}_{dora}_peft", format="peft")
                peft_model = PeftModel.from_pretrained(load_model(base), root / f"{method}_{dora}_peft").eval()
                l_peft = logits(peft_model, ids, mask)
                row = {"merge": method, "output": "DoRA" if dora else "LoRA", "rank": args.rank, "svd_error": err,
                       "logit_diff_vs_merge_effect": float((l_peft - l_full).norm() / (l_full - l_base).norm()),
                       "logit_diff_vs_logits": float((l_peft - l_full).norm() / l_full.norm()),
                       "seconds": seconds}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"| merge (DoRA drift {args.drift}) | output at rank {args.rank} | SVD relative error | logit diff / merge effect | "
          "logit diff / logits | seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['merge']} | {r['output']} | {r['svd_error']:.3g} | {r['logit_diff_vs_merge_effect']:.3g} | "
              f"{r['logit_diff_vs_logits']:.3g} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
