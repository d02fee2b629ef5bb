"""graftkit's fused merge kernels vs its torch reference functions, one tensor, one core; and
writing a merged shard into a sparse (ftruncate-d) vs a preallocated (fallocate-d) file.

The tensor is shaped like one MLP matrix of the merge benchmark's model: a bf16 base of 4096 x
1024 ~ N(0, 0.02) and three "fine-tunes" = base + N(0, 0.002). Both sides get the same inputs:
the torch side the float32 deltas as the executor builds them (widen, subtract) and the function
with ``inplace=True`` plus the cast to bf16; the kernel side the raw bf16 bits. Best of 7 runs,
torch and numba on one thread. The write test writes 1 GB in 2 MB pieces with ``os.pwrite`` into
each kind of file, in ``bench/.cache``.

    .venv/bin/python bench/merge_kernels.py
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from graftkit.merge import kernels as K
from graftkit.merge.dare import dare_ties
from graftkit.merge.linear import linear
from graftkit.merge.ties import ties

ROWS, COLS, MODELS = 4096, 1024, 3
WEIGHTS, DENSITY = [0.5, 0.3, 0.2], 0.5


def best(fn, reps: int = 7) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def raw(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy().view(np.uint16).reshape(-1)


def kernel_times() -> list[tuple[str, float, float]]:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(ROWS, COLS, generator=g) * 0.02).to(torch.bfloat16)
    fts = [(base.float() + torch.randn(ROWS, COLS, generator=g) * 0.002).to(torch.bfloat16) for _ in range(MODELS)]
    b, ms = raw(base), tuple(raw(f) for f in fts)
    n = b.size
    w = np.array(WEIGHTS)
    out = np.empty(n, dtype=np.uint16)
    ks = np.full(MODELS, int(DENSITY * n), dtype=np.int64)

    def deltas() -> torch.Tensor:
        stack = torch.empty((MODELS, ROWS, COLS), dtype=torch.float32)
        base32 = base.float()
        for i, f in enumerate(fts):
            stack[i].copy_(f).sub_(base32)
        return stack

    def ties_kernels():
        thr = K.kth_largest_deltas(b, ms, ks)
        K.merge_deltas(b, ms, w, w, K.KEEP_ABOVE, thr, np.zeros(MODELS, np.uint64), np.zeros(MODELS, np.uint64), 0,
                       True, True, 1.0, out)

    bounds = np.full(MODELS, round(DENSITY * 2**32), dtype=np.uint64)
    seeds = np.arange(MODELS, dtype=np.uint64)
    rows = [
        ("ties (thresholds + merge)",
         best(lambda: ties(base.float(), deltas(), weight=WEIGHTS, density=DENSITY, inplace=True).to(torch.bfloat16)),
         best(ties_kernels)),
        ("  of which thresholds", float("nan"), best(lambda: K.kth_largest_deltas(b, ms, ks))),
        ("dare_ties",
         best(lambda: dare_ties(base.float(), deltas(), weight=WEIGHTS, density=DENSITY, seed=1, inplace=True).to(torch.bfloat16)),
         best(lambda: K.merge_deltas(b, ms, w, w / DENSITY, K.KEEP_RANDOM, np.full(MODELS, np.nan, np.float32), bounds, seeds,
                                     0, True, False, 1.0, out))),
        ("linear",
         best(lambda: linear(None, fts, weight=WEIGHTS).to(torch.bfloat16)),
         best(lambda: K.weighted_average(ms, w, True, out))),
    ]
    return rows


def write_times(reps: int = 3) -> dict[str, list[float]]:
    """1 GB of pwrite into a fresh file of each kind. The first 1 GB written by a process after a
    sync is slow whatever the file (1.4-2.7 s instead of 0.2 s here), so one untimed write goes
    first and the two kinds swap order every run."""
    folder = Path(__file__).resolve().parent / ".cache"
    folder.mkdir(exist_ok=True)
    piece = np.random.default_rng(0).integers(0, 2**16, 1 << 20, dtype=np.uint16)  # 2 MB
    count = 500  # 1 GB

    def write(kind: str) -> float:
        path = folder / "write_test.bin"
        path.unlink(missing_ok=True)
        os.sync()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        t = time.perf_counter()
        if kind.startswith("ftruncate"):
            os.ftruncate(fd, count * piece.nbytes)
        else:
            os.posix_fallocate(fd, 0, count * piece.nbytes)
        for i in range(count):
            os.pwrite(fd, piece, i * piece.nbytes)
        seconds = time.perf_counter() - t
        os.close(fd)
        path.unlink()
        return seconds

    kinds = ["ftruncate (sparse)", "posix_fallocate"]
    write(kinds[0])  # untimed
    out: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(reps):
        for kind in (kinds if r % 2 == 0 else kinds[::-1]):
            out[kind].append(write(kind))
    return out


def main() -> None:
    print(f"one {ROWS}x{COLS} bf16 tensor, base + {MODELS} fine-tunes, weights {WEIGHTS}, density {DENSITY}; one thread")
    print(f"{'method':28s} {'torch reference ms':>19s} {'fused kernels ms':>17s} {'speed-up':>9s}")
    for name, ref, fused in kernel_times():
        ratio = f"{ref / fused:8.1f}x" if ref == ref else ""
        ref_ms = f"{ref * 1e3:19.1f}" if ref == ref else f"{'':19s}"
        print(f"{name:28s} {ref_ms} {fused * 1e3:17.1f} {ratio}")
    print("\nwriting 1 GB with pwrite in 2 MB pieces (s, runs alternating):")
    for name, times in write_times().items():
        print(f"  {name:20s} " + "  ".join(f"{t:.2f}" for t in times))


if __name__ == "__main__":
    main()
