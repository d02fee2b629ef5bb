"""Run untrusted, model-written Python (HumanEval-style programs) in a throw-away, OS-isolated subprocess.

The boundary is the operating system. Each program runs under bubblewrap (``bwrap``, Debian
package ``bubblewrap``) in its own user, mount, PID, network, IPC and UTS namespaces:

- a read-only view of the system (``/`` bound read-only; ``/dev`` and ``/proc`` fresh and
  private, the kernel knobs in ``/proc`` such as ``/proc/sys`` read-only). ``/root``, ``/home``, the evaluator's ``HOME`` and working folder, ``/tmp``,
  ``/var/tmp``, ``/run``, ``/mnt``, ``/media``, ``/srv`` are hidden behind empty read-only
  folders (the interpreter's own folders are bound back read-only), and ``/etc/shadow``,
  ``/etc/gshadow`` and ``/etc/ssh`` behind empty ones;
- one private writable folder, ``/tmp`` (also the working folder, ``HOME`` and ``TMPDIR``): a
  tmpfs of ``disk_mb`` MB, the quota for everything the program writes; it vanishes with the run;
- rlimits: address space (``memory_mb``), CPU seconds, size of any one file, no core dumps,
  and (in the bootstrap, inside the user namespace) the number of processes;
- a seccomp filter that refuses new processes (``fork``, ``vfork``, ``clone`` without
  ``CLONE_THREAD``, ``clone3``), ``ptrace`` and ``process_vm_*``: threads still work;
- no network: the network namespace is empty (no interface but a down loopback);
- a minimal environment (nothing of the evaluator's) and stdin closed;
- the whole tree dies with the run: the program is PID 1 of its namespace (``--as-pid-1``), so
  when it exits or is killed, the kernel kills everything left in the namespace; bwrap kills it
  when the evaluator's side goes away (``--die-with-parent``); and the wall-clock ``timeout``
  kills bwrap's process group.

Inside, a bootstrap installs a :func:`sys.addaudithook` hook (PEP 578) before the program is
compiled. It is a second layer that turns common mistakes into clear ``PermissionError`` /
``ImportError`` messages ("graft sandbox: ... refused"): network, new processes, ctypes, writes
outside the folder, signals to other processes, ``gc`` object walking, reading process memory.
It is not the boundary: audit hooks can be defeated from inside the interpreter.

The pass verdict. A program *passes* when it exits with status 0 *and* ran to its end: after the
program returns, the bootstrap writes a random per-run nonce to a pipe only the evaluator reads.
The nonce reaches the bootstrap through another pipe, which it reads and closes before the
program runs; it is never in a file, argv or the environment. So printing a guessed marker and
calling ``os._exit(0)`` or ``sys.exit(0)`` fails. It cannot stop code that attacks the
interpreter it runs in (see docs/eval.md, "Threat model").

Where bubblewrap is missing, util-linux ``unshare`` makes the namespaces and a setup stage
(``_UNSHARE_SETUP``), run inside them before any untrusted code, builds the same layout, drops
every capability, sets ``no_new_privs`` and the same seccomp filter, then starts the bootstrap.

When neither tool can isolate a program here, :func:`run_program` raises
:class:`~graftkit.errors.EvalError` saying how to install it, unless ``unsafe_no_isolation=True``;
then the program runs as a plain child process of the evaluating user with the rlimits, the
minimal environment, a temporary folder on disk (no quota) and the audit hook only. The
environment variable ``GRAFT_SANDBOX=none`` makes this module behave as if no isolation were
available, and ``GRAFT_SANDBOX=unshare`` skips bubblewrap (both for the tests).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import platform
import resource
import secrets
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..errors import EvalError

STATUSES = ("passed", "failed", "timeout", "error")
MAX_OUTPUT_CHARS = 20_000  # of each of stdout / stderr kept in the result (head and tail)
MAX_FILE_MB = 64  # RLIMIT_FSIZE: largest file the program may write, its stdout/stderr included
DISK_MB = 128  # default size of the private writable folder (a tmpfs, so it is memory too)
MAX_PROCESSES = 64  # RLIMIT_NPROC inside the user namespace (threads count too)
WORKDIR = "/tmp"  # the private folder, as the program sees it
INSTALL_HINT = "install bubblewrap (apt-get install bubblewrap)"
# hidden behind empty read-only folders: where users keep secrets and where other programs talk
HIDDEN_DIRS = ("/root", "/home", "/var/tmp", "/run", "/mnt", "/media", "/srv")
HIDDEN_FILES = ("/etc/shadow", "/etc/gshadow", "/etc/ssh")
# kernel knobs in the fresh /proc, bound read-only: the program may keep kernel uid 0 (an
# evaluator running as root), and uid 0 may write host-wide sysctls such as kernel.core_pattern
PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs", "acpi", "asound", "scsi", "latency_stats", "timer_list",
                  "sched_debug", "keys")


@dataclass(frozen=True)
class SandboxResult:
    """How one program ended: ``passed`` (exit status 0 after running to its end), ``failed``
    (non-zero exit, crash, exception, refused action, or an exit before the end), ``timeout``
    (killed at the wall-clock or CPU limit) or ``error`` (the sandbox itself could not start
    the program)."""

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


# The bootstrap runs first in the child: argv = boot.py ROOT NONCE_FD VERDICT_FD PROGRAM NPROC HOOK.
# It is the whole in-process policy, so it stays readable. Everything the hook calls is bound
# when it is installed, so a program that replaces os.* or builtins does not change the policy.
_BOOTSTRAP = r'''
import os, sys


def _install(root):
    sep = os.sep
    realpath, fsdecode, fspath, getpid = os.path.realpath, os.fsdecode, os.fspath, os.getpid
    _isinstance, _str, _int, _tuple, _len, _repr = isinstance, str, int, tuple, len, repr
    _PermissionError, _ImportError = PermissionError, ImportError
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    af_unix = 1  # socket.AF_UNIX on every POSIX system; importing socket here would recurse
    process = frozenset({"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                         "os.forkpty", "pty.spawn", "os.startfile"})
    net = frozenset({"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
                     "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr", "socket.getnameinfo",
                     "socket.getservbyname", "socket.getservbyport", "socket.sethostname"})
    # walking every object or frame is how a program finds (and rewrites) this hook
    introspection = frozenset({"gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames",
                               "sys.settrace", "sys.setprofile"})
    # events whose listed argument positions are paths that must stay inside root
    path_args = {"os.rename": (0, 1), "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.chmod": (0,),
                 "os.chown": (0,), "os.link": (0, 1), "os.symlink": (1,), "os.truncate": (0,), "os.utime": (0,),
                 "os.chflags": (0,), "os.lchflags": (0,), "os.lchmod": (0,), "os.setxattr": (0,),
                 "os.removexattr": (0,), "shutil.rmtree": (0,), "shutil.chown": (0,), "shutil.copymode": (1,),
                 "shutil.copystat": (1,), "shutil.copytree": (1,), "shutil.move": (0, 1), "sqlite3.connect": (0,),
                 "os.mkfifo": (0,), "os.mknod": (0,)}
    # ImportError (not PermissionError), so libraries that treat these as optional still
    # import: numpy does `try: import ctypes except ImportError`
    blocked_imports = {"_posixsubprocess": "no new processes",  # its fork_exec raises no audit event
                       "_ctypes": "no native code"}

    def refuse(what, detail):
        raise _PermissionError(f"graft sandbox: {what} refused ({detail})")

    def resolved(path):
        if _isinstance(path, _int):  # a file descriptor the program already holds
            return None
        path = fsdecode(fspath(path))
        if path in (":memory:", ""):
            return None
        return realpath(path)

    def inside(path):
        real = resolved(path)
        return real is None or real == root or real.startswith(root + sep)

    def process_state(path):  # /proc/<pid>[/...]: its memory, fds and frames
        real = resolved(path)
        if real is None or not real.startswith("/proc/"):
            return False
        first = real[6:].split("/", 1)[0]
        return first.isdigit() or first in ("self", "thread-self")

    def hook(event, args):
        if event == "open":
            path, mode, flags = (_tuple(args) + (None, None, None))[:3]
            writing = (_isinstance(flags, _int) and flags & write_flags) or (
                _isinstance(mode, _str) and any(ch in mode for ch in "wax+"))
            if path is not None and writing and not inside(path):
                refuse("writing a file outside the sandbox folder", _repr(path))
            if path is not None and process_state(path):
                refuse("opening process state", _repr(path))
        elif event in path_args:
            for i in path_args[event]:
                if i < _len(args) and args[i] is not None and not inside(args[i]):
                    refuse(event, f"{args[i]!r} is outside the sandbox folder")
        elif event in net:
            refuse(event, "no network access")
        elif event == "socket.__new__":
            if _len(args) < 2 or args[1] != af_unix:
                refuse(event, "no network access")
        elif event in process:
            refuse(event, "no new processes")
        elif event in ("os.kill", "os.killpg", "signal.pthread_kill"):
            if args and args[0] not in (getpid(), 0):
                refuse(event, "no signals to other processes")
        elif event in introspection:
            refuse(event, "no walking the interpreter's objects")
        elif event.startswith("ctypes."):
            refuse(event, "no native code")
        elif event == "import" and args and args[0] in blocked_imports:
            raise _ImportError(f"graft sandbox: import {args[0]} refused ({blocked_imports[args[0]]})")

    sys.addaudithook(hook)

    # No audit event covers mkfifo / mknod, and events carry a dir_fd-relative path without its
    # dir_fd: wrap those functions (a wrapper is easy to get around; this is the second layer)
    import posix
    readlink, join = os.readlink, os.path.join

    def wrap(name, fn, check_path):
        def guarded(*args, **kwargs):
            dirs = [v for k, v in kwargs.items() if k.endswith("dir_fd") and v is not None]
            for fd in dirs:  # a folder the program opened: where is it, and where do the names lead?
                try:
                    folder = readlink(f"/proc/self/fd/{fd}")
                except (OSError, TypeError):
                    refuse(f"os.{name}", f"dir_fd {fd!r} cannot be resolved")
                for arg in args:
                    if _isinstance(arg, (_str, bytes)) and not inside(join(folder, fsdecode(arg))):
                        refuse(f"os.{name}", f"{arg!r} relative to {folder!r} is outside the sandbox folder")
            if check_path and not dirs and args and not inside(args[0]):
                refuse(f"os.{name}", f"{args[0]!r} is outside the sandbox folder")
            return fn(*args, **kwargs)
        guarded.__name__ = guarded.__qualname__ = name
        guarded.__doc__ = fn.__doc__
        return guarded

    for name in ("open", "mkdir", "rename", "replace", "remove", "unlink", "rmdir", "symlink", "link", "chmod", "chown",
                 "utime", "mkfifo", "mknod"):
        fn = getattr(posix, name, None)
        if fn is not None:
            guarded = wrap(name, fn, name in ("mkfifo", "mknod"))
            setattr(posix, name, guarded)
            if getattr(os, name, None) is fn:
                setattr(os, name, guarded)


def _main():
    root, nonce_fd, verdict_fd, program, nproc, hook = sys.argv[1:7]
    nonce_fd, verdict_fd, nproc = int(nonce_fd), int(verdict_fd), int(nproc)
    read, write, close = os.read, os.write, os.close
    # the nonce lives only in this frame; its pipe is empty and closed before the program runs
    nonce = read(nonce_fd, 64)
    close(nonce_fd)
    if nproc > 0:  # inside the sandbox's user namespace, so it counts this run's processes only
        import resource
        hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        nproc = nproc if hard == resource.RLIM_INFINITY else min(nproc, hard)
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    import types
    with open(program, encoding="utf-8") as f:
        code = compile(f.read(), program, "exec")
    # a fresh __main__, so the program sees none of this bootstrap and behaves like a script
    main = types.ModuleType("__main__")
    main.__file__ = program
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    sys.argv = [program]
    flush_out, flush_err = sys.stdout.flush, sys.stderr.flush
    if hook == "1":
        _install(root)
    del f, types
    exec(code, main.__dict__)
    # reached only when the program ran to its end: no exception, no sys.exit, no os._exit
    flush_out()
    flush_err()
    write(verdict_fd, nonce)
    close(verdict_fd)


_main()
'''

# The fallback where bubblewrap is missing: util-linux `unshare` makes the namespaces, and this
# script, run inside them as the namespace's root before any untrusted code, builds what bwrap
# would (argv[1] is its JSON config), gives up every capability and execs the bootstrap.
_UNSHARE_SETUP = r'''
import ctypes, json, os, stat, struct, sys

cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
# statvfs flag -> mount flag: a remount must repeat the flags the parent namespace locked
KEEP = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC), (os.ST_NOATIME, MS_NOATIME),
        (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME))


def mount(src, dst, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    if libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {dst}: {os.strerror(err)}")


def read_only(path):
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY
    st = os.statvfs(path)
    for f_st, f_ms in KEEP:
        if st.f_flag & f_st:
            flags |= f_ms
    mount(None, path, None, flags)


def bind_ro(src, dst):
    mount(src, dst, None, MS_BIND | MS_REC)
    read_only(dst)


def unescape(field):
    return field.encode().decode("unicode_escape")  # mountinfo writes space as \040


# what must be reachable after folders are covered: opened now, bound later through /proc/self/fd
keep = {d: os.open(d, os.O_PATH | os.O_DIRECTORY) for d in cfg["python_dirs"]}
devices = {n: os.open("/dev/" + n, os.O_PATH) for n in ("null", "zero", "full", "random", "urandom")}
# 1. every mount read-only (one we cannot reach is out of the program's reach too)
for line in open("/proc/self/mountinfo").read().splitlines():
    point = unescape(line.split()[4])
    try:
        read_only(point)
    except OSError as exc:
        if exc.errno not in (2, 13):  # ENOENT, EACCES
            raise
mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # this PID namespace's
with open("/proc/sys/user/max_user_namespaces", "w") as f:  # no nested user namespace
    f.write("0")
for sub in cfg["proc_read_only"]:
    if os.path.exists("/proc/" + sub):
        bind_ro("/proc/" + sub, "/proc/" + sub)
# 2. a private /dev with the harmless devices only
mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=65536")
for name, fd in devices.items():
    open("/dev/" + name, "w").close()
    bind_ro(f"/proc/self/fd/{fd}", "/dev/" + name)
for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                     ("stderr", "/proc/self/fd/2")):
    os.symlink(target, "/dev/" + name)
os.mkdir("/dev/shm")
read_only("/dev")
# 3. covered folders, the private one, and the interpreter's folders bound back
for d in cfg["hidden"]:
    mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=65536")
mount("tmpfs", cfg["workdir"], "tmpfs", MS_NOSUID | MS_NODEV, f"mode=0755,size={cfg['disk_bytes']}")
for d, fd in keep.items():
    if any(d == h or d.startswith(h.rstrip("/") + "/") for h in [*cfg["hidden"], cfg["workdir"]]):
        os.makedirs(d, exist_ok=True)
        bind_ro(f"/proc/self/fd/{fd}", d)
for d in cfg["hidden"]:
    read_only(d)
for f in cfg["hidden_files"]:
    if os.path.isdir(f):
        mount("tmpfs", f, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=4096")
        read_only(f)
    elif os.path.exists(f):
        bind_ro(f"/proc/self/fd/{devices['null']}", f)
# 4. the program's files, then no way back: no capabilities, no new privileges, the seccomp filter
for name, fd in cfg["files"].items():
    with open(os.path.join(cfg["workdir"], name), "wb") as out:
        out.write(b"".join(iter(lambda: os.read(fd, 1 << 20), b"")))
    os.close(fd)
os.chdir(cfg["workdir"])
cap = 0
while libc.prctl(24, cap, 0, 0, 0) == 0:  # PR_CAPBSET_DROP until EINVAL past the last capability
    cap += 1
if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
    raise OSError(ctypes.get_errno(), "no_new_privs")
bpf = bytes.fromhex(cfg["seccomp"]) if cfg["seccomp"] else b""
if bpf:
    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
    prog = Prog(len(bpf) // 8, bpf)
    if libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "seccomp")
os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
'''

_PROBE: dict[str, str | None] = {}
_PROBE_LOCK = threading.Lock()
_UNSAFE: contextvars.ContextVar[bool] = contextvars.ContextVar("graft_unsafe_no_isolation", default=False)


def _arch_numbers() -> tuple[int, dict[str, int]] | None:
    """(AUDIT_ARCH, syscall numbers) for the seccomp filter; None on other machines."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return 0xC000003E, {"fork": 57, "vfork": 58, "clone": 56, "clone3": 435, "ptrace": 101,
                            "process_vm_readv": 310, "process_vm_writev": 311, "socket": 41, "keyctl": 250,
                            "add_key": 248, "request_key": 249, "bpf": 321, "perf_event_open": 298,
                            "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427}
    if machine in ("aarch64", "arm64"):
        return 0xC00000B7, {"clone": 220, "clone3": 435, "ptrace": 117, "process_vm_readv": 270,
                            "process_vm_writev": 271, "socket": 198, "keyctl": 219, "add_key": 217,
                            "request_key": 218, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282,
                            "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427}
    return None


def seccomp_filter() -> bytes | None:
    """A classic-BPF seccomp program (as bwrap's ``--add-seccomp-fd`` reads it) that refuses new
    processes but not threads: ``fork``/``vfork``/``clone`` without ``CLONE_THREAD`` get EAGAIN,
    ``clone3`` ENOSYS (the C library then falls back to ``clone``), ``ptrace`` and
    ``process_vm_*``, the key-ring calls, ``bpf``, ``perf_event_open``, ``userfaultfd`` and
    ``io_uring_*`` EPERM, ``socket(AF_UNIX, ...)`` EACCES (a filesystem socket of a host
    service in a visible folder could otherwise be reached; ``socketpair`` still works); a
    foreign ABI (x32, i386) kills the process. None on machines whose
    syscall numbers are not listed here (then only RLIMIT_NPROC limits processes)."""
    numbers = _arch_numbers()
    if numbers is None:
        return None
    arch, nr = numbers
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill = 0x7FFF0000, 0x80000000
    errno = lambda e: 0x00050000 | e  # noqa: E731
    prog: list[tuple[int, int, int, int]] = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill), (ld, 0, 0, 0)]
    if arch == 0xC000003E:  # x32 system calls carry bit 30 in the number
        prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, kill)]
    refused = [(nr[k], 11) for k in ("fork", "vfork") if k in nr] + [(nr["clone3"], 38)]  # EAGAIN, ENOSYS
    # EPERM: other processes' memory, and kernel interfaces a Python program has no use for that
    # widen the attack surface (the kernel keyring is shared by uid, io_uring bypasses seccomp)
    refused += [(nr[k], 1) for k in ("ptrace", "process_vm_readv", "process_vm_writev", "keyctl", "add_key",
                                     "request_key", "bpf", "perf_event_open", "userfaultfd", "io_uring_setup",
                                     "io_uring_enter", "io_uring_register")]
    for number, err in refused:
        prog += [(jeq, 0, 1, number), (ret, 0, 0, errno(err))]
    af_unix, clone_thread = 1, 0x00010000
    prog += [(jeq, 0, 3, nr["socket"]), (ld, 0, 0, 16), (jeq, 0, 1, af_unix), (ret, 0, 0, errno(13)), (ld, 0, 0, 0)]
    prog += [(jeq, 0, 3, nr["clone"]), (ld, 0, 0, 16), (jset, 1, 0, clone_thread), (ret, 0, 0, errno(11)),
             (ret, 0, 0, allow)]
    return b"".join(struct.pack("=HBBI", *ins) for ins in prog)


