"""Bottleneck adapters: the shared machinery of Houlsby, Pfeiffer and parallel adapters.

A bottleneck adapter projects a hidden state ``h`` (width ``d``) down to ``m`` units, applies a
non-linearity ``f`` and projects back up:

    adapter(h) = W_up f(W_down h + b_down) + b_up,     W_down: m x d,  W_up: d x m

* sequential (Houlsby et al., 2019; Pfeiffer et al., 2021): the sublayer output ``h`` becomes
  ``h + adapter(h)`` before the residual connection of the block;
* parallel (He et al., 2022, "Towards a Unified View of Parameter-Efficient Transfer
  Learning"): the sublayer's output gets ``s * adapter(x)`` added, where ``x`` is the sublayer's
  *input* and ``s`` a fixed scaling factor.

``m`` is ``bottleneck_size`` or ``d // reduction_factor``. With ``init_weights`` the up-projection
starts at zero, so a fresh adapter is the identity. ``train_layer_norm`` also trains every
LayerNorm/RMSNorm of the adapted blocks (as Houlsby et al. do), saved like BitFit's biases.
Sites are built by :meth:`BottleneckMethod.make_site`; subclasses (Compacter) replace the two
projections by overriding :meth:`BottleneckSite.make_projections`, ``down`` and ``up``.

Two options of every bottleneck method change how the sites relate (:meth:`BottleneckMethod.link_sites`):

* ``connected`` (Ma et al., 2022, "Scattered or Connected? An Optimized Parameter-efficient
  Tuning Approach for Information Retrieval", CIKM): the scattered adapters become one pathway
  through the stack. With ``a_l`` the output of the l-th adapter in forward order (``a_0``'s
  predecessor is 0), each adapter also receives its predecessor's output:

      a_l = W_up f(W_down (u_l + a_{l-1}) + b_down) + b_up

  where ``u_l`` is what the plain adapter reads (``h_l``, sequential; ``x_l``, parallel) and
  the sublayer output still becomes ``h_l + a_l`` (``h_l + s a_l``). This is our reading of the
  paper's idea as the catalog and the abstract state it (extra connections make the inserted
  modules a pathway); its full text was not available to check the exact form. A zero
  up-projection keeps every ``a_l`` zero, so it is still the identity at init. One pathway per
  stack of blocks (T5's encoder and decoder each have one), ordered by module position. The
  pathway holds the adapter outputs of the current forward pass, indexed by position: the
  first adapter starts a new pass, and a recomputed layer (gradient checkpointing,
  non-reentrant as graftkit's trainer uses it) reads the same predecessor value as the original
  pass. Every adapter of a pathway must read and write one width.
* ``shared: layers``: the sites at one position of the block (names equal up to the block
  index, e.g. ``model.layers.*.mlp``) hold one set of tensors. VL-Adapter (Sung et al., 2022)
  shares adapters across *tasks* (one adapter set trained on the multitask mixture, or only
  its down or up projection shared: ``--use_single_adapter``, ``--share_down_sampler``,
  ``--share_up_sampler`` in ylsung/VL_adapter); sharing across the blocks of one model is the
  same weight tying applied along depth. The shared tensors are saved once, under the first site of the
  group; the others save nothing, so a file counts every trained parameter once and cannot
  hold copies that disagree (a file carrying a copy is refused: it has a tensor the model has
  no place for). Every site of a group must have the same shapes.
"""
from __future__ import annotations

import math
import re
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..errors import ConfigError, TargetError
from ..layers import is_conv1d, layer_kind
from ..targets import ParamInfo, find_param, wanted_layers
from .activation import ModuleInfo, ModuleMethod, ModuleSite, find_module, first_tensor, replace_first, resolve_modules
from .base import MethodConfig, Site
from .blocks import role_modules, transformer_blocks
from .inplace import DeltaSite

NON_LINEARITIES = {
    "relu": nn.functional.relu,
    "gelu": nn.functional.gelu,
    "swish": nn.functional.silu,
    "silu": nn.functional.silu,
    "tanh": torch.tanh,
    "identity": lambda x: x,
}


