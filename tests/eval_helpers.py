"""Shared pieces of the graft eval tests: tiny BERT classifiers with the packaged MiniLM tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers

import graftkit as gk
from graftkit.eval.config import ClassificationTask, TaskSpec

LABELS = ["business", "sports", "tech"]
TEXTS = ["shares fell sharply today", "the match ended in a draw", "a new phone was released",
         "profits rose this quarter", "the striker scored twice", "chips get faster every year", "ok"]
GOLD = ["business", "sports", "tech", "business", "sports", "tech", "sports"]


def bert(tok, seed=0, labels=LABELS, head=True, bias=None):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=128, num_labels=len(labels),
                                  id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    if not head:
        return transformers.BertModel(cfg).eval()
    model = transformers.BertForSequenceClassification(cfg).eval()
    if bias is not None:  # a constant classifier: the answer is argmax(bias) for every text
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.copy_(torch.tensor(bias, dtype=torch.float32))
    return model


def save(model, tok, folder: Path) -> str:
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def two_bert_experts(tok, root: Path) -> tuple[str, dict[str, str]]:
    """A tiny BERT base and two experts of it (3 and 2 labels: heads of different shapes), each
    the base plus noise (the heads moved more), saved as HF folders: (base, {"A": .., "B": ..})."""
    base = save(bert(tok, seed=0), tok, root / "base")
    experts = {}
    for i, (name, labels) in enumerate((("A", ["business", "sports", "tech"]), ("B", ["neg", "pos"]))):
        m = bert(tok, seed=0, labels=labels)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.add_(torch.randn(p.shape, generator=g) * (1.0 if n.startswith("classifier.") else 0.05))
        experts[name] = save(m, tok, root / name)
    return base, experts


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cls_file(tmp_path: Path, texts=TEXTS, gold=GOLD, name="test.jsonl") -> str:
    return write_jsonl(tmp_path / name, [{"text": t, "label": g} for t, g in zip(texts, gold)])


def task(file, name="topic", **kw) -> ClassificationTask:
    return TaskSpec(name=name, kind="classification", file=file, batch_size=3, max_length=32, **kw)


def plain_probs(model, tok, texts, max_length=32):
    """The reference: each text alone, no padding, truncated like graft train (ids[:max_length])."""
    out = []
    with torch.no_grad():
        for t in texts:
            ids = tok(t, truncation=False)["input_ids"][:max_length]
            out.append(torch.softmax(model(input_ids=torch.tensor([ids])).logits[0], -1).numpy())
    return np.stack(out)


def lora_adapter(tok, tmp_path: Path, base_seed=0, name="adapter"):
    """A LoRA adapter (non-zero B) with a trained head on the bare base of seed ``base_seed``."""
    model = bert(tok, seed=base_seed)  # ForSequenceClassification with a fresh head (as training makes it)
    folder = random_lora(model, tmp_path / name)
    return model, str(folder)


def random_lora(model, folder: Path) -> Path:
    """Inject a LoRA r=2 on query/value (head trained whole) into ``model``, draw B and the head at
    random (seed 7) so the delta is not zero, and save the adapter to ``folder``."""
    gk.inject(model, gk.LoRAConfig(r=2, lora_alpha=4, targets=["query", "value"], train_also=["classifier"]))
    torch.manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B") or n.startswith("classifier."):
                p.normal_(0, 0.5)
    return gk.save_adapter(model, folder)
