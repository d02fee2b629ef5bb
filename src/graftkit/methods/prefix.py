"""Per-layer key/value prefixes: the machinery shared by prefix tuning and P-tuning v2.

A prefix method gives every attention layer ``l`` trainable keys ``P_k^l`` and values ``P_v^l``
for ``n`` virtual positions (``n = num_virtual_tokens``). Attention at layer ``l`` then reads

    softmax(Q [P_k^l; K]^T / sqrt(d)) [P_v^l; V]

so every real token attends to the ``n`` prefix positions as well as to the real ones, while
the prefix itself is never computed from the input (it has no query and no residual stream).

How it enters the model (graftkit's sequence space, see docs/architecture.md): the site lives
on the model's BASE module (``LlamaModel``, ``GPT2Model``, ``BertModel``: what
``model.base_model`` returns) and saves its tensor as ``<base module>.prefix``. A forward
pre-hook with kwargs on that module

* fills the key/value cache with the prefix of every layer (batch-expanded) when the caller
  gave no cache, or an empty one (``generate``'s first step): the model's own attention then
  concatenates it with the real keys/values, in every attention implementation;
* extends a 2-D attention mask by ``n`` ones on the left, on every call (``generate`` keeps
  its mask over the real tokens only);
* shifts given ``position_ids`` by ``n``, as peft does (``PeftModel._adjust_prompt_learning_kwargs``):
  without them the model counts positions from the cache length, so the real tokens sit at
  positions ``n, n+1, ...`` either way (learned position tables, rotary phases).

Later generation steps find the prefix in the cache ``generate`` carries and add nothing but
the mask: the prefix enters exactly once, and a cached run equals a full recompute (greedy,
beam search - the cache reorders its rows - and left-padded batches alike).

The hidden states of the real tokens are the model's whole output (the prefix has no
positions of its own there), so heads pool what they always pool: BERT's [CLS] (the first real
token), a decoder classifier's last real token.

The prefix tensor has peft's layout: one row per virtual token, ``num_layers * 2 * heads *
head_dim`` wide, layer by layer, keys before values (``PrefixEncoder``'s ``prompt_embeddings``),
with ``heads`` the number of key/value heads (grouped-query attention keeps fewer). A peft
folder therefore converts with no reshaping, and its ``num_layers`` / ``token_dim`` /
``num_attention_heads`` are checked against the model.

With ``prefix_projection`` (Li & Liang's reparameterisation) the site trains a smaller table
``E`` (``n x token_dim``) and a two-layer MLP ``W2 tanh(W1 E + b1) + b2``; saving folds it: the
saved adapter holds the prefix the MLP produces (what peft saves too), and loading it gives a
folded site that trains the prefix directly.

Refusals (one line each): a model whose base module takes no cache (DistilBERT, for example),
the prefix plus the input past the model's position table or past a sliding attention window
(that cache keeps the last ``window`` positions only), a fixed-size (static) cache, packed
batches (position ids that restart within a row: the per-example attention blocks cannot hold a
shared prefix), gradient checkpointing (transformers drops the cache in a checkpointed layer,
and the prefix with it), and a saved prefix whose layer count or head sizes differ from the
model's.
"""
from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..errors import AdapterError, ConfigError, FileFormatError, TargetError, UnsupportedError
from .activation import ModuleInfo, ModuleSite
from .base import PEFT_PROMPT_PREFIX, MethodConfig, PeftConverter

#: the one slot a saved prefix adapter holds: peft's ``prompt_embeddings``
SLOT = "prefix"