class BottleneckConfig(MethodConfig):
    #: bottleneck width m = hidden size // reduction_factor (when bottleneck_size is not given)
    reduction_factor: float | None = Field(default=None, gt=0)
    bottleneck_size: int | None = Field(default=None, ge=1)
    non_linearity: Literal["relu", "gelu", "swish", "silu", "tanh", "identity"] = "relu"
    #: zero up-projection: a fresh adapter is the identity
    init_weights: bool = True
    #: also train the LayerNorm/RMSNorm weights and biases of the adapted blocks
    train_layer_norm: bool = False
    #: each adapter also reads the previous adapter's output (one pathway per stack of blocks)
    connected: bool = False
    #: "layers": one adapter's tensors shared by the sites at one position of every block
    shared: Literal["layers"] | None = None

    @model_validator(mode="after")
    def _one_size(self):
        if self.reduction_factor is not None and self.bottleneck_size is not None:
            raise ConfigError(f"{type(self).__name__}: give reduction_factor or bottleneck_size, not both")
        return self

    def width(self, d: int, where: str) -> int:
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        factor = self.reduction_factor if self.reduction_factor is not None else 16
        if factor > d:
            raise ConfigError(f"reduction_factor {factor:g} is larger than the hidden size {d} of {where}: the bottleneck "
                              f"would have no units; choose a reduction_factor of at most {d} (or give bottleneck_size)")
        return max(1, int(d // factor))


def _linears(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.Linear) or is_conv1d(m)]


def in_features(module: nn.Module) -> int:
    """The width of what enters ``module`` (its first Linear/Conv1D)."""
    first = _linears(module)[:1]
    if not first:
        raise TargetError(f"cannot tell the input width of {type(module).__name__} (no Linear inside); target a Linear or a block's MLP")
    m = first[0]
    return m.in_features if isinstance(m, nn.Linear) else m.weight.shape[0]


def out_features(module: nn.Module) -> int:
    """The width of what ``module`` returns (its last Linear/Conv1D)."""
    last = _linears(module)[-1:]
    if not last:
        raise TargetError(f"cannot tell the output width of {type(module).__name__} (no Linear inside); target a Linear or a block's MLP")
    m = last[0]
    return m.out_features if isinstance(m, nn.Linear) else m.weight.shape[1]


def _param_like(module: nn.Module) -> torch.Tensor:
    return next(module.parameters())


class BottleneckSite(ModuleSite):
    """One bottleneck adapter on a module's output (``input_from``: the parallel form)."""

    slots: tuple[str, ...] = ("adapter_down", "adapter_down_bias", "adapter_up", "adapter_up_bias")

    def __init__(self, info: ModuleInfo, method: str, config: BottleneckConfig, d_in: int, d_out: int,
                 input_module: nn.Module | None = None, scaling: float = 1.0):
        super().__init__(info, method)
        like = _param_like(info.module)
        self.dtype = torch.float32 if like.dtype in (torch.float16, torch.bfloat16) else like.dtype
        self.width = config.width(d_in, info.name)
        self.act = config.non_linearity
        self.scaling = scaling
        self.d_in, self.d_out = d_in, d_out
        object.__setattr__(self, "input_module", input_module)  # parallel form: read this module's input
        self.make_projections(d_in, d_out, like.device)
        self.reset(config.init_weights)

    def make_projections(self, d_in: int, d_out: int, device) -> None:
        self.adapter_down = nn.Parameter(torch.empty(self.width, d_in, dtype=self.dtype, device=device))
        self.adapter_down_bias = nn.Parameter(torch.zeros(self.width, dtype=self.dtype, device=device))
        self.adapter_up = nn.Parameter(torch.empty(d_out, self.width, dtype=self.dtype, device=device))
        self.adapter_up_bias = nn.Parameter(torch.zeros(d_out, dtype=self.dtype, device=device))

    @torch.no_grad()
    def reset(self, identity: bool) -> None:
        nn.init.kaiming_uniform_(self.adapter_down, a=math.sqrt(5))
        if identity:
            self.adapter_up.zero_()
        else:  # a random start (tests, or users who want one): a visible but small change
            nn.init.normal_(self.adapter_up, std=0.02)
            nn.init.normal_(self.adapter_up_bias, std=0.02)

    def down(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.adapter_down, self.adapter_down_bias)

    def up(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(h, self.adapter_up, self.adapter_up_bias)

    def adapter(self, x: torch.Tensor) -> torch.Tensor:
        """``W_up f(W_down x + b_down) + b_up`` in the adapter's dtype, returned in ``x``'s."""
        h = x.to(self.dtype)
        return self.up(NON_LINEARITIES[self.act](self.down(h))).to(x.dtype)

    # -- hooks ---------------------------------------------------------------------------
    def attach(self) -> None:
        if self.input_module is not None:
            self.on_input(self._capture, self.input_module)
        self.on_output(self._after)

    def _capture(self, module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        object.__setattr__(self, "_x", x)  # read once by _after in the same forward

    def _after(self, module, args, kwargs, output):
        if not self.enabled:
            self.__dict__.pop("_x", None)
            return None
        h = first_tensor(output)
        if self.input_module is None:
            new = h + self._adapt(h)
        else:
            x = self.__dict__.pop("_x", None)
            if x is None:  # the input module did not run before this one: misplaced targets
                raise TargetError(f"{self.method}: the input module of the adapter on {type(self.owner).__name__} did not run before it")
            new = h + self.scaling * self._adapt(x)
        return replace_first(output, new)

    def _adapt(self, x: torch.Tensor) -> torch.Tensor:
        pathway = self.__dict__.get("pathway")
        return self.adapter(x) if pathway is None else pathway.run(self, x)


class Pathway:
    """The connected adapters of one stack (``connected``): the adapter outputs of the current
    forward pass by position. Not a module (it holds activations, never parameters); a deepcopy
    of the model copies it once and its sites keep pointing at the copy."""

    def __init__(self, names: list[str]):
        self.names = names
        self.outputs: dict[int, torch.Tensor] = {}

    # the outputs of the last pass are activations (non-leaf tensors after a training forward,
    # which deepcopy refuses): a copy or a pickle starts with none
    def __deepcopy__(self, memo) -> "Pathway":
        return Pathway(list(self.names))

    def __getstate__(self) -> dict:
        return {"names": self.names, "outputs": {}}

    def run(self, site: BottleneckSite, x: torch.Tensor) -> torch.Tensor:
        i = site.__dict__["link"]
        if i == 0:  # the first adapter of the stack: a new forward pass, nothing from the last one is read
            self.outputs = {}
            a = site.adapter(x)
        else:
            # by position, not "the latest": a layer recomputed under gradient checkpointing
            # reads the value its predecessor produced in the same pass
            prev = self.outputs.get(i - 1)
            if prev is None:
                raise TargetError(f"{site.method}: the connected adapter on {self.names[i - 1]} did not run before the one on "
                                  f"{self.names[i]} in this forward pass; connected adapters need every adapted block to run in order")
            a = site.adapter(x + prev)
        self.outputs[i] = a
        return a


class BottleneckMethod(ModuleMethod):
    """Shared resolution of the bottleneck family. ``roles``: the block roles adapted by default
    (``ffn_out`` etc., see :mod:`graftkit.methods.blocks`); ``parallel``: read the input of
    ``ffn_in`` and add to the output of ``ffn_out``."""

    config_cls: ClassVar[type[BottleneckConfig]] = BottleneckConfig
    roles: ClassVar[tuple[str, ...]] = ("ffn_out",)
    parallel: ClassVar[bool] = False
    site_cls: ClassVar[type[BottleneckSite]] = BottleneckSite

    @classmethod
    def resolve(cls, model: nn.Module, config: BottleneckConfig, skip=()):
        layers = _layer_indices(model, config.layers)
        if config.targets:
            names = [i.name for i in resolve_modules(model, config.targets, config.exclude, cls.name)]
            inputs = {n: n for n in names}
        else:
            names, inputs = [], {}
            for role in cls.roles:
                outs = role_modules(model, role, cls.name, layers)
                ins = role_modules(model, "ffn_in", cls.name, layers) if cls.parallel else outs
                for o, i in zip(outs, ins):
                    names.append(o)
                    inputs[o] = i
        modules = dict(model.named_modules())
        infos: list[Any] = [ModuleInfo(n, modules[n], model) for n in names if n not in skip]
        options: dict[str, dict[str, Any]] = {}
        for info in infos:
            options[info.name] = {"input_from": inputs[info.name]} if cls.parallel and inputs[info.name] != info.name else {}
            d_in = in_features(modules[inputs[info.name]]) if cls.parallel else out_features(info.module)
            config.width(d_in, info.name)  # refuse an impossible bottleneck before building anything
        if config.train_layer_norm:
            infos += _norm_params(model, [b.name for b in transformer_blocks(model) if layers is None or b.index in layers], skip)
        if not infos:
            raise TargetError(f"{cls.name}: nothing to adapt in this model")
        return infos, options

    @classmethod
    def make_site(cls, info, config: BottleneckConfig, options: dict[str, Any]) -> Site:
        if isinstance(info, ParamInfo):  # a layer norm trained alongside
            return DeltaSite(info, layer_kind(info.module, info.pname))
        source = options.get("input_from")
        if cls.parallel:
            input_module = find_module(info.root, source).module if source else None
            d_in = in_features(input_module if input_module is not None else info.module)
            return cls.site_cls(info, cls.name, config, d_in, out_features(info.module),
                                input_module=input_module if input_module is not None else info.module,
                                scaling=getattr(config, "scaling", 1.0))
        d = out_features(info.module)
        return cls.site_cls(info, cls.name, config, d, d)

    @classmethod
    def make_sites(cls, infos: list, config: BottleneckConfig, options: dict[str, dict[str, Any]]) -> list[Site]:
        return cls.link_sites(infos, super().make_sites(infos, config, options), config)

    @classmethod
    def link_sites(cls, infos: list, sites: list[Site], config: BottleneckConfig) -> list[Site]:
        """Apply ``shared`` and ``connected`` to the freshly built sites of one injection (call it
        from an overriding ``make_sites``); refuses widths the option cannot join, in one line."""
        adapters = [(i, s) for i, s in zip(infos, sites) if isinstance(s, BottleneckSite)]
        if config.shared == "layers":
            _share(cls.name, adapters)
        if config.connected:
            _connect(cls.name, adapters)
        return sites


_BLOCK_INDEX = re.compile(r"(^|\.)\d+(\.|$)")


def _stack_and_position(name: str) -> tuple[str, str]:
    """``model.layers.3.mlp`` -> (``model.layers``, ``model.layers.*.mlp``): the stack of blocks a
    module is in and its position in a block (the name up to the first numeric component)."""
    m = _BLOCK_INDEX.search(name)
    if m is None:
        return "", name
    return name[:m.start()], name[:m.start()] + m.group(1) + "*" + m.group(2) + name[m.end():]


def _share(method: str, adapters: list) -> None:
    groups: dict[str, list] = {}
    for info, site in adapters:
        groups.setdefault(_stack_and_position(info.name)[1], []).append((info, site))
    for members in groups.values():
        (first_info, first), rest = members[0], members[1:]
        for info, site in rest:
            if site.slot_shapes() != first.slot_shapes():
                got = {k: v for k, v in site.slot_shapes().items() if first.slot_shapes().get(k) != v}
                slot = next(iter(got), "adapter")
                raise ConfigError(f"{method} shared: layers: the adapter on {info.name} needs {slot} of shape "
                                  f"{got.get(slot)} but the one it would share with, on {first_info.name}, has "
                                  f"{first.slot_shapes().get(slot)} (the layers differ in width); leave shared unset "
                                  "or target modules of one width")
            for slot in first.slots:
                setattr(site, slot, getattr(first, slot))  # the same Parameter: one tensor, gradients summed
            site.slots = ()  # saved once, under the first site of the group


def _connect(method: str, adapters: list) -> None:
    stacks: dict[str, list] = {}
    for info, site in adapters:
        stacks.setdefault(_stack_and_position(info.name)[0], []).append((info, site))
    for members in stacks.values():
        root = members[0][0].root
        order = {n: k for k, (n, _) in enumerate(root.named_modules())} if root is not None else {}
        members.sort(key=lambda m: order.get(m[0].name, 0))
        first_info, first = members[0]
        for info, site in members:
            if (site.d_in, site.d_out) != (first.d_in, first.d_in):
                raise ConfigError(f"{method} connected: the adapter on {info.name} reads width {site.d_in} and writes "
                                  f"{site.d_out}, but the pathway through {first_info.name} carries width {first.d_in}; "
                                  "connected adapters pass each output on to the next adapter, so every adapted module "
                                  "must read and write one width: leave connected unset or target such modules")
        pathway = Pathway([info.name for info, _ in members])
        for k, (_, site) in enumerate(members):
            object.__setattr__(site, "pathway", pathway)  # plain attributes: neither a submodule nor saved
            object.__setattr__(site, "link", k)


def _layer_indices(model: nn.Module, layers) -> set[int] | None:
    if layers is None:
        return None
    present = sorted({b.index for b in transformer_blocks(model)})
    if not present:
        raise TargetError(f"'layers' was given but {type(model).__name__} has no transformer blocks; drop 'layers' or name modules in targets")
    return wanted_layers(present, layers)


def _norm_params(model: nn.Module, blocks: list[str], skip) -> list[ParamInfo]:
    """The weights and biases of every normalisation layer inside ``blocks``."""
    out = []
    for name, module in model.named_modules():
        if not any(name.startswith(b + ".") for b in blocks) or "norm" not in type(module).__name__.lower():
            continue
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{name}.{pname}"
            if full not in skip:
                out.append(find_param(model, full))
    return out
