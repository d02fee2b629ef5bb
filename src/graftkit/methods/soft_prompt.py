"""Soft prompts: the machinery shared by prompt tuning and P-tuning.

A soft prompt is ``P`` trainable vectors ``p_1..p_P`` (the width ``d`` of the token embeddings)
put in front of the embedded input ``x_1..x_L``; the frozen model reads
``[p_1, ..., p_P, e(x_1), ..., e(x_L)]``. The methods differ only in where the vectors come
from (:mod:`graftkit.methods.prompt_tuning`: trained directly; :mod:`graftkit.methods.p_tuning`:
the output of a small prompt encoder).

The site is a :class:`~graftkit.methods.activation.ModuleSite` on the model's *base module*
(``model.base_model``: LlamaModel, GPT2Model, BertModel; the encoder stack of an
encoder-decoder), saved as ``<base module>.<slot>`` (e.g. ``model.prompt_embeddings``). Around
that module's forward:

* a pre-hook (with kwargs) embeds ``input_ids``, prepends the prompt to ``inputs_embeds``,
  prepends ``P`` ones to a 2-D ``attention_mask`` and ``P`` zeros to ``token_type_ids``, and puts
  the prompt at positions ``0..P-1`` with the real tokens after it: given ``position_ids``
  become ``[0..P-1, position_ids + P]``; without them the model counts ``0..P+L-1`` itself, as
  peft's prompt learning does (it drops given position ids);
* a forward hook drops the virtual positions again from ``last_hidden_state`` and
  ``hidden_states``, so a head, ``labels`` and the logits line up with the real tokens only.
  BertModel pools inside the base module, so there the encoder's output is trimmed first and
  the pooler reads the first *real* token ([CLS]) (``pool: real``); peft's prompt learning pools
  the first virtual token, which ``pool: virtual`` reproduces (a peft import sets it). A decoder
  classifier (LlamaForSequenceClassification) finds the last non-pad token from the outer
  ``input_ids``, which it still sees, on the trimmed hidden states: the last real token;
* with a KV cache the prompt is prepended only while the cache is empty (the prefill of
  ``generate``); every later step only extends the attention mask by ``P`` and shifts given
  position ids by ``P``: the cache holds the prompt's keys and values once. Without a cache
  every forward is a full recompute with the prompt in front, which gives the same tokens;
* an encoder-decoder (T5) keeps the prompt's encoder states (the decoder cross-attends to them,
  as in peft); a pre-hook on the decoder extends ``encoder_attention_mask`` by ``P`` ones.

Bad input is one line: ``P`` plus the input longer than the model's positions (at forward time
here; ``graft train`` checks ``data.max_length + P`` up front, :func:`check_train_length`), a
4-D attention mask (a static / compiled cache), a model without a base module.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ..errors import AdapterError, ConfigError, TargetError, UnsupportedError
from .activation import ModuleInfo, ModuleMethod, ModuleSite, find_target
from .base import PEFT_PROMPT_PREFIX, MethodConfig

#: the target name of a soft prompt read from a peft folder, which names no module: bound to
#: the model's base module when the adapter is applied (:meth:`SoftPromptMethod.bind_saved`)
PEFT_BASE = "<base model>"


class SoftPromptConfig(MethodConfig):
    num_virtual_tokens: int = Field(ge=1)
    #: which first token a pooler inside the base module (BERT's) reads: the first real token
    #: ([CLS]), or the first virtual token as peft computes it
    pool: Literal["real", "virtual"] = "real"

    @field_validator("targets", "exclude", "module_types", "layers")
    @classmethod
    def _no_targets(cls, value):
        if value:
            raise ValueError("a soft prompt acts on the input sequence at the model's base module and takes no "
                             "targets, exclude, module_types or layers; remove them")
        return value


@dataclass(frozen=True)
class HomeInfo(ModuleInfo):
    """The base module as an attachment point; its fingerprint probes skip tied aliases (T5's
    ``encoder.embed_tokens.weight`` is ``shared.weight``, the name the model lists)."""

    def probe_params(self) -> list[str]:
        listed = {n for n, _ in self.root.named_parameters()} if self.root is not None else None
        return [n for n in super().probe_params() if listed is None or n in listed]


def _plain_name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def prompt_home(model: nn.Module, method: str) -> ModuleInfo:
    """The module a soft prompt attaches to: the base module of a model with a head (decoder-only,
    encoder-only), or the encoder of an encoder-decoder."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        home = model.get_encoder()
    else:
        home = getattr(model, "base_model", None) if hasattr(model, "base_model_prefix") else None
    if not isinstance(home, nn.Module) or home is model:
        raise TargetError(f"{method}: {type(model).__name__} has no base module to put a soft prompt in front of; load the "
                          "model with a head (e.g. AutoModelForCausalLM or AutoModelForSequenceClassification)")
    return HomeInfo(_plain_name(model, home), home, model)


