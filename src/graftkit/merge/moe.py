"""``graft moe``: a mixture-of-experts model assembled from dense experts that share a base.

Reads mergekit-moe's YAML::

    base_model: path/to/base          # attention, embeddings, norms and head come from here
    gate_mode: hidden                 # hidden (= hidden_last) | hidden_avg | cheap_embed | random | uniform_random
    dtype: bfloat16                   # optional; default: the base config's dtype, else each tensor's own
    experts_per_token: 2
    experts:
      - source_model: path/to/expert_a  # its MLPs become expert 0 of every layer
        positive_prompts: ["..."]
        negative_prompts: ["..."]       # optional
        residual_scale: 1.0             # optional: scales the expert's down projection
        noise_scale: 0.0                # optional: Gaussian noise on the expert's weights (seeded)
    shared_experts:                   # optional, exactly one: Qwen2-MoE output
      - source_model: path/to/shared
        positive_prompts: ["..."]
    architecture: mixtral | qwen      # optional; chosen as mergekit-moe chooses it (below)

Output architecture, as mergekit-moe selects it: no shared experts -> Mixtral
(``MixtralForCausalLM``; inputs must be Llama or Mistral); one shared expert with prompts (or
with ``gate_mode: random``) -> Qwen2-MoE (``Qwen2MoeForCausalLM``; Llama, Mistral or Qwen2 inputs).
mergekit-moe writes DeepSeek-MoE for a shared expert without prompts and Qwen3-MoE for Qwen3
inputs; graft moe does not write those and says so.

Router rows per layer ``l`` and expert ``i`` (a router logit is ``row . x``):

- ``hidden`` / ``hidden_last``: the base model's hidden state entering layer ``l`` at the last
  token of each positive prompt (prompts prefixed with the BOS token text, left-padded), averaged
  over the prompts, minus the same for the negative prompts, L2-normalised.
- ``hidden_avg``: the same with each prompt's hidden states averaged over its tokens.
- ``cheap_embed``: the sum of the prompts' token embeddings (padding excluded), L2-normalised,
  the same row for every layer (negative prompts are subtracted as above).
- ``random``: standard normal; ``uniform_random``: U(-1/sqrt(h), 1/sqrt(h)) (nn.Linear's init).
  Drawn from ``seed`` (``--random-seed``, default 0) exactly as ``mergekit-moe --random-seed``
  draws them, so the two tools give the same gates.

Differences from mergekit-moe 0.1.5 (on purpose):

- hidden states are computed in float32 (mergekit loads the base in bfloat16);
- ``hidden_avg`` averages over a prompt's real tokens (mergekit divides by the padded length and
  includes the padding positions' states);
- Mixtral experts are written in the hub layout (``block_sparse_moe.experts.N.w1/w2/w3``, what
  Mixtral-8x7B ships and what transformers 4 and 5, vLLM and llama.cpp's converter read);
  mergekit 0.1.5 writes transformers-5's fused ``mlp.experts.gate_up_proj``. The values are the same.

Streaming: every tensor goes straight from its input's memory map to its place in the output
shard (:class:`graftkit.merge.write.ShardWriter`); only ``hidden`` gates load the base model whole
(to run it on the prompts), as mergekit-moe does. The output folder appears only when complete.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Literal, Optional

from ..config import StrictModel, parse_config, read_yaml
from ..errors import ConfigError, FileFormatError, UnsupportedError
from ..outputs import atomic_dir, check_output
from ..tensors import NAME_TO_ST, ST_TO_TORCH, Checkpoint, st_dtype
from .write import ShardWriter

GATE_MODES = ("hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random")
DTYPES = ("float32", "float16", "bfloat16", "float64")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "vocab.txt", "chat_template.jinja", "spiece.model")
MLP_RE = re.compile(r"^(?P<prefix>.*\.layers\.(?P<layer>\d+)\.)mlp\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
# the config entries that must agree for experts to be slotted into one model
SHARED_SHAPE = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "num_attention_heads")


class MoEExpert(StrictModel):
    source_model: str
    positive_prompts: Optional[list[str]] = None
    negative_prompts: Optional[list[str]] = None
    noise_scale: Optional[float] = None
    residual_scale: Optional[float] = None


class MoEConfig(StrictModel):
    base_model: str
    experts: list[MoEExpert]
    gate_mode: Literal["hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random"] = "hidden"
    dtype: Optional[Literal["float32", "float16", "bfloat16", "float64"]] = None
    experts_per_token: int = 2
    shared_experts: Optional[list[MoEExpert]] = None
    architecture: Optional[str] = None


def load_moe_config(config: Any) -> MoEConfig:
    if isinstance(config, (str, Path)):
        config = read_yaml(config, "moe config")
    return parse_config(MoEConfig, config)


def _model_config(path: str, what: str) -> dict:
    from ..files import read_json

    p = Path(path)
    if not p.is_dir():
        raise FileFormatError(f"{what} {path} is not a folder; give a Hugging Face model folder")
    if not (p / "config.json").is_file():
        raise FileFormatError(f"{what} {path} has no config.json, so it is not a Hugging Face model folder; give the model's folder")
    return read_json(p / "config.json", "model config", mapping=True)


def check_config(cfg: MoEConfig, allow_all_same: bool = False) -> None:
    """mergekit-moe's refusals (``is_bad_config``), each one line."""
    if not cfg.experts:
        raise ConfigError("moe config has no experts; list at least experts_per_token entries under experts:")
    if cfg.experts_per_token < 1:
        raise ConfigError(f"experts_per_token is {cfg.experts_per_token}; it must be at least 1")
    if len(cfg.experts) < cfg.experts_per_token:
        raise ConfigError(f"experts_per_token is {cfg.experts_per_token} but there are only {len(cfg.experts)} experts; "
                          "lower experts_per_token or add experts")
    if cfg.gate_mode not in ("random", "uniform_random"):
        for i, e in enumerate(cfg.experts):
            if not e.positive_prompts:
                raise ConfigError(f"expert {i} ({e.source_model}) has no positive_prompts, which gate_mode {cfg.gate_mode} needs; "
                                  "add prompts or use gate_mode: random")

        def prompts(e: MoEExpert):
            return tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ())

        if len(cfg.experts) > 1 and all(prompts(e) == prompts(cfg.experts[0]) for e in cfg.experts[1:]):
            raise ConfigError("every expert has the same positive and negative prompts, so the gates cannot tell them apart; "
                              "give each expert prompts of what should be routed to it")
    if not allow_all_same and len(cfg.experts) > 1 and len({e.source_model for e in cfg.experts}) == 1:
        raise ConfigError("all experts are the same model, which gives the dense model's output at a larger cost; "
                          "pass --i-understand-this-is-not-useful-without-training if you will train it after")
    shared = cfg.shared_experts or []
    if shared and len({bool(e.positive_prompts) for e in shared}) > 1:
        raise ConfigError("give positive_prompts to every shared expert or to none")