def _python_dirs() -> list[str]:
    """Folders the sandboxed interpreter needs to read: its prefixes, standard library and
    site-packages (not this process's whole sys.path, which may name project folders)."""
    import sysconfig

    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
            os.path.dirname(os.path.realpath(sys.executable)), os.path.dirname(os.path.abspath(sys.executable))}
    dirs.update(v for k, v in sysconfig.get_paths().items() if k in ("stdlib", "platstdlib", "purelib", "platlib"))
    return sorted({os.path.realpath(d) for d in dirs if d and os.path.isdir(d)})


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _layout() -> tuple[list[str], list[str]]:
    """(folders to hide, interpreter folders to bind back read-only), for both tools."""
    hidden = [d for d in HIDDEN_DIRS if os.path.isdir(d) and not os.path.islink(d)]
    try:
        cwd: str | None = os.getcwd()
    except OSError:  # the evaluator's working folder was removed
        cwd = None
    for extra in (os.environ.get("HOME"), cwd):
        # the evaluator's own folders, unless they are the whole system or a system folder
        if extra and os.path.isdir(extra) and os.path.realpath(extra) not in ("/", "/usr", "/etc", "/opt", "/var", "/srv"):
            hidden.append(os.path.realpath(extra))
    hidden = sorted(set(hidden))
    hidden = [d for d in hidden if not any(_under(d, o) and d != o for o in hidden)]  # outermost only
    hidden = [d for d in hidden if not _under(WORKDIR, d) and not _under(d, WORKDIR)]
    back = [d for d in _python_dirs() if any(_under(d, h) for h in [*hidden, WORKDIR])]
    back = [d for d in back if not any(_under(d, o) and d != o for o in back)]  # outermost only
    return hidden, back


