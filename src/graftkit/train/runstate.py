"""``run.json``: what a training run folder says about itself.

A run writes ``status: running`` at its start, ``done`` at its end and ``failed`` (with the
one-line reason) when it stops on an error. A run killed by SIGKILL, a power cut or the OOM
killer can write nothing, so a running record also names its process (``owner``: pid, host,
the process's start time in clock ticks since boot and the boot id, which together tell a
reused pid from the original). Whoever reads the record (:func:`read_run`: ``graft train``,
``graft inspect``) reports ``interrupted`` when that process is gone.

A record whose process ran on another host cannot be checked from here: it reads as
``running`` with ``owner_alive`` ``None``.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"


def _proc_start(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, field 22 of /proc/PID/stat), if known."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _proc_state(pid: int) -> bytes | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def owner() -> dict[str, Any]:
    """This process, as a running record names it."""
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "proc_start": _proc_start(pid), "boot_id": _boot_id()}


def owner_alive(who: dict[str, Any] | None) -> bool | None:
    """Whether the process a record names still runs: ``None`` when this machine cannot tell."""
    if not isinstance(who, dict) or not isinstance(who.get("pid"), int):
        return None
    if who.get("host") != socket.gethostname():
        return None
    boot = _boot_id()
    if who.get("boot_id") and boot and who["boot_id"] != boot:
        return False  # rebooted since: every process of that boot is gone
    pid = who["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    except OSError:
        return None
    if _proc_state(pid) in (b"Z", b"X"):  # killed, not yet reaped: it can write nothing more
        return False
    start = _proc_start(pid)
    if who.get("proc_start") is not None and start is not None and start != who["proc_start"]:
        return False  # the pid now belongs to another process
    return True


def read_run(out: str | Path) -> dict[str, Any] | None:
    """``out/run.json`` with its status as it stands now; ``None`` if absent or not JSON.

    A ``running`` record whose process is gone comes back with status ``interrupted`` (and
    ``interrupted: <why>``); the file itself is left as it is (reading changes nothing)."""
    path = Path(out) / RUN_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict):
        return None
    if record.get("status") == "running":
        who = record.get("owner")
        alive = owner_alive(who)
        record["owner_alive"] = alive
        if alive is False:
            record["status"] = "interrupted"
            record["interrupted"] = (f"its process {who['pid']} on {who['host']} (started {who.get('started')}) ended without "
                                     "recording an end (killed, or the machine stopped)")
    return record


def describe_owner(who: dict[str, Any] | None) -> str:
    if not isinstance(who, dict):
        return "an unknown process"
    return f"process {who.get('pid')} on {who.get('host')} (started {who.get('started')})"


def describe_run(out: str | Path) -> dict[str, Any] | None:
    """What ``graft inspect`` shows of a run folder (status as it stands now); ``None`` if no run.json."""
    record = read_run(out)
    if record is None:
        return None
    from .checkpoint import latest_checkpoint

    recipe = record.get("recipe") or {}
    ckpt = latest_checkpoint(out)
    summary = record.get("summary") or {}
    return {
        "kind": "training run", "status": record.get("status"),
        "why": record.get("error") or record.get("interrupted"),
        "process": describe_owner(record.get("owner")) if record.get("owner") else None,
        "model": recipe.get("model"), "task": recipe.get("task"), "method": (recipe.get("method") or {}).get("method"),
        "recipe_fingerprint": record.get("fingerprint"), "run_fingerprint": record.get("run_fingerprint"),
        "data": {role: {k: d.get(k) for k in ("path", "sha256", "examples")} for role, d in ((record.get("inputs") or {}).get("data") or {}).items()},
        "latest_checkpoint": str(ckpt) if ckpt else None,
        "steps": summary.get("steps"), "final_loss": summary.get("final_loss"), "outputs": summary.get("outputs"),
    }
