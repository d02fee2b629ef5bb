"""Prefix tuning and P-tuning v2 (methods/prefix.py, prefix_tuning.py, p_tuning_v2.py).

The contract rows (tests/test_contract.py) and the KV-cache rows (tests/test_kv_cache.py:
greedy, left-padded, Llama and GPT-2) cover the protocol; here:

* parity with real peft's PREFIX_TUNING both ways, with and without the MLP, on the tiny Llama
  and GPT-2 (peft 0.21 fails on BERT with transformers 5.25: it looks for ``past_key_values`` in
  ``BertModel.forward``'s signature, which now calls it ``cache``; BERT is checked against a
  cache built by hand instead);
* the prefix enters exactly once in cached generation, beam search equals its recompute;
* classification pools the right position (BERT [CLS], a decoder's last real token);
* folding the MLP, soups, the refusals (one line each) and ``graft train`` on tiny models;
* on the real models (``real``): SmolLM2 chat SFT then generation, MiniLM classification.
"""
from __future__ import annotations

import json

import pytest
import torch
import transformers

import graftkit as gk
from conftest import tiny_bert, tiny_gpt2, tiny_inputs, tiny_llama
from graftkit.adapter import get_state
from graftkit.errors import AdapterError, ConfigError, GraftError, UnsupportedError
from test_train import assets, chat_recipe, cls_recipe, losses, run_cli, _recipe_file, assert_one_line_error  # noqa: F401
from test_train_adapters import real_data  # noqa: F401  (module fixture: BBC News and gsm_symbolic rows)

N = 3
BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2}
ATOL = 1e-5


def padded_batch():
    """Two rows, the second left-padded by two (pad id 0), with their mask."""
    ids = tiny_inputs(seed=3, batch=2, length=6)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    return ids, mask


def out(model, ids, mask=None, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def one_line(exc: BaseException, *needles: str) -> str:
    msg = str(exc)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


# -- peft parity --------------------------------------------------------------------------------

def peft_model(arch: str, projection: bool):
    peft = pytest.importorskip("peft")
    torch.manual_seed(11)
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=projection,
                                  encoder_hidden_size=12 if projection else None)
    return peft.get_peft_model(BUILD[arch](), cfg).eval()


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "mlp"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_folder_loads_into_graftkit(arch, projection, tmp_path):
    ref = peft_model(arch, projection)
    ref.save_pretrained(tmp_path / "peft")
    model = gk.load_adapter(BUILD[arch](), tmp_path / "peft")
    assert get_state(model).method == "prefix_tuning"
    ids, mask = padded_batch()
    base = out(BUILD[arch](), ids, mask)
    want = out(ref, ids, mask)
    assert (want - base).abs().max() > 1e-2, "the prefix must move the logits"
    torch.testing.assert_close(out(model, ids, mask), want, atol=ATOL, rtol=0)
    # without a mask, and with explicit position ids (both sides shift them by the prefix length)
    torch.testing.assert_close(out(model, ids), out(ref, ids), atol=ATOL, rtol=0)
    pos = torch.arange(ids.shape[1])[None].expand(2, -1)
    torch.testing.assert_close(out(model, ids, mask, position_ids=pos), out(ref, ids, mask, position_ids=pos), atol=ATOL, rtol=0)


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "mlp"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_graftkit_prefix_exports_to_peft(arch, projection, tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(5)
    cfg = {"method": "prefix_tuning", "num_virtual_tokens": N, "prefix_projection": projection}
    model = gk.inject(BUILD[arch](), cfg)
    gk.save_adapter(model, tmp_path / "p", format="peft")
    saved = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PREFIX_TUNING" and saved["prefix_projection"] is projection
    ref = peft.PeftModel.from_pretrained(BUILD[arch](), tmp_path / "p").eval()
    ids, mask = padded_batch()
    torch.testing.assert_close(out(ref, ids, mask), out(model, ids, mask), atol=ATOL, rtol=0)
    # and back: the same adapter read from the peft folder
    again = gk.load_adapter(BUILD[arch](), tmp_path / "p")
    torch.testing.assert_close(out(again, ids, mask), out(model, ids, mask), atol=ATOL, rtol=0)


def test_p_tuning_v2_exports_as_peft_prefix_tuning(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(2)
    model = gk.inject(tiny_llama(), {"method": "p_tuning_v2", "num_virtual_tokens": 5}).eval()
    gk.save_adapter(model, tmp_path / "p", format="peft")
    ref = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "p").eval()
    ids, mask = padded_batch()
    torch.testing.assert_close(out(ref, ids, mask), out(model, ids, mask), atol=ATOL, rtol=0)


def tiny_llama_cls():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64, num_labels=3, pad_token_id=0)
    return transformers.LlamaForSequenceClassification(cfg).eval()


