"""Every tuning method on an encoder-decoder: a tiny T5ForConditionalGeneration built from T5Config.

T5 differs from the decoder-only and encoder-only models of the contract matrix in ways an
adapter can trip over: two stacks of blocks (``encoder.block.N`` and ``decoder.block.N``, each
block a ``layer`` list of sublayers), a cross-attention sublayer in each decoder block, RMS layer
norms without biases, no bias terms at all, and one embedding tensor shared by
``shared``, ``encoder.embed_tokens``, ``decoder.embed_tokens`` and ``lm_head``.
"""
from __future__ import annotations

import pytest
import torch

import graftkit as gk
from graftkit.adapter import get_state, method_for
from graftkit.errors import AdapterError, TargetError
from graftkit.io.native import adapter_from_model
from graftkit.methods.activation import ModuleSite, article
from graftkit.methods.blocks import transformer_blocks
from graftkit.registry import METHODS

from conftest import tiny_t5

IDS = torch.randint(2, 96, (2, 7), generator=torch.Generator().manual_seed(1))
LABELS = torch.randint(2, 96, (2, 5), generator=torch.Generator().manual_seed(2))
DECODER_IDS = torch.cat([torch.zeros(2, 1, dtype=torch.long), LABELS[:, :-1]], dim=1)  # shifted right

#: row -> (config, config changes for a non-identity start or None: perturb the trained tensors)
ROWS: dict[str, tuple[dict, dict | None]] = {
    # peft's T5 defaults: LoRA on q, v; IA3 on k, v, wo with wo as the feed-forward layer
    "lora": ({"method": "lora", "r": 4, "lora_alpha": 8, "targets": ["q", "v", "wo"]}, {"init_lora_weights": False}),
    "lora+dora": ({"method": "lora", "r": 2, "use_dora": True, "targets": ["q", "v"]}, {"init_lora_weights": False}),
    "ia3": ({"method": "ia3", "targets": ["k", "v", "wo"], "feedforward": ["wo"]}, {"init_ia3_weights": False}),
    "full": ({"method": "full", "layers": "top:1"}, None),
    "ln_tuning": ({"method": "ln_tuning"}, None),
    "greentrainer": ({"method": "greentrainer", "flops_budget": 0.5, "layers": "top:1"}, None),  # in place, like full
    # issue 15: VeRA's shared pair across q, v and wo (three shapes), DEFT's LoRA, the sparse methods in place
    "vera": ({"method": "vera", "r": 4, "targets": ["q", "v", "wo"]}, {"init_weights": False}),
    # issue 16: MeteoRA's gate over frozen experts on q, v and the FFN output
    # (random frozen experts from the start: with zero experts the gate has nothing to choose between and cannot train)
    "meteora": ({"method": "meteora", "num_experts": 2, "r": 2, "top_k": 1, "targets": ["q", "v", "wo"], "init_weights": False}, {}),
    "deft": ({"method": "deft", "r": 2, "targets": ["q", "v"]}, {"init_lora_weights": False}),
    "lt_sft": ({"method": "lt_sft", "fraction": 0.05, "layers": "top:1"}, None),
    "apet": ({"method": "apet", "num_trainable": 300, "targets": ["q", "v", "wo"]}, None),
    "diff_pruning": ({"method": "diff_pruning", "targets": ["q", "v", "wo"]}, {"init_weights": False}),
    "subspace": ({"method": "subspace", "d": 8, "targets": ["q", "v", "wo"]}, {"init_weights": False}),
    "houlsby": ({"method": "houlsby", "reduction_factor": 4, "train_layer_norm": True}, {"init_weights": False}),
    "pfeiffer": ({"method": "pfeiffer", "bottleneck_size": 4}, {"init_weights": False}),
    "parallel_adapter": ({"method": "parallel_adapter", "reduction_factor": 4}, {"init_weights": False}),
    "compacter": ({"method": "compacter", "reduction_factor": 4, "phm_dim": 4}, {"init_weights": False}),
    "compacter_pp": ({"method": "compacter_pp", "reduction_factor": 8, "phm_dim": 2}, {"init_weights": False}),
    "compose": ({"method": "compose", "methods": [{"method": "parallel_adapter", "reduction_factor": 4},
                                                  {"method": "lora", "r": 2, "targets": ["q", "v"]}]},
                {"methods": [{"method": "parallel_adapter", "reduction_factor": 4, "init_weights": False},
                             {"method": "lora", "r": 2, "targets": ["q", "v"], "init_lora_weights": False}]}),
    # soft tokens in front of the encoder's input (the decoder cross-attends to them too)
    "prompt_tuning": ({"method": "prompt_tuning", "num_virtual_tokens": 4}, {}),
    "p_tuning": ({"method": "p_tuning", "num_virtual_tokens": 3, "encoder_hidden_size": 16}, {}),
    # P6 (issue 15): a Tucker delta and a low-rank + sparse delta on q, v and the FFN output
    "flora": ({"method": "flora", "r": 2, "targets": ["q", "v", "wo"]}, {"init_weights": False}),
    "dsee": ({"method": "dsee", "r": 2, "num_sparse": 8, "targets": ["q", "v", "wo"]}, {"init_weights": False}),
    # P3 (issue 15): rotations of q, v and the FFN output's inputs (BOFT with one factor: what peft builds on a CPU)
    "oft": ({"method": "oft", "oft_block_size": 8, "targets": ["q", "v", "wo"]}, {"init_weights": False}),
    "boft": ({"method": "boft", "boft_block_size": 4, "targets": ["q", "v", "wo"]}, {"init_weights": False}),
    # P4 (issue 15): AdaLoRA's SVD-form delta and Light-PEFT's LoRA (its pruning runs in graft train) on q, v, wo
    "adalora": ({"method": "adalora", "init_r": 3, "target_r": 2, "targets": ["q", "v", "wo"]}, {"init_lora_weights": False, "lora_alpha": 0.1}),
    "light_peft": ({"method": "light_peft", "r": 2, "targets": ["q", "v", "wo"]}, {"init_lora_weights": False}),
    # P1 (issue 15): Hadamard, Kronecker and spectral deltas on q, v and the FFN output
    "loha": ({"method": "loha", "r": 2, "targets": ["q", "v", "wo"]}, {"init_weights": False}),
    "lokr": ({"method": "lokr", "r": 2, "decompose_both": True, "targets": ["q", "v", "wo"]}, {"init_weights": False}),
    "fourierft": ({"method": "fourierft", "n_frequency": 32, "scaling": 10.0, "init_weights": True, "targets": ["q", "v", "wo"]},
                  {"init_weights": False}),
}
#: T5 has no bias terms: these methods have nothing to adapt and must say so
NOTHING_TO_ADAPT = {"bitfit": {"method": "bitfit"}}
#: key/value prefixes are built for one stack's cache: refused on an encoder-decoder model
NOT_ON_ENCODER_DECODER = {name: {"method": name, "num_virtual_tokens": 2} for name in ("prefix_tuning", "p_tuning_v2", "iapt")}


