"""IAPT (instruction-aware prompt tuning, methods/iapt.py): prompts generated per layer from the
instruction, the safe Padé activation, the KV cache, save/load, ``graft train`` and refusals."""
from __future__ import annotations

import pytest
import torch
import transformers

import graftkit as gk
from conftest import tiny_bert, tiny_gpt2, tiny_inputs, tiny_llama
from graftkit.adapter import get_state
from graftkit.errors import AdapterError, ConfigError, UnsupportedError
from graftkit.methods.iapt import IAPTSite, instruction, instruction_from_labels, note_instruction, rational, rational_init
from test_train import assets, chat_recipe, cls_recipe, losses, run_cli, _recipe_file, assert_one_line_error  # noqa: F401

N = 3


def one_line(exc: BaseException, *needles: str) -> str:
    msg = str(exc)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def iapt_llama(**over):
    torch.manual_seed(5)
    return gk.inject(tiny_llama(), {"method": "iapt", "num_virtual_tokens": N, "bottleneck": 8, **over})


def prompts(model, ids, mask=None):
    """Every layer's generated prompt keys, as the cache holds them after a prefill."""
    with torch.no_grad():
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
    return torch.stack([layer.keys[:, :, :N] for layer in cache.layers])


def padded_batch():
    ids = tiny_inputs(seed=3, batch=2, length=6)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    return ids, mask


# -- the rational activation -------------------------------------------------------------------------

def test_rational_matches_its_hand_gradient_and_starts_as_gelu():
    x = torch.tensor([[-2.0, -0.5, 0.3, 1.7]], dtype=torch.float64)
    p = torch.tensor([[0.1, 0.5, 0.4, 0.07, -0.01, 0.002]], dtype=torch.float64, requires_grad=True)
    q = torch.tensor([[0.3, -0.2, 0.05, 0.01]], dtype=torch.float64, requires_grad=True)
    y = rational(x, p, q)
    P = sum(p[0, j] * x ** j for j in range(6))
    S = sum(q[0, k - 1] * x ** k for k in range(1, 5))
    Q = 1 + S.abs()
    torch.testing.assert_close(y, P / Q)
    y.sum().backward()
    # dR/da_j = x^j / Q ;  dR/db_k = -P sign(S) x^k / Q^2
    want_p = torch.stack([(x ** j / Q).sum() for j in range(6)])
    want_q = torch.stack([(-P * torch.sign(S) * x ** k / Q ** 2).sum() for k in range(1, 5)])
    torch.testing.assert_close(p.grad[0], want_p.detach())
    torch.testing.assert_close(q.grad[0], want_q.detach())
    a, b = rational_init("gelu")
    grid = torch.linspace(-3, 3, 301)
    fitted = rational(grid[None], torch.tensor([a]), torch.tensor([b]))[0]
    assert (fitted - torch.nn.functional.gelu(grid)).abs().max() < 2e-3
    # the denominator never drops below 1 (the safe form): large coefficients of either sign give no poles
    wild = rational(torch.linspace(-10, 10, 2001)[None], torch.ones(1, 6), -5 * torch.ones(1, 4))
    assert wild.isfinite().all()


# -- the prompts follow the instruction ----------------------------------------------------------------

