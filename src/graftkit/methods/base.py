"""The tuning-method protocol.

A method adapts a set of base parameters. For each one it attaches a :class:`Site`: a small
``nn.Module`` stored under ``<owner>.graft_adapter[<param attr>]`` that holds the method's
trainable tensors ("slots") and knows how to

* change the owner's forward without touching its parameters (factored forward through
  forward hooks, or a class-level property for bare parameters),
* fold itself into the base weight (``merge``) and take itself out again (``unmerge``),
* be switched off (``disable``) and on,
* produce the dense delta it represents (``delta``), in the base parameter's own layout.

Base parameters keep their names, so the base part of the state dict is unchanged by
injection; the adapter's tensors live under ``...graft_adapter...`` and are saved as
``<base parameter name>.<slot>``.

Weight-space methods with their own slots (LoRA, IA3) are *unmerged* after injection;
in-place methods (BitFit, full fine-tuning) train the base tensors themselves and keep a
frozen copy of the starting values, so their delta is ``theta - theta0`` and merging is a
no-op.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Mapping

import torch
from pydantic import AliasChoices, Field
from torch import nn

from ..config import StrictModel
from ..errors import TargetError
from ..layers import layer_kind
from ..targets import ParamInfo, resolve_targets

HOLDER = "graft_adapter"


class MethodConfig(StrictModel):
    """Selection keys shared by every method (see :mod:`graftkit.targets`)."""

    targets: list[str] = Field(default_factory=list, validation_alias=AliasChoices("targets", "target_modules"))
    exclude: list[str] = Field(default_factory=list, validation_alias=AliasChoices("exclude", "exclude_modules"))
    module_types: list[str] | None = None
    layers: list[int] | str | None = Field(default=None, validation_alias=AliasChoices("layers", "layers_to_transform"))
    # Parameters trained and saved whole (peft's modules_to_save), e.g. a new classifier head.
    train_also: list[str] = Field(default_factory=list, validation_alias=AliasChoices("train_also", "modules_to_save"))


class Site(nn.Module):
    """One adapted base parameter ``owner.<pname>``."""

    slots: ClassVar[tuple[str, ...]] = ()
    inplace: ClassVar[bool] = False

    def __init__(self, info: ParamInfo, kind: str):
        super().__init__()
        # A plain attribute, not a submodule: the owner must not become its own descendant.
        object.__setattr__(self, "owner", info.module)
        self.pname = info.pname
        self.kind = kind
        self.merged = False
        self.enabled = True

    # -- access -------------------------------------------------------------------------
    @property
    def base(self) -> nn.Parameter:
        return self.owner._parameters[self.pname]

    def slot_tensors(self) -> dict[str, torch.Tensor]:
        return {s: getattr(self, s) for s in self.slots}

    def slot_shapes(self) -> dict[str, tuple[int, ...]]:
        return {s: tuple(t.shape) for s, t in self.slot_tensors().items()}

    @torch.no_grad()
    def load_slots(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, value in tensors.items():
            getattr(self, name).copy_(value.to(getattr(self, name).dtype))

    # -- the protocol ---------------------------------------------------------------------
    def attach(self) -> None:
        """Install forward hooks / properties on the owner."""

    def detach(self) -> None:
        for hooks in (self.owner._forward_hooks, self.owner._forward_pre_hooks):
            for key in [k for k, h in hooks.items() if getattr(h, "__self__", None) is self]:
                del hooks[key]
                self.owner._forward_hooks_with_kwargs.pop(key, None)
                self.owner._forward_pre_hooks_with_kwargs.pop(key, None)

    def delta(self) -> dict[str, torch.Tensor]:
        """Dense delta per owner attribute (usually just ``{pname: ...}``), float32."""
        raise NotImplementedError

    def merge(self) -> None:
        raise NotImplementedError

    def unmerge(self) -> None:
        raise NotImplementedError

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = enabled

    def restore_base(self) -> None:
        """Bring the owner's tensors back to the base values (used by unload without merge)."""
        if self.merged:
            self.unmerge()


Space = Literal["weight", "activation", "sequence"]


