"""Shared inputs of the bad-input corpus (tests/test_bad_input_corpus.py), and its tree snapshots.

:func:`build_shared` writes, once per test module, every input the corpus's cases read or copy:
tiny HF model folders (Llama for merge/export, BERT with the MiniLM tokenizer for train/eval),
a native LoRA adapter and a peft adapter on the Llama base, data files, a finished training run
and a ``graft eval`` output folder for compare. Cases never write into it: each case builds the
broken variant of an input in its own work folder (:class:`Ctx`), and the test compares a
snapshot of both folders before and after the failing command.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import stat
import threading
from pathlib import Path

import torch
import transformers
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

import graftkit as gk
from conftest import tiny_bert, tiny_llama

SMALL = 2 << 20  # files up to 2 MiB are hashed; bigger ones are compared by size and mtime
LEFTOVER = re.compile(r"^\..+\.(tmp|old)-")
WORDS = {"pos": "good great fine happy nice lovely".split(), "neg": "bad awful sad poor ugly grim".split()}
TOPICS = [("shares fell sharply today", "business"), ("the match ended in a draw", "sports"),
          ("a new phone was released", "tech"), ("profits rose this quarter", "business"),
          ("the striker scored twice", "sports"), ("chips get faster every year", "tech")]


# -- snapshots -------------------------------------------------------------------------------------

_DIGESTS: dict[tuple, str] = {}


def _digest(p: Path, st: os.stat_result) -> str:
    # any write moves ctime (which, unlike mtime, no one can set back), so an unchanged
    # (inode, size, mtime, ctime) means unchanged bytes and the hash need not be recomputed
    key = (str(p), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return _DIGESTS[key]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: kind, size, mtime and ctime (ns) and, for small files, the sha256."""
    snap = {}
    if not root.exists():
        return snap
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISDIR(st.st_mode):
                snap[rel] = ("dir",)
            elif stat.S_ISREG(st.st_mode):
                digest = _digest(p, st) if st.st_size <= SMALL else None
                snap[rel] = ("file", st.st_size, st.st_mtime_ns, st.st_ctime_ns, digest)
            else:
                snap[rel] = ("other", st.st_mode)
    return snap


def diff(before: dict, after: dict) -> list[str]:
    out = [f"removed {k}" for k in before if k not in after]
    out += [f"added {k}" for k in after if k not in before]
    out += [f"changed {k}" for k in before if k in after and before[k] != after[k]]
    return out


def leftovers(*roots: Path) -> list[str]:
    """Hidden ``.NAME.tmp-*`` / ``.NAME.old-*`` siblings anywhere under ``roots``."""
    return [str(p) for r in roots if r.exists() for p in r.rglob(".*") if LEFTOVER.match(p.name)]


# -- small writers ----------------------------------------------------------------------------------

