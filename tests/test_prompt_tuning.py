"""Soft prompts (prompt tuning, P-tuning): the forward against a hand-written one, masks,
positions, token types and pooling, generation with the KV cache (greedy and beam search,
left-padded batches), real peft parity both ways on tiny Llama, GPT-2 and BERT, soups, bad
input, and ``graft train``. The contract rows are in test_contract.py, KV-cache rows in
test_kv_cache.py, T5 rows in test_t5_family.py."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

import graftkit as gk
from conftest import logits, tiny_bert, tiny_gpt2, tiny_inputs, tiny_llama
from graftkit.errors import AdapterError, ConfigError, UnsupportedError
from test_train import assert_one_line_error, assets, chat_recipe, cls_recipe, losses, run_cli, _recipe_file  # noqa: F401

P = 4
IDS = tiny_inputs()
BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
METHODS = {"prompt_tuning": {"method": "prompt_tuning", "num_virtual_tokens": P},
           "p_tuning": {"method": "p_tuning", "num_virtual_tokens": P, "encoder_hidden_size": 16},
           "p_tuning-lstm": {"method": "p_tuning", "num_virtual_tokens": P, "encoder_reparameterization_type": "LSTM"}}


def adapted(arch: str, method: str = "prompt_tuning", seed: int = 0, **extra):
    model = BUILD[arch]()
    torch.manual_seed(seed)
    return gk.inject(model, {**METHODS[method], **extra})


def site(model):
    (only,) = gk.sites(model).values()
    return only


def by_hand(model, ids, **kw):
    """The adapted model's output computed without hooks: the base model with the prompt in
    front of the embedded input, the virtual positions dropped from the logits."""
    prompt = site(model).prompts().detach()
    with torch.no_grad(), gk.disabled(model):
        embeds = model.get_input_embeddings()(ids)
        full = torch.cat([prompt.expand(ids.shape[0], -1, -1), embeds], dim=1)
        return model(inputs_embeds=full, **kw).logits[:, P:]


# -- the forward ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_forward_equals_the_prompt_in_front(arch, method):
    model = adapted(arch, method)
    out = logits(model, IDS)
    assert out.shape == (2, IDS.shape[1], 96), "the logits must line up with the real tokens"
    torch.testing.assert_close(out, by_hand(model, IDS), atol=1e-6, rtol=0)
    assert (out - logits(BUILD[arch](), IDS)).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_right_padding_and_given_positions(arch):
    """A padded row gives the logits it gets alone (the mask covers the prompt); given position
    ids 0..L-1 equal none (the real tokens sit after the prompt either way)."""
    model = adapted(arch)
    short = IDS[:1, :5]
    padded = torch.cat([short, torch.zeros(1, 2, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 2])
    with torch.no_grad():
        alone = model(input_ids=short).logits
        got = model(input_ids=padded, attention_mask=mask).logits
        positioned = model(input_ids=IDS, position_ids=torch.arange(IDS.shape[1])[None].expand(2, -1)).logits
    if arch == "bert":  # pooled: one row of class logits
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(got[:, :5], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(positioned, logits(model, IDS), atol=1e-6, rtol=0)


def test_causal_lm_loss_is_on_the_real_tokens():
    model = adapted("llama")
    labels = IDS.clone()
    labels[:, :2] = -100
    out = model(input_ids=IDS, labels=labels)
    want = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 96), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, want)
    hidden = model(input_ids=IDS, output_hidden_states=True).hidden_states
    assert all(h.shape[1] == IDS.shape[1] for h in hidden)


@pytest.mark.parametrize("pool", ["real", "virtual"])
def test_bert_pools_the_first_real_token(pool):
    """pool: real -> BERT's pooler reads [CLS] (the first real token); pool: virtual -> the first
    soft token, as peft computes it. Either way from the encoder states of the whole sequence."""
    model = adapted("bert", pool=pool)
    types = torch.zeros_like(IDS)
    types[:, 4:] = 1
    prompt = site(model).prompts().detach().expand(2, -1, -1)
    with torch.no_grad():
        got = model(input_ids=IDS, token_type_ids=types).logits
        with gk.disabled(model):
            embeds = model.bert.embeddings(inputs_embeds=torch.cat([prompt, model.bert.embeddings.word_embeddings(IDS)], 1),
                                           token_type_ids=torch.cat([torch.zeros(2, P, dtype=torch.long), types], 1))
            states = model.bert.encoder(embeds).last_hidden_state
            first = states[:, P if pool == "real" else 0]
            want = model.classifier(model.bert.pooler.activation(model.bert.pooler.dense(first)))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    with torch.no_grad():
        other = model(input_ids=IDS).logits  # token types matter: they were extended, not dropped
    assert (other - got).abs().max() > 1e-5


def test_decoder_classifier_pools_the_last_real_token():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64, num_labels=3, pad_token_id=0)
    model = transformers.LlamaForSequenceClassification(cfg).eval()
    torch.manual_seed(1)
    gk.inject(model, {**METHODS["prompt_tuning"], "train_also": ["score"]})
    short = IDS[:1, :5]
    padded = torch.cat([short, torch.zeros(1, 2, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = model(input_ids=short).logits
        got = model(input_ids=padded, attention_mask=(padded != 0).long()).logits
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)


def test_deepcopy_and_bf16_base():
    import copy

    model = adapted("gpt2", "p_tuning")
    out = logits(model, IDS)
    clone = copy.deepcopy(model)
    assert torch.equal(logits(clone, IDS), out)
    with torch.no_grad():
        site(clone).prompt_encoder.embedding.weight.mul_(-2.0)
    assert not torch.equal(logits(clone, IDS), out) and torch.equal(logits(model, IDS), out)
    gk.unload(clone, merge=False)
    assert torch.equal(logits(model, IDS), out) and gk.get_state(model) is not None
    half = tiny_llama().to(torch.bfloat16)  # a bf16 base, a float32 prompt (cast to the embeddings' dtype)
    torch.manual_seed(0)
    gk.inject(half, METHODS["prompt_tuning"])
    assert site(half).prompt_embeddings.dtype == torch.float32
    assert logits(half, IDS).dtype == torch.bfloat16


# -- generation -------------------------------------------------------------------------------------

def _generate(model, cache: bool, beams: int = 1):
    ids = tiny_inputs(seed=3, batch=2, length=5)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # left-padded
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             num_beams=beams, use_cache=cache, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:], out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("beams", [1, 3])
def test_generation_with_the_cache_equals_a_full_recompute(arch, beams):
    model = adapted(arch, "p_tuning")
    cached, out = _generate(model, True, beams)
    full, again = _generate(model, False, beams)
    assert torch.equal(cached, full)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(again.scores), atol=1e-4, rtol=0)
    base, _ = _generate(BUILD[arch](), True, beams)
    assert not torch.equal(cached, base), "the prompt had no effect on generation"


def test_prompt_enters_the_cache_once():
    model = adapted("llama")
    calls = []
    model.model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["inputs_embeds"] is not None), with_kwargs=True)
    ids = tiny_inputs(seed=3, batch=1, length=5)
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    # hooks run in registration order: the prompt's pre-hook replaced input_ids by embeddings first
    assert calls == [True, False, False]
    assert out.past_key_values.get_seq_length() == P + 5 + 2


def test_graftkit_generation_wrapper(assets):
    """graft eval's generation (eval/generate.py: left-padded batches, the KV cache) gives the
    texts of a full recompute, and the prompt changes them."""
    from graftkit.eval.config import Decoding
    from graftkit.eval.generate import generate

    tok = gk.load_tokenizer(assets / "llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(assets / "llama").eval()
    prompts = [tok("repeat good")["input_ids"], tok("repeat bad bad bad")["input_ids"]]
    base = generate(model, tok, prompts, max_new_tokens=5, decoding=Decoding(), pad=tok.pad_token_id)
    torch.manual_seed(0)
    gk.inject(model, {"method": "prompt_tuning", "num_virtual_tokens": P, "init": "vocab"})
    with torch.no_grad():
        site(model).prompt_embeddings.mul_(20.0)  # a strong prompt, so the greedy texts move
    ours = generate(model, tok, prompts, max_new_tokens=5, decoding=Decoding(), pad=tok.pad_token_id)
    recomputed = []
    for ids in prompts:
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=5, do_sample=False, use_cache=False,
                                 pad_token_id=tok.pad_token_id)
        recomputed.append([tok.decode(out[0, len(ids):], skip_special_tokens=True)])
    assert ours == recomputed and ours != base


# -- peft interop (real peft) ------------------------------------------------------------------------

peft = pytest.importorskip("peft")
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}
PEFT_CASES = {
    "PROMPT_TUNING": lambda: peft.PromptTuningConfig(num_virtual_tokens=P),
    "P_TUNING-MLP": lambda: peft.PromptEncoderConfig(num_virtual_tokens=P, encoder_hidden_size=16),
    "P_TUNING-LSTM": lambda: peft.PromptEncoderConfig(num_virtual_tokens=P, encoder_hidden_size=8,
                                                      encoder_reparameterization_type="LSTM"),
}


def peft_logits(model, arch: str, ids=IDS):
    # peft returns logits for the virtual positions too (it prepends outside the model); graftkit
    # drops them, so the comparison is on the real positions. BERT's are pooled: one row each.
    with torch.no_grad():
        out = model(input_ids=ids).logits
    return out if arch == "bert" else out[:, P:]


def make_peft(arch: str, case: str, seed: int = 3):
    cfg = PEFT_CASES[case]()
    cfg.task_type = TASK[arch]
    model = peft.get_peft_model(BUILD[arch](), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


@pytest.mark.parametrize("case", list(PEFT_CASES))
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_peft_folder_loads_and_exports_back(arch, case, tmp_path):
    pm = make_peft(arch, case)
    ref = peft_logits(pm, arch)
    assert (ref - peft_logits(BUILD[arch](), arch) if arch == "bert" else ref - logits(BUILD[arch](), IDS)).abs().max() > 1e-3
    pm.save_pretrained(tmp_path / "peft")
    model = gk.load_adapter(BUILD[arch](), tmp_path / "peft")
    state = gk.get_state(model)
    assert state.method == ("prompt_tuning" if case == "PROMPT_TUNING" else "p_tuning")
    assert state.targets == [{"llama": "model", "gpt2": "transformer", "bert": "bert"}[arch]]
    if arch == "bert":
        assert state.config.pool == "virtual" and state.train_also == ["classifier.bias", "classifier.weight"]
    torch.testing.assert_close(logits(model, IDS), ref, atol=1e-5, rtol=0)
    # graftkit's peft export of it, read by peft
    gk.save_adapter(model, tmp_path / "again", format="peft")
    back = peft.PeftModel.from_pretrained(BUILD[arch](), tmp_path / "again").eval()
    torch.testing.assert_close(peft_logits(back, arch), ref, atol=1e-5, rtol=0)
    # and natively: the same prompt again
    gk.save_adapter(model, tmp_path / "native")
    assert torch.equal(logits(gk.load_adapter(BUILD[arch](), tmp_path / "native"), IDS), logits(model, IDS))


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_native_prompt_exported_to_peft(arch, method, tmp_path):
    """A prompt trained in graftkit (its P-tuning encoder included) read by peft: peft gets the
    encoder's output and computes the same logits."""
    extra = {"pool": "virtual", "train_also": ["classifier"]} if arch == "bert" else {}
    model = adapted(arch, method, **extra)
    model.train()  # a P-tuning LSTM's dropout must be off in the export; eval() is what peft runs
    gk.save_adapter(model, tmp_path / "peft", format="peft")
    ref = logits(model.eval(), IDS)
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == ("PROMPT_TUNING" if method == "prompt_tuning" else "P_TUNING") and cfg["num_virtual_tokens"] == P
    theirs = peft.PeftModel.from_pretrained(BUILD[arch](), tmp_path / "peft").eval()
    torch.testing.assert_close(peft_logits(theirs, arch), ref, atol=1e-5, rtol=0)


