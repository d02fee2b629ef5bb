"""Trainable share of every registered tuning method on t5-base's configuration, next to the
figures the papers report. No weights and no network: the model is built from a T5Config on the
meta device (graftkit.train.params), the method injected and its parameters counted
(graftkit.adapter.count_parameters). Methods are taken from the registry at run time: one that
has no row below gets a row with its default configuration.

    python bench/param_table.py                            # print the table (markdown)
    python bench/param_table.py --write docs/parameters.md  # regenerate the docs page
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# Compacter (Karimi Mahabadi et al., NeurIPS 2021), Table 1 (GLUE, T5-base): percentage of the
# model's parameters trained per task. Every method there also trains all layer norms, and the
# adapters have bottleneck 24 (= 768 / 32); see docs/parameters.md for how each was checked.
COMPACTER_T1 = "Compacter paper, Tab. 1"
PAPER = {
    ("houlsby", 32): ("0.832%", f"{COMPACTER_T1} (Adapter)"),
    ("pfeiffer", 32): ("0.427%", f"{COMPACTER_T1} (Pfeiffer-Adapter, kept after self-attention)"),
    ("compacter", 32): ("0.073%", f"{COMPACTER_T1} (Compacter, n=4)"),
    ("compacter_pp", 32): ("0.047%", f"{COMPACTER_T1} (Compacter++, n=4)"),
    ("bitfit", None): ("0.126%", f"{COMPACTER_T1} (BitFit; T5 has no biases - recalled, not verified)"),
    ("full", None): ("100%", f"{COMPACTER_T1} (T5-base)"),
}

# method -> [(configuration label, method config)]; a registered method missing here gets its defaults
ROWS: dict[str, list[tuple[str, dict]]] = {
    "full": [("all parameters", {})],
    "lora": [("r=8 on q, v", {"r": 8, "targets": ["q", "v"]})],
    "ia3": [("k, v, wo (wo scaled on its input; peft's T5 default)", {"targets": ["k", "v", "wo"], "feedforward": ["wo"]})],
    "bitfit": [("every bias", {})],
    "ln_tuning": [("every LayerNorm/RMSNorm (62 T5LayerNorm gains)", {})],
    "houlsby": [(f"reduction factor {rf}", {"reduction_factor": rf}) for rf in (32, 16)],
    "pfeiffer": [(f"reduction factor {rf}", {"reduction_factor": rf}) for rf in (32, 16)],
    "parallel_adapter": [(f"reduction factor {rf}", {"reduction_factor": rf}) for rf in (32, 16)],
    "compacter": [("reduction factor 32, n=4", {"reduction_factor": 32, "phm_dim": 4})],
    "compacter_pp": [("reduction factor 32, n=4", {"reduction_factor": 32, "phm_dim": 4})],
    "compose": [("parallel_adapter rf 16 + lora r=8 on q, v (MAM-like)",
                 {"methods": [{"method": "parallel_adapter", "reduction_factor": 16}, {"method": "lora", "r": 8, "targets": ["q", "v"]}]})],
}
# these already train every norm, or are compositions (a layer-norm part is added inside them)
NO_LN_COLUMN = {"full", "ln_tuning", "compose"}


def _count(cls, config, method: dict) -> dict:
    from graftkit.errors import GraftError
    from graftkit.train.params import method_parameters

    try:
        return method_parameters(cls, config, method)
    except GraftError as exc:
        return {"error": str(exc)}


def _pct(x: float) -> str:
    return f"{100 * x:.4f}%"


def table() -> tuple[list[dict], int]:
    import transformers

    import graftkit.methods  # noqa: F401  (registration)
    from graftkit.methods import method_named, registered_methods

    transformers.logging.set_verbosity_error()
    from graftkit.train.params import T5_BASE

    cls, config = transformers.T5ForConditionalGeneration, transformers.T5Config(**T5_BASE)
    rows, total = [], None
    for method in sorted(registered_methods(), key=lambda m: m.name):
        for label, options in ROWS.get(method.name, [("defaults", {})]):
            cfg = {"method": method.name, **options}
            got = _count(cls, config, cfg)
            total = got.get("total", total)
            row = {"method": method.name, "space": method.space, "configuration": label, **got}
            if "error" not in got and method.name not in NO_LN_COLUMN and method_named("compose") is not None:
                with_ln = _count(cls, config, {"method": "compose", "methods": [cfg, {"method": "ln_tuning"}]})
                if "error" not in with_ln:
                    row["with_ln"] = with_ln["trainable"]
            paper = PAPER.get((method.name, options.get("reduction_factor")))
            row["paper"], row["source"] = paper if paper else ("", "")
            rows.append(row)
    return rows, total


def markdown(rows: list[dict], total: int) -> str:
    lines = [
        "| method | space | configuration | trainable | share | with all layer norms | paper (T5-base) |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        paper = f"{r['paper']} ({r['source']})" if r["paper"] else "-"
        if "error" in r:
            lines.append(f"| `{r['method']}` | {r['space']} | {r['configuration']}: not applicable ({r['error']}) | - | - | - | {paper} |")
            continue
        ln = f"{r['with_ln']:,} = {_pct(r['with_ln'] / total)}" if "with_ln" in r else "-"
        lines.append(f"| `{r['method']}` | {r['space']} | {r['configuration']} | {r['trainable']:,} | {_pct(r['ratio'])} | {ln} | {paper} |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- param_table: begin -->", "<!-- param_table: end -->"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", metavar="FILE", help="replace the table between the param_table markers in FILE")
    args = p.parse_args(argv)
    rows, total = table()
    text = f"T5ForConditionalGeneration with t5-base's configuration: {total:,} base parameters (tied embeddings counted once).\n\n" + markdown(rows, total)
    if not args.write:
        print(text, end="")
        return 0
    path = Path(args.write)
    doc = path.read_text()
    if BEGIN not in doc or END not in doc:
        print(f"param_table: {path} has no {BEGIN} ... {END} markers; add them where the table goes", file=sys.stderr)
        return 2
    head, rest = doc.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")
    print(f"table written to {path} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
