"""peft adapters of methods graftkit does not read natively (LoHa, LoKr, OFT, BOFT, AdaLoRA, HRA,
FourierFT, ...) as merge inputs: peft itself folds each adapted module into its base weight,
one module at a time.

For an adapted module ``M`` (named by the adapter file's keys), only ``M``'s own base layer is
built: a copy of that layer taken from a meta-device skeleton of the base model's architecture
(no memory), filled with the base checkpoint's ``M.*`` tensors in float32 and placed at the same
dotted path inside an otherwise empty ``nn.Module``, so that the adapter config's
``target_modules`` / ``rank_pattern`` / ``layers_to_transform`` match exactly as in the full
model. peft's own ``inject_adapter_in_model`` wraps it, ``set_peft_model_state_dict`` loads that
module's adapter tensors, and the layer's ``merge()`` folds them; the folded ``M.weight`` (and
``M.bias``) are what this input holds for those keys, cast back to the base dtype. The whole
model is never materialized: at most a few folded modules are cached. Tensors the adapter
trained whole (``modules_to_save``) replace the base tensor; every other tensor is the base's.

peft is needed only for these inputs and imported lazily. Methods whose state is shared across
layers (VeRA, VB-LoRA) cannot be folded per module and are refused with a one-line error.
"""
from __future__ import annotations

import copy
import json
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

from ..errors import UnsupportedError
from ..tensors import Checkpoint
from .adapters import OnBase

PEFT_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
CACHE_MODULES = 4


def needs_fold(path: str | Path) -> bool:
    """A peft adapter folder of a method graftkit cannot read natively."""
    p = Path(path)
    if (p / "adapter.json").exists() or not (p / PEFT_CONFIG).exists():
        return False
    try:
        peft_type = json.loads((p / PEFT_CONFIG).read_text()).get("peft_type")
    except (OSError, ValueError):  # bad JSON, not UTF-8: the peft reader reports the broken file
        return False
    from ..io.peft import converters

    # types a registered method converts are read natively (factors, no peft needed)
    return peft_type not in converters()


def _import_peft():
    try:
        import peft
    except ImportError:
        raise UnsupportedError("merging a peft adapter of a method graftkit does not read natively needs the peft package: "
                               "pip install peft") from None
    return peft