def test_native_p_tuning_keeps_its_encoder_and_keeps_training(tmp_path):
    model = adapted("llama", "p_tuning")
    keys = set(gk.read_adapter(gk.save_adapter(model, tmp_path / "a")).tensors)
    assert "model.prompt_encoder.embedding.weight" in keys and "model.prompt_encoder.mlp_head.4.weight" in keys
    fresh = gk.load_adapter(tiny_llama(), tmp_path / "a")
    fresh.train()
    fresh(input_ids=IDS).logits.pow(2).mean().backward()
    assert site(fresh).prompt_encoder.mlp_head[0].weight.grad is not None


def test_bert_real_pooling_is_not_exported_to_peft(tmp_path):
    model = adapted("bert")
    with pytest.raises(UnsupportedError, match="peft pools the first virtual token") as exc:
        gk.save_adapter(model, tmp_path / "p", format="peft")
    assert "\n" not in str(exc.value) and not (tmp_path / "p").exists()


def test_peft_folder_of_another_task_or_width_is_refused(tmp_path):
    pm = make_peft("bert", "PROMPT_TUNING")
    pm.save_pretrained(tmp_path / "cls")
    model = tiny_llama()
    with pytest.raises(AdapterError, match="a peft SEQ_CLS soft prompt cannot run on LlamaForCausalLM") as exc:
        gk.load_adapter(model, tmp_path / "cls")
    assert "\n" not in str(exc.value) and gk.get_state(model) is None
    wide = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=64,
                                                                  num_hidden_layers=2, num_attention_heads=4,
                                                                  num_key_value_heads=2, max_position_embeddings=64))
    make_peft("llama", "PROMPT_TUNING").save_pretrained(tmp_path / "lm")
    with pytest.raises(AdapterError, match="its prompt is 32 wide but LlamaForCausalLM's token embeddings are 64"):
        gk.load_adapter(wide, tmp_path / "lm")
    assert gk.get_state(wide) is None