def _bwrap_command(bwrap: str, *, disk_mb: int, env: dict[str, str], fds: dict[str, int],
                   seccomp_fd: int | None) -> list[str]:
    hidden, back = _layout()
    cmd = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
           "--unshare-cgroup-try", "--disable-userns", "--die-with-parent", "--new-session", "--as-pid-1",
           "--uid", "65534", "--gid", "65534", "--hostname", "graft-sandbox",
           "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for name in PROC_READ_ONLY:
        if os.path.exists(f"/proc/{name}"):
            cmd += ["--ro-bind", f"/proc/{name}", f"/proc/{name}"]
    for d in hidden:
        cmd += ["--perms", "0755", "--size", "65536", "--tmpfs", d]
    cmd += ["--perms", "0755", "--size", str(disk_mb * 1024 * 1024), "--tmpfs", WORKDIR]
    for d in back:  # bound back where a hidden folder or the private one covers them
        cmd += ["--ro-bind", d, d]
    for f in HIDDEN_FILES:
        if os.path.isdir(f):
            cmd += ["--perms", "0755", "--size", "4096", "--tmpfs", f, "--remount-ro", f]
        elif os.path.exists(f):
            cmd += ["--ro-bind", "/dev/null", f]
    for d in [*hidden, "/dev"]:
        cmd += ["--remount-ro", d]
    for name, fd in fds.items():
        cmd += ["--file", str(fd), f"{WORKDIR}/{name}"]
    if seccomp_fd is not None:
        cmd += ["--add-seccomp-fd", str(seccomp_fd)]
    cmd += ["--chdir", WORKDIR, "--clearenv"]
    for k, v in env.items():
        cmd += ["--setenv", k, v]
    return cmd


