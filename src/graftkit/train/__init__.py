"""``graft train``: recipes (YAML) for fine-tuning on accelerate, with exact resume.

    from graftkit.train import load_recipe, train
    summary = train(load_recipe("examples/bbc_lora.yaml", ["optim.lr=1e-3"]))
"""
from __future__ import annotations

from .recipe import Recipe, apply_overrides, load_recipe, parse_recipe

__all__ = ["Recipe", "apply_overrides", "load_recipe", "parse_recipe", "train"]


def train(recipe, **kwargs):
    from .loop import train as _train

    if not isinstance(recipe, Recipe):
        recipe = parse_recipe(recipe)
    return _train(recipe, **kwargs)