def select_architecture(cfg: MoEConfig, model_types: list[str]) -> str:
    """``mixtral`` or ``qwen``, the architecture mergekit-moe would pick (refusing the ones it
    would pick that graft moe does not write)."""
    shared = cfg.shared_experts or []
    if len(set(model_types)) != 1:
        names = [cfg.base_model] + [e.source_model for e in cfg.experts] + [e.source_model for e in shared]
        kinds = ", ".join(f"{n} is {t}" for n, t in dict(zip(names, model_types)).items())
        raise ConfigError(f"experts of different architectures cannot share one MoE ({kinds}); "
                          "use a base and experts fine-tuned from the same model")
    kind = model_types[0]
    want = (cfg.architecture or "").lower()
    if want and not ("mixtral".startswith(want) or "qwen moe".startswith(want)):
        raise UnsupportedError(f"architecture {cfg.architecture!r}: graft moe writes Mixtral and Qwen MoE (Qwen2-MoE); "
                               "set architecture: mixtral or qwen, or leave it out")
    shared_gated = bool(shared) and (bool(shared[0].positive_prompts) or cfg.gate_mode in ("random", "uniform_random"))
    if not shared and (not want or "mixtral".startswith(want)):
        if kind not in ("llama", "mistral"):
            raise UnsupportedError(f"a Mixtral MoE needs Llama or Mistral experts, these are {kind}")
        return "mixtral"
    if not shared:
        raise ConfigError("Qwen MoE output needs exactly one shared expert; add shared_experts: [one expert] "
                          "or use architecture: mixtral")
    if want and "mixtral".startswith(want):
        raise ConfigError("Mixtral has no shared experts; remove shared_experts or use architecture: qwen")
    if len(shared) != 1:
        raise ConfigError(f"{len(shared)} shared experts; Qwen MoE output takes exactly one")
    if not shared_gated:
        raise UnsupportedError("a shared expert without positive_prompts makes mergekit-moe write DeepSeek-MoE, which graft moe "
                               "does not; give the shared expert positive_prompts (Qwen2-MoE output)")
    if kind not in ("llama", "mistral", "qwen2"):
        raise UnsupportedError(f"a Qwen MoE needs Llama, Mistral or Qwen2 experts, these are {kind}")
    return "qwen"


