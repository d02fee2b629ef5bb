"""Evaluation throughput: graftkit's ``evaluate_model`` vs a plain transformers loop, same data.

(a) classification: MiniLM (all-MiniLM-L6-v2) with a 5-way head on BBC News texts,
    max_length 128, batch 32. Plain loop: for each batch in file order, tokenize it
    (``truncation=True, max_length=128, padding=True``), ``model(**batch)``, argmax.
(b) generation: SmolLM2-135M-Instruct, greedy, 64 new tokens, chat template, on gsm_symbolic
    questions (reasoning-gym), batch 8. Plain loop: for each batch in file order, left-pad,
    ``model.generate(max_new_tokens=64, do_sample=False)``.

Both sides run in this process: once untimed (the process's first-call costs: imports,
kernel set-up), then alternately ``--repeats`` times; the best time of each is reported.
"cold" graftkit = a fresh :class:`EvalCache` (reads the file, loads the tokenizer, tokenizes);
"warm" = the cache of an earlier call (what a study that evaluates many models of one base
pays per model). Every timing includes loading the model (both sides), since
``evaluate_model`` loads it. Throughput: examples/s and tokens/s (classification: input tokens
without padding; generation: generated tokens up to EOS). Agreement of the predictions is
printed as a check that both sides computed the same thing.

    python bench/eval_throughput.py                 # both cases (~5 minutes on 2 idle cores)
    python bench/eval_throughput.py --case a --texts 96
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import peak_rss_mb  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def best(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def race(plain, spec: dict, task: dict, repeats: int):
    """Time the plain loop, graftkit with a fresh EvalCache (cold) and graftkit with a cache from
    an earlier call (warm), alternating so that machine load hits every side alike; after one
    untimed call of each for first-call costs. Returns the best seconds per side, the plain
    loop's output, graftkit's result for the task and the warm cache."""
    from graftkit.eval import EvalCache, evaluate_model

    warm_cache = EvalCache()
    sides = {"plain": plain,
             "cold": lambda: evaluate_model(spec, [task], cache=EvalCache())[task["name"]],
             "warm": lambda: evaluate_model(spec, [task], cache=warm_cache)[task["name"]]}
    for fn in sides.values():
        fn()
    times: dict[str, list[float]] = {key: [] for key in sides}
    outs: dict = {}
    for _ in range(repeats):
        for key, fn in sides.items():
            t, outs[key] = best(fn, 1)
            times[key].append(t)
    return {key: min(v) for key, v in times.items()}, outs["plain"], outs["warm"], warm_cache


# -- (a) classification ---------------------------------------------------------------------------

def case_a(tmp: Path, n_texts: int, repeats: int) -> dict:
    import torch
    import transformers

    import graftkit as gk
    from graftkit.data import bbc_news

    data = bbc_news()
    step = max(1, len(data) // n_texts)
    rows = [{"text": t, "label": l} for t, l in data[::step][:n_texts]]
    labels = sorted({r["label"] for r in rows})
    file = tmp / "bbc.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # MiniLM with a seeded 5-way head, saved as an ordinary HF folder (the model under test)
    torch.manual_seed(0)
    model = gk.load_model("minilm", head="classification", num_labels=len(labels), id2label=dict(enumerate(labels)),
                          label2id={l: i for i, l in enumerate(labels)})
    folder = tmp / "minilm-head"
    model.save_pretrained(folder)
    gk.load_tokenizer("minilm").save_pretrained(folder)
    del model
    task = {"name": "bbc", "kind": "classification", "file": str(file), "max_length": 128, "batch_size": 32}
    spec = {"name": "m", "path": str(folder)}

    def plain():
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        m = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
        texts = [json.loads(l)["text"] for l in file.read_text().splitlines()]
        preds, tokens = [], 0
        with torch.inference_mode():
            for i in range(0, len(texts), 32):
                batch = tok(texts[i:i + 32], truncation=True, max_length=128, padding=True, return_tensors="pt")
                tokens += int(batch["attention_mask"].sum())
                preds += [m.config.id2label[int(x)] for x in m(**batch).logits.argmax(-1)]
        return preds, tokens

    seconds, (preds, tokens), res, warm_cache = race(plain, spec, task, repeats)
    g_tokens = sum(min(len(ids), 128) for ids in warm_cache._encoded[next(iter(warm_cache._encoded))])
    agree = sum(r["prediction"] == p for r, p in zip(res["rows"], preds)) / len(preds)
    return {"n": len(rows), "plain_s": seconds["plain"], "cold_s": seconds["cold"], "warm_s": seconds["warm"],
            "plain_tokens": tokens, "graft_tokens": g_tokens, "agreement": agree}


# -- (b) generation -------------------------------------------------------------------------------

def case_b(tmp: Path, n_prompts: int, new_tokens: int, repeats: int) -> dict:
    import reasoning_gym
    import torch
    import transformers

    from graftkit.assets import model_dir

    folder = model_dir("smollm2")
    questions = [x["question"] for x in reasoning_gym.create_dataset("gsm_symbolic", size=n_prompts, seed=5)]
    file = tmp / "gsm.jsonl"
    file.write_text("".join(json.dumps({"prompt": q, "answer": "-"}) + "\n" for q in questions))
    task = {"name": "gsm", "kind": "generation", "file": str(file), "chat": True, "max_new_tokens": new_tokens,
            "batch_size": 8}
    spec = {"name": "smollm2", "path": "smollm2"}

    def plain():
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        tok.padding_side = "left"
        m = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        texts, tokens = [], 0
        with torch.inference_mode():
            for i in range(0, len(questions), 8):
                prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
                           for q in questions[i:i + 8]]
                batch = tok(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
                out = m.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
                gen = out[:, batch["input_ids"].shape[1]:]
                for row in gen.tolist():
                    n = next((j + 1 for j, t in enumerate(row) if t == eos), len(row))
                    tokens += n
                texts += tok.batch_decode(gen, skip_special_tokens=True)
        return texts, tokens

    seconds, (texts, tokens), res, _ = race(plain, spec, task, repeats)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    g_tokens = sum(min(new_tokens, len(tok(r["output"], add_special_tokens=False)["input_ids"]) + 1) for r in res["rows"])
    same = sum(r["output"] == t for r, t in zip(res["rows"], texts)) / len(texts)
    return {"n": len(questions), "plain_s": seconds["plain"], "cold_s": seconds["cold"], "warm_s": seconds["warm"],
            "plain_tokens": tokens, "graft_tokens": g_tokens, "agreement": same}


def report(title: str, r: dict, token_kind: str) -> None:
    print(f"\n{title}  (n={r['n']}, best of the repeats, model loading included)")
    print(f"  {'side':<26}{'seconds':>9}{'examples/s':>12}{token_kind + '/s':>22}{'vs plain':>10}")
    rows = [("plain transformers loop", r["plain_s"], r["plain_tokens"]), ("graftkit (cold cache)", r["cold_s"], r["graft_tokens"]),
            ("graftkit (warm cache)", r["warm_s"], r["graft_tokens"])]
    for name, s, tokens in rows:
        print(f"  {name:<26}{s:>9.2f}{r['n'] / s:>12.1f}{tokens / s:>22.1f}{r['plain_s'] / s:>9.2f}x")
    print(f"  predictions that agree with the plain loop: {100 * r['agreement']:.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=["a", "b", "both"], default="both")
    ap.add_argument("--texts", type=int, default=320)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch
    import transformers

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.case in ("a", "both"):
            report("(a) classification: MiniLM + 5-way head, BBC News, max_length 128, batch 32",
                   case_a(Path(tmp), args.texts, args.repeats), "input tokens")
        if args.case in ("b", "both"):
            report(f"(b) generation: SmolLM2-135M-Instruct, greedy, {args.new_tokens} new tokens, chat, batch 8",
                   case_b(Path(tmp), args.prompts, args.new_tokens, args.repeats), "generated tokens")
    print(f"\npeak RSS of this process: {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
