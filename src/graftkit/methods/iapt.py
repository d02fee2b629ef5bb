"""IAPT: instruction-aware prompt tuning - per-layer soft prompts generated from the instruction.

Zhu, Tian, Yin, Ni, Wang, Xie, 2024, "IAPT: Instruction-Aware Prompt Tuning for Large Language
Models" (ACL 2024, arXiv:2405.18203). What the abstract fixes (the only text of the paper this
project could retrieve: the seed and every public page found carry the abstract alone; the
section and equation numbers could not be checked, so none are quoted): every Transformer layer
gets a parameter-efficient *soft prompt generator* that produces a few (the paper: four) soft
tokens from the input instruction; the generator is a bottleneck - a self-attention pooling
operation, a down projection, an activation, an up projection - and each layer learns its own
activation as a rational function.

The form implemented here, per layer ``l`` (``H^l``: the hidden states entering layer ``l``,
restricted to the instruction's positions; ``m = num_virtual_tokens``; ``r = bottleneck``)::

    A^l   = softmax_over_positions(W2^l tanh(W1^l H^l^T))        (m, len)  self-attention pooling
    S^l   = A^l H^l                                               (m, d)    m pooled vectors
    Z^l   = W_up^l R^l(W_down^l S^l + b_down^l) + b_up^l          (m, 2 * kv_heads * head_dim)
    [P_k^l; P_v^l] = Z^l                                          keys and values of m positions

The pooling is Lin et al. 2017's structured self-attention ("A Structured Self-attentive Sentence
Embedding"): ``m`` attention hops over the instruction, one pooled vector per soft token, so the
several tokens come from several learned pooling queries (``W2`` has ``m`` rows), and the down
and up projections are shared by the ``m`` tokens of a layer (that is what keeps the generator
parameter-efficient). An assumption: the abstract does not say how one pooling gives four tokens.

**Where the tokens go.** The soft tokens of layer ``l`` act as that layer's attention prefix:
real tokens attend to ``m`` extra key/value positions, as in P-tuning v2's deep prompts, and the
next layer's generator replaces them (a deep prompt inserted as hidden states and replaced at
every layer only ever contributes its keys and values to the layer it is inserted at). The up
projection therefore emits the keys and values directly (as prefix tuning's prefix), instead of a
hidden vector passed through the frozen layer's norm and key/value projections: this keeps the
method architecture-independent (Llama, GPT-2's fused ``c_attn``, BERT) and reuses the prefix
machinery of :mod:`graftkit.methods.prefix` unchanged - the cache, the extended attention mask,
the shifted positions, the refusals. It is a deviation in form, not in what attention can express.

**The rational activation** ``R^l`` is the "safe" Padé activation unit (Molina, Schramowski,
Kersting 2020, "Padé Activation Units", their safe PAU), degrees (5, 4), learnable per layer::

    R(x) = (a_0 + a_1 x + ... + a_5 x^5) / (1 + |b_1 x + b_2 x^2 + b_3 x^3 + b_4 x^4|)

The absolute value keeps the denominator >= 1: no poles, whatever the coefficients learn. The
coefficients start as a least-squares fit to an ordinary activation on [-3, 3] (``rational_init``:
GELU by default, max error 7e-4; ``relu``, ``silu``, ``tanh``), solved here in closed form
(linearised Padé fit, :func:`rational_init`), so training begins from a known activation and then
adapts it layer by layer. The degrees (5, 4) and the fitted start are PAU's; the IAPT abstract
names rational functions but not their degrees, so these are assumptions, documented as such.

**The instruction.** The generator pools only the instruction's positions, so what the prompt
summarises is known at the start of generation:

* ``graft train`` on chat / prompt-response data: the positions before the first target token of
  each row (the labels are ``-100`` on the prompt): the response never feeds its own prompts.
  The training loop registers the batch (:func:`note_instruction`), and so does a call of the
  whole model with token-aligned ``labels`` (``model(input_ids=..., labels=...)``); the site
  recognises the batch by the identity of the ``input_ids`` tensor, so a stale registration
  never applies to another call;
* classification, and any call without a registration: every real token of the input (the
  attention mask) - at generation time that is the prompt, at the prefill;
* a caller may pin it: ``with instruction(model, k)`` (the first ``k`` columns) or
  ``instruction(model, mask)`` (a boolean (batch, length) mask). A full recompute of a generated
  sequence (``generate(use_cache=False)`` re-reads prompt + generated tokens at every step) needs
  ``instruction(model, prompt_length)`` to match the cached run; with the KV cache the prompts
  are generated once, at the prefill, and stay in the cache (they enter exactly once).

A row whose instruction is empty pools nothing (its pooled vectors are zero) and gets the
generator's constant prompt.

**Capabilities.** Sequence space, no weight delta: weight-space merges, merged export and
``materialize_delta`` refuse it in one line. ``identity_at_init`` is False, as for prefix tuning:
even an all-zero key/value prefix takes softmax mass from the real tokens and shifts their
positions, so no initialisation is a no-op. Every layer carries a generator (one attention mask
covers all layers, so a layer without a prefix cannot be expressed; ``layers`` is refused). No
peft format exists for it. Saved natively as ``<base module>.<slot>`` tensors stacked over layers.

Recipe::

    method: {method: iapt, num_virtual_tokens: 4, bottleneck: 16}
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Any, Iterator, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ..errors import AdapterError, TargetError, UnsupportedError
from ..registry import METHODS
from .activation import ModuleInfo, ModuleMethod
from .base import MethodConfig
from .blocks import transformer_blocks
from .prefix import PrefixConfig, PrefixMethod, PrefixSite, base_module, check_geometry, geometry, refuse_no_cache

#: the safe PAU's degrees: numerator 5, denominator 4
P_DEGREE, Q_DEGREE = 5, 4
#: labels that are not targets (train.data.IGNORE; repeated to keep methods free of train imports)
IGNORE = -100


class IAPTConfig(MethodConfig):
    #: soft tokens per layer (the paper uses four)
    num_virtual_tokens: int = Field(4, ge=1)
    #: the generator's bottleneck width r (down projection d -> r, up projection r -> keys/values)
    bottleneck: int = Field(16, ge=1)
    #: the pooling's hidden width (Lin et al.'s d_a); default: the bottleneck
    pool_hidden: int | None = Field(None, ge=1)
    #: the activation the rational functions start as (a least-squares Padé fit)
    rational_init: Literal["gelu", "relu", "silu", "tanh"] = "gelu"

    @field_validator("targets", "exclude", "module_types", "layers")
    @classmethod
    def _no_targets(cls, value):
        if value:
            raise ValueError("iapt puts a prompt generator in every layer through the base module's key/value cache and "
                             "takes no targets, exclude, module_types or layers; remove them")
        return value


# -- the rational activation ------------------------------------------------------------------------

_TARGETS = {"gelu": nn.functional.gelu, "relu": torch.relu, "silu": nn.functional.silu, "tanh": torch.tanh}


@functools.lru_cache(maxsize=None)
def rational_init(kind: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(a_0..a_5, b_1..b_4) with R close to ``kind`` on [-3, 3]: the linearised Padé fit
    ``min sum (P(x) - y (1 + S(x)))^2`` over a grid, linear in the coefficients. The fitted
    ``S`` stays >= 0 on the grid for these targets, where the safe form's |S| equals S."""
    x = torch.linspace(-3, 3, 601, dtype=torch.float64)
    y = _TARGETS[kind](x)
    design = torch.cat([torch.stack([x ** j for j in range(P_DEGREE + 1)], 1),
                        torch.stack([-y * x ** k for k in range(1, Q_DEGREE + 1)], 1)], 1)
    sol = torch.linalg.lstsq(design, y[:, None]).solution[:, 0]
    return tuple(sol[:P_DEGREE + 1].tolist()), tuple(sol[P_DEGREE + 1:].tolist())