def _output_config(arch: str, base: str, n_experts: int, per_token: int, dtype: Optional[str]):
    import transformers

    base_cfg = transformers.AutoConfig.from_pretrained(base)
    if getattr(base_cfg, "mlp_bias", False):
        raise UnsupportedError(f"{base} has MLP biases; Mixtral and Qwen2-MoE experts have none")
    if arch == "mixtral":
        if getattr(base_cfg, "attention_bias", False):
            raise UnsupportedError(f"{base} has attention biases, which Mixtral lacks; use architecture: qwen")
        if not isinstance(base_cfg, transformers.MistralConfig):  # Mixtral's config is Mistral's plus the experts
            as_mistral = transformers.MistralConfig(**base_cfg.to_dict())
            as_mistral.sliding_window = None
            base_cfg = as_mistral
        out = transformers.MixtralConfig(**base_cfg.to_dict())
        out.architectures = ["MixtralForCausalLM"]
        out.num_local_experts = n_experts
        out.num_experts_per_tok = per_token
        out.sliding_window = None
    else:
        out = transformers.Qwen2MoeConfig(**base_cfg.to_dict())
        out.architectures = ["Qwen2MoeForCausalLM"]
        out.num_experts = n_experts
        out.num_experts_per_tok = per_token
        out.decoder_sparse_step = 1
        out.norm_topk_prob = True
        out.sliding_window = None
        out.use_sliding_window = False
        out.shared_expert_intermediate_size = out.intermediate_size
        out.moe_intermediate_size = out.intermediate_size
        out.mlp_only_layers = []
    if dtype:
        out.dtype = dtype
    return out


# ---------------------------------------------------------------------------------------- gates

def _tokenizer(base: str):
    import transformers

    if not any((Path(base) / n).is_file() for n in TOKENIZER_FILES):
        raise FileFormatError(f"base_model {base} has no tokenizer files, which prompt-based gates need; "
                              "add its tokenizer or use gate_mode: random")
    tok = transformers.AutoTokenizer.from_pretrained(base)
    # as mergekit-moe: left padding with BOS as the pad token, so a prompt's last position is real
    tok.padding_side = "left"
    if tok.bos_token_id is not None:
        tok.pad_token_id = tok.bos_token_id
    elif tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    elif tok.pad_token_id is None:
        tok.pad_token_id = 0  # the attention mask hides it either way
    return tok


