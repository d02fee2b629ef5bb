"""Training checkpoints: atomic folders from which a run resumes bit for bit.

``<output>/checkpoints/step-000120/`` holds

* ``trainable.safetensors``: every trained tensor, by parameter name;
* ``optimizer.safetensors`` + the optimizer's non-tensor state in ``state.json``;
* ``rng.safetensors``: each process's torch RNG state (Python's and NumPy's in ``state.json``);
* ``state.json``: step, micro-batch position, scheduler state, recipe fingerprint, what the
  run was made from (data file hashes, base-model fingerprint, labels: see :mod:`.inputs`,
  which ``--resume`` checks), and the metrics of the last logged step.

No pickle: tensors go to safetensors, everything else to JSON. A folder is written next to
its final name and renamed into place, so a run killed while checkpointing leaves the
previous checkpoint as the latest complete one.
"""
from __future__ import annotations

import errno
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import FileFormatError, GraftError, TrainingError
from ..tensors import atomic_dir, read_safetensors
from .fsdp import shard_like

STATE = "state.json"
PREFIX = "step-"


def checkpoint_root(output: str | Path) -> Path:
    return Path(output) / "checkpoints"


def list_checkpoints(output: str | Path) -> list[Path]:
    root = checkpoint_root(output)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE).exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(output: str | Path) -> Path | None:
    found = list_checkpoints(output)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def snapshot(named_params: list[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer,
             keep: bool = True) -> dict[str, Any] | None:
    """Whole copies of the trained tensors and the optimizer state, as a checkpoint stores them.

    FSDP shards are gathered, so every process of a sharded run must call this, in step; the
    processes that do not write (``keep=False``) take part in each gather and drop the result
    at once, so only the writer ever holds a whole copy in host memory."""
    from .fsdp import whole

    def copy(t: torch.Tensor) -> torch.Tensor | None:
        full = whole(t.detach())
        return full.cpu().contiguous().clone() if keep else None

    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = copy(value)
            else:
                plain.setdefault(str(idx), {})[key] = value
    trainable = {n: copy(p) for n, p in named_params}
    if not keep:
        return None
    return {"trainable": trainable, "optimizer_tensors": tensors, "optimizer": {"param_groups": sd["param_groups"], "plain": plain}}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = t
    for idx, values in meta["plain"].items():
        state.setdefault(int(idx), {}).update(values)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def disk_full_error(exc: BaseException, path: str | Path) -> TrainingError | None:
    """The one-line error for a write that failed on a full disk, or ``None`` for any other failure.

    safetensors writes from Rust and reports a full disk as ``SafetensorError(... StorageFull ...)``
    rather than an ``OSError``, hence the look at the message."""
    if isinstance(exc, GraftError):
        return None
    full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or any(
        s in str(exc) for s in ("No space left on device", "StorageFull", "Disk quota exceeded"))
    if not full:
        return None
    return TrainingError(f"no space left on device while writing {path}; free space or choose another output.dir")


def save_checkpoint(output: str | Path, step: int, snap: dict[str, Any], scheduler, rng_states: list[dict[str, Any]],
                    info: dict[str, Any], keep: int) -> Path:
    """Write ``snapshot(...)``, the scheduler and every process's RNG state as checkpoint ``step``."""
    from safetensors.torch import save_file

    target = checkpoint_root(output) / f"{PREFIX}{step:06d}"
    writing = target  # the file being written, by its final name (the temporary one is gone after a failure)
    try:
        with atomic_dir(target, overwrite=True) as tmp:
            for name, tensors in (("trainable.safetensors", snap["trainable"]), ("optimizer.safetensors", snap["optimizer_tensors"]),
                                  ("rng.safetensors", {f"rank{r}": s["torch"] for r, s in enumerate(rng_states)})):
                writing = target / name
                save_file(tensors, str(tmp / name))
            state = {
                **info, "step": step, "optimizer": snap["optimizer"],
                "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
                "rng": [{"python": s["python"], "numpy": s["numpy"]} for s in rng_states],
            }
            writing = target / STATE
            (tmp / STATE).write_text(json.dumps(state) + "\n")
            writing = target
    except Exception as exc:
        full = disk_full_error(exc, writing)
        if full is not None:
            raise full from exc
        raise
    for old in list_checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FileFormatError(f"checkpoint {path} is unreadable ({exc}); delete it to resume from the one before") from None
    state["trainable"] = read_safetensors(path / "trainable.safetensors")
    state["optimizer_tensors"] = read_safetensors(path / "optimizer.safetensors")
    state["rng_torch"] = read_safetensors(path / "rng.safetensors")
    return state


def restore(state: dict[str, Any], named_params: list[tuple[str, torch.nn.Parameter]], optimizer, scheduler, rank: int, world: int) -> None:
    params = dict(named_params)
    saved = state["trainable"]
    if set(saved) != set(params):
        missing = sorted(set(params) - set(saved))[:3]
        extra = sorted(set(saved) - set(params))[:3]
        raise FileFormatError(f"the checkpoint's trained tensors do not match this run's (missing {missing}, unexpected {extra}); "
                              "it was made by a different recipe: start a new output folder or pass --overwrite")
    with torch.no_grad():
        for name, p in params.items():
            if tuple(saved[name].shape) != tuple(p.shape):
                raise FileFormatError(f"checkpoint tensor {name} has shape {tuple(saved[name].shape)}, this run's is {tuple(p.shape)}")
            p.copy_(shard_like(saved[name].to(p.dtype), p))
    opt_state = _join_optimizer(state["optimizer_tensors"], state["optimizer"])
    # a sharded run's moments are shards of the parameter's shape: cut the whole ones the same way
    flat = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, st in opt_state["state"].items():
        for key, t in st.items():
            if idx < len(flat) and torch.is_tensor(t) and tuple(t.shape) == tuple(flat[idx].shape) and t.ndim:
                st[key] = shard_like(t, flat[idx])
    optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    if len(state["rng"]) != world:
        raise FileFormatError(f"the checkpoint was written by {len(state['rng'])} process(es), this run has {world}; "
                              "resume with the same number of processes")
    set_rng_state({"torch": state["rng_torch"][f"rank{rank}"], **state["rng"][rank]})
