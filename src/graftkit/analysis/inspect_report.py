"""The ``graft inspect --deltas`` report: delta statistics per layer and module type, singular-value
spectra, intruder dimensions per model and task-vector similarity, through the report blocks of
eval/report.py (self-contained HTML + Markdown + report_files/*.png)."""
from __future__ import annotations

from pathlib import Path

from ..eval.report import PALETTE, Cell, Figure, Para, Section, Table, chart_style, similarity_chart, new_figure, png_bytes, write_sections

SECTIONS = (("overview", "Overview"), ("layers", "By layer"), ("modules", "By module type"), ("spectra", "Spectra"),
            ("intruders", "Intruder dimensions"), ("similarity", "Task-vector similarity"))


def _f(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.{digits}g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.{digits}f}"


def _thr_label(t: str) -> str:
    return "|d| = 0" if float(t) == 0 else f"|d| <= {float(t):g}"


def _group_table(groups: list[dict], by: str, thresholds: list[str]) -> Table:
    header = [Cell(by), Cell("tensors", num=True), Cell("||delta||", num=True), Cell("||delta|| / ||base||", num=True)]
    header += [Cell(_thr_label(t), num=True, sub="share") for t in thresholds]
    header += [Cell("stable rank", num=True, sub="mean"), Cell("effective rank", num=True, sub="mean"),
               Cell("intruders", num=True)]
    rows = []
    for g in groups:
        label = g[by] if g[by] is not None else "(no layer)"
        rows.append([Cell(str(label)), Cell(_f(g["tensors"]), num=True), Cell(_f(g["norm"]), num=True),
                     Cell(_f(g["relative"]), num=True)]
                    + [Cell(_f(g["sparsity"][t]), num=True) for t in thresholds]
                    + [Cell(_f(g["stable_rank"], 2), num=True), Cell(_f(g["effective_rank"], 2), num=True),
                       Cell(_f(g["intruders"]), num=True)])
    return Table(header, rows, note="Ranks are means over the 2-d deltas of the group that are not zero; "
                                    "sparsity is the share of the group's entries at or below the threshold.")


def _spectra_chart(models: dict) -> bytes:
    """Per model, the mean normalised spectrum ``sigma_i / sigma_1`` of each module type's deltas."""
    names = list(models)
    with chart_style():
        fig = new_figure(min(14.0, 4.2 * len(names) + 1.5), 3.6)
        axes = fig.subplots(1, len(names), squeeze=False)[0]
        for ax, name in zip(axes, names):
            per: dict[str, list[list[float]]] = {}
            for r in models[name]["tensors"]:
                s = r.get("singular_values") or []
                if s and s[0] > 0:
                    per.setdefault(r["module"], []).append([v / s[0] for v in s])
            for j, (mod, spectra) in enumerate(sorted(per.items())):
                n = min(len(s) for s in spectra)
                mean = [sum(s[i] for s in spectra) / len(spectra) for i in range(n)]
                ax.plot(range(1, n + 1), [max(v, 1e-8) for v in mean], color=PALETTE[j % len(PALETTE)],
                        linestyle="-" if j < len(PALETTE) else "--", linewidth=1.2, label=mod)
            if not per:
                ax.text(0.5, 0.5, "no nonzero 2-d delta", ha="center", va="center", transform=ax.transAxes)
            ax.set_yscale("log")
            ax.set_xlabel("singular value index")
            ax.set_ylabel("sigma_i / sigma_1 (mean over layers)")
            ax.set_title(name)
            ax.grid(color="#e5e5e5", linewidth=0.8)
            if per:
                ax.legend(fontsize=7, frameon=False)
        return png_bytes(fig)


def _intruder_chart(models: dict) -> bytes:
    names = list(models)
    with chart_style():
        fig = new_figure(max(4.0, 1.1 * len(names) + 2.0), 3.2)
        ax = fig.add_subplot()
        vals = [models[n]["total"]["intruders"] for n in names]
        bars = ax.bar(range(len(names)), vals, 0.6, color=[PALETTE[i % len(PALETTE)] for i in range(len(names))])
        ax.bar_label(bars, labels=[str(v) for v in vals], fontsize=8, padding=1.5)
        ax.set_xticks(range(len(names)), names, rotation=20 if len(names) > 4 else 0)
        ax.set_ylabel("intruder dimensions (all matrices)")
        ax.set_ylim(0, max(1, max(vals, default=0)) * 1.2)
        ax.grid(axis="y", color="#e5e5e5", linewidth=0.8)
        ax.set_axisbelow(True)
        return png_bytes(fig)


