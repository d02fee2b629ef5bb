"""peft adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``).

graftkit reads and writes peft's LoRA (with rsLoRA and DoRA) and IA3 adapters. Reading
needs no model: the file's keys name the adapted modules and its shapes carry the ranks, so
a peft folder converts to graftkit's :class:`~graftkit.io.native.AdapterFile` directly.
Writing needs the live model, because peft's layout depends on the layer kind (embedding
factors have their own names, convolution factors are 4-D, IA3 vectors are shaped to
broadcast).

Key mapping (peft names stripped of the ``base_model.model.`` prefix):

============================  =====================================================
peft                          graftkit
============================  =====================================================
``M.lora_A.weight``           ``M.weight.lora_A``  (conv kernels flattened to (r, in))
``M.lora_B.weight``           ``M.weight.lora_B``  ((out, r))
``M.lora_embedding_A`` / B    ``M.weight.lora_A`` / ``lora_B`` (same shapes)
``M.lora_magnitude_vector``   ``M.weight.lora_magnitude_vector`` (flattened)
``M.ia3_l``                   ``M.weight.ia3_l`` (flattened; (1, in) means feed-forward)
``M.P`` (modules_to_save)     ``M.P.value``
============================  =====================================================
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter import require_state, sites
from ..errors import FileFormatError, UnsupportedError
from ..methods.lora import pattern_value
from ..tensors import atomic_dir, read_pickle_checkpoint, read_safetensors
from .native import FORMAT, FORMAT_VERSION, AdapterFile, versions

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


def converters() -> dict[str, Any]:
    """peft_type -> the registered method's :class:`~graftkit.methods.base.PeftConverter`."""
    from ..methods import registered_methods

    return {m.peft.peft_type: m.peft for m in registered_methods() if m.peft is not None}


def peft_method_names() -> str:
    from ..methods import registered_methods

    return " and ".join(m.name for m in registered_methods() if m.peft is not None)
# peft LoRA options graftkit cannot honour: (key, value that is harmless)
UNSUPPORTED_LORA = {
    "lora_bias": False, "use_qalora": False, "layer_replication": None, "target_parameters": None,
    "alora_invocation_tokens": None, "trainable_token_indices": None, "use_bdlora": None,
    "arrow_config": None, "megatron_config": None, "monteclora_config": None,
}
LORA_SUFFIXES = {
    ".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B",
    ".lora_embedding_A": "lora_A", ".lora_embedding_B": "lora_B",
    ".lora_magnitude_vector.weight": "lora_magnitude_vector", ".lora_magnitude_vector": "lora_magnitude_vector",
}


def _read_config(path: Path) -> dict:
    from ..files import path_kind, read_json

    kind = path_kind(path)
    if kind is None:
        raise FileFormatError(f"peft adapter folder {path} does not exist; check the path")
    if kind != "a folder":
        raise FileFormatError(f"{path} is {kind}; give a peft adapter folder (with {CONFIG_NAME})")
    if path_kind(path / CONFIG_NAME) is None:
        raise FileFormatError(f"{path} has no {CONFIG_NAME}; is it a peft adapter folder?")
    return read_json(path / CONFIG_NAME, "peft config", hint="re-save the adapter", mapping=True)


def read_peft(path: str | Path, allow_pickle: bool = False) -> AdapterFile:
    """Convert a peft adapter folder to graftkit's in-memory adapter."""
    path = Path(path)
    cfg = _read_config(path)
    peft_type = cfg.get("peft_type")
    known = converters()
    if not isinstance(peft_type, str) or peft_type not in known:
        raise UnsupportedError(
            f"peft adapter type {peft_type!r} is not supported; graftkit reads peft {', '.join(sorted(known))} adapters (LORA incl. rsLoRA, DoRA)"
        )
    if (path / WEIGHTS_NAME).exists():
        raw = read_safetensors(path / WEIGHTS_NAME)
    elif (path / PICKLE_NAME).exists():
        raw = read_pickle_checkpoint(path / PICKLE_NAME, allow_pickle)
    else:
        raise FileFormatError(f"{path} has no {WEIGHTS_NAME}")
    prefix = getattr(known[peft_type], "prefix", None) or PREFIX  # prompt learning wraps the model one level less deep
    raw = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in raw.items()}
    adapter = known[peft_type].read(cfg, raw, path)
    adapter.path = path
    return adapter


