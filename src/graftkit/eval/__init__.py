"""Evaluation: ``graft eval EVAL.yaml`` and its Python API.

``evaluate(config, out=None)`` runs an EVAL.yaml (models x tasks) and returns the summary;
``evaluate_model(model_spec, tasks, out_dir=None, cache=None)`` evaluates one model, reusing
an :class:`EvalCache` (task rows and tokenizations) across calls. Task kinds: classification
(accuracy, macro-F1, ECE), generation (exact match or a plug-in scorer), code (pass@k in a
sandbox) and perplexity. See docs/eval.md.

The names load lazily: importing ``graftkit.eval`` (or ``graftkit.eval.metrics``, which
``graft compare`` uses) does not import torch.
"""
from __future__ import annotations

from typing import Any

_LAZY = {
    "evaluate": "runner", "evaluate_model": "runner", "EvalCache": "runner",
    "EvalConfig": "config", "ModelSpec": "config", "TaskSpec": "config", "load_eval_config": "config",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