def isolation() -> str | None:
    """``"bwrap"`` or ``"unshare"``: the tool that isolates programs here, or None (probed once
    per process by running a program with it). ``GRAFT_SANDBOX=none`` forces None,
    ``GRAFT_SANDBOX=unshare`` skips bubblewrap (both for tests)."""
    forced = os.environ.get("GRAFT_SANDBOX", "").lower()
    if forced == "none" or not sys.platform.startswith("linux"):
        return None
    with _PROBE_LOCK:
        for tool in ("bwrap", "unshare"):
            if tool == "bwrap" and forced == "unshare":
                continue
            if tool not in _PROBE:
                _PROBE[tool] = None
                exe = shutil.which(tool)
                if exe:
                    res = _RUNNERS[tool](exe, "print('ok')\n", timeout=20, memory_mb=1024, disk_mb=1, max_output=1000,
                                         hook=True, block_processes=True)
                    if res.status == "passed" and res.stdout == "ok\n":
                        _PROBE[tool] = exe
                    else:
                        _PROBE[f"{tool}_error"] = (res.stderr.strip().splitlines() or ["no output"])[-1]
            if _PROBE[tool]:
                return tool
        return None


def isolation_problem() -> str:
    """One line on why there is no isolation here (for error messages)."""
    if os.environ.get("GRAFT_SANDBOX", "").lower() == "none":
        return "GRAFT_SANDBOX=none is set"
    if not shutil.which("bwrap"):
        return "bubblewrap (bwrap) is not installed" + (
            f" and unshare cannot isolate here ({_PROBE['unshare_error']})" if _PROBE.get("unshare_error") else "")
    return f"bwrap cannot create namespaces here ({_PROBE.get('bwrap_error', 'unknown reason')})"