def config(row: str, random: bool = False) -> dict:
    cfg, changes = ROWS[row]
    return {**cfg, **(changes or {})} if random else dict(cfg)


def logits(model, ids=IDS, decoder_ids=DECODER_IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=decoder_ids).logits


def build(row: str, random: bool = False, seed: int = 0):
    model = tiny_t5(seed)
    torch.manual_seed(1234)
    gk.inject(model, config(row, random))
    if random:
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():  # tensors trained in place start where training would have taken them
            for name, p in model.named_parameters():
                if p.requires_grad and (ROWS[row][1] is None or ".graft_adapter." not in f".{name}"):
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


_BASE: dict[str, torch.Tensor] = {}


def base_logits() -> torch.Tensor:
    if "t5" not in _BASE:
        _BASE["t5"] = logits(tiny_t5())
    return _BASE["t5"]


def has_delta(row: str) -> bool:
    method, cfg = method_for(config(row))
    return method.weight_delta(cfg)


def test_every_registered_method_runs_on_t5():
    covered = {config(r)["method"] for r in ROWS} | set(NOTHING_TO_ADAPT) | set(NOT_ON_ENCODER_DECODER)
    assert not sorted(set(METHODS.names()) - covered), f"methods without a T5 row: {sorted(set(METHODS.names()) - covered)}"


@pytest.mark.parametrize("method", list(NOTHING_TO_ADAPT))
def test_method_with_nothing_to_adapt_on_t5_says_so(method):
    model = tiny_t5()
    with pytest.raises(TargetError) as exc:
        gk.inject(model, NOTHING_TO_ADAPT[method])
    # not a hint at the tied embedding (T5's '*' also matches its aliases)
    msg = str(exc.value)
    assert "no parameter" in msg and "tied" not in msg and "\n" not in msg, msg
    assert get_state(model) is None and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", list(NOT_ON_ENCODER_DECODER))
