"""Run untrusted, model-written Python (HumanEval-style programs) in a throw-away subprocess.

Each program runs in a fresh ``python -I -B`` interpreter (the evaluating interpreter,
``sys.executable``) inside its own temporary folder, which is deleted afterwards. Layers, from
outermost in:

- its own session and process group, killed as a whole (SIGKILL) when the wall-clock
  ``timeout`` passes; a program that exceeds its CPU-second limit is reported as a timeout too;
- resource limits set before ``exec``: address space (``memory_mb``), CPU seconds
  (``timeout + 1``), size of any file written (stdout/stderr included, they go to files), no
  core dumps;
- a minimal environment (``PATH``, ``HOME`` and ``TMPDIR`` pointing at the temporary folder, no
  proxies, no ``PYTHON*`` variables, which ``-I`` would ignore anyway), stdin closed;
- where the kernel allows it without privileges, an empty network namespace (``unshare -rn``;
  probed once per process and cached), so even code that slips past the hooks has no network;
- a bootstrap that installs a :func:`sys.addaudithook` hook (PEP 578) before the program is
  compiled. It refuses: creating internet sockets and every connect / bind / sendto / name
  lookup; starting processes (``subprocess.Popen``, ``os.system``, ``os.exec*``,
  ``os.posix_spawn``, ``os.fork``, ``pty.spawn``) and signalling other processes; loading
  native code through ``ctypes`` and importing ``_posixsubprocess`` (whose ``fork_exec`` has no
  audit event): both imports fail with ``ImportError``, so libraries that treat ctypes as
  optional (numpy) still import, while ``import subprocess`` fails; and any open for writing,
  rename, remove, mkdir/rmdir, chmod/chown, link/symlink, truncate or ``shutil.rmtree`` whose
  resolved path lies outside the temporary folder. Reading anywhere stays allowed, so the
  standard library imports normally. A refused action raises ``PermissionError`` in the
  program ("graft sandbox: ... refused"); uncaught, it makes the program fail.

What this does NOT protect against, honestly: audit hooks are not a security boundary
(CPython's own documentation says so). Code that is written to escape can, for example,
corrupt interpreter memory, reach native code through an already-loaded extension module, use
a ``dir_fd`` relative path or race a symlink between the check and the open, or read any file
the evaluating user can read (secrets included). When the evaluator runs as root the program
runs as root too. This is HumanEval-grade isolation for honest-but-buggy model output (infinite
loops, runaway memory, stray ``os.remove``, accidental network use), the same threat model as
OpenAI's ``human-eval`` harness, not a jail for adversarial code: run untrusted evaluations in a
container or VM as an unprivileged user.
"""
from __future__ import annotations

import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..errors import EvalError

STATUSES = ("passed", "failed", "timeout", "error")
MAX_OUTPUT_CHARS = 20_000  # of each of stdout / stderr kept in the result (head and tail)
MAX_FILE_MB = 64  # RLIMIT_FSIZE: largest file the program may write, its stdout/stderr included


