"""APET: arbitrary few trainable parameters under a fixed mask.

Su et al., 2023, "Arbitrary Few Parameters are Good Enough for Adapting Large-scale Pre-trained
Language Models" (APET): the trainable parameters need no module structure; any set of the
pretrained entries of a given size adapts the model about as well, and fewer are needed as models
grow. graftkit realises it as

    theta = theta0 + M * delta

with a fixed mask ``M`` over the selected parameters holding exactly ``num_trainable`` entries (or
``fraction`` of them), drawn at random when the adapter is made (``structure: random``) or as whole
rows of each tensor (``structure: rows``: the first dimension of the stored tensor, i.e. output
neurons of a Linear weight). The mask is fixed by ``seed`` and each parameter's name, so every load
and every process draws the same one. The total is split over the targets in proportion to their
sizes (largest remainders), a stratified draw of the same size as one global draw.

Training is in place (methods/sparse.py): the gradient outside ``M`` is zeroed as it is produced, and
``graft train`` puts the frozen entries back to theta0 after each step (weight decay). The delta is
saved compactly, indices and values.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import AliasChoices, Field

from ..registry import METHODS
from ..targets import ParamInfo
from .base import MethodConfig, MethodTraining
from .sparse import SparseMethod, entries_wanted, random_positions, seeded_generator, sparse_sites, split_count


class APETConfig(MethodConfig):
    targets: list[str] = Field(default_factory=lambda: ["*"], validation_alias=AliasChoices("targets", "target_modules"))
    #: how many entries of the selected parameters train (or ``fraction`` of them; neither: 1%)
    num_trainable: int | None = None
    #: the share of the selected entries that trains, in (0, 1]
    fraction: float | None = None
    #: random entries, or whole rows of each tensor
    structure: Literal["random", "rows"] = "random"
    seed: int = 0


DEFAULT_FRACTION = 0.01


class APETTraining(MethodTraining):
    def after_update(self, model, step) -> bool:
        for site in sparse_sites(model).values():
            site.enforce()
        return False

    def report(self, model) -> dict[str, Any]:
        sites = sparse_sites(model).values()
        trained = sum(int(s.mask.numel()) if s.masked else s.base.numel() for s in sites)
        total = sum(s.base.numel() for s in sites)
        return {"trainable_entries": trained, "entries": total, "density": round(trained / total, 6) if total else 0.0}


@METHODS.register("apet")
class APET(SparseMethod):
    name = "apet"
    config_cls = APETConfig

    @classmethod
    def resolve(cls, model, config: APETConfig, skip=()):
        infos, options = super().resolve(model, config, skip)
        sizes = [i.param.numel() for i in infos]
        fraction = config.fraction if config.fraction is not None or config.num_trainable is not None else DEFAULT_FRACTION
        total = entries_wanted(cls.name, config.num_trainable, fraction, sum(sizes))
        for info, count in zip(infos, split_count(total, sizes)):
            opts = {"count": count}
            if config.structure == "rows":
                row = info.param[0].numel() if info.param.dim() > 1 else 1
                rows = min(info.param.shape[0], int(round(count / row)))
                opts = {"count": rows * row, "rows": rows}
            options[info.name] = opts
        return infos, options

    @classmethod
    def initial_mask(cls, info: ParamInfo, config: APETConfig, options: dict[str, Any]) -> torch.Tensor:
        g = seeded_generator(config.seed, info.name)
        p = info.param
        if "rows" in options:
            row = p[0].numel() if p.dim() > 1 else 1
            rows = random_positions(p.shape[0], int(options["rows"]), g)
            return (rows[:, None] * row + torch.arange(row)).reshape(-1)
        return random_positions(math.prod(p.shape), int(options.get("count", 0)), g)

    @classmethod
    def training(cls, config: Any) -> MethodTraining:
        return APETTraining()
