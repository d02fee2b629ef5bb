"""A streaming writer of sharded safetensors files.

Every output tensor's shape and dtype are known before the merge starts, so each shard's header
(and every tensor's byte offset) is written up front; a finished tensor is then written straight
to its place with ``os.pwrite`` from whichever worker thread produced it and dropped at once.
Nothing buffers the output model, whatever order the tensors finish in.
"""
from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

from ..errors import ConfigError

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
NAME_TO_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
ST_TO_TORCH = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
               "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
TORCH_TO_ST = {v: k for k, v in ST_TO_TORCH.items()}
INDEX_NAME = "model.safetensors.index.json"


def st_dtype(name: str) -> str:
    """A safetensors dtype name for a header's (``BF16``) or a pickled tensor's (``bfloat16``) dtype."""
    return TORCH_TO_ST.get(name, name)


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


def nbytes(dtype: str, shape) -> int:
    n = ITEMSIZE[dtype]
    for d in shape:
        n *= d
    return n


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
