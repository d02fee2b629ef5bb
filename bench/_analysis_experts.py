"""Where the issue-17 benchmark experts live: the output folder of ``graft study bench/analysis_study.yaml``
(or any study output with the same layout, e.g. ``graft demo``'s). Shared by bench/analysis_*.py."""
from __future__ import annotations

import sys
from pathlib import Path

FAMILIES = ("full", "lora8", "rslora64")


class Study:
    """Paths inside a study output folder: ``base/``, ``data/<task>/<split>.jsonl``,
    ``experts/<family>/<task>/adapter`` (and ``merged`` where the study exported one)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not (self.root / "experts").is_dir() or not (self.root / "base").is_dir():
            sys.exit(f"{self.root} is not a study output (no experts/ and base/); run: graft study bench/analysis_study.yaml")

    @property
    def base(self) -> str:
        return str(self.root / "base")

    def families(self) -> list[str]:
        return sorted(p.name for p in (self.root / "experts").iterdir() if p.is_dir())

    def tasks(self, family: str = "full") -> list[str]:
        return sorted(p.name for p in (self.root / "experts" / family).iterdir() if (p / "adapter").is_dir())

    def model(self, family: str, task: str) -> str:
        """The expert as an HF folder where the study wrote one (full fine-tunes), else its adapter folder."""
        folder = self.root / "experts" / family / task
        return str(folder / "merged") if (folder / "merged").is_dir() else str(folder / "adapter")

    def adapter(self, family: str, task: str) -> str:
        return str(self.root / "experts" / family / task / "adapter")

    def hf_model(self, family: str, task: str) -> str:
        """The expert as an HF model folder: the study's ``merged`` export where it wrote one, else the
        adapter folded into the study's base with ``graft export --merged``'s function, cached in
        ``<study>-hf/<family>/<task>`` (redone when the adapter is newer). A study no longer exports
        full fine-tunes (their adapter is a merge input), but DARE and TALL read HF folders."""
        merged = self.root / "experts" / family / task / "merged"
        if merged.is_dir():
            return str(merged)
        import yaml

        from graftkit.io import export_merged

        adapter = Path(self.adapter(family, task))
        out = self.root.with_name(self.root.name + "-hf") / family / task
        weights = out / "model.safetensors"
        if weights.is_file() and weights.stat().st_mtime >= (adapter / "adapter.safetensors").stat().st_mtime:
            return str(out)
        base = yaml.safe_load((self.root / "study.yaml").read_text())["base"]  # what the experts were trained from
        export_merged(adapter, base, out, overwrite=True)
        return str(out)

    def data(self, task: str, split: str) -> str:
        return str(self.root / "data" / task / f"{split}.jsonl")

    def task(self, task: str, split: str = "test", **extra) -> dict:
        """A ``graft eval`` classification task entry on one split of the study's data."""
        return {"name": task, "kind": "classification", "file": self.data(task, split), "max_length": 64, **extra}