def test_peft_folder_whose_prompt_disagrees_with_its_config(tmp_path):
    from graftkit.errors import FileFormatError

    make_peft("llama", "PROMPT_TUNING").save_pretrained(tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({**cfg, "num_virtual_tokens": 5}))
    with pytest.raises(FileFormatError, match=r"prompt_embeddings has shape \(4, 32\) but num_virtual_tokens is 5") as exc:
        gk.load_adapter(tiny_llama(), tmp_path / "p")
    assert "\n" not in str(exc.value)


def test_graft_import_peft_cli(tmp_path, capsys):
    from graftkit.cli import main

    make_peft("gpt2", "P_TUNING-MLP").save_pretrained(tmp_path / "peft")
    code = main(["import-peft", str(tmp_path / "peft"), str(tmp_path / "native")])
    assert code == 0, capsys.readouterr().err
    saved = gk.read_adapter(tmp_path / "native")
    assert saved.method == "p_tuning" and saved.meta["config"]["folded"] is True


def test_graft_export_and_import_peft_cli_with_a_base(tmp_path, capsys):
    """graft export --peft of a native P-tuning adapter (peft reads the encoder's output), and
    graft import-peft --base of peft's folder (bound to the base module and fingerprinted)."""
    from graftkit.cli import main

    tiny_gpt2().save_pretrained(tmp_path / "base")
    model = adapted("gpt2", "p_tuning")
    ref = logits(model, IDS)
    gk.save_adapter(model, tmp_path / "native")
    assert main(["export", str(tmp_path / "native"), "--base", str(tmp_path / "base"), "--peft", str(tmp_path / "peft")]) == 0
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "peft").eval()
    torch.testing.assert_close(peft_logits(theirs, "gpt2"), ref, atol=1e-5, rtol=0)
    assert main(["import-peft", str(tmp_path / "peft"), str(tmp_path / "back"), "--base", str(tmp_path / "base")]) == 0
    back = gk.read_adapter(tmp_path / "back")
    assert back.targets == ["transformer"] and back.meta["base_model"]["fingerprint"]
    torch.testing.assert_close(logits(gk.load_adapter(tiny_gpt2(), tmp_path / "back"), IDS), ref, atol=1e-5, rtol=0)
    capsys.readouterr()


