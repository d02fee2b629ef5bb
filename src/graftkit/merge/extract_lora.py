"""Low-rank factoring of dense deltas: ``graft extract-lora`` and the shared core of ``output: adapter``.

``graft extract-lora FT BASE OUT`` (mergekit-extract-lora's job) writes a LoRA adapter whose
product reproduces ``FT - BASE``: for every Linear / Conv1D / Conv2d weight (and embedding with
``--embed-lora``) the delta ``D`` (canonical (out, in) view, :mod:`graftkit.layers`) is factored
by a truncated SVD ``D ~ U_r S_r V_r^T`` into ``B = U_r sqrt(S_r)`` (out, r) and
``A = sqrt(S_r) V_r^T`` (r, in), ``lora_alpha = r`` (scaling 1), exactly as mergekit does with
its default ``--distribute-scale``. The rank per matrix is one of:

* ``rank`` (mergekit's ``--max-rank`` alone): ``min(rank, out, in)``;
* ``sv_threshold`` (mergekit's ``--sv-epsilon``): the singular values ``> e`` (absolute), capped
  by ``max_rank`` when given;
* ``max_error``: the smallest ``r`` whose relative Frobenius error
  ``|D - B A|_F / |D|_F = sqrt(sum_{i>=r} s_i^2 / sum_i s_i^2)`` is at most ``max_error``.

A matrix whose rank comes out 0 (its delta is zero, or every singular value is under the
threshold) is left out of the adapter and reported. Other tensors that differ (norms, biases,
embeddings without ``--embed-lora``, an untied LM head) are stored whole (``train_also``, peft's
``modules_to_save``, as mergekit does) unless ``skip_undecomposable``; tensors that are equal
are left out. Per key ranks go in ``target_options`` (native) or ``rank_pattern`` (peft).

DoRA output (:func:`factor_dora`, used by ``output: adapter`` when the inputs are DoRA): the
adapter reproduces ``W' = W + D`` as ``m * (W + L) / ||W + L||_c`` with ``m = ||W'||_c`` (the row
norms of the canonical view, graftkit's and peft's DoRA convention, see
:mod:`graftkit.methods.lora`) and a rank-r direction delta ``L``. Any ``L`` with ``W + L``
parallel to ``W'`` row by row gives ``W'`` exactly, so ``L = diag(k) W' - W`` for any positive
per-row ``k``; ``k`` and ``L`` are fitted together by alternating ``L = SVD_r(diag(k) W' - W)``
and the least-squares ``k`` (from two starts, ``k = 1``, i.e. ``L = SVD_r(D)``, and the ``k`` of
``L = 0``; the tighter one after ten steps is run on). A merge of DoRA
inputs by task arithmetic has ``W' = diag(g) (W + low rank)``, so this reaches it; the error
reported is that of the adapter's actual delta, ``|D_hat - D|_F / |D|_F``.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, FileFormatError, UnsupportedError

#: alternating steps of the DoRA fit (each one SVD); linear convergence, ~1e-5 by 100 on test merges
DORA_STEPS = 100


@dataclass
class Factors:
    """A factored delta: ``B A`` (canonical view, float32), its rank and the Frobenius norms of
    the residual and of the delta it stands for; ``magnitude`` for a DoRA target."""
    a: Any
    b: Any
    rank: int
    error: float
    norm: float
    magnitude: Any = None

    @property
    def relative_error(self) -> float:
        return self.error / self.norm if self.norm > 0 else 0.0


def check_rank_options(rank=None, sv_threshold=None, max_error=None, max_rank=None, *, flag: bool = True) -> None:
    """One way to choose the rank, in range; ``flag``: name the options as command-line flags."""
    name = (lambda n: "--" + n.replace("_", "-")) if flag else (lambda n: n)
    given = [n for n, v in (("rank", rank), ("sv_threshold", sv_threshold), ("max_error", max_error)) if v is not None]
    if len(given) > 1:
        raise ConfigError(f"give one of {name('rank')} R, {name('sv_threshold')} E or {name('max_error')} X, not "
                          f"{' and '.join(name(g) for g in given)} (cap a threshold's rank with {name('max_rank')})")
    if not given and max_rank is None:
        raise ConfigError(f"choose the rank: {name('rank')} R (every matrix), {name('sv_threshold')} E (singular values "
                          f"above E) or {name('max_error')} X (the smallest rank within relative error X)")
    for n, v in (("rank", rank), ("max_rank", max_rank)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"{name(n)} must be a whole number >= 1; got {v!r}")
    if sv_threshold is not None and not (isinstance(sv_threshold, (int, float)) and math.isfinite(sv_threshold) and sv_threshold >= 0):
        raise ConfigError(f"{name('sv_threshold')} must be a singular value >= 0; got {sv_threshold!r}")
    if max_error is not None and not (isinstance(max_error, (int, float)) and 0 < max_error < 1):
        raise ConfigError(f"{name('max_error')} must lie in (0, 1) (a relative Frobenius error, e.g. 0.05); got {max_error!r}")


def choose_rank(s, rank=None, sv_threshold=None, max_error=None, max_rank=None) -> int:
    """The rank kept of singular values ``s`` (descending) under one of the three rules."""
    import torch

    full = int(s.numel())
    cap = full if max_rank is None else min(full, max_rank)
    if rank is not None:
        return min(rank, full)
    if sv_threshold is not None:
        return min(int((s > sv_threshold).sum()), cap)
    if max_error is not None:
        energy = s.double() ** 2
        total = float(energy.sum())
        if total == 0:
            return 0
        # tail[r] = sum_{i>=r} s_i^2: the squared error of keeping r values
        tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
        ok = (tail <= (max_error**2) * total).nonzero()
        return min(int(ok[0]), cap)
    return cap


def factor(delta, *, rank=None, sv_threshold=None, max_error=None, max_rank=None) -> Factors:
    """Truncated SVD of a (out, in) delta: ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``."""
    import torch

    d = delta.double()
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    r = choose_rank(s, rank, sv_threshold, max_error, max_rank)
    root = s[:r].sqrt()
    b = (u[:, :r] * root).float()
    a = (root[:, None] * vh[:r]).float()
    err = float(torch.linalg.matrix_norm(d - b.double() @ a.double()))
    return Factors(a.contiguous(), b.contiguous(), r, err, float(torch.linalg.matrix_norm(d)))


def dora_delta(weight, a, b, magnitude):
    """The delta a DoRA target with factors ``a``, ``b`` (scaling 1) and ``magnitude`` adds to ``weight`` (canonical view)."""
    adapted = weight + b @ a
    return (magnitude / adapted.norm(dim=1))[:, None] * adapted - weight


def factor_dora(weight, merged, *, rank=None, sv_threshold=None, max_error=None, max_rank=None, steps: int = DORA_STEPS) -> Factors:
    """A DoRA target (magnitude + rank-r direction delta) for ``merged`` on ``weight``
    (both canonical (out, in)); see the module docstring for the fit."""
    import torch

    w, wp = weight.double(), merged.double()
    d = wp - w
    norm = float(torch.linalg.matrix_norm(d))
    magnitude = wp.norm(dim=1)
    if (magnitude == 0).any():
        raise UnsupportedError("a merged weight has an all-zero output row; a DoRA adapter cannot represent it (its direction is "
                               "undefined); write a LoRA adapter (inputs without use_dora) or a full model")

    def top(m, r: int, basis=None):
        """The rank-r part of ``m``: exact SVD without ``basis``; else two block power steps from the
        previous step's basis (the matrix moves little between steps), O(n^2 r) instead of O(n^3)."""
        if basis is None:
            u, s, vh = torch.linalg.svd(m, full_matrices=False)
            return u[:, :r], s[:r], vh[:r], u[:, :r + 4], float(s[r:].square().sum())
        q = basis
        for _ in range(2):
            q, _ = torch.linalg.qr(m @ (m.T @ q))
        ub, s, vh = torch.linalg.svd(q.T @ m, full_matrices=False)  # Rayleigh-Ritz in the subspace
        u = q @ ub
        return u[:, :r], s[:r], vh[:r], u, max(float(m.square().sum() - s[:r].square().sum()), 0.0)

    def run(r: int, k, steps: int):
        best, last, basis = None, math.inf, None
        for _ in range(steps):
            u, s, vh, basis, objective = top(k[:, None] * wp - w, r, basis)
            b, a = u * s.sqrt(), s.sqrt()[:, None] * vh
            err = float(torch.linalg.matrix_norm(dora_delta(w, a, b, magnitude) - d))
            if best is None or err < best[0]:  # the fit's objective falls monotonically, the adapter's error nearly so
                best = (err, k)
            t = w + b @ a
            k = (wp * t).sum(1) / (wp * wp).sum(1)  # least squares: diag(k) W' closest to W + L row by row
            if objective <= 1e-24 * norm**2 or objective > last * (1 - 1e-6):
                break
            last = objective
        return best, k, last

    def fit(r: int):
        # two starts: k = 1 (L = SVD_r(D), best for mild rescaling) and the least-squares k of L = 0 (best when
        # the magnitudes moved far); a few steps of each, then the one whose fit is tighter goes on
        starts = [run(r, torch.ones_like(magnitude), 10), run(r, (wp * w).sum(1) / (wp * wp).sum(1), 10)]
        _, k, _ = min(starts, key=lambda x: x[2])
        best, _, _ = run(r, k, steps)
        k = min(best, *(x[0] for x in starts), key=lambda b: b[0])[1]
        u, s, vh, _, _ = top(k[:, None] * wp - w, r)  # the chosen k's direction, by an exact SVD
        b, a = u * s.sqrt(), s.sqrt()[:, None] * vh
        return float(torch.linalg.matrix_norm(dora_delta(w, a, b, magnitude) - d)), a, b

    full = min(w.shape)
    if rank is not None or max_error is None:
        # a threshold acts on the spectrum of the plain delta, then the direction is refitted at that rank
        r = rank if rank is not None else choose_rank(torch.linalg.svdvals(d), None, sv_threshold, None, max_rank)
        r = min(r, full)
        err, a, b = fit(r) if r > 0 else (norm, d.new_zeros(0, w.shape[1]), d.new_zeros(w.shape[0], 0))
    else:
        # the smallest rank within max_error, by bisection (the fitted error falls with the rank)
        lo, hi = 1, min(full, max_rank or full)
        found = fit(hi)
        r = hi
        while lo < hi:
            mid = (lo + hi) // 2
            got = fit(mid)
            if norm == 0 or got[0] <= max_error * norm:
                hi, r, found = mid, mid, got
            else:
                lo = mid + 1
        err, a, b = found
    return Factors(a.float().contiguous(), b.float().contiguous(), r, err, norm, magnitude.float())