def require_isolation(unsafe_no_isolation: bool = False) -> None:
    """Raise :class:`EvalError` (one line, how to fix it) when generated code could not run isolated."""
    if unsafe_no_isolation or _UNSAFE.get() or isolation() is not None:
        return
    raise EvalError(f"code tasks run generated programs and need OS isolation, which is not available: "
                    f"{isolation_problem()}; {INSTALL_HINT}, or pass --unsafe-no-isolation "
                    f"(unsafe_no_isolation=True) to run them with in-process checks only")


@contextlib.contextmanager
def allow_unsafe(allowed: bool = True) -> Iterator[None]:
    """Within this block (and this thread / context), code runs without isolation when there is none."""
    token = _UNSAFE.set(bool(allowed) or _UNSAFE.get())
    try:
        yield
    finally:
        _UNSAFE.reset(token)


def _prctl() -> Callable[..., int] | None:
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):
        return None


_PRCTL = _prctl() if sys.platform.startswith("linux") else None
PR_SET_PDEATHSIG = 1


def _limits(memory_mb: int, cpu_seconds: int) -> Callable[[], None]:
    # runs in the child between fork and exec: only resource.setrlimit and prctl (loaded
    # before, no imports or locks), so it is safe even with run_many's threads around
    mem = memory_mb * 1024 * 1024
    fsize = MAX_FILE_MB * 1024 * 1024
    # CPU: the soft limit sends SIGXCPU (reported as a timeout); the kernel checks the hard
    # limit first and SIGKILLs, so it sits one second higher
    wanted = ((resource.RLIMIT_AS, mem, mem), (resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 1),
              (resource.RLIMIT_FSIZE, fsize, fsize), (resource.RLIMIT_CORE, 0, 0))

    def apply() -> None:
        if _PRCTL is not None:  # killed when the evaluator's thread that started it goes away
            _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
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
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


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


