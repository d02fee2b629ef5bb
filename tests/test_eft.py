"""graft generate and EFT up-scaling (graftkit.decode): the combination, the decoding loop, the CLI."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from graftkit.cli import main
from graftkit.decode import EftModels, Sampling, eft_decode, plain_decode
from graftkit.decode.eft import combine

VOCAB = 96


def llama(seed: int, hidden: int = 32, layers: int = 2, vocab: int = VOCAB):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None  # runs to max_new_tokens, as decode() does without eos
    return model


@pytest.fixture(scope="module")
def trio():
    """A "large" base (wider, deeper) and two different small models, one vocabulary."""
    return llama(0, hidden=48, layers=3), llama(1), llama(2)


PROMPT = [1, 17, 5, 60, 33]


def hf_greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def full_logprobs(model, seq):
    """log-softmax of ``model`` at every position of ``seq`` (one uncached forward)."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].float(), dim=-1)


def test_identical_small_models_equal_the_large_base(trio):
    large, small, _ = trio
    twin = llama(1)  # the same weights in another module: ft == base
    out = eft_decode(EftModels(large, small, twin), PROMPT, scale=1.0, max_new_tokens=12)
    assert out.tokens == hf_greedy(large, PROMPT, 12)
    # the combined rows are the large base's own next-token log-probabilities at each step
    ref = full_logprobs(large, PROMPT + out.tokens)[len(PROMPT) - 1:-1]
    torch.testing.assert_close(out.logprobs, ref, atol=2e-5, rtol=0)
    plain = plain_decode(large, PROMPT, max_new_tokens=12)
    assert plain.tokens == out.tokens
    torch.testing.assert_close(plain.logprobs, out.logprobs, atol=2e-6, rtol=0)


def test_scale_zero_is_the_large_base(trio):
    large, ft, base = trio
    out = eft_decode(EftModels(large, ft, base), PROMPT, scale=0.0, max_new_tokens=12)
    assert out.tokens == hf_greedy(large, PROMPT, 12)
    moved = eft_decode(EftModels(large, ft, base), PROMPT, scale=1.0, max_new_tokens=12)
    assert moved.tokens != out.tokens  # the small pair does steer it (else the tests above prove nothing)


def test_one_step_by_hand(trio):
    large, ft, base = trio
    scale = 0.7
    rows = [full_logprobs(m, PROMPT)[-1] for m in (large, ft, base)]
    # log p_large + s (log p_ft - log p_base), renormalized; written out, not through combine()
    want = rows[0] + scale * (rows[1] - rows[2])
    want = want - torch.logsumexp(want, dim=-1)
    out = eft_decode(EftModels(large, ft, base), PROMPT, scale=scale, max_new_tokens=1)
    torch.testing.assert_close(out.logprobs[0], want, atol=2e-5, rtol=0)
    assert out.tokens == [int(want.argmax())]
    torch.testing.assert_close(combine(*rows, scale), rows[0] + scale * (rows[1] - rows[2]))
    # log-softmax, not raw logits, per model: the two differ by a per-model constant, so the
    # renormalized distribution is the same either way (what the docstring claims)
    with torch.no_grad():
        raw = [m(input_ids=torch.tensor([PROMPT])).logits[0, -1] for m in (large, ft, base)]
    torch.testing.assert_close(torch.log_softmax(raw[0] + scale * (raw[1] - raw[2]), -1), want, atol=2e-5, rtol=0)