def test_prefix_methods_refuse_t5_in_one_line(method):
    model = tiny_t5()
    with pytest.raises(TargetError) as exc:
        gk.inject(model, NOT_ON_ENCODER_DECODER[method])
    msg = str(exc.value)
    assert "encoder-decoder" in msg and "prompt_tuning" in msg and "\n" not in msg, msg
    assert get_state(model) is None and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("row", list(ROWS))
def test_t5_inject_forward_save_load_disable_unload(row, tmp_path):
    base = base_logits()
    base_sd = {k: v.clone() for k, v in tiny_t5().state_dict().items()}
    method, _ = method_for(config(row))
    ident = build(row)
    if method.identity_for(config(row)) if hasattr(method, "identity_for") else method.identity_at_init:
        assert torch.allclose(logits(ident), base, atol=1e-6, rtol=0), "a fresh adapter must be the identity"

    model = build(row, random=True)
    out = logits(model)
    assert (out - base).abs().max() > 1e-3, "a non-identity adapter had no effect"
    assert {k for k in model.state_dict() if ".graft_adapter." not in f".{k}"} == set(base_sd), "base keys changed"
    with gk.disabled(model):
        assert torch.equal(logits(model), base)
    assert torch.equal(logits(model), out)

    path = gk.save_adapter(model, tmp_path / "a")
    fresh = tiny_t5()
    gk.load_adapter(fresh, path)
    assert torch.equal(logits(fresh), out), "a reloaded adapter must reproduce the logits bitwise"
    want, got = adapter_from_model(model).tensors, adapter_from_model(fresh).tensors
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)

    with pytest.raises(AdapterError, match="already"):
        gk.inject(model, config(row))

    if has_delta(row):
        gk.merge_adapter(fresh)
        assert torch.allclose(logits(fresh), out, atol=1e-5, rtol=0), "merged forward"
        gk.unload(fresh, merge=True)
        assert torch.allclose(logits(fresh), out, atol=1e-5, rtol=0), "unload(merge=True)"
    else:
        with pytest.raises(AdapterError, match=f"{article(method.name)} {method.name} adapter has none"):
            gk.merge_adapter(fresh)

    gk.unload(model, merge=False)
    after = model.state_dict()
    assert set(after) == set(base_sd) and all(torch.equal(after[k], v) for k, v in base_sd.items())
    assert torch.equal(logits(model), base)
    # the tied embedding is still one tensor after inject/unload
    assert model.lm_head.weight is model.shared.weight is model.encoder.embed_tokens.weight


@pytest.mark.parametrize("row", list(ROWS))
def test_t5_training_step(row):
    model = build(row)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    # dropout off (eval mode): the loss on the fixed batch is deterministic
    loss = model(input_ids=IDS, labels=LABELS).loss
    loss.backward()
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None, f"{n} is trainable but got no gradient"
        else:
            assert p.grad is None, f"{n} is frozen but got a gradient"
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = loss.item()
    for _ in range(5):
        opt.step()
        opt.zero_grad()
        loss = model(input_ids=IDS, labels=LABELS).loss
        loss.backward()
    assert loss.item() < first - 1e-3, f"5 steps did not lower the loss: {first:.4f} -> {loss.item():.4f}"
    # only the method's tensors moved
    fresh = tiny_t5().state_dict()
    state = get_state(model)
    inplace = {n for n, s in gk.sites(model).items() if s.inplace}
    for k, v in model.state_dict().items():
        if ".graft_adapter." not in f".{k}" and k not in inplace and k not in ("shared.weight", "lm_head.weight",
                                                                                  "encoder.embed_tokens.weight",
                                                                                  "decoder.embed_tokens.weight"):
            assert torch.equal(v, fresh[k]), f"{k} changed while frozen"
    if "shared.weight" not in inplace:  # the tied embedding is frozen unless trained in place
        assert torch.equal(model.shared.weight, fresh["shared.weight"])
    assert set(state.targets) == set(gk.sites(model))


def test_t5_block_roles():
    """Both stacks' blocks, each with its self-attention output and its feed-forward sublayer
    (encoder: layer.1, decoder: layer.2); the decoder's cross-attention (layer.1.EncDecAttention)
    is no default place of the bottleneck adapters, as in Houlsby et al."""
    model = tiny_t5()
    blocks = transformer_blocks(model)
    assert [b.name for b in blocks] == ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"]
    for b in blocks:
        ff = "layer.1" if b.name.startswith("encoder") else "layer.2"
        assert b.modules == {"attn_out": f"{b.name}.layer.0.SelfAttention.o",
                             "ffn_in": f"{b.name}.{ff}.DenseReluDense", "ffn_out": f"{b.name}.{ff}.DenseReluDense"}
    gk.inject(model, {"method": "houlsby"})
    hooked = sorted(n for n, s in gk.sites(model).items() if isinstance(s, ModuleSite))
    assert hooked == sorted(m for b in blocks for m in (b.modules["attn_out"], b.modules["ffn_out"]))
    assert not any("EncDecAttention" in n for n in hooked)
    # the cross-attention can still be adapted by naming it
    gk.unload(model, merge=False)
    gk.inject(model, {"method": "houlsby", "targets": ["EncDecAttention.o"]})
    assert sorted(gk.sites(model)) == ["decoder.block.0.layer.1.EncDecAttention.o", "decoder.block.1.layer.1.EncDecAttention.o"]


