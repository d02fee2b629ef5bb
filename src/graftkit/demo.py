"""``graft demo``: LoRA-tune the packaged MiniLM on BBC News topics, then save and export it.

Everything runs offline on a CPU in a few minutes: the model (all-MiniLM-L6-v2) and the
data (2,225 BBC News articles in 5 topics) ship inside installed packages. The demo

1. splits the articles into class-balanced training and held-out sets (seeded),
2. puts a new 5-way classification head on MiniLM and LoRA adapters (r=8) on all 37 linear
   layers (attention, feed-forward, pooler), so that 1.5% of the parameters train,
3. measures held-out accuracy before training (random head) and after,
4. saves the adapter natively and as a peft folder, folds it into a plain Hugging Face
   model folder, reloads that with transformers alone and checks it predicts the same.

Training runs through ``graft train``'s recipe machinery (:mod:`graftkit.train`), with the
settings of ``examples/bbc_lora.yaml``; its metrics land in ``out/train``.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

SEED = 0
MODEL = "minilm"
MAX_LENGTH = 128  # tokens; most articles are longer and get truncated (the headline and lead survive)
BATCH_SIZE = 16
EVAL_BATCH_SIZE = 64
LR = 2e-3  # LoRA on a small encoder wants a far higher rate than full fine-tuning (5e-5)
WARMUP = 0.1  # share of the steps spent warming the rate up, then it decays linearly to 0
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, targets=["query", "key", "value", "dense"], train_also=["classifier"])
CHECK_BATCHES = 3  # held-out batches on which the merged export must agree with the adapter model

Example = tuple[str, str]


def batches(examples: Sequence[Example], tokenizer, label2id: dict[str, int], batch_size: int,
            generator: torch.Generator | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenized batches, padded to their longest member; shuffled when a generator is given."""
    order = torch.randperm(len(examples), generator=generator).tolist() if generator is not None else list(range(len(examples)))
    for i in range(0, len(order), batch_size):
        chunk = [examples[j] for j in order[i:i + batch_size]]
        enc = tokenizer([text for text, _ in chunk], truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt")
        enc["labels"] = torch.tensor([label2id[label] for _, label in chunk])
        yield dict(enc)


@torch.no_grad()
def evaluate(model: nn.Module, data: Sequence[Example], tokenizer, label2id: dict[str, int]) -> tuple[float, float, torch.Tensor]:
    """(accuracy, mean cross-entropy, logits) of ``model`` on ``data``."""
    model.eval()
    correct, loss_sum, n, all_logits = 0, 0.0, 0, []
    for batch in batches(data, tokenizer, label2id, EVAL_BATCH_SIZE):
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
        n += len(labels)
        all_logits.append(logits)
    return correct / max(n, 1), loss_sum / max(n, 1), torch.cat(all_logits)


def train_with_recipe(out: Path, data: Sequence[Example], labels: list[str], epochs: int, console) -> nn.Module:
    """Train through ``graft train``'s recipe machinery (the recipe is examples/bbc_lora.yaml's
    training part); returns the trained model. The training data goes to ``out/data/train.jsonl``
    and the run (metrics, checkpoint-free) to ``out/train``."""
    import json

    from .train import parse_recipe
    from .train.loop import Run

    data_file = out / "data" / "train.jsonl"
    data_file.parent.mkdir(parents=True, exist_ok=True)
    data_file.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in data))
    lora = {k: v for k, v in LORA.items() if k != "train_also"}  # the recipe adds the classification head itself
    recipe = parse_recipe({
        "model": MODEL, "task": "classification",
        "data": {"train": str(data_file), "labels": labels, "max_length": MAX_LENGTH},
        "method": {"method": "lora", **lora},
        "optim": {"lr": LR, "batch_size": BATCH_SIZE, "epochs": epochs, "warmup_ratio": WARMUP, "schedule": "linear",
                  "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": SEED},
        "output": {"dir": str(out / "train")},
    }, source="demo recipe")
    run = Run(recipe, overwrite=True, console=console)
    run.setup()
    run.fit()
    return run.acc.unwrap_model(run.module).model.eval()


