"""Mutation benchmark: plant a fixed list of plausible one-line bugs, one at a time, and check
that the relevant tests catch each one.

Not part of the test suite (pytest does not collect bench/). It never touches the work tree:
the committed sources and tests (``git archive`` of a revision, HEAD by default) are unpacked
into a temporary folder, each mutant is written there, the mutant's test selection runs with
``PYTHONPATH`` pointing at the copy (``-x -q``), and the file is restored before the next one.

    python bench/mutation.py                 # every mutant, a baseline run first
    python bench/mutation.py --only pcb-no-n --only dora-norm-not-detached
    python bench/mutation.py --list

A mutant is *caught* when its test run fails (or times out), *survived* when it passes. The
baseline run of every selection on the unmutated copy must pass first, otherwise "caught"
would mean nothing; a mutant whose original snippet is not found exactly once is an error of
this list, reported and not counted.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AREAS = ("merge", "methods", "io", "train", "eval")
SHOW = 0  # --show N: print the last N lines of each failing run (why a mutant was caught)


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str  # under src/graftkit/
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, optionally ``file::name`` or ``-k`` expressions
    note: str = ""

    @property
    def area(self) -> str:
        return self.file.split("/")[0]


G = "tests/test_mutation_guards.py"
MF = "tests/test_merge_functions.py"
MK = "tests/test_merge_kernels.py"
PP = "tests/test_peft_parity.py"
TG = "tests/test_train_grads.py"

MUTANTS = [
    # -- the 11 survivors of issue 11, section 10 -------------------------------------------------
    Mutant("fused-dare-w-times-d", "merge/fused.py", "coefs[i] = weights[i] / d", "coefs[i] = weights[i] * d",
           (G, "-k", "dare_merged"), "issue 11: DARE rescale on the fast path"),
    Mutant("fused-dare-ties-no-election", "merge/fused.py", 'consensus = spec.name in ("ties", "dare_ties")',
           'consensus = spec.name in ("ties",)', (G, "-k", "dare_ties_at"), "issue 11: dare_ties runs as dare_linear (fused)"),
    Mutant("dare-torch-no-rescale", "merge/dare.py", "scale = [1.0 / d if rescale and d < 1 else 1.0 for d in dens]",
           "scale = [1.0 for d in dens]", (G, "-k", "dare_merged"), "issue 11: DARE without rescale on the torch path"),
    Mutant("pcb-no-n", "merge/pcb.py", "intra = torch.exp(n * _minmax(mag) ** 2)", "intra = torch.exp(_minmax(mag) ** 2)",
           (MF, G, "-k", "pcb"), "issue 11: PCB intra-balancing without the n factor"),
    Mutant("slerp-antiparallel", "merge/slerp.py", "if abs(dot) > DOT_THRESHOLD:", "if dot > DOT_THRESHOLD:",
           (MF, G, "-k", "slerp"), "issue 11: SLERP with anti-parallel tensors"),
    Mutant("kernel-negative-weight-sum", "merge/kernels.py", "return normalize and abs(total) >= 1e-8, np.float32(total)",
           "return normalize and total >= 1e-8, np.float32(total)", (MK, G, "-k", "negative or task_arithmetic"),
           "issue 11: a negative weight sum never divided by (fused)"),
    Mutant("ties-zero-sum-elects-minus", "merge/_common.py", "elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)",
           "elected = torch.where(weighted.sum(dim=0) > 0, 1.0, -1.0)", (MF, G, "-k", "ties"),
           "issue 11: TIES elects minus on an exact zero sum (torch reference)"),
    Mutant("dora-norm-not-detached", "methods/lora.py", "norm = self._adapted_matrix(weight.detach()).norm(dim=1).detach()",
           "norm = self._adapted_matrix(weight).norm(dim=1)", (G, "-k", "dora"), "issue 11: DoRA's weight norm not detached"),
    Mutant("resume-rank0-rng", "train/checkpoint.py", 'set_rng_state({"torch": state["rng_torch"][f"rank{rank}"], **state["rng"][rank]})',
           'set_rng_state({"torch": state["rng_torch"]["rank0"], **state["rng"][0]})', (TG, "-k", "restore_gives"),
           "issue 11: every rank restores rank 0's RNG state"),
    Mutant("grad-accum-no-divide", "train/loop.py", "self.acc.backward(loss / o.grad_accum)", "self.acc.backward(loss)",
           (TG, "-k", "accumulated"), "issue 11: gradient accumulation without dividing the loss"),
    Mutant("peft-ia3-conv-ff-last-name", "io/peft.py", "is_ff = any(isinstance(f, str) and module.endswith(f) for f in ffm)",
           'is_ff = any(isinstance(f, str) and module.rsplit(".", 1)[-1] == f for f in ffm)', (G, "-k", "ia3"),
           "issue 11: peft IA3 import of a Conv2d with a dotted feedforward_modules entry"),
    # -- merge ------------------------------------------------------------------------------------
    Mutant("kernel-ties-zero-sum-elects-minus", "merge/kernels.py", "sign[j] = one if total[j] >= 0 else -one",
           "sign[j] = one if total[j] > 0 else -one", (G, "-k", "zero_sum")),
    Mutant("dare-drop-no-rescale", "merge/dare.py", "out[i].mul_(1.0 / dens[i])", "out[i].mul_(1.0)", (MF, G, "-k", "dare")),
    Mutant("fused-dare-keep-share-inverted", "merge/fused.py", "bounds[i] = round(d * 2**32)", "bounds[i] = round((1 - d) * 2**32)",
           (G, "-k", "dare_merged")),
    Mutant("fused-ties-k-inverted", "merge/fused.py", "k = np.array([max(1, int(d * numel))], dtype=np.int64)",
           "k = np.array([max(1, int((1 - d) * numel))], dtype=np.int64)", ("tests/test_merge_parity.py", "-k", "ties")),
    Mutant("kernel-ties-strict-threshold", "merge/kernels.py", "tau[j] = tau[j] * (one if abs(tau[j]) >= t else zero)",
           "tau[j] = tau[j] * (one if abs(tau[j]) > t else zero)", (MK, "-k", "ties_matches")),
    Mutant("kernel-kth-off-by-one", "merge/kernels.py", "r = count - (k - above)  #", "r = count - (k - above) - 1  #",
           (MK, "-k", "kth_largest")),
    Mutant("kernel-lambda-ignored", "merge/kernels.py", "total[j] = total[j] * lam32", "total[j] = total[j]",
           (MK, "-k", "ties_matches or task_arithmetic")),
    Mutant("kernel-disjoint-mean-over-all", "merge/kernels.py",
           "total[j] = total[j] / (divisor[j] if divisor[j] != 0 else one)", "total[j] = total[j] / total_w32",
           (MK, "-k", "ties_matches")),
    Mutant("combine-divisor-over-all", "merge/_common.py",
           "divisor = torch.where(mask, w, 0.0).sum(dim=0) if mask is not None else w.sum(dim=0)", "divisor = w.sum(dim=0)",
           (MF, "-k", "ties")),
    Mutant("finish-inplace-divisor-signed", "merge/_common.py", "divisor.add_(row.sign_(), alpha=abs(w))",
           "divisor.add_(row.sign_(), alpha=w)", (MK, "-k", "ties_matches")),
    Mutant("linear-divides-by-count", "merge/linear.py", "out.div_(total)", "out.div_(len(ws))", (MF, "-k", "linear")),
    Mutant("task-arithmetic-lambda-ignored", "merge/linear.py",
           'consensus=False, normalize=normalize, lam=kw.get("lambda", 1.0), inplace=inplace)',
           "consensus=False, normalize=normalize, lam=1.0, inplace=inplace)", (MF,)),
    Mutant("breadcrumbs-ties-no-election", "merge/breadcrumbs.py", "crumbs(deltas, density, gamma, inplace), weight, consensus=True",
           "crumbs(deltas, density, gamma, inplace), weight, consensus=False", (MF,)),
    Mutant("magnitude-rescale-multiplies", "merge/magnitude.py", "trimmed = trimmed / column(", "trimmed = trimmed * column(",
           (MF,)),
    Mutant("consensus-k-strict", "merge/consensus.py", "keep = masks.sum(dim=0) >= k", "keep = masks.sum(dim=0) > k", (MF,)),
    Mutant("slerp-coefficients-swapped", "merge/slerp.py", "ca, cb = math.sin((1 - t) * theta) / s, math.sin(t * theta) / s",
           "ca, cb = math.sin(t * theta) / s, math.sin((1 - t) * theta) / s", (MF, "-k", "slerp")),
    Mutant("pcb-no-inter-balancing", "merge/pcb.py", "inter = torch.tanh(t * t.sum(dim=0, keepdim=True))",
           "inter = torch.tanh(t)", (MF, G, "-k", "pcb")),
    Mutant("pcb-floor-uses-density", "merge/pcb.py", "floor = _kth(score, min(d - 1, int(d * (1 - density))))",
           "floor = _kth(score, min(d - 1, int(d * density)))", (MF, G, "-k", "pcb")),
    Mutant("dare-draws-keep-all", "merge/_common.py", "return words.view(signed)[:numel], round(density * 2**bits) - 2 ** (bits - 1)",
           "return words.view(signed)[:numel], round(density * 2**bits)", (MF, G, "-k", "dare")),
    Mutant("trim-keeps-the-complement", "merge/_common.py",
           "    k = max(1, int(density * numel))\n    mag = row.abs()\n    return keep_at_least_",
           "    k = max(1, int((1 - density) * numel))\n    mag = row.abs()\n    return keep_at_least_", (MF, "-k", "ties")),
    Mutant("keep-at-least-strict", "merge/_common.py", "return row.mul_(torch.ge(mag, threshold, out=mag))",
           "return row.mul_(torch.gt(mag, threshold, out=mag))", (MK, "-k", "ties_matches")),
    Mutant("breadcrumbs-keeps-outliers", "merge/_common.py", "    n_bot = max(0, numel - target - n_top)\n",
           "    n_bot = max(0, numel - target)\n", (MF, "-k", "breadcrumbs")),
    # -- methods ----------------------------------------------------------------------------------
    Mutant("rslora-scaling-plain", "methods/lora.py", "return alpha / math.sqrt(r) if rslora else alpha / r",
           "return alpha / r", (PP, "-k", "rslora")),
    Mutant("ia3-conv-view-swapped", "methods/ia3.py", "return vec.view(1, -1, 1, 1) if feedforward else vec.view(-1, 1, 1, 1)",
           "return vec.view(-1, 1, 1, 1) if feedforward else vec.view(1, -1, 1, 1)", ("tests/test_contract.py", "-k", "ia3")),
    Mutant("ia3-feedforward-axis", "methods/ia3.py", "        axis = 1 - axis", "        axis = axis", (PP, "-k", "ia3")),
    Mutant("lora-delta-unscaled", "methods/lora.py", "lora = (lora_B.float() @ lora_A.float()) * scaling",
           "lora = (lora_B.float() @ lora_A.float())", (PP, "-k", "merged_export")),
    Mutant("dora-base-keeps-bias", "methods/lora.py", "base = output if bias is None else output - bias.view(shape)",
           "base = output", (G, "-k", "biases")),
    Mutant("dora-magnitude-init-ones", "methods/lora.py", "self.lora_magnitude_vector = nn.Parameter(norm.to(dtype))",
           "self.lora_magnitude_vector = nn.Parameter(torch.ones_like(norm).to(dtype))", ("tests/test_contract.py", "-k", "dora")),
    # -- io ---------------------------------------------------------------------------------------
    Mutant("peft-ia3-export-shape-swapped", "io/peft.py", "vec = vec.reshape(1, -1) if site.feedforward else vec.reshape(-1, 1)",
           "vec = vec.reshape(-1, 1) if site.feedforward else vec.reshape(1, -1)", (PP, "-k", "ia3")),
    Mutant("peft-read-rslora-ignored", "io/peft.py", '"use_rslora": bool(cfg.get("use_rslora", False))', '"use_rslora": False',
           (PP, "-k", "rslora and loads_into")),
    Mutant("peft-read-fan-in-fan-out-ignored", "io/peft.py", 'elif cfg.get("fan_in_fan_out"):', "elif False:",
           ("tests/test_merge_adapters.py", PP, "-k", "gpt2")),
    Mutant("peft-export-fan-in-fan-out-off", "io/peft.py", '"fan_in_fan_out": "conv1d" in kinds', '"fan_in_fan_out": False',
           ("tests/test_merge_adapters.py", PP, "-k", "gpt2")),
    Mutant("native-fingerprint-check-inverted", "io/native.py", "    if not force:\n        check_fingerprint(model",
           "    if force:\n        check_fingerprint(model", ("tests/test_bad_input.py", "-k", "different_weights")),
    # -- train ------------------------------------------------------------------------------------
    Mutant("warmup-off-by-one", "train/loop.py", "return (step + 1) / warmup", "return step / warmup", (TG, "-k", "schedule")),
    Mutant("order-ranks-overlap", "train/data.py", "start = pos * self.batch_size * self.world + self.rank * self.batch_size",
           "start = pos * self.batch_size + self.rank * self.batch_size", (TG, "-k", "order")),
    Mutant("sft-prompt-mask-off-by-one", "train/data.py", "labels = [IGNORE] * min(len(head), len(ids)) + ids[len(head):]",
           "labels = [IGNORE] * min(len(head) - 1, len(ids)) + ids[len(head) - 1:]", ("tests/test_train.py", "-k", "masks_prompt")),
    Mutant("token-loss-not-averaged", "train/loop.py", "loss = tok.sum() / n.clamp(min=1)", "loss = tok.sum()",
           (TG, "-k", "mean_over")),
    # -- eval -------------------------------------------------------------------------------------
    Mutant("macro-f1-without-2", "eval/metrics.py", "return float(np.mean(2 * tp[present] / denom[present]))",
           "return float(np.mean(tp[present] / denom[present]))", ("tests/test_metrics.py",)),
    Mutant("pass-at-k-range", "eval/metrics.py", "np.arange(n - c + 1, n + 1, dtype=np.float64)",
           "np.arange(n - c, n + 1, dtype=np.float64)", ("tests/test_metrics.py",)),
    Mutant("ece-divides-by-bins", "eval/metrics.py", "return float(np.abs(gap).sum() / len(g))",
           "return float(np.abs(gap).sum() / n_bins)", ("tests/test_metrics.py",)),
    Mutant("exact-match-all-refs", "eval/metrics.py", "return any(p == normalize_answer(r, **norm) for r in refs)",
           "return all(p == normalize_answer(r, **norm) for r in refs)", ("tests/test_metrics.py",)),
    Mutant("perplexity-off-by-one", "eval/metrics.py", "mean = float(nll_sum) / float(n_tokens)",
           "mean = float(nll_sum) / float(n_tokens + 1)", ("tests/test_metrics.py",)),
    Mutant("bootstrap-verdict-from-mean", "eval/compare.py", 'verdict = "win" if low > 0 else "loss" if high < 0 else "tie"',
           'verdict = "win" if diff > 0 else "loss" if diff < 0 else "tie"',
           ("tests/test_compare.py", f"{G}::test_paired_bootstrap_is_a_tie_when_the_interval_spans_zero")),
    Mutant("binomial-tail-skips-k", "eval/compare.py", "for i in range(int(successes), n + 1)]",
           "for i in range(int(successes) + 1, n + 1)]",
           ("tests/test_compare.py", f"{G}::test_binomial_tail_includes_the_observed_count")),
    Mutant("flips-swapped", "eval/compare.py", '"negative": int(np.sum((ref == 1) & (new == 0)))',
           '"negative": int(np.sum((ref == 0) & (new == 1)))', ("tests/test_compare.py",)),
]


def unpack(rev: str, dest: Path) -> None:
    """The committed ``src``, ``tests`` and ``pyproject.toml`` of ``rev`` into ``dest``."""
    data = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src", "tests", "pyproject.toml"], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")


def _tail(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def pytest_run(copy: Path, args: tuple[str, ...], env: dict, timeout: float, stop_first: bool = True,
               fork: bool = True) -> tuple[str, float, str]:
    """Run pytest on ``args`` in ``copy``: ``passed``, ``failed``, ``timeout`` or ``no-tests``.

    With ``fork``, a child of this process runs ``pytest.main``: torch, transformers, numba and
    peft are imported once here (``preload``), which saves the 10-40 s of imports per run on a
    busy 2-core machine; graftkit itself is never imported here, so each child loads the
    mutated sources fresh."""
    argv = ["-q", "-p", "no:cacheprovider", "--basetemp", str(copy / ".pytest-tmp"), *(["-x"] if stop_first else []), *args]
    start = time.perf_counter()
    if not fork:
        try:
            res = subprocess.run([sys.executable, "-m", "pytest", *argv], cwd=copy, env=env, capture_output=True, text=True,
                                 timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", time.perf_counter() - start, ""
        code, out = res.returncode, res.stdout + res.stderr
    else:
        log = copy / ".pytest-log"
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.chdir(copy)
                os.environ.clear()
                os.environ.update(env)
                sys.path.insert(0, str(copy / "src"))
                assert "graftkit" not in sys.modules, "graftkit was imported before the fork: it would not be the mutant"
                import pytest

                code = int(pytest.main(argv))
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = start + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                break
            if time.perf_counter() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                return "timeout", time.perf_counter() - start, ""
            time.sleep(0.2)
        out = log.read_text(errors="replace")
    # 0 = passed; 5 = nothing collected (a wrong selection: an error of the list, not a catch)
    if SHOW and code not in (0, 5):
        print("\n".join(out.strip().splitlines()[-SHOW:]), flush=True)
    return {0: "passed", 5: "no-tests"}.get(code, "failed"), time.perf_counter() - start, _tail(out)


def preload() -> None:
    """Import the heavy dependencies once, before any fork (not graftkit)."""
    import numba  # noqa: F401
    import numpy  # noqa: F401
    import pytest  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    try:
        import peft  # noqa: F401
    except ImportError:
        pass


def baseline_selections(mutants: list[Mutant]) -> list[tuple[str, ...]]:
    """One pytest selection per test file covering what every mutant selects there: the union of
    the ``-k`` expressions (or the whole file), so the baseline costs one run per file."""
    per_file: dict[str, set | None] = {}
    for m in mutants:
        args = list(m.tests)
        k = None
        if "-k" in args:
            i = args.index("-k")
            k = args[i + 1]
            del args[i:i + 2]
        for f in args:
            if k is None:
                per_file[f] = None
            elif per_file.get(f, set()) is not None:
                per_file.setdefault(f, set()).add(k)
    out = []
    for f, ks in per_file.items():
        out.append((f,) if ks is None else (f, "-k", " or ".join(f"({k})" for k in sorted(ks))))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", default="HEAD", help="the committed revision to mutate (default HEAD)")
    ap.add_argument("--only", action="append", default=[], help="run only these mutant ids (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selections")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per test run (a timeout counts as caught)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--select", help="run this pytest selection instead of the mutants' own (e.g. to check one more test "
                                     "against --only mutants; quote it: --select 'tests/x.py -k name')")
    ap.add_argument("--spawn", action="store_true", help="a fresh interpreter per test run instead of forking (slower)")
    ap.add_argument("--show", type=int, default=0, metavar="N", help="print the last N lines of each failing test run")
    args = ap.parse_args(argv)
    global SHOW
    SHOW = args.show

    mutants = [m for m in MUTANTS if not args.only or m.id in args.only]
    if args.select:
        import dataclasses
        import shlex

        mutants = [dataclasses.replace(m, tests=tuple(shlex.split(args.select))) for m in mutants]
    if args.list:
        for m in MUTANTS:
            print(f"{m.area:8} {m.id:38} {' '.join(m.tests)}")
        return 0
    unknown = set(args.only) - {m.id for m in MUTANTS}
    if unknown:
        print(f"unknown mutant ids: {sorted(unknown)}", file=sys.stderr)
        return 2
    ids = [m.id for m in MUTANTS]
    assert len(ids) == len(set(ids)), "duplicate mutant ids"

    with tempfile.TemporaryDirectory(prefix="graft-mutation-") as tmp:
        copy = Path(tmp) / "repo"
        copy.mkdir()
        unpack(args.rev, copy)
        env = {**os.environ, "PYTHONPATH": str(copy / "src"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "NUMBA_CACHE_DIR": str(Path(tmp) / "numba-cache"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env.pop("GRAFT_MERGE_KERNELS", None)
        where = subprocess.run([sys.executable, "-c", "import graftkit; print(graftkit.__file__)"], cwd=copy, env=env,
                               capture_output=True, text=True, check=True).stdout.strip()
        assert where.startswith(str(copy)), f"graftkit imports from {where}, not from the copy"

        problems = []
        for m in mutants:
            path = copy / "src" / "graftkit" / m.file
            count = path.read_text().count(m.old) if path.exists() else 0
            if count != 1:
                problems.append(f"{m.id}: the original snippet occurs {count} times in {m.file}")
        if problems:
            print("\n".join(problems), file=sys.stderr)
            return 2

        fork = not args.spawn
        if fork:
            os.environ.update({k: env[k] for k in ("OMP_NUM_THREADS", "NUMBA_CACHE_DIR")})  # read when numba/torch load
            preload()
        if not args.no_baseline:
            for sel in baseline_selections(mutants):
                status, secs, tail = pytest_run(copy, sel, env, args.timeout, stop_first=False, fork=fork)
                print(f"baseline  {status:8} {secs:6.1f}s  {' '.join(sel)}  {tail}", flush=True)
                if status != "passed":
                    print("the unmutated code fails (or selects nothing in) this selection; fix it first", file=sys.stderr)
                    return 2

        results = []
        t0 = time.perf_counter()
        for m in mutants:
            path = copy / "src" / "graftkit" / m.file
            original = path.read_text()
            path.write_text(original.replace(m.old, m.new))
            try:
                status, secs, tail = pytest_run(copy, m.tests, env, args.timeout, fork=fork)
            finally:
                path.write_text(original)
            verdict = {"failed": "caught", "timeout": "caught", "passed": "SURVIVED", "no-tests": "ERROR"}[status]
            results.append({"id": m.id, "area": m.area, "file": m.file, "verdict": verdict, "seconds": round(secs, 1),
                            "tests": " ".join(m.tests), "note": m.note})
            print(f"{verdict:8} {m.area:8} {m.id:38} {secs:6.1f}s  {tail}", flush=True)
        total = time.perf_counter() - t0

    counted = [r for r in results if r["verdict"] != "ERROR"]
    print(f"\n| area | mutants | caught | survived |\n|---|---|---|---|")
    for area in AREAS:
        rs = [r for r in counted if r["area"] == area]
        if rs:
            c = sum(r["verdict"] == "caught" for r in rs)
            print(f"| {area} | {len(rs)} | {c} | {len(rs) - c} |")
    caught = sum(r["verdict"] == "caught" for r in counted)
    share = caught / len(counted) if counted else 0.0
    print(f"| **all** | {len(counted)} | {caught} ({share:.0%}) | {len(counted) - caught} |")
    survivors = [r["id"] for r in counted if r["verdict"] != "caught"]
    errors = [r["id"] for r in results if r["verdict"] == "ERROR"]
    print(f"\nsurvivors: {survivors or 'none'}; list errors: {errors or 'none'}; {total / 60:.1f} min for the mutants on "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "caught": caught, "counted": len(counted), "minutes": total / 60},
                                        indent=2) + "\n")
    return 0 if not survivors and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
