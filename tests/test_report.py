"""The study report: every section renders (with data, with missing data, with failures), the HTML
is self-contained, the numbers in the tables are the study's, NaN and lower-is-better tasks work."""
from __future__ import annotations

import base64
import copy
import functools
import html
import json
import math
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from graftkit.eval.report import (SECTIONS, Section, _expert_checks, _search, _Study, _summary, build_sections, render_html,
                                  render_markdown, write_report)

TASKS = ["bbc", "rotten", "amazon"]
FAMILIES = ["full", "lora"]
METHODS = ["linear", "task_arithmetic", "ties", "dare_ties"]
LABELS = {"bbc": ["business", "entertainment", "politics", "sport", "tech"], "rotten": ["neg", "pos"], "amazon": ["neg", "pos"]}
MAJORITY = {"bbc": 47, "rotten": 100, "amazon": 104}  # examples of the most frequent label, of 200
N = 200


def _references(task: str) -> list[str]:
    """200 test labels of ``task``: the first label MAJORITY times, the rest spread over the others."""
    labels = LABELS[task]
    refs = [labels[0]] * MAJORITY[task]
    rest = labels[1:]
    refs += [rest[i % len(rest)] for i in range(N - MAJORITY[task])]
    random.Random(task).shuffle(refs)
    return refs


def _rows(task: str, correct: list[bool]) -> list[dict]:
    """A classification predictions file as graft eval writes it: right where ``correct``, else another label."""
    refs = _references(task)
    labels = LABELS[task]
    return [{"id": i, "prediction": r if ok else labels[(labels.index(r) + 1) % len(labels)], "reference": r, "score": float(ok)}
            for i, (r, ok) in enumerate(zip(refs, correct))]


def _first(task: str, k: int) -> list[bool]:
    """Right on the first ``k`` examples of one fixed order per task: models' right sets are nested, so
    a model with more right examples wins the paired bootstrap and one with fewer loses."""
    order = list(range(N))
    random.Random(f"order-{task}").shuffle(order)
    right = set(order[:k])
    return [i in right for i in range(N)]


def _write_eval(folder, name: str, per_task: dict[str, list[bool]]) -> dict[str, float]:
    from graftkit.eval.config import ModelSpec
    from graftkit.eval.runner import write_model_dir

    results = {}
    for t, correct in per_task.items():
        rows = _rows(t, correct)
        results[t] = {"kind": "classification", "n": N, "main": "accuracy", "higher_is_better": True,
                      "metrics": {"accuracy": sum(r["score"] for r in rows) / N}, "labels": LABELS[t], "rows": rows,
                      "predictions": f"predictions/{t}.jsonl"}
    write_model_dir(folder / name, ModelSpec(name=name.replace("/", "-"), path="unused"), results)
    return {t: r["metrics"]["accuracy"] for t, r in results.items()}