def test_peft_seq_cls_prefix_folder_with_its_head(tmp_path):
    """peft 0.21 writes SEQ_CLS prefix folders (the head under ``base_model.``) but cannot run them
    with transformers 5.25 (its forward looks for ``past_key_values``); the tensors are checked."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(3)
    ref = peft.get_peft_model(tiny_llama_cls(), peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N))
    with torch.no_grad():
        ref.base_model.score.modules_to_save["default"].weight.add_(0.5)
    ref.save_pretrained(tmp_path / "peft")
    model = gk.load_adapter(tiny_llama_cls(), tmp_path / "peft")
    assert get_state(model).train_also == ["score.weight"]
    torch.testing.assert_close(model.score.weight, ref.base_model.score.modules_to_save["default"].weight, atol=0, rtol=0)
    torch.testing.assert_close(gk.sites(model)["model"].prefix, ref.prompt_encoder["default"].embedding.weight, atol=0, rtol=0)
    # graftkit writes the same layout back, and reads it again to the same logits
    gk.save_adapter(model, tmp_path / "back", format="peft")
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "back" / "adapter_model.safetensors")) == {"prompt_embeddings", "base_model.score.weight"}
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text())["modules_to_save"] == ["score"]
    ids, mask = padded_batch()
    again = gk.load_adapter(tiny_llama_cls(), tmp_path / "back")
    torch.testing.assert_close(out(again, ids, mask), out(model, ids, mask), atol=0, rtol=0)


def bert_by_hand(model, prefix: torch.Tensor, ids, mask, types):
    """BERT classification logits with the prefix put into a DynamicCache by hand (no graftkit)."""
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    D = model.config.hidden_size // H
    kv = prefix.view(N, L, 2, H, D)
    cache = transformers.DynamicCache(
        [(kv[:, l, 0].permute(1, 0, 2)[None].expand(ids.shape[0], -1, -1, -1).contiguous(),
          kv[:, l, 1].permute(1, 0, 2)[None].expand(ids.shape[0], -1, -1, -1).contiguous()) for l in range(L)],
        config=model.config)
    full = torch.cat([torch.ones(ids.shape[0], N, dtype=mask.dtype), mask], dim=1)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=full, token_type_ids=types, cache=cache).logits


def test_bert_prefix_matches_a_hand_built_cache_and_pools_cls():
    model = gk.inject(tiny_bert(), {"method": "prefix_tuning", "num_virtual_tokens": N})
    ids = tiny_inputs(seed=4, batch=2, length=6)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # right padding, as a BERT tokenizer pads
    types = torch.zeros_like(ids)
    types[:, 3:] = 1  # a sentence pair: token types belong to the real tokens and are not extended
    prefix = gk.sites(model)["bert"].prefix.detach()
    got = out(model, ids, mask)
    with gk.disabled(model):
        want = bert_by_hand(model, prefix, ids, mask, None)
        plain = out(model, ids, mask)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (got - plain).abs().max() > 1e-3
    got_pair = out(model, ids, mask, token_type_ids=types)
    with gk.disabled(model):
        torch.testing.assert_close(got_pair, bert_by_hand(model, prefix, ids, mask, types), atol=1e-6, rtol=0)
    assert (got_pair - got).abs().max() > 1e-4
    # the encoder output holds the real tokens only: the pooler reads [CLS], the first real one
    with torch.no_grad():
        enc = model.bert(input_ids=ids, attention_mask=mask)
    assert enc.last_hidden_state.shape[1] == ids.shape[1]
    torch.testing.assert_close(enc.pooler_output, model.bert.pooler(enc.last_hidden_state), atol=0, rtol=0)
    # a padded row scores as the same row alone
    torch.testing.assert_close(got[1:], out(model, ids[1:, :4], mask[1:, :4]), atol=1e-5, rtol=0)


def test_llama_classification_pools_the_last_real_token():
    model = gk.inject(tiny_llama_cls(), {"method": "p_tuning_v2", "num_virtual_tokens": N})
    ids = tiny_inputs(seed=6, batch=2, length=6)
    mask = torch.ones_like(ids)
    ids[1, 4:], mask[1, 4:] = 0, 0  # right padding: the head reads position 3 of row 1
    got = out(model, ids, mask)
    torch.testing.assert_close(got[1:], out(model, ids[1:, :4], mask[1:, :4]), atol=1e-5, rtol=0)
    torch.testing.assert_close(got[:1], out(model, ids[:1], mask[:1]), atol=1e-5, rtol=0)
    with gk.disabled(model):
        assert (out(model, ids, mask) - got).abs().max() > 1e-3


# -- generation -----------------------------------------------------------------------------------

def test_prefix_enters_the_cache_once_and_beam_search_matches_recompute(monkeypatch):
    from graftkit.methods.prefix import PrefixSite

    model = gk.inject(tiny_llama(), {"method": "prefix_tuning", "num_virtual_tokens": N})
    fills = []
    real = PrefixSite._fill
    monkeypatch.setattr(PrefixSite, "_fill", lambda self, *a: fills.append(1) or real(self, *a))
    ids, mask = padded_batch()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(**kw, use_cache=True, return_dict_in_generate=True)
    assert len(fills) == 1, "the prefix must enter the cache once, at the first step"
    assert cached.past_key_values.get_seq_length() == N + ids.shape[1] + 6 - 1
    fills.clear()
    with torch.no_grad():
        full = model.generate(**kw, use_cache=False)
    assert len(fills) == 6  # a full recompute puts it in front of every step
    assert torch.equal(cached.sequences, full)
    with torch.no_grad():
        beams_c = model.generate(**kw, num_beams=3, use_cache=True)
        beams_u = model.generate(**kw, num_beams=3, use_cache=False)
        with gk.disabled(model):
            plain = model.generate(**kw, num_beams=3, use_cache=True)
    assert torch.equal(beams_c, beams_u)
    assert not torch.equal(beams_c, plain), "the prefix had no effect on beam search"


def test_graft_eval_generation_wrapper(assets):  # noqa: F811
    """graft eval's generation (eval/generate.py: left-padded batches, the KV cache) gives the
    texts of one-prompt full recomputes, and the prefix changes them."""
    from graftkit.eval.config import Decoding
    from graftkit.eval.generate import generate

    tok = gk.load_tokenizer(assets / "llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(assets / "llama").eval()
    prompts = [tok("repeat good")["input_ids"], tok("repeat bad bad bad")["input_ids"]]
    base = generate(model, tok, prompts, max_new_tokens=5, decoding=Decoding(), pad=tok.pad_token_id)
    torch.manual_seed(0)
    gk.inject(model, {"method": "prefix_tuning", "num_virtual_tokens": N})
    with torch.no_grad():
        gk.sites(model)["model"].prefix.mul_(5.0)  # a strong prefix, so the greedy texts move
    ours = generate(model, tok, prompts, max_new_tokens=5, decoding=Decoding(), pad=tok.pad_token_id)
    recomputed = []
    for ids in prompts:
        with torch.no_grad():
            o = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=5, do_sample=False, use_cache=False,
                               pad_token_id=tok.pad_token_id)
        recomputed.append([tok.decode(o[0, len(ids):], skip_special_tokens=True)])
    assert ours == recomputed and ours != base


def test_static_cache_is_refused():
    model = gk.inject(tiny_llama(), {"method": "prefix_tuning", "num_virtual_tokens": N})
    ids, mask = padded_batch()
    with pytest.raises(UnsupportedError) as exc, torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0,
                       cache_implementation="static")
    one_line(exc.value, "StaticCache cannot carry the prefix", "cache_implementation")


def test_manual_incremental_decoding_extends_the_mask_only():
    model = gk.inject(tiny_gpt2(), {"method": "prefix_tuning", "num_virtual_tokens": N})
    ids, mask = padded_batch()
    with torch.no_grad():
        first = model(input_ids=ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        step = model(input_ids=ids[:, 4:], attention_mask=mask, cache=first.past_key_values, use_cache=True).logits
    torch.testing.assert_close(step, out(model, ids, mask)[:, 4:], atol=1e-5, rtol=0)


# -- folding, saving, soups -------------------------------------------------------------------------

def test_projection_is_trained_and_folded_on_save(tmp_path):
    model = gk.inject(tiny_llama(), {"method": "prefix_tuning", "num_virtual_tokens": N, "prefix_projection": True,
                                     "encoder_hidden_size": 10})
    site = gk.sites(model)["model"]
    trained = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"embedding", "mlp_w1", "mlp_b1", "mlp_w2", "mlp_b2"}
    model.train()
    model(input_ids=tiny_inputs()).logits.pow(2).mean().backward()
    assert all(t.grad is not None for t in site.trained_tensors().values())
    model.eval()
    ids, mask = padded_batch()
    want = out(model, ids, mask)
    saved = gk.read_adapter(gk.save_adapter(model, tmp_path / "a"))
    assert set(saved.tensors) == {"model.prefix"} and saved.tensors["model.prefix"].shape == (N, 2 * 2 * 2 * 8)
    fresh = gk.load_adapter(tiny_llama(), tmp_path / "a")
    torch.testing.assert_close(out(fresh, ids, mask), want, atol=1e-6, rtol=0)
    assert {n.rsplit(".", 1)[-1] for n, p in fresh.named_parameters() if p.requires_grad} == {"prefix"}
    site.fold()
    torch.testing.assert_close(out(model, ids, mask), want, atol=1e-6, rtol=0)


def test_p_tuning_v2_options():
    from graftkit.methods.p_tuning_v2 import PTuningV2Config

    assert PTuningV2Config().prefix_projection is False and PTuningV2Config().prefix_dropout == 0.1
    assert PTuningV2Config(preset="hard").num_virtual_tokens == 100
    assert PTuningV2Config(preset="simple").num_virtual_tokens == 20
    assert PTuningV2Config(preset="hard", num_virtual_tokens=7).num_virtual_tokens == 7
    with pytest.raises(ConfigError, match="every layer"):
        PTuningV2Config(layers=[0])
    with pytest.raises(ConfigError, match="prefix_projection"):
        PTuningV2Config(encoder_hidden_size=8)


def test_weight_merge_refused_and_soup_averages(tmp_path):
    paths = []
    for seed in range(2):
        torch.manual_seed(seed)
        paths.append(gk.save_adapter(gk.inject(tiny_llama(), {"method": "prefix_tuning", "num_virtual_tokens": N}), tmp_path / f"a{seed}"))
    model = gk.load_adapter(tiny_llama(), paths[0])
    with pytest.raises(AdapterError) as exc:
        gk.merge_adapter(model)
    one_line(exc.value, "prefix_tuning adapter has none")
    soup = gk.merge({"merge_method": "linear", "models": [{"model": str(p)} for p in paths]}, tmp_path / "soup")
    got = gk.read_adapter(soup)
    a, b = (gk.read_adapter(p).tensors["model.prefix"] for p in paths)
    torch.testing.assert_close(got.tensors["model.prefix"], (a + b) / 2, atol=1e-7, rtol=0)
    ids, mask = padded_batch()
    assert out(gk.load_adapter(tiny_llama(), soup), ids, mask).isfinite().all()
    # a merge that trims or elects signs of weight deltas is refused for them
    with pytest.raises(GraftError) as exc:
        gk.merge({"merge_method": "ties", "base_model": str(paths[0]), "parameters": {"density": 0.5},
                  "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths]}, tmp_path / "ties")
    one_line(exc.value, "ties cannot merge prefix_tuning adapters", "adapter soup")
    assert not (tmp_path / "ties").exists()


# -- bad input ------------------------------------------------------------------------------------

def tiny_distilbert():
    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)
    return transformers.DistilBertForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("method", ["prefix_tuning", "p_tuning_v2"])
def test_model_without_a_cache_is_refused(method):
    model = tiny_distilbert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedError) as exc:
        gk.inject(model, {"method": method})
    one_line(exc.value, "DistilBertForSequenceClassification", "takes no key/value cache")
    assert get_state(model) is None and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefix_plus_input_past_the_positions_is_refused(arch):
    model = gk.inject(BUILD[arch](), {"method": "prefix_tuning", "num_virtual_tokens": 10})
    ok = tiny_inputs(length=54)  # 10 + 54 = 64 positions: the table's size
    assert out(model, ok).shape[1] == 54
    with pytest.raises(ConfigError) as exc:
        out(model, tiny_inputs(length=55))
    one_line(exc.value, "10 virtual tokens + 55 input tokens = 65 positions", "has 64")


def test_prefix_past_a_sliding_window_is_refused():
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=64, sliding_window=8)
    model = gk.inject(transformers.MistralForCausalLM(cfg).eval(), {"method": "prefix_tuning", "num_virtual_tokens": N})
    assert out(model, tiny_inputs(length=5)).isfinite().all()  # 3 + 5 = 8: the whole window
    with pytest.raises(UnsupportedError) as exc:
        out(model, tiny_inputs(length=6))
    one_line(exc.value, "9 positions with the prefix exceed MistralForCausalLM's sliding window of 8")


def test_peft_folder_of_another_geometry_is_refused(tmp_path):
    ref = peft_model("llama", False)
    ref.save_pretrained(tmp_path / "peft")
    for cfg, what in ((dict(num_hidden_layers=3), "3 layers"), (dict(num_key_value_heads=4), "4 key/value heads"),
                      (dict(num_attention_heads=2, num_key_value_heads=2), "x 16")):
        torch.manual_seed(0)
        kw = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
        other = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**kw, **cfg}))
        with pytest.raises(AdapterError) as exc:
            gk.load_adapter(other, tmp_path / "peft")
        one_line(exc.value, "2 layers of 2 key/value heads x 8", what, "another base model")
        assert get_state(other) is None


def test_cli_import_peft_onto_another_geometry_exits_2(tmp_path, capsys):
    from graftkit.cli import main as graft_main

    peft_model("llama", False).save_pretrained(tmp_path / "peft")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64)).save_pretrained(tmp_path / "three")
    capsys.readouterr()
    transformers.utils.logging.disable_progress_bar()  # the base's loading bar is not the error
    try:
        code = graft_main(["import-peft", str(tmp_path / "peft"), str(tmp_path / "out"), "--base", str(tmp_path / "three")])
    finally:
        transformers.utils.logging.enable_progress_bar()
    assert_one_line_error(code, capsys.readouterr().err, "2 layers of 2 key/value heads x 8", "3 layers")
    assert not (tmp_path / "out").exists()
    # without a base the folder converts; it binds to the model's base module when loaded
    assert graft_main(["import-peft", str(tmp_path / "peft"), str(tmp_path / "native")]) == 0
    ids, mask = padded_batch()
    torch.testing.assert_close(out(gk.load_adapter(tiny_llama(), tmp_path / "native"), ids, mask),
                               out(peft_model("llama", False), ids, mask), atol=ATOL, rtol=0)


def test_cli_train_on_a_model_without_a_cache_exits_2(assets, tmp_path, capsys):  # noqa: F811
    tok = gk.load_tokenizer(assets / "bert")
    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)
    transformers.DistilBertModel(cfg).save_pretrained(tmp_path / "distil")
    tok.save_pretrained(tmp_path / "distil")
    recipe = cls_recipe(assets, tmp_path / "run", model=str(tmp_path / "distil"), method={"method": "p_tuning_v2"})
    capsys.readouterr()
    code, _, err = run_cli(capsys, _recipe_file(tmp_path / "r.yaml", recipe))
    assert_one_line_error(code, err, "DistilBertForSequenceClassification", "takes no key/value cache")
    assert not (tmp_path / "run" / "adapter").exists()


def test_corrupt_peft_prefix_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = peft_model("gpt2", False)
    ref.save_pretrained(tmp_path / "peft")
    f = tmp_path / "peft" / "adapter_model.safetensors"
    t = load_file(f)
    save_file({"prompt_embeddings": t["prompt_embeddings"][:, :-1].contiguous()}, f)
    with pytest.raises(GraftError) as exc:
        gk.load_adapter(tiny_gpt2(), tmp_path / "peft")
    one_line(exc.value, "prompt_embeddings has shape (3, 127)")


def test_packed_batches_and_checkpointing_are_refused():
    model = gk.inject(tiny_llama(), {"method": "prefix_tuning", "num_virtual_tokens": N})
    ids = tiny_inputs(batch=1, length=6)
    with pytest.raises(UnsupportedError) as exc:
        out(model, ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]))
    one_line(exc.value, "packed")
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(UnsupportedError) as exc:
        model(input_ids=ids)
    one_line(exc.value, "gradient checkpointing")


# -- graft train ----------------------------------------------------------------------------------

def test_train_chat_sft_prefix_tuning_then_generate(assets, tmp_path):  # noqa: F811
    from graftkit.train import parse_recipe, train

    out_dir = tmp_path / "run"
    recipe = chat_recipe(assets, out_dir, method={"method": "prefix_tuning", "num_virtual_tokens": 4, "prefix_projection": True},
                         optim={"lr": 3e-2, "batch_size": 8, "epochs": 3})
    train(parse_recipe(recipe), progress=False)
    ls = losses(out_dir)
    assert sum(ls[-3:]) / 3 < sum(ls[:3]) / 3
    saved = gk.read_adapter(out_dir / "adapter")
    assert saved.method == "prefix_tuning" and set(saved.tensors) == {"model.prefix"}  # folded
    model = gk.load_adapter(gk.load_model(assets / "llama"), out_dir / "adapter")
    tok = gk.load_tokenizer(assets / "llama")
    enc = tok(["hello there", "a"], return_tensors="pt", padding=True, padding_side="left", return_token_type_ids=False)
    with torch.no_grad():
        c = model.generate(**enc, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=tok.pad_token_id)
        u = model.generate(**enc, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(c, u)


def test_train_classification_p_tuning_v2(assets, tmp_path):  # noqa: F811
    from graftkit.train import parse_recipe, train

    out_dir = tmp_path / "run"
    # a random 2-layer BERT gives the prefix little to steer: a large step size, and the check is
    # that the validation loss falls and the held-out accuracy passes chance (MiniLM: the real test)
    recipe = cls_recipe(assets, out_dir, method={"method": "p_tuning_v2", "num_virtual_tokens": 4, "prefix_dropout": 0.0},
                        optim={"lr": 0.1}, eval={"every": None, "at_start": True})
    summary = train(parse_recipe(recipe), progress=False)
    assert summary["val_loss"] < summary["start_val_loss"] - 0.01, summary
    assert summary["val_accuracy"] > 0.5, summary
    saved = gk.read_adapter(out_dir / "adapter")
    assert saved.method == "p_tuning_v2" and "bert.prefix" in saved.tensors and any("classifier" in k for k in saved.tensors)


def test_train_refuses_prefix_past_the_positions(assets, tmp_path, capsys):  # noqa: F811
    recipe = chat_recipe(assets, tmp_path / "run", method={"method": "prefix_tuning", "num_virtual_tokens": 60})
    code, _, err = run_cli(capsys, _recipe_file(tmp_path / "r.yaml", recipe))
    assert_one_line_error(code, err, "60 virtual tokens")
    assert not (tmp_path / "run" / "adapter").exists()


# -- real models ----------------------------------------------------------------------------------

@pytest.mark.real
def test_smollm2_chat_sft_prefix_tuning_then_generation(real_data, tmp_path):  # noqa: F811
    from graftkit.train import parse_recipe, train

    out_dir = tmp_path / "run"
    r = {"model": "smollm2", "task": "causal-lm",
         "data": {"train": str(real_data / "gsm.jsonl"), "validation": str(real_data / "gsm.jsonl"), "prompt_field": "prompt",
                  "response_field": "response", "max_length": 64},
         "method": {"method": "prefix_tuning", "num_virtual_tokens": 8, "init_weights": "zero"},
         "optim": {"lr": 1e-2, "batch_size": 2, "max_steps": 2, "warmup_steps": 0},
         "eval": {"every": None}, "output": {"dir": str(out_dir)}}
    s = train(parse_recipe(r), progress=False)
    assert s["val_loss"] < s["first_loss"] - 0.01, s
    model = gk.load_adapter(gk.load_model("smollm2"), out_dir / "adapter")
    tok = gk.load_tokenizer("smollm2")
    enc = tok(["What is 2 + 3?", "Name a colour."], return_tensors="pt", padding=True, padding_side="left")
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    with torch.no_grad():
        c = model.generate(**enc, **kw, use_cache=True)
        u = model.generate(**enc, **kw, use_cache=False)
    assert torch.equal(c, u) and c.shape[1] == enc["input_ids"].shape[1] + 4


@pytest.mark.real
@pytest.mark.parametrize("method", ["p_tuning_v2", "prefix_tuning"])
def test_minilm_classification_with_a_prefix(method, real_data, tmp_path):  # noqa: F811
    from graftkit.train import parse_recipe, train

    out_dir = tmp_path / "run"
    r = {"model": "minilm", "task": "classification",
         "data": {"train": str(real_data / "bbc.jsonl"), "validation": str(real_data / "bbc.jsonl"), "max_length": 48},
         "method": {"method": method, "num_virtual_tokens": 16}, "optim": {"lr": 1e-2, "batch_size": 5, "max_steps": 8, "warmup_steps": 0},
         "eval": {"every": None, "at_start": True}, "output": {"dir": str(out_dir)}}
    s = train(parse_recipe(r), progress=False)
    assert s["val_loss"] < s["start_val_loss"] - 0.05, s
    assert s["val_accuracy"] > 0.2  # 5 topics, 2 articles each: the majority class is 20%
