"""Normalized accuracy (merge / the task's own expert) per task and averaged, with 95% paired-bootstrap
(2000 resamples, seed 0) intervals, and each merge's mean accuracy difference against task_arithmetic, from a
`graft study` folder's per-example predictions.

    python bench/study_table.py STUDY_DIR FAMILY MERGE1,MERGE2,...
"""
import json
import sys
from pathlib import Path
import numpy as np
from graftkit.eval.compare import aligned_scores, load_run

out = Path(sys.argv[1]); family = sys.argv[2]; merges = sys.argv[3].split(",")
study = json.loads((out / "study.json").read_text())
tasks = [t["name"] for t in study["tasks"]]
rng_seed, B = 0, 2000
sec = {m["name"]: m.get("seconds") for m in study["models"]}
print("| merge | " + " | ".join(f"{t} acc" for t in tasks) + " | " + " | ".join(f"{t} normalized [95% CI]" for t in tasks)
      + " | mean normalized [95% CI] | vs task_arithmetic (mean diff [95% CI]) | merge s |")
print("|---" * (3 + 2 * len(tasks) + 1) + "|")
for m in merges:
    name = f"{family}/{m}"
    if name not in study["scores"]:
        print(f"| {m} | failed: {[f['error'] for f in study['failures'] if f['model'] == name]} |"); continue
    accs, norms, ratios, diffs = [], [], [], []
    rng = np.random.default_rng(rng_seed)
    boots = []
    for t in tasks:
        merged, expert, ta = aligned_scores(t, [load_run(out / "eval" / family / m), load_run(out / "eval" / family / t),
                                                load_run(out / "eval" / family / "task_arithmetic")])
        n = len(merged)
        idx = rng.integers(0, n, size=(B, n))
        r = merged[idx].mean(1) / np.maximum(expert[idx].mean(1), 1e-12)
        d = merged[idx].mean(1) - ta[idx].mean(1)
        boots.append((r, d))
        accs.append(merged.mean()); norms.append(merged.mean() / expert.mean())
        ratios.append(f"{norms[-1]:.3f} [{np.percentile(r, 2.5):.3f}, {np.percentile(r, 97.5):.3f}]")
    mean_r = np.mean([b[0] for b in boots], axis=0); mean_d = np.mean([b[1] for b in boots], axis=0)
    dd = np.mean([a for a in accs]) - np.mean([study["scores"][f"{family}/task_arithmetic"][t] for t in tasks])
    print(f"| {m} | " + " | ".join(f"{a:.3f}" for a in accs) + " | " + " | ".join(ratios)
          + f" | {np.mean(norms):.3f} [{np.percentile(mean_r, 2.5):.3f}, {np.percentile(mean_r, 97.5):.3f}]"
          + f" | {dd:+.3f} [{np.percentile(mean_d, 2.5):+.3f}, {np.percentile(mean_d, 97.5):+.3f}] | {sec.get(name)} |")