def test_a_ruled_out_token_stays_out():
    no = float("-inf")  # the log-probability of a ruled-out token
    large, ft, base = torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-1.0, no, -0.5]), torch.tensor([-2.0, no, no])
    got = combine(large, ft, torch.tensor([-2.0, no, -1.0]), 1.0)
    assert got.tolist() == [0.0, no, -2.5]  # -inf minus -inf: ruled out, not NaN
    # only the small base rules token 2 out (an infinite ratio): it takes all the mass
    got = torch.log_softmax(combine(large, ft, base, 1.0), -1)
    assert got.tolist() == [no, no, 0.0]


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=1.3, top_p=0.9, seed=5)], ids=["greedy", "sampled"])
def test_cached_equals_uncached(trio, sampling):
    models = EftModels(*trio)
    cached = eft_decode(models, PROMPT, scale=1.5, max_new_tokens=16, sampling=sampling)
    again = eft_decode(models, PROMPT, scale=1.5, max_new_tokens=16, sampling=sampling, cache=False)
    assert cached.tokens == again.tokens
    torch.testing.assert_close(cached.logprobs, again.logprobs, atol=2e-5, rtol=0)


def test_sampling_is_seeded_and_top_p_narrows(trio):
    models = EftModels(*trio)
    draw = lambda **kw: eft_decode(models, PROMPT, max_new_tokens=16, sampling=Sampling(**kw)).tokens  # noqa: E731
    assert draw(temperature=1.0, seed=3) == draw(temperature=1.0, seed=3)
    assert draw(temperature=1.0, seed=3) != draw(temperature=1.0, seed=4)
    greedy = eft_decode(models, PROMPT, max_new_tokens=16).tokens
    assert draw(temperature=1.0, top_p=1e-6, seed=3) == greedy  # the nucleus keeps only the top token
    assert draw(temperature=1.0, seed=3) != greedy


def test_stops_at_eos(trio):
    large = trio[0]
    first = plain_decode(large, PROMPT, max_new_tokens=6).tokens
    out = plain_decode(large, PROMPT, max_new_tokens=6, eos=[first[2]])
    assert out.stopped and out.tokens == first[:3] and out.logprobs.shape == (3, VOCAB)


# -- the CLI on model folders ----------------------------------------------------------------------------------

def tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[3]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=words[0], bos_token=words[1],
                                                eos_token=words[2], unk_token=words[3])


WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, VOCAB)]


def save(model, tok, path):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def folders(trio, tmp_path_factory):
    root = tmp_path_factory.mktemp("eft")
    tok = tokenizer(WORDS)
    large, ft, base = (save(m, tok, root / n) for m, n in zip(trio, ("large", "ft", "base")))
    return {"large": large, "ft": ft, "base": base, "root": root}


def run(capsys, *argv):
    capsys.readouterr()  # what saving the folders printed
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_eft_json(folders, capsys, trio):
    code, out, err = run(capsys, folders["large"], "--eft", folders["ft"], folders["base"], "--prompt", "w17 w5 w60",
                         "--max-new-tokens", "6", "--json", "--eft-scale", "0.5")
    assert code == 0, err
    [rec] = json.loads(out)
    prompt = tokenizer(WORDS)("w17 w5 w60")["input_ids"]
    want = eft_decode(EftModels(*trio), prompt, scale=0.5, max_new_tokens=6)
    assert rec["tokens"] == want.tokens
    assert rec["text"] == tokenizer(WORDS).decode(want.tokens, skip_special_tokens=True)
    # without --eft: the large model alone
    code, out, err = run(capsys, folders["large"], "--prompt", "w17 w5 w60", "--max-new-tokens", "6", "--json")
    assert code == 0, err
    assert json.loads(out)[0]["tokens"] == hf_greedy(trio[0], prompt, 6)


def test_cli_different_tokenizers_fail(folders, capsys, trio, tmp_path):
    renamed = WORDS[:40] + ["zz"] + WORDS[41:]
    other = save(trio[1], tokenizer(renamed), tmp_path / "renamed")
    code, out, err = run(capsys, folders["large"], "--eft", other, folders["base"], "--prompt", "w5")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("graft: error: EFT needs one tokenizer") and "token 40 is 'w40'" in err
    bigger = save(llama(1, vocab=VOCAB + 8), tokenizer(WORDS + [f"x{i}" for i in range(8)]), tmp_path / "bigger")
    code, out, err = run(capsys, folders["large"], "--eft", folders["ft"], bigger, "--prompt", "w5")
    assert code == 2 and err.count("\n") == 1 and f"has {VOCAB} tokens and small base's {VOCAB + 8}" in err