def adapter_meta(factors: dict[str, tuple[str, Factors]], *, dora: bool = False, whole: tuple[str, ...] = (),
                 base_model: dict | None = None, record: dict | None = None) -> tuple[dict, dict]:
    """The native LoRA adapter (``adapter.json`` entries and tensors) of factored targets
    ``name -> (kind, Factors)`` (rank 0 ones left out); per-target ``r`` in ``target_options``."""
    from ..io.native import FORMAT, FORMAT_VERSION, versions

    tensors, options, kinds = {}, {}, {}
    for name, (kind, f) in sorted(factors.items()):
        if f.rank == 0:
            continue
        tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = f.a, f.b
        if dora:
            tensors[f"{name}.lora_magnitude_vector"] = f.magnitude.contiguous()
        options[name] = {"r": f.rank, "lora_alpha": float(f.rank)}
        kinds[name] = kind
    if not options and not whole:
        raise ConfigError("every delta came out of rank 0 (zero, or all singular values under the threshold): there is no adapter "
                          "to write; lower the threshold, or check that the models differ")
    ranks = [o["r"] for o in options.values()] or [1]
    r0 = max(ranks)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "method": "lora",
        "config": {"r": r0, "lora_alpha": float(r0), "use_dora": dora, "targets": sorted(options), "train_also": list(whole)},
        "targets": sorted(options), "target_options": options, "train_also": list(whole), "target_kinds": kinds,
        "base_model": base_model or {}, "versions": versions(),
    }
    if record:
        meta.update(record)
    return meta, tensors