def test_prompts_change_with_the_instruction_and_only_with_it():
    model = iapt_llama()
    a = tiny_inputs(seed=1, batch=1, length=6)
    b = tiny_inputs(seed=2, batch=1, length=6)
    assert not torch.equal(a, b)
    pa, pb = prompts(model, a), prompts(model, b)
    assert pa.abs().sum() > 0, "the placeholders were never overwritten"
    assert not torch.allclose(pa, pb), "two instructions gave the same prompts"
    torch.testing.assert_close(prompts(model, a), pa, atol=0, rtol=0)
    # with the instruction pinned to the first 4 columns, what follows it does not feed the prompts
    c = a.clone()
    c[0, 4:] = b[0, 4:]
    with instruction(model, 4):
        torch.testing.assert_close(prompts(model, c), prompts(model, a), atol=1e-6, rtol=0)
    # per row: the batch gives each row its own prompts
    pab = prompts(model, torch.cat([a, b]))
    torch.testing.assert_close(pab[:, 0], pa[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(pab[:, 1], pb[:, 0], atol=1e-5, rtol=0)


def test_training_instruction_is_the_prompt_before_the_response():
    labels = torch.tensor([[-100, -100, -100, 7, 8, -100], [-100, -100, 5, 6, 9, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    want = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(instruction_from_labels(labels, mask), want)
    model = iapt_llama()
    ids = tiny_inputs(seed=4, batch=2, length=6)
    note_instruction({"input_ids": ids, "labels": labels, "attention_mask": mask})
    with torch.no_grad():
        noted = model(input_ids=ids, attention_mask=mask).logits
        other = model(input_ids=ids.clone(), attention_mask=mask).logits  # another tensor: not the noted batch
        with instruction(model, want):
            pinned = model(input_ids=ids.clone(), attention_mask=mask).logits
    torch.testing.assert_close(noted, pinned, atol=1e-6, rtol=0)
    assert not torch.allclose(noted, other), "the response fed its own prompts"
    with torch.no_grad():  # labels given to the model itself mark the prompt too
        with_labels = model(input_ids=ids.clone(), attention_mask=mask, labels=labels).logits
    torch.testing.assert_close(with_labels, pinned, atol=1e-6, rtol=0)


def test_gradients_reach_the_generator_and_the_rational_coefficients_only():
    model = iapt_llama()
    model.train()
    site = gk.sites(model)["model"]
    assert isinstance(site, IAPTSite)
    trained = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"pool_w1", "pool_w2", "down_w", "down_b", "rational_p", "rational_q", "up_w", "up_b"}
    model(input_ids=tiny_inputs()).logits.pow(2).mean().backward()
    for name, t in site.trained_tensors().items():
        assert t.grad is not None and t.grad.abs().sum() > 0, name
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


# -- generation, saving --------------------------------------------------------------------------------

def test_cached_generation_equals_full_recompute_greedy_and_beam(monkeypatch):
    model = iapt_llama().eval()
    calls = []
    real = IAPTSite.generate_prompts
    monkeypatch.setattr(IAPTSite, "generate_prompts", lambda self, *a: calls.append(1) or real(self, *a))
    ids, mask = padded_batch()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(**kw, use_cache=True)
        assert len(calls) == 2, "the prompts must be generated once per layer, at the prefill"
        with instruction(model, ids.shape[1]):
            full = model.generate(**kw, use_cache=False)
            beams_u = model.generate(**kw, num_beams=3, use_cache=False)
        beams_c = model.generate(**kw, num_beams=3, use_cache=True)
        with gk.disabled(model):
            plain = model.generate(**kw, use_cache=True)
    assert torch.equal(cached, full)
    assert torch.equal(beams_c, beams_u)
    assert not torch.equal(cached, plain), "the prompts had no effect"


def test_save_load_round_trip_and_weight_merge_refused(tmp_path):
    model = iapt_llama().eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    path = gk.save_adapter(model, tmp_path / "a")
    saved = gk.read_adapter(path)
    assert saved.method == "iapt" and saved.tensors["model.rational_p"].shape == (2, 6)
    fresh = gk.load_adapter(tiny_llama(), path).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids, attention_mask=mask).logits, want, atol=1e-6, rtol=0)
    with pytest.raises(AdapterError) as exc:
        gk.merge_adapter(fresh)
    one_line(exc.value, "iapt adapter has none")


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_bert])
def test_other_architectures_run_and_differ_from_the_base(build):
    model = gk.inject(build(), {"method": "iapt", "num_virtual_tokens": 2}).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        with gk.disabled(model):
            base = model(input_ids=ids, attention_mask=mask).logits
    assert got.shape == base.shape and not torch.allclose(got, base)


