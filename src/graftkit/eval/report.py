"""The study report: one self-contained HTML page and a Markdown twin, from a study's results.

:func:`write_report` turns the ``study.json`` dictionary written by ``graft study``
(:mod:`graftkit.eval.study`; every key but name/recipe/tasks/models/scores may be missing) into

* ``OUT/report.html``: CSS inline, every plot a base64 PNG inside the page, no scripts and no
  external resources, so the file can be mailed or archived on its own;
* ``OUT/report.md`` with its plots as PNG files in ``OUT/report_files/``.

Sections, always in this order and always present (a section without data says why):
summary, the task x model score table, expert checks (is each expert significantly above the
majority class and the base on its own task; a flagged one is also named in a warning at the
top), normalized scores (merge score / the task's expert score, as in Yadav et al. 2023 and
Ilharco et al. 2023; "n/m", not meaningful, against a flagged expert, and left out of the
best-merge choice), task-vector cosine similarity and sign
conflicts (TIES' motivation, Yadav et al. 2023), prediction flips against the reference expert
(negative: the reference was right, the merge is wrong; Yan et al. 2021 "positive-congruent
training" call these negative flips), significance verdicts (paired bootstrap intervals),
forgetting (expert on the other tasks minus the base), the merge hyper-parameter search, failures,
the recipe and the environment. Lower-is-better metrics (perplexity, ECE, loss) are marked and
ranked accordingly; means are taken over the higher-is-better tasks only.

Plots use matplotlib's Agg canvas directly (no pyplot state, imported on first use, so
``import graftkit`` stays light), colorblind-safe palettes (Okabe-Ito, ColorBrewer RdBu/YlOrRd).
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SECTIONS = (
    ("summary", "Summary"),
    ("scores", "Scores"),
    ("experts", "Expert checks"),
    ("normalized", "Normalized scores"),
    ("similarity", "Task-vector similarity"),
    ("flips", "Prediction flips"),
    ("significance", "Significance"),
    ("forgetting", "Forgetting"),
    ("search", "Search trials"),
    ("failures", "Failures"),
    ("recipe", "Recipe"),
    ("environment", "Environment"),
)
LOWER_IS_BETTER = ("perplexity", "ppl", "ece", "loss", "nll", "error", "wer", "cer")
# Okabe & Ito (2008): distinguishable with every common form of color blindness
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#999999", "#F0E442", "#000000"]
NEGATIVE, POSITIVE = "#D55E00", "#0072B2"
DPI = 110
DASH = "—"


# -- values -------------------------------------------------------------------------------------
def _num(v: Any) -> float | None:
    """A finite float, or None for missing / null / NaN / Inf / non-numbers."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _fmt(v: Any, digits: int = 3) -> str:
    f = _num(v)
    if f is None:
        return DASH
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    a = abs(f)
    if a >= 1000:
        return f"{f:,.0f}"
    if a >= 100:
        return f"{f:.1f}"
    if a >= 10:
        return f"{f:.2f}"
    return f"{f:.{digits}f}"


def _signed(v: Any) -> str:
    f = _num(v)
    return DASH if f is None else f"{f:+.3f}"


def _duration(seconds: Any) -> str:
    s = _num(seconds)
    if s is None:
        return DASH
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(round(s % 60))} s"
    return f"{int(s // 3600)} h {int(round((s % 3600) / 60))} min"


def _pval(v: Any) -> str:
    """A hyper-parameter as written in a recipe (0.3, 1, 1e-05), not padded like a score."""
    if isinstance(v, float) and math.isfinite(v):
        return f"{v:.4g}"
    return DASH if v is None else str(v)


def _params(p: Any) -> str:
    if not isinstance(p, dict) or not p:
        return ""
    return ", ".join(f"{k}={_pval(v)}" for k, v in p.items())


def _lower_is_better(task: dict) -> bool:
    if "lower_is_better" in task:
        return bool(task["lower_is_better"])
    main = str(task.get("main") or "").lower()
    return task.get("kind") == "perplexity" or main in LOWER_IS_BETTER


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "x"