def build_study(root, expert_override: dict[str, list[bool]] | None = None) -> dict:
    """A study.json made the way graft study makes it: per-example predictions of every model written
    by graft eval's writer, then the study's own comparison stage (compare_study: the expert checks,
    normalized scores, flips, bootstrap significance and forgetting of graftkit.eval.compare) over
    them. ``expert_override``: per-example correctness of chosen experts on their own task."""
    from graftkit.eval.study import EvaluationSettings, compare_study

    tasks = [{"name": t, "kind": "classification", "main": "accuracy", "labels": LABELS[t], "n_train": 320,
              "n_validation": 80, "n_test": N, "majority": MAJORITY[t] / N} for t in TASKS]
    expert_right = {"bbc": 191, "rotten": 162, "amazon": 175}  # 0.955, 0.81, 0.875
    models, scores = [], {}
    for fi, fam in enumerate(FAMILIES):
        models.append({"name": f"{fam}/base", "kind": "base", "family": fam})
        scores[f"{fam}/base"] = _write_eval(root, f"{fam}/base", {"bbc": _first("bbc", 62), "rotten": _first("rotten", 104),
                                                                   "amazon": _first("amazon", 110)})
        for ti, t in enumerate(TASKS):
            name = f"{fam}/{t}"
            models.append({"name": name, "kind": "expert", "family": fam, "task": t, "seconds": 41.0 + ti, "lr": 1e-4})
            per = {s: _first(s, expert_right[s] - 4 * fi if s == t else 100 + 10 * ti) for s in TASKS}
            if expert_override and name in expert_override:
                per[t] = expert_override[name]
            scores[name] = _write_eval(root, name, per)
        for mi, m in enumerate(METHODS):
            name = f"{fam}/{m}"
            params = {"weight": 1.0} if m == "linear" else {"density": 0.2 + 0.1 * mi, "lambda": 1.0}
            search = [] if m == "linear" else [
                {"params": {"density": d, "lambda": 1.0}, "validation": 0.7 + 0.05 * j,
                 "chosen": abs(d - params["density"]) < 1e-9} for j, d in enumerate([0.2 + 0.1 * mi - 0.1, 0.2 + 0.1 * mi])]
            models.append({"name": name, "kind": "merge", "family": fam, "method": m, "params": params, "search": search})
            scores[name] = _write_eval(root, name, {t: _first(t, round(expert_right[t] * (0.7 + 0.06 * mi)) - 2 * fi)
                                                     for t in TASKS})
    study = {"name": "demo", "recipe": {"name": "demo", "base": "minilm", "tasks": [{"name": t, "corpus": t} for t in TASKS],
                                        "merges": [{"method": m} for m in METHODS]},
             "tasks": tasks, "models": models, "scores": scores, "similarity": {}, "failures": [],
             "timings": {"data": 1.2, "train": 120.0, "merge": 30.0, "eval": 200.0, "total": 360.0},
             "environment": {"graftkit": "0.1.0", "torch": "2.5.1", "machine": "x86_64, 2 cores"}}
    compare_study(study, root, {f: list(TASKS) for f in FAMILIES}, {f: list(METHODS) for f in FAMILIES},
                  EvaluationSettings(resamples=200), seed=0)
    for fam in FAMILIES:
        study["similarity"][fam] = {"tasks": TASKS, "cosine": [[1.0, 0.12, 0.31], [0.12, 1.0, 0.64], [0.31, 0.64, 1.0]],
                                    "sign_conflict": [[0.0, 0.47, 0.41], [0.47, 0.0, 0.28], [0.41, 0.28, 0.0]],
                                    "norms": [3.2, 2.9, 3.1]}
    return study


@functools.lru_cache(maxsize=None)
def _built(flag_rotten: bool) -> str:
    override = None
    if flag_rotten:  # full/rotten never left the majority class: it predicts "neg" for every example
        override = {"full/rotten": [r == "neg" for r in _references("rotten")]}
    with tempfile.TemporaryDirectory() as root:
        return json.dumps(build_study(Path(root), override))


def make_study(flag_rotten: bool = False) -> dict:
    """A complete study.json (two families, three tasks, four merge methods), its comparisons computed
    by the real comparison code; a fresh copy each call."""
    return json.loads(_built(flag_rotten))


def _sections(text: str) -> list[str]:
    return re.findall(r"<h2>(.*?)</h2>", text)


