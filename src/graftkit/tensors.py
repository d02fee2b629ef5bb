"""Reading and writing tensor files safely.

* :func:`read_safetensors` loads one file and turns every way a file can be broken
  (missing, truncated, bad header) into a :class:`FileFormatError` naming the file.
* :class:`Checkpoint` is a lazy, read-only view of a model folder: one ``*.safetensors``
  file or a sharded set with its ``*.index.json``. Tensors are read one at a time, so a
  caller can walk a model far larger than memory.
* Pickled ``.bin`` checkpoints are refused unless the caller opts in; even then they are
  read with ``torch.load(weights_only=True)``, which cannot run code.
* :func:`atomic_dir` (from :mod:`graftkit.outputs`, re-exported here) writes a folder next to
  its target and swaps it into place, so an interrupted write never leaves a folder that looks
  complete and never loses the one it replaces.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import FileFormatError
from .outputs import atomic_dir  # noqa: F401  (re-exported: writers import it from here)

if TYPE_CHECKING:  # torch loads on first use, so header-only work (graft merge --dry-run) stays instant
    import torch

SAFE_SUFFIX = ".safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "adapter_model.bin")
# safetensors dtype names: sizes, and the torch dtypes a tensor's raw bytes are viewed as
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
NAME_TO_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
ST_TO_TORCH = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
               "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
TORCH_TO_ST = {v: k for k, v in ST_TO_TORCH.items()}


def st_dtype(name: str) -> str:
    """A safetensors dtype name for a header's (``BF16``) or a pickled tensor's (``bfloat16``) dtype."""
    return TORCH_TO_ST.get(name, name)


def nbytes(dtype: str, shape) -> int:
    n = ITEMSIZE[dtype]
    for d in shape:
        n *= d
    return n


def check_safetensors_header(path: Path) -> dict:
    """Validate the header and the file length without reading the data; return the header."""
    from .files import path_kind

    kind = path_kind(path)
    if kind not in ("a file", None):  # a FIFO would block the open below forever
        raise FileFormatError(f"{path} is {kind}, not a safetensors file; give a regular file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise FileFormatError(f"{path} is not a safetensors file (only {size} bytes); re-create or re-download it")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise FileFormatError(f"{path} is truncated or corrupt (header of {n} bytes in a {size}-byte file); re-create or re-download it")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise FileFormatError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FileFormatError(f"{path} is corrupt (its header is not valid JSON); re-create or re-download it") from None
    end = 0
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        end = max(end, meta["data_offsets"][1])
    if 8 + n + end != size:
        raise FileFormatError(
            f"{path} is truncated or corrupt ({size} bytes on disk, the header describes {8 + n + end}); re-create or re-download it"
        )
    return header


def read_safetensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    check_safetensors_header(path)
    try:
        return load_file(str(path), device=device)
    except Exception as exc:  # safetensors raises its own error type for every bad-file case
        raise FileFormatError(f"{path} could not be read as safetensors ({exc}); re-create or re-download it") from None


def read_pickle_checkpoint(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    from .files import not_weights_message, weights_kind

    # by the magic bytes, not the name: random bytes or a text file must not be called a pickle
    if weights_kind(path) not in ("torch-zip", "pickle"):
        raise FileFormatError(not_weights_message(path))
    if not allow_pickle:
        raise FileFormatError(
            f"{path} is a pickled PyTorch file; graftkit reads safetensors by default. "
            "Pass allow_pickle=True (--allow-pickle) to read it with torch.load(weights_only=True), or convert it to safetensors"
        )
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FileFormatError(f"{path} could not be loaded with weights_only=True ({type(exc).__name__}); it may hold code, not just tensors") from None


def index_shards(index: Path) -> list[Path]:
    """The shard files a ``*.index.json`` names. Each must lie inside the index's own folder: an
    index is data, and one that points at ``../other/x.safetensors`` or ``/abs/x.safetensors`` would
    make graftkit (or transformers after it) read files the user never gave it."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise FileFormatError(f"{index} is not a valid index (no weight_map); re-create it") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) and f for f in weight_map.values()):
        raise FileFormatError(f"{index}: weight_map must map tensor names to shard file names; re-create it")
    for key, name in weight_map.items():
        shard = Path(name)
        if shard.is_absolute() or ".." in shard.parts or "\\" in name:
            raise FileFormatError(f"{index} maps {key} to {name!r}, outside the model folder; shards must be files in "
                                  f"{index.parent} - fix the index (refused: it could read any file)")
    return sorted({index.parent / f for f in weight_map.values()})