def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_yaml(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cls_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        y = ["pos", "neg"][i % 2]
        rows.append({"text": " ".join(rng.choice(WORDS[y]) for _ in range(5)), "label": y})
    return rows


def edit_tensors(path: Path, edit) -> None:
    """Rewrite a safetensors file through ``edit(dict) -> dict``, keeping its metadata."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(edit(tensors), str(path), metadata=meta)


def first_key(path: Path, *parts: str) -> str:
    with safe_open(str(path), "pt") as f:
        return next(k for k in sorted(f.keys()) if all(p in k for p in parts))


class Fifo:
    """A named pipe with a writer that keeps opening and closing it, so that a reader that
    opens it by mistake reads an empty file instead of waiting forever (the test would hang)."""

    def __init__(self, path: Path):
        self.path = path
        os.mkfifo(path)
        self.stop = False
        self.thread = threading.Thread(target=self._feed, daemon=True)
        self.thread.start()

    def _feed(self):
        while not self.stop:
            try:
                os.close(os.open(self.path, os.O_WRONLY))
            except OSError:
                return

    def close(self):
        self.stop = True
        for _ in range(3):  # release a writer blocked in open()
            try:
                os.close(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK))
            except OSError:
                break
        self.thread.join(timeout=5)


# -- the shared inputs -------------------------------------------------------------------------------

def _noisy_llama(seed: int, noise_seed: int, scale: float = 0.02):
    m = tiny_llama(seed)
    g = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return m


def _wide_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def _cls_bert(tok, labels, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=128, num_labels=len(labels),
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  id2label=dict(enumerate(labels)), label2id={lab: i for i, lab in enumerate(labels)})
    return transformers.BertForSequenceClassification(cfg).eval()


def train_recipe(s: Path, out: Path, **over) -> dict:
    """A tiny classification recipe on ``s/bert`` (a few steps, checkpoints every 2)."""
    r = {"model": str(s / "bert"), "task": "classification",
         "data": {"train": str(s / "data" / "train.jsonl"), "validation": str(s / "data" / "val.jsonl"), "max_length": 16},
         "method": {"method": "lora", "r": 2, "lora_alpha": 4, "targets": ["query", "value"]},
         "optim": {"lr": 1e-3, "batch_size": 4, "max_steps": 4},
         "eval": {"every": None}, "output": {"dir": str(out), "checkpoint_every": 2}}
    for k, v in over.items():
        r[k] = {**r[k], **v} if isinstance(v, dict) and isinstance(r.get(k), dict) and k != "method" else v
    return r


def eval_config(s: Path, out: Path, models=None, tasks=None) -> dict:
    return {"models": models or [{"name": "base", "path": str(s / "cls_bert")}],
            "tasks": tasks or [{"name": "topic", "kind": "classification", "file": str(s / "data" / "test.jsonl"),
                                "batch_size": 4, "max_length": 32}],
            "output": str(out)}


def merge_config(s: Path, method: str = "linear", models=("llama_ft0", "llama_ft1"), base: str | None = "llama_base",
                 model_params: dict | None = None, **top) -> dict:
    cfg = {"merge_method": method}
    if base:
        cfg["base_model"] = str(s / base)
    cfg["models"] = [{"model": m if os.path.isabs(m) else str(s / m), "parameters": dict(model_params or {"weight": 1.0})}
                     for m in models]
    cfg.update(top)
    return cfg


def build_shared(root: Path) -> Path:
    """Write every shared input under ``root`` (takes a few seconds) and return it."""
    from graftkit.cli import main

    root.mkdir(parents=True, exist_ok=True)
    tiny_llama(0).save_pretrained(root / "llama_base")
    _noisy_llama(0, 100).save_pretrained(root / "llama_ft0")
    _noisy_llama(0, 101).save_pretrained(root / "llama_ft1")
    tiny_llama(1).save_pretrained(root / "llama_seed1")  # same shapes, another model
    _wide_llama().save_pretrained(root / "llama_wide")  # hidden 48 instead of 32
    tiny_bert(0).save_pretrained(root / "tiny_bert")  # another architecture, same vocab

    model = gk.inject(tiny_llama(0), gk.LoRAConfig(r=4, lora_alpha=8, targets=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in gk.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    gk.save_adapter(model, root / "lora")

    import peft

    pm = peft.get_peft_model(tiny_llama(0), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=False)).eval()
    pm.save_pretrained(root / "peft")

    tok = gk.load_tokenizer("minilm")
    bare = _cls_bert(tok, ["neg", "pos"]).bert  # a bare encoder: train adds the head from the labels
    bare.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    cls = _cls_bert(tok, ["business", "sports", "tech"])
    cls.save_pretrained(root / "cls_bert")
    tok.save_pretrained(root / "cls_bert")
    _cls_bert(tok, ["business", "sports", "tech"], seed=1).save_pretrained(root / "cls_bert_other")
    tok.save_pretrained(root / "cls_bert_other")
    cls_l = gk.inject(_cls_bert(tok, ["business", "sports", "tech"]), gk.LoRAConfig(r=2, lora_alpha=4, targets=["query", "value"]))
    with torch.no_grad():
        for n, p in cls_l.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.5)
    gk.save_adapter(cls_l, root / "cls_lora")

    write_jsonl(root / "data" / "train.jsonl", cls_rows(16, 0))
    write_jsonl(root / "data" / "val.jsonl", cls_rows(8, 1))
    write_jsonl(root / "data" / "test.jsonl", [{"text": t, "label": y} for t, y in TOPICS])
    # a study's test split must not share a text with its validation split
    write_jsonl(root / "data" / "study_test.jsonl", [{"text": f"held out example {i}", "label": ["neg", "pos"][i % 2]} for i in range(8)])

    # an eval output with two model folders (compare's inputs), made by the real command
    cfg = eval_config(root, root / "eval_out", models=[{"name": "base", "path": str(root / "cls_bert")},
                                                       {"name": "lora", "path": str(root / "cls_bert"),
                                                        "adapter": str(root / "cls_lora")}])
    write_yaml(root / "eval.yaml", cfg)
    code = main(["eval", str(root / "eval.yaml"), "--no-progress"])
    assert code == 0, "the shared eval run failed"

    # a finished training run with checkpoints (the target of --resume / --overwrite cases)
    write_yaml(root / "train.yaml", train_recipe(root, root / "train_run"))
    code = main(["train", str(root / "train.yaml"), "--no-progress"])
    assert code == 0, "the shared training run failed"
    write_yaml(root / "merge.yaml", merge_config(root))
    return root


class Ctx:
    """What a case's builder gets: the shared inputs ``s``, its own work folder ``w``, and helpers
    that put a changed copy of a shared input into ``w``."""

    def __init__(self, s: Path, w: Path):
        self.s, self.w = s, w
        self.fifos: list[Fifo] = []

    def copy(self, name: str, dest: str | None = None) -> Path:
        src, dst = self.s / name, self.w / (dest or Path(name).name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
        return dst

    def text(self, name: str, content: str) -> Path:
        p = self.w / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content)
        return p

    def bytes(self, name: str, content: bytes) -> Path:
        p = self.w / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)
        return p

    def yaml(self, name: str, data) -> Path:
        return write_yaml(self.w / name, data)

    def jsonl(self, name: str, rows) -> Path:
        return write_jsonl(self.w / name, rows)

    def fifo(self, name: str) -> Path:
        p = self.w / name
        p.parent.mkdir(parents=True, exist_ok=True)
        self.fifos.append(Fifo(p))
        return p

    def edit_json(self, path: Path, edit) -> Path:
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data, indent=2))
        return path

    def close(self):
        for f in self.fifos:
            f.close()