def _text(page: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", page))


def test_full_study_renders_every_section(tmp_path):
    study = make_study()
    html_path, md_path = write_report(study, tmp_path / "out")
    assert html_path == tmp_path / "out" / "report.html" and md_path == tmp_path / "out" / "report.md"
    page, md = html_path.read_text(), md_path.read_text()
    assert _sections(page) == [t for _, t in SECTIONS]
    for _, title in SECTIONS:
        assert f"## {title}" in md
    # self-contained: plots inline, no external resources, no scripts
    imgs = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(imgs) == 2 + 2 + 2  # normalized, similarity, flips: one per family
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in imgs)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert "url(" not in page and "<script" not in page and "<link" not in page
    # Markdown: every referenced PNG exists
    refs = re.findall(r"!\[[^\]]*\]\((report_files/[^)]+\.png)\)", md)
    assert len(refs) == 6 and all((tmp_path / "out" / r).is_file() for r in refs)
    assert sorted(p.name for p in (tmp_path / "out" / "report_files").iterdir()) == sorted(r.split("/")[1] for r in refs)
    # the numbers are the study's
    text = _text(page)
    assert "0.955" in text and "0.875" in text and "0.235" in text  # expert scores, majority baseline
    assert "full/ties" in text and "density=0.4, lambda=1" in text
    assert "Nothing failed" in text
    assert "Best merge per family by mean normalized score" in text
    assert "full: full/dare_ties" in text and "lora: lora/dare_ties" in text
    assert "6 min 0 s" in text  # total time
    sig = study["significance"]["full/dare_ties"]["bbc"]
    assert "★ chosen" in text and f"[{sig['low']:+.3f}, {sig['high']:+.3f}]" in text and sig["verdict"] == "win"
    assert "expert(s) did not learn" not in text and "Warning:" not in text and "n/m †" not in text
    assert "rotten" in md and "| full/dare_ties" in md


def test_best_value_is_bold_and_table_cells_match(tmp_path):
    study = make_study()
    sections, _ = build_sections(study)
    table = next(b for b in sections[1].blocks if hasattr(b, "header"))
    header = [c.text for c in table.header]
    assert header == ["model", "bbc", "rotten", "amazon", "mean"]
    rows = {r[0].text: r for r in table.rows if not isinstance(r, str)}
    assert rows["full/bbc"][1].text == "0.955" and rows["full/bbc"][1].bold
    assert rows["full/bbc"][1].cls == "own" and rows["full/bbc"][2].cls == ""
    assert not rows["lora/bbc"][1].bold  # 0.935 < 0.955
    want_mean = sum(study["scores"]["full/ties"].values()) / 3
    assert rows["full/ties"][4].text == f"{want_mean:.3f}"
    assert rows["majority class"][1].text == "0.235"
    groups = [r for r in table.rows if isinstance(r, str)]
    assert groups == ["base", "experts · full", "experts · lora", "merges · full", "merges · lora", "baseline"]
    page = write_report(study, tmp_path)[0].read_text()
    assert "<strong>0.955</strong>" in page


def test_failures_and_missing_sections(tmp_path):
    study = {"name": "broken", "recipe": {"name": "broken"}, "tasks": [{"name": "bbc", "main": "accuracy", "majority": 0.2}],
             "models": [{"name": "full/base", "kind": "base"}, {"name": "full/bbc", "kind": "expert", "family": "full", "task": "bbc"}],
             "scores": {"full/base": {"bbc": 0.2}, "full/bbc": {"bbc": 0.9}},
             "failures": [{"stage": "merge", "model": "full/ties", "error": "MergeError: shape mismatch at classifier.weight <b>"},
                          {"stage": "train", "model": "lora/bbc", "error": "Traceback line 1\nline 2"}]}
    html_path, md_path = write_report(study, tmp_path)
    page, md = html_path.read_text(), md_path.read_text()
    assert _sections(page) == [t for _, t in SECTIONS]
    text = _text(page)
    assert "2 step(s) of this study failed" in text  # the banner at the top
    assert page.index('class="alert banner"') < page.index('id="summary"')
    assert "shape mismatch at classifier.weight <b>" in text and "&lt;b&gt;" in page  # escaped, shown
    assert "No merges succeeded, so there is nothing to normalize (1 failure(s) at merge; see Failures)." in text
    assert "No task-vector similarity was computed" in text
    assert "No prediction flips were recorded" in text
    assert "No significance tests were recorded" in text
    assert "No forgetting was measured" in text
    assert "No merges succeeded" in text.split("Search trials")[1]
    assert "No environment or timings were recorded" in text
    assert "No expert checks were recorded" in text
    assert "<img" not in page
    assert "> **2 step(s) of this study failed**" in md and "`Traceback line 1 ⏎ line 2`" in md
    assert list((tmp_path / "report_files").iterdir()) == []


