"""graftkit: adapt pretrained models - tune, merge, localize and evaluate weight deltas.

``import graftkit as gk`` is cheap: torch and transformers load on first use of the API.

    model = gk.inject(model, gk.LoRAConfig(r=8, targets=["q_proj", "v_proj"]))
    ...train...
    gk.save_adapter(model, "out/adapter")             # or format="peft"
    gk.load_adapter(other_model, "out/adapter")       # native or peft folder
    delta = gk.materialize_delta(model)               # {param name: dense delta}
    gk.merge_adapter(model)                           # fold into the weights
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "inject": "adapter", "merge_adapter": "adapter", "unmerge_adapter": "adapter", "unload": "adapter",
    "disabled": "adapter", "set_adapter_enabled": "adapter", "materialize_delta": "adapter",
    "trainable_parameters": "adapter", "count_parameters": "adapter", "sites": "adapter", "get_state": "adapter",
    "save_adapter": "io", "load_adapter": "io", "read_adapter": "io", "export_merged": "io",
    "load_model": "io.hf", "load_tokenizer": "io.hf", "model_dir": "assets",
    "LoRAConfig": "methods", "IA3Config": "methods", "BitFitConfig": "methods", "FullConfig": "methods",
    "METHODS": "registry", "MERGES": "registry", "GraftError": "errors", "merge": "merge", "adapter_soup": "merge.soup",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        module = importlib.import_module(f"{__name__}.{_API[name]}")
        if _API[name] != "methods":
            importlib.import_module(f"{__name__}.methods")  # register every method
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'graftkit' has no attribute {name!r}")