@dataclass(frozen=True)
class SavedTarget:
    """One target of a saved adapter, as a merge reads it (no model is built)."""

    name: str  # the base parameter name
    slots: dict[str, torch.Tensor]  # the method's tensors of this target, by slot name
    config: dict[str, Any]  # the adapter's method config (adapter.json ``config``)
    options: dict[str, Any]  # this target's options (adapter.json ``target_options``)
    kind: str | None  # the layer kind when adapter.json records it
    base_shape: tuple[int, ...]
    base_keys: Any  # container of the base checkpoint's tensor names (``in`` works)
    where: str  # the adapter's path, for messages
    #: ``check_fits(kind, feedforward=False)``: refuse slots that do not fit the base weight
    check_fits: Callable[..., None]
    #: every tensor of the adapter by key (a method's tensors shared across targets are saved once)
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeDelta:
    """The delta of one base tensor: ``fn(base value) -> float32 delta``, computed on request so
    a merge never holds a dense copy. ``kind`` and ``factors`` (method-specific, e.g. LoRA's
    ``(A, B, scaling, magnitude)``) are kept for outputs that re-factor deltas."""

    kind: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    factors: tuple = ()


@dataclass(frozen=True)
class PeftConverter:
    """peft's format of a method. ``read(cfg, raw, path)`` turns an adapter_config.json and its
    tensors (prefix stripped) into an AdapterFile; ``write_site(site, key, tensors, acc)`` adds one
    site's tensors under peft key prefix ``key`` (``acc``: a dict shared across sites);
    ``write_config(state, acc)`` returns the method's entries of adapter_config.json.

    Prompt learning (soft prompts, prefixes) is written from the whole model instead:
    ``write_model(model, state) -> (tensors, config entries)``, and its keys carry ``prefix``
    (:data:`PEFT_PROMPT_PREFIX`: peft wraps such a model one level less deep than LoRA's)."""

    peft_type: str
    read: Callable[[dict, dict, Any], Any]
    write_site: Callable[[Any, str, dict, dict], None] | None = None
    write_config: Callable[[Any, dict], dict] | None = None
    write_model: Callable[[nn.Module, Any], tuple[dict, dict]] | None = None
    prefix: str | None = None  # the key prefix peft's files carry; None: io/peft.py's PREFIX


#: peft's prompt-learning model wraps the base one level less deep than LoRA's: its heads trained
#: whole (modules_to_save, e.g. a classifier) are saved as ``base_model.<module>.<parameter>``
PEFT_PROMPT_PREFIX = "base_model."


class MethodTraining:
    """A method's part in the training loop (``TuningMethod.training``). Every hook is optional; the
    loop (graftkit.train.loop) calls them in this order:

    * ``start(model, forward, batches, total_steps)`` once, after injection and before the optimizer
      is built: a data-driven start (EVA's SVD of layer inputs), a selection of what trains
      (GreenTrainer), a first training phase of its own. ``forward(batch) -> loss`` runs the model on a
      batch of ``batches`` (the first few training micro-batches, on the run's device) with the loop's
      loss; the hook may change ``requires_grad`` and the sites' tensors.
    * ``extra_loss(model)`` per micro-batch, after the forward: a scalar added to the task loss before
      backward (diff pruning's L0 penalty, DEFT's density loss, AdaLoRA's orthogonality), or None. The
      logged ``loss`` stays the task loss; the extra loss is logged as ``method_loss``.
    * ``before_update(model, step)`` after backward and clipping, before ``optimizer.step()``: the
      gradients are there (AdaLoRA's sensitivities, a gradient mask).
    * ``after_update(model, step) -> bool`` after ``optimizer.step()``: pruning, rank allocation, a
      phase change. True means the set or the shapes of the trainable tensors changed: the loop
      builds the optimizer anew (the schedule goes on where it was).
    * ``report(model) -> dict`` at the end: numbers for the run's summary and run.json (sparsity
      reached, activation density, FLOPs saved, parameters pruned), JSON-able.

    ``resumable`` False: a checkpoint cannot restore the method's own state (e.g. pruned shapes), so
    ``graft train --resume`` refuses in one line instead of resuming wrongly. ``changes_what_trains``
    False (the method only adds a loss or reads the batches): an FSDP2-sharded run may use it.
    ``restart_schedule`` True: when ``after_update`` reports a change, the recipe's learning-rate
    schedule (warmup and decay) runs again over the steps left (a new training phase, LT-SFT's second);
    otherwise it goes on where it was."""

    resumable: bool = True
    changes_what_trains: bool = True
    restart_schedule: bool = False
    #: how many training micro-batches ``start`` wants (0: none)
    batches_needed: int = 0
    #: the recipe's peak learning rate, set by the loop before ``start`` (a method that probes an update)
    lr: float | None = None

    def start(self, model: nn.Module, forward: Callable[[dict], torch.Tensor], batches: list[dict], total_steps: int) -> None:
        pass

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def before_update(self, model: nn.Module, step: int) -> None:
        pass

    def after_update(self, model: nn.Module, step: int) -> bool:
        return False

    def report(self, model: nn.Module) -> dict[str, Any]:
        return {}