def _mix(color: str, t: float) -> str:
    """``color`` blended into white: t=0 white, t=1 the color (light shades keep text readable)."""
    t = max(0.0, min(1.0, t))
    rgb = [int(color[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(255 + (c - 255) * t):02x}" for c in rgb)


SHADE = "#3182bd"   # ColorBrewer Blues
SHADE_NEG = "#e6550d"  # ColorBrewer Oranges


# -- document model: blocks rendered to both HTML and Markdown -----------------------------------
@dataclass
class Cell:
    text: str
    bg: str | None = None
    bold: bool = False
    sub: str = ""          # a small second line (metric name, merge parameters)
    num: bool = False      # right-aligned, tabular digits
    title: str = ""
    cls: str = ""
    pre: bool = False      # keep line breaks (error messages)


@dataclass
class Table:
    header: list[Cell]
    rows: list[list[Cell] | str]   # a str is a group label spanning the row
    note: str = ""
    html_note: str = ""            # how the styling reads, per renderer (shading exists only in HTML)
    md_note: str = ""


@dataclass
class Para:
    text: str
    cls: str = ""


@dataclass
class Figure:
    name: str
    png: bytes
    alt: str
    caption: str = ""


@dataclass
class Pre:
    text: str


@dataclass
class Details:
    summary: str
    blocks: list


@dataclass
class Section:
    key: str
    title: str
    blocks: list = field(default_factory=list)


# -- study accessors -----------------------------------------------------------------------------
class _Study:
    def __init__(self, study: dict):
        self.raw = study if isinstance(study, dict) else {}
        s = self.raw
        self.name = str(s.get("name") or "study")
        self.tasks = [t for t in (s.get("tasks") or []) if isinstance(t, dict) and t.get("name")]
        self.scores = s.get("scores") or {}
        known = {t["name"] for t in self.tasks}
        for per in self.scores.values():  # tasks scored but not declared still get a column
            for t in (per or {}):
                if t not in known:
                    known.add(t)
                    self.tasks.append({"name": t})
        self.task_names = [t["name"] for t in self.tasks]
        self.task = {t["name"]: t for t in self.tasks}
        self.models = [m for m in (s.get("models") or []) if isinstance(m, dict) and m.get("name")]
        listed = {m["name"] for m in self.models}
        for name in self.scores:
            if name not in listed:
                self.models.append({"name": name, "kind": "base" if name == "base" else "other"})
        self.model = {m["name"]: m for m in self.models}
        self.failures = [f for f in (s.get("failures") or []) if isinstance(f, dict)]
        checks = s.get("expert_checks")
        self.checks = {str(k): v for k, v in checks.items() if isinstance(v, dict)} if isinstance(checks, dict) else {}
        self.flagged = [c for c in self.checks.values() if c.get("flagged")]
        unmeant = s.get("normalized_not_meaningful")
        self.unmeant = {m: v for m, v in unmeant.items() if isinstance(v, dict)} if isinstance(unmeant, dict) else {}

    def not_meaningful(self, merge: str, task: str) -> bool:
        """Is merge's normalized score on ``task`` against an expert that failed its checks?"""
        if task in self.unmeant.get(merge, {}):
            return True
        family = (self.model.get(merge) or {}).get("family")
        return bool(family) and bool((self.checks.get(f"{family}/{task}") or {}).get("flagged"))

    def meaningful_norm(self, merge: str) -> dict:
        """merge's normalized scores without the not-meaningful ones."""
        per = self.get("normalized").get(merge)
        return {t: v for t, v in per.items() if not self.not_meaningful(merge, t)} if isinstance(per, dict) else {}

    def unmeant_tasks(self, merge: str) -> list[str]:
        per = self.get("normalized").get(merge)
        listed = [t for t in per if self.not_meaningful(merge, t)] if isinstance(per, dict) else []
        return list(dict.fromkeys(listed + list(self.unmeant.get(merge, {}))))

    def warnings(self) -> list[str]:
        """One line per flagged expert: its failed checks, each naming the expert, its score, the
        majority or base score and the p-value or interval."""
        out = []
        for c in self.flagged:
            reasons = [str(r) for r in c.get("reasons") or [] if r]
            out.append("; ".join(reasons) or f"{c.get('expert', 'an expert')} is not significantly above the majority "
                                                f"class or the base on {c.get('task', 'its task')}")
        return out

    def of_kind(self, kind: str) -> list[dict]:
        return [m for m in self.models if m.get("kind") == kind]

    def families(self, kind: str) -> list[str]:
        default = "merges" if kind == "merge" else "experts"
        return list(dict.fromkeys(str(m.get("family") or default) for m in self.of_kind(kind)))

    def in_family(self, kind: str, family: str) -> list[dict]:
        default = "merges" if kind == "merge" else "experts"
        return [m for m in self.of_kind(kind) if str(m.get("family") or default) == family]

    def higher_tasks(self) -> list[str]:
        return [t for t in self.task_names if not _lower_is_better(self.task[t])]

    def get(self, key: str) -> dict:
        v = self.raw.get(key)
        return v if isinstance(v, dict) else {}

    def failed(self, *stages: str) -> list[dict]:
        return [f for f in self.failures if not stages or str(f.get("stage")) in stages]

    def label(self, m: dict) -> str:
        return str(m.get("method") or m["name"].split("/")[-1])


def _mean(values: list) -> float | None:
    vals = [v for v in (_num(x) for x in values) if v is not None]
    return sum(vals) / len(vals) if vals else None


def _because(st: _Study, stages: tuple[str, ...], default: str) -> str:
    fails = st.failed(*stages)
    if fails:
        return f"{default} ({len(fails)} failure(s) at {'/'.join(sorted({str(f.get('stage')) for f in fails}))}; see Failures)."
    return default + "."


# -- figures -------------------------------------------------------------------------------------
def chart_style():
    """The reports' matplotlib settings (fonts, sizes, no top/right spines), as a context manager."""
    import matplotlib

    return matplotlib.rc_context({
        "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9,
        "legend.fontsize": 9, "axes.spines.top": False, "axes.spines.right": False, "figure.dpi": DPI,
        "savefig.dpi": DPI, "font.family": "DejaVu Sans", "svg.fonttype": "none"})


def new_figure(w: float, h: float):
    """A matplotlib figure of ``w`` x ``h`` inches in the reports' style, drawn without a display
    (add axes with ``fig.add_subplot()``; turn it into PNG bytes with :func:`png_bytes`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(w, h), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white", metadata={"Software": None})
    return buf.getvalue()


def _normalized_chart(st: _Study, family: str, merges: list[dict], norm: dict) -> bytes:
    tasks = [t for t in st.task_names if any(_num((norm.get(m["name"]) or {}).get(t)) is not None
                                             or t in st.unmeant_tasks(m["name"]) for m in merges)]
    with chart_style():
        n_g, n_t = len(merges), max(1, len(tasks))
        width = 0.8 / n_t
        fig = new_figure(min(13.0, max(5.5, 1.4 + n_g * (0.32 * n_t + 0.45))), 3.8)
        ax = fig.add_subplot()
        top = 1.0
        for j, task in enumerate(tasks):
            xs, ys = [], []
            for i, m in enumerate(merges):
                v = _num((norm.get(m["name"]) or {}).get(task))
                x = i + (j - (n_t - 1) / 2) * width
                if v is None:
                    ax.text(x, 0.02, "n/m" if task in st.unmeant_tasks(m["name"]) else "n/a", rotation=90, ha="center",
                            va="bottom", fontsize=7, color="#666666")
                    continue
                xs.append(x)
                ys.append(v)
                top = max(top, v)
            label = task + (" (lower is better)" if _lower_is_better(st.task[task]) else "")
            if not ys:  # every merge n/m or n/a on it: no bar to explain
                label += " (n/m)" if any(task in st.unmeant_tasks(m["name"]) for m in merges) else " (n/a)"
            bars = ax.bar(xs, ys, width * 0.92, label=label, color=PALETTE[j % len(PALETTE)],
                          hatch="//" if j >= len(PALETTE) else None, edgecolor="white", linewidth=0.5)
            if n_g * n_t <= 40:
                ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=7, padding=1.5, rotation=90 if n_t > 3 else 0)
        ax.axhline(1.0, color="#333333", linestyle="--", linewidth=1, zorder=0)
        ax.text(1.0, 1.0, " expert\n level", transform=ax.get_yaxis_transform(), va="center", ha="left", fontsize=8,
                color="#333333", linespacing=1.0)
        ax.set_xticks(range(n_g), [st.label(m) for m in merges], rotation=20 if n_g > 5 else 0, ha="right" if n_g > 5 else "center")
        ax.set_ylim(0, max(1.15, top * 1.15))
        ax.set_xlim(-0.6, n_g - 0.4)
        ax.set_ylabel("merge score / expert score")
        ax.set_title(f"Normalized score per task, {family}")
        ax.grid(axis="y", color="#e5e5e5", linewidth=0.8)
        ax.set_axisbelow(True)
        fig.legend(title="task", loc="outside right upper", frameon=False)
        return png_bytes(fig)


def heatmap(ax, fig, matrix: list[list], labels: list[str], title: str, cmap: str, vmin: float, vmax: float,
             cbar_label: str, mask_diagonal: bool):
    import numpy as np
    from matplotlib.colors import Normalize

    data = np.array([[(_num(v) if _num(v) is not None else np.nan) for v in row] for row in matrix], dtype=float)
    shown = data.copy()
    if mask_diagonal:
        np.fill_diagonal(shown, np.nan)
    norm = Normalize(vmin, vmax)
    cm = __import__("matplotlib").colormaps[cmap].with_extremes(bad="#eeeeee")
    im = ax.imshow(np.ma.masked_invalid(shown), cmap=cm, norm=norm)
    n = len(labels)
    ax.set_xticks(range(n), labels, rotation=35 if n > 2 else 0, ha="right" if n > 2 else "center")
    ax.set_yticks(range(n), labels)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fs = 9 if n <= 6 else 7
    for i in range(n):
        for j in range(n):
            v = data[i, j]
            if np.isnan(v):
                text, color = "n/a", "#666666"
            elif np.isnan(shown[i, j]):
                text, color = f"{v:.2f}", "#888888"
            else:
                r, g, b, _ = cm(norm(v))
                text, color = f"{v:.2f}", "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.55 else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=fs, color=color)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, shrink=0.8, label=cbar_label)


def similarity_chart(family: str, sim: dict) -> bytes:
    """Task-vector cosine and sign-conflict heatmaps side by side (``sim`` as analysis/similarity.py returns it), as PNG bytes."""
    labels = [str(t) for t in sim.get("tasks") or []]
    n = len(labels)
    cos = sim.get("cosine") or [[None] * n for _ in range(n)]
    conf = sim.get("sign_conflict") or [[None] * n for _ in range(n)]
    off = [abs(_num(cos[i][j])) for i in range(n) for j in range(n) if i != j and _num(cos[i][j]) is not None]
    lim = max(0.1, math.ceil(max(off, default=0.1) * 10) / 10)
    conf_off = [_num(conf[i][j]) for i in range(n) for j in range(n) if i != j and _num(conf[i][j]) is not None]
    with chart_style():
        side = max(2.6, 0.62 * n + 1.4)
        fig = new_figure(2 * side + 1.6, side + 0.5)
        ax1, ax2 = fig.subplots(1, 2)
        heatmap(ax1, fig, cos, labels, "cosine of task vectors", "RdBu_r", -lim, lim, "cosine", True)
        heatmap(ax2, fig, conf, labels, "sign conflicts", "YlOrRd", 0.0, max(0.5, max(conf_off, default=0.5)),
                 "share of shared nonzero entries\nwith opposite signs", True)
        fig.suptitle(f"Task vectors, {family}", fontsize=11)
        return png_bytes(fig)


def _flips_chart(family: str, rows: list[tuple[str, int, int, int]]) -> bytes:
    with chart_style():
        fig = new_figure(7.5, max(2.2, 0.32 * len(rows) + 1.3))
        ax = fig.add_subplot()
        ys = list(range(len(rows)))[::-1]
        neg = [-r[1] for r in rows]
        pos = [r[2] for r in rows]
        ax.barh(ys, neg, color=NEGATIVE, label="negative (reference right, merge wrong)", height=0.7)
        ax.barh(ys, pos, color=POSITIVE, label="positive (reference wrong, merge right)", height=0.7)
        span = max([abs(v) for v in neg + pos] + [1])
        for y, a, b in zip(ys, neg, pos):
            ax.text(a - span * 0.02, y, str(-a), ha="right", va="center", fontsize=8)
            ax.text(b + span * 0.02, y, str(b), ha="left", va="center", fontsize=8)
        ax.axvline(0, color="#333333", linewidth=0.8)
        for k in range(1, len(rows)):  # a faint rule between merges
            if rows[k][0].split(" · ")[0] != rows[k - 1][0].split(" · ")[0]:
                ax.axhline(ys[k] + 0.5, color="#cccccc", linewidth=0.6)
        ax.set_ylim(-0.6, len(rows) - 0.4)
        ax.set_yticks(ys, [r[0] for r in rows])
        ax.set_xlim(-span * 1.25, span * 1.25)
        ax.xaxis.set_major_formatter(__import__("matplotlib.ticker", fromlist=["FuncFormatter"]).FuncFormatter(
            lambda v, _: f"{abs(int(v))}" if float(v).is_integer() else f"{abs(v):g}"))
        ax.set_xlabel("examples that changed their correctness")
        ax.set_title(f"Prediction flips against the task's expert, {family}")
        fig.legend(loc="outside lower center", ncol=2, frameon=False)
        ax.grid(axis="x", color="#e5e5e5", linewidth=0.8)
        ax.set_axisbelow(True)
        return png_bytes(fig)


# -- sections ------------------------------------------------------------------------------------
def _summary(st: _Study, sec: Section) -> None:
    experts, merges = st.of_kind("expert"), st.of_kind("merge")
    higher = st.higher_tasks()
    parts = [f"Study {st.name}: {len(st.task_names)} task(s) ({', '.join(st.task_names) or 'none'}), "
             f"{len(experts)} expert(s) and {len(merges)} merge(s)"]
    fams = st.families("merge")
    if fams:
        parts[-1] += f" in {len(fams)} famil{'y' if len(fams) == 1 else 'ies'} ({', '.join(fams)})"
    parts[-1] += "."
    best = []
    for fam in fams:
        # normalized scores against a flagged expert are not meaningful: they never pick the best merge
        scored = [(m, _mean([st.meaningful_norm(m["name"]).get(t) for t in higher])) for m in st.in_family("merge", fam)]
        scored = [(m, v) for m, v in scored if v is not None]
        left_out = sorted({t for m in st.in_family("merge", fam) for t in st.unmeant_tasks(m["name"])},
                          key=lambda t: st.task_names.index(t) if t in st.task_names else len(st.task_names))
        without = f", without {', '.join(left_out)} (n/m)" if left_out else ""
        if scored:
            m, v = max(scored, key=lambda x: x[1])
            best.append(f"{fam}: {m['name']} ({v:.3f}{without})")
        else:
            best.append(f"{fam}: no meaningful normalized scores" if left_out else f"{fam}: no normalized scores")
    if best:
        parts.append("Best merge per family by mean normalized score (1.0 = the experts' level): " + "; ".join(best) + ".")
    elif not merges:
        parts.append(_because(st, ("merge", "eval"), "No merges succeeded").rstrip("."))
        parts[-1] += "."
    timings = st.get("timings")
    total = _num(timings.get("total"))
    if total is None:
        total = sum(v for v in (_num(x) for x in timings.values()) if v is not None) or None
    if total is not None:
        stages = ", ".join(f"{k} {_duration(v)}" for k, v in timings.items() if k != "total" and _num(v) is not None)
        parts.append(f"Total time {_duration(total)}" + (f" ({stages})." if stages else "."))
    if st.failures:
        parts.append(f"{len(st.failures)} step(s) FAILED; see Failures.")
    sec.blocks.append(Para(" ".join(parts)))
    for line in st.warnings():
        sec.blocks.append(Para(f"Warning: {line}; normalized scores against it are not meaningful (n/m) and are left out "
                               "of the best-merge choice.", "alert"))


def _scores(st: _Study, sec: Section) -> None:
    if not st.scores or not st.task_names:
        sec.blocks.append(Para(_because(st, ("eval",), "No scores were recorded"), "missing"))
        return
    higher = st.higher_tasks()
    lower = [t for t in st.task_names if t not in higher]
    show_mean = bool(higher)
    groups: list[tuple[str, list[dict]]] = [("base", st.of_kind("base"))]
    groups += [(f"experts · {f}", st.in_family("expert", f)) for f in st.families("expert")]
    groups += [(f"merges · {f}", st.in_family("merge", f)) for f in st.families("merge")]
    kinds = {"base", "expert", "merge"}
    groups.append(("other", [m for m in st.models if m.get("kind") not in kinds]))
    groups = [(g, [m for m in ms if m["name"] in st.scores]) for g, ms in groups]
    groups = [(g, ms) for g, ms in groups if ms]
    ranked = [m for _, ms in groups for m in ms]
    stats = {}
    for t in st.task_names:
        vals = [v for v in (_num((st.scores.get(m["name"]) or {}).get(t)) for m in ranked) if v is not None]
        if vals:
            stats[t] = (min(vals), max(vals))

    def shade(t: str, v: float | None) -> tuple[str | None, bool]:
        if v is None or t not in stats:
            return None, False
        lo, hi = stats[t]
        lb = t in lower
        best = v == (lo if lb else hi)
        frac = 0.5 if hi == lo else (v - lo) / (hi - lo)
        return _mix(SHADE, 0.08 + 0.5 * ((1 - frac) if lb else frac)), best

    header = [Cell("model")] + [Cell(t + (" ↓" if t in lower else ""), sub=str(st.task[t].get("main") or ""),
                                     num=True, title="lower is better" if t in lower else "") for t in st.task_names]
    if show_mean:
        header.append(Cell("mean", num=True, sub="↑ tasks" if lower else ""))
    means = {m["name"]: _mean([(st.scores.get(m["name"]) or {}).get(t) for t in higher]) for m in ranked}
    mean_vals = [v for v in means.values() if v is not None]
    rows: list = []
    partial = False
    for label, ms in groups:
        if len(groups) > 1 or label != "base":
            rows.append(label)
        for m in ms:
            per = st.scores.get(m["name"]) or {}
            row = [Cell(m["name"], sub=_params(m.get("params")) if m.get("kind") == "merge" else "")]
            for t in st.task_names:
                v = _num(per.get(t))
                bg, best = shade(t, v)
                own = m.get("kind") == "expert" and m.get("task") == t
                row.append(Cell(_fmt(v), bg=bg, bold=best, num=True, cls="own" if own else "",
                                title="the expert's own task" if own else ""))
            if show_mean:
                mv = means[m["name"]]
                missing = any(_num(per.get(t)) is None for t in higher) and mv is not None
                partial |= missing
                bg = None
                if mv is not None:
                    lo, hi = min(mean_vals), max(mean_vals)
                    bg = _mix(SHADE, 0.08 + 0.5 * (0.5 if hi == lo else (mv - lo) / (hi - lo)))
                row.append(Cell(_fmt(mv) + ("*" if missing else ""), bg=bg, bold=mv is not None and mv == max(mean_vals), num=True))
            rows.append(row)
    majority = [_num(st.task[t].get("majority")) for t in st.task_names]
    if any(v is not None for v in majority):
        row = [Cell("majority class", cls="baseline")] + [Cell(_fmt(v), num=True, cls="baseline") for v in majority]
        if show_mean:
            row.append(Cell(DASH, num=True, cls="baseline"))
        rows.append("baseline")
        rows.append(row)
    notes = []
    own = any(m.get("kind") == "expert" and m.get("task") for m in ranked)
    html_note = ("Cells are shaded from worst (light) to best (dark) in each column; the best value per column is bold."
                 + (" An underlined cell is an expert on its own task." if own else ""))
    md_note = "The best value per column is bold." + (" An italic value is an expert on its own task." if own else "")
    if lower:
        which = ", ".join(f"{t}: {st.task[t].get('main') or st.task[t].get('kind') or 'metric'}" for t in lower)
        notes.append(f"↓ lower is better ({which}); the mean covers the higher-is-better tasks only.")
    if partial:
        notes.append("* mean over the tasks that have a score.")
    sec.blocks.append(Table(header, rows, " ".join(notes), html_note, md_note))


def _lr_cell(m: dict) -> Cell:
    lr = m.get("lr")
    trials = [t for t in m.get("search") or [] if isinstance(t, dict)]
    tried = [(t.get("params") or {}).get("lr") for t in trials]
    sub = ("chosen on validation from " + ", ".join(_pval(v) for v in tried)) if trials else ""
    return Cell(_pval(lr) if lr is not None else DASH, num=True, sub=sub)


def _expert_checks(st: _Study, sec: Section) -> None:
    experts = [m for m in st.of_kind("expert")]
    names = list(dict.fromkeys([m["name"] for m in experts] + list(st.checks)))
    if not st.checks:
        if any(m.get("lr") is not None for m in experts):
            sec.blocks.append(Table([Cell("expert"), Cell("learning rate", num=True)],
                                    [[Cell(m["name"]), _lr_cell(m)] for m in experts]))
        sec.blocks.append(Para(_because(st, ("train", "eval", "compare"), "No expert checks were recorded (they need each "
                                         "expert's test predictions and its task's majority class)"), "missing"))
        return
    level = next((_num(c.get("level")) for c in st.checks.values() if _num(c.get("level")) is not None), None)
    conf = next((_num((c.get("base") or {}).get("confidence")) for c in st.checks.values()
                 if _num((c.get("base") or {}).get("confidence")) is not None), None)
    sec.blocks.append(Para(
        "An expert that did not learn its own task makes every normalized score against it meaningless (a merge matching a "
        "majority-class expert scores 1.0). Each expert is tested on its own task's test split, one-sided at level "
        f"{_pval(level) if level is not None else '(1 - confidence) / 2'}: against the majority class by an exact binomial "
        "test of its correct count (p = P(Binomial(n, majority share) >= correct)), and against the base model (with this "
        "family's heads) by the paired bootstrap" + (f" ({100 * conf:g}% interval of expert minus base wholly above 0)" if conf else "")
        + ". A flagged expert's normalized scores are shown as n/m and left out of the best-merge choice."))
    header = [Cell("expert"), Cell("task"), Cell("learning rate", num=True), Cell("accuracy", num=True),
              Cell("majority class", num=True), Cell("binomial p", num=True), Cell("base", num=True),
              Cell("expert − base", num=True), Cell("interval", num=True), Cell("check")]
    rows = []
    for name in names:
        m = st.model.get(name) or {"name": name}
        c = st.checks.get(name) or {}
        maj, base = c.get("majority") or {}, c.get("base") or {}
        lo, hi = _num(base.get("low")), _num(base.get("high"))
        flagged = bool(c.get("flagged"))
        bad = _mix(NEGATIVE, 0.35)
        status = "not checked" if not c else ("FLAGGED: " + " and ".join(
            w for w, ok in (("not above the majority class", maj.get("above")), ("not above the base", base.get("above") if base else True))
            if ok is False) if flagged else "ok")
        rows.append([Cell(name), Cell(str(c.get("task") or m.get("task") or DASH)), _lr_cell(m),
                     Cell(_fmt(c.get("score")), num=True),
                     Cell(_fmt(maj.get("score")), num=True),
                     Cell(_pvalue(maj.get("p_value")), num=True, bg=bad if maj.get("above") is False else None),
                     Cell(_fmt(base.get("score")), num=True),
                     Cell(_signed(base.get("diff")), num=True),
                     Cell(f"[{_signed(lo)}, {_signed(hi)}]" if lo is not None and hi is not None else DASH, num=True,
                          bg=bad if base.get("above") is False else None),
                     Cell(status, bold=flagged, bg=bad if flagged else None, cls="" if c else "muted")])
    sec.blocks.append(Table(header, rows, "Learning rate: the one the expert was trained with; a searched one was chosen on the "
                            "validation split."))


def _pvalue(v: Any) -> str:
    f = _num(v)
    if f is None:
        return DASH
    return f"{f:.3f}" if f >= 0.001 else f"{f:.1e}"


def _normalized(st: _Study, sec: Section, figs: list) -> None:
    norm = st.get("normalized")
    merges = st.of_kind("merge")
    if not merges:
        sec.blocks.append(Para(_because(st, ("merge",), "No merges succeeded, so there is nothing to normalize"), "missing"))
        return
    if not any(norm.get(m["name"]) or st.unmeant_tasks(m["name"]) for m in merges):
        sec.blocks.append(Para(_because(st, ("train", "eval"), "No normalized scores were recorded (they need each task's "
                                        "expert score)"), "missing"))
        return
    sec.blocks.append(Para("Each merge's score divided by the score of the expert fine-tuned on that task: 1.0 means the "
                           "merge kept all of the expert's skill (Ilharco et al. 2023; Yadav et al. 2023 report the same ratio)."
                           + (" For a lower-is-better task a value above 1.0 is worse." if len(st.higher_tasks()) < len(st.task_names) else "")))
    for fam in st.families("merge"):
        ms = [m for m in st.in_family("merge", fam) if norm.get(m["name"]) or st.unmeant_tasks(m["name"])]
        if not ms:
            sec.blocks.append(Para(f"{fam}: no normalized scores.", "missing"))
            continue
        shown = {m["name"]: st.meaningful_norm(m["name"]) for m in ms}
        fig = Figure(f"normalized_{_slug(fam)}", _normalized_chart(st, fam, ms, shown),
                     f"Normalized score per task for the {fam} merges")
        figs.append(fig)
        sec.blocks.append(fig)
        sec.blocks.append(_normalized_table(st, ms, shown))


def _normalized_table(st: _Study, merges: list[dict], shown: dict) -> Table:
    tasks = [t for t in st.task_names if any(t in shown[m["name"]] or t in st.unmeant_tasks(m["name"]) for m in merges)]
    higher = [t for t in st.higher_tasks() if t in tasks]
    header = [Cell("merge")] + [Cell(t + (" ↓" if _lower_is_better(st.task[t]) else ""), num=True) for t in tasks]
    header.append(Cell("mean", num=True, sub="↑ tasks" if len(higher) < len(tasks) else ""))
    rows, unmeant, experts = [], False, []
    for m in merges:
        per, row = shown[m["name"]], [Cell(m["name"], sub=_params(m.get("params")))]
        for t in tasks:
            if t in st.unmeant_tasks(m["name"]):
                unmeant = True
                expert = (st.unmeant.get(m["name"], {}).get(t) or {}).get("expert") or f"{m.get('family')}/{t}"
                experts.append(expert)
                row.append(Cell("n/m †", num=True, cls="muted", title=f"not meaningful: {expert} failed its checks"))
            else:
                row.append(Cell(_fmt(per.get(t)), num=True))
        mean = _mean([per.get(t) for t in higher])
        partial = mean is not None and any(t in st.unmeant_tasks(m["name"]) for t in higher)
        row.append(Cell(_fmt(mean) + ("*" if partial else ""), num=True))
        rows.append(row)
    note = ""
    if unmeant:
        who = ", ".join(dict.fromkeys(experts))
        note = (f"† n/m: not meaningful - the task's expert ({who}) is not significantly above the majority class or the base "
                "on its own task (see Expert checks), so a ratio to its score says nothing about kept skill. "
                "* mean without the n/m tasks; the best-merge choice in the summary uses these means.")
    return Table(header, rows, note)


def _similarity(st: _Study, sec: Section, figs: list) -> None:
    sims = {k: v for k, v in st.get("similarity").items() if isinstance(v, dict) and v.get("tasks")}
    if not sims:
        sec.blocks.append(Para(_because(st, ("similarity", "train"), "No task-vector similarity was computed"), "missing"))
        return
    sec.blocks.append(Para("Cosine similarity of the task vectors tau_i = theta_i - theta_0 (left) and, among the parameters "
                           "both experts changed, the share changed in opposite directions (right). Opposite signs cancel in a "
                           "plain sum; TIES-Merging (Yadav et al. 2023) elects one sign per parameter to resolve them. Unrelated "
                           "(independent) task vectors give a cosine near 0 and about 0.5 sign conflicts."))
    for fam, sim in sims.items():
        norms = sim.get("norms") or []
        caption = ""
        if norms:
            caption = "Task-vector norms: " + ", ".join(f"{t} {_fmt(n)}" for t, n in zip(sim["tasks"], norms))
        fig = Figure(f"similarity_{_slug(fam)}", similarity_chart(fam, sim), f"Task-vector cosine and sign conflicts, {fam}", caption)
        figs.append(fig)
        sec.blocks.append(fig)


def _model_task_entries(table: dict) -> list[tuple[str, str, dict]]:
    """``(model, task, record)`` for every well-formed record of a ``{model: {task: {...}}}`` table."""
    return [(m, t, r) for m, per in table.items() if isinstance(per, dict) for t, r in per.items() if isinstance(r, dict)]


def _flips(st: _Study, sec: Section, figs: list) -> None:
    entries = _model_task_entries(st.get("flips"))
    if not entries:
        sec.blocks.append(Para(_because(st, ("merge", "eval"), "No prediction flips were recorded"), "missing"))
        return
    header = [Cell("merge"), Cell("task"), Cell("reference"), Cell("negative", num=True), Cell("positive", num=True),
              Cell("net", num=True), Cell("n", num=True), Cell("negative rate", num=True)]
    rows = []
    worst = max((_num(f.get("negative")) or 0) for _, _, f in entries) or 1
    for m, t, f in entries:
        neg, pos, n = _num(f.get("negative")), _num(f.get("positive")), _num(f.get("n"))
        net = None if neg is None or pos is None else int(pos - neg)
        rate = f"{100 * neg / n:.1f}%" if neg is not None and n else DASH
        rows.append([Cell(m), Cell(t), Cell(str(f.get("reference") or DASH)),
                     Cell(_fmt(int(neg)) if neg is not None else DASH, num=True, bg=_mix(SHADE_NEG, 0.5 * neg / worst) if neg else None),
                     Cell(_fmt(int(pos)) if pos is not None else DASH, num=True),
                     Cell(f"{net:+d}" if net is not None else DASH, num=True),
                     Cell(_fmt(int(n)) if n is not None else DASH, num=True), Cell(rate, num=True)])
    sec.blocks.append(Para("An example flips when the merge and the task's expert (the reference) disagree on whether it is "
                           "correct. Negative flips (the expert was right, the merge is wrong) are regressions a mean score can "
                           "hide (Yan et al. 2021, positive-congruent training)."))
    table = Table(header, rows)
    by_family: dict[str, list] = {}
    for m, t, f in entries:
        fam = str((st.model.get(m) or {}).get("family") or "merges")
        label = st.label(st.model[m]) if m in st.model else m
        by_family.setdefault(fam, []).append((f"{label} · {t}", int(_num(f.get("negative")) or 0), int(_num(f.get("positive")) or 0),
                                              int(_num(f.get("n")) or 0)))
    for fam, rows_f in by_family.items():
        fig = Figure(f"flips_{_slug(fam)}", _flips_chart(fam, rows_f), f"Negative and positive prediction flips, {fam}")
        figs.append(fig)
        sec.blocks.append(fig)
    sec.blocks.append(table)


VERDICT_COLORS = {"better": _mix(POSITIVE, 0.3), "worse": _mix(NEGATIVE, 0.35), "tie": "#eeeeee"}


def _verdict_bg(verdict: str) -> str | None:
    v = verdict.lower()
    for key in ("better", "worse", "tie"):
        if key in v:
            return VERDICT_COLORS[key]
    if v in ("win", "wins", "higher"):
        return VERDICT_COLORS["better"]
    if v in ("loss", "loses", "lower"):
        return VERDICT_COLORS["worse"]
    return None


def _significance(st: _Study, sec: Section) -> None:
    entries = _model_task_entries(st.get("significance"))
    if not entries:
        sec.blocks.append(Para(_because(st, ("merge", "eval"), "No significance tests were recorded"), "missing"))
        return
    header = [Cell("merge"), Cell("task"), Cell("against"), Cell("difference", num=True), Cell("interval", num=True),
              Cell("confidence", num=True), Cell("p", num=True), Cell("verdict")]
    rows = []
    for m, t, s in entries:
        conf = _num(s.get("confidence"))
        verdict = str(s.get("verdict") or DASH)
        lo, hi = _num(s.get("low")), _num(s.get("high"))
        rows.append([Cell(m), Cell(t), Cell(str(s.get("against") or DASH)), Cell(_signed(s.get("diff")), num=True),
                     Cell(f"[{_signed(lo)}, {_signed(hi)}]" if lo is not None and hi is not None else DASH, num=True),
                     Cell(f"{100 * conf:.0f}%" if conf is not None else DASH, num=True),
                     Cell(_pvalue(s.get("p_value")), num=True),
                     Cell(verdict, bg=_verdict_bg(verdict), bold=verdict.lower() not in ("tie", DASH))])
    sec.blocks.append(Para("Difference in the main metric (merge minus the model it is compared against) with its paired "
                           "bootstrap confidence interval and two-sided p-value: win when the whole interval is above 0 (the "
                           "merge is better), loss when it is below, tie when it contains 0."))
    sec.blocks.append(Table(header, rows))


def _forgetting(st: _Study, sec: Section) -> None:
    forg = st.get("forgetting")
    names = [m for m in forg if isinstance(forg.get(m), dict) and forg[m]]
    if not names:
        sec.blocks.append(Para(_because(st, ("train", "eval"), "No forgetting was measured; it needs the base model's and "
                                        "the experts' scores on every task"), "missing"))
        return
    vals = [abs(v) for m in names for v in (_num(x) for x in forg[m].values()) if v is not None]
    span = max(vals, default=0) or 1
    tasks = [t for t in st.task_names if any(t in forg[m] for m in names)] or sorted({t for m in names for t in forg[m]})
    header = [Cell("expert")] + [Cell(t + (" ↓" if _lower_is_better(st.task.get(t, {})) else ""), num=True) for t in tasks]
    rows = []
    for m in names:
        own = (st.model.get(m) or {}).get("task")
        row = [Cell(m)]
        for t in tasks:
            if t == own and t not in forg[m]:
                row.append(Cell("own task", cls="muted", num=True))
                continue
            v = _num(forg[m].get(t))
            good = v is not None and ((v < 0) if _lower_is_better(st.task.get(t, {})) else (v > 0))
            bg = None if v is None or v == 0 else _mix(POSITIVE if good else SHADE_NEG, 0.55 * abs(v) / span)
            row.append(Cell(_signed(v), bg=bg, num=True))
        rows.append(row)
    note = ("Each expert's score on the other tasks minus the base model's score there: negative (orange) means fine-tuning "
            "for its own task cost skill elsewhere (catastrophic forgetting); blue means it helped.")
    if any(_lower_is_better(st.task.get(t, {})) for t in tasks):
        note += " For ↓ tasks a positive difference is the worse one and is shaded orange."
    sec.blocks.append(Table(header, rows, note))


def _search(st: _Study, sec: Section) -> None:
    experts = [m for m in st.of_kind("expert") if m.get("search")]
    merges = [m for m in st.of_kind("merge") if m.get("search")]
    if not merges and not experts:
        why = "No merge ran a hyper-parameter search" if st.of_kind("merge") else "No merges succeeded"
        sec.blocks.append(Para(_because(st, ("merge", "search"), why), "missing"))
        return
    if experts:
        sec.blocks.append(Para("Each searched expert was trained once per learning rate and the one most accurate on its task's "
                               "validation split kept (★); the expert checks and all test scores use it."))
    if merges:
        sec.blocks.append(Para("Each merge's hyper-parameters were chosen on the validation split; the test scores above use "
                               "the chosen setting (★)."))
    elif st.of_kind("merge"):
        sec.blocks.append(Para("No merge ran a hyper-parameter search.", "missing"))
    for m in experts + merges:
        trials = [t for t in m["search"] if isinstance(t, dict)]
        keys = list(dict.fromkeys(k for t in trials for k in (t.get("params") or {})))
        chosen_params = m.get("params")
        marks = [bool(t.get("chosen")) or (chosen_params is not None and t.get("params") == chosen_params) for t in trials]
        if not any(marks):
            vals = [_num(t.get("validation")) for t in trials]
            if any(v is not None for v in vals):
                marks[max(range(len(vals)), key=lambda i: vals[i] if vals[i] is not None else -math.inf)] = True
        best_val = max((v for v in (_num(t.get("validation")) for t in trials) if v is not None), default=None)
        header = [Cell("#", num=True)] + [Cell(k, num=True) for k in keys] + [Cell("validation", num=True), Cell("")]
        rows = []
        for i, (t, chosen) in enumerate(zip(trials, marks)):
            p = t.get("params") or {}
            v = _num(t.get("validation"))
            rows.append([Cell(str(i + 1), num=True)] + [Cell(_pval(p[k]) if k in p else DASH, num=True) for k in keys]
                        + [Cell(_fmt(v), num=True, bold=chosen, bg=_mix(SHADE, 0.35) if chosen else None,
                                title="best validation" if v is not None and v == best_val else ""),
                           Cell("★ chosen" if chosen else "", bold=chosen)])
        chosen_trial = next((t for t, c in zip(trials, marks) if c), None)
        summary = f"{m['name']}: {len(trials)} trial(s)"
        if chosen_trial is not None:
            summary += f", chosen {_params(chosen_trial.get('params')) or 'defaults'} (validation {_fmt(chosen_trial.get('validation'))})"
        sec.blocks.append(Details(summary, [Table(header, rows)]))


def _failures(st: _Study, sec: Section) -> None:
    if not st.failures:
        sec.blocks.append(Para("Nothing failed: every stage of the study finished.", "ok"))
        return
    sec.blocks.append(Para(f"{len(st.failures)} step(s) failed; their results are missing from the sections above.", "alert"))
    header = [Cell("stage"), Cell("model"), Cell("error")]
    rows = [[Cell(str(f.get("stage") or DASH)), Cell(str(f.get("model") or DASH)),
             Cell(str(f.get("error") or "(no message)"), pre=True, cls="error")] for f in st.failures]
    sec.blocks.append(Table(header, rows))


def _recipe(st: _Study, sec: Section) -> None:
    recipe = st.raw.get("recipe")
    if not recipe:
        sec.blocks.append(Para("No recipe was recorded with this study.", "missing"))
        return
    import yaml

    try:
        text = recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)
    except yaml.YAMLError:
        text = json.dumps(recipe, indent=2, default=str)
    sec.blocks.append(Pre(text.rstrip()))


def _environment(st: _Study, sec: Section) -> None:
    env = st.get("environment")
    timings = st.get("timings")
    if not env and not timings:
        sec.blocks.append(Para("No environment or timings were recorded.", "missing"))
        return
    if env:
        sec.blocks.append(Table([Cell("item"), Cell("value")],
                                [[Cell(str(k)), Cell(v if isinstance(v, str) else json.dumps(v, default=str))] for k, v in env.items()]))
    if timings:
        sec.blocks.append(Table([Cell("stage"), Cell("time", num=True), Cell("seconds", num=True)],
                                [[Cell(str(k), bold=k == "total"), Cell(_duration(v), num=True, bold=k == "total"),
                                  Cell(_fmt(v, 1), num=True)] for k, v in timings.items()]))
    else:
        sec.blocks.append(Para("No timings were recorded.", "missing"))


def build_sections(study: dict) -> tuple[list[Section], list[Figure]]:
    """The report as renderer-neutral blocks, plus every figure (for the Markdown's PNG files)."""
    st = _Study(study)
    secs = {k: Section(k, t) for k, t in SECTIONS}
    figs: list[Figure] = []
    _summary(st, secs["summary"])
    _scores(st, secs["scores"])
    _expert_checks(st, secs["experts"])
    _normalized(st, secs["normalized"], figs)
    _similarity(st, secs["similarity"], figs)
    _flips(st, secs["flips"], figs)
    _significance(st, secs["significance"])
    _forgetting(st, secs["forgetting"])
    _search(st, secs["search"])
    _failures(st, secs["failures"])
    _recipe(st, secs["recipe"])
    _environment(st, secs["environment"])
    return list(secs.values()), figs


# -- HTML ----------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:#1f2328;
 margin:0;background:#fafafa;line-height:1.45}
main{max-width:1150px;margin:0 auto;padding:24px 28px 60px;background:#fff}
h1{font-size:1.7em;margin:.2em 0 .3em}h2{font-size:1.3em;margin-top:2em;border-bottom:1px solid #d0d7de;padding-bottom:.25em}
nav{font-size:.9em;margin:.6em 0 1.2em}nav a{margin-right:1em;color:#0969da;text-decoration:none}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #d0d7de;padding:4px 9px;vertical-align:top;text-align:left}
th{background:#f3f5f7;font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.group td{background:#eef1f4;font-weight:600;font-size:.85em;text-transform:uppercase;letter-spacing:.03em;color:#57606a}
td.own{text-decoration:underline;text-decoration-thickness:2px;text-underline-offset:3px}
td.baseline{color:#57606a;font-style:italic}td.muted{color:#8c959f}
.sub{display:block;font-size:.78em;font-weight:400;color:#57606a}
.note{font-size:.86em;color:#57606a;margin-top:-.3em}
.missing{color:#6e7781;font-style:italic}
.ok{color:#1a7f37}
.alert{background:#fff1f0;border:2px solid #cf222e;border-radius:6px;padding:.7em 1em;color:#82071e;font-weight:600}
td.error pre{margin:0;white-space:pre-wrap;word-break:break-word;font-size:.9em;color:#82071e}
pre.code{background:#f6f8fa;border:1px solid #d0d7de;border-radius:6px;padding:12px;overflow-x:auto;font-size:.86em}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eaeef2}
figcaption{font-size:.86em;color:#57606a}
details{margin:.6em 0}summary{cursor:pointer;font-weight:600}
.banner{margin:1em 0}
"""


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _html_cell(c: Cell, tag: str) -> str:
    cls = " ".join(x for x in ("num" if c.num else "", c.cls) if x)
    attrs = (f' class="{cls}"' if cls else "") + (f' style="background:{c.bg}"' if c.bg else "") + \
            (f' title="{_e(c.title)}"' if c.title else "")
    body = f"<pre>{_e(c.text)}</pre>" if c.pre else _e(c.text)
    if c.bold:
        body = f"<strong>{body}</strong>"
    if c.sub:
        body += f'<span class="sub">{_e(c.sub)}</span>'
    return f"<{tag}{attrs}>{body}</{tag}>"


def _html_block(b) -> str:
    if isinstance(b, Para):
        return f'<p class="{b.cls}">{_e(b.text)}</p>' if b.cls else f"<p>{_e(b.text)}</p>"
    if isinstance(b, Pre):
        return f'<pre class="code">{_e(b.text)}</pre>'
    if isinstance(b, Figure):
        data = base64.b64encode(b.png).decode("ascii")
        cap = f"<figcaption>{_e(b.caption)}</figcaption>" if b.caption else ""
        return f'<figure><img src="data:image/png;base64,{data}" alt="{_e(b.alt)}">{cap}</figure>'
    if isinstance(b, Details):
        return f"<details><summary>{_e(b.summary)}</summary>" + "".join(_html_block(x) for x in b.blocks) + "</details>"
    if isinstance(b, Table):
        n = len(b.header)
        out = ["<table><thead><tr>" + "".join(_html_cell(c, "th") for c in b.header) + "</tr></thead><tbody>"]
        for row in b.rows:
            if isinstance(row, str):
                out.append(f'<tr class="group"><td colspan="{n}">{_e(row)}</td></tr>')
            else:
                out.append("<tr>" + "".join(_html_cell(c, "td") for c in row) + "</tr>")
        out.append("</tbody></table>")
        note = " ".join(x for x in (b.html_note, b.note) if x)
        if note:
            out.append(f'<p class="note">{_e(note)}</p>')
        return "".join(out)
    raise TypeError(type(b))


def html_page(title: str, sections: list[Section], banner: str = "") -> str:
    """A self-contained HTML page: the title, a navigation bar over the sections, an optional
    banner (HTML) and every section's blocks; figures are embedded."""
    from .. import __version__

    nav = "".join(f'<a href="#{s.key}">{_e(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{s.key}"><h2>{_e(s.title)}</h2>' + "".join(_html_block(b) for b in s.blocks) + "</section>"
                   for s in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>{_e(title)}</h1><nav>{nav}</nav>{banner}{body}"
            f'<p class="note">Generated by graftkit {_e(__version__)}.</p></main></body></html>\n')


def render_html(sections: list[Section], study: dict) -> str:
    st = _Study(study)
    banner = ""
    if st.failures:
        banner = (f'<p class="alert banner">{len(st.failures)} step(s) of this study failed: '
                  f'{_e(", ".join(sorted({str(f.get("stage")) for f in st.failures})))}. '
                  f'<a href="#failures">See Failures</a>.</p>')
    if st.flagged:
        names = ", ".join(str(c.get("expert") or "?") for c in st.flagged)
        banner += (f'<p class="alert banner">{len(st.flagged)} expert(s) did not learn their own task: {_e(names)}; '
                   'normalized scores against them are not meaningful (n/m). '
                   '<a href="#experts">See Expert checks</a>.</p>')
    return html_page(f"graftkit study: {st.name}", sections, banner)


def _md_text(s: str) -> str:
    return str(s).replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")


def _md_cell(c: Cell) -> str:
    text = _md_text(c.text)
    if c.pre and text:  # a code span cannot hold a line break: mark it
        text = "`" + " ⏎ ".join(_md_text(x) for x in c.text.splitlines()).replace("`", "'") + "`"
    if c.cls == "own" and text:
        text = f"_{text}_"
    if c.bold and text:
        text = f"**{text}**"
    if c.sub:
        text += f" ({_md_text(c.sub)})"
    return text


def _md_block(b, files: str) -> str:
    if isinstance(b, Para):
        text = b.text
        if b.cls == "alert":
            return f"> **{text}**"
        return f"_{text}_" if b.cls == "missing" else text
    if isinstance(b, Pre):
        return "```yaml\n" + b.text + "\n```"
    if isinstance(b, Figure):
        out = f"![{b.alt}]({files}/{b.name}.png)"
        return out + (f"\n\n{b.caption}" if b.caption else "")
    if isinstance(b, Details):
        return f"**{b.summary}**\n\n" + "\n\n".join(_md_block(x, files) for x in b.blocks)
    if isinstance(b, Table):
        n = len(b.header)
        lines = ["| " + " | ".join(_md_cell(c) or " " for c in b.header) + " |",
                 "|" + "|".join("---:" if c.num else "---" for c in b.header) + "|"]
        for row in b.rows:
            cells = [f"**{_md_text(row)}**"] + [""] * (n - 1) if isinstance(row, str) else [_md_cell(c) for c in row]
            lines.append("| " + " | ".join(cells) + " |")
        note = " ".join(x for x in (b.md_note, b.note) if x)
        if note:
            lines.append("\n" + note)
        return "\n".join(lines)
    raise TypeError(type(b))


def markdown_page(title: str, sections: list[Section], banner: list[str] = (), files: str = "report_files") -> str:
    """The Markdown twin of :func:`html_page`; figures are linked from ``files/``."""
    from .. import __version__

    out = [f"# {title}", "", *banner]
    for s in sections:
        out += [f"## {s.title}", ""]
        for b in s.blocks:
            out += [_md_block(b, files), ""]
    out.append(f"_Generated by graftkit {__version__}._")
    return "\n".join(out) + "\n"


def render_markdown(sections: list[Section], study: dict, files: str = "report_files") -> str:
    st = _Study(study)
    banner = []
    if st.failures:
        banner += [f"> **{len(st.failures)} step(s) of this study failed** "
                   f"({', '.join(sorted({str(f.get('stage')) for f in st.failures}))}); see [Failures](#failures).", ""]
    if st.flagged:
        banner += [f"> **{len(st.flagged)} expert(s) did not learn their own task: "
                   f"{', '.join(str(c.get('expert') or '?') for c in st.flagged)}**; normalized scores against them are not "
                   "meaningful (n/m); see [Expert checks](#expert-checks).", ""]
    return markdown_page(f"graftkit study: {st.name}", sections, banner, files)


# -- writing -------------------------------------------------------------------------------------
def _write_text(path: Path, text: str) -> None:
    from ..outputs import write_text_atomic

    write_text_atomic(path, text)  # a killed run's .NAME.tmp-PID-* is removed by the next one


def write_report(study: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``out_dir/report.html`` (self-contained) and ``out_dir/report.md`` (+ ``report_files/*.png``).

    Returns ``(html_path, md_path)``. Every file is written to a temporary name and renamed into
    place, so an interrupted run never leaves a half report.
    """
    if not isinstance(study, dict):
        from ..errors import ConfigError

        raise ConfigError(f"write_report needs the study results as a dict (study.json), got {type(study).__name__}")
    sections, figs = build_sections(study)
    return _write_pages(out_dir, figs, render_html(sections, study), render_markdown(sections, study))


def _write_pages(out_dir: str | Path, figures: list[Figure], html: str, markdown: str) -> tuple[Path, Path]:
    from ..errors import FileFormatError
    from ..tensors import atomic_dir

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FileFormatError(f"cannot create {out}: {exc.strerror or exc}; choose a folder you can write to") from None
    with atomic_dir(out / "report_files", overwrite=True) as tmp:
        for fig in figures:
            (tmp / f"{fig.name}.png").write_bytes(fig.png)
    md_path, html_path = out / "report.md", out / "report.html"
    _write_text(md_path, markdown)
    _write_text(html_path, html)
    return html_path, md_path


def write_sections(title: str, sections: list[Section], figures: list[Figure], out_dir: str | Path) -> tuple[Path, Path]:
    """Any report built from these blocks (graft inspect, graft localize, ...): ``out_dir/report.html``
    (self-contained), ``out_dir/report.md`` and ``report_files/*.png``, each written to a temporary
    name and renamed into place. Returns ``(html_path, md_path)``."""
    return _write_pages(out_dir, figures, html_page(title, sections), markdown_page(title, sections))
