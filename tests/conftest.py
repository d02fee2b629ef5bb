"""Shared fixtures: tiny transformers models built in code (no network, no files)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
import transformers

transformers.logging.set_verbosity_error()


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_bert(seed: int = 0, num_labels: int = 3):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
    return transformers.BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_t5(seed: int = 0):
    """An encoder-decoder (T5ForConditionalGeneration); not in TINY_MODELS, whose models take
    ``input_ids`` alone (tests/test_t5_family.py covers it)."""
    torch.manual_seed(seed)
    cfg = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return transformers.T5ForConditionalGeneration(cfg).eval()


TINY_MODELS = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}


def tiny_inputs(seed: int = 1, batch: int = 2, length: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 96, (batch, length), generator=g)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def ids():
    return tiny_inputs()


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny models: one thread (hand-off between threads costs more than the work, and a busy
    2-core runner makes it far worse). Tests marked ``real`` use every core."""
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1 if request.node.get_closest_marker("real") else 1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def unsafe_where_no_isolation():
    """Code-task tests that score programs: where bubblewrap/unshare cannot isolate here (a
    container without user namespaces, GRAFT_SANDBOX=none) they still run, on the unisolated
    path; the refusal itself is tested in test_sandbox_attacks.py."""
    import sys

    from graftkit.eval import sandbox

    if sys.platform.startswith("linux") and sandbox.isolation() is not None:
        yield
        return
    with sandbox.allow_unsafe():
        yield
