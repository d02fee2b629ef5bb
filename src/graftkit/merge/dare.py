"""DARE - Yu et al., 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous
Models as a Free Lunch".

Drop And REscale: each entry of each task vector is kept with probability ``density``
(dropped with ``p = 1 - density``) and survivors are multiplied by ``1/density`` (``rescale:
true``, the default), so ``E[tau_dare] = tau``. mergekit instead rescales to match the L1 norm
of the undropped delta; the two agree in expectation (the parity test checks kept fraction and
mean). The mask is drawn from a generator seeded per (seed, tensor, chunk, model), so a seeded
merge is reproducible whatever the thread scheduling; it compares raw random bits with
``density`` (exact keep probability, see :func:`graftkit.merge._common._draws`).

* ``dare_linear``: ``theta_0 + lambda * sum_i w_i tau_i_dare`` (divided by ``sum_i w_i`` when
  ``normalize``, off by default) - task arithmetic on dropped deltas.
* ``dare_ties``: TIES' sign election and disjoint merge on the dropped deltas (``normalize`` off
  by default, as in mergekit).

At density 1 they equal ``task_arithmetic`` and TIES-at-density-1.
"""
from __future__ import annotations

from ._common import Fused, torch, as_list, finish, generators, random_keep_, register

_PARAMS = ("weight", "density")
_GLOBAL = ("normalize", "rescale", "seed", {"lambda": 1.0, "int8_mask": False})
_CAPS = {"chunkable": True, "nan_propagating": True, "random": True, "paper": "arXiv:2311.03099"}


def drop(deltas: torch.Tensor, density, rescale: bool = True, seed: int | None = None, inplace: bool = False) -> torch.Tensor:
    n = deltas.shape[0]
    dens = as_list(density, n, "density")
    gens = generators(seed, n)
    out = deltas if inplace else deltas.clone()
    for i in range(n):
        if dens[i] < 1:
            random_keep_(out[i], dens[i], gens[i])
            if rescale:
                out[i].mul_(1.0 / dens[i])
    return out


def _drop_and_finish(base, deltas, weight, density, normalize, rescale, seed, inplace, consensus, lam):
    if not inplace:
        return finish(base, drop(deltas, density, rescale, seed), weight, consensus=consensus, normalize=normalize, lam=lam)
    # the executor's own buffer: drop in place and fold the 1/density rescale into the weighted sum
    dens = as_list(density, deltas.shape[0], "density")
    scale = [1.0 / d if rescale and d < 1 else 1.0 for d in dens]
    return finish(base, drop(deltas, dens, False, seed, inplace=True), weight, consensus=consensus, normalize=normalize,
                  lam=lam, inplace=True, scale=scale)


@register("dare_linear", model_params=_PARAMS, global_params=_GLOBAL, fused=Fused("merge_deltas", keep="random"), **_CAPS)
def dare_linear(base: torch.Tensor, deltas: torch.Tensor, *, weight=1.0, density=1.0, normalize: bool = False,
                rescale: bool = True, seed: int | None = None, inplace: bool = False, **kw) -> torch.Tensor:
    """Random drop (keep prob ``density``), rescale by ``1/density``, weighted sum."""
    return _drop_and_finish(base, deltas, weight, density, normalize, rescale, seed, inplace, False, kw.get("lambda", 1.0))


@register("dare_ties", model_params=_PARAMS, global_params=_GLOBAL, fused=Fused("merge_deltas", keep="random", consensus=True),
          **_CAPS)
def dare_ties(base: torch.Tensor, deltas: torch.Tensor, *, weight=1.0, density=1.0, normalize: bool = False,
              rescale: bool = True, seed: int | None = None, inplace: bool = False, **kw) -> torch.Tensor:
    """Random drop and rescale, then TIES sign election and disjoint merge."""
    return _drop_and_finish(base, deltas, weight, density, normalize, rescale, seed, inplace, True, kw.get("lambda", 1.0))