class TuningMethod:
    """A registered tuning method: a config schema, a way to build sites, and its capabilities
    (``space``, ``has_weight_delta``, ``identity_at_init``, ``merge_deltas``, ``peft``), which the
    rest of graftkit queries instead of testing method names."""

    name: ClassVar[str]
    config_cls: ClassVar[type[MethodConfig]]
    #: layer kinds (see graftkit.layers) the method can adapt
    kinds: ClassVar[tuple[str, ...]]
    #: where the method acts: "weight" (changes base weights), "activation" (hidden states,
    #: through hooks) or "sequence" (the input sequence, e.g. prompt tuning)
    space: ClassVar[Space] = "weight"
    #: whether a dense per-weight delta exists (``materialize_delta``, ``merge_adapter``)
    has_weight_delta: ClassVar[bool] = True
    #: whether a freshly injected adapter leaves the model's outputs unchanged
    identity_at_init: ClassVar[bool] = True
    #: how peft's format of the same method is read and written (io/peft.py), None when peft
    #: has no such method
    peft: ClassVar["PeftConverter | None"] = None
    #: whether a saved adapter holds low-rank factors ``lora_A``/``lora_B`` of its delta, so a
    #: merge of such adapters can be written back as a LoRA (merge/to_adapter.py)
    low_rank_factors: ClassVar[bool] = False

    #: a saved adapter of this method as per-key deltas for a merge: called per target with
    #: :class:`SavedTarget` and returning ``{base parameter name: MergeDelta}``; None when the
    #: method's adapters cannot be merge inputs (they must be exported merged first)
    merge_deltas: ClassVar[Callable[["SavedTarget"], dict[str, "MergeDelta"]] | None] = None
    #: ``check_saved(adapter_file, name, options, where)``: refuse a saved target whose slots
    #: disagree with each other or with adapter.json (one line); None: nothing to check
    check_saved: ClassVar[Callable[[Any, str, dict, str], None] | None] = None
    #: ``saved_shapes(adapter_file, name, kind, base_shape, feedforward) -> {tensor key: shape}``:
    #: the shapes a saved target's slots must have on a base weight; None: not checked
    saved_shapes: ClassVar[Callable[[Any, str, str, tuple, bool], dict[str, tuple]] | None] = None

    @classmethod
    def frozen_base_in_bf16(cls, config: dict[str, Any]) -> bool:
        """Whether training may hold the frozen base linears in bf16 under bf16 precision (the
        method's forward never needs their exact float32 values)."""
        return False

    @classmethod
    def trains_on_quantized_base(cls, config: dict[str, Any]) -> bool:
        """Whether an adapter with ``config`` (a dict) can train on a 4-bit base (QLoRA): its
        forward adds to the base layer's output and neither it nor its delta reads the base weights."""
        return False

    @classmethod
    def training(cls, config: Any) -> "MethodTraining | None":
        """What the method does during ``graft train`` beyond its forward pass (an extra loss, a
        data-driven start, pruning or rank allocation between steps), or None; ``config`` is the
        method's config dict (without ``method``)."""
        return None

    @classmethod
    def batch_hook(cls, config: Any) -> "Callable[[dict], None] | None":
        """A function the training loop calls with each causal-LM batch before its forward pass (the
        method reads something only the batch knows, e.g. IAPT's instruction span), or None."""
        return None

    @classmethod
    def weight_delta(cls, config: Any) -> bool:
        """Whether an adapter of this method with ``config`` (a MethodConfig or its dict) has a
        dense per-weight delta; a composition answers for its parts."""
        return cls.has_weight_delta

    @classmethod
    def find(cls, model: nn.Module, name: str) -> ParamInfo:
        """The attachment point a saved adapter names (a parameter; module methods: a module)."""
        from ..targets import find_param

        return find_param(model, name)

    @classmethod
    def eligible(cls, info: ParamInfo) -> bool:
        return layer_kind(info.module, info.pname) in cls.kinds and info.param.dim() >= 1

    @classmethod
    def resolve(cls, model: nn.Module, config: MethodConfig, skip=()) -> tuple[list[ParamInfo], dict[str, dict[str, Any]]]:
        """Parameters to adapt and per-parameter options (saved with the adapter)."""
        if not config.targets:
            raise TargetError(f"{cls.name}: no targets given; name parameter or module patterns (e.g. targets=['q_proj', 'v_proj'] or ['all-linear'])")
        infos = resolve_targets(
            model, config.targets, exclude=config.exclude, module_types=config.module_types,
            layers=config.layers, eligible=cls.eligible, what=cls.name, skip=skip,
        )
        return infos, {i.name: cls.site_options(config, i) for i in infos}

    @classmethod
    def site_options(cls, config: MethodConfig, info: ParamInfo) -> dict[str, Any]:
        return {}

    @classmethod
    def make_site(cls, info: ParamInfo, config: MethodConfig, options: dict[str, Any]) -> Site:
        raise NotImplementedError

    @classmethod
    def make_sites(cls, infos: list, config: MethodConfig, options: dict[str, dict[str, Any]]) -> list[Site]:
        """Every site of one injection; methods whose sites share tensors (Compacter's shared
        matrices, shared adapters) override this to build the shared part once."""
        return [cls.make_site(info, config, options.get(info.name, {})) for info in infos]


