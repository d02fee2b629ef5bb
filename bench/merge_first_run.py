"""The first `graft merge` of a fresh install vs later ones: what warming numba's cache at install buys.

The fused merge kernels (graftkit/merge/kernels.py) are numba functions with an on-disk cache.
`make install` runs `python -m graftkit.merge.kernels --warm`, which compiles every version a
merge of 1-8 models (bf16/float32 in and out) can ask for. This script times, each as a child
process `graft merge` of the TIES recipe of bench/merge_vs_mergekit.py (base + 3 bf16
fine-tunes, density 0.5) with numba's cache in a folder of its own (NUMBA_CACHE_DIR):

* cold: an empty cache (a fresh install without the warm step): the merge compiles its kernels;
* the warm step itself (what `make install` adds);
* the first merge after the warm step, then two later merges (the steady speed).

The input files are read once before the runs, so every run reads them from the page cache.

    .venv/bin/python bench/merge_first_run.py [--layers 4] [--warmed DIR]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge_vs_mergekit as mvm  # noqa: E402


def run(cmd: list[str], cache: Path) -> str:
    """The child's wall time and CPU time (user + system; on a shared machine the CPU time is the
    steadier number)."""
    env = {**mvm.ENV, "NUMBA_CACHE_DIR": str(cache)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return f"{wall:6.1f} s wall, {cpu:6.1f} s CPU"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--warmed", type=Path, default=None,
                    help="a NUMBA_CACHE_DIR already filled by `python -m graftkit.merge.kernels --warm` (skips that step)")
    args = ap.parse_args()
    paths = mvm.generate(args.layers)
    for p in paths.values():  # into the page cache: every run then reads the same way
        for f in p.glob("*.safetensors"):
            with open(f, "rb") as h:
                while h.read(1 << 24):
                    pass
    work = mvm.CACHE / "runs"
    work.mkdir(parents=True, exist_ok=True)
    recipe = work / "first_run_ties.yml"
    recipe.write_text(yaml.safe_dump(mvm.recipe("ties", paths)))
    out = work / "first_run_out"
    merge = [str(mvm.BIN / "graft"), "merge", str(recipe), str(out), "--overwrite"]
    print(f"load average before: {os.getloadavg()}; {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cold = run(merge, Path(tmp) / "cold")
        print(f"cold cache, first merge:   {cold}", flush=True)
        if args.warmed is None:
            warmed = Path(tmp) / "warm"
            step = run([sys.executable, "-m", "graftkit.merge.kernels", "--warm", "--quiet"], warmed)
            print(f"warm step (make install):  {step}", flush=True)
        else:
            warmed = args.warmed
        times = [run(merge, warmed) for _ in range(3)]
        print(f"after warm, first merge:   {times[0]}", flush=True)
        print(f"after warm, later merges:  {times[1]}; {times[2]}", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