def test_cli_different_output_sizes_fail(folders, capsys, tmp_path):
    padded = save(llama(1, vocab=VOCAB + 32), tokenizer(WORDS), tmp_path / "padded")  # same tokenizer, wider head
    code, out, err = run(capsys, folders["large"], "--eft", padded, folders["base"], "--prompt", "w5")
    assert code == 2 and err.count("\n") == 1 and "output layers have large base 96, small fine-tuned 128" in err


@pytest.mark.parametrize("argv,needle", [
    (["--temperature", "-1"], "temperature must be 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--eft-scale", "nan"], "finite"),
    (["--max-new-tokens", "0"], "must be 1 or more"),
])
def test_cli_bad_options(folders, capsys, argv, needle):
    code, out, err = run(capsys, folders["large"], "--eft", folders["ft"], folders["base"], "--prompt", "w5", *argv)
    assert code == 2 and err.count("\n") == 1 and err.startswith("graft: error:") and needle in err, err


def test_cli_missing_model_and_prompt(folders, capsys, tmp_path):
    code, out, err = run(capsys, folders["large"], "--eft", str(tmp_path / "nope"), folders["base"], "--prompt", "w5")
    assert code == 2 and err.count("\n") == 1 and "nope" in err and "neither a folder nor a packaged alias" in err
    code, out, err = run(capsys, folders["large"])
    assert code == 2 and err.count("\n") == 1 and "no prompt" in err


def test_cli_eft_scale_needs_eft(folders, capsys):
    code, out, err = run(capsys, folders["large"], "--prompt", "w5", "--eft-scale", "2")
    assert code == 2 and err.count("\n") == 1 and "--eft-scale needs --eft" in err


# -- real: SmolLM2-135M as the small model, a deeper SmolLM2 built from it as the large one ---------------------

def upscale_depth(model, order):
    """A deeper Llama built from ``model``: its decoder layers in ``order`` (indices may repeat),
    each a copy with its own KV-cache slot; embeddings, norm and head copied once."""
    import copy

    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList()
    try:
        big = copy.deepcopy(model)
    finally:
        model.model.layers = layers
    stack = [copy.deepcopy(layers[i]) for i in order]
    for i, layer in enumerate(stack):
        layer.self_attn.layer_idx = i
    big.model.layers = torch.nn.ModuleList(stack)
    big.config.num_hidden_layers = len(stack)
    if getattr(big.config, "layer_types", None):
        big.config.layer_types = [model.config.layer_types[i] for i in order]
    return big.eval()


@pytest.mark.real
def test_smollm2_eft():
    """SmolLM2-135M-Instruct as the small model(s); the large base is SmolLM2 up-scaled in depth
    to 40 layers (layers 0-29 then 20-29 again: 170M parameters, the same tokenizer)."""
    from graftkit.io.hf import load_model, load_tokenizer

    small = load_model("smollm2", head="causal-lm").eval()
    tok = load_tokenizer("smollm2")
    large = upscale_depth(small, list(range(30)) + list(range(20, 30)))
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    out = eft_decode(EftModels(large, small, small), prompt, max_new_tokens=4)
    with torch.no_grad():
        # an explicit mask: the chat prompt holds <|im_end|>, the pad token, which generate would mask out
        ref = large.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=4, do_sample=False, eos_token_id=None,
                             pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
    assert out.tokens == ref  # identical small models: the large base's own greedy decoding
    # a real combination (the small model up-scaled by itself minus the deeper one), one step by hand
    rows = [full_logprobs(m, prompt)[-1] for m in (small, small, large)]
    want = torch.log_softmax(rows[0] + 2.0 * (rows[1] - rows[2]), dim=-1)
    step = eft_decode(EftModels(small, small, large), prompt, scale=2.0, max_new_tokens=1)
    torch.testing.assert_close(step.logprobs[0], want, atol=1e-3, rtol=1e-5)  # values reach -60
    assert step.tokens == [int(want.argmax())]
