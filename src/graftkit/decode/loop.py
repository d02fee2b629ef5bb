"""Token-by-token decoding over one or more causal LMs whose next-token distributions are combined.

``graft generate`` uses this loop for plain generation (one model) and for decode-time
combinations such as EFT (:mod:`.eft`, three models). It is not ``model.generate``: that API
decodes one model, and a combination needs every model's distribution at every step before
the next token is chosen. Each model keeps its own KV cache (:class:`Stream`), so a step feeds
every model only the one new token; ``cache=False`` recomputes each model over the whole
sequence instead (slow; the tests use it as the reference the cached path must equal).

One sequence at a time (batch 1): no padding, so the positions and the attention masks are
the models' defaults and the cached and uncached paths see exactly the same inputs.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError


@dataclass(frozen=True)
class Sampling:
    """``temperature`` 0 is greedy (argmax); above 0 the token is drawn from the combined
    distribution divided by the temperature, restricted to its top-``top_p`` nucleus, with a
    generator seeded by ``seed`` (the same seed gives the same tokens)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ConfigError(f"temperature must be 0 (greedy) or more, not {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ConfigError(f"top_p must be in (0, 1], not {self.top_p}")


@dataclass
class Decoded:
    """What one prompt decoded to: the new token ids, and per step the combined log-probabilities
    over the whole vocabulary (float32, rows of ``(steps, vocab)``) they were chosen from
    (before temperature and top-p)."""

    tokens: list[int]
    logprobs: torch.Tensor
    stopped: bool = False  # an end-of-sequence token ended it (it is the last of ``tokens``)
    extra: dict = field(default_factory=dict)


class Stream:
    """One model decoding one sequence: feed it tokens, read its next-token log-probabilities.

    Cached, each call runs the model on the new tokens only, against the KV cache of everything
    fed before. Uncached, each call runs the model on the whole sequence so far."""

    def __init__(self, model: nn.Module, cache: bool = True):
        self.model = model
        self.cache = cache
        self.device = next(model.parameters()).device
        self.past = None
        self.seen: list[int] = []
        params = inspect.signature(model.forward).parameters
        # transformers 5.x renamed past_key_values to cache (the old name still works, with a warning)
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        # only the last position's logits are needed: skips the LM head over a long prompt
        self.last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    @torch.inference_mode()
    def feed(self, tokens: Sequence[int]) -> torch.Tensor:
        self.seen.extend(int(t) for t in tokens)
        if self.cache:
            ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
            out = self.model(input_ids=ids, use_cache=True, **{self.cache_arg: self.past}, **self.last_only)
            self.past = out.get(self.cache_arg) if out.get(self.cache_arg) is not None else out.get("past_key_values")
        else:
            ids = torch.tensor([self.seen], dtype=torch.long, device=self.device)
            out = self.model(input_ids=ids, use_cache=False, **self.last_only)
        # log-softmax in float32 whatever the model's dtype: the combination subtracts these
        return torch.log_softmax(out.logits[0, -1].float(), dim=-1)


def choose(logprobs: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token from normalized log-probabilities: argmax, or a seeded nucleus draw."""
    if sampling.temperature == 0:
        return int(torch.argmax(logprobs))
    probs = torch.softmax(logprobs / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        ordered, order = torch.sort(probs, descending=True)
        # keep a token while the mass strictly before it is below top_p: the top token always stays
        before = torch.cumsum(ordered, dim=-1) - ordered
        ordered = torch.where(before < sampling.top_p, ordered, torch.zeros_like(ordered))
        probs = torch.zeros_like(probs).scatter_(-1, order, ordered)
    # the draw runs on the CPU: one generator, the same tokens on any device
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def decode(models: Sequence[nn.Module], combine: Callable[[list[torch.Tensor]], torch.Tensor], prompt: Sequence[int], *,
           max_new_tokens: int, sampling: Sampling = Sampling(), eos: Sequence[int] = (), cache: bool = True) -> Decoded:
    """Decode ``prompt`` with ``models`` together: each step every model's next-token
    log-probabilities go to ``combine``, whose result (any per-step constant shift allowed) is
    renormalized with a log-softmax and a token chosen from it (:func:`choose`). Stops after
    ``max_new_tokens`` or at a token in ``eos``."""
    sampling.check()
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be 1 or more, not {max_new_tokens}")
    if not prompt:
        raise ConfigError("the prompt is empty after tokenization; give a prompt with some text")
    generator = torch.Generator().manual_seed(int(sampling.seed)) if sampling.temperature > 0 else None
    streams = [Stream(m, cache) for m in models]
    stop = {int(t) for t in eos}
    tokens: list[int] = []
    rows: list[torch.Tensor] = []
    new: list[int] = list(prompt)
    for _ in range(max_new_tokens):
        combined = torch.log_softmax(combine([s.feed(new) for s in streams]).float(), dim=-1)
        rows.append(combined.cpu())
        token = choose(combined, sampling, generator)
        tokens.append(token)
        if token in stop:
            return Decoded(tokens, torch.stack(rows), stopped=True)
        new = [token]
    return Decoded(tokens, torch.stack(rows))


def single(logprobs: list[torch.Tensor]) -> torch.Tensor:
    """The combination of one model: its own distribution (plain generation)."""
    return logprobs[0]