def test_minimal_and_empty_studies(tmp_path):
    for study in ({"name": "x", "recipe": {}, "tasks": [], "models": [], "scores": {}}, {}):
        page = write_report(study, tmp_path / "o", )[0].read_text()
        text = _text(page)
        assert _sections(page) == [t for _, t in SECTIONS]
        assert "No scores were recorded." in text and "No recipe was recorded" in text
    with pytest.raises(Exception, match="needs the study results as a dict"):
        write_report(["not", "a", "dict"], tmp_path / "p")


def test_nan_none_and_lower_is_better(tmp_path):
    study = make_study()
    study["tasks"].append({"name": "wiki", "kind": "perplexity", "main": "perplexity"})
    for name, per in study["scores"].items():
        per["wiki"] = 20.0 if name.endswith("/ties") else 25.5
    study["scores"]["full/ties"]["wiki"] = 18.25
    study["scores"]["lora/ties"]["bbc"] = float("nan")
    study["scores"]["lora/linear"]["rotten"] = None
    study["normalized"]["full/ties"]["bbc"] = float("nan")
    study["similarity"]["lora"]["cosine"][0][1] = float("nan")
    study["flips"]["full/ties"]["bbc"]["negative"] = None
    study["significance"]["full/ties"]["bbc"]["low"] = float("nan")
    study["forgetting"]["full/bbc"]["rotten"] = float("nan")
    study["timings"]["merge"] = float("nan")
    sections, figs = build_sections(study)
    table = next(b for b in sections[1].blocks if hasattr(b, "header"))
    assert [c.text for c in table.header][-2:] == ["wiki ↓", "mean"]
    rows = {r[0].text: r for r in table.rows if not isinstance(r, str)}
    wiki = [c.text for c in table.header].index("wiki ↓")
    assert rows["full/ties"][wiki].text == "18.25" and rows["full/ties"][wiki].bold  # lowest is best
    assert not rows["lora/ties"][wiki].bold
    assert rows["lora/ties"][1].text == "—"
    # the mean ignores the lower-is-better task and marks a partial mean
    assert rows["lora/ties"][-1].text.endswith("*")
    want = (study["scores"]["lora/ties"]["rotten"] + study["scores"]["lora/ties"]["amazon"]) / 2
    assert rows["lora/ties"][-1].text == f"{want:.3f}*"
    assert "lower is better" in table.note and "wiki: perplexity" in table.note and "shaded" in table.html_note
    page = write_report(study, tmp_path)[0].read_text()
    assert "NaN" not in _text(page) and "nan" not in _text(page).split()
    assert len(figs) == 6


def test_search_without_chosen_flag_marks_matching_params(tmp_path):
    study = make_study()
    for m in study["models"]:
        for t in m.get("search") or []:
            t.pop("chosen")
    sections, _ = build_sections(study)
    search = dict(SECTIONS)["search"]
    sec = next(s for s in sections if s.title == search)
    details = [b for b in sec.blocks if hasattr(b, "summary")]
    assert len(details) == 2 * 3  # linear has no search
    first = details[0]
    assert first.summary.startswith("full/task_arithmetic: 2 trial(s), chosen density=0.3, lambda=1")
    rows = first.blocks[0].rows
    assert [r[-1].text for r in rows] == ["", "★ chosen"]


