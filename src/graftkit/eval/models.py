"""Loading a model to evaluate, its tokenizer, and the classification head each task uses.

A model is an HF folder or packaged alias (a merge output is just a folder), optionally with
a native or peft adapter applied on it (:func:`graftkit.io.load_base_for` +
:func:`~graftkit.io.apply_adapter`, which checks the base fingerprint: an adapter made for
another base is refused with one line). In float32 the adapter is folded into the weights
(``unload(merge=True)``), which leaves the outputs unchanged up to float rounding and makes
the forward the plain model's; in lower precision folding would round, so the adapter stays
unmerged.

Classification heads. A classification task may use a head other than the model's own, so
that a merged body can be read out with each task's expert classifier. Precedence:
``model.heads[task]`` > ``task.head`` > the model's own classifier. A head source is an HF
model folder (the tensors of the head module - ``classifier.*`` for BERT-style models,
``score.*`` for decoder models - read from its safetensors, labels from ``config.json``'s
``id2label``) or an adapter folder (its ``train_also`` head tensors ``<name>.value`` and
``base_model.id2label``). The head's output layer may have any number of labels; every
other shape must match the model's. File labels map to head outputs by name.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import EvalError, FileFormatError
from .config import ModelSpec

HEAD_MODULES = ("classifier", "score")  # encoder-style and decoder-style *ForSequenceClassification
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


# -- tokenizers ----------------------------------------------------------------------------------

def tokenizer_folder(spec: ModelSpec) -> Path:
    from ..assets import model_dir

    if spec.tokenizer is None and spec.bundle is not None:
        from ..analysis.tall import task_folder

        return task_folder(spec.bundle, spec.bundle_task)  # the expert's tokenizer files, stored beside its mask
    return model_dir(spec.tokenizer or spec.path)


def tokenizer_key(folder: Path) -> str:
    """Identity of a tokenizer: a hash of its files' bytes, so the copies that every merge output
    and fine-tune carries of one tokenizer share one entry of the tokenization cache."""
    h = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        f = folder / name
        if f.is_file():
            found = True
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    if not found:
        raise FileFormatError(f"{folder} holds no tokenizer files (tokenizer.json, vocab.txt, ...); "
                              "set `tokenizer:` on the model to a folder that has them")
    return h.hexdigest()[:20]


def load_tokenizer(folder: Path):
    from ..io.hf import load_tokenizer as _load

    try:
        return _load(folder)
    except (OSError, ValueError) as exc:
        raise FileFormatError(f"could not load the tokenizer in {folder}: {str(exc).splitlines()[0]}; "
                              "set `tokenizer:` on the model to a folder with a tokenizer") from None


def pad_id(tokenizer) -> int:
    for v in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if v is not None:
            return int(v)
    return 0


# -- heads ---------------------------------------------------------------------------------------

@dataclass
class Head:
    """A classifier: tensors keyed by the model's head parameter names, and its label names."""

    tensors: dict[str, torch.Tensor]
    labels: list[str]
    source: str

    def index(self) -> dict[str, int]:
        """Label name -> output id. When the labels are transformers' defaults (LABEL_0, ...), a
        file's integer labels 0..n-1 name the outputs directly."""
        out = {name: i for i, name in enumerate(self.labels)}
        if all(name == f"LABEL_{i}" for i, name in enumerate(self.labels)):
            out.update({str(i): i for i in range(len(self.labels))})
        return out


def head_module_name(model: nn.Module) -> str | None:
    for name in HEAD_MODULES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    return None


def _output_layer(module: nn.Module, prefix: str) -> tuple[str, nn.Module]:
    """The head's last Linear: its rows are the labels (BERT's classifier is itself that Linear,
    RoBERTa's is dense -> out_proj)."""
    if isinstance(module, nn.Linear):
        return prefix, module
    last = None
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            last = (f"{prefix}.{name}", sub)
    if last is None:
        raise EvalError(f"the {prefix} head of this model has no Linear output layer; graftkit cannot swap its classifier")
    return last


def head_keys(model: nn.Module) -> tuple[list[str], set[str]]:
    """(state-dict keys of the head module, the keys whose first dimension is the label count)."""
    name = head_module_name(model)
    if name is None:
        raise EvalError(f"{type(model).__name__} has no classifier or score head; classification needs a *ForSequenceClassification model")
    module = getattr(model, name)
    keys = [f"{name}.{k}" for k, _ in module.named_parameters()]
    out_name, out = _output_layer(module, name)
    label_keys = {f"{out_name}.weight"} | ({f"{out_name}.bias"} if out.bias is not None else set())
    return keys, label_keys