def test_t5_weight_targets():
    model = tiny_t5()
    gk.inject(model, {"method": "lora", "targets": ["q", "v"]})
    # self-attention in both stacks and the decoder's cross-attention, as peft's T5 default
    assert len(get_state(model).targets) == 2 * 2 + 2 * 4
    assert all(t.endswith((".q.weight", ".v.weight")) for t in get_state(model).targets)
    gk.unload(model, merge=False)
    gk.inject(model, {"method": "lora", "targets": ["wo"]})  # the FFN's output, not the attention's "o"
    assert get_state(model).targets == [f"{s}.block.{i}.layer.{1 if s == 'encoder' else 2}.DenseReluDense.wo.weight"
                                        for s in ("decoder", "encoder") for i in (0, 1)]
    gk.unload(model, merge=False)
    gk.inject(model, {"method": "ia3", "targets": ["k", "v", "wo"], "feedforward": ["wo"]})
    options = get_state(model).options
    assert {n for n, o in options.items() if o.get("feedforward")} == {n for n in options if n.endswith(".wo.weight")}


def test_t5_tied_embedding():
    # an unmerged LoRA on the shared embedding would change the lookup but not lm_head
    with pytest.raises(TargetError, match=r"shared\.weight is tied to"):
        gk.inject(tiny_t5(), {"method": "lora", "targets": ["shared"]})
    with pytest.raises(TargetError, match=r"encoder\.embed_tokens\.weight, which is tied to shared\.weight"):
        gk.inject(tiny_t5(), {"method": "lora", "targets": ["encoder.embed_tokens"]})
    # full fine-tuning trains the one shared tensor once, under its first name
    model = gk.inject(tiny_t5(), {"method": "full"})
    targets = get_state(model).targets
    assert "shared.weight" in targets and not {"lm_head.weight", "encoder.embed_tokens.weight"} & set(targets)


def test_t5_adapter_refuses_another_base(tmp_path):
    model = build("houlsby", random=True)
    path = gk.save_adapter(model, tmp_path / "a")
    other = tiny_t5(seed=1)
    with pytest.raises(AdapterError, match="different base model"):
        gk.load_adapter(other, path)
    assert get_state(other) is None


@pytest.mark.parametrize("row", ["houlsby", "parallel_adapter", "compose", "prompt_tuning"])
def test_t5_cached_generation_matches_uncached(row):
    # the decoder's self-attention and cross-attention caches: one new position per step
    model = build(row, random=True)

    def generate(cache):
        with torch.no_grad():
            out = model.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=6, min_new_tokens=6,
                                 do_sample=False, use_cache=cache, output_logits=True, return_dict_in_generate=True)
        return out.sequences, torch.stack(out.logits, dim=1)

    (tokens_c, logits_c), (tokens_u, logits_u) = generate(True), generate(False)
    assert torch.equal(tokens_c, tokens_u)
    assert torch.allclose(logits_c, logits_u, atol=1e-4, rtol=0)


@pytest.mark.parametrize("row", [r for r in ROWS if method_for(config(r))[0].peft is not None])
def test_t5_peft_export_matches_peft(row, tmp_path):
    """peft's own loader reads graftkit's peft export of a T5 adapter to the same logits (its key
    prefix and the encoder/decoder module names survive the round trip)."""
    import warnings

    import peft

    model = build(row, random=True)
    out = logits(model)
    path = gk.save_adapter(model, tmp_path / "p", format="peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about T5LayerNorm (LN tuning) being untested
        reference = peft.PeftModel.from_pretrained(tiny_t5(), str(path)).eval()
    with torch.no_grad():
        theirs = reference(input_ids=IDS, decoder_input_ids=DECODER_IDS).logits
    assert torch.allclose(theirs, out, atol=1e-5, rtol=0)
    back = tiny_t5()
    gk.load_adapter(back, path)
    assert torch.allclose(logits(back), out, atol=1e-6, rtol=0)
