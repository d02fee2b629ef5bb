"""Merging fine-tuned models: per-tensor merge functions (one file per family), the mergekit-YAML
merge config, and the streaming engine behind ``graft merge`` / :func:`merge` (plan -> compute -> write,
fronted by :mod:`.api`).

Every function ``f(base, deltas, **params) -> tensor`` is registered in
:data:`graftkit.registry.MERGES`; see each module's docstring for its exact semantics and paper.
"""
from __future__ import annotations

from . import breadcrumbs, consensus, dare, linear, magnitude, pcb, slerp, ties  # noqa: F401  (registration)
from .breadcrumbs import breadcrumbs as breadcrumbs_merge, breadcrumbs_ties  # noqa: F401
from .consensus import consensus_ta, consensus_ties  # noqa: F401
from .dare import dare_linear, dare_ties  # noqa: F401
from .linear import linear as linear_merge, task_arithmetic  # noqa: F401
from .magnitude import magnitude_prune  # noqa: F401
from .pcb import pcb as pcb_merge  # noqa: F401
from .slerp import slerp as slerp_merge  # noqa: F401
from .ties import ties as ties_merge  # noqa: F401
from .fisher import fisher as fisher_merge  # noqa: F401  (data-aware: merge/data.py computes their statistics)
from .regmean import regmean as regmean_merge  # noqa: F401
from .adamerging import adamerging as adamerging_merge  # noqa: F401  (data-aware: learns its coefficients on the data block)
from .lorahub import lorahub as lorahub_merge  # noqa: F401  (data-aware: searches LoRA combination weights on the data block)
from .della import della as della_merge, della_linear  # noqa: F401  (registration, as the ones below)
from .model_stock import model_stock as model_stock_merge  # noqa: F401
from .passthrough import passthrough as passthrough_merge  # noqa: F401
from .ram import ram as ram_merge, ramplus_tl  # noqa: F401
from .sce import sce as sce_merge  # noqa: F401
from .arcee_fusion import arcee_fusion  # noqa: F401  (registration, as the ones below)
from .karcher import karcher as karcher_merge  # noqa: F401
from .multislerp import multislerp  # noqa: F401
from .nearswap import nearswap  # noqa: F401
from .nuslerp import nuslerp  # noqa: F401


def merge(config, out=None, **kwargs):
    """Run a merge described by a mergekit-style config (dict, YAML path or MergeConfig); return the output path."""
    from .api import run_merge

    return run_merge(config, out, **kwargs)


class _CallableModule(__import__("types").ModuleType):
    """``gk.merge(config, out)`` must work although importing this package makes ``graftkit.merge``
    the package itself: the package is callable and runs :func:`merge`."""

    def __call__(self, config, out=None, **kwargs):
        return merge(config, out, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
