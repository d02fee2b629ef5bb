"""Model folders for the merge tests: a tiny Llama base and fine-tunes (base + small noise), and
LoRA adapters of a tiny BERT with a classification head trained whole."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

import graftkit as gk
from conftest import tiny_bert, tiny_llama


def make_models(root: Path, n: int = 3, dtype=torch.float32, scale: float = 0.02, seed: int = 0) -> dict[str, Path]:
    paths = {}
    base = tiny_llama(seed).to(dtype)
    paths["base"] = root / "base"
    base.save_pretrained(paths["base"])
    for i in range(n):
        m = tiny_llama(seed).to(dtype)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_((torch.randn(p.shape, generator=g) * scale).to(dtype))
        paths[f"ft{i}"] = root / f"ft{i}"
        m.save_pretrained(paths[f"ft{i}"])
    return paths


MERGEKIT_DRIVER = r"""
import json, sys
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
import yaml
jobs, copy_tokenizer = json.loads(sys.argv[1]), sys.argv[2] == "1"
for cfg_path, out in jobs:
    with open(cfg_path) as f:
        cfg = MergeConfiguration.model_validate(yaml.safe_load(f))
    run_merge(cfg, out, MergeOptions(copy_tokenizer=copy_tokenizer, random_seed=0, quiet=True))
"""


def run_mergekit(jobs: list[tuple[str, str]], copy_tokenizer: bool = False) -> None:
    """The real mergekit's ``run_merge`` on every ``(config path, output folder)``, in one
    subprocess, so its import (seconds) is paid once per test module."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", MERGEKIT_DRIVER, json.dumps([[str(c), str(o)] for c, o in jobs]),
                        "1" if copy_tokenizer else "0"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def load_folder(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def lora_with_head(out: Path, num_labels: int, seed: int, fmt: str, head_shift: float = 0.0):
    """A LoRA adapter (query, value) of ``tiny_bert(0)`` with its ``num_labels`` head trained whole
    (``train_also``), saved as ``fmt``; returns the folder and the LoRA deltas without the head."""
    model = tiny_bert(0, num_labels=num_labels)
    torch.manual_seed(seed)
    gk.inject(model, gk.LoRAConfig(r=2, lora_alpha=4, init_lora_weights=False, targets=["query", "value"], train_also=["classifier"]))
    with torch.no_grad():
        for site in gk.sites(model).values():
            if hasattr(site, "lora_B"):
                site.lora_B.mul_(0.05)
        model.classifier.weight.add_(head_shift)  # a trained head, different from the base's
    gk.save_adapter(model, out, format=fmt)
    return out, gk.materialize_delta(model, include_heads=False)
