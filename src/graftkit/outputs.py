"""The life of an output: checked against the inputs, built beside its target, swapped in whole.

Every command that writes (merge, train, eval, export, import-peft, study) goes through here:

* :func:`check_output` refuses an output path that is an input, lies inside one or contains one
  (real paths, symlinks resolved), so ``--overwrite`` can never replace what the run reads.
* :class:`Staged` builds the new output in a hidden sibling ``.NAME.tmp-PID-XXXXXXXX`` and, on
  :meth:`Staged.commit`, swaps it in: the old output is renamed aside to ``.NAME.old-PID-XXXXXXXX``,
  the new one renamed into place, then the old one deleted. Until the second rename the old
  output is where it was; a failure (or Ctrl-C) removes the temporary folder and leaves the old
  output untouched. :func:`atomic_dir` and :func:`write_text_atomic` wrap it.
* A run killed with SIGKILL cannot clean up, so the next :class:`Staged` for the same target
  (and :func:`check_output`) removes the leftovers of dead processes first, with a one-line note
  on stderr. Only names of exactly that pattern, made on this host (the first 4 hex digits after
  the process id), whose process is no longer running are touched; a ``.old-*`` whose target is missing (a kill between the two renames) is renamed back,
  since it is the only copy of the previous output.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import sys
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from .errors import ConfigError, FileFormatError
from .procs import process_alive


def _stage_re(target: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-(\d+)-([0-9a-f]{{8}})$")


def _host_tag() -> str:
    """4 hex digits of this host's name: on a folder shared by several machines, a process id
    says nothing about another host's processes, so only this host's leftovers are judged."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:4]


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{_host_tag()}{uuid.uuid4().hex[:4]}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def note(text: str) -> None:
    print(f"graft: note: {text}", file=sys.stderr, flush=True)


def clean_stale(target: str | Path) -> list[Path]:
    """Remove the ``.tmp-*`` / ``.old-*`` siblings of ``target`` left by processes that are gone.

    Returns what was removed (or restored); each is reported in one line on stderr.
    """
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return []
    pattern = _stage_re(target)
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return []
    done = []
    for name in names:
        m = pattern.match(name)
        if not m:
            continue
        pid = int(m.group(2))
        if not m.group(3).startswith(_host_tag()) or pid == os.getpid() or process_alive(pid) is not False:
            continue  # another host's, ours, or a run still writing it
        path = parent / name
        if m.group(1) == "old" and not os.path.lexists(target):
            try:  # killed between the two renames of a swap: this is the only copy of the old output
                os.replace(path, target)
                note(f"restored {target} from {name}, left by process {pid} that was killed while replacing it")
                done.append(path)
                continue
            except OSError:
                pass
        _remove(path)
        if not os.path.lexists(path):
            what = "unfinished output" if m.group(1) == "tmp" else "replaced output"
            note(f"removed {path}, the {what} of process {pid} that is no longer running")
            done.append(path)
    return done


def _real(path: str | Path) -> str:
    return os.path.realpath(os.path.expanduser(str(path)))


def check_output(out: str | Path, inputs: Iterable[tuple[str, str | Path | None]], *, clean: bool = True) -> None:
    """Refuse an output that is, lies inside, or contains one of ``inputs`` (``(label, path)``
    pairs; paths that do not exist, such as model aliases, are skipped). Symlinks are resolved,
    so a link to an input is the input. Then remove ``out``'s stale temporary siblings."""
    o = _real(out)
    for label, path in inputs:
        if path is None or str(path) == "" or not os.path.lexists(os.path.expanduser(str(path))):
            continue
        i = _real(path)
        if o == i or (os.path.exists(o) and os.path.samefile(o, i)):  # samefile: a hard link or a bind mount
            how = "is"
        elif o.startswith(i.rstrip(os.sep) + os.sep):
            how = "lies inside"
        elif i.startswith(o.rstrip(os.sep) + os.sep):
            how = "contains"
        else:
            continue
        raise ConfigError(f"output {out} {how} the {label} {path}; writing it would destroy what the run reads - "
                          "choose an output path outside the inputs")
    if clean:
        clean_stale(out)


def stage_path(target: str | Path) -> Path:
    """A fresh name for work towards ``target`` (``.NAME.tmp-PID-XXXXXXXX``): a run killed while
    using it leaves something :func:`clean_stale` recognises."""
    return _sibling(Path(target), "tmp")


def swap_in(new: str | Path, target: str | Path) -> Path:
    """Rename ``new`` (a sibling of ``target``) to ``target``; an existing ``target`` is renamed
    aside first and deleted only once ``new`` is in place (it is put back if that rename fails)."""
    new, target = Path(new), Path(target)
    if not os.path.lexists(target):
        os.replace(new, target)
        return target
    old = _sibling(target, "old")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    _remove(old)  # a failure here leaves .old-PID-*, which the next run for target removes
    return target


class Staged:
    """A new version of ``target`` being built in a temporary sibling (:attr:`path`).

    :meth:`commit` swaps it into place; :meth:`discard` removes it. ``target`` may exist only
    with ``overwrite``; an existing file or folder is replaced by the folder built here.
    """

    def __init__(self, target: str | Path, overwrite: bool = False, *, folder: bool = True):
        self.target = Path(target)
        if os.path.lexists(self.target) and not overwrite:
            raise FileFormatError(f"{self.target} already exists; choose another output folder or remove it (or pass overwrite)")
        clean_stale(self.target)
        self.path = _sibling(self.target, "tmp")
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            if folder:
                self.path.mkdir()
        except OSError as exc:  # a file where a folder should be, no permission, read-only disk
            raise FileFormatError(f"cannot create {self.target}: {exc.strerror or exc}; choose an output folder you can write to") from None
        self.done = False

    def commit(self) -> Path:
        """Put the new version in place; the old one (if any) is deleted only after that."""
        swap_in(self.path, self.target)
        self.done = True
        return self.target

    def discard(self) -> None:
        if not self.done:
            _remove(self.path)


@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; on success swap it in as ``target``.

    On any exception the temporary folder is removed and ``target`` is left as it was.
    """
    staged = Staged(target, overwrite)
    try:
        yield staged.path
        staged.commit()
    except BaseException:
        staged.discard()
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a file through a temporary sibling, so a reader never sees half of it."""
    staged = Staged(path, overwrite=True, folder=False)
    try:
        staged.path.write_text(text, encoding="utf-8")
        os.replace(staged.path, staged.target)  # a file replaces a file atomically: no .old needed
        staged.done = True
    except BaseException:
        staged.discard()
        raise
    return Path(path)