def error_report(factors: dict[str, tuple[str, Factors]]) -> dict:
    """``{"overall", "per_key"}`` relative Frobenius errors (overall: of all the keys together)."""
    num = sum(f.error**2 for _, f in factors.values())
    den = sum(f.norm**2 for _, f in factors.values())
    return {"overall": (num / den) ** 0.5 if den > 0 else 0.0, "per_key": {k: f.relative_error for k, (_, f) in sorted(factors.items())}}


# -- graft extract-lora --------------------------------------------------------------------------

def _config(path: Path) -> dict:
    from ..files import read_json

    f = path / "config.json"
    return read_json(f, "model config", hint="give a transformers model folder", mapping=True) if f.exists() else {}


def _layer_kinds(base: Path) -> tuple[dict[str, str], str, set[str]]:
    """Every parameter's layer kind, from the base's architecture built on the meta device (no
    weights), and the weights of its input and output embeddings (an untied LM head is a Linear)."""
    import torch

    from ..io.hf import model_class, model_config
    from ..layers import layer_kind

    cls = model_class(base)
    config = model_config(base)
    with torch.device("meta"):
        model = cls._from_config(config)
    kinds = {}
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            kinds[f"{mname}.{pname}" if mname else pname] = layer_kind(module, pname)
    embeddings = {f"{mname}.weight" for mname, module in model.named_modules()
                  if module is model.get_input_embeddings() or module is model.get_output_embeddings()}
    return kinds, cls.__name__, embeddings