def _check_args(timeout: float, memory_mb: int, disk_mb: int = DISK_MB) -> None:
    if not isinstance(timeout, (int, float)) or not timeout > 0:
        raise EvalError(f"sandbox timeout must be a positive number of seconds, got {timeout!r}")
    if not isinstance(memory_mb, int) or memory_mb < 64:
        raise EvalError(f"sandbox memory_mb must be an integer >= 64 (the interpreter needs ~30 MB), got {memory_mb!r}")
    if isinstance(disk_mb, bool) or not isinstance(disk_mb, int) or disk_mb < 1:
        raise EvalError(f"sandbox disk_mb must be a positive integer (MB the program may write), got {disk_mb!r}")


def _data_fd(data: bytes, stack: contextlib.ExitStack) -> int:
    f = stack.enter_context(tempfile.TemporaryFile())
    f.write(data)
    f.flush()
    f.seek(0)
    return f.fileno()


def _launch(cmd: list[str], *, cwd: str | None, env: dict[str, str] | None, keep: list[int], timeout: float,
            memory_mb: int, max_output: int, nonce: bytes, nonce_r: int, verdict_r: int, verdict_w: int,
            signal_offset: bool, start: float) -> SandboxResult:
    """Start ``cmd`` (the bootstrap, directly or under bwrap), wait, kill, and judge it."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True, pass_fds=[nonce_r, verdict_w, *keep],
                                    preexec_fn=_limits(memory_mb, int(timeout) + 1))
        except OSError as exc:
            return SandboxResult("error", None, "", f"graft sandbox: cannot start {cmd[0]}: {exc}",
                                 time.perf_counter() - start)
        finally:
            os.close(nonce_r)
            os.close(verdict_w)  # the child's copy is the only writer left
        timed_out = not _wait_then_kill(proc, timeout)
        seconds = time.perf_counter() - start
        os.set_blocking(verdict_r, False)
        try:
            verdict = os.read(verdict_r, 4096)
        except BlockingIOError:
            verdict = b""
        stdout, stderr = _read_capped(out, max_output), _read_capped(err, max_output)
    rc = proc.returncode
    sig = -rc if rc is not None and rc < 0 else (rc - 128 if signal_offset and rc is not None and rc > 128 else None)
    if timed_out or sig == signal.SIGXCPU:
        stderr += f"\ngraft sandbox: killed after {timeout:g} s" + (" (CPU limit)" if not timed_out else "")
        return SandboxResult("timeout", None, stdout, stderr, seconds)
    if rc == 0 and secrets.compare_digest(verdict, nonce):
        return SandboxResult("passed", rc, stdout, stderr, seconds)
    if rc == 0:
        stderr += "\ngraft sandbox: the program exited with status 0 before its end (sys.exit / os._exit): not a pass"
    elif sig == signal.SIGXFSZ:
        stderr += f"\ngraft sandbox: killed for writing more than {MAX_FILE_MB} MB to one file"
    elif sig is not None and 0 < sig < signal.NSIG:
        stderr += f"\ngraft sandbox: killed by signal {signal.Signals(sig).name}"
    return SandboxResult("failed", rc, stdout, stderr, seconds)


def _pipes(nonce: bytes) -> tuple[int, int, int]:
    nonce_r, nonce_w = os.pipe()
    os.write(nonce_w, nonce)  # 32 bytes: far below the pipe buffer, so this never blocks
    os.close(nonce_w)
    verdict_r, verdict_w = os.pipe()
    return nonce_r, verdict_r, verdict_w


def _isolated_start(source: str, stack: contextlib.ExitStack, hook: bool, block_processes: bool):
    """What both isolating runners start from: a fresh nonce, the bootstrap and program as
    in-memory files, the seccomp filter (or None), the nonce and verdict pipes, and the
    bootstrap's command line inside the sandbox."""
    nonce = secrets.token_hex(16).encode()
    fds = {".graft_boot.py": _data_fd(_BOOTSTRAP.encode(), stack), "program.py": _data_fd(source.encode(), stack)}
    bpf = seccomp_filter() if block_processes else None
    nonce_r, verdict_r, verdict_w = _pipes(nonce)
    stack.callback(os.close, verdict_r)
    argv = [sys.executable, "-I", "-B", "-X", "utf8", f"{WORKDIR}/.graft_boot.py", WORKDIR, str(nonce_r),
            str(verdict_w), f"{WORKDIR}/program.py", str(MAX_PROCESSES), "1" if hook else "0"]
    return nonce, fds, bpf, (nonce_r, verdict_r, verdict_w), argv