def test_overwrites_and_leaves_no_temporary_files(tmp_path):
    write_report(make_study(), tmp_path)
    study = make_study()
    study["similarity"] = {}
    write_report(study, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["report.html", "report.md", "report_files"]
    assert not any(p.name.startswith("similarity") for p in (tmp_path / "report_files").iterdir())


def test_import_stays_light():
    code = "import sys, graftkit.eval.report; print('matplotlib' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_does_not_mutate_the_study(tmp_path):
    study = make_study()
    before = copy.deepcopy(study)
    write_report(study, tmp_path)
    assert study == before
    assert not math.isnan(study["scores"]["full/ties"]["bbc"])


def _table(sections, key: str, first_header: str):
    sec = next(x for x in sections if x.key == key)
    return next(b for b in sec.blocks if hasattr(b, "header") and b.header[0].text == first_header)


def test_report_renders_what_compare_writes():
    """The significance and flips tables show the verdicts, intervals, p-values and counts exactly as
    the comparison code wrote them (win / loss / tie, not a vocabulary of the report's own)."""
    from graftkit.eval.report import VERDICT_COLORS

    study = make_study()
    sections, _ = build_sections(study)
    table = _table(sections, "significance", "merge")
    header = [c.text for c in table.header]
    rows = {(r[0].text, r[1].text): dict(zip(header, r)) for r in table.rows}
    verdicts = set()
    for m, per in study["significance"].items():
        for t, sig in per.items():
            row = rows[(m, t)]
            verdicts.add(sig["verdict"])
            assert row["verdict"].text == sig["verdict"]
            assert row["interval"].text == f"[{sig['low']:+.3f}, {sig['high']:+.3f}]"
            assert row["difference"].text == f"{sig['diff']:+.3f}" and row["against"].text == sig["against"]
            assert row["p"].text == f"{sig['p_value']:.3f}"
            want = {"win": VERDICT_COLORS["better"], "loss": VERDICT_COLORS["worse"], "tie": VERDICT_COLORS["tie"]}
            assert row["verdict"].bg == want[sig["verdict"]]
    assert {"win", "loss"} <= verdicts  # the fixture exercises both colored verdicts
    flips = _table(sections, "flips", "merge")
    frows = {(r[0].text, r[1].text): r for r in flips.rows}
    for m, per in study["flips"].items():
        for t, f in per.items():
            r = frows[(m, t)]
            assert [r[3].text, r[4].text, r[6].text] == [str(f["negative"]), str(f["positive"]), str(f["n"])]
    checks = _table(sections, "experts", "expert")
    assert [r[-1].text for r in checks.rows] == ["ok"] * 6


def test_flagged_expert_is_warned_about_and_its_normalized_scores_are_not_meaningful():
    study = make_study(flag_rotten=True)
    check = study["expert_checks"]["full/rotten"]
    assert check["flagged"] and not study["expert_checks"]["lora/rotten"]["flagged"]
    sections, _ = build_sections(study)
    page, md = render_html(sections, study), render_markdown(sections, study)
    text = _text(page)
    # a banner at the top and one warning line naming the expert, its score, the majority / base and p / interval
    assert "1 expert(s) did not learn their own task: full/rotten" in text
    assert page.index("did not learn their own task") < page.index('id="summary"')
    base = check["base"]
    for doc in (text, md):
        line = next(x for x in doc.splitlines() if "Warning: full/rotten" in x)
        assert "accuracy 0.500 vs majority class 0.500" in line and f"p = {check['majority']['p_value']:.3g}" in line
        assert f"vs {base['score']:.3f}" in line and f"[{base['low']:+.3f}, {base['high']:+.3f}]" in line
        assert "not meaningful" in line
    assert "> **1 expert(s) did not learn their own task: full/rotten**" in md
    checks = _table(sections, "experts", "expert")
    status = {r[0].text: r[-1].text for r in checks.rows}
    assert status["full/rotten"].startswith("FLAGGED: not above the majority class and not above the base")
    assert status["lora/rotten"] == "ok"
    # n/m cells for the full merges on rotten (never a number), numbers for lora; the footnote says why
    norm = next(x for x in sections if x.key == "normalized")
    tables = [b for b in norm.blocks if hasattr(b, "header")]
    assert len(tables) == 2
    for fam, table in zip(FAMILIES, tables):
        col = [c.text for c in table.header].index("rotten")
        cells = [r[col].text for r in table.rows]
        if fam == "full":
            assert cells == ["n/m †"] * len(METHODS) and "full/rotten" in table.note
            assert all(r[-1].text.endswith("*") for r in table.rows)
        else:
            assert "n/m" not in " ".join(cells) and not table.note
    assert "full: full/dare_ties" in text and "without rotten (n/m)" in text


def test_best_merge_ignores_not_meaningful_normalized_scores():
    """A normalized score against a flagged expert never picks the best merge, even where a study.json
    still lists it under normalized (as an older one would)."""
    def best(study) -> tuple[str, str]:
        sec = Section("summary", "Summary")
        _summary(_Study(study), sec)  # the summary alone: no figures to draw
        return re.search(r"full: (full/\w+) \(([0-9.]+)", sec.blocks[0].text).groups()

    control = make_study()
    control["normalized"]["full/linear"]["rotten"] = 9.0  # the inflation a majority-class expert causes
    assert best(control)[0] == "full/linear"  # so the test below would see it if counted
    study = make_study(flag_rotten=True)
    assert "rotten" not in study["normalized"]["full/linear"]
    assert study["normalized_not_meaningful"]["full/linear"]["rotten"]["expert"] == "full/rotten"
    study["normalized"]["full/linear"]["rotten"] = 9.0
    name, value = best(study)
    assert name == "full/dare_ties"
    want = (study["normalized"]["full/dare_ties"]["bbc"] + study["normalized"]["full/dare_ties"]["amazon"]) / 2
    assert value == f"{want:.3f}"


def test_searched_learning_rate_is_shown_per_expert():
    study = make_study()
    expert = next(m for m in study["models"] if m["name"] == "full/bbc")
    expert["lr"] = 3e-4
    expert["search"] = [{"params": {"lr": 1e-4}, "validation": 0.7, "chosen": False},
                        {"params": {"lr": 3e-4}, "validation": 0.8, "chosen": True}]
    st = _Study(study)
    sections = [Section("experts", "Expert checks"), Section("search", "Search trials")]
    _expert_checks(st, sections[0])  # these two sections alone: no figures to draw
    _search(st, sections[1])
    checks = _table(sections, "experts", "expert")
    row = next(r for r in checks.rows if r[0].text == "full/bbc")
    assert row[2].text == "0.0003" and row[2].sub == "chosen on validation from 0.0001, 0.0003"
    search = next(x for x in sections if x.key == "search")
    details = [b for b in search.blocks if hasattr(b, "summary")]
    assert details[0].summary.startswith("full/bbc: 2 trial(s), chosen lr=0.0003 (validation 0.800)")


def test_write_sections_writes_any_report(tmp_path):
    """The generic writer behind graft inspect / localize: every section and table cell in both
    files, every figure as a PNG the Markdown links to and the HTML embeds."""
    from graftkit.eval.report import Cell, Figure, Para, Section, Table, new_figure, png_bytes, write_sections

    fig = new_figure(3, 2)
    fig.add_subplot().plot([0, 1], [1, 0])
    figure = Figure("spectrum", png_bytes(fig), "the spectrum")
    sections = [Section("stats", "Delta statistics", [Para("per layer"), Table([Cell("layer"), Cell("norm")], [[Cell("0"), Cell("1.25")]])]),
                Section("plots", "Spectra", [figure])]
    html, md = write_sections("graftkit inspect: demo", sections, [figure], tmp_path / "r")
    h, m = html.read_text(), md.read_text()
    for text in ("graftkit inspect: demo", "Delta statistics", "Spectra", "1.25", "per layer"):
        assert text in h and text in m, text
    assert (tmp_path / "r" / "report_files" / "spectrum.png").read_bytes()[:4] == b"\x89PNG"
    assert "report_files/spectrum.png" in m and "data:image/png;base64," in h
