"""The one place that reads user files: recipes (YAML), data and task files (JSONL / JSON / CSV /
Parquet), and the kind of a weights file.

Every way a user file can be wrong becomes one :class:`~graftkit.errors.FileFormatError` line
that names the file:

* a missing path says "does not exist"; a folder, FIFO, device or socket where a file is expected
  says what it is (a FIFO is never opened: opening one would wait for a writer forever);
* a file of zero bytes says "is empty";
* text that is not UTF-8 names the byte offset (0-based, as ``cmp``/``xxd`` count) and the line of
  the first byte that cannot be decoded; a UTF-8 byte-order mark is accepted;
* a bad JSON line names its 1-based line number. Blank lines in JSON-lines files are skipped
  (editors and ``echo >>`` leave them), so a file of blank lines only "holds no rows".

Rows come back as :class:`Rows`, a list that remembers where each row came from, so a later
check (a missing field, a mixed label type) can name the line rather than a row index.
"""
from __future__ import annotations

import io
import json
import os
import stat
import struct
from pathlib import Path
from typing import Any, Iterable

from .errors import ConfigError, FileFormatError, GraftError

BOM = b"\xef\xbb\xbf"
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


# -- what a path is --------------------------------------------------------------------------------

_KINDS = ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def path_kind(path: str | Path) -> str | None:
    """What ``path`` is, in words ("a file", "a folder", "a FIFO (named pipe)", ...); None when
    nothing is there. Follows symbolic links; a dangling one is "a broken symbolic link"."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "a broken symbolic link" if os.path.islink(path) else None
    except PermissionError:
        return "a path you may not read"
    except OSError as exc:  # ELOOP, ENAMETOOLONG
        return f"an unusable path ({exc.strerror or exc})"
    for is_kind, words in _KINDS:
        if is_kind(mode):
            return words
    return "not a regular file"


def check_file(path: str | Path, what: str = "file", error: type[GraftError] = FileFormatError) -> Path:
    """``path`` as a Path if it is a regular file (or a link to one); else one error saying what it is."""
    path = Path(path)
    kind = path_kind(path)
    if kind == "a file":
        return path
    if kind is None:
        raise error(f"{what} {path} does not exist; check the path")
    if kind == "a folder":
        raise error(f"{what} {path} is a folder, not a file; give the file itself")
    raise error(f"{what} {path} is {kind}, not a regular file; give a regular file")


def read_bytes(path: str | Path, what: str = "file", error: type[GraftError] = FileFormatError) -> bytes:
    path = check_file(path, what, error)
    try:
        return path.read_bytes()
    except PermissionError:
        raise error(f"cannot read {what} {path}: permission denied; check its permissions") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def decode_utf8(raw: bytes, path: str | Path, what: str = "file", error: type[GraftError] = FileFormatError) -> str:
    """``raw`` as text; bytes that are not UTF-8 are one error naming the first bad byte's offset and line."""
    skip = len(BOM) if raw.startswith(BOM) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = skip + exc.start
        line = raw.count(b"\n", 0, offset) + 1
        raise error(f"{what} {path} is not UTF-8 text: the byte 0x{raw[offset]:02x} at byte offset {offset} (line {line}) "
                    f"cannot be decoded; save the file as UTF-8") from None


def read_text(path: str | Path, what: str = "file", error: type[GraftError] = FileFormatError) -> str:
    """A UTF-8 text file; a missing, empty, non-file or non-UTF-8 path is one error."""
    raw = read_bytes(path, what, error)
    if not raw:
        raise error(f"{what} {path} is empty (0 bytes); give a file with content")
    return decode_utf8(raw, path, what, error)


def file_sha256(path: str | Path) -> str | None:
    """The SHA-256 of a regular file's bytes; None when ``path`` is not one (the reader reports why)."""
    import hashlib

    if path_kind(path) != "a file":
        return None
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


# -- YAML and JSON -----------------------------------------------------------------------------------

def read_yaml(path: str | Path, what: str = "YAML file", error: type[GraftError] = ConfigError) -> Any:
    """A YAML file's content; a file with nothing but blanks and comments is "empty"; bad syntax names the line."""
    import yaml

    text = read_text(path, what, error)
    try:
        data = yaml.safe_load(text)
    except yaml.reader.ReaderError as exc:  # a control character YAML does not allow
        line = text.count("\n", 0, exc.position) + 1
        raise error(f"{what} {path} holds a character YAML does not allow (#x{exc.character:04x}) on line {line}; "
                    "remove it") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = str(getattr(exc, "problem", None) or exc).strip().splitlines()[0]
        raise error(f"{path} is not valid YAML{where}: {problem}; fix the syntax") from None
    if data is None:
        raise error(f"{what} {path} is empty (only blanks or comments); give its settings")
    return data


