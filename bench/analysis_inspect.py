"""``graft inspect --deltas`` on the issue-17 experts: intruder dimensions of LoRA r=8, rsLoRA r=64
and full fine-tuning, and the time and peak memory of one inspection of SmolLM2-135M.

(a) Intruders. One ``graft inspect --deltas`` run per family (``full``, ``lora8``, ``rslora64``)
over that family's experts of a study output (``graft study bench/analysis_study.yaml``; each
expert's adapter folder, which inspect reads as ``base + its delta``; the task heads are
excluded, their label counts differ). The k = 10 top left singular vectors of every fine-tuned
matrix and their largest ``|cos|`` to the base's singular vectors come back in ``--json``, so
the counts for every epsilon of the sweep come from that one run. Written to ``--out``: per family
the inspect report and its JSON, then ``results.json``, ``intruders.md`` and two plots (intruders per family and
task at epsilon = 0.5; intruders against epsilon).

(b) SmolLM2. An all-linear LoRA r=8 adapter on the packaged SmolLM2-135M (all 7 linear modules
of the 30 layers, random A and random B scaled by ``--b-scale``, so every one of the 210 target
matrices carries a rank-8 delta and gets its SVDs), then ``graft inspect --deltas ADAPTER --base
smollm2 --out DIR`` in a fresh subprocess: its wall time and its own peak RSS (``os.wait4``'s
rusage of that one child).

    .venv/bin/python bench/analysis_inspect.py [--study out/analysis_study] [--out out/analysis_inspect]
        [--epsilons 0.3,0.4,0.5,0.6,0.7,0.8,0.9] [--families full,lora8,rslora64] [--tasks bbc,...]
        [--skip-experts] [--skip-smollm2] [--qwen05b]

(c) With ``--qwen05b``, (b) again on a model of Qwen2-0.5B's shape with seeded random weights (no
0.5B checkpoint installs offline): the issue's "a 0.5B model's spectrum analysis fits in bounded
memory".
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _analysis_experts import FAMILIES, Study  # noqa: E402
from _measure import cpu_name  # noqa: E402

from graftkit.analysis.delta_stats import layer_and_module  # noqa: E402

LABELS = {"full": "full FT", "lora8": "LoRA r=8", "lora": "LoRA r=8", "rslora64": "rsLoRA r=64"}
SMOL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def graft_exe() -> str:
    exe = Path(sys.executable).parent / "graft"
    return str(exe) if exe.exists() else "graft"


def run_measured(cmd: list[str], stdout_path: Path, env: dict | None = None) -> dict:
    """Run ``cmd`` with stdout to a file; its wall seconds and the peak RSS of that child alone."""
    with open(stdout_path, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, env=env)
        err = proc.stderr.read().decode(errors="replace")
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{err}")
    # Linux reports ru_maxrss in KiB
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "user_s": usage.ru_utime, "sys_s": usage.ru_stime}


def machine() -> str:
    cpu = cpu_name()
    try:
        load = "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        load = "load unknown"
    return f"{cpu}, {os.cpu_count()} cores, {load}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"


# -- (a) intruders on the study's experts ------------------------------------------------------------
def count(tensors: list[dict], eps: float, *, layers_only: bool = False) -> int:
    return sum(1 for r in tensors if not (layers_only and r["layer"] is None)
               for c in r.get("max_cosines") or [] if c < eps)


def inspect_family(study: Study, fam: str, tasks: list[str], out: Path, top_k: int, reuse: bool) -> dict:
    """One ``graft inspect --deltas`` run over one family's experts (``--reuse``: keep an earlier run's output)."""
    paths = [study.adapter(fam, t) for t in tasks]
    cmd = [graft_exe(), "inspect", "--deltas", *paths, "--base", study.base, "--exclude", "classifier.*",
           "--top-k", str(top_k), "--epsilon", "0.5", "--json", "--out", str(out / fam / "report")]
    (out / fam).mkdir(parents=True, exist_ok=True)
    done = out / fam / "run.json"
    if reuse and done.exists() and json.loads(done.read_text())["command"] == shlex.join(cmd):
        print(f"reused: {out / fam}", flush=True)
        return json.loads(done.read_text())
    print("$", shlex.join(cmd), flush=True)
    cost = run_measured(cmd, out / fam / "inspect.json")
    run = {"command": shlex.join(cmd), "cost": cost, "machine": machine()}
    done.write_text(json.dumps(run, indent=2))
    print(f"  {len(paths)} deltas: {cost['wall_s']:.1f} s wall ({cost['user_s']:.0f} s user + {cost['sys_s']:.0f} s sys CPU), "
          f"{cost['peak_rss_mb']:.0f} MB peak RSS", flush=True)
    return run


def intruders(study: Study, out: Path, epsilons: list[float], top_k: int, families: list[str] | None = None,
              tasks: list[str] | None = None, reuse: bool = False) -> dict:
    families = families or [f for f in FAMILIES if f in study.families()]
    rows, runs = [], {}
    for fam in families:
        fam_tasks = [t for t in study.tasks(fam) if not tasks or t in tasks]
        if not fam_tasks:
            print(f"no {fam} experts under {study.root}/experts yet; skipped", flush=True)
            continue
        runs[fam] = inspect_family(study, fam, fam_tasks, out, top_k, reuse)
        res = json.loads((out / fam / "inspect.json").read_text())
        by_path = {m["path"]: m for m in res["models"].values()}
        for task in fam_tasks:
            m = by_path[study.adapter(fam, task)]
            ts = m["tensors"]
            hit: dict[str, int] = {}
            for r in ts:
                n = sum(1 for c in r.get("max_cosines") or [] if c < 0.5)
                if n:
                    hit[r["module"]] = hit.get(r["module"], 0) + n
            rows.append({"family": fam, "task": task, "path": m["path"],
                         "matrices": sum(1 for r in ts if r.get("max_cosines")),
                         "relative": m["total"]["relative"], "stable_rank": m["total"]["stable_rank"],
                         "effective_rank": m["total"]["effective_rank"],
                         "intruders": {str(e): count(ts, e) for e in epsilons},
                         "intruders_in_layers": {str(e): count(ts, e, layers_only=True) for e in epsilons},
                         "at_0.5_by_module": hit,
                         "min_max_cosine": min((c for r in ts for c in r.get("max_cosines") or []), default=None)})
    if not rows:
        sys.exit(f"no experts of {families} under {study.root}/experts")
    return {"runs": runs, "top_k": top_k, "epsilons": epsilons, "families": list(runs), "experts": rows}


def matched_norm(study: Study, tasks: list[str], small: str = "lora8", large: str = "rslora64", eps: float = 0.5) -> dict:
    """Is a count the rank's doing or the delta's size? Per matrix, rescale the ``large`` family's delta
    to the Frobenius norm of the ``small`` one's (same task, same matrix) and the other way round, and
    count intruders again: ``{variant: {"layers": n, "outside": n}}`` summed over tasks (encoder
    layers apart from matrices outside them, the pooler). Embeddings are skipped (LoRA leaves them)."""
    from graftkit.analysis.intruder import left_singular_vectors, max_cosines
    from graftkit.merge.plan import open_input

    base = open_input(study.base, require_config=False)
    head = lambda k: k.startswith("classifier")  # noqa: E731
    out: dict[str, dict[str, int]] = {}
    for task in tasks:
        ck = {f: open_input(study.adapter(f, task), base, require_config=False, exclude=head) for f in (small, large)}
        for key in base.keys():
            if head(key) or "embeddings" in key or len(base.shape(key)) != 2:
                continue
            w0 = base.get(key).float()
            d_s, d_l = (ck[f].get(key).float() - w0 for f in (small, large))
            n_s, n_l = float(d_s.norm()), float(d_l.norm())
            if n_s == 0 or n_l == 0:
                continue
            u0 = left_singular_vectors(w0)
            where = "outside" if layer_and_module(key)[0] is None else "layers"
            for name, w in [(small, w0 + d_s), (large, w0 + d_l), (f"{large} at {small}'s norm", w0 + d_l * (n_s / n_l)),
                            (f"{small} at {large}'s norm", w0 + d_s * (n_l / n_s))]:
                row = out.setdefault(name, {"layers": 0, "outside": 0})
                row[where] += sum(1 for c in max_cosines(u0, w) if c < eps)
    return out


def intruder_table(data: dict) -> str:
    eps = data["epsilons"]
    lines = ["| family | task | matrices | ‖delta‖/‖base‖ | mean stable rank | "
             + " | ".join(f"ε={e:g}" for e in eps) + " | in layers (ε=0.5) | where (ε=0.5) |",
             "|---|---|---:|---:|---:|" + "---:|" * len(eps) + "---:|---|"]
    for r in data["experts"]:
        where = ", ".join(f"{m} {n}" for m, n in sorted(r["at_0.5_by_module"].items(), key=lambda x: -x[1])) or "-"
        lines.append(f"| {LABELS.get(r['family'], r['family'])} | {r['task']} | {r['matrices']} | {r['relative']:.4f} | "
                     f"{r['stable_rank']:.2f} | " + " | ".join(str(r["intruders"][str(e)]) for e in eps)
                     + f" | {r['intruders_in_layers']['0.5']} | {where} |")
    for fam in data["families"]:
        rs = [r for r in data["experts"] if r["family"] == fam]
        lines.append(f"| **{LABELS.get(fam, fam)}, sum** | {len(rs)} tasks | {sum(r['matrices'] for r in rs)} | | | "
                     + " | ".join(str(sum(r["intruders"][str(e)] for r in rs)) for e in eps)
                     + f" | {sum(r['intruders_in_layers']['0.5'] for r in rs)} | |")
    return "\n".join(lines)


def intruder_plots(data: dict, out: Path) -> list[Path]:
    from graftkit.eval.report import chart_style, new_figure, png_bytes

    fams, rows = data["families"], data["experts"]
    tasks = sorted({r["task"] for r in rows})
    get = {(r["family"], r["task"]): r for r in rows}
    files = []
    with chart_style():
        fig = new_figure(max(5.5, 1.5 + 1.2 * len(tasks)), 3.6)
        ax = fig.add_subplot()
        w = 0.8 / len(fams)
        for i, fam in enumerate(fams):
            xs = [j + (i - (len(fams) - 1) / 2) * w for j in range(len(tasks))]
            ys = [get[(fam, t)]["intruders"]["0.5"] if (fam, t) in get else 0 for t in tasks]
            bars = ax.bar(xs, ys, w, label=LABELS.get(fam, fam))
            ax.bar_label(bars, fontsize=8)
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_ylabel(f"intruder dimensions (k={data['top_k']}, ε=0.5)\nsummed over all matrices")
        ax.set_title("Intruder dimensions per expert")
        ax.legend(frameon=False)
        files.append(out / "intruders_by_task.png")
        files[-1].write_bytes(png_bytes(fig))

        fig = new_figure(5.5, 3.6)
        ax = fig.add_subplot()
        for fam in fams:
            rs = [r for r in rows if r["family"] == fam]
            ax.plot(data["epsilons"], [sum(r["intruders"][str(e)] for r in rs) / len(rs) for e in data["epsilons"]],
                    marker="o", label=LABELS.get(fam, fam))
        ax.set_xlabel("ε (cosine threshold)")
        ax.set_ylabel(f"intruders per expert (mean over {len(tasks)} tasks)")
        ax.set_title(f"Intruder dimensions against ε (top k={data['top_k']})")
        ax.legend(frameon=False)
        files.append(out / "intruders_vs_epsilon.png")
        files[-1].write_bytes(png_bytes(fig))
    return files


# -- (b) SmolLM2-135M --------------------------------------------------------------------------------
def random_lora(model_path: str, adapter: Path, rank: int, b_scale: float) -> None:
    """An all-linear LoRA adapter on ``model_path`` with random A and B (B scaled by ``b_scale``), so
    every target matrix carries a rank-``rank`` delta; written once, kept for reruns."""
    if (adapter / "adapter.json").exists():
        return
    import torch

    import graftkit as gk
    from graftkit.io.hf import load_model

    model = load_model(model_path)
    torch.manual_seed(0)
    gk.inject(model, gk.LoRAConfig(init_lora_weights=False, r=rank, lora_alpha=2 * rank, targets=SMOL_TARGETS))
    with torch.no_grad():
        for site in gk.sites(model).values():
            site.lora_B.mul_(b_scale)
    gk.save_adapter(model, adapter)


def inspect_measured(adapter: Path, base: str, out: Path, name: str) -> dict:
    """``graft inspect --deltas ADAPTER --base BASE`` in a fresh subprocess: wall time and its own peak RSS."""
    cmd = [graft_exe(), "inspect", "--deltas", str(adapter), "--base", base, "--out", str(out / f"{name}_report")]
    print("$", shlex.join(cmd), flush=True)
    cost = run_measured(cmd, out / f"{name}_inspect.txt")
    return {"command": shlex.join(cmd), "cost": cost, "summary": (out / f"{name}_inspect.txt").read_text().strip()}


def smollm2(out: Path, rank: int, b_scale: float) -> dict:
    from graftkit.assets import model_dir

    adapter = out / f"smollm2_lora{rank}"
    random_lora(str(model_dir("smollm2")), adapter, rank, b_scale)
    return {**inspect_measured(adapter, "smollm2", out, "smollm2"), "rank": rank, "b_scale": b_scale}


# -- (c) a 0.5B model: memory stays bounded ----------------------------------------------------------
QWEN05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
               num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1e6)  # Qwen2-0.5B's shape


def qwen05b(out: Path, rank: int, b_scale: float) -> dict:
    """The same measurement on a model of Qwen2-0.5B's shape (494M parameters, 1.98 GB fp32): no
    0.5B checkpoint installs offline, so the weights are a seeded random initialisation (the cost of
    the SVDs and the reading does not depend on the values)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    base = out / "qwen2_0.5b_random"
    if not (base / "config.json").exists():
        torch.manual_seed(0)
        Qwen2ForCausalLM(Qwen2Config(**QWEN05B)).save_pretrained(base, safe_serialization=True)
    adapter = out / f"qwen2_0.5b_lora{rank}"
    random_lora(str(base), adapter, rank, b_scale)
    return {**inspect_measured(adapter, str(base), out, "qwen05b"), "rank": rank, "b_scale": b_scale, "config": QWEN05B}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", default="out/analysis_study")
    ap.add_argument("--out", default="out/analysis_inspect")
    ap.add_argument("--epsilons", default="0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--families", default="", help="comma-separated (default: full, lora8, rslora64 where present)")
    ap.add_argument("--tasks", default="", help="comma-separated (default: every task)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--b-scale", type=float, default=0.05)
    ap.add_argument("--reuse", action="store_true", help="keep a family's earlier inspect run (same command)")
    ap.add_argument("--skip-experts", action="store_true")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--qwen05b", action="store_true",
                    help="also inspect a random model of Qwen2-0.5B's shape (writes 2 GB of weights under --out)")
    o = ap.parse_args()
    out = Path(o.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    # a run with --skip-experts or --skip-smollm2 keeps the other part's earlier numbers
    prev = out / "results.json"
    result: dict = json.loads(prev.read_text()) if prev.exists() else {}
    result["machine"] = machine()
    if not o.skip_experts:
        eps = sorted({float(e) for e in o.epsilons.split(",")} | {0.5})
        data = intruders(Study(o.study), out, eps, o.top_k, [f for f in o.families.split(",") if f],
                         [t for t in o.tasks.split(",") if t], o.reuse)
        table = intruder_table(data)
        (out / "intruders.md").write_text(table + "\n")
        intruder_plots(data, out)
        result["intruders"] = data
        print(table)
        if {"lora8", "rslora64"} <= set(data["families"]):
            both = [t for t in Study(o.study).tasks("lora8") if t in Study(o.study).tasks("rslora64") and (not o.tasks or t in o.tasks)]
            m = matched_norm(Study(o.study), both)
            data["matched_norm"] = m
            print(f"intruders (ε=0.5, {len(both)} tasks) with each delta rescaled per matrix to the other family's norm:")
            for name, c in m.items():
                print(f"  {name}: {c['layers']} in encoder layers, {c['outside']} outside (pooler)")
    if not o.skip_smollm2:
        s = smollm2(out, o.rank, o.b_scale)
        result["smollm2"] = s
        c = s["cost"]
        print(f"SmolLM2-135M, LoRA r={o.rank} on {', '.join(SMOL_TARGETS)}: {c['wall_s']:.1f} s wall "
              f"({c['user_s']:.0f} s user + {c['sys_s']:.0f} s sys CPU), {c['peak_rss_mb']:.0f} MB peak RSS\n  {s['summary']}")
    if o.qwen05b:
        q = qwen05b(out, o.rank, o.b_scale)
        result["qwen05b"] = q
        c = q["cost"]
        print(f"Qwen2-0.5B shape (random weights), LoRA r={o.rank} on {', '.join(SMOL_TARGETS)}: {c['wall_s']:.1f} s wall "
              f"({c['user_s']:.0f} s user + {c['sys_s']:.0f} s sys CPU), {c['peak_rss_mb']:.0f} MB peak RSS\n  {q['summary']}")
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"written: {out}/results.json, intruders.md, intruders_by_task.png, intruders_vs_epsilon.png")


if __name__ == "__main__":
    main()