def _labels_from(id2label: Any, n: int) -> list[str]:
    if isinstance(id2label, dict) and len(id2label) == n:
        try:
            return [str(id2label[k]) for k in sorted(id2label, key=lambda k: int(k))]
        except (TypeError, ValueError):
            pass
    return [f"LABEL_{i}" for i in range(n)]


def read_head(source: str | Path, model: nn.Module) -> Head:
    """The classifier stored in an HF model folder or an adapter folder, keyed like ``model``'s head."""
    from ..assets import model_dir

    path = Path(source)
    keys, label_keys = head_keys(model)
    label_key = sorted(label_keys, key=lambda k: not k.endswith(".weight"))[0]
    if (path / "adapter.json").exists() or (path / "adapter_config.json").exists():
        from ..io import read_adapter

        adapter = read_adapter(path)
        missing = [k for k in keys if k not in adapter.train_also or f"{k}.value" not in adapter.tensors]
        if missing:
            trained = ", ".join(adapter.train_also) or "none"
            raise EvalError(f"head source {path} is an adapter without the head tensor {missing[0]} (it trains whole: {trained}); "
                            "give the adapter of a classification fine-tune, or its merged model folder")
        tensors = {k: adapter.tensors[f"{k}.value"] for k in keys}
        id2label = (adapter.meta.get("base_model") or {}).get("id2label")
    else:
        try:
            folder = model_dir(str(source))
        except FileFormatError:
            raise EvalError(f"head source {source} is neither an HF model folder (config.json) nor an adapter folder "
                            "(adapter.json / adapter_config.json)") from None
        from ..tensors import Checkpoint

        ckpt = Checkpoint(folder)
        missing = [k for k in keys if k not in ckpt.files]
        if missing:
            raise EvalError(f"head source {folder} has no tensor {missing[0]} (the head of a {type(model).__name__}); "
                            "give a fine-tuned classification model of the same architecture")
        tensors = {k: ckpt.get(k) for k in keys}
        try:
            id2label = json.loads((folder / "config.json").read_text()).get("id2label")
        except (OSError, ValueError, AttributeError):  # no usable config: labels by index
            id2label = None
    n = tensors[label_key].shape[0]
    head = Head(tensors, _labels_from(id2label, n), str(source))
    check_fits(model, head)
    return head


def own_head(model: nn.Module, present: bool, where: str) -> Head | None:
    if not present:
        return None
    keys, label_keys = head_keys(model)
    params = dict(model.named_parameters())
    tensors = {k: params[k].detach().clone() for k in keys}
    n = tensors[sorted(label_keys)[-1]].shape[0]
    return Head(tensors, _labels_from(model.config.id2label, n), f"the model's own head ({where})")


def check_fits(model: nn.Module, head: Head) -> None:
    """Every head tensor has the model's shape, except the label count of the output layer."""
    keys, label_keys = head_keys(model)
    params = dict(model.named_parameters())
    for key in keys:
        t, p = head.tensors[key], params[key]
        same = tuple(t.shape) == tuple(p.shape) if key not in label_keys else tuple(t.shape[1:]) == tuple(p.shape[1:])
        if not same:
            raise EvalError(f"head {head.source}: tensor {key} has shape {tuple(t.shape)} but this model's head needs "
                            f"{'(labels' + ''.join(f', {d}' for d in p.shape[1:]) + ')' if key in label_keys else tuple(p.shape)}; "
                            "the head comes from a model of another size")


def install_head(model: nn.Module, head: Head) -> None:
    """Put ``head``'s tensors into the model's head module (the label count may change)."""
    check_fits(model, head)
    keys, _ = head_keys(model)
    params = dict(model.named_parameters())
    n = len(head.labels)
    for key in keys:
        owner_name, pname = key.rsplit(".", 1)
        owner = model.get_submodule(owner_name)
        p = params[key]
        setattr(owner, pname, nn.Parameter(head.tensors[key].to(device=p.device, dtype=p.dtype).clone(), requires_grad=False))
        if isinstance(owner, nn.Linear) and pname == "weight":
            owner.out_features = n
    model.config.id2label = dict(enumerate(head.labels))
    model.config.label2id = {name: i for i, name in enumerate(head.labels)}
    if hasattr(model, "num_labels"):
        model.num_labels = n