@dataclass(frozen=True)
class SandboxResult:
    """How one program ended: ``passed`` (exit status 0), ``failed`` (non-zero exit, crash,
    exception or refused action), ``timeout`` (killed at the wall-clock or CPU limit) or
    ``error`` (the sandbox itself could not start the program)."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return asdict(self)


# The bootstrap runs first in the child (argv: boot.py ROOT PROGRAM). It must not import
# anything the hook would then need to re-enter, and must stay readable: it is the whole
# policy. Paths are resolved with os.path.realpath relative to the current directory, which is
# what the kernel will use for the open that follows.
_BOOTSTRAP = r'''
import os, sys


def _install(root):
    sep = os.sep
    realpath = os.path.realpath
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    af_unix = 1  # socket.AF_UNIX on every POSIX system; importing socket here would recurse
    process = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
               "pty.spawn", "os.startfile"}
    net = {"socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo", "socket.gethostbyname",
           "socket.gethostbyname_ex", "socket.gethostbyaddr", "socket.getnameinfo", "socket.getservbyname",
           "socket.getservbyport", "socket.sethostname"}
    # events whose listed argument positions are paths that must stay inside root
    path_args = {"os.rename": (0, 1), "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.chmod": (0,),
                 "os.chown": (0,), "os.link": (0, 1), "os.symlink": (1,), "os.truncate": (0,), "os.utime": (0,),
                 "os.chflags": (0,), "os.lchflags": (0,), "os.lchmod": (0,), "os.setxattr": (0,),
                 "os.removexattr": (0,), "shutil.rmtree": (0,), "shutil.chown": (0,), "shutil.copymode": (1,),
                 "shutil.copystat": (1,), "shutil.copytree": (1,), "shutil.move": (0, 1), "sqlite3.connect": (0,)}
    # ImportError (not PermissionError), so libraries that treat these as optional still
    # import: numpy does `try: import ctypes except ImportError`
    blocked_imports = {"_posixsubprocess": "no new processes",  # its fork_exec raises no audit event
                       "_ctypes": "no native code"}
    busy = []

    def refuse(what, detail):
        raise PermissionError(f"graft sandbox: {what} refused ({detail})")

    def inside(path):
        if isinstance(path, int):  # a file descriptor the program already holds
            return True
        path = os.fsdecode(os.fspath(path))
        if path in (":memory:", ""):
            return True
        real = realpath(path)
        return real == root or real.startswith(root + sep)

    def hook(event, args):
        if busy:  # realpath & co. must not re-enter the policy
            return
        busy.append(1)
        try:
            if event == "open":
                path, mode, flags = (tuple(args) + (None, None, None))[:3]
                writing = (isinstance(flags, int) and flags & write_flags) or (
                    isinstance(mode, str) and any(ch in mode for ch in "wax+"))
                if writing and path is not None and not inside(path):
                    refuse("writing a file outside the sandbox folder", repr(path))
            elif event in path_args:
                for i in path_args[event]:
                    if i < len(args) and args[i] is not None and not inside(args[i]):
                        refuse(event, f"{args[i]!r} is outside the sandbox folder")
            elif event in net:
                refuse(event, "no network access")
            elif event == "socket.__new__":
                if len(args) < 2 or args[1] != af_unix:
                    refuse(event, "no network access")
            elif event in process:
                refuse(event, "no new processes")
            elif event in ("os.kill", "os.killpg"):
                if args and args[0] not in (os.getpid(), 0):
                    refuse(event, "no signals to other processes")
            elif event.startswith("ctypes."):
                refuse(event, "no native code")
            elif event == "import" and args and args[0] in blocked_imports:
                raise ImportError(f"graft sandbox: import {args[0]} refused ({blocked_imports[args[0]]})")
        finally:
            busy.pop()

    sys.addaudithook(hook)


def _run(program):
    import types
    with open(program, encoding="utf-8") as f:
        code = compile(f.read(), program, "exec")
    # a fresh __main__, so the program sees none of this bootstrap and behaves like a script
    main = types.ModuleType("__main__")
    main.__file__ = program
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    exec(code, main.__dict__)


_install(os.path.realpath(sys.argv[1]))
_run(sys.argv[2])
'''

_NETNS: list[str] | None = None
_NETNS_LOCK = threading.Lock()


def _network_namespace() -> list[str]:
    """``["unshare", "-rn"]`` (or ``-n`` as root) if an empty network namespace can be made
    here without privileges; else ``[]``. Probed once per process."""
    global _NETNS
    with _NETNS_LOCK:
        if _NETNS is None:
            _NETNS = []
            exe = shutil.which("unshare")
            if exe and sys.platform.startswith("linux"):
                for flags in (["-rn"], ["-n"]):
                    try:
                        ok = subprocess.run([exe, *flags, sys.executable, "-I", "-c", "pass"], stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10).returncode == 0
                    except (OSError, subprocess.SubprocessError):
                        ok = False
                    if ok:
                        _NETNS = [exe, *flags]
                        break
        return list(_NETNS)


def _limits(memory_mb: int, cpu_seconds: int) -> Callable[[], None]:
    # runs in the child between fork and exec: only resource.setrlimit (already imported, no
    # imports or locks), so it is safe even with run_many's threads around
    mem = memory_mb * 1024 * 1024
    fsize = MAX_FILE_MB * 1024 * 1024
    # CPU: the soft limit sends SIGXCPU (reported as a timeout); the kernel checks the hard
    # limit first and SIGKILLs, so it sits one second higher
    wanted = ((resource.RLIMIT_AS, mem, mem), (resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 1),
              (resource.RLIMIT_FSIZE, fsize, fsize), (resource.RLIMIT_CORE, 0, 0))

    def apply() -> None:
        for res, soft, hard in wanted:
            try:
                resource.setrlimit(res, (soft, hard))
            except (ValueError, OSError):  # the hard limit is already lower: keep it, lower the soft one
                try:
                    resource.setrlimit(res, (min(soft, resource.getrlimit(res)[1]), resource.getrlimit(res)[1]))
                except (ValueError, OSError):
                    pass

    return apply


def _env(root: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": root, "TMPDIR": root, "TMP": root, "TEMP": root,
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def _read_capped(f, limit: int) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(0)
    if size <= limit:
        return f.read().decode("utf-8", errors="replace")
    half = limit // 2
    head = f.read(half)
    f.seek(size - half)
    tail = f.read(half)
    return (head.decode("utf-8", errors="replace") + f"\n... [{size - 2 * half} bytes cut] ...\n"
            + tail.decode("utf-8", errors="replace"))


def _rmtree(path: str) -> None:
    def retry(func, p, _exc):  # the program may have chmod-ed its own files read-only
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=retry)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_then_kill(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait up to ``timeout`` s for the program; kill its whole process group; reap it.

    True when it ended by itself. With a pidfd the group is killed before the leader is
    reaped, so its pid (the group id) cannot have been reused by an unrelated process.
    """
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        try:
            poller = select.poll()  # not select.select: fds above 1024 are fine
            poller.register(fd, select.POLLIN)
            ready = poller.poll(timeout * 1000)
        finally:
            os.close(fd)
        _kill_group(proc.pid)  # the leader is a zombie at worst: the group id is still ours
        proc.wait()
        return bool(ready)
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        proc.wait()
        return False


