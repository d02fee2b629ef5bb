"""Writing the merged model: the sharded safetensors writer, the streaming driver that feeds it
every key's merge (:func:`execute`) and the folder's metadata (:func:`write_metadata`).

Every output tensor's shape and dtype are known before the merge starts, so each shard's header
(and every tensor's byte offset) is written up front; a finished tensor is then written straight
to its place with ``os.pwrite`` from whichever worker thread produced it and dropped at once.
Nothing buffers the output model, whatever order the tensors finish in.

:func:`execute` works on several tensors at a time; each worker holds one tensor per input plus
the method's temporaries, so peak memory is O(threads x inputs x largest tensor), never O(model).
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..tensors import Checkpoint, nbytes, st_dtype
from .compute import global_thresholds, merge_key
from .plan import TOKENIZER_FILES, Plan, default_threads, model_dir, read_model_config, tokenizer_dir

INDEX_NAME = "model.safetensors.index.json"


def parse_size(value: int | str) -> int:
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", value.upper())
    if not m:
        raise ConfigError(f"max_shard_size {value!r} is not a size; write e.g. 2GB, 500MB or a number of bytes")
    num, unit = float(m.group(1)), m.group(2)
    scale = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    if unit not in scale:
        raise ConfigError(f"max_shard_size {value!r}: unknown unit {unit!r}")
    return int(num * scale[unit])


def _reserve(fd: int, size: int) -> None:
    """Give the shard its full size up front as allocated blocks (``posix_fallocate``), not a
    sparse file: a disk too small for the output fails here, before any work, instead of
    mid-write. (Writing speed is the same either way: ``bench/merge_kernels.py``.)"""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)  # a file system without fallocate


class ShardWriter:
    """Write ``entries`` = [(key, safetensors dtype, shape)] into ``folder`` as HF shards."""

    def __init__(self, folder: Path, entries: list[tuple[str, str, tuple]], max_shard_size: int | str = "2GB"):
        limit = parse_size(max_shard_size)
        shards: list[list[tuple[str, str, tuple]]] = [[]]
        size = 0
        for entry in entries:
            b = nbytes(entry[1], entry[2])
            if shards[-1] and size + b > limit:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += b
        self.folder = Path(folder)
        count = len(shards)
        self.names = ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self.where: dict[str, tuple[int, int, int]] = {}  # key -> (fd, offset, nbytes)
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self.fds: list[int] = []
        for name, shard in zip(self.names, shards):
            header: dict = {"__metadata__": {"format": "pt"}}
            offset = 0
            for key, dtype, shape in shard:
                b = nbytes(dtype, shape)
                header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + b]}
                offset += b
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            fd = os.open(self.folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self.fds.append(fd)
            self._pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
            start = 8 + len(raw)
            _reserve(fd, start + offset)
            for key, dtype, shape in shard:
                lo, hi = header[key]["data_offsets"]
                self.where[key] = (fd, start + lo, hi - lo)
                self.weight_map[key] = name
            self.total += offset
        self.pending = set(self.where)

    @staticmethod
    def _pwrite(fd: int, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n

    def write(self, key: str, tensor) -> None:
        """Write a whole tensor (torch) to its place and mark it done."""
        size = self.where[key][2]
        flat = tensor.contiguous().reshape(-1)
        data = flat.view(__import__("torch").uint8).numpy() if flat.numel() else b""
        if len(data) != size:
            raise RuntimeError(f"{key}: {len(data)} bytes to write, the header says {size}")
        self.write_part(key, data, 0)
        self.finish(key)

    def write_part(self, key: str, data, at: int) -> None:
        """Write raw bytes (any buffer: a numpy array, bytes) at byte ``at`` of ``key``'s data."""
        fd, offset, size = self.where[key]
        view = memoryview(data).cast("B")
        if at + len(view) > size:
            raise RuntimeError(f"{key}: writing bytes {at}..{at + len(view)} past its {size} bytes")
        self._pwrite(fd, view, offset + at)

    def finish(self, key: str) -> None:
        self.pending.discard(key)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        if self.pending:
            raise RuntimeError(f"{len(self.pending)} tensor(s) were never written, e.g. {sorted(self.pending)[0]}")
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class _Progress:
    def __init__(self, total: int, total_bytes: int, enabled: bool):
        self.enabled = enabled
        self.start = time.perf_counter()
        self.read = 0
        self.lock = threading.Lock()
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("merging"), BarColumn(), MofNCompleteColumn(), TextColumn("tensors"),
                                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), transient=True)
            self.task = self.bar.add_task("merge", total=total, rate="")
            self.bar.start()

    def advance(self, nbytes_read: int) -> None:
        with self.lock:
            self.read += nbytes_read
            if self.enabled:
                rate = self.read / 1e9 / max(time.perf_counter() - self.start, 1e-9)
                self.bar.update(self.task, advance=1, rate=f"{rate:.2f} GB/s")

    def stop(self) -> None:
        if self.enabled:
            self.bar.stop()