def test_llama_classification_ignores_padding_and_pools_the_last_real_token():
    """A right-padded row scores as the same row alone: the generators pool the real tokens only
    (padding is no instruction) and the head reads the last real token."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64, num_labels=3, pad_token_id=0)
    model = gk.inject(transformers.LlamaForSequenceClassification(cfg).eval(), {"method": "iapt", "num_virtual_tokens": N})
    ids = tiny_inputs(seed=6, batch=1, length=5).clamp(min=1)
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = (padded != 0).long()
    with torch.no_grad():
        alone = model(input_ids=ids).logits
        got = model(input_ids=padded, attention_mask=mask).logits
        unmasked = model(input_ids=padded, attention_mask=torch.ones_like(padded)).logits
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)
    assert not torch.allclose(unmasked, alone, atol=1e-5), "padding pooled as instruction went unnoticed"


# -- bad input -----------------------------------------------------------------------------------------

def test_prompts_plus_input_past_the_positions_is_refused():
    model = iapt_llama(num_virtual_tokens=10)
    with torch.no_grad():
        assert model(input_ids=tiny_inputs(length=54)).logits.shape[1] == 54
        with pytest.raises(ConfigError) as exc:
            model(input_ids=tiny_inputs(length=55))
    one_line(exc.value, "iapt: 10 virtual tokens + 55 input tokens = 65 positions")


def test_model_without_a_cache_and_chosen_layers_are_refused():
    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)
    model = transformers.DistilBertForSequenceClassification(cfg)
    with pytest.raises(UnsupportedError) as exc:
        gk.inject(model, {"method": "iapt"})
    one_line(exc.value, "iapt", "takes no key/value cache")
    assert get_state(model) is None and all(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError) as exc:
        gk.inject(tiny_llama(), {"method": "iapt", "layers": [0]})
    one_line(exc.value, "every layer")


def test_cli_train_past_the_positions_exits_2(assets, tmp_path, capsys):  # noqa: F811
    recipe = chat_recipe(assets, tmp_path / "run", method={"method": "iapt", "num_virtual_tokens": 60})
    code, _, err = run_cli(capsys, _recipe_file(tmp_path / "r.yaml", recipe))
    assert_one_line_error(code, err, "60 virtual tokens")
    assert not (tmp_path / "run" / "adapter").exists()


def test_cli_train_on_a_model_without_a_cache_exits_2(assets, tmp_path, capsys):  # noqa: F811
    tok = gk.load_tokenizer(assets / "bert")
    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)
    transformers.DistilBertModel(cfg).save_pretrained(tmp_path / "distil")
    tok.save_pretrained(tmp_path / "distil")
    recipe = cls_recipe(assets, tmp_path / "run", model=str(tmp_path / "distil"), method={"method": "iapt"})
    capsys.readouterr()  # the model's save progress bar
    code, _, err = run_cli(capsys, _recipe_file(tmp_path / "r.yaml", recipe))
    assert_one_line_error(code, err, "iapt", "takes no key/value cache")
    assert not (tmp_path / "run" / "adapter").exists()


# -- graft train -----------------------------------------------------------------------------------------

def test_train_chat_sft_then_generate(assets, tmp_path):  # noqa: F811
    from graftkit.train import parse_recipe, train

    out_dir = tmp_path / "run"
    recipe = chat_recipe(assets, out_dir, method={"method": "iapt", "num_virtual_tokens": 4, "bottleneck": 8},
                         optim={"lr": 3e-2, "batch_size": 8, "epochs": 3})
    train(parse_recipe(recipe), progress=False)
    ls = losses(out_dir)
    assert sum(ls[-3:]) / 3 < sum(ls[:3]) / 3, ls
    model = gk.load_adapter(gk.load_model(assets / "llama"), out_dir / "adapter")
    tok = gk.load_tokenizer(assets / "llama")
    enc = tok(["hello there", "a"], return_tensors="pt", padding=True, padding_side="left", return_token_type_ids=False)
    with torch.no_grad():
        c = model.generate(**enc, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=tok.pad_token_id)
        with instruction(model, enc["input_ids"].shape[1]):
            u = model.generate(**enc, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(c, u)


def test_train_classification(assets, tmp_path):  # noqa: F811
    from graftkit.train import parse_recipe, train

    out_dir = tmp_path / "run"
    recipe = cls_recipe(assets, out_dir, method={"method": "iapt", "num_virtual_tokens": 4, "bottleneck": 8},
                        optim={"lr": 0.05}, eval={"every": None, "at_start": True})
    summary = train(parse_recipe(recipe), progress=False)
    assert summary["val_loss"] < summary["start_val_loss"] - 0.01, summary
    saved = gk.read_adapter(out_dir / "adapter")
    assert saved.method == "iapt" and "bert.up_w" in saved.tensors


def test_graft_eval_generation_equals_a_recompute_per_prompt(assets):  # noqa: F811
    """graft eval's generation (left-padded batches, the KV cache) equals each prompt generated
    alone by a full recompute with its instruction pinned to the prompt."""
    from graftkit.eval.config import Decoding
    from graftkit.eval.generate import generate

    tok = gk.load_tokenizer(assets / "llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(assets / "llama").eval()
    prompts_ = [tok("repeat good")["input_ids"], tok("repeat bad bad bad")["input_ids"]]
    torch.manual_seed(0)
    gk.inject(model, {"method": "iapt", "num_virtual_tokens": 2, "bottleneck": 4})
    ours = generate(model, tok, prompts_, max_new_tokens=4, decoding=Decoding(), pad=tok.pad_token_id)
    recomputed = []
    for ids in prompts_:
        with torch.no_grad(), instruction(model, len(ids)):
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=4, do_sample=False, use_cache=False,
                                 pad_token_id=tok.pad_token_id)
        recomputed.append([tok.decode(out[0, len(ids):], skip_special_tokens=True)])
    assert ours == recomputed


def test_soup_of_same_config_generators_averages(tmp_path):
    paths = [gk.save_adapter(iapt_llama(), tmp_path / "a0")]
    torch.manual_seed(9)
    paths.append(gk.save_adapter(gk.inject(tiny_llama(), {"method": "iapt", "num_virtual_tokens": N, "bottleneck": 8}),
                                 tmp_path / "a1"))
    soup = gk.read_adapter(gk.merge({"merge_method": "linear", "models": [{"model": str(p)} for p in paths]}, tmp_path / "soup"))
    a, b = (gk.read_adapter(p).tensors["model.up_w"] for p in paths)
    torch.testing.assert_close(soup.tensors["model.up_w"], (a + b) / 2, atol=1e-7, rtol=0)


@pytest.mark.real
def test_minilm_classification(tmp_path):
    import json

    from graftkit.data import bbc_news
    from graftkit.train import parse_recipe, train

    per: dict[str, list] = {}
    for text, label in bbc_news():
        if len(per.setdefault(label, [])) < 2:
            per[label].append({"text": text, "label": label})
    data = tmp_path / "bbc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for rows in per.values() for r in rows))
    out_dir = tmp_path / "run"
    r = {"model": "minilm", "task": "classification", "data": {"train": str(data), "validation": str(data), "max_length": 48},
         "method": {"method": "iapt", "num_virtual_tokens": 4, "bottleneck": 16},
         "optim": {"lr": 1e-2, "batch_size": 5, "max_steps": 8, "warmup_steps": 0},
         "eval": {"every": None, "at_start": True}, "output": {"dir": str(out_dir)}}
    s = train(parse_recipe(r), progress=False)
    assert s["val_loss"] < s["start_val_loss"] - 0.05, s
    assert s["val_accuracy"] > 0.2, s  # 5 topics, 2 articles each: the majority class is 20%


def test_deepcopy_is_independent_and_unload_restores_the_base():
    import copy

    base = tiny_llama()
    ids = tiny_inputs(length=6)
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    model = gk.inject(base, {"method": "iapt", "num_virtual_tokens": N})
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        twin = copy.deepcopy(model)
        gk.sites(twin)["model"].up_b.add_(1.0)  # the copy's generators and hooks are its own
        assert not torch.allclose(twin(input_ids=ids).logits, ours)
        torch.testing.assert_close(model(input_ids=ids).logits, ours, atol=0, rtol=0)
        gk.unload(model, merge=False)
        torch.testing.assert_close(model(input_ids=ids).logits, plain, atol=0, rtol=0)
    assert all(not layer._forward_pre_hooks for layer in model.model.layers)


@pytest.mark.parametrize("config", [{"method": "iapt", "num_virtual_tokens": N, "bottleneck": 8},
                                    {"method": "compose", "methods": [{"method": "iapt", "num_virtual_tokens": N, "bottleneck": 8},
                                                                      {"method": "lora", "r": 2, "targets": ["q_proj"]}]}],
                         ids=["iapt", "compose"])
def test_training_loss_reads_the_prompt_as_the_instruction(config):
    """The loop's loss module hands each chat batch to the method (TuningMethod.batch_hook), so the
    generators pool the prompt only: the loss equals the one computed with the prompt pinned."""
    from graftkit.methods import method_named
    from graftkit.train.loop import WithLoss

    torch.manual_seed(5)  # the generators' start, whatever ran before
    model = gk.inject(tiny_llama(), config)
    with torch.no_grad():
        for p in gk.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.5)
    ids = tiny_inputs(seed=5, batch=2, length=8)
    labels = ids.clone()
    labels[:, :3] = -100  # a 3-token prompt, then the response
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    module = WithLoss(model, "causal-lm", False).eval()
    module.batch_hook = method_named(config["method"]).batch_hook({k: v for k, v in config.items() if k != "method"})
    assert module.batch_hook is not None
    with torch.no_grad():
        got = module(batch)[0]
        with instruction(model, 3):
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        want = torch.nn.functional.cross_entropy(logits[:, 2:-1].reshape(-1, logits.shape[-1]), ids[:, 3:].reshape(-1))
        module.batch_hook = None
        unhooked = module(dict(batch, input_ids=ids.clone()))[0]  # a fresh tensor: no instruction noted for it
    assert torch.allclose(got, want, atol=1e-6), (got, want)
    # the whole row as instruction moves this tiny model's loss by 1e-4 to 3e-3: far above float noise (< 1e-6)
    assert (unhooked - want).abs() > 2e-5, "the whole row as instruction gave the same loss: the check proves nothing"