def _check_args(timeout: float, memory_mb: int) -> None:
    if not isinstance(timeout, (int, float)) or not timeout > 0:
        raise EvalError(f"sandbox timeout must be a positive number of seconds, got {timeout!r}")
    if not isinstance(memory_mb, int) or memory_mb < 64:
        raise EvalError(f"sandbox memory_mb must be an integer >= 64 (the interpreter needs ~30 MB), got {memory_mb!r}")


def run_program(source: str, *, timeout: float = 10.0, memory_mb: int = 1024, cwd: str | os.PathLike | None = None,
                max_output: int = MAX_OUTPUT_CHARS) -> SandboxResult:
    """Run ``source`` as ``__main__`` in a sandboxed subprocess; never raises for what the program does.

    ``cwd`` is the folder in which the program's temporary folder is made (default: the
    system temp folder). ``stdout``/``stderr`` keep at most ``max_output`` characters each
    (head and tail). See the module docstring for what the sandbox does and does not stop.
    """
    _check_args(timeout, memory_mb)
    start = time.perf_counter()
    try:
        root = tempfile.mkdtemp(prefix="graft-sandbox-", dir=cwd)
    except OSError as exc:
        return SandboxResult("error", None, "", f"graft sandbox: cannot make a temporary folder: {exc}", 0.0)
    try:
        root = os.path.realpath(root)
        boot = os.path.join(root, "_graft_boot.py")
        program = os.path.join(root, "program.py")
        Path(boot).write_text(_BOOTSTRAP, encoding="utf-8")
        Path(program).write_text(source, encoding="utf-8")
        cmd = [*_network_namespace(), sys.executable, "-I", "-B", "-X", "utf8", boot, root, program]
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(cmd, cwd=root, env=_env(root), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        start_new_session=True, close_fds=True,
                                        preexec_fn=_limits(memory_mb, int(timeout) + 1))
            except OSError as exc:
                return SandboxResult("error", None, "", f"graft sandbox: cannot start {sys.executable}: {exc}",
                                     time.perf_counter() - start)
            timed_out = not _wait_then_kill(proc, timeout)
            seconds = time.perf_counter() - start
            stdout, stderr = _read_capped(out, max_output), _read_capped(err, max_output)
        rc = proc.returncode
        if timed_out or rc == -signal.SIGXCPU:
            status = "timeout"
            stderr += f"\ngraft sandbox: killed after {timeout:g} s" + (" (CPU limit)" if not timed_out else "")
        elif rc == 0:
            status = "passed"
        else:
            status = "failed"
            if rc == -signal.SIGXFSZ:
                stderr += f"\ngraft sandbox: killed for writing more than {MAX_FILE_MB} MB to one file"
            elif rc is not None and rc < 0:
                stderr += f"\ngraft sandbox: killed by signal {signal.Signals(-rc).name}"
        return SandboxResult(status, None if timed_out else rc, stdout, stderr, seconds)
    finally:
        _rmtree(root)


def run_many(sources: Sequence[str], *, workers: int = 2, timeout: float = 10.0, memory_mb: int = 1024,
             cwd: str | os.PathLike | None = None,
             callback: Callable[[int, SandboxResult], None] | None = None) -> list[SandboxResult]:
    """Run each program with :func:`run_program`, ``workers`` at a time; results in input order.

    Each program is independent: one that crashes, hangs or is refused does not stop the
    others. ``callback(index, result)`` is called in the calling thread as each finishes,
    e.g. to advance a progress bar.
    """
    _check_args(timeout, memory_mb)
    if not isinstance(workers, int) or workers < 1:
        raise EvalError(f"sandbox workers must be a positive integer, got {workers!r}")
    results: list[SandboxResult | None] = [None] * len(sources)
    if not sources:
        return []
    _network_namespace()  # probe once before the threads race for it
    with ThreadPoolExecutor(max_workers=min(workers, len(sources))) as pool:
        futures = {pool.submit(run_program, src, timeout=timeout, memory_mb=memory_mb, cwd=cwd): i
                   for i, src in enumerate(sources)}
        for fut in as_completed(futures):
            i = futures[fut]
            try:
                res = fut.result()
            except Exception as exc:  # a bug in the harness for one sample must not lose the others
                res = SandboxResult("error", None, "", f"graft sandbox: {type(exc).__name__}: {exc}", 0.0)
            results[i] = res
            if callback is not None:
                callback(i, res)
    return [r for r in results if r is not None]
