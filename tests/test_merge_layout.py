"""The merge engine's module layout: plan -> compute -> write -> api, no import cycles among them,
and no module of graftkit.merge or graftkit.analysis imports another module's private (underscore) name."""
from __future__ import annotations

import ast
from pathlib import Path

import graftkit.merge as merge_pkg

MERGE_DIR = Path(merge_pkg.__file__).parent
ENGINE = ["plan", "compute", "write", "api"]


def imports(module: str) -> list[tuple[str, list[str]]]:
    """Every ``from .x import a, b`` of a merge module (also inside functions): (x, [a, b])."""
    tree = ast.parse((MERGE_DIR / f"{module}.py").read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.append((node.module or "", [a.name for a in node.names]))
    return found


def test_no_merge_or_analysis_module_imports_a_private_name():
    bad = []
    for folder in (MERGE_DIR, MERGE_DIR.parent / "analysis"):
        for path in sorted(folder.glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level >= 1:
                    bad += [f"{folder.name}/{path.name}: from {'.' * node.level}{node.module or ''} import {a.name}"
                            for a in node.names if a.name.startswith("_") and a.name != "__version__"]
    assert not bad, bad


def test_engine_modules_import_only_earlier_ones():
    """plan never imports compute/write/api, compute never write/api, write never api: no cycle,
    even through an import inside a function."""
    for i, module in enumerate(ENGINE):
        later = set(ENGINE[i + 1:])
        used = {source.split(".")[0] for source, _ in imports(module)}
        assert not used & later, f"{module}.py imports {sorted(used & later)}"
    for module in ("search", "to_adapter", "soup", "fused"):
        used = {source.split(".")[0] for source, _ in imports(module)}
        assert "api" not in used, f"{module}.py imports the front door (api.py), a cycle"


def test_checkpoint_byte_range_reads(tmp_path):
    """Checkpoint.byte_range / map_range / read against safetensors' own reader, for a float and an
    integer tensor, whole and by rows, in a shard that holds several tensors."""
    import torch
    from safetensors.torch import save_file

    from graftkit.tensors import Checkpoint

    tensors = {"a": torch.arange(12, dtype=torch.float32).view(4, 3) / 7, "b": torch.arange(10, dtype=torch.int64).view(5, 2),
               "c": torch.randn(6, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint(tmp_path)
    raw = (tmp_path / "model.safetensors").read_bytes()
    for key, t in tensors.items():
        f, lo, hi = ckpt.byte_range(key)
        assert f.name == "model.safetensors" and raw[lo:hi] == t.contiguous().view(torch.uint8).numpy().tobytes()
        assert torch.equal(ckpt.read(key), t)
        assert torch.equal(ckpt.read(key, (1, 3)), t[1:3])
        mapped, start = ckpt.map_range(key, 2, 6)
        assert bytes(mapped[start:start + 4]) == raw[lo + 2:lo + 6]
