"""`python -m graftkit.merge.kernels --warm` (run by make install) fills numba's on-disk cache so
that the first `graft merge` of a fresh process compiles nothing: checked with numba's own
cache statistics (loads vs compiles), not with timings."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

KERNELS = ("kth_largest_deltas", "merge_deltas", "weighted_average")


def toy_models(root) -> list[str]:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    paths = []
    for name in ("base", "a", "b"):
        folder = root / name
        folder.mkdir()
        save_file({"w": rng.standard_normal((64, 32)).astype(np.float32)}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text('{"model_type": "toy"}')
        paths.append(str(folder))
    return paths


def test_warmed_cache_serves_a_new_process_merge(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    # the versions a float32 merge of two models uses (make install warms 1-8 models, bf16 and float32)
    warm = subprocess.run([sys.executable, "-m", "graftkit.merge.kernels", "--warm", "--models", "2", "--dtypes", "f32",
                           "--quiet"], capture_output=True, text=True, timeout=600, env=env)
    assert warm.returncode == 0, warm.stderr
    assert warm.stdout.startswith("merge kernels: 3 versions compiled") and str(tmp_path / "numba") in warm.stdout
    base, a, b = toy_models(tmp_path)
    models = [{"model": p, "parameters": {"weight": 0.5, "density": 0.5}} for p in (a, b)]
    ties = {"merge_method": "ties", "base_model": base, "dtype": "float32", "models": models}
    linear = {"merge_method": "linear", "dtype": "float32", "models": [{"model": p, "parameters": {"weight": 0.5}} for p in (a, b)]}
    code = ("import json; from graftkit.merge.api import run_merge; from graftkit.merge import kernels as K; "
            f"run_merge({ties!r}, {str(tmp_path / 'ties')!r}, progress=False); "
            f"run_merge({linear!r}, {str(tmp_path / 'linear')!r}, progress=False); "
            "print(json.dumps({n: [sum(getattr(K, n).stats.cache_hits.values()), "
            f"sum(getattr(K, n).stats.cache_misses.values())] for n in {KERNELS!r}}}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    # every kernel the two merges ran was loaded from the cache (hits), none compiled (misses)
    assert stats == {n: [1, 0] for n in KERNELS}, stats


@pytest.mark.parametrize("argv", [["--warm", "--models", "x"], ["--warm", "--models", "0"], ["--warm", "--dtypes", "f16"],
                                  []])
def test_warm_refuses_bad_arguments(argv, capsys):
    from graftkit.merge.kernels import _main

    with pytest.raises(SystemExit) as ei:
        _main(argv)
    assert ei.value.code == 2 and "error:" in capsys.readouterr().err
