"""Tiny Llama model folders for the merge tests: a base and fine-tunes (base + small noise)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import tiny_llama


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


def load_folder(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