def _tokenize(tok, prompts: list[str]):
    return tok([(tok.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)


def gate_vectors(cfg: MoEConfig, experts: list[MoEExpert], num_layers: int, hidden: int, seed: int = 0):
    """Router rows, ``(num_layers, len(experts), hidden)`` float32."""
    import torch

    if cfg.gate_mode == "random":
        return torch.randn((num_layers, len(experts), hidden), generator=torch.Generator().manual_seed(seed))
    if cfg.gate_mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden)
        return torch.rand((num_layers, len(experts), hidden), generator=torch.Generator().manual_seed(seed)) * 2 * scale - scale
    tok = _tokenizer(cfg.base_model)
    if cfg.gate_mode == "cheap_embed":
        embed = Checkpoint(cfg.base_model).get("model.embed_tokens.weight").float()

        def represent(prompts):
            batch = _tokenize(tok, prompts)
            ids, mask = batch["input_ids"], batch["attention_mask"]
            if int(ids.max()) >= embed.shape[0]:
                raise FileFormatError(f"the tokenizer of {cfg.base_model} gives token ids past its {embed.shape[0]} embedding rows; "
                                      "the tokenizer and the weights do not belong together")
            summed = (embed[ids] * mask.unsqueeze(-1)).sum(dim=(0, 1))
            return (summed / summed.norm().clamp(min=1e-8)).expand(num_layers, -1).clone()
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=torch.float32).eval()
        average = cfg.gate_mode == "hidden_avg"

        def represent(prompts):
            batch = _tokenize(tok, prompts)
            with torch.no_grad():
                states = model(**batch, output_hidden_states=True, return_dict=True).hidden_states[:-1]
            states = torch.stack(states)  # (layers, prompts, tokens, hidden): the input of each layer
            if average:
                mask = batch["attention_mask"].to(states.dtype)[None, :, :, None]
                per_prompt = (states * mask).sum(dim=2) / mask.sum(dim=2).clamp(min=1)
            else:
                per_prompt = states[:, :, -1, :]
            return per_prompt.mean(dim=1)

    rows = []
    with torch.no_grad():
        for e in experts:
            v = represent(e.positive_prompts)
            if e.negative_prompts:
                v = v - represent(e.negative_prompts)
            rows.append(v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(rows, dim=1).float()


def degenerate_layers(gates, threshold: float = 5.0) -> list[int]:
    """Layers whose router rows are nearly dependent (condition number over ``threshold``, mergekit's
    test): prompts too alike, so some experts will seldom be chosen."""
    import torch

    return [i for i in range(gates.shape[0]) if float(torch.linalg.cond(gates[i].float())) > threshold]


# --------------------------------------------------------------------------------------- output

def _plan_tensors(arch: str, cfg: MoEConfig, base: Checkpoint, experts: list[Checkpoint], shared: Optional[Checkpoint],
                  num_layers: int, hidden: int, n_heads: int, n_kv: int, head_dim: int):
    """``[(out key, source checkpoint or a tag, source key, expert or None, is down projection)]``."""
    jobs = []
    mlp = {}
    for key in base.keys():
        m = MLP_RE.match(key)
        if m:
            mlp[(int(m["layer"]), m["proj"])] = (m["prefix"], key)
        elif ".mlp." in key:
            raise UnsupportedError(f"{cfg.base_model}: {key} is an MLP tensor other than gate/up/down_proj weights; "
                                   "graft moe handles Llama-style MLPs only")
        else:
            jobs.append((key, base, key, None, False))
    layers = sorted({layer for layer, _ in mlp})
    if layers != list(range(num_layers)) or len(mlp) != 3 * num_layers:
        raise FileFormatError(f"{cfg.base_model} lacks gate/up/down_proj weights for some of its {num_layers} layers")
    if arch == "qwen":
        for layer in range(num_layers):
            prefix = mlp[(layer, "gate_proj")][0]
            for proj, rows in (("q_proj", n_heads * head_dim), ("k_proj", n_kv * head_dim), ("v_proj", n_kv * head_dim)):
                key = f"{prefix}self_attn.{proj}.bias"
                if key not in base.files:  # Qwen2-MoE attention has biases; zeros keep a Llama base's function
                    jobs.append((key, "zeros", (rows,), None, False))
    for (layer, proj), (prefix, key) in sorted(mlp.items()):
        for i, (ckpt, spec) in enumerate(zip(experts, cfg.experts)):
            if key not in ckpt.files:
                raise FileFormatError(f"expert {spec.source_model} has no {key}; its layers do not match the base")
            if ckpt.shape(key) != base.shape(key):
                raise ConfigError(f"expert {spec.source_model}: {key} is {list(ckpt.shape(key))}, the base's is "
                                  f"{list(base.shape(key))}; experts must be fine-tunes of the same base")
            if arch == "mixtral":
                out = f"{prefix}block_sparse_moe.experts.{i}.{MIXTRAL_NAMES[proj]}.weight"
            else:
                out = f"{prefix}mlp.experts.{i}.{proj}.weight"
            jobs.append((out, ckpt, key, spec, proj == "down_proj"))
        if shared is not None:
            spec = cfg.shared_experts[0]
            if key not in shared.files or shared.shape(key) != base.shape(key):
                raise ConfigError(f"shared expert {spec.source_model}: {key} is missing or shaped unlike the base's")
            jobs.append((f"{prefix}mlp.shared_expert.{proj}.weight", shared, key, spec, proj == "down_proj"))
    for layer in range(num_layers):
        prefix = mlp[(layer, "gate_proj")][0]
        gate = f"{prefix}block_sparse_moe.gate.weight" if arch == "mixtral" else f"{prefix}mlp.gate.weight"
        jobs.append((gate, "router", (layer, len(cfg.experts), hidden), None, False))
        if arch == "qwen":
            jobs.append((f"{prefix}mlp.shared_expert_gate.weight", "shared_router", (layer, 1, hidden), None, False))
    return jobs


def run_moe(config: Any, out: str | Path, *, overwrite: bool = False, seed: int | None = None,
            allow_all_same: bool = False, max_shard_size: int | str = "5GB") -> Path:
    """Assemble the MoE described by ``config`` (a path, dict or :class:`MoEConfig`) into ``out``."""
    import torch

    cfg = load_moe_config(config)
    raw = read_yaml(config, "moe config") if isinstance(config, (str, Path)) else cfg.model_dump(mode="json", exclude_none=True)
    check_config(cfg, allow_all_same=allow_all_same)
    shared_specs = cfg.shared_experts or []
    inputs = [("moe config", config)] if isinstance(config, (str, Path)) else []
    inputs += [("base_model", cfg.base_model)] + [("expert", e.source_model) for e in [*cfg.experts, *shared_specs]]
    check_output(out, inputs)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileFormatError(f"{out} already exists; choose another output folder or pass --overwrite")

    base_json = _model_config(cfg.base_model, "base_model")
    expert_jsons = [_model_config(e.source_model, "expert") for e in cfg.experts]
    shared_jsons = [_model_config(e.source_model, "shared expert") for e in shared_specs]
    types = [str(c.get("model_type")) for c in [base_json, *expert_jsons, *shared_jsons]]
    arch = select_architecture(cfg, types)
    for spec, c in zip([*cfg.experts, *shared_specs], [*expert_jsons, *shared_jsons]):
        differ = [k for k in SHARED_SHAPE if c.get(k) != base_json.get(k)]
        if differ:
            k = differ[0]
            raise ConfigError(f"expert {spec.source_model} has {k}={c.get(k)}, the base has {base_json.get(k)}; "
                              "experts must be fine-tunes of the same base")

    out_cfg = _output_config(arch, cfg.base_model, len(cfg.experts), cfg.experts_per_token, cfg.dtype)
    base = Checkpoint(cfg.base_model)
    experts = [Checkpoint(e.source_model) for e in cfg.experts]
    shared = Checkpoint(shared_specs[0].source_model) if shared_specs else None
    num_layers, hidden = int(out_cfg.num_hidden_layers), int(out_cfg.hidden_size)
    n_heads = int(out_cfg.num_attention_heads)
    n_kv = int(getattr(out_cfg, "num_key_value_heads", None) or n_heads)
    head_dim = int(getattr(out_cfg, "head_dim", None) or hidden // n_heads)
    jobs = _plan_tensors(arch, cfg, base, experts, shared, num_layers, hidden, n_heads, n_kv, head_dim)

    gated = list(cfg.experts) + (list(shared_specs) if arch == "qwen" else [])
    seed = 0 if seed is None else int(seed)
    gates = gate_vectors(cfg, gated, num_layers, hidden, seed=seed)
    bad = degenerate_layers(gates)
    if bad:
        print(f"graft: warning: layer(s) {', '.join(map(str, bad))} have nearly dependent router rows (prompts too alike); "
              "some experts will seldom be chosen", file=sys.stderr)

    base_dtype = st_dtype(base.dtype("model.embed_tokens.weight")) if "model.embed_tokens.weight" in base.files else "F32"
    want = cfg.dtype or base_json.get("torch_dtype") or base_json.get("dtype")
    out_st = NAME_TO_ST.get(want) if isinstance(want, str) else None

    def entry(job):
        key, src, skey, _, _ = job
        if isinstance(src, Checkpoint):
            return key, out_st or st_dtype(src.dtype(skey)), tuple(src.shape(skey))
        if src == "zeros":
            return key, out_st or base_dtype, tuple(skey)
        return key, out_st or base_dtype, (skey[1], skey[2])

    noise = torch.Generator().manual_seed(seed + 1)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, [entry(j) for j in jobs], max_shard_size=max_shard_size)
        try:
            for job in jobs:
                key, src, skey, spec, is_down = job
                dtype = getattr(torch, ST_TO_TORCH[entry(job)[1]])
                if isinstance(src, Checkpoint):
                    t = src.get(skey)
                    if spec is not None and (spec.noise_scale is not None or (is_down and spec.residual_scale is not None)):
                        t = t.float()
                        if spec.noise_scale is not None:
                            t = t + torch.randn(t.shape, generator=noise) * spec.noise_scale
                        if is_down and spec.residual_scale is not None:
                            t = t * spec.residual_scale
                elif src == "zeros":
                    t = torch.zeros(skey)
                elif src == "router":
                    t = gates[skey[0], :len(cfg.experts)]
                else:
                    t = gates[skey[0], len(cfg.experts):]
                writer.write(key, t.to(dtype).contiguous())
        except BaseException:
            writer.abort()
            raise
        writer.close()
        out_cfg.save_pretrained(tmp)
        for name in ("generation_config.json", *TOKENIZER_FILES):
            if (Path(cfg.base_model) / name).is_file():
                shutil.copy2(Path(cfg.base_model) / name, tmp / name)
        import yaml

        (tmp / "mergekit_moe_config.yml").write_text(yaml.safe_dump(raw, sort_keys=False))
        from .. import __version__

        provenance = {"produced_by": "graft moe", "graftkit": __version__, "architecture": out_cfg.architectures[0],
                      "gate_mode": cfg.gate_mode, "seed": seed, "base_model": cfg.base_model,
                      "experts": [e.source_model for e in cfg.experts],
                      "shared_experts": [e.source_model for e in shared_specs], "degenerate_layers": bad}
        (tmp / "graft_provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return out