def rational(x: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Safe Padé activation; ``p`` (..., 6) and ``q`` (..., 4) broadcast against ``x[..., None]``
    by their leading dimensions (one set of coefficients per layer)."""
    num = p[..., P_DEGREE].unsqueeze(-1) * torch.ones_like(x)
    for j in range(P_DEGREE - 1, -1, -1):  # Horner
        num = num * x + p[..., j].unsqueeze(-1)
    den = q[..., Q_DEGREE - 1].unsqueeze(-1) * torch.ones_like(x)
    for k in range(Q_DEGREE - 2, -1, -1):
        den = den * x + q[..., k].unsqueeze(-1)
    return num / (1 + (den * x).abs())


# -- which positions are the instruction ------------------------------------------------------------

_NOTED: list[Any] = [None, None]  # [weakref to the batch's input_ids, its instruction mask]


def instruction_from_labels(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The positions before each row's first target token (labels aligned with input_ids)."""
    before = (labels != IGNORE).long().cumsum(1) == 0
    return before if attention_mask is None else before & attention_mask.bool()


def note_instruction(batch: dict[str, torch.Tensor]) -> None:
    """The training loop's causal-LM batch: its prompt positions are the instruction. Kept for
    the call that passes this very ``input_ids`` tensor (compared by identity)."""
    ids, labels = batch.get("input_ids"), batch.get("labels")
    if ids is None or labels is None or labels.shape != ids.shape:
        _NOTED[0] = _NOTED[1] = None
        return
    _NOTED[0] = weakref.ref(ids)
    _NOTED[1] = instruction_from_labels(labels, batch.get("attention_mask"))


@contextlib.contextmanager
def instruction(model: nn.Module, span: int | torch.Tensor) -> Iterator[None]:
    """Pin the instruction of the model's IAPT site: the first ``span`` columns of every call's
    input, or a boolean (batch, length) mask (cut to each call's length)."""
    sites = [s for s in model.modules() if isinstance(s, IAPTSite)]
    if not sites:
        raise AdapterError(f"{type(model).__name__} carries no iapt adapter; nothing to pin an instruction for")
    if isinstance(span, torch.Tensor) and span.dim() != 2:
        raise UnsupportedError(f"iapt: an instruction mask must be (batch, length), got shape {tuple(span.shape)}")
    old = [s._pinned for s in sites]
    for s in sites:
        s._pinned = span
    try:
        yield
    finally:
        for s, o in zip(sites, old):
            s._pinned = o


# -- the site ---------------------------------------------------------------------------------------

SLOTS = ("pool_w1", "pool_w2", "down_w", "down_b", "rational_p", "rational_q", "up_w", "up_b")


class IAPTSite(PrefixSite):
    """The generators of every layer, on the base module, stacked over layers.

    It is a prefix site whose prefix is not a parameter: the cache is filled with zero
    placeholders by the prefix machinery (so the mask, positions and length checks are the
    prefix's), then each layer's forward pre-hook overwrites its placeholders with the prompts
    generated from that layer's input, before the layer's attention reads them."""

    def __init__(self, info: ModuleInfo, method: str, config: IAPTConfig, geom: dict[str, int], layers: list[nn.Module]):
        super().__init__(info, method, PrefixConfig(num_virtual_tokens=config.num_virtual_tokens, init_weights="zero"), geom)
        del self.prefix  # the prefix is generated per input; the shared init made a table for it
        root = info.root if info.root is not None else info.module
        cfg = root.config.get_text_config() if hasattr(root.config, "get_text_config") else root.config
        d, L, m, r = int(cfg.hidden_size), geom["num_layers"], self.n, config.bottleneck
        a = config.pool_hidden or r
        kv = 2 * geom["heads"] * geom["head_dim"]
        self.hidden = d
        object.__setattr__(self, "_layers", list(layers))
        object.__setattr__(self, "_root", root if root is not info.module else None)

        def linear(out_f: int, in_f: int) -> tuple[torch.Tensor, torch.Tensor]:
            ws, bs = [], []
            for _ in range(L):
                lin = nn.Linear(in_f, out_f)
                ws.append(lin.weight.data)
                bs.append(lin.bias.data)
            return torch.stack(ws), torch.stack(bs)

        self.pool_w1 = nn.Parameter(linear(a, d)[0])
        self.pool_w2 = nn.Parameter(linear(m, a)[0])
        w, b = linear(r, d)
        self.down_w, self.down_b = nn.Parameter(w), nn.Parameter(b)
        p, q = rational_init(config.rational_init)
        self.rational_p = nn.Parameter(torch.tensor(p, dtype=torch.float32).repeat(L, 1))
        self.rational_q = nn.Parameter(torch.tensor(q, dtype=torch.float32).repeat(L, 1))
        w, b = linear(kv, r)
        self.up_w, self.up_b = nn.Parameter(w), nn.Parameter(b)
        self._pinned: int | torch.Tensor | None = None
        self._pending: tuple[Any, torch.Tensor] | None = None
        self._written = 0

    @property
    def slots(self) -> tuple[str, ...]:  # type: ignore[override]
        return SLOTS

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        return {s: getattr(self, s) for s in SLOTS}

    def slot_tensors(self) -> dict[str, torch.Tensor]:
        return self.trained_tensors()

    def slot_shapes(self) -> dict[str, tuple[int, ...]]:
        return {s: tuple(getattr(self, s).shape) for s in SLOTS}

    @torch.no_grad()
    def load_slots(self, tensors: dict[str, torch.Tensor]) -> None:
        for s in SLOTS:
            getattr(self, s).copy_(tensors[s].to(getattr(self, s).dtype))

    def fold(self, value=None) -> None:  # nothing to fold: the generator is the adapter
        return None

    def prefix_values(self) -> torch.Tensor:
        """Zero placeholders, overwritten layer by layer (see :meth:`_layer`)."""
        return self.up_b.new_zeros(self.n, self.width)

    # -- generation of the prompts ---------------------------------------------------------------
    def generate_prompts(self, index: int, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s prompt keys and values, each (batch, kv_heads, n, head_dim), from
        ``hidden`` (batch, length, d) pooled over ``mask`` (batch, length)."""
        dtype = self.up_w.dtype
        h = hidden.to(dtype)
        scores = nn.functional.linear(torch.tanh(nn.functional.linear(h, self.pool_w1[index])), self.pool_w2[index])
        scores = scores.masked_fill(~mask[..., None], float("-inf"))
        weights = torch.softmax(scores, dim=1)  # over positions, one distribution per soft token
        weights = torch.where(mask.any(1)[:, None, None], weights, torch.zeros_like(weights))  # empty: pool nothing
        pooled = torch.einsum("blm,bld->bmd", weights, h)
        z = nn.functional.linear(pooled, self.down_w[index], self.down_b[index])
        z = rational(z, self.rational_p[index], self.rational_q[index])
        kv = nn.functional.linear(z, self.up_w[index], self.up_b[index])
        g = self.geom
        kv = kv.view(kv.shape[0], self.n, 2, g["heads"], g["head_dim"]).permute(2, 0, 3, 1, 4)
        return kv[0], kv[1]

    # -- hooks -----------------------------------------------------------------------------------
    def attach(self) -> None:
        super().attach()
        for layer in self._layers:
            self.on_input(self._layer, layer)
        if self._root is not None:
            self.on_input(self._labels, self._root)

    def _labels(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # a caller computing the LM loss itself (``model(input_ids=..., labels=...)``) marks its prompt the same way
        labels, ids = kwargs.get("labels"), kwargs.get("input_ids", args[0] if args else None)
        if isinstance(labels, torch.Tensor) and isinstance(ids, torch.Tensor) and labels.shape == ids.shape:
            note_instruction({"input_ids": ids, "labels": labels, "attention_mask": kwargs.get("attention_mask")})
        return None

    def _instruction(self, kwargs: dict, source: torch.Tensor) -> torch.Tensor:
        batch, length = source.shape[0], source.shape[1]
        mask = kwargs.get("attention_mask")
        real = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == length \
            else torch.ones(batch, length, dtype=torch.bool, device=source.device)
        pin = self._pinned
        if pin is None:
            ids = kwargs.get("input_ids")
            noted = _NOTED[0]() if _NOTED[0] is not None else None
            if ids is not None and noted is not None and noted is ids:
                return _NOTED[1].to(source.device) & real
            return real
        if isinstance(pin, torch.Tensor):
            if pin.shape[0] != batch or pin.shape[1] < length:
                raise UnsupportedError(f"iapt: the pinned instruction mask is {tuple(pin.shape)}, but the input is "
                                       f"({batch}, {length}); pin a mask at least as long as the input")
            return pin[:, :length].to(device=source.device, dtype=torch.bool) & real
        cols = torch.arange(length, device=source.device) < int(pin)
        return cols[None, :] & real

    def _before(self, module: nn.Module, args: tuple, kwargs: dict):
        self._pending = None
        if not self.enabled:
            return None
        named = {**dict(zip(self.arg_names, args)), **kwargs}
        source = named.get("input_ids") if named.get("input_ids") is not None else named.get("inputs_embeds")
        out = super()._before(module, args, kwargs)
        if out is not None and source is not None and self._pending is not None:
            self._pending = (self._pending[0], self._instruction(named, source))
        return out

    def _fill(self, cache, batch: int, source: torch.Tensor):
        cache = super()._fill(cache, batch, source)
        self._pending, self._written = (cache, None), 0
        return cache

    def _layer(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._pending is None:
            return None  # a later generation step: the prompts are in the cache already
        cache, mask = self._pending
        index = self._layers.index(module)
        hidden = args[0] if args else kwargs["hidden_states"]
        k, v = self.generate_prompts(index, hidden, mask)
        store = getattr(cache, "self_attention_cache", cache)
        layer = store.layers[index]
        if layer.keys.shape[-2] != self.n:
            raise UnsupportedError(f"iapt: layer {index}'s cache holds {layer.keys.shape[-2]} positions before its attention, "
                                   f"not the {self.n} prompt placeholders; this model's cache layout is not supported")
        layer.keys = k.to(layer.keys.dtype)
        layer.values = v.to(layer.values.dtype)
        self._written += 1
        return None

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        pending, written = self._pending, self._written
        self._pending = None
        if pending is not None and written != len(self._layers):
            raise UnsupportedError(f"iapt: {type(module).__name__} ran {written} of its {len(self._layers)} layers through "
                                   "their forward hooks; the prompts of the others would stay zero")
        return super()._after(module, args, kwargs, output)


# -- the method -------------------------------------------------------------------------------------

def _layers_of(method: str, root: nn.Module, base: nn.Module, name: str, count: int) -> list[nn.Module]:
    modules = dict(base.named_modules())
    blocks = transformer_blocks(base)
    if len(blocks) != count:
        raise TargetError(f"{method}: found {len(blocks)} transformer blocks under {name!r} of {type(root).__name__}, but its "
                          f"config has {count} layers; iapt needs one generator per attention layer")
    return [modules[b.name] for b in blocks]


@METHODS.register("iapt")
class IAPT(PrefixMethod, ModuleMethod):
    name = "iapt"
    config_cls = IAPTConfig
    peft = None

    @classmethod
    def batch_hook(cls, config: Any):
        return note_instruction  # a chat row's instruction is its prompt (labels IGNORE before the response)

    @classmethod
    def resolve(cls, model: nn.Module, config: IAPTConfig, skip=()):
        name, module = base_module(model)
        refuse_no_cache(cls.name, model, module)
        geom = geometry(model)
        _layers_of(cls.name, model, module, name, geom["num_layers"])
        return [ModuleInfo(name, module, model)], {name: dict(geom)}

    @classmethod
    def make_site(cls, info: ModuleInfo, config: IAPTConfig, options: dict[str, Any]) -> IAPTSite:
        root = info.root if info.root is not None else info.module
        refuse_no_cache(cls.name, root, info.module)
        geom = geometry(root)
        check_geometry(cls.name, options, geom, type(root).__name__)
        layers = _layers_of(cls.name, root, info.module, info.name, geom["num_layers"])
        return IAPTSite(info, cls.name, config, geom, layers)

    @staticmethod
    def check_saved(adapter, name: str, options: dict, where: str) -> None:
        missing = [s for s in SLOTS if f"{name}.{s}" not in adapter.tensors]
        if missing:
            raise AdapterError(f"{where}: the iapt adapter has no tensor {name}.{missing[0]}; it is incomplete - re-save it")
        layers = {adapter.tensors[f"{name}.{s}"].shape[0] for s in SLOTS}
        if len(layers) != 1 or (isinstance(options.get("num_layers"), int) and layers != {options["num_layers"]}):
            raise AdapterError(f"{where}: the iapt tensors disagree on the layer count ({sorted(layers)}); the file is corrupt")


__all__ = ["IAPTConfig", "IAPTSite", "IAPT", "instruction", "note_instruction", "rational", "rational_init"]
