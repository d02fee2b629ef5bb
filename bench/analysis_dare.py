"""DARE tolerance curves of the issue-17 benchmark experts (issue 17 item 6).

For each fully fine-tuned expert of a study output folder (``graft study bench/analysis_study.yaml``
writes out/analysis_study; ``graft demo``'s folder has the same layout), runs
:func:`graftkit.analysis.dare_tolerance.dare_tolerance` (what ``graft dare-tolerance`` runs) on the
task's test split: the accuracy of ``base + DARE(expert - base, p)`` for p in {0, 0.5, 0.9, 0.95,
0.99}, each delta entry kept with probability 1 - p and the survivors rescaled by 1/(1 - p), the
task head kept whole. One expert at a time, several drop seeds; p = 0 is the expert itself.

Prints a table (mean and range over the seeds of the accuracy and of retained = accuracy / the
expert's) and writes OUT/report.html, OUT/report.md, OUT/report_files/dare_curves.png (the four
curves) and OUT/result.json.

    .venv/bin/python bench/analysis_dare.py [--study out/analysis_study] [--seeds 0 1 2] [--out out/analysis_dare] [--reuse]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _analysis_experts import Study  # noqa: E402


def summarize(rows_per_seed: list[list[dict]]) -> list[dict]:
    """Per rate: mean, min and max over the seeds of accuracy and retained, and the kept share."""
    out = []
    for i, r0 in enumerate(rows_per_seed[0]):
        accs = [rows[i]["accuracy"] for rows in rows_per_seed]
        rets = [rows[i]["retained"] for rows in rows_per_seed if rows[i]["retained"] is not None]
        out.append({"rate": r0["rate"], "accuracy": statistics.fmean(accs), "acc_min": min(accs), "acc_max": max(accs),
                    "retained": statistics.fmean(rets) if rets else None,
                    "ret_min": min(rets) if rets else None, "ret_max": max(rets) if rets else None,
                    "kept_share": statistics.fmean(rows[i]["kept_share"] for rows in rows_per_seed),
                    "seeds": len(accs)})
    return out


def curves_png(results: dict[str, list[dict]]) -> bytes:
    """Accuracy and retained against p, one line per task, the seeds' range as error bars. The x
    axis is evenly spaced by rate (0.9 .. 0.99 would crowd on a linear axis)."""
    from graftkit.eval.report import chart_style, new_figure, png_bytes

    with chart_style():
        fig = new_figure(9.0, 3.4)
        axes = [fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)]
        n = len(results)
        for i, (task, rows) in enumerate(results.items()):
            xs = [x + 0.06 * (i - (n - 1) / 2) for x in range(len(rows))]  # side by side: the seeds' bars do not hide each other
            for ax, key, lo, hi in ((axes[0], "accuracy", "acc_min", "acc_max"), (axes[1], "retained", "ret_min", "ret_max")):
                ys = [r[key] for r in rows]
                err = [[y - r[lo] for y, r in zip(ys, rows)], [r[hi] - y for y, r in zip(ys, rows)]]
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=task)
        labels = [f"{r['rate']:g}" for r in next(iter(results.values()))]
        for ax, ylabel in ((axes[0], "test accuracy"), (axes[1], "retained (accuracy / expert's)")):
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlabel("drop rate p (survivors x 1/(1-p))")
            ax.set_ylabel(ylabel)
            ax.grid(axis="y", alpha=0.3)
        axes[1].axhline(1.0, color="grey", lw=0.8, ls="--")
        axes[0].legend(title="expert")
        fig.suptitle("DARE tolerance of fully fine-tuned MiniLM experts")
        return png_bytes(fig)


def write_report(out: Path, results: dict[str, list[dict]], meta: dict) -> Path:
    from graftkit.eval.report import Cell, Figure, Para, Section, Table, write_sections

    header = [Cell("task"), Cell("drop rate p"), Cell("accuracy (mean)", num=True), Cell("accuracy range", num=True),
              Cell("retained (mean)", num=True), Cell("retained range", num=True), Cell("kept share", num=True)]
    rows = []
    for task, rs in results.items():
        for r in rs:
            rows.append([Cell(task), Cell(f"{r['rate']:g}" + (" (expert)" if r["rate"] == 0 else "")),
                         Cell(f"{r['accuracy']:.4f}", num=True), Cell(f"{r['acc_min']:.3f}-{r['acc_max']:.3f}", num=True),
                         Cell(f"{r['retained']:.3f}", num=True), Cell(f"{r['ret_min']:.3f}-{r['ret_max']:.3f}", num=True),
                         Cell(f"{r['kept_share']:.4f}", num=True)])
    fig = Figure("dare_curves", curves_png(results), alt="accuracy and retained accuracy against the DARE drop rate, per task",
                 caption=f"mean over drop seeds {meta['seeds']}; bars: min-max over the seeds")
    sec = Section("dare", "DARE tolerance", [
        Para(f"Study {meta['study']}: each fully fine-tuned expert over the study's base, scored on its task's "
             f"{meta['split']} split; base + DARE(expert - base, p), survivors rescaled by 1/(1 - p), the task head kept "
             f"whole. Drop seeds {meta['seeds']}; p = 0 is the expert. {meta['seconds']:.0f} s in all, "
             f"{meta['threads']} torch thread(s), {meta['machine']}."),
        Table(header=header, rows=rows), fig])
    html, _ = write_sections("DARE tolerance curves (issue 17)", [sec], [fig], out)
    return html


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", default="out/analysis_study", help="a graft study output folder (default out/analysis_study)")
    ap.add_argument("--family", default="full", help="which expert family (default full)")
    ap.add_argument("--tasks", nargs="*", default=None, help="default: every task of the family")
    ap.add_argument("--split", default="test")
    ap.add_argument("--rates", nargs="+", type=float, default=[0.5, 0.9, 0.95, 0.99])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", default="out/analysis_dare")
    ap.add_argument("--reuse", action="store_true", help="keep the tasks OUT/result.json already has for these settings")
    args = ap.parse_args()

    import torch

    from graftkit.analysis.dare_tolerance import dare_tolerance

    study = Study(args.study)
    tasks = args.tasks or study.tasks(args.family)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    same = {"study": args.study, "family": args.family, "split": args.split, "seeds": args.seeds, "rates": args.rates}
    raw, task_seconds = {}, {}
    prev = out / "result.json"
    if args.reuse and prev.is_file():  # tasks measured by an earlier run with the same settings are not run again
        old = json.loads(prev.read_text())
        if {k: old["meta"].get(k) for k in same} == same:
            raw = {t: v for t, v in old["per_seed"].items() if t in tasks}
            task_seconds = {t: old["meta"]["task_seconds"][t] for t in raw}
            print(f"reusing {', '.join(raw) or 'no task'} from {prev}", flush=True)
    for task in tasks:
        if task in raw:
            continue
        per_seed = []
        start = time.perf_counter()
        expert = study.hf_model(args.family, task)
        for seed in args.seeds:
            t0 = time.perf_counter()
            res = dare_tolerance(study.base, expert, study.task(task, args.split),
                                 rates=args.rates, seed=seed)
            per_seed.append(res["rows"])
            accs = " ".join(f"{r['rate']:g}:{r['accuracy']:.3f}" for r in res["rows"])
            print(f"{task} seed {seed}: {accs}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        raw[task] = per_seed
        task_seconds[task] = time.perf_counter() - start
        # after every task, so a run cut short keeps what it measured (--reuse picks it up)
        prev.write_text(json.dumps({"meta": {**same, "task_seconds": task_seconds}, "per_seed": raw}, indent=2) + "\n")
    results = {t: summarize(raw[t]) for t in tasks}
    seconds = sum(task_seconds.values())

    print(f"\n{'task':<8} {'p':>5} {'acc mean':>8} {'acc range':>11} {'retained':>8} {'ret range':>11} {'kept':>6}")
    for task, rs in results.items():
        for r in rs:
            print(f"{task:<8} {r['rate']:>5g} {r['accuracy']:>8.4f} {r['acc_min']:>5.3f}-{r['acc_max']:<5.3f} "
                  f"{r['retained']:>8.3f} {r['ret_min']:>5.3f}-{r['ret_max']:<5.3f} {r['kept_share']:>6.4f}")
    meta = {**same, "seconds": seconds, "task_seconds": task_seconds, "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {os.cpu_count()} CPU(s)", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    html = write_report(out, results, meta)
    (out / "result.json").write_text(json.dumps({"meta": meta, "summary": results, "per_seed": raw}, indent=2) + "\n")
    print(f"\n{len(tasks)} experts x {len(args.seeds)} seeds in {seconds:.0f} s; report: {html}")


if __name__ == "__main__":
    main()