class Checkpoint:
    """Lazy access to the tensors of a model folder (or a single safetensors file)."""

    def __init__(self, path: str | Path, allow_pickle: bool = False):
        self.path = Path(path)
        self.files: dict[str, Path] = {}  # tensor name -> file
        self._pickled: dict[str, torch.Tensor] | None = None
        from .files import path_kind, weights_kind

        kind = path_kind(self.path)
        if kind == "a file":
            files = [self.path]
        elif kind == "a folder":
            files = self._folder_files(allow_pickle)
        elif kind is None:
            raise FileFormatError(f"{self.path} does not exist")
        else:
            raise FileFormatError(f"{self.path} is {kind}; give a model folder or a .safetensors file")
        self.headers: dict[Path, dict] = {}
        self._data_starts: dict[Path, int] = {}
        for f in files:
            if f.suffix == SAFE_SUFFIX or (f == self.path and weights_kind(f) == "safetensors"):
                header = check_safetensors_header(f)
                self.headers[f] = header
                for key in header:
                    if key != "__metadata__":
                        self.files[key] = f
            else:
                self._pickled = read_pickle_checkpoint(f, allow_pickle)
                self.files.update({k: f for k in self._pickled})

    def _folder_files(self, allow_pickle: bool) -> list[Path]:
        index = sorted(self.path.glob(f"*{SAFE_SUFFIX}.index.json"))
        if index:
            files = index_shards(index[0])
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise FileFormatError(f"{self.path} is missing shard(s) {', '.join(missing)} named in {index[0].name}")
            return files
        files = sorted(self.path.glob(f"*{SAFE_SUFFIX}"))
        if files:
            return files
        pickled = [self.path / n for n in PICKLE_NAMES if (self.path / n).exists()]
        if pickled:
            read_pickle_checkpoint(pickled[0], allow_pickle)  # raises unless allowed
            return pickled
        raise FileFormatError(f"{self.path} holds no *.safetensors weights")

    def keys(self) -> list[str]:
        return list(self.files)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._pickled is not None and key in self._pickled:
            return tuple(self._pickled[key].shape)
        return tuple(self.headers[self.files[key]][key]["shape"])

    def dtype(self, key: str) -> str:
        if self._pickled is not None and key in self._pickled:
            return str(self._pickled[key].dtype).replace("torch.", "")
        return self.headers[self.files[key]][key]["dtype"]

    def num_parameters(self) -> int:
        """Elements of the floating-point tensors (integer buffers such as position ids are not parameters)."""
        total = 0
        for key in self.files:
            if self.dtype(key).upper().startswith(("F", "BF")):
                n = 1
                for d in self.shape(key):
                    n *= d
                total += n
        return total

    def get(self, key: str) -> torch.Tensor:
        if self._pickled is not None and key in self._pickled:
            return self._pickled[key]
        from safetensors import safe_open

        f = self.files[key]
        try:
            with safe_open(str(f), framework="pt") as handle:
                return handle.get_tensor(key)
        except Exception as exc:
            raise FileFormatError(f"{f}: tensor {key} could not be read ({exc})") from None

    def size_on_disk(self) -> int:
        return sum(f.stat().st_size for f in set(self.files.values()))

    @property
    def is_safetensors(self) -> bool:
        """Every tensor lives in a safetensors file, so byte-range reads work."""
        return self._pickled is None

    def byte_range(self, key: str) -> tuple[Path, int, int]:
        """The safetensors file holding ``key`` and the absolute byte range ``[lo, hi)`` of its data."""
        f = self.files[key]
        header = self.headers[f]
        start = self._data_starts.get(f)
        if start is None:  # the data follows the header; its length was checked against the file size on open
            end = max((m["data_offsets"][1] for k, m in header.items() if k != "__metadata__"), default=0)
            start = self._data_starts[f] = f.stat().st_size - end
        lo, hi = header[key]["data_offsets"]
        return f, start + lo, start + hi

    def map_range(self, key: str, lo: int = 0, hi: int | None = None):
        """Memory-map bytes ``[lo, hi)`` of ``key``'s data (offsets from the tensor's first byte; the
        whole tensor by default): ``(mapping, offset of byte lo inside it)``. Only that range is mapped
        (copy-on-write, the file is never changed); it is unmapped when the mapping and every array
        viewing it are dropped."""
        import mmap
        import os

        f, first, last = self.byte_range(key)
        hi = last - first if hi is None else hi
        try:
            fd = os.open(f, os.O_RDONLY)
            try:
                offset = first + lo
                aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
                return mmap.mmap(fd, hi - lo + offset - aligned, offset=aligned, access=mmap.ACCESS_COPY), offset - aligned
            finally:
                os.close(fd)
        except (OSError, ValueError) as exc:
            raise FileFormatError(f"{f}: tensor {key} could not be read ({exc})") from None

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``key`` (or its rows ``[r0, r1)``) as a torch tensor over a memory map of just those
        bytes: reading one row chunk of a large matrix touches only that chunk of the file."""
        import torch

        meta = self.headers[self.files[key]][key] if self.is_safetensors else None
        dtype = None if meta is None else ST_TO_TORCH.get(meta["dtype"])
        if dtype is None:
            t = self.get(key)
            return t if rows is None else t[rows[0]:rows[1]]
        dtype = getattr(torch, dtype)
        shape = list(meta["shape"])
        lo, hi = 0, meta["data_offsets"][1] - meta["data_offsets"][0]
        if rows is not None and shape:
            row_bytes = hi // max(1, shape[0])
            lo, hi = rows[0] * row_bytes, rows[1] * row_bytes
            shape[0] = rows[1] - rows[0]
        if hi <= lo:
            return torch.empty(shape, dtype=dtype)
        mapped, start = self.map_range(key, lo, hi)
        itemsize = torch.empty((), dtype=dtype).element_size()
        return torch.frombuffer(mapped, dtype=dtype, count=(hi - lo) // itemsize, offset=start).view(shape)


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
