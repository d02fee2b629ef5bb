"""FSDP2 for ``graft train``: which runs shard, how, and moving tensors in and out of shards.

A run is sharded when accelerate's config asks for FSDP (``accelerate launch --use_fsdp
--fsdp_version 2``, or ``distributed_type: FSDP`` in its config file):

* on GPUs accelerate itself shards the model (``Accelerator.is_fsdp2``); the loop hands it
  the model and the optimizer together, as accelerate's FSDP2 requires;
* on CPUs accelerate sets up plain DDP over gloo whatever the config says (it enables FSDP
  only for accelerator devices), so graftkit applies torch's ``fully_shard`` itself, the
  same way: one FSDP unit per transformer block (blocks sharing a parameter, such as
  Compacter's shared PHM rule, form one unit), then the root.

Either way the parameters become ``DTensor`` shards, and the rest of the loop meets them in
two places, both handled here: checkpoints gather whole tensors (so a checkpoint is the same
file whatever the sharding) and cut them again on resume; evaluation (loss and greedy
generation) and saving the adapter run with every unit gathered. FSDP version 1 is refused:
it flattens parameters, which the adapter sites (hooks that look their base weight up by
name) do not survive. Of accelerate's FSDP options the CPU path reads the version and
``reshard_after_forward``; activation checkpointing is the recipe's
``optim.gradient_checkpointing``.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
from torch import nn

from ..errors import ConfigError


VERSION_ERROR = ("graft train supports FSDP version 2 only: pass --fsdp_version 2 to accelerate launch "
                 "(or set fsdp_version: 2 in its config file)")


def check_config() -> None:
    """Refuse FSDP version 1 before accelerate builds anything (on CPU its set-up fails obscurely)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and os.environ.get("FSDP_VERSION", "2") != "2":
        raise ConfigError(VERSION_ERROR)


def requested(acc) -> str | None:
    """``"accelerate"`` (accelerate shards), ``"cpu"`` (graftkit shards) or ``None`` (no FSDP)."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP:
        if not acc.is_fsdp2:
            raise ConfigError(VERSION_ERROR)
        return "accelerate"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or acc.num_processes < 2:
        return None
    return "cpu"


def block_classes(model: nn.Module) -> set[type]:
    """The transformer block classes (transformers names them in ``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not found:
        raise ConfigError(f"{type(model).__name__} names no transformer block class (_no_split_modules); "
                          "FSDP needs one to shard by block")
    return found


@torch.no_grad()
def sync_from_rank0(model: nn.Module) -> None:
    """Give every process process 0's parameters and buffers (accelerate's ``sync_module_states``).

    With accelerate's ``cpu_ram_efficient_loading`` transformers initialises weights on process 0
    only and leaves some of the others' on the meta device (a new head's, for one); those get
    memory here, then everything is broadcast, so the shards cut next agree whatever each
    process loaded or initialised."""
    import torch.distributed as dist

    made: dict[int, torch.Tensor] = {}  # tied tensors stay tied
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in list(table.items()):
                if t is None or not t.is_meta:
                    continue
                if id(t) not in made:
                    empty = torch.empty_like(t, device="cpu")
                    made[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
                table[name] = made[id(t)]
    seen: set[int] = set()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen and t.numel():
            seen.add(id(t))
            dist.broadcast(t.data, src=0)


def shard(root: nn.Module, model: nn.Module, device: torch.device) -> nn.Module:
    """``fully_shard`` each transformer block of ``model``, then ``root`` (which holds ``model``)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # FSDP_RESHARD_AFTER_FORWARD: accelerate's name for FULL_SHARD (true) vs SHARD_GRAD_OP (false)
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "true"
    for unit in units(model, block_classes(model)):
        fully_shard(unit if len(unit) > 1 else unit[0], mesh=mesh, reshard_after_forward=reshard)
    fully_shard(root, mesh=mesh)  # the root keeps its leftovers (embeddings, head) gathered through the step
    return root


def refuse_shared_across_blocks(model: nn.Module, method: str) -> None:
    """accelerate's FSDP2 (GPUs) makes every block a unit of its own, which fails on a parameter
    shared by several blocks; say so in one line before it does."""
    try:
        classes = block_classes(model)
    except ConfigError:
        return  # accelerate reports its own wrapping problem
    if any(len(unit) > 1 for unit in units(model, classes)):
        raise ConfigError(f"FSDP2 through accelerate shards each transformer block on its own, and the {method} adapter shares a "
                          "parameter across blocks (e.g. Compacter's PHM rule); train it without FSDP (one device or DDP), or on "
                          "CPU processes, where graftkit keeps those blocks in one unit")


def units(model: nn.Module, blocks: set[type]) -> list[list[nn.Module]]:
    """The FSDP units: one per transformer block, except that blocks holding one shared parameter
    (Compacter's shared PHM rule, a shared adapter) form one unit together - FSDP2 refuses a
    parameter managed by two units."""
    found = [m for m in model.modules() if type(m) in blocks]
    group = list(range(len(found)))

    def top(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    first: dict[int, int] = {}
    for i, block in enumerate(found):
        for p in block.parameters():
            j = top(first.setdefault(id(p), i))
            group[top(i)] = j
    out: dict[int, list[nn.Module]] = {}
    for i, block in enumerate(found):
        out.setdefault(top(i), []).append(block)
    return list(out.values())


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def whole(t: torch.Tensor) -> torch.Tensor:
    """The full tensor (a collective for a shard: every process must call it)."""
    return t.full_tensor() if is_sharded(t) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` cut the way ``like`` is sharded (every process holds ``full``, so no communication)."""
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(device=like.device), like.device_mesh, like.placements, src_data_rank=None)


@contextlib.contextmanager
def unsharded(module: nn.Module) -> Iterator[None]:
    """Every FSDP unit in ``module`` gathered (plain full parameters) inside the block.

    Forward passes inside run no collective: each unit stays gathered after its forward, so
    the processes may run different numbers of them (an eval split unevenly, generation that
    stops at different lengths) without waiting on each other."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    # each unit's own setting (accelerate keeps its embedding/head unit gathered, for one)
    after = [all(g._reshard_after_forward for g in unit._get_fsdp_state()._fsdp_param_groups) for unit in units]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit, flag in zip(units, after):
            unit.reshard()
            unit.set_reshard_after_forward(flag, recurse=False)


@contextlib.contextmanager
def no_sync(module: nn.Module) -> Iterator[None]:
    """Backward passes inside keep their gradients local (all micro-batches but the last)."""
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