def build_inspect_sections(result: dict) -> tuple[list[Section], list[Figure]]:
    models = result["models"]
    thresholds = [str(float(t)) for t in result["thresholds"]]
    secs = {key: Section(key, title) for key, title in SECTIONS}
    figs: list[Figure] = []

    ov = secs["overview"]
    ov.blocks.append(Para(f"Base: {result['base']}. Deltas: " + ", ".join(f"{n} ({m['path']})" for n, m in models.items()) + "."))
    header = [Cell("model"), Cell("tensors", num=True), Cell("2-d deltas", num=True), Cell("||delta||", num=True),
              Cell("||delta|| / ||base||", num=True)] + [Cell(_thr_label(t), num=True, sub="share") for t in thresholds] \
        + [Cell("intruders", num=True, sub=f"top-{result['top_k']}, eps {result['epsilon']:g}")]
    rows = [[Cell(n), Cell(_f(m["total"]["tensors"]), num=True), Cell(_f(m["total"]["matrices"]), num=True),
             Cell(_f(m["total"]["norm"]), num=True), Cell(_f(m["total"]["relative"]), num=True)]
            + [Cell(_f(m["total"]["sparsity"][t]), num=True) for t in thresholds]
            + [Cell(_f(m["total"]["intruders"]), num=True)] for n, m in models.items()]
    ov.blocks.append(Table(header, rows))

    for key, by, field in (("layers", "layer", "by_layer"), ("modules", "module", "by_module")):
        for n, m in models.items():
            secs[key].blocks.append(Para(f"{n}:"))
            secs[key].blocks.append(_group_table(m[field], by, thresholds))

    sp = secs["spectra"]
    fig = Figure("spectra", _spectra_chart(models), "Normalised singular-value spectra of the deltas per module type",
                 "Each line: the mean over layers of sigma_i / sigma_1 of one module type's delta. A fast drop means a "
                 "low-rank change (LoRA of rank r stops at index r); a flat tail means a full-rank change.")
    sp.blocks.append(fig)
    figs.append(fig)

    it = secs["intruders"]
    it.blocks.append(Para(f"A top-{result['top_k']} left singular vector of a fine-tuned matrix is an intruder when its "
                          f"largest |cosine| to every singular vector of the base matrix is below {result['epsilon']:g} "
                          "(Shuttleworth et al., LoRA vs Full Fine-tuning: An Illusion of Equivalence)."))
    fig = Figure("intruders", _intruder_chart(models), "Intruder dimensions per model")
    it.blocks.append(fig)
    figs.append(fig)
    worst = []
    for n, m in models.items():
        worst += [(r["intruders"], n, r["name"]) for r in m["tensors"] if r.get("intruders")]
    worst.sort(key=lambda x: (-x[0], x[1], x[2]))
    if worst:
        it.blocks.append(Table([Cell("model"), Cell("matrix"), Cell("intruders", num=True)],
                               [[Cell(n), Cell(k), Cell(str(c), num=True)] for c, n, k in worst[:20]],
                               note="The matrices with the most intruders (at most 20)."))
    else:
        it.blocks.append(Para("No matrix has an intruder dimension."))

    si = secs["similarity"]
    sim = result.get("similarity")
    if sim:
        fig = Figure("similarity", similarity_chart("deltas", sim), "Task-vector cosine and sign conflicts",
                     "Cosine of the whole-model deltas and, among entries where both are nonzero, the share with "
                     "opposite signs (which cancel in a plain sum; TIES-Merging).")
        si.blocks.append(fig)
        figs.append(fig)
        tasks = sim["tasks"]
        si.blocks.append(Table([Cell("pair"), Cell("cosine", num=True), Cell("sign conflicts", num=True)],
                               [[Cell(f"{tasks[i]} / {tasks[j]}"), Cell(_f(sim["cosine"][i][j]), num=True),
                                 Cell(_f(sim["sign_conflict"][i][j]), num=True)]
                                for i in range(len(tasks)) for j in range(i + 1, len(tasks))]))
    else:
        si.blocks.append(Para("Task-vector similarity compares two or more deltas; this inspection has one.", cls="missing"))
    return [secs[k] for k, _ in SECTIONS], figs


def summary_line(result: dict) -> str:
    parts = []
    for n, m in result["models"].items():
        t = m["total"]
        rel = f"{t['relative']:.3g}" if t["relative"] is not None else "n/a"
        parts.append(f"{n}: ||delta|| {t['norm']:.4g} ({rel} of base), {t['intruders']} intruders in {t['matrices']} matrices")
    return "; ".join(parts)


def write_inspect_report(result: dict, out_dir: str | Path) -> tuple[Path, Path]:
    sections, figs = build_inspect_sections(result)
    return write_sections(f"graftkit inspect: {len(result['models'])} delta(s) against {result['base']}", sections, figs, out_dir)
