"""FSDP2 for ``graft train``: which runs shard, how, and moving tensors in and out of shards.

A run is sharded when the launch asks for FSDP (``accelerate launch --use_fsdp --fsdp_version
2``, ``distributed_type: FSDP`` in accelerate's config file, or ``ACCELERATE_USE_FSDP=true
FSDP_VERSION=2`` under torchrun), with any number of processes, 1 included. There is one
sharding path, on CPUs and GPUs alike: graftkit applies torch's ``fully_shard`` itself - one
FSDP unit per transformer block (blocks sharing a parameter, such as Compacter's shared PHM
rule, form one unit), then the root (the model with its loss), which keeps the embeddings,
the final norm and the head gathered through the whole forward, so the loss may use the
head's weight directly (the chunked and fused cross-entropies do). accelerate is built
without its FSDP plugin (:func:`accelerator`) and only runs the processes: left to itself it
would shard on GPUs only, with another unit layout, and the CPU tests would not cover the
GPU run. (That split is how FSDP2 crashed on GPUs: accelerate's separate head unit left the
head's weight a shard when the loss read it outside the head's forward.)

The parameters become ``DTensor`` shards, and the rest of the loop meets them in two
places, both handled here: checkpoints gather whole tensors (so a checkpoint is the same
file whatever the sharding) and cut them again on resume; evaluation (loss and greedy
generation) and saving the adapter run with every unit gathered. FSDP version 1 is refused:
it flattens parameters, which the adapter sites (hooks that look their base weight up by
name) do not survive. Of accelerate's FSDP options graftkit reads the version and
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


def asked() -> bool:
    """Whether the launch asks for FSDP (accelerate passes its config to the processes this way)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def accelerator(mixed_precision: str, cpu: bool):
    """The run's ``Accelerator``, built without accelerate's FSDP plugin: graftkit shards.

    accelerate reads the FSDP request from the environment when it is built (and would then
    shard in ``prepare``, on GPUs only); it is hidden for that moment and restored after, so
    that graftkit (:func:`requested`) and transformers' RAM-efficient loading still see it."""
    from accelerate import Accelerator

    saved = os.environ.get("ACCELERATE_USE_FSDP")
    if saved is not None:
        os.environ["ACCELERATE_USE_FSDP"] = "false"
    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_FSDP"] = saved


