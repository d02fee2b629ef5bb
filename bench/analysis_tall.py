"""TALL-mask compression of the issue-17 benchmark experts (issue 17 item 3, "Measured").

Compresses the fully fine-tuned experts of a study output folder (``graft study
bench/analysis_study.yaml`` writes out/analysis_study; ``graft demo``'s folder has the same layout)
with :func:`graftkit.analysis.tall.compress` (what ``graft compress RECIPE.yaml OUT`` runs): base =
the study's base, the classification heads excluded (stored whole per task), lambda_t chosen among
the candidates on each task's validation split. Then rebuilds every expert with
:func:`graftkit.analysis.tall.decompress` (``graft decompress``) and scores the rebuilt and the
original expert on the task's test split with ``graft eval``'s runner.

Prints the bundle's storage ratio, per task the chosen lambda, mask density, expert and rebuilt
accuracy, retained (rebuilt / expert), the difference and the relative error of the
rebuilt weights, and the wall time of compress and of
each decompress; writes OUT/result.json (the bundle stays in OUT/bundle).

    .venv/bin/python bench/analysis_tall.py [--study out/analysis_study] [--lambdas 0.2 0.3 0.4 0.5 0.6] [--select fidelity|metric] [--tasks bbc tweets] [--out out/analysis_tall] [--reuse]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _analysis_experts import Study  # noqa: E402


def accuracy(folder: str, task: dict, cache) -> float:
    from graftkit.eval.runner import evaluate_model

    r = evaluate_model({"name": Path(folder).name, "path": folder}, [task], cache=cache)[task["name"]]
    return float(r["metrics"]["accuracy"])


def relative_error(rebuilt: str, expert: str, base: str, keys: list[str]) -> float:
    """``||rebuilt - expert|| / ||expert - base||`` over the merged tensors: how much of the task
    vector the mask fails to reproduce (0: exact; 1: as far as the base is)."""
    from graftkit.tensors import Checkpoint

    r, e, b = Checkpoint(rebuilt), Checkpoint(expert), Checkpoint(base)
    num = den = 0.0
    for k in keys:
        ev = e.get(k).float()
        num += float((r.get(k).float() - ev).pow(2).sum())
        den += float((ev - b.get(k).float()).pow(2).sum())
    return (num / den) ** 0.5 if den else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", default="out/analysis_study", help="a graft study output folder (default out/analysis_study)")
    ap.add_argument("--family", default="full")
    ap.add_argument("--tasks", nargs="+", default=None, help="compress only these of the study's tasks (default: all)")
    ap.add_argument("--lambdas", nargs="+", type=float, default=[0.2, 0.3, 0.4, 0.5, 0.6])
    ap.add_argument("--select", choices=["fidelity", "metric"], default="fidelity",
                    help="how compress chooses lambda on validation (fidelity to the expert, or the best accuracy)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", default="out/analysis_tall")
    ap.add_argument("--reuse", action="store_true",
                    help="keep OUT/bundle when OUT/compress.yaml is this run's recipe (its compress time from OUT/result.json)")
    args = ap.parse_args()

    import torch
    import yaml

    from graftkit.analysis.tall import compress, decompress, read_manifest
    from graftkit.eval.runner import EvalCache

    study = Study(args.study)
    tasks = args.tasks or study.tasks(args.family)
    experts = {t: study.hf_model(args.family, t) for t in tasks}
    recipe = {"base": study.base, "experts": experts, "lambda": list(args.lambdas),
              "validation": {t: study.task(t, "validation") for t in tasks}, "exclude": [r"^classifier\."],
              "select": args.select}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe_path = out / "compress.yaml"  # what `graft compress` reads; kept to rerun the CLI by hand
    text = yaml.safe_dump(recipe, sort_keys=False)
    bundle = out / "bundle"
    prev = out / "result.json"
    if args.reuse and recipe_path.is_file() and recipe_path.read_text() == text and (bundle / "bundle.json").is_file() and prev.is_file():
        manifest = read_manifest(bundle)
        compress_s = json.loads(prev.read_text())["meta"]["compress_s"]
        print(f"reusing {bundle} (compressed by an earlier run in {compress_s:.0f} s)")
    else:
        recipe_path.write_text(text)
        t0 = time.perf_counter()
        manifest = compress(recipe_path, bundle, overwrite=True)
        compress_s = time.perf_counter() - t0
    st = manifest["storage"]
    print(f"compress: {compress_s:.0f} s ({len(tasks)} tasks x {len(args.lambdas)} lambda candidates scored on validation); "
          f"bundle {st['bundle_bytes'] / 1e6:.1f} MB vs experts {st['experts_bytes'] / 1e6:.1f} MB: storage ratio {st['ratio']:.3f}",
          flush=True)

    from graftkit.tensors import Checkpoint

    merged_keys = Checkpoint(bundle / "tau_mtl").keys()
    cache = EvalCache()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tall-bench-") as tmp:
        for t in tasks:
            folder = Path(tmp) / t
            t1 = time.perf_counter()
            decompress(bundle, t, folder)
            dec_s = time.perf_counter() - t1
            task = study.task(t, args.split)
            acc_e = accuracy(experts[t], task, cache)
            acc_r = accuracy(str(folder), task, cache)
            val_e = accuracy(experts[t], study.task(t, "validation"), cache)  # what the lambda candidates' scores compare to
            err = relative_error(str(folder), experts[t], study.base, merged_keys)
            shutil.rmtree(folder)
            info = manifest["tasks"][t]
            rows.append({"task": t, "lambda": info["lambda"], "mask_density": info["mask_density"],
                         "validation": info.get("validation"), "expert": acc_e, "rebuilt": acc_r,
                         "expert_validation": val_e, "relative_error": err,
                         "retained": acc_r / acc_e if acc_e else None, "diff": acc_r - acc_e, "decompress_s": dec_s})
            print(f"{t}: lambda {info['lambda']:g}, expert {acc_e:.4f}, rebuilt {acc_r:.4f}, decompress {dec_s:.1f} s", flush=True)

    print(f"\nstorage ratio {st['ratio']:.3f} ({st['bundle_bytes'] / 1e6:.1f} MB bundle vs {st['experts_bytes'] / 1e6:.1f} MB "
          f"for the {len(tasks)} experts; base referenced, in neither); compress {compress_s:.0f} s")
    print(f"{'task':<8} {'lambda':>6} {'density':>7} {'expert':>7} {'rebuilt':>7} {'retained':>8} {'diff':>7} {'decomp s':>8} {'rel err':>7}  validation: expert, then lambda:rebuilt")
    for r in rows:
        val = " ".join(f"{v['lambda']:g}:{v.get('accuracy', float('nan')):.3f}" for v in r["validation"] or [])
        print(f"{r['task']:<8} {r['lambda']:>6g} {r['mask_density']:>7.3f} {r['expert']:>7.4f} {r['rebuilt']:>7.4f} "
              f"{r['retained']:>8.4f} {r['diff']:>+7.3f} {r['decompress_s']:>8.1f} {r['relative_error']:>7.3f}  {r['expert_validation']:.3f}, {val}")
    worst = min(r["diff"] for r in rows)
    print(f"worst rebuilt - expert: {worst:+.3f} ({'within' if worst >= -0.01 else 'NOT within'} 0.01)")
    meta = {"study": args.study, "family": args.family, "tasks": tasks, "split": args.split, "lambdas": args.lambdas,
            "threads": torch.get_num_threads(), "machine": f"{platform.machine()} {os.cpu_count()} CPU(s)",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "compress_s": compress_s}
    (out / "result.json").write_text(json.dumps({"meta": meta, "storage": st, "tasks": rows}, indent=2) + "\n")
    print(f"result: {out / 'result.json'}")


if __name__ == "__main__":
    main()