def position_limit(model: nn.Module) -> int | None:
    """The number of positions a model has (None: relative positions, no limit)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        return None
    for key in ("max_position_embeddings", "n_positions"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _positional_names(module: nn.Module) -> list[str]:
    params = inspect.signature(module.forward).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _as_kwargs(names: list[str], args: tuple, kwargs: dict) -> dict:
    out = dict(zip(names, args))
    out.update(kwargs)
    return out


class SoftPromptSite(ModuleSite):
    """A soft prompt in front of the owner's (the base module's) input. Subclasses define
    ``slots`` and :meth:`prompts`."""

    def __init__(self, info: ModuleInfo, method: str, num_virtual_tokens: int, pool: str = "real"):
        super().__init__(info, method)
        root = info.root if info.root is not None else info.module
        self.num_virtual_tokens = num_virtual_tokens
        self.pool = pool
        self.max_positions = position_limit(root)
        self.encoder_decoder = bool(getattr(getattr(root, "config", None), "is_encoder_decoder", False))
        # plain attributes (not submodules): the owner's relatives must not become the site's children
        embed = info.module.get_input_embeddings() if hasattr(info.module, "get_input_embeddings") else None
        if not isinstance(embed, nn.Module):
            embed = root.get_input_embeddings()
        object.__setattr__(self, "embedding", embed)
        object.__setattr__(self, "decoder", root.get_decoder() if self.encoder_decoder and hasattr(root, "get_decoder") else None)
        pooler, encoder = getattr(info.module, "pooler", None), getattr(info.module, "encoder", None)
        pools_inside = isinstance(pooler, nn.Module) and isinstance(encoder, nn.Module)
        self.pools_inside = pools_inside
        object.__setattr__(self, "inner", encoder if pools_inside and pool == "real" else None)
        self.token_dim = embed.weight.shape[1]
        self._pending = 0  # the sequence length (prompt included) of the forward in progress, 0: none prepended

    # -- what subclasses provide ------------------------------------------------------------------
    def prompts(self) -> torch.Tensor:
        """The ``(P, d)`` virtual token embeddings, float32."""
        raise NotImplementedError

    def export_prompts(self) -> torch.Tensor:
        """The prompt the model reads at inference (what peft saves)."""
        return self.prompts()

    # -- hooks --------------------------------------------------------------------------------------
    def attach(self) -> None:
        object.__setattr__(self, "_names", _positional_names(self.owner))
        self.on_input(self._before)
        if self.encoder_decoder:
            if self.decoder is not None:
                object.__setattr__(self, "_decoder_names", _positional_names(self.decoder))
                self.on_input(self._cross_mask, self.decoder)
            return
        if self.inner is not None:
            self.on_output(self._trim, self.inner)
        self.on_output(self._trim)

    def _before(self, module, args, kwargs):
        self._pending = 0
        if not self.enabled:
            return None
        kw = _as_kwargs(self._names, args, kwargs)
        cache = kw.get("cache", kw.get("past_key_values"))
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        if embeds is None and ids is None:
            return None  # the model raises its own error
        batch, length = (embeds if embeds is not None else ids).shape[:2]
        p = self.num_virtual_tokens
        prefill = past == 0
        total = past + length + (p if prefill else 0)
        if self.max_positions is not None and total > self.max_positions:
            raise ConfigError(f"{self.method}: {p} virtual tokens + an input of {total - p} positions = {total} exceed the model's "
                              f"{self.max_positions} positions; shorten the input (max_length) or use fewer num_virtual_tokens")
        mask = kw.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            if mask.dim() != 2:
                raise UnsupportedError(f"{self.method}: the model got a {mask.dim()}-D attention mask, which a soft prompt cannot "
                                       "extend; use a 2-D mask (padding mask) and the default dynamic KV cache, not a static one")
            if mask.shape[1] == total - p:
                kw["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], p), mask], dim=1)
        positions = kw.get("position_ids")
        if isinstance(positions, torch.Tensor):
            if positions.dim() not in (1, 2):
                raise UnsupportedError(f"{self.method}: {positions.dim()}-D position ids (multimodal rotary) are not supported "
                                       "with a soft prompt")
            shifted = positions + p
            if prefill:
                virtual = torch.arange(p, device=positions.device, dtype=positions.dtype)
                if positions.dim() == 2:
                    virtual = virtual.expand(positions.shape[0], p)
                shifted = torch.cat([virtual, shifted], dim=-1)
            kw["position_ids"] = shifted
        if not prefill:
            return (), kw
        if embeds is None:
            embeds = self.embedding(ids)
        prompt = self.prompts().to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        kw["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        kw["input_ids"] = None
        types = kw.get("token_type_ids")
        if isinstance(types, torch.Tensor):
            kw["token_type_ids"] = torch.cat([types.new_zeros(types.shape[0], p), types], dim=1)
        self._pending = length + p
        return (), kw

    def _trim(self, module, args, kwargs, output):
        """Drop the virtual positions from the sequence outputs (hidden states keep their batch
        and width; the KV cache keeps them, which later steps attend to)."""
        n, p = self._pending, self.num_virtual_tokens
        if module is self.owner:
            self._pending = 0
        if not n:
            return None

        def cut(t):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[1] == n:
                return t[:, p:]
            if isinstance(t, tuple) and t and all(isinstance(x, torch.Tensor) for x in t):
                return tuple(cut(x) for x in t)
            return t

        if isinstance(output, dict):  # transformers' ModelOutput (items and attributes stay in step)
            for key in ("last_hidden_state", "hidden_states"):
                if output.get(key) is not None:
                    output[key] = cut(output[key])
            return output
        if isinstance(output, tuple):
            return (cut(output[0]), *output[1:])
        return cut(output)

    def _cross_mask(self, module, args, kwargs):
        """The decoder of an encoder-decoder attends to the prompt's encoder states too."""
        kw = _as_kwargs(self._decoder_names, args, kwargs)
        states, mask = kw.get("encoder_hidden_states"), kw.get("encoder_attention_mask")
        if not isinstance(states, torch.Tensor) or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return None
        if mask.shape[1] + self.num_virtual_tokens != states.shape[1]:
            return None
        kw["encoder_attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], self.num_virtual_tokens), mask], dim=1)
        return (), kw


class SoftPromptMethod(ModuleMethod):
    """A method that puts a soft prompt in front of the input (sequence space)."""

    space = "sequence"
    has_weight_delta = False
    identity_at_init = False
    kinds = ("module",)

    @classmethod
    def find(cls, model: nn.Module, name: str):
        info = find_target(model, name)
        return HomeInfo(info.name, info.module, model) if isinstance(info, ModuleInfo) else info

    @classmethod
    def resolve(cls, model: nn.Module, config: MethodConfig, skip=()):
        info = prompt_home(model, cls.name)
        return [info], {info.name: cls.site_options(config, info)}

    @classmethod
    def added_positions(cls, config: dict[str, Any] | MethodConfig) -> int:
        """How many positions the method adds in front of every input."""
        if isinstance(config, MethodConfig):
            return config.num_virtual_tokens
        return int(config.get("num_virtual_tokens") or 0)

    @classmethod
    def bind_saved(cls, model: nn.Module, adapter):
        """A saved adapter with its target named for ``model``: a peft import names no module
        (:data:`PEFT_BASE`) and is bound to the model's base module here, after checking that
        its task and width fit the model (one line each)."""
        if adapter.targets != [PEFT_BASE]:
            return adapter
        from ..io.native import AdapterFile
        from ..io.peft import _task_type

        home = prompt_home(model, cls.name)
        options = dict((adapter.meta.get("target_options") or {}).get(PEFT_BASE) or {})
        want, have = options.pop("task_type", None), _task_type(model)
        if want and have and want != have:
            raise AdapterError(f"{adapter.path or 'the adapter'}: a peft {want} soft prompt cannot run on {type(model).__name__} "
                               f"(a {have} model); load it on a model with the matching head")
        width = home.module.get_input_embeddings().weight.shape[1] if hasattr(home.module, "get_input_embeddings") else None
        if width is not None and options.get("token_dim") not in (None, width):
            raise AdapterError(f"{adapter.path or 'the adapter'}: its prompt is {options['token_dim']} wide but "
                               f"{type(model).__name__}'s token embeddings are {width}; it was made for another base model")
        prefix = PEFT_BASE + "."
        tensors = {(home.name + "." + k[len(prefix):]) if k.startswith(prefix) else k: v for k, v in adapter.tensors.items()}
        meta = {**adapter.meta, "targets": [home.name], "target_options": {home.name: options}}
        return AdapterFile(meta, tensors, adapter.path)


def check_train_length(method: dict[str, Any], max_length: int, limit: int | None) -> None:
    """``graft train``: refuse ``data.max_length`` plus the method's virtual tokens over the model's
    positions before anything is trained (one line)."""
    from . import method_named

    m = method_named(method.get("method"))
    added = m.added_positions(method) if m is not None and hasattr(m, "added_positions") else 0
    if added and limit is not None and max_length + added > limit:
        raise ConfigError(f"data.max_length {max_length} + {added} virtual tokens ({method.get('method')}) = {max_length + added} "
                          f"exceed the model's {limit} positions; set data.max_length to {limit - added} or less, or use fewer "
                          "num_virtual_tokens")


def embedding_of(root: nn.Module) -> nn.Module:
    embed = root.get_input_embeddings() if hasattr(root, "get_input_embeddings") else None
    if not isinstance(embed, nn.Module) or not hasattr(embed, "weight"):
        raise TargetError(f"{type(root).__name__} has no input embedding table to initialise a soft prompt from")
    return embed


__all__ = ["SoftPromptConfig", "SoftPromptSite", "SoftPromptMethod", "PEFT_BASE", "check_train_length"]


# -- peft's prompt learning format (PROMPT_TUNING, P_TUNING) ----------------------------------------
#
# peft saves one tensor, ``prompt_embeddings`` (P, d): the virtual token embeddings the model
# reads (for P-tuning the prompt encoder's output, not the encoder), plus the heads trained whole
# under ``base_model.<name>`` (prompt learning wraps the model one level less deep than LoRA).

PEFT_KEY = "prompt_embeddings"

def read_peft_prompt(method: str, cfg: dict, raw: dict, path, config: dict) -> Any:
    """A peft prompt-learning folder as an adapter of ``method`` whose target is :data:`PEFT_BASE`
    (bound to the base module on load). ``config``: the method's own config entries."""
    from ..errors import FileFormatError
    from ..io.native import AdapterFile
    from ..io.peft import CONFIG_NAME, WEIGHTS_NAME, _heads, _meta, _number

    prompt = raw.get(PEFT_KEY)
    if prompt is None:
        raise FileFormatError(f"{path / WEIGHTS_NAME} holds no {PEFT_KEY} tensor; it is not a complete peft {cfg.get('peft_type')} adapter")
    task = cfg.get("task_type")
    subs = _number(cfg, "num_transformer_submodules", 1, path, integer=True, low=1, high=2)
    if subs == 2 and task != "SEQ_2_SEQ_LM":
        raise UnsupportedError(f"{path / CONFIG_NAME}: a peft {task} soft prompt for 2 transformer sub-modules is not supported; "
                               "graftkit reads prompts of decoder-only, encoder-only and SEQ_2_SEQ_LM models")
    p = _number(cfg, "num_virtual_tokens", None, path, integer=True, low=1)
    if prompt.dim() != 2 or prompt.shape[0] != p * subs:
        raise FileFormatError(f"{path / WEIGHTS_NAME}: {PEFT_KEY} has shape {tuple(prompt.shape)} but num_virtual_tokens is {p} "
                              f"(x {subs} sub-modules); the file is corrupt or mixes two adapters")
    # an encoder-decoder's prompt has 2P rows, of which peft's prompt tuning and P-tuning read the
    # first P (in front of the encoder's input); the other P are never used
    prompt = prompt[:p]
    width = cfg.get("token_dim")
    if width is not None and width != prompt.shape[1]:
        raise FileFormatError(f"{path / CONFIG_NAME}: token_dim {width} but {PEFT_KEY} is {prompt.shape[1]} wide; fix the file")
    heads, tensors = _heads(raw, {PEFT_KEY})
    tensors[f"{PEFT_BASE}.{config.pop('slot', 'prompt_embeddings')}"] = prompt.contiguous()
    full = {"num_virtual_tokens": p, "pool": "virtual", **config,
            "train_also": sorted({h.rsplit(".", 1)[0] for h in heads})}
    options = {PEFT_BASE: {"task_type": task, "token_dim": int(prompt.shape[1])}}
    meta = _meta(method, full, [PEFT_BASE], options, heads, cfg, path)
    meta["target_kinds"] = {PEFT_BASE: "module"}
    return AdapterFile(meta, tensors)


def write_peft_prompt(model: nn.Module, state, entries: dict) -> tuple[dict, dict]:
    """The peft tensors and config entries of the model's soft prompt (``entries``: the method's own)."""
    from ..adapter import sites

    site = next(s for s in sites(model).values() if isinstance(s, SoftPromptSite))
    if site.pools_inside and site.pool == "real":
        raise UnsupportedError(f"this {site.method} prompt pools the first real token ([CLS], pool: real) but peft pools the first "
                               "virtual token, so peft would compute other logits; save it with format='native', or train with "
                               "pool: virtual to export to peft")
    with torch.no_grad():
        prompt = site.export_prompts().detach().float().cpu().contiguous()
    if site.encoder_decoder:  # peft keeps 2P rows for a SEQ_2_SEQ_LM and reads the first P
        prompt = torch.cat([prompt, torch.zeros_like(prompt)])
    tensors = {PEFT_KEY: prompt}
    for name in state.train_also:
        tensors[PEFT_PROMPT_PREFIX + name] = sites(model)[name].slot_tensors()["value"].detach().cpu().contiguous()
    cfg = getattr(model, "config", None)
    heads = sorted({h.rsplit(".", 1)[0] for h in state.train_also}) or None
    out = {
        "num_virtual_tokens": site.num_virtual_tokens, "token_dim": site.token_dim,
        "num_transformer_submodules": 2 if site.encoder_decoder else 1,
        "num_attention_heads": getattr(cfg, "num_attention_heads", getattr(cfg, "n_head", None)),
        "num_layers": getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", None)),
        "modules_to_save": heads, **entries,
    }
    if site.encoder_decoder:  # peft's seq2seq prompt learning (transformers' class name does not say it)
        out["task_type"] = "SEQ_2_SEQ_LM"
    return tensors, out