class PeftFoldSource(OnBase):
    """``base`` with a peft adapter folded in by peft, module by module, read as a Checkpoint."""

    def __init__(self, path: str | Path, base: Checkpoint, exclude=None):
        peft = _import_peft()
        from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

        self.path = Path(path)
        self.base = base
        self.files = base.files
        self.headers = base.headers
        self.config = peft.PeftConfig.from_pretrained(str(self.path))
        self.method = str(self.config.peft_type).split(".")[-1].lower()
        kind = self.config.peft_type
        if getattr(self.config, "is_prompt_learning", False) or getattr(self.config, "is_adaption_prompt", False):
            raise UnsupportedError(f"{path} is a {kind} adapter, which acts on activations (prompts/prefixes); "
                                   "weight-space merging does not apply to it")
        tuner = PEFT_TYPE_TO_TUNER_MAPPING.get(kind)
        if tuner is None or getattr(tuner, "uses_shared_state", False):
            raise UnsupportedError(f"{path} is a peft {kind} adapter, whose state is shared across layers, so it cannot be folded "
                                   "one module at a time; merge it into its base with peft (merge_and_unload) and merge that model")
        state = peft.load_peft_weights(str(self.path), device="cpu")
        skip = exclude or (lambda name: False)
        self.modules: dict[str, dict] = {}  # module name -> its adapter tensors (keys as in the file)
        self.whole: dict = {}
        for key, value in state.items():
            name = key[len(PREFIX):] if key.startswith(PREFIX) else key
            parts = name.split(".")
            at = next((i for i, part in enumerate(parts) if part.startswith(tuner.prefix)), None)
            if at is None:  # trained whole (modules_to_save): the saved key is the base tensor's name
                if not skip(name):
                    self.whole[name] = value
                continue
            module = ".".join(parts[:at])
            if skip(f"{module}.weight"):
                continue
            self.modules.setdefault(module, {})[key] = value
        self.targets: dict[str, str] = {}  # base tensor name -> adapted module
        for module in self.modules:
            if f"{module}.weight" not in base.files:
                raise UnsupportedError(f"{path} adapts {module}, but the base model {base.path} has no {module}.weight; "
                                       "it was made for another model (or another head class)")
            for key in base.files:
                if key.startswith(module + ".") and "." not in key[len(module) + 1:]:
                    self.targets[key] = module
        self._skeleton_model = None
        self._lock = threading.Lock()
        self._cache: OrderedDict = OrderedDict()

    # -- the Checkpoint interface (the rest is OnBase's) ----------------------------------------
    def adapter_keys(self) -> list[str]:
        return [*(f"{m}.weight" for m in self.modules), *self.whole]

    def adapted(self, key: str):
        module = self.targets.get(key)
        if module is None:
            return self.base.get(key)
        return self._fold(module)[key].to(self.base_dtype(key))

    # -- folding ----------------------------------------------------------------------------
    def _skeleton(self):
        """The base model's module tree on the meta device (no memory): it says which layer class
        each module is (Linear, GPT-2's Conv1D, Embedding, Conv2d, ...)."""
        if self._skeleton_model is None:
            import torch
            import transformers

            try:
                cfg = transformers.AutoConfig.from_pretrained(str(self.base.path), trust_remote_code=False)
                arch = (getattr(cfg, "architectures", None) or [None])[0]
                cls = getattr(transformers, arch, None) if arch else None
                with torch.device("meta"):
                    self._skeleton_model = cls(cfg) if cls is not None else transformers.AutoModel.from_config(cfg)
            except Exception:  # no usable config.json: fall back to plain Linear layers from the shapes
                self._skeleton_model = False
        return self._skeleton_model

    def _base_layer(self, module: str):
        import torch
        from torch import nn

        skeleton = self._skeleton()
        layer = None
        if skeleton:
            try:
                layer = copy.deepcopy(skeleton.get_submodule(module)).to_empty(device="cpu").float()
            except AttributeError:
                layer = None
        if layer is None:
            shape = self.base.shape(f"{module}.weight")
            if len(shape) != 2:
                raise UnsupportedError(f"{self.path}: cannot tell the layer class of {module} {tuple(shape)} (the base folder has "
                                       "no config.json that transformers knows); only Linear layers can be folded without it")
            layer = nn.Linear(shape[1], shape[0], bias=f"{module}.bias" in self.base.files)
        state = {}
        for local in layer.state_dict():
            full = f"{module}.{local}"
            if full not in self.base.files:
                raise UnsupportedError(f"{self.path}: the base model has no {full}, which the {type(layer).__name__} at {module} needs")
            state[local] = self.base.get(full).to(torch.float32)
        layer.load_state_dict(state)
        return layer

    def _fold(self, module: str) -> dict:
        with self._lock:
            if module in self._cache:
                self._cache.move_to_end(module)
                return self._cache[module]
            import torch
            from torch import nn

            peft = _import_peft()
            layer = self._base_layer(module)
            root = nn.Module()
            parent = root
            parts = module.split(".")
            for part in parts[:-1]:  # the module's own dotted path, so the config's patterns match as in the model
                child = nn.Module()
                parent.add_module(part, child)
                parent = child
            parent.add_module(parts[-1], layer)
            config = copy.deepcopy(self.config)
            config.inference_mode = True
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                # peft initializes the adapter before we load it: keep the caller's RNG; and a
                # rank/alpha pattern for other modules is expected not to match this one
                warnings.filterwarnings("ignore", message=r".*_pattern keys did not match")
                peft.inject_adapter_in_model(config, root, adapter_name="default")
                result = peft.set_peft_model_state_dict(root, self.modules[module], adapter_name="default")
            unexpected = [k for k in getattr(result, "unexpected_keys", []) or []]
            if unexpected:
                raise UnsupportedError(f"{self.path}: peft did not place the adapter tensor(s) {unexpected[0]} of {module}; "
                                       "the adapter does not fit this base model")
            wrapped = root.get_submodule(module)
            if not hasattr(wrapped, "merge"):
                raise UnsupportedError(f"{self.path}: peft did not wrap {module} (its config does not target it)")
            with torch.no_grad():
                wrapped.merge(adapter_names=["default"])
                base_layer = wrapped.get_base_layer()
                folded = {f"{module}.{k}": v.detach().clone() for k, v in base_layer.state_dict().items()
                          if f"{module}.{k}" in self.targets}
            self._cache[module] = folded
            while len(self._cache) > CACHE_MODULES:
                self._cache.popitem(last=False)
            return folded
