"""PortLLM (Khan et al., 2024): carry a fine-tuning patch made on base v1 over to an updated base v2
without training.

The patch is the weight delta of the fine-tune, ``delta = ft - v1``, and the ported model is
``v2 + delta``. Two kinds of patch:

* a fine-tuned model folder: the output is an HF folder, written one tensor at a time
  (``v2[k] + (ft[k] - v1[k])`` in float32, cast to v2's dtype) through the merge engine's
  :class:`~graftkit.merge.write.ShardWriter`; nothing holds a whole model;
* an adapter with a weight delta (LoRA family, IA3, ...; read by
  :func:`graftkit.merge.plan.open_input`, so its fingerprint must match v1): by default the adapter
  itself is re-targeted to v2 (same tensors, v2's fingerprint), which is exact only when its delta
  does not depend on the base weights (plain LoRA: ``B A``). A delta that does (DoRA renormalises
  against the base column norms, IA3 scales the base) is refused there and ported as a full
  folder with ``full=True``, which adds the delta computed on v1, the quantity PortLLM transfers.

A classification head (``classifier.*`` / ``score.*``) of a fine-tuned folder is ported whole, with its
labels: v1's and v2's heads are untrained (and may count other labels), so its delta means nothing.

v1 and v2 must be the same architecture with the same tensor names and shapes; anything else is
refused before anything is written.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..errors import GraftError
from ..merge.plan import open_model_folder

ST_FLOATS = ("F64", "F32", "F16", "BF16")
# a classification head (the names graft study leaves out of merges) trained from a random start:
# ported whole from the fine-tune, since v1's and v2's heads are untrained and may count other labels
HEADS = ("classifier.", "score.")
_LABEL_KEYS = ("id2label", "label2id", "num_labels", "problem_type")
_EXTRA_FILES = ("generation_config.json",)


class PortError(GraftError):
    """A patch cannot be ported: the bases differ in architecture or shapes, or the patch is for another base."""


def _arch(config: dict) -> tuple:
    return config.get("model_type"), tuple(config.get("architectures") or ())


def check_bases(v1, v1_config: dict, v2, v2_config: dict) -> None:
    """Refuse two bases that are not the same network: PortLLM adds the patch entry by entry."""
    if _arch(v1_config) != _arch(v2_config):
        raise PortError(f"v1 {v1.path} is {_arch(v1_config)[0]} {list(_arch(v1_config)[1])} but v2 {v2.path} is "
                        f"{_arch(v2_config)[0]} {list(_arch(v2_config)[1])}; a patch ports only between versions of one architecture")
    k1, k2 = set(v1.keys()), set(v2.keys())
    if k1 != k2:
        odd = sorted(k1 ^ k2)[0]
        raise PortError(f"v1 {v1.path} and v2 {v2.path} hold different tensors ({len(k1 ^ k2)} differ, e.g. {odd}); "
                        "a patch ports only between versions of one architecture")
    for k in v1.keys():
        if tuple(v1.shape(k)) != tuple(v2.shape(k)):
            raise PortError(f"{k} is {list(v1.shape(k))} in v1 {v1.path} but {list(v2.shape(k))} in v2 {v2.path}; "
                            "a patch ports only between bases of the same shapes")


def _copy_side_files(v2_dir: Path, patch_dir: Path | None, out: Path, labels_from: dict | None = None) -> None:
    import json

    from ..merge.plan import TOKENIZER_FILES

    shutil.copy2(v2_dir / "config.json", out / "config.json")
    if labels_from:  # the head is the fine-tune's: so are its labels
        config = json.loads((out / "config.json").read_text())
        config.update({k: labels_from[k] for k in _LABEL_KEYS if k in labels_from})
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in (*TOKENIZER_FILES, *_EXTRA_FILES):
        # the updated base's tokenizer: v1 and v2 share the vocabulary (same embedding shapes)
        src = v2_dir / name if (v2_dir / name).is_file() else (patch_dir / name if patch_dir else None)
        if src is not None and src.is_file():
            shutil.copy2(src, out / name)


def _write_folder(v1, v2, out: Path, delta_of, patch_dir: Path | None, overwrite: bool, max_shard_size,
                  heads=None, labels_from: dict | None = None) -> dict:
    """``v2 + delta_of(key)`` for every tensor (delta_of returns None where the patch leaves a tensor
    alone); the tensors of ``heads`` (a checkpoint) replace v2's whole."""
    from ..merge.write import ShardWriter
    from ..outputs import atomic_dir
    from ..tensors import ST_TO_TORCH, st_dtype

    whole = set() if heads is None else {k for k in heads.keys() if k.startswith(HEADS)}
    entries = [(k, st_dtype(src.dtype(k)), tuple(src.shape(k))) for k in v2.keys() for src in [heads if k in whole else v2]]
    changed = 0
    with atomic_dir(out, overwrite) as tmp:
        writer = ShardWriter(tmp, entries, max_shard_size)
        try:
            for key, dtype, _ in entries:
                if key in whole:
                    writer.write(key, heads.get(key))
                    changed += 1
                    continue
                w = v2.get(key)
                d = delta_of(key) if dtype in ST_FLOATS else None
                if d is not None:
                    w = (w.float() + d).to(getattr(torch, ST_TO_TORCH[dtype]))
                    changed += 1
                writer.write(key, w)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        _copy_side_files(Path(v2.path), patch_dir, tmp, labels_from if whole else None)
    return {"out": str(out), "kind": "model", "tensors": len(entries), "patched": changed}