def _run_isolated(bwrap: str, source: str, *, timeout: float, memory_mb: int, disk_mb: int, max_output: int,
                  hook: bool, block_processes: bool) -> SandboxResult:
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        nonce, fds, bpf, (nonce_r, verdict_r, verdict_w), argv = _isolated_start(source, stack, hook, block_processes)
        seccomp_fd = _data_fd(bpf, stack) if bpf else None
        cmd = _bwrap_command(bwrap, disk_mb=disk_mb, env=_env(WORKDIR), fds=fds, seccomp_fd=seccomp_fd) + argv
        keep = [*fds.values(), *([seccomp_fd] if seccomp_fd is not None else [])]
        return _launch(cmd, cwd="/", env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, keep=keep, timeout=timeout,
                       memory_mb=memory_mb, max_output=max_output, nonce=nonce, nonce_r=nonce_r, verdict_r=verdict_r,
                       verdict_w=verdict_w, signal_offset=True, start=start)


def _run_unshare(unshare: str, source: str, *, timeout: float, memory_mb: int, disk_mb: int, max_output: int,
                 hook: bool, block_processes: bool) -> SandboxResult:
    import json

    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        nonce, fds, bpf, (nonce_r, verdict_r, verdict_w), argv = _isolated_start(source, stack, hook, block_processes)
        hidden, back = _layout()
        cfg = {"hidden": hidden, "python_dirs": back, "workdir": WORKDIR, "disk_bytes": disk_mb * 1024 * 1024,
               "hidden_files": list(HIDDEN_FILES), "proc_read_only": list(PROC_READ_ONLY), "files": fds, "seccomp": bpf.hex() if bpf else "", "argv": argv,
               "env": _env(WORKDIR)}
        cmd = [unshare, "--user", "--map-root-user", "--mount", "--propagation", "private", "--pid", "--fork",
               "--kill-child", "--net", "--ipc", "--uts", sys.executable, "-I", "-B", "-c", _UNSHARE_SETUP, json.dumps(cfg)]
        return _launch(cmd, cwd="/", env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, keep=list(fds.values()),
                       timeout=timeout, memory_mb=memory_mb, max_output=max_output, nonce=nonce, nonce_r=nonce_r,
                       verdict_r=verdict_r, verdict_w=verdict_w, signal_offset=True, start=start)