# -- merging ---------------------------------------------------------------------------------------

def test_weight_merges_refused_and_prompt_soup_averages(tmp_path):
    paths = []
    for i in range(2):
        model = adapted("llama", seed=i)
        paths.append(gk.save_adapter(model, tmp_path / f"a{i}"))
    with pytest.raises(AdapterError, match="changes the model's sequences") as exc:
        gk.merge_adapter(model)
    assert "\n" not in str(exc.value)
    out = gk.merge({"merge_method": "linear", "models": [{"model": str(p)} for p in paths]}, tmp_path / "soup")
    soup = gk.read_adapter(out)
    a, b = (gk.read_adapter(p).tensors["model.prompt_embeddings"] for p in paths)
    torch.testing.assert_close(soup.tensors["model.prompt_embeddings"], (a + b) / 2)
    mixed = gk.load_adapter(tiny_llama(), out)
    assert site(mixed).prompts().shape == (P, 32)
    with pytest.raises(Exception, match="one config only"):  # another prompt length is another config
        other = gk.save_adapter(adapted("llama", num_virtual_tokens=3), tmp_path / "short")
        gk.merge({"merge_method": "linear", "models": [{"model": str(paths[0])}, {"model": str(other)}]}, tmp_path / "bad")


# -- initialisation and bad input --------------------------------------------------------------------

