"""Is the process that wrote something still running? One answer for every reader: the run
record of a training run (:mod:`graftkit.train.runstate`) and the hidden staging folders of an
output (:mod:`graftkit.outputs`).

A pid alone is not enough: after a kill the pid can be reused, so a record may also carry the
process's start time (clock ticks since boot, from ``/proc/PID/stat``) and the boot id, and a
live pid with another start time, or any pid of an earlier boot, is a different process.
"""
from __future__ import annotations

import os
from pathlib import Path


def _stat_fields(pid: int) -> list[bytes] | None:
    """``/proc/PID/stat`` after the command name (which may itself hold spaces and parentheses)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def proc_start(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, field 22 of /proc/PID/stat), if known."""
    fields = _stat_fields(pid)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def proc_state(pid: int) -> bytes | None:
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def process_alive(pid: int, start: int | None = None, boot: str | None = None) -> bool | None:
    """``False`` when the process ``pid`` (started at ``start``, in boot ``boot``, where known) is
    certainly gone, ``True`` when it runs, ``None`` when this machine cannot tell. A zombie counts
    as gone: it can write nothing more."""
    if pid <= 0:
        return None
    now = boot_id()
    if boot and now and boot != now:
        return False  # rebooted since: every process of that boot is gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    except OSError:
        return None
    if proc_state(pid) in (b"Z", b"X"):
        return False
    current = proc_start(pid)
    if start is not None and current is not None and current != start:
        return False  # the pid now belongs to another process
    return True