def _number(cfg: dict, key: str, default, path: Path, *, integer: bool = False, low=None, high=None, where: str = ""):
    """A numeric entry of adapter_config.json, or a one-line error naming it."""
    value = cfg.get(key)
    if value is None and default is not None:
        value = default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (not integer or float(value).is_integer())
    if ok and ((low is not None and value < low) or (high is not None and value > high)):
        ok = False
    if not ok:
        kind = "an integer" if integer else "a number"
        bounds = f" >= {low}" if low is not None and high is None else f" in [{low}, {high}]" if low is not None else ""
        raise FileFormatError(f"{path / CONFIG_NAME}: {where}{key} is {value!r}; it must be {kind}{bounds} - fix the file")
    return int(value) if integer else float(value)


def _common_config(cfg: dict, heads: list[str]) -> dict:
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [f"re:{targets}"]
    return {"targets": sorted(targets), "train_also": sorted({h.rsplit(".", 1)[0] for h in heads})}


def _heads(raw: dict, known: set[str]) -> tuple[list[str], dict[str, torch.Tensor]]:
    tensors = {f"{k}.value": v for k, v in raw.items() if k not in known}
    return sorted(k[: -len(".value")] for k in tensors), tensors


def _meta(method: str, config: dict, targets: list[str], options: dict, heads: list[str], cfg: dict, path: Path) -> dict:
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "method": method, "config": config,
        "targets": targets, "target_options": options, "train_also": heads,
        "base_model": {"name_or_path": cfg.get("base_model_name_or_path"), "fingerprint": None,
                       "class": (cfg.get("auto_mapping") or {}).get("base_model_class"), "task_type": cfg.get("task_type")},
        "versions": versions(), "imported_from": {"peft": str(path), "peft_version": cfg.get("peft_version")},
    }


