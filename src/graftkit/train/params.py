"""Parameter counts of a tuning method on a model, without weights and without training.

``graft inspect --params RECIPE.yaml`` builds the model the recipe names from its config alone,
on torch's ``meta`` device (shapes, no storage: t5-base or a 7B model take the same fraction of
a second and no memory), injects the recipe's method the way ``graft train`` does (a
classification recipe's new head is trained whole) and counts with
:func:`graftkit.adapter.count_parameters`: trainable parameters, and the base model's
parameters (adapter tensors not included) as the total. A method whose set-up needs real values
(it reads the weights to initialise itself) falls back to uninitialised CPU memory of the same
shapes: still no weights read, but the model's size in RAM.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, GraftError


def skeleton(cls, config) -> nn.Module:
    """A model of class ``cls`` built from ``config`` on the meta device (no storage, no init cost)."""
    with torch.device("meta"):
        return cls(config)


def inject_counting(build, method: dict[str, Any]) -> tuple[nn.Module, str]:
    """``build()`` a skeleton and inject ``method``; returns the model and where it lives
    (``meta``, or ``cpu`` when the method's set-up needs values the meta device does not have)."""
    from ..adapter import inject

    model = build()
    try:
        return inject(model, method), "meta"
    except GraftError:
        raise
    except (NotImplementedError, RuntimeError):
        # e.g. an initialisation that copies weight values out ("Cannot copy out of meta tensor")
        model = build().to_empty(device="cpu")
        if hasattr(model, "tie_weights"):  # leaving the meta device made new Parameters: tie the shared ones again
            model.tie_weights()
        return inject(model, method), "cpu"


def method_parameters(cls, config, method: dict[str, Any]) -> dict[str, Any]:
    """Trainable / total / ratio of ``method`` (a config dict with a ``method`` key) on a
    ``cls(config)`` model, built without weights."""
    from ..adapter import count_parameters

    model, device = inject_counting(lambda: skeleton(cls, config), method)
    trainable, total = count_parameters(model)
    return {"trainable": trainable, "total": total, "ratio": trainable / total if total else 0.0, "device": device}


#: t5-base's shape (Raffel et al., 2020), for parameter counts without its weights
T5_BASE = dict(d_model=768, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12, d_kv=64, vocab_size=32128,
               feed_forward_proj="relu")


def t5_base_share(method: dict[str, Any]) -> tuple[int, int]:
    """``(trainable, total)`` of ``method`` (a config dict with a ``method`` key) on a
    T5ForConditionalGeneration of t5-base's shape, built without weights and without network.

    Compacter++ with the paper's settings (``reduction_factor: 32``, ``phm_dim: 4``, rank 1, PHM
    biases) trains 24 x 2376 + 64 = 57,088 parameters, 0.0256% of 222,903,552; with
    ``train_layer_norm: true`` (the paper's runs train the layer norms too) 103,168 = 0.0463%. The
    paper's 0.047% (104,704) also counts the encoder's and decoder's final layer norms (1,536),
    which sit outside the blocks and are not trained here."""
    import transformers

    counts = method_parameters(transformers.T5ForConditionalGeneration, transformers.T5Config(**T5_BASE), method)
    return counts["trainable"], counts["total"]


def _num_labels(recipe) -> tuple[int, str]:
    d = recipe.data
    if d.labels:
        return len(d.labels), "data.labels"
    from .data import _field, read_rows

    rows = read_rows(d.train, d.format)
    if d.limit:
        rows = rows[: d.limit]
    labels = {str(v) for v in _field(rows, d.label_field, d.train, "label")}
    if len(labels) < 2:
        raise ConfigError(f"{d.train} has {len(labels)} label(s); classification needs at least two")
    return len(labels), d.train


def recipe_parameters(recipe) -> dict[str, Any]:
    """What ``graft inspect --params`` prints for a parsed :class:`~graftkit.train.recipe.Recipe`."""
    from ..adapter import count_parameters, get_state, method_for
    from ..assets import model_dir
    from ..io.hf import model_class, model_config
    from .layerwise import freeze_bottom
    from .loop import _head_names

    path = model_dir(recipe.model)  # a missing folder or alias: one line
    config = model_config(recipe.model)
    cls = model_class(path, head=recipe.task)
    method = dict(recipe.method)
    labels = None
    if recipe.task == "classification":
        n, source = _num_labels(recipe)
        labels = {"count": n, "from": source}
        config.num_labels = n
        config.id2label = {i: str(i) for i in range(n)}
        config.label2id = {str(i): i for i in range(n)}

    def build():
        model = skeleton(cls, config)
        if recipe.task == "classification":  # as graft train does: the new head is trained whole
            also = list(method.get("train_also", method.get("modules_to_save", [])) or [])
            method.pop("modules_to_save", None)
            method["train_also"] = also + [h for h in _head_names(model) if h not in also]
        return model

    model, device = inject_counting(build, method)
    if recipe.layerwise and recipe.layerwise.freeze_bottom:
        freeze_bottom(model, recipe.layerwise.freeze_bottom)
    trainable, total = count_parameters(model)
    state = get_state(model)
    heads = set(state.train_also)
    head = sum(p.numel() for n, p in model.named_parameters() if n in heads and p.requires_grad)
    name, parsed = method_for(recipe.method)
    return {
        "kind": "params", "model": recipe.model, "class": cls.__name__, "method": name.name,
        "config": {k: v for k, v in parsed.model_dump(mode="json").items() if v not in ([], {}, None)},
        "targets": len(state.targets), "train_also": state.train_also, "head_parameters": head, "labels": labels,
        "trainable": trainable, "total": total, "ratio": trainable / total if total else 0.0, "device": device,
        "note": f"hft trains a fraction {recipe.hft.fraction} of these per stage" if recipe.hft else None,
    }