def port(patch: str | Path, v1_path: str | Path, v2_path: str | Path, out: str | Path, *, full: bool = False,
         overwrite: bool = False, force: bool = False, max_shard_size: int | str = "2GB") -> dict:
    """Apply ``patch`` (a fine-tuned folder of v1, or an adapter trained on v1) to ``v2``; write ``out``.

    Returns a summary: ``kind`` ("model" or "adapter"), ``tensors``/``patched`` counts and ``out``."""
    from ..merge.adapters import is_adapter
    from ..merge.plan import open_input

    v1, c1 = open_model_folder(v1_path, "v1 (--from)", PortError)
    v2, c2 = open_model_folder(v2_path, "v2 (--to)", PortError)
    check_bases(v1, c1, v2, c2)
    out = Path(out)
    if is_adapter(patch):
        source = open_input(str(patch), base=v1, force=force)  # unless forced, checks the adapter's fingerprint against v1
        deltas = source.deltas
        whole = source.whole
        if full:
            def delta_of(key):
                if key in whole:  # trained whole: a head replaces v2's, any other tensor carries its change from v1
                    return whole[key].float() - (v2 if key.startswith(HEADS) else v1).get(key).float()
                d = deltas.get(key)
                return None if d is None else d.fn(v1.get(key)).float()

            return _write_folder(v1, v2, out, delta_of, None, overwrite, max_shard_size)
        return _retarget_adapter(patch, source, v1, v2, out, overwrite)
    if not Path(patch).is_dir():
        raise PortError(f"patch {patch} is neither a model folder nor an adapter folder")
    ft, cf = open_model_folder(patch, "patch", PortError)
    if _arch(cf) != _arch(c1) or set(ft.keys()) != set(v1.keys()) or any(
            tuple(ft.shape(k)) != tuple(v1.shape(k)) for k in v1.keys() if not k.startswith(HEADS)):
        raise PortError(f"patch {patch} is not a fine-tune of v1 {v1.path} (its architecture, tensor names or shapes differ); "
                        "give the base it was tuned from as --from")

    def delta_of(key):
        return ft.get(key).float() - v1.get(key).float()

    return _write_folder(v1, v2, out, delta_of, Path(patch), overwrite, max_shard_size, heads=ft, labels_from=cf)


def _retarget_adapter(patch, source, v1, v2, out: Path, overwrite: bool) -> dict:
    from ..fingerprint import probe_values
    from ..io import read_adapter
    from ..io.native import write_native

    for key, d in source.deltas.items():
        # exact only when the delta is the adapter's own (B A): then v2 + delta is what loading it on v2 gives
        a, b = d.fn(v1.get(key)), d.fn(v2.get(key))
        if not torch.equal(a, b):
            raise PortError(f"{patch} is a {source.method} adapter whose delta depends on the base weights ({key} changes with "
                            "the base); port it as a full model instead: add --full")
    adapter = read_adapter(patch)
    meta = dict(adapter.meta)
    base = dict(meta.get("base_model") or {})
    fp = base.get("fingerprint")
    if fp:
        # same architecture and shapes, so the structure hash and parameter count stay; the probe values become v2's
        probes = {name: probe_values(v2.get(name)) for name in (fp.get("probe") or {}) if name in v2.files}
        first = next(iter(probes), None)
        dtype = str(v2.get(first).dtype).replace("torch.", "") if first else fp.get("dtype")
        base["fingerprint"] = {**fp, "probe": probes, "dtype": dtype}
    base["name_or_path"] = str(v2.path)
    meta["base_model"] = base
    meta["ported"] = {"method": "portllm", "from": str(v1.path), "to": str(v2.path)}
    adapter.meta = meta
    write_native(adapter, out, overwrite=overwrite)
    return {"out": str(out), "kind": "adapter", "tensors": len(adapter.tensors), "patched": len(source.deltas)}
