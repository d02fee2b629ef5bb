"""Skill localization on the issue-17 study's fully fine-tuned MiniLM experts: learned vs magnitude
grafting masks at 0.01%, 0.1%, 1% and 10% of the delta, retained accuracy on the training examples
the masks were fitted on and on held-out test examples, ECE, and the multi-task union graft.

Runs the real CLI once (``graft localize`` with the multi-expert recipe) and prints the table.

    graft study bench/analysis_study.yaml          # the experts (out/analysis_study)
    python bench/analysis_localize.py [--study out/analysis_study] [--steps 6] [--train-examples 320]

The defaults are the recorded run's (bench/RESULTS.md, about 16 min on 2 cores): the masks are
fitted on each expert's whole training set (320 examples, as the paper fits on its fine-tuning
data), a few full-batch steps per level; more steps lower the training loss further.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _analysis_experts import Study  # noqa: E402


def recipe(study: Study, tasks: list[str], args) -> dict:
    experts = {t: {"expert": study.adapter("full", t),
                   "task": study.task(t, "train", limit=args.train_examples, batch_size=args.batch_size),
                   "eval_task": study.task(t, "test", limit=args.eval_examples, batch_size=64)} for t in tasks}
    # the packaged MiniLM alias is the base: the study's base/ carries an untrained 2-label head
    return {"base": "minilm", "experts": experts, "sparsity": args.levels, "steps": args.steps,
            "eval_every": args.eval_every, "lr": args.lr, "out": str(args.out)}


def table(result: dict) -> list[str]:
    rows = ["| task | sparsity | entries | magnitude retained (train / held-out) | learned retained (train / held-out) "
            "| ECE fine-tuned / magnitude / learned (held-out) | learned best step |", "|---|---|---|---|---|---|---|"]
    means: dict[float, list] = {}
    for name, r in result["experts"].items():
        ft = r["finetuned"]
        for lv in r["levels"]:
            m, l = lv["magnitude"], lv["learned"]
            ret = [m["accuracy"] / ft["accuracy"], m["heldout"]["accuracy"] / ft["heldout"]["accuracy"],
                   l["accuracy"] / ft["accuracy"], l["heldout"]["accuracy"] / ft["heldout"]["accuracy"]]
            means.setdefault(lv["sparsity"], []).append(ret)
            rows.append(f"| {name} | {100 * lv['sparsity']:g}% | {lv['k']:,} | {ret[0]:.3f} / {ret[1]:.3f} | {ret[2]:.3f} / {ret[3]:.3f} "
                        f"| {ft['heldout']['ece']:.3f} / {m['heldout']['ece']:.3f} / {l['heldout']['ece']:.3f} | {l['best_step']} |")
    for s, rs in sorted(means.items()):
        avg = [sum(r[i] for r in rs) / len(rs) for i in range(4)]
        rows.append(f"| **mean** | {100 * s:g}% | | {avg[0]:.3f} / {avg[1]:.3f} | {avg[2]:.3f} / {avg[3]:.3f} | | |")
    return rows


def union_table(result: dict) -> list[str]:
    rows = ["| sparsity | union entries | Jaccard (mean over pairs) | " + " | ".join(f"{n} union retained (held-out)" for n in result["experts"]) + " |",
            "|---|---|---|" + "---|" * len(result["experts"])]
    for lv in result["levels"]:
        jac = lv["overlap"]["all"]
        n = len(jac)
        pairs = [jac[i][j] for i in range(n) for j in range(i + 1, n)]
        cells = []
        for name, u in lv["union"].items():
            ft = result["experts"][name]["finetuned"]
            cells.append(f"{u['heldout']['accuracy'] / ft['heldout']['accuracy']:.3f}")
        rows.append(f"| {100 * lv['sparsity']:g}% | {lv['k']:,} | {sum(pairs) / max(1, len(pairs)):.3f} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default="out/analysis_study")
    ap.add_argument("--tasks", nargs="*", default=None)
    ap.add_argument("--levels", nargs="*", type=float, default=[0.0001, 0.001, 0.01, 0.1])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--eval-every", type=int, default=3)
    ap.add_argument("--lr", type=float, default=2.0)
    ap.add_argument("--train-examples", type=int, default=320)
    ap.add_argument("--eval-examples", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64,
                    help="examples per forward pass of the mask gradient; the step is full-batch either way")
    ap.add_argument("--out", type=Path, default=Path("out/analysis_localize"))
    args = ap.parse_args()
    study = Study(args.study)
    tasks = args.tasks or study.tasks("full")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe(study, tasks, args), sort_keys=False))
    cmd = [str(Path(sys.executable).parent / "graft"), "localize", str(path)]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    wall = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result = json.loads((args.out / "result.json").read_text())
    lines = [f"graft localize, {len(tasks)} experts, levels {args.levels}, {args.steps} steps of the full-batch gradient "
             f"({args.train_examples} training examples), held-out = {args.eval_examples} test examples; "
             f"{wall / 60:.1f} min wall, {peak:.0f} MB peak RSS, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores", ""] + table(result) + [""] + union_table(result)
    text = "\n".join(lines)
    (args.out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