class PrefixConfig(MethodConfig):
    """Options shared by the prefix methods (peft's ``PrefixTuningConfig`` names)."""

    num_virtual_tokens: int = Field(20, ge=1)
    #: train the prefix through a two-layer MLP (folded when saved)
    prefix_projection: bool = False
    #: the MLP's hidden width (peft's default: the key/value width ``token_dim``)
    encoder_hidden_size: int | None = Field(None, ge=1)
    #: "normal": N(0, 1) entries, as peft's ``nn.Embedding``; "zero": all-zero keys and values
    #: (the MLP's last layer when projecting)
    init_weights: Literal["normal", "zero"] | None = None
    #: dropout on the prefix in training (the P-tuning v2 code's ``hidden_dropout_prob``)
    prefix_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # peft's record of the model's geometry; filled from a peft folder, checked against the model
    num_layers: int | None = Field(None, ge=1)
    token_dim: int | None = Field(None, ge=1)
    num_attention_heads: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.layers is not None:
            raise ValueError("layers: a prefix goes into every layer (one attention mask covers all of them, so a layer "
                             "without the prefix cannot be expressed); drop the key")
        if self.targets or self.exclude or self.module_types:
            raise ValueError("targets: a prefix method attaches to the model's base module, not to chosen layers; drop "
                             "targets/exclude/module_types")
        if self.encoder_hidden_size is not None and not self.prefix_projection:
            raise ValueError("encoder_hidden_size is the prefix MLP's width; it needs prefix_projection: true")
        return self


# -- the model's geometry -------------------------------------------------------------------------