def lora_from_peft(cfg: dict, raw: dict, path: Path) -> AdapterFile:
    for key, harmless in UNSUPPORTED_LORA.items():
        value = cfg.get(key, harmless)
        if value not in (harmless, None, False, {}, []):
            raise UnsupportedError(f"this peft LoRA uses {key}={value!r}, which graftkit does not support; supported: plain LoRA, rsLoRA, DoRA")
    residual = cfg.get("init_lora_weights")
    if isinstance(residual, str) and (residual in ("olora", "corda", "loftq") or residual.startswith("pissa")):
        # peft changed the base weights at init: these factors fit only its residual base
        raise UnsupportedError(f"this peft LoRA was saved with init_lora_weights={residual!r}: its factors apply to peft's residual "
                               "base, not to the original model; save it in peft with path_initial_model_for_weight_conversion "
                               "(a plain LoRA against the original base) and load that")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    known: set[str] = set()
    for key, value in raw.items():
        for suffix, slot in LORA_SUFFIXES.items():
            if key.endswith(suffix):
                modules.setdefault(key[: -len(suffix)], {})[slot] = value
                known.add(key)
                break
        else:
            if key.endswith(".base_layer.weight"):
                known.add(key)  # a copy of a base embedding (save_embedding_layers): not part of the delta
    if not modules:
        raise FileFormatError(f"{path / WEIGHTS_NAME} holds no LoRA tensors")
    heads, tensors = _heads(raw, known)
    r0 = _number(cfg, "r", 8, path, integer=True, low=1)
    alpha0 = _number(cfg, "lora_alpha", 8, path)
    _number(cfg, "lora_dropout", 0.0, path, low=0, high=1)
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict):
            raise FileFormatError(f"{path / CONFIG_NAME}: {key} is {pattern!r}; it must map module patterns to numbers")
        for k in pattern:
            _number(pattern, k, None, path, integer=key == "rank_pattern", low=1 if key == "rank_pattern" else None, where=f"{key}.")
    options, targets = {}, []
    for module, slots in sorted(modules.items()):
        if "lora_A" not in slots or "lora_B" not in slots:
            raise FileFormatError(f"{path / WEIGHTS_NAME}: module {module} lacks lora_A or lora_B")
        a, b = slots["lora_A"], slots["lora_B"]
        r = a.shape[0]
        if a.dim() < 2 or b.dim() < 2 or b.shape[1] != r:
            raise FileFormatError(f"{path / WEIGHTS_NAME}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                                  f"their ranks must agree (lora_A's rows = lora_B's columns) - the file is corrupt or mixes two adapters")
        name = f"{module}.weight"
        targets.append(name)
        options[name] = {"r": r, "lora_alpha": float(pattern_value(cfg.get("alpha_pattern") or {}, module, alpha0))}
        tensors[f"{name}.lora_A"] = a.reshape(r, -1).contiguous()
        tensors[f"{name}.lora_B"] = b.reshape(b.shape[0], r).contiguous()
        if "lora_magnitude_vector" in slots:
            tensors[f"{name}.lora_magnitude_vector"] = slots["lora_magnitude_vector"].reshape(-1).contiguous()
    kinds = {}
    for module, slots in modules.items():
        a = slots["lora_A"]
        if any(k.startswith(f"{module}.lora_embedding_") for k in raw):
            kinds[f"{module}.weight"] = "embedding"
        elif a.dim() == 4:
            kinds[f"{module}.weight"] = "conv2d"
        elif cfg.get("fan_in_fan_out"):
            kinds[f"{module}.weight"] = "conv1d"
        else:
            kinds[f"{module}.weight"] = "linear"
    init = cfg.get("init_lora_weights", True)
    config = {
        **_common_config(cfg, heads), "r": r0, "lora_alpha": alpha0, "lora_dropout": float(cfg.get("lora_dropout", 0.0)),
        "use_rslora": bool(cfg.get("use_rslora", False)), "use_dora": bool(cfg.get("use_dora", False)),
        "init_lora_weights": init if init in (True, False, "gaussian") else True,
        "rank_pattern": cfg.get("rank_pattern") or {}, "alpha_pattern": cfg.get("alpha_pattern") or {},
    }
    meta = _meta("lora", config, targets, options, heads, cfg, path)
    meta["target_kinds"] = kinds
    return AdapterFile(meta, tensors)


def ia3_from_peft(cfg: dict, raw: dict, path: Path) -> AdapterFile:
    vectors = {k[: -len(".ia3_l")]: v for k, v in raw.items() if k.endswith(".ia3_l")}
    if not vectors:
        raise FileFormatError(f"{path / WEIGHTS_NAME} holds no IA3 tensors")
    heads, tensors = _heads(raw, {f"{m}.ia3_l" for m in vectors})
    targets, options, ff, kinds = [], {}, [], {}
    for module, vec in sorted(vectors.items()):
        name = f"{module}.weight"
        # peft shapes the vector (1, in) for feed-forward (input) scaling, (out, 1) otherwise;
        # convolutions use (1, n, 1, 1) for both, so fall back to the config there.
        if vec.dim() == 2:
            is_ff = vec.shape[0] == 1 and vec.shape[1] != 1
        else:
            # peft's own rule (IA3Model._check_target_module_feedforward): a string is a regex
            # matched in full, a list entry a plain suffix (no dot boundary)
            ffm = cfg.get("feedforward_modules") or []
            if isinstance(ffm, str):
                try:
                    is_ff = re.fullmatch(ffm, module) is not None
                except re.error as exc:
                    raise FileFormatError(f"{path / CONFIG_NAME}: feedforward_modules {ffm!r} is not a valid regular expression "
                                          f"({exc}); fix the file") from None
            else:
                is_ff = any(isinstance(f, str) and module.endswith(f) for f in ffm)
        targets.append(name)
        options[name] = {"feedforward": is_ff}
        if is_ff:
            ff.append(module)
        tensors[f"{name}.ia3_l"] = vec.reshape(-1).contiguous()
        kinds[name] = "conv2d" if vec.dim() == 4 else "conv1d" if cfg.get("fan_in_fan_out") else "linear"
    config = {**_common_config(cfg, heads), "feedforward": sorted(ff), "init_ia3_weights": True}
    meta = _meta("ia3", config, targets, options, heads, cfg, path)
    meta["target_kinds"] = kinds
    return AdapterFile(meta, tensors)


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    for suffix, task in (("ForSequenceClassification", "SEQ_CLS"), ("ForCausalLM", "CAUSAL_LM"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
                         ("LMHeadModel", "CAUSAL_LM")):
        if name.endswith(suffix):
            return task
    return None


def write_peft(model: nn.Module, path: str | Path, overwrite: bool = False) -> Path:
    """Write the model's adapter as a peft folder (LoRA family or IA3)."""
    from safetensors.torch import save_file

    from ..methods import method_named

    state = require_state(model)
    conv = getattr(method_named(state.method), "peft", None)
    if conv is None:
        raise UnsupportedError(f"peft has no format for graftkit's {state.method!r} adapters (only {peft_method_names()}); "
                               "save it with format='native'")
    if getattr(conv, "write_model", None) is not None:  # a soft prompt: one tensor for the whole model
        tensors, entries = conv.write_model(model, state)
        cfg = {"peft_type": conv.peft_type, "task_type": _task_type(model), "inference_mode": True,
               "base_model_name_or_path": state.base.get("name_or_path"), "revision": None, **entries}
        with atomic_dir(path, overwrite) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
        return Path(path)
    heads = set(state.train_also)
    tensors: dict[str, torch.Tensor] = {}
    modules, kinds = [], set()
    acc: dict[str, Any] = {}  # what the converter gathers across sites for its config entries
    for name, site in sites(model).items():
        if name in heads:
            tensors[PREFIX + name] = site.slot_tensors()["value"].detach().cpu().contiguous()
            continue
        module, _, attr = name.rpartition(".")
        # a converter that adapts whole modules (LN tuning) may write any of their parameters
        if attr not in getattr(conv, "parameters", ("weight",)) or site.kind == "param":
            raise UnsupportedError(f"{name}: peft cannot represent an adapter on a bare parameter; save it with format='native'")
        if module not in modules:
            modules.append(module)
        kinds.add(site.kind)
        conv.write_site(site, PREFIX + module, tensors, acc)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    head_modules = sorted({h.rsplit(".", 1)[0] for h in heads}) or None
    cfg: dict[str, Any] = {
        "peft_type": conv.peft_type, "task_type": _task_type(model), "target_modules": sorted(modules),
        "modules_to_save": head_modules, "inference_mode": True,
        "base_model_name_or_path": state.base.get("name_or_path"), "revision": None,
    }
    # a key of most of peft's weight-matrix methods (LN tuning, LoHa and LoKr warn on it: their converters say so)
    if kinds & {"linear", "conv1d", "conv2d", "embedding"} and getattr(conv, "fan_in_fan_out", True):
        cfg["fan_in_fan_out"] = "conv1d" in kinds
    cfg.update(conv.write_config(state, acc))
    with atomic_dir(path, overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    return Path(path)


def lora_site_to_peft(site, key: str, tensors: dict, acc: dict) -> None:
    module = key[len(PREFIX):]
    a, b = site.lora_A.detach().cpu(), site.lora_B.detach().cpu()
    acc.setdefault("ranks", {})[module] = site.r
    acc.setdefault("alphas", {})[module] = site.alpha
    if site.kind == "embedding":
        tensors[f"{key}.lora_embedding_A"], tensors[f"{key}.lora_embedding_B"] = a, b
    elif site.kind == "conv2d":
        w = site.base
        tensors[f"{key}.lora_A.weight"] = a.reshape(site.r, w.shape[1], *w.shape[2:])
        tensors[f"{key}.lora_B.weight"] = b.reshape(b.shape[0], site.r, 1, 1)
    else:
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
    if site.dora:
        mag = site.lora_magnitude_vector.detach().cpu()
        tensors[f"{key}.lora_magnitude_vector"] = mag.reshape(1, -1, 1, 1) if site.kind == "conv2d" else mag


def lora_peft_config(state, acc: dict) -> dict:
    ranks, alphas = acc.get("ranks", {}), acc.get("alphas", {})
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    a0 = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r0, "lora_alpha": a0, "lora_dropout": state.config.lora_dropout, "use_rslora": state.config.use_rslora,
        "use_dora": state.config.use_dora, "bias": "none", "init_lora_weights": True,
        "rank_pattern": {_exact(m): r for m, r in ranks.items() if r != r0},
        "alpha_pattern": {_exact(m): a for m, a in alphas.items() if a != a0},
    }


def ia3_site_to_peft(site, key: str, tensors: dict, acc: dict) -> None:
    vec = site.ia3_l.detach().cpu()
    if site.kind == "conv2d":
        vec = vec.reshape(1, -1, 1, 1)
    else:
        vec = vec.reshape(1, -1) if site.feedforward else vec.reshape(-1, 1)
    tensors[f"{key}.ia3_l"] = vec
    if site.feedforward:
        acc.setdefault("ff", []).append(key[len(PREFIX):])


def _exact(module: str) -> str:
    # peft matches pattern keys as r"(.*\.)?(key)$"; the full escaped path selects exactly this module
    return "^" + module.replace(".", r"\.")
