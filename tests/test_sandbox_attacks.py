"""Hostile programs against the real sandbox: each must be CONTAINED, judged by its effect on the host.

Every attack runs three times: with the full sandbox, and with the in-process audit hook
switched off (``_hook=False``) under bubblewrap and under the util-linux ``unshare`` fallback,
which shows that the OS layer alone (namespaces, read-only system, tmpfs quota, seccomp,
rlimits) holds. A program prints ESCAPED when its action worked
from its side; the host checks (a file that must not exist, a process that must still live, a
listener that must get nothing) are the real verdict. Without bubblewrap these tests skip, and
the last tests check that code evaluation is then refused.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from graftkit.errors import EvalError
from graftkit.eval import sandbox
from graftkit.eval.code import score_code_problems
from graftkit.eval.sandbox import run_program

LINUX = sys.platform.startswith("linux")
ISOLATED = LINUX and sandbox.isolation() is not None
needs_isolation = pytest.mark.skipif(not ISOLATED, reason="bubblewrap is not installed or cannot make namespaces here "
                                     "(make install adds it as root: apt-get install bubblewrap)")
SECRET = "graft-secret-" + secrets.token_hex(8)
# (tool, audit hook on): the full sandbox, bubblewrap alone, and the unshare fallback alone
LAYERS = [pytest.param("bwrap", True, id="full"), pytest.param("bwrap", False, id="bwrap-only"),
          pytest.param("unshare", False, id="unshare-only")]


def use_tool(monkeypatch, tool: str) -> None:
    """Make the sandbox use ``tool``, or skip when it cannot isolate here."""
    if tool == "unshare":
        monkeypatch.setenv("GRAFT_SANDBOX", "unshare")
    else:
        monkeypatch.delenv("GRAFT_SANDBOX", raising=False)
    if sandbox.isolation() != tool:
        pytest.skip(f"{tool} cannot isolate programs here ({sandbox.isolation_problem()})")


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """What the attacks aim at: a folder visible (read-only) inside the sandbox, a file in it,
    a sleeping process, a TCP and a UDP listener."""
    base = Path("/opt") if os.access("/opt", os.W_OK) else tmp_path_factory.mktemp("outside")
    out = base / f"graft-attack-{secrets.token_hex(4)}"
    out.mkdir(mode=0o777)
    os.chmod(out, 0o777)
    victim_file = out / "keep.txt"
    victim_file.write_text("mine")
    os.chmod(victim_file, 0o666)
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    tcp.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    unix_path = str(out) + "-sock"  # a host service's socket in a folder the sandbox can see
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(unix_path)
    os.chmod(unix_path, 0o777)
    unix.listen(8)
    unix.setblocking(False)
    info = {"unix": unix_path, "unix_sock": unix, "out": str(out), "keep": str(victim_file), "pid": victim.pid, "tcp": tcp.getsockname()[1],
            "udp": udp.getsockname()[1], "tcp_sock": tcp, "udp_sock": udp, "victim": victim}
    yield info
    victim.kill()
    victim.wait()
    tcp.close()
    udp.close()
    unix.close()
    os.unlink(unix_path)
    shutil.rmtree(out, ignore_errors=True)


def _new(out: str) -> list[str]:
    return sorted(p for p in os.listdir(out) if p != "keep.txt")


# (name, program template; {out} {keep} {pid} {tcp} {udp} {secret} are filled in, run kwargs)
ATTACKS = [
    ("open-write", "open('{out}/a', 'w').write('x')\nprint('ESCAPED')\n", {}),
    ("open-append-existing", "open('{keep}', 'a').write('x')\nprint('ESCAPED')\n", {}),
    ("os-open-creat", "import os\nos.write(os.open('{out}/b', os.O_WRONLY | os.O_CREAT), b'x')\nprint('ESCAPED')\n", {}),
    ("os-open-dir-fd", "import os\nd = os.open('{out}', os.O_RDONLY)\n"
                       "os.write(os.open('c', os.O_WRONLY | os.O_CREAT, dir_fd=d), b'x')\nprint('ESCAPED')\n", {}),
    ("mkfifo", "import os\nos.mkfifo('{out}/fifo')\nprint('ESCAPED')\n", {}),
    ("mkfifo-dir-fd", "import os\nd = os.open('{out}', os.O_RDONLY)\nos.mkfifo('fifo2', dir_fd=d)\nprint('ESCAPED')\n", {}),
    ("mknod", "import os, stat\nos.mknod('{out}/node', stat.S_IFREG | 0o644)\nprint('ESCAPED')\n", {}),
    ("symlink-then-write", "import os\nos.symlink('{out}/via-link', '/tmp/l')\nopen('/tmp/l', 'w').write('x')\n"
                           "print('ESCAPED')\n", {}),
    ("symlink-to-existing", "import os\nos.symlink('{keep}', '/tmp/k')\nopen('/tmp/k', 'w').write('pwned')\n"
                            "print('ESCAPED')\n", {}),
    ("hard-link", "import os\nos.link('{keep}', '/tmp/h')\nopen('/tmp/h', 'w').write('pwned')\nprint('ESCAPED')\n", {}),
    ("rename-out", "import os\nos.rename('{keep}', '{out}/moved')\nprint('ESCAPED')\n", {}),
    ("unlink", "import os\nos.remove('{keep}')\nprint('ESCAPED')\n", {}),
    ("truncate-chmod", "import os\nos.truncate('{keep}', 0)\nos.chmod('{keep}', 0o777)\nprint('ESCAPED')\n", {}),
    ("rmtree", "import shutil\nshutil.rmtree('{out}')\nprint('ESCAPED')\n", {}),
    ("proc-root", "open('/proc/self/root{out}/d', 'w').write('x')\nprint('ESCAPED')\n", {}),
    ("system-dirs", "import os, sys\nfor p in ('/etc/graft-x', '/usr/graft-x', os.__file__, sys.executable):\n"
                    "    try:\n        open(p, 'a').write('#')\n        print('ESCAPED', p)\n    except OSError:\n        pass\n", {}),
    # the same value written back, so a failure of this test leaves the host as it was
    ("sysctl", "v = open('/proc/sys/vm/swappiness').read()\nwith open('/proc/sys/vm/swappiness', 'w') as f:\n"
               "    f.write(v)\nprint('ESCAPED')\n", {}),
    ("sysrq-core-pattern", "import os\nfor p in ('/proc/sysrq-trigger', '/proc/sys/kernel/core_pattern'):\n"
                           "    if os.path.exists(p):\n        open(p, 'a').close()\n        print('ESCAPED', p)\n", {}),
    ("tcp-connect", "import socket\nsocket.create_connection(('127.0.0.1', {tcp}), timeout=2).send(b'x')\nprint('ESCAPED')\n", {}),
    ("udp-send", "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                 "s.sendto(b'x', ('127.0.0.1', {udp}))\n", {}),  # reaches only the sandbox's own loopback
    ("unix-socket", "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('{unix}')\ns.send(b'x')\nprint('ESCAPED')\n", {}),
    ("dns", "import socket\nprint('ESCAPED', socket.getaddrinfo('pypi.org', 443))\n", {}),
    ("fork-bomb", "import os\nn = 0\ntry:\n    while n < 10000:\n        if os.fork() == 0:\n            os._exit(0)\n"
                  "        n += 1\nfinally:\n    print('forks', n)\nprint('ESCAPED')\n", {}),
    ("memory", "x = bytearray(4 * 1024 ** 3)\nprint('ESCAPED')\n", {"memory_mb": 256}),
    ("disk-quota", "import os\ntotal = 0\ntry:\n    for i in range(20):\n        with open(f'f{{i}}', 'wb') as f:\n"
                   "            for _ in range(60):\n                f.write(b'x' * 2 ** 20)\n                f.flush()\n"
                   "                total += 2 ** 20\nexcept OSError as e:\n    pass\nprint('wrote', total)\n", {"disk_mb": 100}),
    ("dev-shm", "open('/dev/shm/x', 'wb').write(b'x' * 2 ** 20)\nprint('ESCAPED')\n", {}),
    ("daemon", "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(1)\n"
               "        open('{out}/daemon', 'w').write('x')\n        os._exit(0)\n    os._exit(0)\nprint('ESCAPED')\n", {}),
    ("kill", "import os, signal\nos.kill({pid}, signal.SIGKILL)\nprint('ESCAPED')\n", {}),
    ("killpg", "import os, signal\nos.killpg(os.getpgid({pid}), signal.SIGKILL)\nprint('ESCAPED')\n", {}),
    ("pidfd", "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open({pid}), signal.SIGKILL)\nprint('ESCAPED')\n", {}),
    ("kill-all", "import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('ESCAPED')\n", {}),
    ("ctypes-system", "import ctypes\nassert ctypes.CDLL(None).system(b'touch {out}/ctypes') == 0\nprint('ESCAPED')\n", {}),
    ("ctypes-write", "import ctypes\nlibc = ctypes.CDLL(None)\nfd = libc.open(b'{out}/cw', 0o101, 0o644)\n"
                     "assert fd >= 0\nprint('ESCAPED')\n", {}),
    ("kernel-interfaces", "import ctypes, platform\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                          "nrs = {{'x86_64': (250, 248, 321, 298, 323, 425), 'aarch64': (219, 217, 280, 241, 282, 425)}}\n"
                          "for nr in nrs.get(platform.machine(), ()):  # EPERM from the filter, else the kernel was reached\n"
                          "    args = (0, -3, 1) if nr in (250, 219) else (1, 0, 0)  # keyctl: this session's keyring\n"
                          "    if libc.syscall(nr, *args) >= 0 or ctypes.get_errno() != 1:\n"
                          "        print('ESCAPED', nr, ctypes.get_errno())\n", {}),
    ("hook-tamper", "import gc, os\nfor o in gc.get_objects():\n"
                    "    if getattr(o, '__name__', '') == 'hook' and getattr(o, '__closure__', None):\n"
                    "        for c in o.__closure__:\n            if isinstance(c.cell_contents, frozenset):\n"
                    "                c.cell_contents = frozenset()\n"
                    "os.system('touch {out}/tampered')\nopen('{out}/tampered2', 'w').write('x')\nprint('ESCAPED')\n", {}),
    ("subprocess", "import subprocess\nsubprocess.run(['touch', '{out}/sub'])\nprint('ESCAPED')\n", {}),
    ("environment", "import os\nseen = repr(dict(os.environ))\nfor p in ('/proc/self/environ', '/proc/1/environ'):\n"
                    "    try:\n        seen += open(p, 'rb').read().decode(errors='replace')\n    except OSError:\n        pass\n"
                    "print('SECRET' if '{secret}' in seen else 'clean')\n", {}),
    ("read-secrets", "import os\nfor p in ('/etc/shadow', '/root'):\n    try:\n"
                     "        print(p, open(p).read()[:20] if os.path.isfile(p) else os.listdir(p))\n"
                     "    except OSError as e:\n        print(p, e)\n", {}),
]


@pytest.mark.skipif(not LINUX, reason="the sandbox is Linux-only")
def test_the_corpus_is_big_enough():
    assert len(ATTACKS) >= 30 and len({a[0] for a in ATTACKS}) == len(ATTACKS)


@needs_isolation
@pytest.mark.parametrize("tool,hook", LAYERS)
@pytest.mark.parametrize("name,template,kw", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_is_contained(host, monkeypatch, name, template, kw, tool, hook):
    use_tool(monkeypatch, tool)
    monkeypatch.setenv("GRAFT_ATTACK_SECRET", SECRET)
    src = template.format(out=host["out"], keep=host["keep"], pid=host["pid"], tcp=host["tcp"], udp=host["udp"],
                          unix=host["unix"], secret=SECRET)
    res = run_program(src, timeout=10, _hook=hook, **kw)
    assert "ESCAPED" not in res.stdout, (name, res)
    if name not in ("disk-quota", "environment", "read-secrets", "system-dirs", "udp-send", "sysrq-core-pattern",
                    "kernel-interfaces"):
        assert res.status == "failed", (name, res)
    # the host's view
    assert Path(host["keep"]).read_text() == "mine" and oct(os.stat(host["keep"]).st_mode)[-3:] == "666"
    assert _new(host["out"]) == []
    assert host["victim"].poll() is None  # still alive
    with pytest.raises(BlockingIOError):
        host["tcp_sock"].accept()
    with pytest.raises(BlockingIOError):
        host["udp_sock"].recv(16)
    with pytest.raises(BlockingIOError):
        host["unix_sock"].accept()
    if name == "daemon":
        time.sleep(1.5)  # the daemon would write after 1 s
        assert _new(host["out"]) == []
    if name == "disk-quota":
        wrote = int(res.stdout.split()[-1])
        assert 0 < wrote <= 100 * 2 ** 20, res
    if name == "environment":
        assert res.stdout.strip() == "clean"
    if name == "read-secrets":
        shadow, root = res.stdout.splitlines()
        assert "root:" not in shadow
        allowed = {Path(d).relative_to("/root").parts[0] for d in sandbox._python_dirs() if d.startswith("/root/")}
        assert set(eval(root.split(" ", 1)[1])) <= allowed  # only the interpreter's own folders came back
    if name == "fork-bomb" and not hook:
        assert "forks 0" in res.stdout  # the OS refused the very first fork


@needs_isolation
@pytest.mark.parametrize("tool", ["bwrap", "unshare"])
def test_a_daemon_does_not_outlive_its_run(host, monkeypatch, tool):
    # processes allowed (no seccomp) and no hook: the PID namespace alone must take the daemon down
    use_tool(monkeypatch, tool)
    token = "gd" + secrets.token_hex(6)
    src = ("import os, time\nr, w = os.pipe()\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
           f"        open('/proc/self/comm', 'w').write('{token}')\n        os.write(w, b'up')\n        time.sleep(60)\n"
           "    os._exit(0)\nprint(os.read(r, 2).decode())\n")
    res = run_program(src, timeout=10, _hook=False, _block_processes=False)
    assert res.status == "passed" and res.stdout == "up\n", res
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == token:
                alive.append(pid)
        except OSError:
            pass
    assert alive == []


@needs_isolation
@pytest.mark.parametrize("tool,hook", LAYERS)
def test_the_pass_verdict_cannot_be_forged(monkeypatch, tool, hook):
    use_tool(monkeypatch, tool)
    # every hex run the program can find in its files, argv, env or its own fds is tried on every fd
    forge = ("import os, re, sys\nfound = set()\n"
             "for p in ('/tmp/program.py', '/tmp/.graft_boot.py', '/proc/self/cmdline', '/proc/self/environ'):\n"
             "    try:\n        found.update(re.findall(rb'[0-9a-f]{32}', open(p, 'rb').read()))\n"
             "    except OSError:\n        pass\n"
             "print('found', len(found))\n"
             "for fd in range(3, 64):\n    for tok in found | {b'graft-code-done'}:\n        try:\n            os.write(fd, tok)\n"
             "        except OSError:\n            pass\nprint('graft-code-done')\nsys.stdout.flush()\nos._exit(0)\n")
    res = run_program(forge, timeout=10, _hook=hook)
    assert res.status == "failed" and res.returncode == 0 and "found 0" in res.stdout, res
    problem = {"task_id": "t", "prompt": "def f():\n", "entry_point": "f",
               "test": "def check(c):\n    assert c() == 1\n"}
    cheat = "    import os, sys\n    print('graft-code-done'); sys.stdout.flush(); os._exit(0)\nf()\n"
    metrics, rows = score_code_problems([problem], {"t": [cheat, "    return 1\n", "    return 2\n"]}, progress=False)
    assert rows[0]["passed"] == [False, True, False] and metrics["pass@1"] == pytest.approx(1 / 3)


@pytest.mark.skipif(not LINUX, reason="the sandbox is Linux-only")
def test_without_isolation_graft_eval_refuses_code_tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAFT_SANDBOX", "none")
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"task_id": "t", "prompt": "def f():\n", "entry_point": "f",
                                    "test": "def check(c):\n    assert c() == 1\n"}) + "\n")
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"task_id": "t", "completion": "    return 1\n"}) + "\n")
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"models:\n  - name: m\n    path: not-needed\ntasks:\n  - name: code\n    kind: code\n    file: {problems}\n    samples_file: {samples}\n"
                   f"output: {tmp_path / 'out'}\n")
    env = {**os.environ, "GRAFT_SANDBOX": "none"}
    proc = subprocess.run([sys.executable, "-m", "graftkit.cli", "eval", str(cfg)], capture_output=True, text=True, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("graft: error:") and "apt-get install bubblewrap" in lines[0]
    assert "--unsafe-no-isolation" in lines[0] and not (tmp_path / "out").exists()
    proc = subprocess.run([sys.executable, "-m", "graftkit.cli", "eval", str(cfg), "--unsafe-no-isolation", "--no-progress"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "out" / "m" / "results.json").read_text())
    assert results["tasks"]["code"]["metrics"] == {"pass@1": 1.0}
    from graftkit.eval.runner import evaluate

    with pytest.raises(EvalError, match="apt-get install bubblewrap"):
        evaluate(str(cfg))
    assert evaluate(str(cfg), unsafe_no_isolation=True)["scores"]["m"]["code"] == 1.0
    with pytest.raises(EvalError, match="apt-get install bubblewrap"):
        score_code_problems([json.loads(problems.read_text())], {"t": ["    return 1\n"]}, progress=False)
    metrics, _ = score_code_problems([json.loads(problems.read_text())], {"t": ["    return 1\n"]}, progress=False,
                                     unsafe_no_isolation=True)
    assert metrics == {"pass@1": 1.0}


def _with_comm(token: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == token:
                found.append(pid)
        except OSError:
            pass
    return found


@needs_isolation
@pytest.mark.parametrize("tool", ["bwrap", "unshare"])
def test_the_sandbox_dies_with_the_evaluator(monkeypatch, tool):
    # an evaluator killed mid-run (os._exit: no cleanup at all) must not leave its program running
    use_tool(monkeypatch, tool)
    token = "ge" + secrets.token_hex(6)
    evaluator = ("import os, threading, time\nfrom graftkit.eval import sandbox\n"
                 f"prog = \"import time\\nopen('/proc/self/comm', 'w').write('{token}')\\ntime.sleep(60)\\n\"\n"
                 "threading.Thread(target=sandbox.run_program, args=(prog,), kwargs={'timeout': 120, '_hook': False},"
                 " daemon=True).start()\n"
                 "def up():\n    for p in filter(str.isdigit, os.listdir('/proc')):\n        try:\n"
                 f"            if open(f'/proc/{{p}}/comm').read().strip() == '{token}':\n                return True\n"
                 "        except OSError:\n            pass\n    return False\n"
                 "while not up():\n    time.sleep(0.05)\nos._exit(0)\n")
    proc = subprocess.run([sys.executable, "-c", evaluator], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "GRAFT_SANDBOX": "unshare" if tool == "unshare" else ""})
    assert proc.returncode == 0, proc.stderr
    for _ in range(200):  # SIGKILL is delivered at once; give the kernel a moment to reap
        if not _with_comm(token):
            break
        time.sleep(0.05)
    left = _with_comm(token)
    for pid in left:  # do not leak it into the rest of the run, then fail
        os.kill(int(pid), 9)
    assert left == []
