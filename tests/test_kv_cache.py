"""Generation with the KV cache gives the same tokens as without it, for every tuning method.

With ``use_cache=True`` the model sees the prompt once and then one new token per step, so
every hook of an activation-space adapter runs on a single position; a hook that reads the
wrong tensor then (a parallel adapter capturing an input from another call, a connected
adapter reusing a previous step's output, a site that caches a sequence-length-shaped tensor)
changes the generated text only with the cache. Each method runs with a random (non-identity)
start from the contract matrix's rows (tests/test_contract.py), on the tiny Llama.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import graftkit as gk
from graftkit.methods.iapt import IAPTSite, instruction
from graftkit.registry import METHODS

from conftest import tiny_inputs
from test_contract import MATRIX, build, config_for, tiny, weight_delta

NEW_TOKENS = 8


def _on_llama(row: str) -> bool:
    # every row, also the variants the matrix runs on another model only (connected and shared
    # adapters are the ones most likely to mishandle one-position steps)
    return MATRIX[row].targets.get("llama", ()) is not None


def _first_row_per_method(rows: list[str]) -> list[str]:
    return list({MATRIX[row].method: row for row in reversed(rows)}.values())[::-1]


_ON_LLAMA = [row for row in MATRIX if _on_llama(row)]
# weight-space adapters change each position's projections alike: one row per method is enough;
# every activation-space row runs (each variant has its own hooks)
ROWS = [row for row in _ON_LLAMA if not weight_delta(row, "llama") or row in _first_row_per_method(_ON_LLAMA)]
DELTA_ROWS = _first_row_per_method([row for row in _ON_LLAMA if weight_delta(row, "llama")])
#: GPT-2 keeps its own cache code (and Conv1D sublayers): the activation-space rows the matrix
#: runs there
GPT2_ROWS = [row for row, case in MATRIX.items()
             if "gpt2" in (case.models or ["gpt2"]) and case.targets.get("gpt2", ()) is not None and not weight_delta(row, "gpt2")]
#: rows with nothing to adapt in the tiny Llama (BitFit: it has no bias terms) run on a Llama
#: with attention and MLP biases
BIASED_ROWS = [row for row, case in MATRIX.items() if case.targets.get("llama", ()) is None]


def generate(model, cache: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy continuation of two fixed prompts, the second left-padded as in a batch of unequal
    prompts: (new tokens, raw logits of every step)."""
    ids = tiny_inputs(seed=3, batch=2, length=5)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    pin = contextlib.nullcontext()
    if not cache and any(isinstance(m, IAPTSite) for m in model.modules()):
        # without a cache every step re-reads the whole sequence, and IAPT would take the generated
        # tokens for part of the instruction: the caller pins it (see methods/iapt.py)
        pin = instruction(model, ids.shape[1])
    with torch.no_grad(), pin:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, use_cache=cache, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, dim=1)


_BASE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def base_generation(model_name: str = "llama") -> tuple[torch.Tensor, torch.Tensor]:
    if model_name not in _BASE:
        _BASE[model_name] = generate(tiny(model_name), cache=True)
    return _BASE[model_name]


def assert_same_generation(cached, uncached, what: str) -> None:
    tokens_c, logits_c = cached
    tokens_u, logits_u = uncached
    assert tokens_c.shape == (2, NEW_TOKENS)
    assert torch.equal(tokens_c, tokens_u), f"{what}: the KV cache changed the generated tokens\n{tokens_c}\n{tokens_u}"
    err = (logits_c - logits_u).abs().max().item()
    assert err <= 1e-4 * max(1.0, logits_u.abs().max().item()), f"{what}: cached logits differ by {err:.3g}"


def test_every_registered_method_has_a_cache_row():
    covered = {MATRIX[row].method for row in ROWS + BIASED_ROWS}
    missing = sorted(set(METHODS.names()) - covered)
    assert not missing, f"methods without a KV-cache check on the tiny Llama: {missing}"


@pytest.mark.parametrize("row", ROWS)
def test_cached_generation_matches_uncached(row):
    model = build(row, "llama", random=True)
    cached = generate(model, cache=True)
    assert_same_generation(cached, generate(model, cache=False), row)
    # the adapter acts during generation (with the cache too), or the comparison proves nothing
    base_logits = base_generation()[1]
    assert (cached[1] - base_logits).abs().max() > 1e-4, "the adapter had no effect on generation"


@pytest.mark.parametrize("row", GPT2_ROWS)
def test_cached_generation_matches_uncached_gpt2(row):
    model = build(row, "gpt2", random=True)
    cached = generate(model, cache=True)
    assert_same_generation(cached, generate(model, cache=False), f"{row} on GPT-2")
    assert (cached[1] - base_generation("gpt2")[1]).abs().max() > 1e-4, "the adapter had no effect on generation"


@pytest.mark.parametrize("row", DELTA_ROWS)
def test_merged_adapter_generation(row):
    model = build(row, "llama", random=True)
    unmerged = generate(model, cache=True)
    gk.merge_adapter(model)
    cached = generate(model, cache=True)
    assert_same_generation(cached, generate(model, cache=False), f"{row} merged")
    assert torch.equal(cached[0], unmerged[0]), "merging changed the generated tokens"


@pytest.mark.parametrize("row", BIASED_ROWS)
def test_cached_generation_on_a_biased_llama(row):
    import transformers

    def biased_llama():
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       attention_bias=True, mlp_bias=True)
        return transformers.LlamaForCausalLM(cfg).eval()

    base = generate(biased_llama(), cache=True)
    model = biased_llama()
    cfg = config_for(row, "llama", random=True)
    cfg.pop("targets", None)  # the matrix's "nothing to adapt here" marker; the method's defaults apply
    gk.inject(model, cfg)
    with torch.no_grad():  # a trained (non-identity) state
        for p in gk.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.05)
    cached = generate(model, cache=True)
    assert_same_generation(cached, generate(model, cache=False), row)
    assert (cached[1] - base[1]).abs().max() > 1e-4, "the adapter had no effect on generation"