def extract_lora(ft: str | Path, base: str | Path, out: str | Path, *, rank: int | None = None, sv_threshold: float | None = None,
                 max_error: float | None = None, max_rank: int | None = None, embed_lora: bool = False,
                 skip_undecomposable: bool = False, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
                 peft: bool = False, overwrite: bool = False, allow_pickle: bool = False) -> tuple[Path, dict]:
    """Write the LoRA of ``FT - BASE`` to ``out`` (native, or peft with ``peft``); returns the folder and the report."""
    import torch

    from ..io import apply_adapter, save_adapter
    from ..io.hf import load_model
    from ..io.native import AdapterFile, adapter_from_model
    from ..layers import to_matrix
    from ..outputs import check_output
    from ..tensors import Checkpoint

    check_rank_options(rank, sv_threshold, max_error, max_rank)
    patterns = []
    for p in (*include, *exclude):
        try:
            patterns.append(re.compile(p))
        except re.error as exc:
            raise ConfigError(f"--include-regex/--exclude-regex {p!r} is not a regular expression ({exc})") from None
    inc, exc_ = patterns[:len(include)], patterns[len(include):]
    check_output(out, [("fine-tuned model", ft), ("base model", base)])
    if Path(out).exists() and not overwrite:
        raise FileFormatError(f"{out} already exists; choose another output folder or pass --overwrite")
    ft, base = Path(ft), Path(base)
    fck, bck = Checkpoint(ft, allow_pickle), Checkpoint(base, allow_pickle)
    fcfg, bcfg = _config(ft), _config(base)
    for key in ("model_type", "architectures"):
        if fcfg.get(key) != bcfg.get(key):
            raise ConfigError(f"{ft} is a {fcfg.get(key)} model but {base} is a {bcfg.get(key)} ({key}); extract-lora needs the "
                              "fine-tuned model and the base it was tuned from (same architecture)")
    fkeys, bkeys = set(fck.keys()), set(bck.keys())
    if fkeys != bkeys:
        odd = sorted(fkeys ^ bkeys)[0]
        where = ft if odd in fkeys else base
        raise ConfigError(f"{ft} and {base} hold different tensors ({len(fkeys ^ bkeys)} in one only, e.g. {odd} in {where}); "
                          "extract-lora needs the fine-tuned model and the base it was tuned from (same architecture)")
    for key in sorted(fkeys):
        if tuple(fck.shape(key)) != tuple(bck.shape(key)):
            raise ConfigError(f"{key} is {tuple(fck.shape(key))} in {ft} but {tuple(bck.shape(key))} in {base} (a resized vocabulary "
                              "or another model size); extract-lora needs the same architecture and shapes")
    kinds, class_name, embeddings = _layer_kinds(base)
    factorable = {"linear", "conv1d", "conv2d", "embedding"}
    factors: dict[str, tuple[str, Factors]] = {}
    whole, skipped, dropped = {}, [], []
    for key in sorted(fkeys):
        w, wf = bck.get(key), fck.get(key)
        if not w.dtype.is_floating_point or torch.equal(w, wf):
            continue
        kind = kinds.get(key, "param")
        chosen = (not inc or any(p.search(key) for p in inc)) and not any(p.search(key) for p in exc_)
        if not chosen:
            continue
        if kind in factorable and (embed_lora or key not in embeddings):  # as mergekit: embeddings whole unless --embed-lora
            delta = to_matrix(kind, wf.double() - w.double())
            f = factor(delta, rank=rank, sv_threshold=sv_threshold, max_error=max_error, max_rank=max_rank)
            factors[key] = (kind, f)
            if f.rank == 0:
                dropped.append(key)
        elif skip_undecomposable:
            skipped.append(key)
        else:
            whole[key] = wf
    report = {"rank": {k: f.rank for k, (_, f) in factors.items() if f.rank}, "relative_error": error_report(factors),
              "whole": sorted(whole), "skipped": skipped, "dropped": dropped,
              "options": {"rank": rank, "sv_threshold": sv_threshold, "max_error": max_error, "max_rank": max_rank,
                          "embed_lora": embed_lora}}
    meta, tensors = adapter_meta(factors, whole=tuple(sorted(whole)), base_model={"class": class_name, "name_or_path": str(base)})
    tensors.update({f"{k}.value": v for k, v in whole.items()})
    if peft and any(k.rsplit(".", 1)[0] + ".weight" in meta["targets"] for k in whole):
        odd = next(k for k in whole if k.rsplit(".", 1)[0] + ".weight" in meta["targets"])
        raise UnsupportedError(f"{odd} changed and its layer gets a LoRA: peft cannot hold a layer both as a LoRA target and whole "
                               "(modules_to_save); pass --skip-undecomposable, or write a native adapter (without --peft)")
    # applied to the real base: the fit is checked, and the saved adapter gets the base's fingerprint
    model = load_model(base, class_name=class_name, dtype="auto", allow_pickle=allow_pickle)
    apply_adapter(model, AdapterFile(meta, tensors), force=True)
    if peft:
        path = save_adapter(model, out, format="peft", overwrite=overwrite)
        (path / "extraction.json").write_text(json.dumps({"fine_tuned": str(ft), "base": str(base), **report}, indent=2) + "\n")
        return path, report
    adapter = adapter_from_model(model)
    adapter.meta["extraction"] = {"fine_tuned": str(ft), "base": str(base), **report}
    from ..io.native import write_native

    return write_native(adapter, out, overwrite), report