def read_json(path: str | Path, what: str = "JSON file", error: type[GraftError] = FileFormatError, *,
              hint: str = "fix or re-create it", mapping: bool = False) -> Any:
    """One JSON document (a config.json, an adapter description, results.json); bad JSON names the
    1-based line and column; with ``mapping`` anything but a JSON object is an error too."""
    text = read_text(path, what, error)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{what} {path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}; {hint}") from None
    if mapping and not isinstance(data, dict):
        raise error(f"{what} {path} holds a JSON {_json_type(data)}, not an object; {hint}")
    return data


# -- rows ----------------------------------------------------------------------------------------------

class Rows(list):
    """Rows of one data file (dicts), with where each came from: ``lines`` (1-based line numbers)
    for JSON lines, else the 1-based row or item number in ``unit``s. Slicing keeps both."""

    def __init__(self, rows: Iterable[dict[str, Any]] = (), path: str | Path = "", lines: list[int] | None = None,
                 unit: str = "row"):
        super().__init__(rows)
        self.path = str(path)
        self.lines = lines
        self.unit = unit

    def __getitem__(self, index):
        got = super().__getitem__(index)
        if isinstance(index, slice):
            return Rows(got, self.path, self.lines[index] if self.lines is not None else None, self.unit)
        return got

    def where(self, i: int) -> str:
        """Where row ``i`` (0-based) is in the file: "line 7", "row 3", "item 2"."""
        if self.lines is not None:
            return f"line {self.lines[i]}"
        return f"{self.unit} {i + 1}"


def where(rows: list, i: int) -> str:
    """:meth:`Rows.where` for any list (a plain list counts 1-based rows)."""
    return rows.where(i) if isinstance(rows, Rows) else f"row {i + 1}"


def read_jsonl(path: str | Path, what: str = "an object with fields", name: str = "file") -> Rows:
    """The objects of a JSON-lines file (gzipped when the name ends in ``.gz``), blank lines
    skipped; a line that is not a JSON object is one error naming its 1-based number and
    ``what`` it should be. A ``.json`` file may instead hold one array of objects."""
    raw = read_bytes(path, name)
    if str(path).endswith(".gz"):
        import gzip
        import zlib

        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
            raise FileFormatError(f"{name} {path} is not a valid gzip file ({exc}); give a .jsonl, or re-create the .gz") from None
    if not raw:
        raise FileFormatError(f"{name} {path} is empty (0 bytes); give a file with one JSON object per line")
    text = decode_utf8(raw, path, name)
    stripped = text.lstrip()
    if str(path).lower().removesuffix(".gz").endswith(".json") and stripped.startswith("["):
        return _json_array(text, path, what, name)
    rows, lines = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FileFormatError(f"{path}: line {lineno} is not valid JSON ({exc.msg} at column {exc.colno}); "
                                  f"each line must be {what}") from None
        if not isinstance(row, dict):
            raise FileFormatError(f"{path}: line {lineno} is a JSON {_json_type(row)}, not {what}")
        rows.append(row)
        lines.append(lineno)
    return Rows(rows, path, lines)


def _json_type(v: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}.get(type(v), "value")


def _json_array(text: str, path, what: str, name: str) -> Rows:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"{path}: line {exc.lineno} is not valid JSON ({exc.msg} at column {exc.colno}); "
                              f"a .json {name} is one array of objects, or one object per line") from None
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise FileFormatError(f"{path}: item {i + 1} of the array is a JSON {_json_type(row)}, not {what}")
    return Rows(data, path, unit="item")


def read_csv(path: str | Path, name: str = "file") -> Rows:
    """A CSV file with a header line; values typed as pandas infers them (a column of numbers
    gives numbers, an empty cell NaN)."""
    import pandas as pd

    text = read_text(path, name)
    try:
        frame = pd.read_csv(io.StringIO(text))
    except pd.errors.EmptyDataError:
        raise FileFormatError(f"{name} {path} holds no CSV header (only blank lines); the first line must name the columns") from None
    except (pd.errors.ParserError, ValueError) as exc:  # "Expected 2 fields in line 3, saw 3" counts lines from 1
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileFormatError(f"{path} is not valid CSV: {msg.removeprefix('Error tokenizing data. C error: ')}; "
                              "fix that line (quote fields that hold commas)") from None
    return Rows(frame.to_dict("records"), path, unit="row")