def requested(acc) -> str | None:
    """``"graftkit"`` (the run is sharded, by graftkit's :func:`shard`) or ``None`` (no FSDP).

    The same answer on every device: an accelerator that reports FSDP itself (one built with
    accelerate's plugin) is sharded by graftkit too, never handed to ``acc.prepare``."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP and not getattr(acc, "is_fsdp2", True):
        raise ConfigError(VERSION_ERROR)
    if asked() or acc.distributed_type == DistributedType.FSDP:
        check_config()
        return "graftkit"
    return None


def start_processes(device: torch.device) -> bool:
    """A process group for a run that accelerate left without one (a single process: FSDP2
    shards over a mesh of one). Returns whether it made one, so the run can end it."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != 1:
        raise ConfigError(f"WORLD_SIZE={world} but no process group was set up; start the processes with accelerate launch or torchrun")
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    # one process: an in-memory store, no port to pick or to collide on
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def end_processes() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def block_classes(model: nn.Module) -> set[type]:
    """The transformer block classes (transformers names them in ``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not found:
        raise ConfigError(f"{type(model).__name__} names no transformer block class (_no_split_modules); "
                          "FSDP needs one to shard by block")
    return found


@torch.no_grad()
def sync_from_rank0(model: nn.Module, device: torch.device) -> None:
    """Give every process process 0's parameters and buffers (accelerate's ``sync_module_states``).

    With accelerate's ``cpu_ram_efficient_loading`` transformers initialises weights on process 0
    only and leaves some of the others' on the meta device (a new head's, for one); those get
    memory here, then everything is broadcast, so the shards cut next agree whatever each
    process loaded or initialised. The model is on ``device`` afterwards (NCCL broadcasts from
    GPU memory)."""
    import torch.distributed as dist

    made: dict[int, torch.Tensor] = {}  # tied tensors stay tied
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in list(table.items()):
                if t is None or not t.is_meta:
                    continue
                if id(t) not in made:
                    empty = torch.empty_like(t, device=device)
                    made[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
                table[name] = made[id(t)]
    model.to(device)
    if dist.get_world_size() == 1:
        return
    seen: set[int] = set()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen and t.numel():
            seen.add(id(t))
            dist.broadcast(t.data, src=0)


RESHARD = "graft_reshard_after_forward"  # what shard() set on each unit, for unsharded() to put back
GATHERED = "graft_fsdp_gathered"  # marks every module whose tensors FSDP gathers into reused storage


def shard(root: nn.Module, model: nn.Module, device: torch.device) -> nn.Module:
    """``fully_shard`` each transformer block of ``model``, then ``root`` (which holds ``model``),
    over all processes (one included), on ``device``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    sync_from_rank0(model, device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # FSDP_RESHARD_AFTER_FORWARD: accelerate's name for FULL_SHARD (true) vs SHARD_GRAD_OP (false)
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "true"
    for unit in units(model, block_classes(model)):
        fully_shard(unit if len(unit) > 1 else unit[0], mesh=mesh, reshard_after_forward=reshard)
        for block in unit:  # fully_shard of a list makes each of its modules an FSDPModule
            setattr(block, RESHARD, reshard)
    # the root keeps its leftovers (embeddings, final norm, head) gathered from its forward
    # through the backward, which needs them at once (torch's own default for a root)
    fully_shard(root, mesh=mesh, reshard_after_forward=False)
    setattr(root, RESHARD, False)
    for module in root.modules():
        setattr(module, GATHERED, True)
    _shard_starting_values(root)
    return root


def _starting_values(module: nn.Module) -> list[nn.Module]:
    """The in-place sites (full fine-tuning, BitFit, ``train_also``) of ``module``: each keeps its
    parameter's starting value ``theta0`` as a buffer, which FSDP moves but does not cut."""
    from ..methods.inplace import DeltaSite

    return [m for m in module.modules() if isinstance(m, DeltaSite) and m.theta0.numel()]


def _shard_starting_values(module: nn.Module) -> None:
    """Cut each ``theta0`` the way its parameter is cut: whole, it is a copy of every trained
    tensor on every device (full fine-tuning: the model once more per GPU). Only
    :func:`unsharded` reads it (the delta ``theta - theta0`` of a saved adapter), and gathers it."""
    from torch.distributed.tensor import DTensor

    for site in _starting_values(module):
        if is_sharded(site.theta0) or not is_sharded(site.base):
            continue
        cut = shard_like(site.theta0, site.base)
        # a slice of the whole tensor would keep all of it alive: the local part is copied
        site.theta0 = DTensor.from_local(cut.to_local().clone(), cut.device_mesh, cut.placements, run_check=False,
                                         shape=cut.shape, stride=cut.stride())


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


def describe(module: nn.Module) -> str:
    """``", FSDP2 sharded (N modules)"`` for a model :func:`shard` cut (read from the model itself,
    not from the request), else ``""``."""
    from torch.distributed.fsdp import FSDPModule

    found = {id(m) for m in module.modules() if isinstance(m, FSDPModule)}
    return f", FSDP2 sharded ({len(found)} modules)" if found else ""


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
    # each unit's own setting, as shard() recorded it (torch keeps it in private state whose
    # name changes between versions)
    after = [getattr(unit, RESHARD, True) for unit in units]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    starting = [site for site in _starting_values(module) if is_sharded(site.theta0)]
    cut = [site.theta0 for site in starting]
    for site in starting:  # theta - theta0 of a gathered theta needs the whole theta0 (same order on every process)
        site.theta0 = site.theta0.full_tensor()
    try:
        yield
    finally:
        for site, t in zip(starting, cut):
            site.theta0 = t
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