# -- models --------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    spec: ModelSpec
    model: nn.Module
    kind: str  # "classification" | "causal-lm"
    own: Head | None = None  # the classifier the model came with, if it has one


def _checkpoint_has(folder: Path, keys: list[str], allow_pickle: bool) -> bool:
    from ..tensors import Checkpoint

    try:
        files = Checkpoint(folder, allow_pickle=allow_pickle).files
    except FileFormatError:
        return False
    return all(k in files for k in keys)


def load(spec: ModelSpec, kind: str, device: torch.device | str = "cpu") -> LoadedModel:
    """Load ``spec`` with a classification or causal-LM head, adapter applied (and folded when exact)."""
    from ..assets import model_dir
    from ..io.hf import HEAD_SUFFIXES, load_model

    dtype = DTYPES[spec.dtype]
    if spec.bundle is not None:
        return _load_bundle_expert(spec, kind, dtype, device)
    folder = model_dir(spec.path)
    adapter = None
    if spec.adapter:
        from ..io import apply_adapter, load_base_for, read_adapter

        adapter = read_adapter(spec.adapter, allow_pickle=spec.allow_pickle)
        model = load_base_for(adapter, spec.path, dtype=dtype, allow_pickle=spec.allow_pickle)
        if not type(model).__name__.endswith(HEAD_SUFFIXES[kind]):
            raise EvalError(f"model {spec.name!r}: adapter {spec.adapter} was made on a {type(model).__name__}, "
                            f"which cannot run {kind} tasks; evaluate it on tasks of its own kind")
        apply_adapter(model, adapter, force=spec.force)
    else:
        model = load_model(spec.path, head=kind, dtype=dtype, allow_pickle=spec.allow_pickle)
    model.eval()
    own = None
    if kind == "classification":
        keys, _ = head_keys(model)
        present = _checkpoint_has(folder, keys, spec.allow_pickle) or (adapter is not None and set(keys) <= set(adapter.train_also))
        own = own_head(model, present, spec.source)
    if adapter is not None:
        from ..adapter import unload

        from ..methods import method_named

        # folding is exact only where the weights keep full precision; bf16/fp16 would round;
        # an adapter that changes activations has nothing to fold and stays attached
        if all(p.dtype in (torch.float32, torch.float64) for p in model.parameters()) and \
                method_named(adapter.method).weight_delta(adapter.meta.get("config") or {}):
            unload(model, merge=True)
    return _ready(spec, model, kind, own, device)


def _ready(spec: ModelSpec, model: nn.Module, kind: str, own: Head | None, device) -> LoadedModel:
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(device)
    return LoadedModel(spec, model, kind, own)


def _load_bundle_expert(spec: ModelSpec, kind: str, dtype, device) -> LoadedModel:
    """Expert ``spec.bundle_task`` of TALL bundle ``spec.bundle``, rebuilt in memory by the generator
    ``graft decompress`` writes from (:func:`graftkit.analysis.tall.rebuild`), and handed to
    transformers as a state dict: the weights, missing-key handling and dtype cast are those of
    loading the decompressed folder, so the scores are the same."""
    from ..analysis.tall import open_expert
    from ..assets import model_dir
    from ..io.hf import model_class, model_config

    base = model_dir(spec.path) if spec.path else None
    expert = open_expert(spec.bundle, spec.bundle_task, base, base_hint="as `path:` on the model")
    cls = model_class(expert.folder, None, kind)  # as graft eval loads the decompressed folder
    config = model_config(expert.folder)
    state = dict(expert.tensors())
    del expert  # the unpacked masks: a byte per merged parameter
    model = cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    model.config._name_or_path = spec.source
    model.eval()
    own = None
    if kind == "classification":
        keys, _ = head_keys(model)
        own = own_head(model, set(keys) <= set(state), spec.source)
    del state
    return _ready(spec, model, kind, own, device)


def choose_head(loaded: LoadedModel, task_name: str, task_head: str | None) -> Head:
    """model.heads[task] > task.head > the model's own head."""
    source = loaded.spec.heads.get(task_name) or task_head
    if source is not None:
        return read_head(source, loaded.model)
    if loaded.own is None:
        raise EvalError(f"model {loaded.spec.name!r} ({loaded.spec.source}) has no classification head for task {task_name!r}; "
                        f"give `head:` on the task (or `heads: {{{task_name}: ...}}` on the model) naming a fine-tuned "
                        "classification model folder or adapter folder")
    return loaded.own
