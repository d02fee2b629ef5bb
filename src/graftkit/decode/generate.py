"""``graft generate``: text from a causal LM, alone or as an EFT up-scaling (:mod:`.eft`).

Loads the models (folders or packaged aliases, offline, safetensors), checks before loading
any weights that an EFT's three tokenizers are one vocabulary, encodes each prompt (optionally
with the tokenizer's chat template) and decodes it token by token (:mod:`.loop`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import ConfigError
from .eft import EftModels, check_same_tokenizer, eft_decode, plain_decode
from .loop import Sampling

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: this machine has no CUDA GPU that torch can use; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device torch knows; use auto, cpu or cuda[:N]") from None


def generate(model: str, prompts: Sequence[str], *, eft: tuple[str, str] | None = None, scale: float = 1.0,
             max_new_tokens: int = 64, sampling: Sampling = Sampling(), chat: bool = False, system: str | None = None,
             device: str = "auto", dtype: str = "float32") -> list[dict]:
    """One record per prompt: ``prompt``, ``text`` (the decoded new tokens, special tokens
    dropped), ``tokens``, ``logprob`` (the sum of the chosen tokens' log-probabilities under the
    distribution they were drawn from) and ``stopped`` (ended by an end-of-sequence token).

    ``eft``: ``(small_ft, small_base)``; ``model`` is then the large base and each step decodes
    from ``large + scale * (small_ft - small_base)`` in log-softmax space."""
    from ..assets import model_dir
    from ..eval.generate import encode_prompts, eos_ids
    from ..eval.models import load_tokenizer
    from ..io.hf import load_model

    sampling.check()
    if not math.isfinite(scale):
        raise ConfigError(f"--eft-scale must be a finite number, not {scale}")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be 1 or more, not {max_new_tokens}")
    if not prompts:
        raise ConfigError("no prompt: give one or more --prompt TEXT")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    where = pick_device(device)
    names = {"large base" if eft else "model": model}
    if eft:
        names.update({"small fine-tuned": eft[0], "small base": eft[1]})
    tokenizers = {role: load_tokenizer(model_dir(path)) for role, path in names.items()}
    if eft:  # before any weights load: a wrong pairing fails in a second
        check_same_tokenizer(tokenizers)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # per-tensor "Loading weights" bars would bury a one-line error
    models = {role: load_model(path, head="causal-lm", dtype=DTYPES[dtype]).to(where).eval() for role, path in names.items()}
    if eft:
        check_same_tokenizer(tokenizers, models)
    role = next(iter(names))
    tokenizer, lead = tokenizers[role], models[role]
    encoded = encode_prompts(tokenizer, list(prompts), chat=chat, system_prompt=system, max_prompt_length=None,
                             where="graft generate")
    eos = eos_ids(lead, tokenizer)
    records = []
    for text, ids in zip(prompts, encoded):
        if eft:
            out = eft_decode(EftModels(*models.values()), ids, scale=scale, max_new_tokens=max_new_tokens,
                             sampling=sampling, eos=eos)
        else:
            out = plain_decode(lead, ids, max_new_tokens=max_new_tokens, sampling=sampling, eos=eos)
        chosen = out.logprobs[torch.arange(len(out.tokens)), torch.tensor(out.tokens)]
        records.append({"prompt": text, "text": tokenizer.decode(out.tokens, skip_special_tokens=True),
                        "tokens": out.tokens, "logprob": float(chosen.sum()), "stopped": out.stopped})
    return records
