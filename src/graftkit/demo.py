"""``graft demo``: the end-to-end study on packaged data - tune, merge, evaluate, report.

It runs :mod:`graftkit.eval.study` with the recipe in ``eval/demo_study.yaml`` (``graft demo
--recipe`` prints it): the packaged MiniLM (all-MiniLM-L6-v2) is fine-tuned on four packaged
classification tasks (BBC News topics, Rotten Tomatoes sentiment, VADER tweets, VADER Amazon
snippets), once fully and once with LoRA; each family's four experts are merged with linear,
task_arithmetic, ties, dare_ties, breadcrumbs, pcb and consensus_ties (settings chosen on
validation splits); the base, every expert and every merge are evaluated on the test splits;
and the table plus ``report.html`` / ``report.md`` come out. Offline, on a CPU, in minutes.
``examples/study_full.yaml`` is the same study at full data size.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

RECIPE = Path(__file__).parent / "eval" / "demo_study.yaml"
FULL_SIZE = "graft study examples/study_full.yaml"


def demo_recipe() -> str:
    return RECIPE.read_text()


def run_demo(out: Path | None = None, overrides: dict | None = None, console=None) -> int:
    """Run the demo study into ``out`` (default: the recipe's ``out/demo``); 0 when every stage
    succeeded, 1 when something failed (the report says what)."""
    import yaml
    from rich.console import Console

    from .eval.study import run_study

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # per-tensor "Loading weights" bars would bury ours
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(os.cpu_count() or 1)
    console = console or Console(highlight=False, soft_wrap=True)
    recipe = yaml.safe_load(demo_recipe())
    recipe.update(overrides or {})
    start = time.perf_counter()
    console.print("[bold]graft demo[/bold]: tune MiniLM on four tasks (fully and with LoRA), merge the experts seven ways, "
                  "evaluate everything on held-out test splits, and write a report")
    result = run_study(recipe, out, console=console)
    report = result.get("report", {})
    console.print(f"report: [bold]{report.get('html', '(not written)')}[/bold] (and {report.get('md', '-')})")
    console.print(f"done in {time.perf_counter() - start:.0f} s. The full-size study (600 training examples per task, "
                  f"128-token inputs, about an hour on 2 CPU cores): {FULL_SIZE}")
    return 1 if result.get("failures") else 0
