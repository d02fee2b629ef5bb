"""The bad-input corpus: one table of wrong inputs across every ``graft`` command.

Each row is (id, category, argv template, builder, needles). The builder puts the broken input
into the case's own work folder (shared inputs come from tests/corpus_fixtures.py); ``{s}`` in
the argv is the shared folder, ``{w}`` the work folder, other names come from the builder.
Every case must end the same way:

* exit status 2 and exactly one stderr line, starting ``graft: error:``, holding every needle
  (and none of the ``absent`` strings); no traceback, no "internal error";
* no output folder left (``out``), no ``.NAME.tmp-*`` / ``.NAME.old-*`` sibling anywhere;
* no input and no earlier output touched: the shared and work trees (sizes, mtimes, sha256 of
  small files) are the same before and after, which is what proves ``--overwrite`` onto an
  earlier output keeps it when the new run fails, and that an output equal to, inside or
  around an input is refused before anything is deleted.

The table runs in-process through ``graftkit.cli.main`` (a subprocess per case would cost a
torch import each); :func:`test_subprocess_matches` runs one case per command as the real
``python -m graftkit.cli`` and requires the same status and the same line.

``GRAFT_CORPUS_REPORT=path.md pytest tests/test_bad_input_corpus.py`` writes a per-category
report (cases, passing, the actual first line of each failing case); ``python
tests/test_bad_input_corpus.py`` prints the per-category counts of the table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402

from corpus_fixtures import (Ctx, build_shared, cls_rows, diff, edit_tensors, eval_config, first_key,  # noqa: E402
                             leftovers, merge_config, snapshot, train_recipe, write_jsonl)

NAN = float("nan")


def _noise(n: int) -> bytes:
    """``n`` random-looking bytes, the same on every run (a case must not pass or fail by chance)."""
    import random

    return random.Random(n).randbytes(n)


NOT_UTF8 = "caf\u00e9".encode("latin-1")  # b"caf\xe9": a Latin-1 e-acute, invalid as UTF-8


@dataclass
class Case:
    id: str
    category: str
    argv: list[str]
    build: Callable[[Ctx], dict | None] | None = None
    needles: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    out: str | None = "{w}/out"  # must not exist afterwards (unless it existed before: then unchanged)

    @property
    def command(self) -> str:
        return self.argv[0]


# -- builders ----------------------------------------------------------------------------------------

def _seq(*fs):
    def build(c: Ctx):
        extra = {}
        for f in fs:
            extra.update(f(c) or {})
        return extra
    return build


def merge_with(name="m.yaml", method="linear", models=("llama_ft0", "llama_ft1"), base="llama_base",
               model_params=None, **top):
    """A merge recipe: shared model names, or ``{w}/...`` / ``{s}/...`` paths; ``top`` adds top-level keys."""
    def build(c: Ctx):
        ms = [m.format(s=c.s, w=c.w) for m in models]
        b = base.format(s=c.s, w=c.w) if base else None
        c.yaml(name, merge_config(c.s, method, models=ms, base=b, model_params=model_params, **_fmt(top, c)))
    return build


def per_model(*params, method="task_arithmetic", **top):
    """Models ft0, ft1 with their own parameters."""
    def build(c: Ctx):
        cfg = merge_config(c.s, method, **top)
        for m, p in zip(cfg["models"], params):
            m["parameters"] = p
        c.yaml("m.yaml", cfg)
    return build


def model_copy(src="llama_ft0", dest="bad", mutate=None):
    """A copy of a shared model folder in the work folder, changed by ``mutate(path)``."""
    def build(c: Ctx):
        p = c.copy(src, dest)
        if mutate:
            mutate(p)
    return build


def rm(name):
    return lambda p: (p / name).unlink()


def put(name, content: bytes):
    return lambda p: (p / name).write_bytes(content)


def put_file(name, src: str):
    return lambda p: (p / name).write_bytes(Path(src).read_bytes())


def config_edit(**kv):
    def mutate(p: Path):
        cfg = json.loads((p / "config.json").read_text())
        cfg.update(kv)
        (p / "config.json").write_text(json.dumps(cfg))
    return mutate


# a custom architecture: transformers can build it only by running the folder's own modeling code
AUTO_MAP = config_edit(model_type="evilnet", architectures=["EvilForCausalLM"],
                       auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
                                 "AutoModelForSequenceClassification": "modeling_evil.EvilForSequenceClassification"})


def nan_tensor(fname: str, *parts: str):
    def mutate(p: Path):
        key = first_key(p / fname, *parts)
        edit_tensors(p / fname, lambda t: {**t, key: t[key] * NAN})
    return mutate


def reshape_tensor(fname: str, part: str, shape: tuple[int, ...]):
    import torch

    def mutate(p: Path):
        key = first_key(p / fname, part)
        edit_tensors(p / fname, lambda t: {**t, key: torch.zeros(shape)})
    return mutate


def index_outside(p: Path):
    """Shards listed by an index that points out of the folder (``../stolen/...``)."""
    from safetensors import safe_open

    weights = p / "model.safetensors"
    stolen = p.parent / "stolen"
    stolen.mkdir()
    weights.rename(stolen / "model.safetensors")
    with safe_open(str(stolen / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    (p / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "../stolen/model.safetensors" for k in keys}}))


def index_missing_shard(p: Path):
    from safetensors import safe_open

    with safe_open(str(p / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    (p / "model.safetensors").rename(p / "model-00001-of-00002.safetensors")
    (p / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f"model-0000{1 + (i % 2)}-of-00002.safetensors" for i, k in enumerate(keys)}}))


def peft_config_edit(**kv):
    def mutate(p: Path):
        cfg = json.loads((p / "adapter_config.json").read_text())
        cfg.update(kv)
        (p / "adapter_config.json").write_text(json.dumps(cfg))
    return mutate


def text(name, content):
    return lambda c: c.text(name, content) and None


def raw(name, content: bytes):
    return lambda c: c.bytes(name, content) and None


def fifo(name):
    return lambda c: c.fifo(name) and None


def folder(name):
    return lambda c: (c.w / name).mkdir(parents=True) or None


def earlier(src: str, dest: str = "out"):
    """An earlier output the failing command must leave byte-identical."""
    return lambda c: c.copy(src, dest) and None


def train_yaml(name="r.yaml", out="{w}/out", **over):
    def build(c: Ctx):
        r = train_recipe(c.s, Path(out.format(w=c.w, s=c.s)), **{k: _fmt(v, c) for k, v in over.items()})
        c.yaml(name, r)
    return build


def train_raw(mutate, name="r.yaml", out="{w}/out"):
    def build(c: Ctx):
        r = train_recipe(c.s, Path(out.format(w=c.w, s=c.s)))
        mutate(r, c)
        c.yaml(name, r)
    return build


def _fmt(v, c: Ctx):
    if isinstance(v, str):
        return v.format(w=c.w, s=c.s)
    if isinstance(v, dict):
        return {k: _fmt(x, c) for k, x in v.items()}
    if isinstance(v, list):
        return [_fmt(x, c) for x in v]
    return v


def trained_then(change):
    """A finished run in the work folder on work-folder data, then ``change(c)`` (before --resume)."""
    def build(c: Ctx):
        from graftkit.cli import main

        write_jsonl(c.w / "d" / "train.jsonl", _rows(16))
        write_jsonl(c.w / "d" / "val.jsonl", _rows(8, 1))
        r = train_recipe(c.s, c.w / "run", data={"train": str(c.w / "d" / "train.jsonl"), "validation": str(c.w / "d" / "val.jsonl")},
                         optim={"max_steps": 4}, output={"checkpoint_every": 2})
        c.yaml("r.yaml", r)
        assert main(["train", str(c.w / "r.yaml"), "--no-progress"]) == 0
        change(c)
    return build


def _rows(n, seed=0):
    return cls_rows(n, seed)


def eval_yaml(name="e.yaml", out="{w}/out", models=None, tasks=None, **top):
    def build(c: Ctx):
        cfg = eval_config(c.s, Path(out.format(w=c.w, s=c.s)), models=_fmt(models, c) if models else None,
                          tasks=_fmt(tasks, c) if tasks else None)
        cfg.update(_fmt(top, c))
        c.yaml(name, cfg)
    return build


def task_file(path="{w}/t.jsonl", **kw):
    t = {"name": "topic", "kind": "classification", "file": path, "batch_size": 4, "max_length": 32}
    t.update(kw)
    return [t]


def bert_model(path="{s}/cls_bert", **kw):
    return [{"name": "m", "path": path, **kw}]


def study_yaml(name="st.yaml", **over):
    def build(c: Ctx):
        r = {"name": "bad", "base": str(c.s / "bert"), "seed": 0,
             "tasks": [{"name": task, "files": {"train": str(c.s / "data" / "train.jsonl"), "validation": str(c.s / "data" / "val.jsonl"),
                                                "test": str(c.s / "data" / "study_test.jsonl")}} for task in ("one", "two")],
             "experts": [{"family": "lora", "method": {"method": "lora", "r": 2, "targets": ["query"]}, "optim": {"max_steps": 2}}],
             "merges": [{"method": "linear"}], "output": str(c.w / "out")}
        r.update(_fmt(over, c))
        c.yaml(name, r)
    return build


# -- the table --------------------------------------------------------------------------------------

M = ["merge", "{w}/m.yaml", "{w}/out"]
CASES: list[Case] = []


def case(id, category, argv, build=None, *needles, absent=(), out="{w}/out"):
    CASES.append(Case(id, category, list(argv), build, tuple(needles), tuple(absent), out))


# ---- CLI arguments (argparse) ----
case("cli-unknown-command", "CLI args", ["mergee"], None, "invalid choice", "merge", out=None)
case("cli-merge-unknown-flag", "CLI args", [*M, "--dry-runn"], merge_with(), "unrecognized arguments", "--dry-run", "graft merge --help")
case("cli-merge-missing-out", "CLI args", ["merge", "{w}/m.yaml"], merge_with(), "required", "out")
case("cli-merge-threads-not-int", "CLI args", [*M, "--threads", "many"], merge_with(), "--threads", "many")
case("cli-export-missing-base", "CLI args", ["export", "{s}/lora", "--merged", "{w}/out"], None, "--base", "required")
case("cli-export-missing-adapter", "CLI args", ["export"], None, "required", "adapter", out=None)
case("cli-import-missing-out", "CLI args", ["import-peft", "{s}/peft"], None, "required", "out", out=None)
case("cli-train-unknown-flag", "CLI args", ["train", "{s}/train.yaml", "--overwite"], None, "unrecognized", "--overwrite", out=None)
case("cli-eval-unknown-flag", "CLI args", ["eval", "{s}/eval.yaml", "--model", "x", "--bogus"], None, "unrecognized", "--bogus", out=None)
case("cli-compare-resamples-float", "CLI args", ["compare", "{s}/eval_out/base", "{s}/eval_out/lora", "--resamples", "1.5"], None,
     "--resamples", "invalid int", out=None)
case("cli-compare-confidence-word", "CLI args", ["compare", "{s}/eval_out/base", "{s}/eval_out/lora", "--confidence", "high"], None,
     "--confidence", "invalid float", out=None)
case("cli-compare-missing-b", "CLI args", ["compare", "{s}/eval_out/base"], None, "required", "B", out=None)
case("cli-study-missing-recipe", "CLI args", ["study"], None, "required", "study", out=None)
case("cli-demo-unknown-flag", "CLI args", ["demo", "--fast"], None, "unrecognized", "--fast", out=None)
case("cli-demo-out-without-value", "CLI args", ["demo", "--out"], None, "--out", "expected one argument", out=None)
case("cli-demo-extra-positional", "CLI args", ["demo", "--recipe", "now"], None, "unrecognized", "now", out=None)
case("cli-inspect-missing-path", "CLI args", ["inspect"], None, "required", "path", out=None)

# ---- inspect ----
case("inspect-missing", "missing files", ["inspect", "{w}/nope"], None, "nope", "does not exist", out=None)
case("inspect-empty-folder", "file kind", ["inspect", "{w}/hollow"], folder("hollow"), "hollow", "safetensors", out=None)
case("inspect-random-bytes-bin", "file kind", ["inspect", "{w}/random.bin"], raw("random.bin", bytes(range(256)) * 8),
     "random.bin", absent=("pickled PyTorch",), out=None)
case("inspect-etc-passwd", "file kind", ["inspect", "/etc/passwd"], None, "/etc/passwd", absent=("pickled PyTorch",), out=None)
case("inspect-fifo", "file kind", ["inspect", "{w}/pipe.safetensors"], fifo("pipe.safetensors"), "pipe.safetensors", "FIFO",
     absent=("does not exist",), out=None)
case("inspect-truncated-model", "corrupt weights", ["inspect", "{w}/bad"],
     model_copy(mutate=lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:2000])),
     "model.safetensors", out=None)
case("inspect-random-bytes-model", "corrupt weights", ["inspect", "{w}/bad"], model_copy(mutate=put("model.safetensors", _noise(4096))),
     "model.safetensors", out=None)
case("inspect-index-outside", "file kind", ["inspect", "{w}/bad"], model_copy(mutate=index_outside), "../stolen", out=None)
case("inspect-index-missing-shard", "missing files", ["inspect", "{w}/bad"], model_copy(mutate=index_missing_shard),
     "model-00002-of-00002.safetensors", out=None)
case("inspect-pickle-model", "pickle", ["inspect", "{w}/bad"], model_copy(mutate=lambda p: _torch_save(p)), "--allow-pickle", out=None)
case("inspect-adapter-json-not-json", "config value", ["inspect", "{w}/lora"], model_copy("lora", "lora", put("adapter.json", b"{not json")),
     "adapter.json", out=None)
case("inspect-adapter-json-not-utf8", "file encoding", ["inspect", "{w}/lora"],
     model_copy("lora", "lora", lambda p: (p / "adapter.json").write_bytes((p / "adapter.json").read_bytes().replace(b'"lora"', b'"lor\xe9"', 1))),
     "adapter.json", "UTF-8", out=None)
case("inspect-adapter-unknown-key", "unknown keys", ["inspect", "{w}/lora"],
     model_copy("lora", "lora", lambda p: (p / "adapter.json").write_text((p / "adapter.json").read_text().replace('"lora_alpha"', '"lora_alpah"'))),
     "'lora_alpah'", "lora_alpha", out=None)
case("inspect-peft-r-four", "config value", ["inspect", "{w}/peft"], model_copy("peft", "peft", peft_config_edit(r="four")),
     "adapter_config.json", "four", out=None)
case("inspect-peft-multitask-prompt", "unsupported", ["inspect", "{w}/peft"],
     model_copy("peft", "peft", peft_config_edit(peft_type="MULTITASK_PROMPT_TUNING", num_virtual_tokens=8)), "MULTITASK_PROMPT_TUNING", out=None)
case("inspect-peft-config-empty", "empty files", ["inspect", "{w}/peft"], model_copy("peft", "peft", put("adapter_config.json", b"")),
     "adapter_config.json", "empty", out=None)
case("inspect-adapter-no-weights", "missing files", ["inspect", "{w}/lora"], model_copy("lora", "lora", rm("adapter.safetensors")),
     "adapter.safetensors", out=None)

# ---- export ----
EXP = ["export", "{s}/lora", "--base", "{s}/llama_base"]
case("export-no-mode", "CLI args", ["export", "{s}/lora", "--base", "{s}/llama_base"], None, "--merged", "--peft", "--native", out=None)
case("export-two-modes", "CLI args", [*EXP, "--merged", "{w}/out", "--peft", "{w}/out2"], None, "exactly one")
case("export-adapter-missing", "missing files", ["export", "{w}/nope", "--base", "{s}/llama_base", "--merged", "{w}/out"], None, "nope", "does not exist")
case("export-adapter-is-file", "file kind", ["export", "{s}/merge.yaml", "--base", "{s}/llama_base", "--peft", "{w}/out"], None, "merge.yaml", "adapter")
case("export-base-missing", "missing files", ["export", "{s}/lora", "--base", "{w}/nobase", "--merged", "{w}/out"], None, "nobase")
case("export-wrong-base-merged", "adapter/base mismatch", ["export", "{s}/lora", "--base", "{s}/llama_seed1", "--merged", "{w}/out"], None,
     "different base model", "--force")
case("export-wrong-base-peft", "adapter/base mismatch", ["export", "{s}/lora", "--base", "{s}/llama_seed1", "--peft", "{w}/out"], None,
     "different base model", "--force")
case("export-wrong-width-force", "adapter/base mismatch", ["export", "{s}/lora", "--base", "{s}/llama_wide", "--merged", "{w}/out", "--force"],
     None, "shape")
case("export-adapter-wrong-rank", "adapter shapes", ["export", "{w}/lora", "--base", "{s}/llama_base", "--merged", "{w}/out"],
     model_copy("lora", "lora", reshape_tensor("adapter.safetensors", "lora_A", (2, 32))), "lora_A", "shape")
case("export-adapter-wrong-width", "adapter shapes", ["export", "{w}/lora", "--base", "{s}/llama_base", "--peft", "{w}/out"],
     model_copy("lora", "lora", reshape_tensor("adapter.safetensors", "lora_A", (4, 48))), "lora_A", "shape")
case("export-adapter-nan-merged", "non-finite weights", ["export", "{w}/lora", "--base", "{s}/llama_base", "--merged", "{w}/out"],
     model_copy("lora", "lora", nan_tensor("adapter.safetensors", "lora_B")), "NaN", "lora_B")
case("export-adapter-nan-native", "non-finite weights", ["export", "{w}/lora", "--base", "{s}/llama_base", "--native", "{w}/out"],
     model_copy("lora", "lora", nan_tensor("adapter.safetensors", "lora_A")), "NaN", "lora_A")
case("export-peft-nan-merged", "non-finite weights", ["export", "{w}/peft", "--base", "{s}/llama_base", "--merged", "{w}/out"],
     model_copy("peft", "peft", nan_tensor("adapter_model.safetensors", "lora_B")), "NaN")
case("export-max-shard-10XB", "config value", [*EXP, "--merged", "{w}/out", "--max-shard-size", "10XB"], None, "10XB")
case("export-max-shard-word", "config value", [*EXP, "--merged", "{w}/out", "--max-shard-size", "big"], None, "big", "2GB")
case("export-max-shard-negative", "config value", [*EXP, "--merged", "{w}/out", "--max-shard-size=-5MB"], None, "-5MB")
case("export-base-pickle", "pickle", ["export", "{s}/lora", "--base", "{w}/bad", "--merged", "{w}/out"],
     model_copy("llama_base", "bad", lambda p: _torch_save(p)), "pytorch_model.bin", "--allow-pickle")
case("export-base-no-config", "file kind", ["export", "{s}/lora", "--base", "{w}/bad", "--merged", "{w}/out"],
     model_copy("llama_base", "bad", rm("config.json")), "config.json")
case("export-base-random-weights", "corrupt weights", ["export", "{s}/lora", "--base", "{w}/bad", "--merged", "{w}/out"],
     model_copy("llama_base", "bad", put("model.safetensors", _noise(4096))), "model.safetensors")
case("export-base-passwd-bin", "file kind", ["export", "{s}/lora", "--base", "{w}/bad", "--merged", "{w}/out", "--allow-pickle"],
     model_copy("llama_base", "bad", lambda p: (rm("model.safetensors")(p), put_file("pytorch_model.bin", "/etc/passwd")(p))),
     "pytorch_model.bin", absent=("pickled PyTorch",))
case("export-base-auto-map", "remote code", ["export", "{s}/lora", "--base", "{w}/bad", "--merged", "{w}/out"],
     model_copy("llama_base", "bad", AUTO_MAP), "auto_map")
case("export-base-index-outside", "file kind", ["export", "{s}/lora", "--base", "{w}/bad", "--merged", "{w}/out"],
     model_copy("llama_base", "bad", index_outside), "../stolen")
case("export-out-exists", "output safety", [*EXP, "--merged", "{w}/out"], earlier("llama_ft0"), "already exists", "--overwrite")
case("export-out-below-file", "output safety", [*EXP, "--peft", "{w}/note.txt/out"], text("note.txt", "mine"), "note.txt", out="{w}/note.txt/out")
case("export-out-is-adapter", "output safety", ["export", "{w}/lora", "--base", "{s}/llama_base", "--native", "{w}/lora", "--overwrite"],
     model_copy("lora", "lora"), "is the adapter", out=None)
case("export-out-inside-adapter", "output safety", ["export", "{w}/lora", "--base", "{s}/llama_base", "--peft", "{w}/lora/peft", "--overwrite"],
     model_copy("lora", "lora"), "inside", out="{w}/lora/peft")
case("export-out-contains-adapter", "output safety", ["export", "{w}/box/lora", "--base", "{s}/llama_base", "--peft", "{w}/box", "--overwrite"],
     model_copy("lora", "box/lora"), "contains the adapter", out=None)
case("export-out-is-base", "output safety", ["export", "{s}/lora", "--base", "{w}/base", "--merged", "{w}/base", "--overwrite"],
     model_copy("llama_base", "base"), "is the base", out=None)
case("export-overwrite-keeps-earlier-merged", "overwrite keeps earlier output",
     ["export", "{s}/lora", "--base", "{s}/llama_seed1", "--merged", "{w}/out", "--overwrite"], earlier("llama_ft0"), "different base model")
case("export-overwrite-keeps-earlier-peft", "overwrite keeps earlier output",
     ["export", "{w}/lora", "--base", "{s}/llama_base", "--peft", "{w}/out", "--overwrite"],
     _seq(earlier("peft"), model_copy("lora", "lora", nan_tensor("adapter.safetensors", "lora_B"))), "NaN")


def _torch_save(p: Path):
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(p / "model.safetensors")), p / "pytorch_model.bin")
    (p / "model.safetensors").unlink()


# ---- import-peft ----
IMP = ["import-peft", "{w}/peft", "{w}/out"]
case("import-missing", "missing files", ["import-peft", "{w}/nope", "{w}/out"], None, "nope", "does not exist")
case("import-empty-folder", "missing files", IMP, folder("peft"), "adapter_config.json")
case("import-is-file", "file kind", ["import-peft", "{s}/merge.yaml", "{w}/out"], None, "merge.yaml", "adapter")
case("import-config-not-json", "config value", IMP, model_copy("peft", "peft", put("adapter_config.json", b"{r: 4")), "adapter_config.json", "JSON")
case("import-config-not-utf8", "file encoding", IMP, model_copy("peft", "peft", put("adapter_config.json", b'{"peft_type": "LOR\xc1"}')),
     "adapter_config.json", "UTF-8")
case("import-config-empty", "empty files", IMP, model_copy("peft", "peft", put("adapter_config.json", b"")), "adapter_config.json", "empty")
case("import-r-four", "config value", IMP, model_copy("peft", "peft", peft_config_edit(r="four")), "adapter_config.json", "four")
case("import-alpha-list", "config value", IMP, model_copy("peft", "peft", peft_config_edit(lora_alpha=[8])), "lora_alpha")
case("import-adaption-prompt", "unsupported", IMP, model_copy("peft", "peft", peft_config_edit(peft_type="ADAPTION_PROMPT")), "ADAPTION_PROMPT", "LORA")
case("import-truncated", "corrupt weights", IMP,
     model_copy("peft", "peft", lambda p: (p / "adapter_model.safetensors").write_bytes((p / "adapter_model.safetensors").read_bytes()[:300])),
     "adapter_model.safetensors")
case("import-random-weights", "corrupt weights", IMP, model_copy("peft", "peft", put("adapter_model.safetensors", _noise(2048))),
     "adapter_model.safetensors")
case("import-no-weights", "missing files", IMP, model_copy("peft", "peft", rm("adapter_model.safetensors")), "adapter_model")
case("import-nan", "non-finite weights", IMP, model_copy("peft", "peft", nan_tensor("adapter_model.safetensors", "lora_A")), "NaN", "lora_A")
case("import-wrong-rank", "adapter shapes", IMP, model_copy("peft", "peft", reshape_tensor("adapter_model.safetensors", "lora_B", (32, 2))),
     "lora_B", "(32, 2)")
case("import-pickle", "pickle", IMP,
     model_copy("peft", "peft", lambda p: _torch_save_file(p / "adapter_model.safetensors", p / "adapter_model.bin")), "--allow-pickle")
case("import-wrong-width-base", "adapter/base mismatch", [*IMP, "--base", "{s}/llama_wide"], model_copy("peft", "peft"), "shape")
case("import-base-missing", "missing files", [*IMP, "--base", "{w}/nobase"], model_copy("peft", "peft"), "nobase")
case("import-out-exists", "output safety", IMP, _seq(model_copy("peft", "peft"), earlier("lora")), "already exists", "--overwrite")
case("import-out-is-input", "output safety", ["import-peft", "{w}/peft", "{w}/peft", "--overwrite"], model_copy("peft", "peft"), "is the peft adapter", out=None)
case("import-out-inside-input", "output safety", ["import-peft", "{w}/peft", "{w}/peft/native", "--overwrite"], model_copy("peft", "peft"),
     "inside", out="{w}/peft/native")
case("import-out-contains-input", "output safety", ["import-peft", "{w}/box/peft", "{w}/box", "--overwrite"], model_copy("peft", "box/peft"),
     "contains the peft adapter", out=None)
case("import-overwrite-keeps-earlier", "overwrite keeps earlier output", [*IMP, "--overwrite"],
     _seq(earlier("lora"), model_copy("peft", "peft", nan_tensor("adapter_model.safetensors", "lora_B"))), "NaN")


def _torch_save_file(src: Path, dst: Path):
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(src)), dst)
    src.unlink()


# ---- merge: the recipe file ----
case("merge-recipe-missing", "missing files", ["merge", "{w}/nope.yaml", "{w}/out"], None, "nope.yaml", "does not exist")
case("merge-recipe-empty", "empty files", M, text("m.yaml", ""), "m.yaml", "empty")
case("merge-recipe-comments-only", "empty files", M, text("m.yaml", "# nothing yet\n\n"), "m.yaml", "empty")
case("merge-recipe-not-utf8", "file encoding", M, raw("m.yaml", b"merge_method: linear\n# " + NOT_UTF8 + b"\n"), "m.yaml", "UTF-8", "byte offset")
case("merge-recipe-bad-yaml", "config value", M, text("m.yaml", "merge_method: [linear\n"), "m.yaml", "YAML", "line")
case("merge-recipe-is-list", "config value", M, text("m.yaml", "- linear\n- ties\n"), "mapping")
case("merge-recipe-is-folder", "file kind", ["merge", "{s}/llama_base", "{w}/out"], None, "llama_base", "folder")
case("merge-recipe-fifo", "file kind", M, fifo("m.yaml"), "m.yaml", "FIFO", absent=("does not exist",))
case("merge-unknown-key", "unknown keys", M, merge_with(merge_methd="ties"), "merge_methd", "merge_method")
case("merge-unknown-method", "unknown keys", M, merge_with(method="tie"), "'tie'", "ties")
case("merge-unknown-parameter", "unknown keys", M, merge_with(method="ties", model_params={"weight": 1.0, "densty": 0.5}), "densty", "density")
case("merge-density-half", "config value", M, merge_with(method="ties", model_params={"weight": 1.0, "density": "half"}), "density", "half")
case("merge-density-above-1", "config value", M, merge_with(method="ties", model_params={"weight": 1.0, "density": 1.5}), "density", "1.5")
case("merge-density-zero", "config value", M, merge_with(method="dare_linear", model_params={"weight": 1.0, "density": 0.0}), "density")
case("merge-weight-nan", "config value", M, merge_with(model_params={"weight": NAN}), "weight", "finite")
case("merge-weight-string", "config value", M, merge_with(model_params={"weight": "heavy"}), "weight", "heavy")
case("merge-ta-all-weights-zero", "config value", M, merge_with(method="task_arithmetic", model_params={"weight": 0.0}), "weight", "0")
case("merge-breadcrumbs-gamma-density", "config value", M,
     merge_with(method="breadcrumbs", model_params={"weight": 1.0, "density": 0.9, "gamma": 0.2}), "gamma", "density")
case("merge-ties-no-base", "config value", M, merge_with(method="ties", base=None, model_params={"weight": 1.0, "density": 0.5}), "base_model")
case("merge-slerp-three", "config value", M, merge_with(method="slerp", models=("llama_ft0", "llama_ft1", "llama_seed1"), parameters={"t": 0.5}),
     "slerp", "exactly one")
case("merge-slerp-no-t", "config value", M, merge_with(method="slerp", models=("llama_ft0",)), "parameters.t")
case("merge-normalize-zero-sum", "config value", M, per_model({"weight": 1.0}, {"weight": -1.0}, method="linear", parameters={"normalize": True}),
     "sum", "normalize")
case("merge-bad-dtype", "config value", M, merge_with(dtype="float13"), "float13")
case("merge-slices", "unsupported", M, merge_with(slices=[{"sources": [{"model": "x", "layer_range": [0, 1]}]}]), "slices")
case("merge-exclude-matches-nothing", "config value", M, merge_with(exclude=["not_a_layer.*"]), "not_a_layer")
case("merge-output-adapter-no-rank", "config value", M, merge_with(method="task_arithmetic", models=("lora",), output="adapter"), "rank")
case("merge-output-adapter-full-inputs", "config value", M, merge_with(method="task_arithmetic", output="adapter", rank=4), "adapter")

# ---- merge: the inputs ----
case("merge-model-missing", "missing files", M, merge_with(models=("{w}/gone", "llama_ft1")), "gone", "does not exist")
case("merge-model-is-file", "file kind", M, merge_with(models=("{s}/merge.yaml", "llama_ft1")), "merge.yaml")
case("merge-model-no-config", "file kind", M, _seq(model_copy(mutate=rm("config.json")), merge_with(models=("{w}/bad", "llama_ft1"))),
     "config.json")
case("merge-model-empty-folder", "missing files", M, _seq(folder("hollow"), merge_with(models=("{w}/hollow", "llama_ft1"))), "hollow",
     "config.json")
case("merge-model-random-weights", "corrupt weights", M,
     _seq(model_copy(mutate=put("model.safetensors", bytes(range(256)) * 16)), merge_with(models=("{w}/bad", "llama_ft1"))), "model.safetensors")
case("merge-model-random-bin", "file kind", [*M, "--allow-pickle"],
     _seq(model_copy(mutate=lambda p: (rm("model.safetensors")(p), put("pytorch_model.bin", _noise(4096))(p))),
          merge_with(models=("{w}/bad", "llama_ft1"))), "pytorch_model.bin", absent=("pickled PyTorch",))
case("merge-model-passwd-bin", "file kind", [*M, "--allow-pickle"],
     _seq(model_copy(mutate=lambda p: (rm("model.safetensors")(p), put_file("pytorch_model.bin", "/etc/passwd")(p))),
          merge_with(models=("{w}/bad", "llama_ft1"))), "pytorch_model.bin", absent=("pickled PyTorch",))
case("merge-model-fifo-weights", "file kind", M,
     _seq(model_copy(mutate=rm("model.safetensors")), lambda c: c.fifo("bad/model.safetensors") and None,
          merge_with(models=("{w}/bad", "llama_ft1"))), "model.safetensors", "FIFO", absent=("does not exist",))
case("merge-model-truncated", "corrupt weights", M,
     _seq(model_copy(mutate=lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:5000])),
          merge_with(models=("{w}/bad", "llama_ft1"))), "model.safetensors")
case("merge-model-nan", "non-finite weights", M,
     _seq(model_copy(mutate=nan_tensor("model.safetensors", "q_proj")), merge_with(models=("{w}/bad", "llama_ft1"))), "NaN", "q_proj")
case("merge-model-wrong-width", "shape mismatch", M, merge_with(models=("llama_wide", "llama_ft1")), "shape")
case("merge-model-other-arch", "shape mismatch", M, merge_with(models=("tiny_bert", "llama_ft1")), "bert", "llama")
case("merge-model-custom-arch", "shape mismatch", M, _seq(model_copy(mutate=AUTO_MAP), merge_with(models=("{w}/bad", "llama_ft1"))),
     "evilnet", "llama")
case("merge-model-index-outside", "file kind", M, _seq(model_copy(mutate=index_outside), merge_with(models=("{w}/bad", "llama_ft1"))),
     "../stolen")
case("merge-model-index-missing-shard", "missing files", M,
     _seq(model_copy(mutate=index_missing_shard), merge_with(models=("{w}/bad", "llama_ft1"))), "model-00002-of-00002")
case("merge-model-pickle", "pickle", M, _seq(model_copy(mutate=_torch_save), merge_with(models=("{w}/bad", "llama_ft1"))),
     "pytorch_model.bin", "--allow-pickle")
case("merge-config-json-broken", "config value", M,
     _seq(model_copy(mutate=put("config.json", b"{\"model_type\": ")), merge_with(models=("{w}/bad", "llama_ft1"))), "config.json", "JSON")
case("merge-config-json-not-utf8", "file encoding", M,
     _seq(model_copy(mutate=lambda p: (p / "config.json").write_bytes((p / "config.json").read_bytes().replace(b"llama", b"ll\xe1ma", 1))),
          merge_with(models=("{w}/bad", "llama_ft1"))), "config.json", "UTF-8")
case("merge-adapter-wrong-base", "adapter/base mismatch", M, merge_with(method="task_arithmetic", models=("lora",), base="llama_seed1"),
     "different base model")
case("merge-adapter-wrong-rank", "adapter shapes", M,
     _seq(model_copy("lora", "lora", reshape_tensor("adapter.safetensors", "lora_A", (2, 32))),
          merge_with(method="task_arithmetic", models=("{w}/lora",))), "lora_A", "shape")
case("merge-adapter-wrong-width", "adapter shapes", M,
     _seq(model_copy("lora", "lora", reshape_tensor("adapter.safetensors", "lora_B", (48, 4))),
          merge_with(method="task_arithmetic", models=("{w}/lora",))), "lora_B", "shape")
case("merge-adapter-nan", "non-finite weights", M,
     _seq(model_copy("lora", "lora", nan_tensor("adapter.safetensors", "lora_B")), merge_with(method="task_arithmetic", models=("{w}/lora",))),
     "NaN")
case("merge-peft-wrong-base-width", "adapter/base mismatch", M, merge_with(method="task_arithmetic", models=("peft",), base="llama_wide"), "shape")
case("merge-adapter-no-base", "config value", M, merge_with(method="linear", models=("lora", "llama_ft1"), base=None), "base_model")
case("merge-tokenizer-source-missing", "missing files", M, merge_with(tokenizer_source="{w}/no_tok"), "no_tok")
case("merge-tokenizer-source-no-files", "tokenizer", M, merge_with(tokenizer_source="{s}/llama_ft1"), "tokenizer", "llama_ft1")
# union starts from the base's tokenizer: a base without one cannot be the start when another input has one
UNION_NO_BASE_TOK = _seq(model_copy(mutate=put("tokenizer.json", b"{}")), merge_with(models=("{w}/bad", "llama_ft1"), tokenizer_source="union"))
case("merge-tokenizer-union", "tokenizer", M, UNION_NO_BASE_TOK, "union", "no tokenizer files")
SLICES_PAST_END = lambda c: c.yaml("m.yaml", {"merge_method": "passthrough", "slices": [  # noqa: E731
    {"sources": [{"model": str(c.s / "llama_ft0"), "layer_range": [0, 2]}]},
    {"sources": [{"model": str(c.s / "llama_ft1"), "layer_range": [1, 3]}]}]}) and None
case("merge-slices-out-of-range", "config value", M, SLICES_PAST_END, "slices[1].sources[0]", "[1, 3]", "out of range", "2 layers")
case("merge-threads-negative", "CLI args", [*M, "--threads", "-3"], merge_with(), "--threads", "-3", "1 or more")
case("merge-threads-zero", "CLI args", [*M, "--threads", "0"], merge_with(), "--threads", "0 must", "1 or more")

case("merge-lambda-inf", "config value", M, merge_with(method="task_arithmetic", parameters={"lambda": float("inf")}), "lambda", "finite")
case("merge-exclude-bad-regex", "config value", M, merge_with(exclude=["re:(unclosed"]), "re:(unclosed", "regular expression")
case("merge-models-empty", "config value", M, lambda c: c.yaml("m.yaml", {**merge_config(c.s), "models": []}) and None, "model(s)")
case("merge-models-mapping", "wrong types", M,
     lambda c: c.yaml("m.yaml", {**merge_config(c.s), "models": {"model": str(c.s / "llama_ft0")}}) and None, "models")
case("merge-model-path-number", "wrong types", M,
     lambda c: c.yaml("m.yaml", {**merge_config(c.s), "models": [{"model": 123}, {"model": str(c.s / "llama_ft1")}]}) and None, "model")
case("merge-model-broken-symlink", "file kind", M,
     _seq(lambda c: os.symlink(c.w / "nowhere", c.w / "link"), merge_with(models=("{w}/link", "llama_ft1"))), "link")
case("merge-out-is-file-overwrite-fails", "overwrite keeps earlier output", [*M, "--overwrite"],
     _seq(text("out", "an earlier file output"), merge_with(models=("{w}/gone", "llama_ft1"))), "gone")

# ---- merge --dry-run runs the same checks ----
D = [*M, "--dry-run"]
case("dry-run-union", "dry-run parity", D, UNION_NO_BASE_TOK, "union", "no tokenizer files")
case("dry-run-slices-out-of-range", "dry-run parity", D, SLICES_PAST_END, "out of range", "2 layers")
case("dry-run-density-half", "dry-run parity", D, merge_with(method="ties", model_params={"weight": 1.0, "density": "half"}), "density")
case("dry-run-tokenizer-no-files", "dry-run parity", D, merge_with(tokenizer_source="{s}/llama_ft1"), "tokenizer")
case("dry-run-adapter-wrong-base", "dry-run parity", D, merge_with(method="task_arithmetic", models=("lora",), base="llama_seed1"),
     "different base model")
case("dry-run-model-nan", "dry-run parity", D,
     _seq(model_copy(mutate=nan_tensor("model.safetensors", "q_proj")), merge_with(models=("{w}/bad", "llama_ft1"))), "NaN")
case("dry-run-index-outside", "dry-run parity", D, _seq(model_copy(mutate=index_outside), merge_with(models=("{w}/bad", "llama_ft1"))),
     "../stolen")
case("dry-run-threads-zero", "dry-run parity", [*D, "--threads", "0"], merge_with(), "--threads", "1 or more")

# ---- merge: where the output goes ----
case("merge-out-exists", "output safety", M, _seq(merge_with(), earlier("llama_ft0")), "already exists", "--overwrite")
case("merge-out-is-base", "output safety", ["merge", "{w}/m.yaml", "{w}/base", "--overwrite"],
     _seq(model_copy("llama_base", "base"), merge_with(base="{w}/base")), "is the base_model", out=None)
case("merge-out-is-model", "output safety", ["merge", "{w}/m.yaml", "{w}/ft0", "--overwrite"],
     _seq(model_copy("llama_ft0", "ft0"), merge_with(models=("{w}/ft0", "llama_ft1"))), "is the model", out=None)
case("merge-out-contains-inputs", "output safety", ["merge", "{w}/m.yaml", "{w}/models", "--overwrite"],
     _seq(model_copy("llama_base", "models/base"), model_copy("llama_ft0", "models/ft0"),
          merge_with(models=("{w}/models/ft0", "llama_ft1"), base="{w}/models/base")), "contains the", out=None)
case("merge-out-inside-input", "output safety", ["merge", "{w}/m.yaml", "{w}/ft0/merged", "--overwrite"],
     _seq(model_copy("llama_ft0", "ft0"), merge_with(models=("{w}/ft0", "llama_ft1"))), "inside", out="{w}/ft0/merged")
case("merge-out-is-recipe", "output safety", ["merge", "{w}/m.yaml", "{w}/m.yaml", "--overwrite"], merge_with(), "is the merge config", out=None)
case("merge-overwrite-keeps-earlier-bad-value", "overwrite keeps earlier output", [*M, "--overwrite"],
     _seq(earlier("llama_ft0"), merge_with(method="ties", model_params={"weight": 1.0, "density": "half"})), "density")
case("merge-overwrite-keeps-earlier-nan", "overwrite keeps earlier output", [*M, "--overwrite"],
     _seq(earlier("llama_ft0"), model_copy(mutate=nan_tensor("model.safetensors", "v_proj")), merge_with(models=("{w}/bad", "llama_ft1"))),
     "NaN")
case("merge-overwrite-keeps-earlier-missing-input", "overwrite keeps earlier output", [*M, "--overwrite"],
     _seq(earlier("llama_ft0"), merge_with(models=("{w}/gone", "llama_ft1"))), "gone")

# ---- train ----
T = ["train", "{w}/r.yaml", "--no-progress"]
case("train-recipe-missing", "missing files", ["train", "{w}/nope.yaml"], None, "nope.yaml", "does not exist")
case("train-recipe-empty", "empty files", T, text("r.yaml", ""), "r.yaml", "empty")
case("train-recipe-not-utf8", "file encoding", T, raw("r.yaml", b"task: classification\nmodel: " + NOT_UTF8 + b"\n"), "r.yaml", "UTF-8")
case("train-recipe-bad-yaml", "config value", T, text("r.yaml", "model: [unclosed\n"), "YAML", "line")
case("train-recipe-is-folder", "file kind", ["train", "{s}/bert"], None, "bert", "folder")
case("train-recipe-is-list", "config value", T, text("r.yaml", "- model\n"), "mapping")
case("train-unknown-section", "unknown keys", T, train_raw(lambda r, c: r.update(optimiser={})), "optimiser", "did you mean 'optim'")
case("train-unknown-data-key", "unknown keys", T, train_raw(lambda r, c: r["data"].update(lables=["a"])), "lables", "labels")
case("train-unknown-method", "unknown keys", T, train_raw(lambda r, c: r["method"].update(method="lorra")), "lorra", "lora")
case("train-lr-word", "wrong types", T, train_raw(lambda r, c: r["optim"].update(lr="fast")), "lr")
case("train-batch-negative", "config value", T, train_raw(lambda r, c: r["optim"].update(batch_size=-1)), "batch_size")
case("train-r-string", "wrong types", T, train_raw(lambda r, c: r["method"].update(r="four")), "'r'")
case("train-task-unknown", "config value", T, train_raw(lambda r, c: r.update(task="regression")), "regression", "classification")
case("train-targets-nothing", "config value", T, train_raw(lambda r, c: r["method"].update(targets=["q_prj"])), "q_prj")
case("train-override-typo", "unknown keys", [*T, "optim.lrr=1e-3"], train_yaml(), "optim.lrr", "optim.lr")
case("train-override-not-kv", "CLI args", [*T, "lr"], train_yaml(), "key=value")
case("train-model-missing", "missing files", T, train_yaml(model="{w}/nomodel"), "nomodel")
case("train-model-no-config", "file kind", T, _seq(model_copy("bert", "bert", rm("config.json")), train_yaml(model="{w}/bert")), "config.json")
case("train-model-auto-map", "remote code", T, _seq(model_copy("bert", "bert", AUTO_MAP), train_yaml(model="{w}/bert")), "auto_map")
case("train-model-nan", "non-finite weights", T,
     _seq(model_copy("bert", "bert", nan_tensor("model.safetensors", "query")), train_yaml(model="{w}/bert")), "NaN")
case("train-data-missing", "missing files", T, train_yaml(data={"train": "{w}/missing.jsonl"}), "missing.jsonl", "does not exist")
case("train-data-empty", "empty files", T, _seq(text("t.jsonl", ""), train_yaml(data={"train": "{w}/t.jsonl"})), "t.jsonl", "empty")
case("train-data-blank-only", "empty files", T, _seq(text("t.jsonl", "\n\n  \n"), train_yaml(data={"train": "{w}/t.jsonl"})), "t.jsonl", "no rows")
case("train-data-not-utf8", "file encoding", T,
     _seq(raw("t.jsonl", b'{"text": "good", "label": "pos"}\n{"text": "' + NOT_UTF8 + b'", "label": "neg"}\n'),
          train_yaml(data={"train": "{w}/t.jsonl"})), "t.jsonl", "UTF-8", "byte offset 46", "line 2")
case("train-data-bad-line", "JSONL lines", T,
     _seq(text("t.jsonl", '{"text": "good", "label": "pos"}\n\n{"text": "bad", "label": "neg"}\n{"text": "oops"\n'),
          train_yaml(data={"train": "{w}/t.jsonl"})), "t.jsonl", "line 4")
case("train-data-not-object", "JSONL lines", T,
     _seq(text("t.jsonl", '{"text": "good", "label": "pos"}\n[1, 2]\n'), train_yaml(data={"train": "{w}/t.jsonl"})), "line 2")
case("train-data-not-gzip", "file kind", T, _seq(raw("t.jsonl.gz", b'{"text": "x"}\n'), train_yaml(data={"train": "{w}/t.jsonl.gz"})),
     "t.jsonl.gz", "gzip")
case("train-data-parquet-garbage", "file kind", T,
     _seq(raw("t.parquet", _noise(512)), train_yaml(data={"train": "{w}/t.parquet"})), "t.parquet")
case("train-data-unknown-suffix", "file kind", T, _seq(text("t.txt", "good\n"), train_yaml(data={"train": "{w}/t.txt"})), "t.txt", ".jsonl")
case("train-data-csv-no-text-column", "data rows", T,
     _seq(text("t.csv", "sentence,label\ngood,pos\nbad,neg\n"), train_yaml(data={"train": "{w}/t.csv"})), "t.csv", "text")
case("train-data-broken-symlink", "file kind", T,
     _seq(lambda c: os.symlink(c.w / "nowhere.jsonl", c.w / "t.jsonl"), train_yaml(data={"train": "{w}/t.jsonl"})), "t.jsonl", "symbolic link")
case("train-data-is-folder", "file kind", T, _seq(folder("t.jsonl"), train_yaml(data={"train": "{w}/t.jsonl"})), "t.jsonl", "folder")
case("train-data-fifo", "file kind", T, _seq(fifo("t.jsonl"), train_yaml(data={"train": "{w}/t.jsonl"})), "t.jsonl", "FIFO",
     absent=("does not exist",))
case("train-data-missing-label", "data rows", T,
     _seq(lambda c: c.jsonl("t.jsonl", _rows(6)[:3] + [{"text": "good"}] + _rows(6)[3:]) and None, train_yaml(data={"train": "{w}/t.jsonl"})),
     "'label'", "line 4")
case("train-data-mixed-labels", "data rows", T,
     _seq(lambda c: c.jsonl("t.jsonl", [{"text": "good", "label": 1}, {"text": "bad", "label": "neg"}] * 4) and None,
          train_yaml(data={"train": "{w}/t.jsonl"})), "label")
case("train-val-unknown-label", "data rows", T,
     _seq(lambda c: c.jsonl("v.jsonl", _rows(4) + [{"text": "so so", "label": "neutral"}]) and None,
          train_yaml(data={"validation": "{w}/v.jsonl"})), "'neutral'")
case("train-peft-export-full", "config value", T, train_raw(lambda r, c: (r.update(method={"method": "full"}), r["output"].update(export=["peft"]))),
     "peft", "full")
case("train-resume-and-overwrite", "resume", [*T, "--resume", "--overwrite"], train_yaml(out="{s}/train_run"), "--resume", "--overwrite", out=None)
case("train-resume-other-files", "resume", [*T, "--resume"], _seq(text("out/notes.txt", "mine"), train_yaml()), "cannot resume", out=None)
case("train-out-other-files", "output safety", T, _seq(text("out/notes.txt", "mine"), train_yaml()), "not a graftkit training run",
     absent=("--resume",), out=None)
case("train-out-holds-run", "output safety", T, _seq(model_copy("train_run", "out"), train_yaml()), "already holds", "--overwrite", out=None)
case("train-resume-data-shrunk", "resume", ["train", "{w}/r.yaml", "--no-progress", "--resume"],
     trained_then(lambda c: write_jsonl(c.w / "d" / "train.jsonl", _rows(6))), "train.jsonl", "changed", out=None)
case("train-resume-labels-changed", "resume", ["train", "{w}/r.yaml", "--no-progress", "--resume"],
     trained_then(lambda c: write_jsonl(c.w / "d" / "train.jsonl", _rows(12) + [{"text": "meh", "label": "neutral"}] * 4)),
     "label", out=None)
case("train-resume-different-recipe", "resume", ["train", "{w}/r.yaml", "--no-progress", "--resume", "optim.lr=0.5"],
     trained_then(lambda c: None), "different recipe", "optim.lr", out=None)
case("train-out-is-model", "output safety", [*T, "--overwrite"], _seq(model_copy("bert", "bert"), train_yaml(model="{w}/bert", out="{w}/bert")),
     "is the model", out=None)
case("train-out-inside-model", "output safety", [*T, "--overwrite"],
     _seq(model_copy("bert", "bert"), train_yaml(model="{w}/bert", out="{w}/bert/run")), "inside", out="{w}/bert/run")
case("train-out-contains-data", "output safety", [*T, "--overwrite"],
     _seq(lambda c: c.copy("data/train.jsonl", "run/train.jsonl") and None, train_yaml(out="{w}/run", data={"train": "{w}/run/train.jsonl"})),
     "contains the", "train.jsonl", out=None)
case("train-overwrite-keeps-earlier-missing-data", "overwrite keeps earlier output", [*T, "--overwrite"],
     _seq(model_copy("train_run", "out"), train_yaml(data={"train": "{w}/gone.jsonl"})), "gone.jsonl")
case("train-overwrite-keeps-earlier-bad-line", "overwrite keeps earlier output", [*T, "--overwrite"],
     _seq(model_copy("train_run", "out"), text("t.jsonl", '{"text": "x", "label": "pos"}\n{oops}\n'), train_yaml(data={"train": "{w}/t.jsonl"})),
     "line 2")

# ---- eval ----
E = ["eval", "{w}/e.yaml", "--no-progress"]
case("eval-config-missing", "missing files", ["eval", "{w}/nope.yaml"], None, "nope.yaml", "does not exist")
case("eval-config-empty", "empty files", E, text("e.yaml", ""), "e.yaml", "empty")
case("eval-config-not-utf8", "file encoding", E, raw("e.yaml", b"output: out\n# " + NOT_UTF8 + b"\n"), "e.yaml", "UTF-8")
case("eval-config-bad-yaml", "config value", E, text("e.yaml", "models: [\n"), "YAML")
case("eval-unknown-key", "unknown keys", E, eval_yaml(output_dir="x"), "output_dir")
case("eval-models-empty", "config value", E, lambda c: c.yaml("e.yaml", {**eval_config(c.s, c.w / "out"), "models": []}) and None, "models")
case("eval-task-kind-unknown", "config value", E, eval_yaml(tasks=task_file("{s}/data/test.jsonl", kind="regression")), "regression")
case("eval-task-name-bad", "config value", E, eval_yaml(tasks=task_file("{s}/data/test.jsonl", name="../up")), "../up")
case("eval-duplicate-model", "config value", E, eval_yaml(models=[{"name": "a", "path": "{s}/cls_bert"}, {"name": "a", "path": "{s}/cls_bert"}]),
     "'a'", "more than once")
case("eval-batch-zero", "config value", E, eval_yaml(tasks=task_file("{s}/data/test.jsonl", batch_size=0)), "batch_size")
case("eval-generation-bad-regex", "config value", E,
     eval_yaml(tasks=[{"name": "gen", "kind": "generation", "file": "{s}/data/test.jsonl", "extract": "(unclosed"}]), "extract", "regular expression")
case("eval-heads-unknown-task", "config value", E, eval_yaml(models=bert_model(heads={"nope": "{s}/cls_bert"})), "nope")
case("eval-task-limit-zero", "config value", E, eval_yaml(tasks=task_file("{s}/data/test.jsonl", limit=0)), "limit")
case("eval-task-file-missing", "missing files", E, eval_yaml(tasks=task_file("{w}/gone.jsonl")), "gone.jsonl", "does not exist")
case("eval-task-file-empty", "empty files", E, _seq(text("t.jsonl", ""), eval_yaml(tasks=task_file())), "t.jsonl", "empty")
case("eval-task-file-not-utf8", "file encoding", E,
     _seq(raw("t.jsonl", b'{"text": "' + NOT_UTF8 + b'", "label": "tech"}\n'), eval_yaml(tasks=task_file())), "t.jsonl", "UTF-8", "byte offset")
case("eval-task-file-bad-line", "JSONL lines", E,
     _seq(text("t.jsonl", '{"text": "a", "label": "tech"}\n\n{"text": "b", "label": "tech"\n'), eval_yaml(tasks=task_file())), "t.jsonl", "line 3")
case("eval-task-file-folder", "file kind", E, _seq(folder("t.jsonl"), eval_yaml(tasks=task_file())), "t.jsonl", "folder")
case("eval-task-file-fifo", "file kind", E, _seq(fifo("t.jsonl"), eval_yaml(tasks=task_file())), "t.jsonl", "FIFO", absent=("does not exist",))
case("eval-task-missing-label-field", "data rows", E,
     _seq(lambda c: c.jsonl("t.jsonl", [{"text": "a", "label": "tech"}, {"text": "b"}]) and None, eval_yaml(tasks=task_file())), "'label'", "line 2")
case("eval-task-unknown-label", "data rows", E,
     _seq(lambda c: c.jsonl("t.jsonl", [{"text": "a", "label": "tech"}, {"text": "b", "label": "weather"}]) and None, eval_yaml(tasks=task_file())),
     "'weather'")
case("eval-task-mixed-labels", "data rows", E,
     _seq(lambda c: c.jsonl("t.jsonl", [{"text": "a", "label": "tech"}, {"text": "b", "label": 1}]) and None, eval_yaml(tasks=task_file())), "label")
case("eval-model-missing", "missing files", E, eval_yaml(models=bert_model("{w}/nomodel")), "nomodel")
case("eval-model-no-config", "file kind", E, _seq(model_copy("cls_bert", "m", rm("config.json")), eval_yaml(models=bert_model("{w}/m"))), "config.json")
case("eval-model-auto-map", "remote code", E, _seq(model_copy("cls_bert", "m", AUTO_MAP), eval_yaml(models=bert_model("{w}/m"))), "auto_map")
case("eval-model-random-weights", "corrupt weights", E,
     _seq(model_copy("cls_bert", "m", put("model.safetensors", _noise(8192))), eval_yaml(models=bert_model("{w}/m"))), "model.safetensors")
case("eval-adapter-wrong-base", "adapter/base mismatch", E,
     eval_yaml(models=bert_model("{s}/cls_bert_other", adapter="{s}/cls_lora")), "different base model", "--force")  # graft eval --force exists
case("eval-adapter-wrong-rank", "adapter shapes", E,
     _seq(model_copy("cls_lora", "a", reshape_tensor("adapter.safetensors", "lora_A", (1, 32))), eval_yaml(models=bert_model(adapter="{w}/a"))),
     "lora_A", "shape")
case("eval-adapter-wrong-width", "adapter shapes", E,
     _seq(model_copy("cls_lora", "a", reshape_tensor("adapter.safetensors", "lora_B", (48, 2))), eval_yaml(models=bert_model(adapter="{w}/a"))),
     "lora_B", "shape")
case("eval-adapter-nan", "non-finite weights", E,
     _seq(model_copy("cls_lora", "a", nan_tensor("adapter.safetensors", "lora_B")), eval_yaml(models=bert_model(adapter="{w}/a"))), "NaN")
case("eval-adapter-missing", "missing files", E, eval_yaml(models=bert_model(adapter="{w}/noadapter")), "noadapter")
case("eval-unknown-task-flag", "CLI args", [*E, "--tasks", "topik"], eval_yaml(), "topik")
case("eval-unknown-model-flag", "CLI args", [*E, "--models", "bsae"], eval_yaml(), "bsae")
case("eval-out-is-model", "output safety", [*E, "--overwrite", "--out", "{w}/m"], _seq(model_copy("cls_bert", "m"), eval_yaml(models=bert_model("{w}/m"))),
     "inside the model", out=None)
case("eval-out-contains-task-file", "output safety", [*E, "--overwrite", "--out", "{w}/box"],
     _seq(lambda c: c.copy("data/test.jsonl", "box/t.jsonl") and None, eval_yaml(tasks=task_file("{w}/box/t.jsonl"))), "contains", "t.jsonl", out=None)
case("eval-out-inside-model", "output safety", [*E, "--overwrite", "--out", "{w}/m/eval"],
     _seq(model_copy("cls_bert", "m"), eval_yaml(models=bert_model("{w}/m"))), "inside", out="{w}/m/eval")
case("eval-overwrite-keeps-earlier", "overwrite keeps earlier output", [*E, "--overwrite"],
     _seq(earlier("eval_out"), eval_yaml(models=[{"name": "base", "path": "{s}/cls_bert"}], tasks=task_file("{w}/gone.jsonl"))), "gone.jsonl")
case("eval-overwrite-keeps-earlier-bad-adapter", "overwrite keeps earlier output", [*E, "--overwrite"],
     _seq(earlier("eval_out"), model_copy("cls_lora", "a", nan_tensor("adapter.safetensors", "lora_A")),
          eval_yaml(models=[{"name": "lora", "path": "{s}/cls_bert", "adapter": "{w}/a"}])), "NaN")

# ---- compare ----
C = ["compare", "{s}/eval_out/base", "{s}/eval_out/lora"]
case("compare-a-missing", "missing files", ["compare", "{w}/nope", "{s}/eval_out/lora"], None, "nope", "does not exist", out=None)
case("compare-a-is-file", "file kind", ["compare", "{s}/eval_out/summary.json", "{s}/eval_out/lora"], None, "summary.json", "graft eval", out=None)
case("compare-a-is-run-folder", "file kind", ["compare", "{s}/eval_out", "{s}/eval_out/lora"], None, "eval_out", "model folder", out=None)
case("compare-a-is-model", "file kind", ["compare", "{s}/cls_bert", "{s}/eval_out/lora"], None, "results.json", out=None)
case("compare-results-not-json", "config value", ["compare", "{w}/a", "{s}/eval_out/lora"],
     model_copy("eval_out/base", "a", put("results.json", b"{oops")), "results.json", out=None)
case("compare-results-not-utf8", "file encoding", ["compare", "{w}/a", "{s}/eval_out/lora"],
     model_copy("eval_out/base", "a", lambda p: (p / "results.json").write_bytes(b'{"model": "' + NOT_UTF8 + (p / "results.json").read_bytes()[1:])),
     "results.json", "UTF-8", out=None)
case("compare-results-empty", "empty files", ["compare", "{w}/a", "{s}/eval_out/lora"], model_copy("eval_out/base", "a", put("results.json", b"")),
     "results.json", "empty", out=None)
case("compare-predictions-missing", "missing files", ["compare", "{w}/a", "{s}/eval_out/lora"],
     model_copy("eval_out/base", "a", lambda p: (p / "predictions" / "topic.jsonl").unlink()), "topic.jsonl", out=None)
case("compare-predictions-bad-line", "JSONL lines", ["compare", "{w}/a", "{s}/eval_out/lora"],
     model_copy("eval_out/base", "a", lambda p: (p / "predictions" / "topic.jsonl").write_text(
         (p / "predictions" / "topic.jsonl").read_text() + "{broken\n")), "topic.jsonl", "line 7", out=None)
case("compare-different-examples", "data rows", ["compare", "{s}/eval_out/base", "{w}/b"],
     model_copy("eval_out/lora", "b", lambda p: (p / "predictions" / "topic.jsonl").write_text(
         "".join((p / "predictions" / "topic.jsonl").read_text().splitlines(keepends=True)[:3]))), "topic", out=None)
case("compare-confidence-out-of-range", "config value", [*C, "--confidence", "1.5"], None, "confidence", "1.5", out=None)
case("compare-resamples-zero", "config value", [*C, "--resamples", "0"], None, "resamples", out=None)
case("compare-expert-syntax", "CLI args", [*C, "--expert", "topic"], None, "TASK=DIR", out=None)
case("compare-expert-unknown-task", "config value", [*C, "--expert", "weather={s}/eval_out/lora"], None, "weather", out=None)
case("compare-base-missing", "missing files", [*C, "--base", "{w}/nobase"], None, "nobase", out=None)

# ---- study ----
S = ["study", "{w}/st.yaml", "--no-progress"]
case("study-recipe-missing", "missing files", ["study", "{w}/nope.yaml"], None, "nope.yaml", "does not exist")
case("study-recipe-empty", "empty files", S, text("st.yaml", ""), "st.yaml", "empty")
case("study-recipe-not-utf8", "file encoding", S, raw("st.yaml", b"name: " + NOT_UTF8 + b"\n"), "st.yaml", "UTF-8")
case("study-unknown-key", "unknown keys", S, study_yaml(expert=[]), "'expert'", "experts")
case("study-unknown-merge-method", "unknown keys", S, study_yaml(merges=[{"method": "tie"}]), "'tie'")
case("study-merge-density-half", "config value", S, study_yaml(merges=[{"method": "ties", "parameters": {"density": "half"}}]), "density")
case("study-tasks-empty", "config value", S, study_yaml(tasks=[]), "tasks")
case("study-unknown-corpus", "config value", S, study_yaml(tasks=[{"name": "x", "corpus": "no_such_corpus"}, {"name": "y", "corpus": "no_such_corpus"}]), "no_such_corpus")
case("study-task-file-missing", "missing files", S,
     study_yaml(tasks=[{"name": x, "files": {"train": "{w}/gone.jsonl", "validation": "{s}/data/val.jsonl", "test": "{s}/data/study_test.jsonl"}}
                       for x in ("x", "y")]),
     "gone.jsonl")
case("study-task-file-not-utf8", "file encoding", S,
     _seq(raw("t.jsonl", b'{"text": "' + NOT_UTF8 + b'", "label": "pos"}\n'),
          study_yaml(tasks=[{"name": x, "files": {"train": "{w}/t.jsonl", "validation": "{s}/data/val.jsonl", "test": "{s}/data/study_test.jsonl"}}
                            for x in ("x", "y")])),
     "t.jsonl", "UTF-8")
case("study-base-missing", "missing files", S, study_yaml(base="{w}/nobase"), "nobase")
case("study-confidence", "config value", S, study_yaml(evaluation={"confidence": 1.5}), "confidence")
case("study-base-head-labels", "config value", S, study_yaml(base="{s}/cls_bert"), "cls_bert", "label")
case("study-expert-unknown-method", "unknown keys", S, study_yaml(experts=[{"family": "x", "method": {"method": "lorra"}}]), "lorra")


# -- running a case ------------------------------------------------------------------------------------

RESULTS: dict[str, dict] = {}


def category_counts(cases: list[Case] = CASES) -> dict[str, int]:
    return dict(sorted(Counter(c.category for c in cases).items()))


def print_counts() -> None:
    counts = category_counts()
    for cat, n in counts.items():
        print(f"{cat:<32} {n}")
    print(f"{'total':<32} {sum(counts.values())}  ({len({c.command for c in CASES})} commands)")


def render(case: Case, s: Path, w: Path, extra: dict) -> list[str]:
    return [a.format(s=s, w=w, **extra) for a in case.argv]


def violations(case: Case, code, err: str, s: Path, w: Path, before: dict, existed: bool) -> list[str]:
    bad = []
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if code != 2:
        bad.append(f"exit status {code}, not 2")
    if len(lines) != 1:
        bad.append(f"{len(lines)} stderr lines, not 1")
    first = lines[0] if lines else ""
    if not first.startswith("graft: error:"):
        bad.append("the line does not start with 'graft: error:'")
    if "Traceback" in err or "internal error" in err:
        bad.append("traceback or internal error")
    for n in case.needles:
        if n.format(s=s, w=w) not in first:
            bad.append(f"missing {n!r}")
    for n in case.absent:
        if n in first:
            bad.append(f"says {n!r}")
    if case.out and not existed and Path(case.out.format(s=s, w=w)).exists():
        bad.append("an output was left")
    left = leftovers(s, w)
    if left:
        bad.append(f"leftovers: {left[:2]}")
    changed = [f"shared: {d}" for d in diff(before["s"], snapshot(s))] + [f"work: {d}" for d in diff(before["w"], snapshot(w))]
    if changed:
        bad.append(f"inputs or earlier output touched: {changed[:3]}")
    return bad


def prepare(case: Case, s: Path, w: Path) -> tuple[Ctx, list[str], dict, bool]:
    w.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(s, w)
    extra = (case.build(ctx) if case.build else None) or {}
    argv = render(case, s, w, extra)
    existed = bool(case.out) and Path(case.out.format(s=s, w=w)).exists()
    return ctx, argv, {"s": snapshot(s), "w": snapshot(w)}, existed


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = build_shared(tmp_path_factory.mktemp("corpus") / "shared")
    yield root
    report = os.environ.get("GRAFT_CORPUS_REPORT")
    if report:
        write_report(Path(report))


def _tripwire(*a, **k):
    raise RuntimeError("corpus tripwire: the command started training instead of refusing its input")


def run_inprocess(case: Case, s: Path, w: Path, capfd, monkeypatch) -> tuple[int | None, str, list[str], list[str]]:
    from graftkit.cli import main

    ctx, argv, before, existed = prepare(case, s, w)
    if case.command in ("study", "demo"):  # a recipe that slips through must not start a real study
        monkeypatch.setattr("graftkit.train.loop.train", _tripwire)
    monkeypatch.chdir(w)
    capfd.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's exit
        code = exc.code
    except BaseException as exc:  # noqa: BLE001 - record it as the case's outcome
        code = f"raised {type(exc).__name__}: {exc}"
    finally:
        ctx.close()
    _, err = capfd.readouterr()
    return code, err, argv, violations(case, code, err, s, w, before, existed)


def record(case: Case, code, err: str, bad: list[str]) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    RESULTS[case.id] = {"category": case.category, "command": case.command, "ok": not bad, "code": code,
                        "first": lines[0] if lines else "(no stderr)", "lines": len(lines), "problems": bad}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, shared, tmp_path, capfd, monkeypatch):
    code, err, argv, bad = run_inprocess(case, shared, tmp_path / "w", capfd, monkeypatch)
    record(case, code, err, bad)
    assert not bad, f"{case.id}: {'; '.join(bad)}\n  argv: graft {' '.join(argv)}\n  stderr: {err.strip()[:1500]}"


def test_corpus_size():
    counts = category_counts()
    assert len(CASES) >= 120 and len({c.id for c in CASES}) == len(CASES)
    commands = {c.command for c in CASES}
    assert commands >= {"inspect", "export", "import-peft", "merge", "train", "eval", "compare", "study", "demo"}, commands
    assert {"--merged", "--peft", "--native"} <= {a for c in CASES if c.command == "export" for a in c.argv}
    assert any("--dry-run" in c.argv for c in CASES)
    assert len(counts) >= 10, counts


# one case per command, run as the real process: same status and the same line as in-process
SUBSET = ["cli-merge-unknown-flag", "inspect-etc-passwd", "export-wrong-base-merged", "import-r-four", "merge-density-half",
          "merge-out-is-base", "train-data-bad-line", "eval-task-file-not-utf8", "compare-confidence-out-of-range",
          "study-recipe-missing", "cli-demo-unknown-flag"]


@pytest.mark.parametrize("case_id", SUBSET)
def test_subprocess_matches(case_id, shared, tmp_path, capfd, monkeypatch):
    case = next(c for c in CASES if c.id == case_id)
    w = tmp_path / "w"
    code, err, argv, _ = run_inprocess(case, shared, w, capfd, monkeypatch)
    before = {"s": snapshot(shared), "w": snapshot(w)}
    existed = bool(case.out) and Path(case.out.format(s=shared, w=w)).exists()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "graftkit.cli", *argv], cwd=w, env=env, capture_output=True, text=True, timeout=180)
    bad = violations(case, res.returncode, res.stderr, shared, w, before, existed)
    assert not bad, f"{case_id} as a process: {'; '.join(bad)}\n  stderr: {res.stderr.strip()[:1500]}"
    assert (res.returncode, res.stderr.strip()) == (code, err.strip()), "the real process and main() disagree"


# -- the report ------------------------------------------------------------------------------------------

def write_report(path: Path) -> None:
    by_cat: dict[str, list[tuple[Case, dict | None]]] = defaultdict(list)
    for c in CASES:
        by_cat[c.category].append((c, RESULTS.get(c.id)))
    ran = [r for r in RESULTS.values()]
    lines = ["# Bad-input corpus report", "",
             f"{len(CASES)} cases in {len(by_cat)} categories; {len(ran)} ran, {sum(r['ok'] for r in ran)} pass "
             "(exit 2, one `graft: error:` line with the expected words, nothing written or touched).",
             f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `GRAFT_CORPUS_REPORT=... pytest "
             "tests/test_bad_input_corpus.py` (every case's line: the .json beside this file).", "",
             "| category | cases | pass | fail | not run |", "|---|---|---|---|---|"]
    for cat, rows in sorted(by_cat.items()):
        ok = sum(1 for _, r in rows if r and r["ok"])
        fail = sum(1 for _, r in rows if r and not r["ok"])
        lines.append(f"| {cat} | {len(rows)} | {ok} | {fail} | {len(rows) - ok - fail} |")
    lines += ["", "## Failing cases", ""]
    for cat, rows in sorted(by_cat.items()):
        failing = [(c, r) for c, r in rows if r and not r["ok"]]
        if not failing:
            continue
        lines.append(f"### {cat}")
        lines.append("")
        for c, r in failing:
            first = r["first"].replace("|", "\\|")
            if len(first) > 300:
                first = first[:300] + " ..."
            lines.append(f"- `{c.id}` (exit {r['code']}, {r['lines']} line(s)): {'; '.join(r['problems'])}")
            lines.append(f"  - actual: `{first}`")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")
    # every case's outcome (passing ones too), for reading what the messages say
    path.with_suffix(".json").write_text(json.dumps({c.id: {**RESULTS[c.id], "argv": c.argv} for c in CASES if c.id in RESULTS}, indent=1))


if __name__ == "__main__":
    print_counts()
