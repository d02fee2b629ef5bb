"""The study report: every section renders (with data, with missing data, with failures), the HTML
is self-contained, the numbers in the tables are the study's, NaN and lower-is-better tasks work."""
from __future__ import annotations

import base64
import copy
import html
import math
import re
import subprocess
import sys

import pytest

from graftkit.eval.report import SECTIONS, build_sections, write_report

TASKS = ["bbc", "rotten", "amazon"]
FAMILIES = ["full", "lora"]
METHODS = ["linear", "task_arithmetic", "ties", "dare_ties"]


def make_study() -> dict:
    """A complete synthetic study.json (two families, three tasks, four merge methods)."""
    tasks = [{"name": "bbc", "kind": "classification", "main": "accuracy", "labels": ["business", "sport", "tech"],
              "n_train": 320, "n_validation": 80, "n_test": 200, "majority": 0.235},
             {"name": "rotten", "kind": "classification", "main": "accuracy", "labels": ["neg", "pos"],
              "n_train": 320, "n_validation": 80, "n_test": 200, "majority": 0.5},
             {"name": "amazon", "kind": "classification", "main": "accuracy", "labels": ["neg", "pos"],
              "n_train": 320, "n_validation": 80, "n_test": 200, "majority": 0.52}]
    models, scores, normalized, flips, sig, forgetting, similarity = [], {}, {}, {}, {}, {}, {}
    expert_acc = {"bbc": 0.955, "rotten": 0.81, "amazon": 0.875}
    for fi, fam in enumerate(FAMILIES):
        models.append({"name": f"{fam}/base", "kind": "base", "family": fam})
        scores[f"{fam}/base"] = {"bbc": 0.31, "rotten": 0.52, "amazon": 0.55}
        for ti, t in enumerate(TASKS):
            name = f"{fam}/{t}"
            models.append({"name": name, "kind": "expert", "family": fam, "task": t, "seconds": 41.0 + ti})
            scores[name] = {s: (expert_acc[s] - 0.02 * fi if s == t else 0.5 + 0.05 * ti) for s in TASKS}
            forgetting[name] = {s: scores[name][s] - scores[f"{fam}/base"][s] for s in TASKS if s != t}
        for mi, m in enumerate(METHODS):
            name = f"{fam}/{m}"
            params = {"weight": 1.0} if m == "linear" else {"density": 0.2 + 0.1 * mi, "lambda": 1.0}
            search = [] if m == "linear" else [
                {"params": {"density": d, "lambda": 1.0}, "validation": 0.7 + 0.05 * j,
                 "chosen": abs(d - params["density"]) < 1e-9} for j, d in enumerate([0.2 + 0.1 * mi - 0.1, 0.2 + 0.1 * mi])]
            models.append({"name": name, "kind": "merge", "family": fam, "method": m, "params": params, "search": search})
            scores[name] = {t: round(expert_acc[t] * (0.7 + 0.06 * mi) - 0.01 * fi, 4) for t in TASKS}
            normalized[name] = {t: scores[name][t] / scores[f"{fam}/{t}"][t] for t in TASKS}
            flips[name] = {t: {"reference": f"{fam}/{t}", "negative": 20 - 4 * mi, "positive": 3 + mi, "n": 200} for t in TASKS}
            sig[name] = {t: {"against": f"{fam}/task_arithmetic", "diff": 0.02 * (mi - 1), "low": 0.02 * (mi - 1) - 0.03,
                             "high": 0.02 * (mi - 1) + 0.03, "verdict": ["worse", "tie", "tie", "better"][mi], "confidence": 0.95}
                        for t in TASKS}
        similarity[fam] = {"tasks": TASKS, "cosine": [[1.0, 0.12, 0.31], [0.12, 1.0, 0.64], [0.31, 0.64, 1.0]],
                           "sign_conflict": [[0.0, 0.47, 0.41], [0.47, 0.0, 0.28], [0.41, 0.28, 0.0]], "norms": [3.2, 2.9, 3.1]}
    return {"name": "demo", "recipe": {"name": "demo", "base": "minilm", "tasks": [{"name": t, "corpus": t} for t in TASKS],
                                       "merges": [{"method": m} for m in METHODS]},
            "tasks": tasks, "models": models, "scores": scores, "normalized": normalized, "flips": flips,
            "significance": sig, "forgetting": forgetting, "similarity": similarity,
            "failures": [], "timings": {"data": 1.2, "train": 120.0, "merge": 30.0, "eval": 200.0, "total": 360.0},
            "environment": {"graftkit": "0.1.0", "torch": "2.5.1", "machine": "x86_64, 2 cores"}}


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
    assert "★ chosen" in text and "[+0.010, +0.070]" in text and "better" in text
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