def run_demo(out: Path, train_size: int = 400, eval_size: int = 300, epochs: int = 3) -> int:
    """Run the demo, writing ``out/adapter``, ``out/adapter-peft`` and ``out/merged``; 0 on success.

    Re-running replaces those three folders (and nothing else in ``out``).
    """
    from .errors import ConfigError

    if train_size < 1 or eval_size < 1 or epochs < 1:
        raise ConfigError(f"the demo needs train_size, eval_size and epochs >= 1 (got {train_size}, {eval_size}, {epochs})")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars would interleave with ours
    try:
        return _run(Path(out), train_size, eval_size, epochs)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _run(out: Path, train_size: int, eval_size: int, epochs: int) -> int:
    import transformers
    from rich.console import Console

    import graftkit as gk

    from .data import BBC_NEWS_CLASSES, bbc_news, stratified_split
    from .tensors import dir_size

    start = time.perf_counter()
    console = Console(highlight=False, soft_wrap=True)
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(SEED)

    labels = list(BBC_NEWS_CLASSES)
    label2id = {label: i for i, label in enumerate(labels)}
    id2label = dict(enumerate(labels))
    examples = bbc_news()
    train_set, held_out = stratified_split(examples, [train_size, eval_size], seed=SEED)
    console.print(f"[bold]graft demo[/bold]: LoRA-tune MiniLM (all-MiniLM-L6-v2) on BBC News topics ({', '.join(labels)})")
    console.print(f"data: {len(examples)} articles ({len(set(examples))} distinct); {len(train_set)} for training, {len(held_out)} held out "
                  f"(class-balanced, seed {SEED}); inputs truncated to {MAX_LENGTH} tokens")

    tokenizer = gk.load_tokenizer(MODEL)
    model = gk.load_model(MODEL, head="classification", num_labels=len(labels), id2label=id2label, label2id=label2id)
    gk.inject(model, gk.LoRAConfig(**LORA))
    trainable, total = gk.count_parameters(model)
    console.print(f"model: {type(model).__name__}, {total:,} base parameters; LoRA r={LORA['r']} alpha={LORA['lora_alpha']:g} "
                  f"on {len(gk.get_state(model).targets)} linear layers + the new classifier head: "
                  f"{trainable:,} trainable ({100 * trainable / total:.2f}%)")

    majority = Counter(label for _, label in train_set).most_common(1)[0][0]
    baseline = sum(label == majority for _, label in held_out) / len(held_out)
    console.print(f"majority-class baseline (always '{majority}'): held-out accuracy {baseline:.3f}")
    acc0, loss0, _ = evaluate(model, held_out, tokenizer, label2id)
    console.print(f"before training (random head): held-out accuracy {acc0:.3f}, loss {loss0:.4f}")

    console.print(f"training: {epochs} epoch(s), batch {BATCH_SIZE}, AdamW lr {LR:g}, linear schedule "
                  f"({int(WARMUP * 100)}% warm-up), {torch.get_num_threads()} CPU thread(s)")
    t_train = time.perf_counter()
    model = train_with_recipe(out, train_set, labels, epochs, console)
    t_train = time.perf_counter() - t_train
    acc1, loss1, logits1 = evaluate(model, held_out, tokenizer, label2id)
    console.print(f"after training ({t_train:.0f} s): held-out accuracy [bold]{acc1:.3f}[/bold], loss {loss1:.4f} "
                  f"(before {acc0:.3f}, majority baseline {baseline:.3f})")

    out.mkdir(parents=True, exist_ok=True)
    adapter_dir, peft_dir, merged_dir = out / "adapter", out / "adapter-peft", out / "merged"
    gk.save_adapter(model, adapter_dir, overwrite=True)
    gk.save_adapter(model, peft_dir, format="peft", overwrite=True)
    gk.export_merged(adapter_dir, MODEL, merged_dir, overwrite=True)

    # The merged folder must stand on its own: plain transformers, no graftkit, same answers.
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(merged_dir, dtype=torch.float32).eval()
    check = held_out[: CHECK_BATCHES * EVAL_BATCH_SIZE]
    targets = torch.tensor([label2id[label] for _, label in check])
    logits_a = logits1[: len(check)]  # the adapter model's logits on the same articles, same batches
    acc_a = (logits_a.argmax(-1) == targets).sum().item() / len(check)  # computed as evaluate() does
    acc_m, _, logits_m = evaluate(merged, check, tokenizer, label2id)
    diff = (logits_a - logits_m).abs().max().item()
    same = (logits_a.argmax(-1) == logits_m.argmax(-1)).float().mean().item()
    console.print(f"merged export reloaded with transformers.AutoModelForSequenceClassification, on {len(check)} held-out articles:")
    console.print(f"  adapter model accuracy {acc_a:.3f}, merged model accuracy {acc_m:.3f} "
                  f"({100 * same:.1f}% same predictions, max |logit difference| {diff:.1e})")
    ok = True
    if diff > 1e-3 or acc_a != acc_m:
        console.print("[red]error: the merged model does not compute what the adapter model computes[/red]")
        ok = False
    if merged.config.id2label != id2label:
        console.print(f"[red]error: the merged model's labels are {merged.config.id2label}, expected {id2label}[/red]")
        ok = False

    console.print("outputs:")
    size = lambda p: f"{dir_size(p) / 2**20:.1f} MB"  # noqa: E731
    console.print(f"  {adapter_dir}  graftkit adapter, {size(adapter_dir)} (gk.load_adapter(model, path); graft inspect {adapter_dir})")
    console.print(f"  {peft_dir}  the same adapter as a peft folder, {size(peft_dir)} (peft.PeftModel.from_pretrained)")
    console.print(f"  {merged_dir}  merged Hugging Face model folder, {size(merged_dir)} "
                  "(transformers.AutoModelForSequenceClassification.from_pretrained)")
    console.print(f"done in {time.perf_counter() - start:.0f} s")
    return 0 if ok else 1