def test_vocab_init_samples_token_embeddings():
    model = adapted("gpt2", init="vocab")
    prompt = site(model).prompts().detach()
    table = model.transformer.wte.weight.detach()
    assert all(bool((table == row).all(dim=1).any()) for row in prompt)


def test_text_init_cut_or_repeated_like_peft(assets):
    tok = gk.load_tokenizer(assets / "llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(assets / "llama")
    gk.inject(model, {"method": "prompt_tuning", "num_virtual_tokens": 5, "init": "TEXT", "prompt_tuning_init_text": "good bad"})
    ids = tok("good bad")["input_ids"]
    want = (ids * 5)[:5]
    table = model.get_input_embeddings().weight.detach()
    torch.testing.assert_close(site(model).prompts().detach(), table[want])
    gk.unload(model, merge=False)
    long = " ".join(["good"] * 20)  # more tokens than virtual ones: cut, as peft does (not refused)
    gk.inject(model, {"method": "prompt_tuning", "num_virtual_tokens": 3, "init": "text", "init_text": long,
                      "tokenizer": str(assets / "llama")})
    torch.testing.assert_close(site(model).prompts().detach(), table[tok(long)["input_ids"][:3]])


@pytest.mark.parametrize("config, needles", [
    ({"method": "prompt_tuning", "num_virtual_tokens": 0}, ["num_virtual_tokens"]),
    ({"method": "prompt_tuning", "num_virtual_tokens": 2, "init": "text"}, ["init: text needs init_text"]),
    ({"method": "prompt_tuning", "num_virtual_tokens": 2, "init_text": "hi"}, ["only read with init: text"]),
    ({"method": "prompt_tuning", "num_virtual_tokens": 2, "targets": ["q_proj"]}, ["takes no targets"]),
    ({"method": "p_tuning", "num_virtual_tokens": 2, "encoder_num_layers": 3}, ["LSTM prompt encoder only"]),
    ({"method": "prompt_tuning", "num_virtual_tokens": 2, "init": "text", "init_text": "hi"}, ["needs a tokenizer"]),
])
def test_bad_configs_are_one_line(config, needles):
    model = tiny_llama()
    with pytest.raises(ConfigError) as exc:
        gk.inject(model, config)
    assert "\n" not in str(exc.value) and all(n in str(exc.value) for n in needles), str(exc.value)
    assert gk.get_state(model) is None and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_input_longer_than_the_positions_is_one_line(arch):
    model = adapted(arch)
    ok = torch.randint(1, 96, (1, 64 - P))
    logits(model, ok)  # exactly fills the 64 positions
    with pytest.raises(ConfigError, match=f"{P} virtual tokens \\+ an input of 61 positions = 65 exceed the model's 64") as exc:
        logits(model, torch.randint(1, 96, (1, 61)))
    assert "\n" not in str(exc.value)


def test_four_d_mask_is_refused():
    model = adapted("llama")
    with pytest.raises(UnsupportedError, match="4-D attention mask"):
        model(input_ids=IDS, attention_mask=torch.ones(2, 1, 7, 7))


def test_model_without_a_head_is_refused():
    from graftkit.errors import TargetError

    with pytest.raises(TargetError, match="no base module"):
        gk.inject(tiny_llama().model, METHODS["prompt_tuning"])


# -- graft train --------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_graft_train_classification(assets, tmp_path, capsys, method):
    r = cls_recipe(assets, tmp_path / "run", method={"method": method, "num_virtual_tokens": 4},
                   optim={"lr": 3e-2, "epochs": 2}, eval={"every": None}, output={"export": ["peft"]} if method == "p_tuning" else {})
    if method == "p_tuning":
        r["method"]["pool"] = "virtual"
    code, _, err = run_cli(capsys, _recipe_file(tmp_path / "r.yaml", r))
    assert code == 0, err
    ls = losses(tmp_path / "run")
    assert sum(ls[-3:]) / 3 < sum(ls[:3]) / 3
    saved = gk.read_adapter(tmp_path / "run" / "adapter")
    assert saved.method == method and "classifier.weight" in saved.train_also
    if method == "p_tuning":
        assert (tmp_path / "run" / "adapter-peft" / "adapter_config.json").exists()


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_graft_train_chat_sft_then_generate(assets, tmp_path, method):
    from graftkit.train import parse_recipe, train

    r = chat_recipe(assets, tmp_path / "run", method={"method": method, "num_virtual_tokens": 4},
                    optim={"lr": 0.1, "max_steps": 6, "warmup_steps": 0}, eval={"every": None, "at_start": True})
    s = train(parse_recipe(r), progress=False)
    assert s["val_loss"] < s["start_val_loss"] - 0.01
    model = transformers.AutoModelForCausalLM.from_pretrained(assets / "llama")
    gk.load_adapter(model, tmp_path / "run" / "adapter")
    tok = gk.load_tokenizer(assets / "llama")
    ids = tok(["repeat good", "repeat bad bad"], return_tensors="pt", padding=True, padding_side="left", return_token_type_ids=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (2, ids["input_ids"].shape[1] + 4)


def test_graft_train_bf16_with_gradient_checkpointing(assets, tmp_path):
    """The prompt is float32 and the base bf16; gradient checkpointing re-runs the blocks, not the
    prompt's hooks on the base module: the run trains and saves a float32 prompt."""
    from graftkit.train import parse_recipe, train

    r = chat_recipe(assets, tmp_path / "run", method={"method": "prompt_tuning", "num_virtual_tokens": 4},
                    optim={"max_steps": 3, "precision": "bf16", "gradient_checkpointing": True}, eval={"every": None})
    assert train(parse_recipe(r), progress=False)["steps"] == 3
    saved = gk.read_adapter(tmp_path / "run" / "adapter").tensors["model.prompt_embeddings"]
    assert saved.dtype == torch.float32 and bool(torch.isfinite(saved).all())


def test_graft_train_refuses_packed_examples(assets, tmp_path, capsys):
    """Packed examples restart their positions inside a row; only the first would follow the
    prompt, so data.pack_examples is refused (the loop's packing check finds it)."""
    r = chat_recipe(assets, tmp_path / "run", method={"method": "prompt_tuning", "num_virtual_tokens": 4},
                    data={"pack_examples": True}, optim={"max_steps": 1})
    code, _, err = run_cli(capsys, _recipe_file(tmp_path / "r.yaml", r))
    assert_one_line_error(code, err, "data.pack_examples", "prompt_tuning", "pack_examples=false")


def test_graft_train_refuses_max_length_past_the_positions(assets, tmp_path, capsys):
    r = cls_recipe(assets, tmp_path / "run", method={"method": "prompt_tuning", "num_virtual_tokens": 8}, data={"max_length": 60})
    code, _, err = run_cli(capsys, _recipe_file(tmp_path / "r.yaml", r))
    assert_one_line_error(code, err, "data.max_length 60 + 8 virtual tokens", "exceed the model's 64 positions", "56 or less")
    assert not (tmp_path / "run" / "adapter").exists()


# -- real models ----------------------------------------------------------------------------------------

@pytest.mark.real
@pytest.mark.parametrize("method", [{"method": "prompt_tuning", "num_virtual_tokens": 8, "init": "vocab"},
                                    {"method": "p_tuning", "num_virtual_tokens": 8, "encoder_hidden_size": 64}],
                         ids=lambda m: m["method"])
def test_minilm_soft_prompt_classification(method, tmp_path):
    """MiniLM on a packaged task (BBC News, 5 topics, 2 per topic): a soft prompt (with the new
    head trained whole) lowers the loss and beats the majority class on the training texts."""
    from graftkit.data import bbc_news
    from graftkit.train import parse_recipe, train

    per: dict[str, list] = {}
    for text, label in bbc_news():
        if len(per.setdefault(label, [])) < 2:
            per[label].append({"text": text, "label": label})
    rows = [r for group in per.values() for r in group]
    (tmp_path / "bbc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = {"model": "minilm", "task": "classification",
         "data": {"train": str(tmp_path / "bbc.jsonl"), "validation": str(tmp_path / "bbc.jsonl"), "max_length": 48},
         "method": method, "optim": {"lr": 3e-2, "batch_size": 10, "max_steps": 6, "warmup_steps": 0},
         "eval": {"every": None, "at_start": True}, "output": {"dir": str(tmp_path / "run")}}
    s = train(parse_recipe(r), progress=False)
    assert s["val_loss"] < s["start_val_loss"] - 0.05
    assert s["val_accuracy"] > 2 / len(rows)  # the majority class is 2 of 10


@pytest.mark.real
def test_smollm2_prompt_tuning_chat_sft_then_generation(tmp_path):
    import reasoning_gym

    from graftkit.train import parse_recipe, train

    chats = [{"prompt": x["question"].split(". ")[0] + ".", "response": x["metadata"]["answer_cot"]}
             for x in reasoning_gym.create_dataset("gsm_symbolic", size=2, seed=1)]
    (tmp_path / "gsm.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    r = {"model": "smollm2", "task": "causal-lm",
         "data": {"train": str(tmp_path / "gsm.jsonl"), "validation": str(tmp_path / "gsm.jsonl"), "prompt_field": "prompt",
                  "response_field": "response", "max_length": 48},
         "method": {"method": "prompt_tuning", "num_virtual_tokens": 8, "init": "text", "init_text": "Solve the problem step by step."},
         "optim": {"lr": 3e-2, "batch_size": 2, "max_steps": 2, "warmup_steps": 0},
         "eval": {"every": None}, "output": {"dir": str(tmp_path / "run")}}
    s = train(parse_recipe(r), progress=False)
    assert s["val_loss"] < s["first_loss"]
    model = gk.load_model("smollm2")
    gk.load_adapter(model, tmp_path / "run" / "adapter")
    tok = gk.load_tokenizer("smollm2")
    text = tok.apply_chat_template([{"role": "user", "content": chats[0]["prompt"]}], tokenize=False, add_generation_prompt=True)
    ids = tok([text], return_tensors="pt")
    with torch.no_grad():
        cached = model.generate(**ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        full = model.generate(**ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, full) and cached.shape[1] == ids["input_ids"].shape[1] + 4


def test_p_tuning_encoder_gradients_equal_pefts():
    """Training parity, not only logits: with peft's encoder weights copied in, the loss and the
    gradient of every prompt-encoder tensor equal peft's (BERT classification, peft's pooling)."""
    import copy

    import peft

    torch.manual_seed(0)
    base = tiny_bert().eval()
    ids = tiny_inputs(seed=4, batch=4, length=7)
    labels = torch.tensor([0, 1, 2, 1])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=4,
                                                                                encoder_hidden_size=16)).eval()
    ours = copy.deepcopy(base)
    gk.inject(ours, {"method": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 16, "pool": "virtual"})
    encoder = next(m for m in ours.modules() if hasattr(m, "prompt_encoder")).prompt_encoder
    peft_encoder = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            p.copy_(peft_encoder[f"prompt_encoder.default.{name}"])
    losses = []
    for model in (theirs, ours):
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, labels)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    for name, p in encoder.named_parameters():
        want = peft_encoder[f"prompt_encoder.default.{name}"].grad
        assert want.abs().max() > 0 and torch.allclose(p.grad, want, atol=1e-7, rtol=1e-5), name