_RUNNERS = {"bwrap": _run_isolated, "unshare": _run_unshare}


def _run_unisolated(source: str, *, timeout: float, memory_mb: int, cwd: str | os.PathLike | None,
                    max_output: int, hook: bool) -> SandboxResult:
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
        nonce = secrets.token_hex(16).encode()
        nonce_r, verdict_r, verdict_w = _pipes(nonce)
        try:
            # nproc 0: outside a user namespace RLIMIT_NPROC would count all of the user's processes
            cmd = [sys.executable, "-I", "-B", "-X", "utf8", boot, root, str(nonce_r), str(verdict_w), program, "0",
                   "1" if hook else "0"]
            return _launch(cmd, cwd=root, env=_env(root), keep=[], timeout=timeout, memory_mb=memory_mb,
                           max_output=max_output, nonce=nonce, nonce_r=nonce_r, verdict_r=verdict_r,
                           verdict_w=verdict_w, signal_offset=False, start=start)
        finally:
            os.close(verdict_r)
    finally:
        _rmtree(root)


def run_program(source: str, *, timeout: float = 10.0, memory_mb: int = 1024, disk_mb: int = DISK_MB,
                cwd: str | os.PathLike | None = None, max_output: int = MAX_OUTPUT_CHARS,
                unsafe_no_isolation: bool = False, _hook: bool = True, _block_processes: bool = True) -> SandboxResult:
    """Run ``source`` as ``__main__`` in the sandbox; never raises for what the program does.

    ``disk_mb`` is the size of the private writable folder. ``stdout``/``stderr`` keep at most
    ``max_output`` characters each (head and tail). Without isolation (see the module
    docstring) this raises :class:`EvalError`, unless ``unsafe_no_isolation`` (or an enclosing
    :func:`allow_unsafe`); the program then runs in a temporary folder made in ``cwd``
    (default: the system temp folder), which isolated runs do not use. ``_hook`` and
    ``_block_processes`` exist for the tests that check the OS layer alone; leave them on.
    """
    _check_args(timeout, memory_mb, disk_mb)
    tool = isolation()
    if tool is not None:
        return _RUNNERS[tool](_PROBE[tool], source, timeout=timeout, memory_mb=memory_mb, disk_mb=disk_mb,
                              max_output=max_output, hook=_hook, block_processes=_block_processes)
    require_isolation(unsafe_no_isolation)
    return _run_unisolated(source, timeout=timeout, memory_mb=memory_mb, cwd=cwd, max_output=max_output, hook=_hook)


def run_many(sources: Sequence[str], *, workers: int = 2, timeout: float = 10.0, memory_mb: int = 1024,
             disk_mb: int = DISK_MB, cwd: str | os.PathLike | None = None, unsafe_no_isolation: bool = False,
             callback: Callable[[int, SandboxResult], None] | None = None) -> list[SandboxResult]:
    """Run each program with :func:`run_program`, ``workers`` at a time; results in input order.

    Each program is independent: one that crashes, hangs or is refused does not stop the
    others. ``callback(index, result)`` is called in the calling thread as each finishes,
    e.g. to advance a progress bar. No isolation: :class:`EvalError` before anything runs,
    unless ``unsafe_no_isolation``.
    """
    _check_args(timeout, memory_mb, disk_mb)
    if not isinstance(workers, int) or workers < 1:
        raise EvalError(f"sandbox workers must be a positive integer, got {workers!r}")
    results: list[SandboxResult | None] = [None] * len(sources)
    if not sources:
        return []
    unsafe = unsafe_no_isolation or _UNSAFE.get()  # the context does not reach the pool's threads
    require_isolation(unsafe)  # probes once before the threads race for it
    with ThreadPoolExecutor(max_workers=min(workers, len(sources))) as pool:
        futures = {pool.submit(run_program, src, timeout=timeout, memory_mb=memory_mb, disk_mb=disk_mb, cwd=cwd,
                               unsafe_no_isolation=unsafe): i
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