def read_parquet(path: str | Path, name: str = "file") -> Rows:
    check_file(path, name)
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(str(path))
    except (pa.ArrowException, OSError) as exc:
        size = os.path.getsize(path)
        if size == 0:
            raise FileFormatError(f"{name} {path} is empty (0 bytes); give a Parquet file") from None
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "magic bytes" in msg:
            msg = "no Parquet magic bytes: another format, or a truncated file"
        raise FileFormatError(f"{name} {path} is not a readable Parquet file ({msg}); re-create it") from None
    return Rows(table.to_pylist(), path, unit="row")


def data_format(path: str | Path, fmt: str = "auto", hint: str = "") -> str:
    """``json``, ``csv`` or ``parquet`` from ``fmt`` or the file name (``.gz`` allowed on JSON)."""
    if fmt != "auto":
        return fmt
    name = str(path).lower().removesuffix(".gz")
    found = FORMATS.get(Path(name).suffix)
    if found is None or (found != "json" and str(path).lower().endswith(".gz")):
        raise ConfigError(f"cannot tell the format of {path} from its name; name it .jsonl, .json, .csv or .parquet{hint}")
    return found


def read_rows(path: str | Path, fmt: str = "auto", name: str = "data file", hint: str = "", allow_empty: bool = False) -> Rows:
    """All rows of a JSONL / JSON / CSV / Parquet file as dicts; a file that holds no row is an
    error unless ``allow_empty``. ``hint`` ends the unknown-format message (e.g. " or set data.format")."""
    fmt = data_format(path, fmt, hint)
    check_file(path, name)
    if fmt == "json":
        rows = read_jsonl(path, name=name)
    elif fmt == "csv":
        rows = read_csv(path, name)
    elif fmt == "parquet":
        rows = read_parquet(path, name)
    else:
        raise ConfigError(f"unknown data format {fmt!r} for {path}; use json, csv or parquet")
    if not rows and not allow_empty:
        raise FileFormatError(f"{name} {path} holds no rows (only blank lines or a header); give at least one example")
    return rows


def _label_kind(v: Any) -> str | None:
    if v is None or (isinstance(v, float) and v != v):
        return None  # missing: the field checks report it
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    return f"a JSON {_json_type(v)}"


def check_label_types(rows: list[dict[str, Any]], field: str, path: str | Path, error: type[GraftError] = FileFormatError) -> None:
    """Labels of one file must all be strings or all numbers: ``1`` and ``"1"`` would otherwise
    become one class silently (labels are compared by name), or two classes that print alike.
    Used by training and evaluation alike; the error names the file and both lines."""
    first: tuple[int, str] | None = None
    for i, row in enumerate(rows):
        kind = _label_kind(row.get(field))
        if kind is None:
            continue
        if kind not in ("a string", "a number", "a boolean"):
            raise error(f"{path}: {where(rows, i)}: label field {field!r} is {kind}; a label must be a string or a number")
        if first is None:
            first = (i, kind)
        elif kind != first[1]:
            j = first[0]
            raise error(f"{path}: {where(rows, i)} has label {row[field]!r} ({kind}) but {where(rows, j)} has "
                        f"{rows[j][field]!r} ({first[1]}); write every {field!r} the same way (all quoted or none)")


# -- weights files ---------------------------------------------------------------------------------------

def weights_kind(path: str | Path) -> str | None:
    """What a weights file is, by its first bytes: ``"safetensors"`` (an 8-byte header length and
    a JSON header), ``"torch-zip"`` (``torch.save``'s zip archive, e.g. a pytorch_model.bin),
    ``"pickle"`` (a legacy ``torch.save`` pickle) or None (none of these)."""
    try:
        with open(check_file(path, "weights file"), "rb") as f:
            head = f.read(16)
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise FileFormatError(f"cannot read weights file {path}: {exc.strerror or exc}") from None
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode, protocol 2-5
        return "pickle"
    return None


def not_weights_message(path: str | Path) -> str:
    """The one line for a file that is not any weights format we know, with a hint of what it is."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        head = b""
    if not head:
        looks = "it is empty"
    else:
        try:
            head.decode("utf-8")
            looks = "it looks like text"
        except UnicodeDecodeError as exc:
            looks = "it looks like text" if exc.start > len(head) - 4 else "its first bytes match no known format"
    return (f"{path} is not a safetensors file nor a PyTorch checkpoint ({looks}); "
            "give a model folder or a .safetensors file")
