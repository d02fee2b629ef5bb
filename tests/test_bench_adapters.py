"""bench/adapters.py's soft-prompt extension, without training: both sides get the same settings,
and a peft failure prints peft's error with no number next to it (the run itself takes minutes)."""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))  # its own import of _measure
# under its own name: "adapters" is also the name of a pip package (AdapterHub)
_spec = importlib.util.spec_from_file_location("bench_adapters", BENCH / "adapters.py")
adapters = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(adapters)


def test_soft_methods_share_the_virtual_token_count():
    a = argparse.Namespace(virtual_tokens=7)
    for m in ("prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2"):
        assert adapters.method_config(m, a)["num_virtual_tokens"] == 7
        assert adapters.METHODS[m].get("num_virtual_tokens") is None  # the table itself is not changed
    assert adapters.method_config("iapt", a)["num_virtual_tokens"] == 4  # the paper's count per layer, printed as such
    assert adapters.method_config("lora", a) == adapters.METHODS["lora"]
    # the peft map holds weight-space methods too (issue 15): every entry is a bench row
    assert set(adapters.PEFT) <= set(adapters.METHODS) and set(adapters.SOFT_LR) == set(adapters.SOFT)


def test_a_peft_failure_prints_its_error_and_no_ratio():
    g = {"accuracy": 0.9, "step_s": 1.0, "peak_rss_mb": 800.0}
    line = adapters.peft_row("prefix_tuning", g, {"skipped": "ValueError: no past key values", "lr": 0.01})
    assert "skipped: ValueError: no past key values" in line
    assert line.endswith("| | |")  # the two ratio cells are empty


def test_ratios_are_graftkit_over_peft():
    g = {"accuracy": 0.9, "step_s": 1.5, "peak_rss_mb": 800.0}
    q = {"trainable": 9605, "accuracy": 0.8, "step_s": 1.0, "peak_rss_mb": 1000.0}
    cells = [c.strip() for c in adapters.peft_row("prompt_tuning", g, q).split("|")]
    assert cells[-3:-1] == ["1.50", "0.80"]