def _keep_freed_memory() -> None:
    """Ask glibc to reuse freed blocks instead of returning them to the OS after every tensor:
    fresh mmap-ed blocks must be page-faulted and zeroed again, which cost about a third of the
    merge time. Peak memory is unchanged (the same blocks are reused)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, int(os.environ.get("GRAFT_MMAP_THRESHOLD", 1 << 30)))  # M_MMAP_THRESHOLD
        libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD
        libc.mallopt(-8, 1)  # M_ARENA_MAX: the workers share freed blocks instead of each keeping its own
    except (OSError, AttributeError):
        pass


class _Prefetcher:
    """Reads ahead of the workers on a cold page cache: a daemon thread asks the kernel
    (``posix_fadvise(WILLNEED)``) to start reading the next tensors' bytes of every input while the
    workers compute, so they rarely wait on the disk. At most ``ahead`` bytes beyond the tensors
    already started; the memory is the page cache's (evictable), not the process's."""

    def __init__(self, plan: Plan, used: list[str], ahead: int = 512 << 20):
        self.ranges: list[list[tuple[int, int, int]]] = []
        self.fds: dict[Path, int] = {}
        for key in plan.keys:
            todo = []
            for p in used:
                ckpt = plan.ckpts[p]
                if not isinstance(ckpt, Checkpoint) or not ckpt.is_safetensors or key not in ckpt.files:
                    continue
                f, lo, hi = ckpt.byte_range(key)
                if f not in self.fds:
                    try:
                        self.fds[f] = os.open(f, os.O_RDONLY)
                    except OSError:
                        continue
                todo.append((self.fds[f], lo, hi - lo))
            self.ranges.append(todo)
        self.ahead = ahead
        self.started = 0
        self.stop = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="graft-prefetch", daemon=True)
        if hasattr(os, "posix_fadvise") and self.fds:
            self.thread.start()

    def _run(self) -> None:
        sizes = [sum(r[2] for r in todo) for todo in self.ranges]
        for i, todo in enumerate(self.ranges):
            with self.cond:
                while not self.stop and i > self.started and sum(sizes[self.started:i]) > self.ahead:
                    self.cond.wait(0.5)
                if self.stop:
                    return
            for fd, offset, length in todo:
                try:
                    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
                except OSError:
                    return

    def begin(self) -> None:
        with self.cond:
            self.started += 1
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.stop = True
            self.cond.notify()
        if self.thread.is_alive():
            self.thread.join()
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


def execute(plan: Plan, folder: Path, threads: int | None = None, progress: bool | None = None) -> dict:
    """Merge every tensor of ``plan`` into shards under ``folder``; return timing statistics.

    The fused kernels (:mod:`.fused`) do the tensors when the method and inputs allow it; then
    torch is never imported. Otherwise the torch reference functions do them."""
    from . import fused

    slow_reason = fused.unsupported(plan)
    torch = None
    if slow_reason is not None:
        import torch
    threads = threads or plan.config.threads or default_threads()
    _keep_freed_memory()
    entries = [(k, plan.out_dtypes[k], plan.shapes[k]) for k in plan.keys]
    writer = ShardWriter(folder, entries, plan.config.max_shard_size)
    if progress is None:
        progress = sys.stderr.isatty()
    bar = _Progress(len(plan.keys), plan.input_bytes, progress)
    used = [p for p in dict.fromkeys([plan.base, *plan.inputs]) if p]
    per_key_bytes = {k: sum(nbytes(st_dtype(plan.ckpts[p].dtype(k)), plan.shapes[k]) for p in used) for k in plan.keys}
    start = time.perf_counter()
    torch_threads = torch.get_num_threads() if torch is not None else 0
    delay = float(os.environ.get("_GRAFT_MERGE_DELAY", "0") or 0)  # test hook: make a merge slow enough to kill

    prefetch = _Prefetcher(plan, used)

    def work(key: str) -> None:
        prefetch.begin()
        if delay:
            time.sleep(delay)
        merge_key(plan, key, writer, fused_kernels=torch is None)
        bar.advance(per_key_bytes[key])

    if plan.spec.thresholded and plan.config.parameters.get("scope", "tensor") == "global":
        plan.global_thresholds = global_thresholds(plan)
        plan.stats["global_thresholds"] = plan.global_thresholds
    try:
        if threads == 1:
            for k in plan.keys:
                work(k)
        else:
            from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

            if torch is not None:
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // threads))
            pool = ThreadPoolExecutor(threads, thread_name_prefix="graft-merge")
            try:
                futures = [pool.submit(work, k) for k in plan.keys]
                wait(futures, return_when=FIRST_EXCEPTION)
                for f in futures:
                    if f.done() and not f.cancelled() and f.exception() is not None:
                        raise f.exception()
            finally:  # on an error or Ctrl-C, drop the queued tensors instead of finishing them
                pool.shutdown(wait=True, cancel_futures=True)
    except BaseException:
        writer.abort()
        raise
    finally:
        prefetch.close()
        if torch is not None:
            torch.set_num_threads(torch_threads)
        bar.stop()
    writer.close()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "input_bytes": plan.input_bytes, "gb_per_s": plan.input_bytes / 1e9 / max(seconds, 1e-9),
            "tensors": len(plan.keys), "threads": threads,
            "kernels": "fused" if torch is None else f"torch reference ({slow_reason})"}


def write_metadata(plan: Plan, folder: Path, raw_config: Any) -> None:
    cfg = plan.config
    reference = model_dir(plan, plan.reference)
    config = read_model_config(str(reference))
    if plan.slices is not None:  # the layer count and per-layer lists of the stacked layers
        config = dict(plan.slices.config)
    if plan.vocab is not None and config:
        config["vocab_size"] = plan.vocab.size
    if config:
        want = cfg.out_dtype or cfg.dtype
        if want:
            config["torch_dtype"] = want
            if "dtype" in config:
                config["dtype"] = want
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = reference / "generation_config.json"
    if gen.is_file():
        shutil.copy2(gen, folder / gen.name)
    if plan.vocab is not None:  # the output vocabulary's own tokenizer (merge/vocab.py)
        plan.vocab.tokenizer.save_pretrained(str(folder))
    else:
        tok_dir = tokenizer_dir(plan)
        for name in TOKENIZER_FILES:
            if (tok_dir / name).is_file():
                shutil.copy2(tok_dir / name, folder / name)
    import yaml

    recipe = raw_config if isinstance(raw_config, dict) else cfg.model_dump(mode="json", exclude_defaults=True)
    (folder / "mergekit_config.yml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    from .. import __version__

    provenance = {"produced_by": "graft merge", "graftkit": __version__, "merge_method": plan.spec.name,
                  "base_model": plan.base, "inputs": plan.inputs, "excluded": plan.excluded, "stats": plan.stats}
    (folder / "graft_provenance.json").write_text(json.dumps(provenance, indent=2, default=str) + "\n")
