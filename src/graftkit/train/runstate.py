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

from ..procs import boot_id as _boot_id
from ..procs import proc_start as _proc_start
from ..procs import process_alive

RUN_FILE = "run.json"


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
    start = who.get("proc_start")
    return process_alive(who["pid"], start if isinstance(start, int) else None, who.get("boot_id") or None)


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