def base_module(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the model's base module (LlamaModel, GPT2Model, BertModel)."""
    base = getattr(model, "base_model", None)
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        # the encoder and the decoder keep separate caches (self- and cross-attention); a prefix
        # would need one per stack, which this machinery does not build
        raise TargetError(f"{type(model).__name__} is an encoder-decoder model: key/value prefixes are built for decoder-only "
                          "and encoder-only models; use prompt_tuning or p_tuning on it")
    if not isinstance(base, nn.Module) or base is model:
        raise TargetError(f"{type(model).__name__} has no separate base module to carry a prefix; load the model with its "
                          "head (AutoModelForCausalLM, AutoModelForSequenceClassification)")
    for name, module in model.named_modules():
        if module is base and name:
            return name, module
    raise TargetError(f"{type(model).__name__}.base_model is not one of its submodules; a prefix cannot attach to it")


def cache_argument(module: nn.Module) -> str | None:
    """The name under which ``module.forward`` takes a key/value cache (transformers 5 renamed
    ``past_key_values`` to ``cache``), or None when it takes none."""
    params = inspect.signature(module.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def geometry(root: nn.Module) -> dict[str, int]:
    """Layers, key/value heads and head size, read from the model's config as peft reads them
    (``_prepare_prompt_learning_config``: grouped-query models use their key/value heads)."""
    cfg = getattr(root, "config", None)
    if cfg is None:
        raise TargetError(f"{type(root).__name__} has no transformers config; a prefix needs its layer count and head sizes")
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    if not layers or not heads or not hidden:
        raise TargetError(f"{type(root).__name__}'s config lacks num_hidden_layers / num_attention_heads / hidden_size; "
                          "a prefix needs them")
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return {"num_layers": int(layers), "heads": int(kv_heads), "head_dim": int(head_dim)}


def max_positions(root: nn.Module) -> int | None:
    cfg = getattr(root, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    value = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def sliding_window(root: nn.Module) -> int | None:
    """The attention window of a model with sliding-window layers (their cache keeps only the last
    ``window`` positions, so a prefix would fall out of it), else None."""
    cfg = getattr(root, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if not isinstance(window, int) or window <= 0 or getattr(cfg, "use_sliding_window", True) is False:
        return None
    if types is not None and "sliding_attention" not in types:
        return None
    return window


def describe(g: dict[str, int]) -> str:
    return f"{g['num_layers']} layers of {g['heads']} key/value heads x {g['head_dim']}"


def _dynamic_cache() -> type:
    from transformers import DynamicCache

    return DynamicCache


# -- the site -------------------------------------------------------------------------------------

class PrefixSite(ModuleSite):
    """The prefix of every layer, on the base module. Slot ``prefix``: (n, layers * 2 * heads * head_dim)."""

    def __init__(self, info: ModuleInfo, method: str, config: PrefixConfig, geom: dict[str, int]):
        super().__init__(info, method)
        self.n = config.num_virtual_tokens
        self.geom = dict(geom)
        self.width = geom["num_layers"] * 2 * geom["heads"] * geom["head_dim"]
        self.token_dim = geom["heads"] * geom["head_dim"]
        self.dropout = config.prefix_dropout
        root = info.root if info.root is not None else info.module
        self.model_class = type(root).__name__
        self.cache_arg = cache_argument(info.module)
        self.limit = max_positions(root)
        self.window = sliding_window(root)
        self.arg_names = [n for n, p in inspect.signature(info.module.forward).parameters.items()
                          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        object.__setattr__(self, "_model_config", getattr(root, "config", None))
        self.projecting = config.prefix_projection
        zero = config.init_weights == "zero"
        if self.projecting:
            hidden = config.encoder_hidden_size or self.token_dim
            self.embedding = nn.Parameter(torch.randn(self.n, self.token_dim))
            w1, w2 = nn.Linear(self.token_dim, hidden), nn.Linear(hidden, self.width)
            self.mlp_w1, self.mlp_b1 = nn.Parameter(w1.weight.data.clone()), nn.Parameter(w1.bias.data.clone())
            self.mlp_w2, self.mlp_b2 = nn.Parameter(w2.weight.data.clone()), nn.Parameter(w2.bias.data.clone())
            if zero:
                nn.init.zeros_(self.mlp_w2)
                nn.init.zeros_(self.mlp_b2)
        else:
            self.prefix = nn.Parameter(torch.zeros(self.n, self.width) if zero else torch.randn(self.n, self.width))

    # the saved form is always the folded prefix
    @property
    def slots(self) -> tuple[str, ...]:  # type: ignore[override]
        return (SLOT,)

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        if self.projecting:
            return {"embedding": self.embedding, "mlp_w1": self.mlp_w1, "mlp_b1": self.mlp_b1, "mlp_w2": self.mlp_w2, "mlp_b2": self.mlp_b2}
        return {SLOT: self.prefix}

    def prefix_values(self) -> torch.Tensor:
        """The (n, width) prefix this site puts into the cache (the MLP's output when projecting)."""
        if not self.projecting:
            return self.prefix
        h = torch.tanh(nn.functional.linear(self.embedding, self.mlp_w1, self.mlp_b1))
        return nn.functional.linear(h, self.mlp_w2, self.mlp_b2)

    def slot_tensors(self) -> dict[str, torch.Tensor]:
        if not self.projecting:
            return {SLOT: self.prefix}
        with torch.no_grad():
            return {SLOT: self.prefix_values().detach()}

    def slot_shapes(self) -> dict[str, tuple[int, ...]]:
        return {SLOT: (self.n, self.width)}

    @torch.no_grad()
    def load_slots(self, tensors: dict[str, torch.Tensor]) -> None:
        value = tensors[SLOT]
        if self.projecting:
            self.fold(value)
        else:
            self.prefix.copy_(value.to(self.prefix.dtype))

    @torch.no_grad()
    def fold(self, value: torch.Tensor | None = None) -> None:
        """Replace the MLP by the prefix it produces (``value``: a saved one)."""
        if not self.projecting:
            return
        ref = self.embedding
        folded = self.prefix_values() if value is None else value
        for name in ("embedding", "mlp_w1", "mlp_b1", "mlp_w2", "mlp_b2"):
            delattr(self, name)
        self.projecting = False
        self.prefix = nn.Parameter(folded.detach().to(device=ref.device, dtype=ref.dtype).clone(), requires_grad=ref.requires_grad)

    # -- hooks -----------------------------------------------------------------------------------
    def attach(self) -> None:
        self._drop_cache = False
        self.on_input(self._before)
        self.on_output(self._after)

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self._drop_cache:
            return None
        self._drop_cache = False
        for name in ("cache", "past_key_values"):
            if isinstance(output, dict) and output.get(name) is not None:
                output[name] = None
        return output

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self._drop_cache = False
        if not self.enabled:
            return None
        if args:  # bind positional arguments by name, so the cache and the mask can be found
            if len(args) > len(self.arg_names):
                raise UnsupportedError(f"{self.method}: {type(module).__name__} was called with {len(args)} positional "
                                       "arguments; pass them by name")
            kwargs = {**dict(zip(self.arg_names, args)), **kwargs}
            args = ()
        kwargs = dict(kwargs)
        key = self.cache_arg
        other = "past_key_values" if key == "cache" else "cache"
        if kwargs.get(other) is not None:
            kwargs[key] = kwargs.pop(other)
        cache = kwargs.get(key)
        source = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if source is None:
            return None  # the model itself reports the missing input
        batch, length = source.shape[0], source.shape[1]
        if cache is not None and not hasattr(cache, "get_seq_length"):
            raise UnsupportedError(f"{self.method}: a key/value cache given as {type(cache).__name__} (a legacy tuple "
                                   "cache) cannot carry the prefix; pass a transformers Cache (e.g. DynamicCache) or none")
        if cache is not None and not isinstance(cache, _dynamic_cache()):
            raise UnsupportedError(f"{self.method}: a {type(cache).__name__} cannot carry the prefix (a fixed-size cache comes with "
                                   "a prepared 4-D mask); generate with the default dynamic cache (drop cache_implementation)")
        past = cache.get_seq_length() if cache is not None else 0
        fill = past == 0
        total = (self.n if fill else past) + length
        if self.limit is not None and total > self.limit:
            raise ConfigError(f"{self.method}: {self.n} virtual tokens + {total - self.n} input tokens = {total} positions, but "
                              f"{self.model_class} has {self.limit} (max_position_embeddings); shorten the input (data.max_length) "
                              "or use fewer num_virtual_tokens")
        if self.window is not None and total > self.window:
            raise UnsupportedError(f"{self.method}: {total} positions with the prefix exceed {self.model_class}'s sliding "
                                   f"window of {self.window}, whose cache would drop the prefix; shorten the input")
        positions = kwargs.get("position_ids")
        mask = kwargs.get("attention_mask")
        if positions is not None and mask is None and positions.dim() == 2 and positions.shape[-1] > 1 \
                and bool((positions[:, 1:] <= positions[:, :-1]).any()):
            raise UnsupportedError(f"{self.method}: packed batches (position ids restarting within a row) cannot share one "
                                   "prefix; train without packing (data.pack_examples: false)")
        if fill:
            if module.training and torch.is_grad_enabled() and any(getattr(m, "gradient_checkpointing", False) for m in module.modules()):
                raise UnsupportedError(f"{self.method}: gradient checkpointing drops the key/value cache inside each "
                                       "checkpointed layer, and the prefix with it; turn it off (optim.gradient_checkpointing: false)")
            if cache is None:
                # the model would have kept no cache: hand none back either (generate without the
                # cache would otherwise carry this one into the next step's full recompute)
                use = kwargs.get("use_cache")
                self._drop_cache = use is False or (use is None and getattr(self._model_config, "use_cache", True) is False)
            cache = self._fill(cache, batch, source)
            kwargs[key] = cache
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                raise UnsupportedError(f"{self.method}: only 2-D attention masks (batch, length) can be extended by the prefix; "
                                       "pass the padding mask, not a prepared 4-D one")
            if mask.shape[1] + self.n == total:
                kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, self.n), mask], dim=1)
        if positions is not None:
            kwargs["position_ids"] = positions + self.n
        return args, kwargs

    def _fill(self, cache, batch: int, source: torch.Tensor):
        from transformers import DynamicCache

        values = self.prefix_values()
        if self.dropout and self.owner.training:  # the model's mode (a site added after .eval() is still in training mode)
            values = nn.functional.dropout(values, self.dropout, training=True)
        if source.is_floating_point():
            dtype = source.dtype
        else:
            dtype = next((p.dtype for p in self.owner.parameters() if p.is_floating_point()), values.dtype)
        if torch.is_autocast_enabled(source.device.type):
            dtype = torch.get_autocast_dtype(source.device.type)
        g = self.geom
        # (n, layers, 2, heads, head_dim) -> per layer (batch, heads, n, head_dim), peft's order
        kv = values.to(device=source.device, dtype=dtype).view(self.n, g["num_layers"], 2, g["heads"], g["head_dim"])
        kv = kv.permute(1, 2, 3, 0, 4).unsqueeze(2).expand(-1, -1, batch, -1, -1, -1)
        layers = [(kv[i, 0].contiguous(), kv[i, 1].contiguous()) for i in range(g["num_layers"])]
        if cache is None:
            return DynamicCache(layers, config=self._model_config)
        for i, (k, v) in enumerate(layers):
            cache.update(k, v, i)
        return cache


# -- the method -----------------------------------------------------------------------------------

#: the target name of a prefix read from a peft folder, which names no module (peft keys the
#: prefix by nothing): bound to the model's base module when the adapter is applied (bind_saved)
PEFT_BASE = "<base model>"
GEOMETRY_KEYS = ("num_layers", "heads", "head_dim")


def check_geometry(method: str, saved: dict[str, Any], geom: dict[str, int], model_class: str, where: str = "") -> None:
    """Refuse a prefix made for another layer count or head size, in one line."""
    if all(saved.get(k) in (None, geom[k]) for k in GEOMETRY_KEYS):
        return
    mine = {k: saved.get(k) or geom[k] for k in GEOMETRY_KEYS}
    raise AdapterError(f"{where + ': ' if where else ''}the {method} prefix is for {describe(mine)}, but {model_class} has "
                       f"{describe(geom)}; it was made for another base model")


def config_geometry(config: PrefixConfig) -> dict[str, Any]:
    """The geometry a config records (peft's keys), in :func:`geometry`'s terms."""
    out: dict[str, Any] = {"num_layers": config.num_layers}
    if config.num_attention_heads is not None:
        out["heads"] = config.num_attention_heads
        if config.token_dim is not None:
            out["head_dim"] = config.token_dim // config.num_attention_heads
    return out


def refuse_no_cache(method: str, root: nn.Module, module: nn.Module) -> None:
    if cache_argument(module) is None:
        raise UnsupportedError(f"{method}: the attention of {type(root).__name__} ({type(module).__name__}) takes no key/value "
                               "cache, which is where a prefix goes; use prompt_tuning or LoRA on this model")


class PrefixMethod:
    """The prefix methods' shared behaviour; registered classes list it before ModuleMethod."""

    space = "sequence"
    has_weight_delta = False
    identity_at_init = False
    kinds = ("module",)

    @classmethod
    def find(cls, model: nn.Module, name: str):
        name_, module = base_module(model)
        if name not in (name_, PEFT_BASE):
            raise AdapterError(f"the {cls.name} adapter is on module {name!r}, but {type(model).__name__}'s base module is "
                               f"{name_!r}; it was made for another model")
        return ModuleInfo(name_, module, model)

    @classmethod
    def resolve(cls, model: nn.Module, config: PrefixConfig, skip=()):
        name, module = base_module(model)
        refuse_no_cache(cls.name, model, module)
        geom = geometry(model)
        check_geometry(cls.name, config_geometry(config), geom, type(model).__name__)
        return [ModuleInfo(name, module, model)], {name: dict(geom)}

    @classmethod
    def make_site(cls, info: ModuleInfo, config: PrefixConfig, options: dict[str, Any]) -> PrefixSite:
        root = info.root if info.root is not None else info.module
        refuse_no_cache(cls.name, root, info.module)
        geom = geometry(root)
        # a saved adapter's options (and a peft import's config) record the geometry it was made for
        check_geometry(cls.name, {**config_geometry(config), **options}, geom, type(root).__name__)
        return PrefixSite(info, cls.name, config, geom)

    @classmethod
    def added_positions(cls, config: dict[str, Any] | MethodConfig) -> int:
        """How many positions the method adds in front of every input (all of them in the cache)."""
        if isinstance(config, MethodConfig):
            return config.num_virtual_tokens
        value = config.get("num_virtual_tokens")
        if value is None:
            value = cls.config_cls.model_fields["num_virtual_tokens"].default
        return int(value)

    @classmethod
    def bind_saved(cls, model: nn.Module, adapter):
        """The adapter with its target named for ``model``: a peft import names no module
        (:data:`PEFT_BASE`) and is bound to the model's base module here, after its geometry is
        checked against the model's (one line)."""
        from ..io.native import AdapterFile

        name, module = base_module(model)
        refuse_no_cache(cls.name, model, module)
        where = str(adapter.path or "the adapter")
        for target, options in (adapter.meta.get("target_options") or {}).items():
            check_geometry(cls.name, options or {}, geometry(model), type(model).__name__, where)
        if adapter.targets != [PEFT_BASE]:
            return adapter
        prefix = PEFT_BASE + "."
        tensors = {(name + "." + k[len(prefix):]) if k.startswith(prefix) else k: v for k, v in adapter.tensors.items()}
        options = (adapter.meta.get("target_options") or {}).get(PEFT_BASE) or {}
        meta = {**adapter.meta, "targets": [name], "target_options": {name: options},
                "target_kinds": {name: "module"}}
        return AdapterFile(meta, tensors, adapter.path)


def check_saved(adapter, name: str, options: dict, where: str) -> None:
    """A saved prefix holds one (n, layers * 2 * heads * head_dim) tensor that agrees with adapter.json."""
    key = f"{name}.{SLOT}"
    t = adapter.tensors.get(key)
    if t is None:
        raise AdapterError(f"{where}: the adapter file has no tensor {key}; it is incomplete - re-save it")
    n = (adapter.meta.get("config") or {}).get("num_virtual_tokens")
    if t.dim() != 2 or (isinstance(n, int) and t.shape[0] != n):
        raise AdapterError(f"{where}: tensor {key} has shape {tuple(t.shape)}, but adapter.json says {n} virtual tokens; "
                           "the file is corrupt or mixes two adapters")
    if all(isinstance(options.get(k), int) for k in GEOMETRY_KEYS):
        width = options["num_layers"] * 2 * options["heads"] * options["head_dim"]
        if t.shape[1] != width:
            raise AdapterError(f"{where}: tensor {key} is {t.shape[1]} wide, but adapter.json's {describe(options)} need "
                               f"{width}; the file is corrupt")


# -- peft's PREFIX_TUNING format ------------------------------------------------------------------

PEFT_KEY = "prompt_embeddings"


def peft_read(cfg: dict, raw: dict, path):
    """peft's PREFIX_TUNING folder as a ``prefix_tuning`` adapter: ``prompt_embeddings`` is the
    folded prefix in graftkit's layout already (peft saves the MLP's output when projecting);
    any other tensor is a head trained whole (``train_also``)."""
    from ..io.native import AdapterFile
    from ..io.peft import CONFIG_NAME, WEIGHTS_NAME, _heads, _meta, _number

    if PEFT_KEY not in raw:
        raise FileFormatError(f"{path / WEIGHTS_NAME} has no {PEFT_KEY} tensor; it is not a complete peft prefix-tuning adapter")
    prefix = raw[PEFT_KEY]
    n = _number(cfg, "num_virtual_tokens", None, path, integer=True, low=1)
    layers = _number(cfg, "num_layers", None, path, integer=True, low=1)
    token_dim = _number(cfg, "token_dim", None, path, integer=True, low=1)
    heads = _number(cfg, "num_attention_heads", None, path, integer=True, low=1)
    if token_dim % heads:
        raise FileFormatError(f"{path / CONFIG_NAME}: token_dim {token_dim} is not a multiple of num_attention_heads {heads}; fix the file")
    if int(cfg.get("num_transformer_submodules") or 1) != 1:
        raise UnsupportedError(f"{path / CONFIG_NAME}: num_transformer_submodules is {cfg.get('num_transformer_submodules')}; "
                               "graftkit reads prefixes of decoder-only and encoder-only models (1)")
    if tuple(prefix.shape) != (n, layers * 2 * token_dim):
        raise FileFormatError(f"{path / WEIGHTS_NAME}: {PEFT_KEY} has shape {tuple(prefix.shape)}, but {CONFIG_NAME} "
                              f"({n} virtual tokens, {layers} layers, token_dim {token_dim}) needs {(n, layers * 2 * token_dim)}; "
                              "the file is corrupt")
    trained, tensors = _heads(raw, {PEFT_KEY})
    projection = bool(cfg.get("prefix_projection", False))
    config: dict[str, Any] = {"num_virtual_tokens": n, "prefix_projection": projection, "num_layers": layers,
                              "token_dim": token_dim, "num_attention_heads": heads,
                              "train_also": sorted({h.rsplit(".", 1)[0] for h in trained})}
    if projection and cfg.get("encoder_hidden_size"):
        config["encoder_hidden_size"] = int(cfg["encoder_hidden_size"])
    options = {PEFT_BASE: {"num_layers": layers, "heads": heads, "head_dim": token_dim // heads}}
    meta = _meta("prefix_tuning", config, [PEFT_BASE], options, trained, cfg, path)
    meta["target_kinds"] = {PEFT_BASE: "module"}
    tensors[f"{PEFT_BASE}.{SLOT}"] = prefix.contiguous()
    return AdapterFile(meta, tensors)


def peft_write_site(site: PrefixSite, key: str, tensors: dict, acc: dict) -> None:
    # peft keys the prefix by no module (``prompt_embeddings`` at the top level)
    tensors[PEFT_KEY] = site.slot_tensors()[SLOT].detach().float().cpu().contiguous()
    acc["geom"], acc["n"] = site.geom, site.n


def peft_write_config(state, acc: dict) -> dict:
    g, c = acc["geom"], state.config
    token_dim = g["heads"] * g["head_dim"]
    return {
        "num_virtual_tokens": acc["n"], "token_dim": token_dim, "num_transformer_submodules": 1,
        "num_attention_heads": g["heads"], "num_layers": g["num_layers"], "prefix_projection": c.prefix_projection,
        "encoder_hidden_size": c.encoder_hidden_size or token_dim, "init_weights": "zero" if c.init_weights == "zero" else None,
    }


def peft_write_model(model: nn.Module, state) -> tuple[dict, dict]:
    """peft's tensors and config entries of the model's prefix (and heads trained whole)."""
    from ..adapter import sites

    tensors: dict[str, torch.Tensor] = {}
    acc: dict[str, Any] = {}
    heads = set(state.train_also)
    for name, site in sites(model).items():
        if name in heads:
            tensors[PEFT_PROMPT_PREFIX + name] = site.slot_tensors()["value"].detach().cpu().contiguous()
        else:
            peft_write_site(site, name, tensors, acc)
    modules = sorted({h.rsplit(".", 1)[0] for h in heads}) or None
    return tensors, {**peft_write_config(state, acc), "modules_to_save": modules}


#: peft's PREFIX_TUNING: written from the whole model (one ``prompt_embeddings`` tensor, keyed by no
#: module), heads under ``base_model.``. Both prefix methods write it; a peft folder is always read
#: as ``prefix_tuning``.
PEFT = PeftConverter("PREFIX_TUNING", peft_read, write_model=peft_write_model, prefix=PEFT_PROMPT_PREFIX)