def matches_any(patterns, name: str, module_name: str) -> bool:
    from ..targets import pattern_matches

    info = ParamInfo(name, module_name, name.rsplit(".", 1)[-1], None, None)  # type: ignore[arg-type]
    return any(pattern_matches(p, info) for p in patterns)


def install_property(owner: nn.Module, pname: str) -> None:
    """Parametrization fallback for a bare parameter: make ``owner.<pname>`` read as the
    adapted value through a per-instance subclass with a property. Unlike
    ``torch.nn.utils.parametrize`` this keeps the parameter in ``owner._parameters`` under
    its own name, so state-dict keys do not change.

    The subclass can end up shared (``copy.deepcopy`` copies the instance, not its class),
    so which properties are live is recorded per instance (``_graft_props``) and the class
    is never edited on removal: an instance goes back to its base class when it has none left.
    """
    cls = type(owner)
    if not getattr(cls, "_graft_swapped", False):
        cls = type(f"Grafted{cls.__name__}", (cls,), {"_graft_swapped": True, "_graft_base_class": cls})
        owner.__class__ = cls
    owner.__dict__.setdefault("_graft_props", set()).add(pname)

    def read(module, _p=pname):
        param = module._parameters[_p]
        if _p not in module.__dict__.get("_graft_props", ()):
            return param
        return module._modules[HOLDER][_p].effective(param)

    if not isinstance(cls.__dict__.get(pname), property):
        setattr(cls, pname, property(read))


def remove_property(owner: nn.Module, pname: str) -> None:
    live = owner.__dict__.get("_graft_props")
    if live is None:
        return
    live.discard(pname)
    if not live:
        del owner.__dict__["_graft_props"]
        owner.__class__ = type(owner)._graft_base_class


def first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    return next(iter(kwargs.values()))
