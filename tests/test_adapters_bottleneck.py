"""Bottleneck adapters (houlsby, pfeiffer, parallel_adapter) and their connected / shared options:
values against hand-written forwards built from the blocks' own weights, the adapter protocol
on every tiny model family, and the one-line refusals."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODELS, logits, tiny_inputs, tiny_llama
from torch import nn

import graftkit as gk
from graftkit.adapter import count_parameters, get_state, sites
from graftkit.errors import AdapterError, ConfigError, GraftError
from graftkit.methods.bottleneck import BottleneckSite, Pathway

BOTTLENECK = ["houlsby", "pfeiffer", "parallel_adapter"]


def adapters(model) -> list[BottleneckSite]:
    return [s for s in sites(model).values() if isinstance(s, BottleneckSite)]


@torch.no_grad()
def randomize(model, seed: int = 3) -> None:
    """Non-zero values in every adapter tensor (a fresh adapter is the identity)."""
    g = torch.Generator().manual_seed(seed)
    for site in adapters(model):
        for t in site.slot_tensors().values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.3)


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


def adapter_fn(site: BottleneckSite, act=F.relu):
    """The adapter of ``site`` written out: W_up f(W_down x + b_down) + b_up."""
    wd, bd = site.adapter_down.detach(), site.adapter_down_bias.detach()
    wu, bu = site.adapter_up.detach(), site.adapter_up_bias.detach()
    return lambda x: F.linear(act(F.linear(x, wd, bd)), wu, bu)


# -- hand-written FFN sublayers (hook-free, from the block's own weights) ---------------------------
class RefLlamaMLP(nn.Module):
    """down(silu(gate x) * up x) + extra(x, y)."""

    def __init__(self, mlp, extra):
        super().__init__()
        self.w = [mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach()]
        self.extra = extra

    def forward(self, x):
        g, u, d = self.w
        y = F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)
        return self.extra(x, y)


class RefGPT2MLP(nn.Module):
    """Conv1D layout (x @ W + b) and GPT-2's tanh GELU; dropout is off in eval."""

    def __init__(self, mlp, extra):
        super().__init__()
        self.fc = (mlp.c_fc.weight.detach(), mlp.c_fc.bias.detach())
        self.proj = (mlp.c_proj.weight.detach(), mlp.c_proj.bias.detach())
        self.extra = extra

    def forward(self, x):
        h = x @ self.fc[0] + self.fc[1]
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h.pow(3))))
        return self.extra(x, h @ self.proj[0] + self.proj[1])


class RefBertOutput(nn.Module):
    """BertOutput(hidden, input_tensor) = LayerNorm(dense(hidden) + s A(input_tensor) + input_tensor):
    the parallel adapter reads the FFN's input (what enters ``intermediate``) and adds before
    the residual LayerNorm."""

    def __init__(self, out, extra):
        super().__init__()
        self.dense = (out.dense.weight.detach(), out.dense.bias.detach())
        self.ln = out.LayerNorm
        self.extra = extra

    def forward(self, hidden_states, input_tensor):
        y = self.extra(input_tensor, F.linear(hidden_states, *self.dense))
        return F.layer_norm(y + input_tensor, self.ln.normalized_shape, self.ln.weight, self.ln.bias, self.ln.eps)


def reference_model(base, family: str, extras: list):
    """A copy of the base model whose FFN sublayers are the hand-written ones above, with
    ``extras[l](x, y)`` turning layer l's FFN input x and output y into the adapted output."""
    ref = copy.deepcopy(base)
    if family == "llama":
        for layer, extra in zip(ref.model.layers, extras):
            layer.mlp = RefLlamaMLP(layer.mlp, extra)
    elif family == "gpt2":
        for block, extra in zip(ref.transformer.h, extras):
            block.mlp = RefGPT2MLP(block.mlp, extra)
    else:
        for layer, extra in zip(ref.bert.encoder.layer, extras):
            layer.output = RefBertOutput(layer.output, extra)
    return ref


# -- parallel adapter: exact values ----------------------------------------------------------------
@pytest.mark.parametrize("family", list(TINY_MODELS))
def test_parallel_adapter_matches_hand_written_ffn(family, ids):
    base = TINY_MODELS[family]()
    model = copy.deepcopy(base)
    gk.inject(model, {"method": "parallel_adapter", "init_weights": False, "scaling": 2.5})
    randomize(model)
    sites_ = adapters(model)
    assert len(sites_) == 2 and all(s.scaling == 2.5 for s in sites_)
    fns = [adapter_fn(s) for s in sites_]
    ref = reference_model(base, family, [lambda x, y, a=a: y + 2.5 * a(x) for a in fns])
    got, want = logits(model, ids), logits(ref, ids)
    assert not torch.allclose(got, logits(base, ids), atol=1e-3)  # the adapters matter
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # reading the sublayer's *output* instead of its input would be a different model
    wrong = reference_model(base, family, [lambda x, y, a=a: y + 2.5 * a(y) for a in fns]) if family != "bert" else None
    if wrong is not None:
        assert not torch.allclose(got, logits(wrong, ids), atol=1e-4)


def test_parallel_adapter_default_scaling_is_the_papers():
    model = tiny_llama()
    gk.inject(model, {"method": "parallel_adapter"})
    assert {s.scaling for s in adapters(model)} == {4.0}
    assert {s.input_module is s.owner for s in adapters(model)} == {True}  # Llama: mlp in = mlp out


def test_parallel_adapter_on_bert_reads_intermediate_and_adds_to_output_dense():
    model = TINY_MODELS["bert"]()
    gk.inject(model, {"method": "parallel_adapter"})
    layer = model.bert.encoder.layer[0]
    site = sites(model)["bert.encoder.layer.0.output.dense"]
    assert site.owner is layer.output.dense and site.input_module is layer.intermediate


# -- connected adapters ----------------------------------------------------------------------------
def connected_reference(base, model, parallel: bool, scaling: float = 4.0):
    """Layer 0: a0 = A0(u0); layer 1: a1 = A1(u1 + a0) (u: the mlp output, or input when parallel)."""
    fns = [adapter_fn(s) for s in adapters(model)]
    carried: dict[int, torch.Tensor] = {}

    def extra(x, y, layer):
        u = x if parallel else y
        a = fns[layer](u if layer == 0 else u + carried[layer - 1])
        carried[layer] = a
        return y + (scaling * a if parallel else a)

    return reference_model(base, "llama", [lambda x, y, i=i: extra(x, y, i) for i in range(2)])


@pytest.mark.parametrize("method", ["pfeiffer", "parallel_adapter"])
def test_connected_matches_hand_computation(method, ids):
    base = tiny_llama()
    model = copy.deepcopy(base)
    gk.inject(model, {"method": method, "connected": True, "init_weights": False})
    randomize(model)
    plain = copy.deepcopy(model)
    for s in adapters(plain):
        s.__dict__.pop("pathway")
    got = logits(model, ids)
    want = logits(connected_reference(base, model, parallel=method == "parallel_adapter"), ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, logits(plain, ids), atol=1e-4)  # the connection is there


def test_connected_is_identity_at_init_and_follows_forward_order(ids):
    model = tiny_llama()
    base = logits(model, ids)
    gk.inject(model, {"method": "houlsby", "connected": True})
    assert torch.equal(logits(model, ids), base)
    # one pathway through the stack in forward order: attention adapter, then FFN adapter, per block
    order = sorted(adapters(model), key=lambda s: s.__dict__["link"])
    path = order[0].__dict__["pathway"]
    assert all(s.__dict__["pathway"] is path for s in order)
    assert path.names == ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp",
                          "model.layers.1.self_attn.o_proj", "model.layers.1.mlp"]


def test_connected_each_forward_starts_fresh(ids):
    model = tiny_llama()
    gk.inject(model, {"method": "pfeiffer", "connected": True, "init_weights": False})
    randomize(model)
    twin = copy.deepcopy(model)
    short = tiny_inputs(seed=5, batch=1, length=3)
    logits(model, short)  # a pass of another shape must leave nothing behind
    torch.testing.assert_close(logits(model, ids), logits(twin, ids), atol=0, rtol=0)


def test_connected_gradients_under_gradient_checkpointing(monkeypatch):
    """A recomputed layer must read the predecessor value of the same pass (not the latest one)."""
    model = tiny_llama()
    gk.inject(model, {"method": "parallel_adapter", "connected": True, "init_weights": False})
    randomize(model)
    x = tiny_inputs(seed=2)
    calls = {"n": 0}
    run = Pathway.run

    def counted(self, site, u):
        calls["n"] += 1
        return run(self, site, u)

    monkeypatch.setattr(Pathway, "run", counted)

    def grads(m):
        m.train()
        calls["n"] = 0
        m(input_ids=x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}, calls["n"]

    ckpt = copy.deepcopy(model)
    if hasattr(ckpt, "activation_checkpointing_enable"):  # the newer name (transformers 5)
        ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    want, n_plain = grads(model)
    got, n_ckpt = grads(ckpt)
    assert n_plain == 2 and n_ckpt == 4  # the layers really were recomputed
    assert want.keys() == got.keys() and len(want) == 8
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)
    # the gradient of layer 0's adapter includes the path through layer 1's adapter
    assert want["model.layers.0.mlp.graft_adapter.module.adapter_up"].abs().sum() > 0


def test_connected_generation_with_kv_cache_matches_without():
    model = tiny_llama()
    gk.inject(model, {"method": "pfeiffer", "connected": True, "init_weights": False})
    randomize(model)
    prompt = tiny_inputs(seed=4, batch=1, length=4)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        a = model.generate(prompt, use_cache=True, **kw)
        b = model.generate(prompt, use_cache=False, **kw)
    assert torch.equal(a, b)


def test_connected_save_load_round_trip(tmp_path, ids):
    model = tiny_llama()
    gk.inject(model, {"method": "parallel_adapter", "connected": True, "init_weights": False})
    randomize(model)
    gk.save_adapter(model, tmp_path / "a")
    fresh = gk.load_adapter(tiny_llama(), tmp_path / "a")
    assert all("pathway" in s.__dict__ for s in adapters(fresh))
    assert torch.equal(logits(fresh, ids), logits(model, ids))


# -- shared adapters -------------------------------------------------------------------------------
def single_adapter_count(d: int, m: int) -> int:
    return m * d + m + d * m + d


@pytest.mark.parametrize("method", BOTTLENECK)
def test_shared_counts_one_adapter_per_position(method):
    model = tiny_llama()  # hidden 32, reduction 16: m = 2; two blocks
    gk.inject(model, {"method": method, "shared": "layers"})
    per_block = 2 if method == "houlsby" else 1  # houlsby: after attention and after the FFN
    assert count_parameters(model)[0] == per_block * single_adapter_count(32, 2)
    unshared = tiny_llama()
    gk.inject(unshared, {"method": method})
    assert count_parameters(unshared)[0] == 2 * count_parameters(model)[0]
    s0, s1 = sites(model)["model.layers.0.mlp"], sites(model)["model.layers.1.mlp"]
    assert s0.adapter_down is s1.adapter_down and s0.adapter_up_bias is s1.adapter_up_bias


def test_shared_save_load_exact_and_saved_once(tmp_path, ids):
    from safetensors.torch import load_file, save_file

    model = tiny_llama()
    gk.inject(model, {"method": "parallel_adapter", "shared": "layers", "init_weights": False})
    randomize(model)
    gk.save_adapter(model, tmp_path / "a")
    saved = load_file(str(tmp_path / "a" / "adapter.safetensors"))
    assert sorted(saved) == [f"model.layers.0.mlp.{s}" for s in sorted(BottleneckSite.slots)]
    fresh = gk.load_adapter(tiny_llama(), tmp_path / "a")
    assert torch.equal(logits(fresh, ids), logits(model, ids))
    s0, s1 = adapters(fresh)
    assert s0.adapter_up is s1.adapter_up  # still one tensor after the load
    # a file carrying a second copy (here: one that disagrees) is refused, the model left bare
    saved["model.layers.1.mlp.adapter_up"] = saved["model.layers.0.mlp.adapter_up"] + 1
    save_file(saved, str(tmp_path / "a" / "adapter.safetensors"))
    target = tiny_llama()
    with pytest.raises(AdapterError) as exc:
        gk.load_adapter(target, tmp_path / "a")
    assert "model.layers.1.mlp.adapter_up" in one_line(exc)
    assert get_state(target) is None and not sites(target)


def test_shared_gradient_is_the_sum_over_layers():
    x = tiny_inputs(seed=6)
    shared = tiny_llama()
    gk.inject(shared, {"method": "pfeiffer", "shared": "layers", "init_weights": False})
    randomize(shared)
    separate = tiny_llama()
    gk.inject(separate, {"method": "pfeiffer", "init_weights": False})
    with torch.no_grad():
        value = adapters(shared)[0].slot_tensors()
        for site in adapters(separate):
            for slot, t in site.slot_tensors().items():
                t.copy_(value[slot])
    for m in (shared, separate):
        m(input_ids=x, labels=x).loss.backward()
    one = adapters(shared)[0]
    for slot in BottleneckSite.slots:
        per_layer = [getattr(s, slot).grad for s in adapters(separate)]
        assert all(g.abs().sum() > 0 for g in per_layer)
        torch.testing.assert_close(getattr(one, slot).grad, per_layer[0] + per_layer[1], atol=1e-6, rtol=1e-5)


# -- the protocol on every family ------------------------------------------------------------------
@pytest.mark.parametrize("family", list(TINY_MODELS))
@pytest.mark.parametrize("method", BOTTLENECK)
def test_protocol(method, family, ids, tmp_path):
    make = TINY_MODELS[family]
    model = make()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base = logits(model, ids)
    gk.inject(model, {"method": method})
    assert torch.equal(logits(model, ids), base)  # identity at init
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".graft_adapter.module.adapter_" in n for n in trainable)
    assert {k for k in model.state_dict() if ".graft_adapter." not in k} == set(base_state)
    randomize(model)
    adapted = logits(model, ids)
    assert not torch.allclose(adapted, base, atol=1e-3)
    with gk.disabled(model):
        assert torch.equal(logits(model, ids), base)
    for op in (gk.materialize_delta, gk.merge_adapter):
        with pytest.raises(AdapterError) as exc:
            op(model)
        assert method in one_line(exc) and "weight delta" in str(exc.value)
    with pytest.raises(AdapterError) as exc:
        gk.inject(model, {"method": method})
    one_line(exc)
    gk.save_adapter(model, tmp_path / "a")
    fresh = gk.load_adapter(make(), tmp_path / "a")
    assert torch.equal(logits(fresh, ids), adapted)
    gk.unload(model, merge=False)
    assert torch.equal(logits(model, ids), base)
    after = model.state_dict()
    assert after.keys() == base_state.keys() and all(torch.equal(after[k], v) for k, v in base_state.items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# -- bad input -------------------------------------------------------------------------------------
def widened_llama():
    """A tiny Llama whose second block has an FFN of another width (48 instead of 64)."""
    model = tiny_llama()
    mlp = model.model.layers[1].mlp
    torch.manual_seed(9)
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = nn.Linear(32, 48, bias=False), nn.Linear(32, 48, bias=False), nn.Linear(48, 32, bias=False)
    return model


@pytest.mark.parametrize("method", BOTTLENECK)
@pytest.mark.parametrize("config, words", [
    ({"reduction_factor": 64}, "reduction_factor 64"),
    ({"bottleneck_size": 0}, "bottleneck_size"),
    ({"reduction_factor": 4, "bottleneck_size": 8}, "not both"),
])
def test_bad_sizes_refused_in_one_line(method, config, words):
    model = tiny_llama()
    with pytest.raises(ConfigError) as exc:
        gk.inject(model, {"method": method, **config})
    assert words in one_line(exc)
    assert get_state(model) is None and not sites(model)


@pytest.mark.parametrize("option, words", [({"connected": True}, "connected"), ({"shared": "layers"}, "shared")])
def test_options_refuse_layers_of_different_widths(option, words):
    model = widened_llama()
    x = tiny_inputs()
    before = logits(model, x)
    # the default place (mlp) has the hidden width everywhere: fine
    gk.inject(model, {"method": "pfeiffer", **option})
    gk.unload(model, merge=False)
    with pytest.raises(ConfigError) as exc:  # up_proj: 64 wide in block 0, 48 in block 1
        gk.inject(model, {"method": "pfeiffer", "targets": ["up_proj"], **option})
    msg = one_line(exc)
    assert words in msg and "model.layers.1.mlp.up_proj" in msg
    assert get_state(model) is None and torch.equal(logits(model, x), before)


def test_connected_refuses_a_module_that_changes_width():
    model = tiny_llama()
    with pytest.raises(ConfigError) as exc:  # parallel on up_proj: reads 32, writes 64
        gk.inject(model, {"method": "parallel_adapter", "targets": ["up_proj"], "connected": True})
    assert "width" in one_line(exc)


def test_bad_shared_value_is_a_graft_error():
    with pytest.raises(GraftError) as exc:
        gk.inject(tiny_llama(), {"method": "houlsby", "shared": "tasks"})
    one_line(exc)


def test_connected_model_can_be_copied_after_a_training_forward():
    model = tiny_llama()
    gk.inject(model, {"method": "pfeiffer", "connected": True, "init_weights": False})
    x = tiny_inputs()
    model(input_ids=x, labels=x).loss.backward()  # the pathway now holds non-leaf activations
    twin = copy.deepcopy(model)
    assert torch.equal(logits(twin, x), logits(model, x))


def test_t5_one_pathway_per_stack_and_shared_per_position():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    gk.inject(model, {"method": "houlsby", "connected": True, "shared": "layers", "init_weights": False})
    randomize(model)
    paths = {id(s.__dict__["pathway"]): s.__dict__["pathway"].names for s in adapters(model)}
    assert sorted(paths.values()) == [
        ["decoder.block.0.layer.0.SelfAttention.o", "decoder.block.0.layer.2.DenseReluDense",
         "decoder.block.1.layer.0.SelfAttention.o", "decoder.block.1.layer.2.DenseReluDense"],
        ["encoder.block.0.layer.0.SelfAttention.o", "encoder.block.0.layer.1.DenseReluDense",
         "encoder.block.1.layer.0.SelfAttention.o", "encoder.block.1.layer.1.DenseReluDense"],
    ]
    # encoder and decoder, attention and FFN: four positions, each one adapter (d 32, m 2)
    assert count_parameters(model)[0] == 4 * single_adapter_count(32, 2)
    prompt = tiny_inputs(seed=4, batch=1, length=5)
    with torch.no_grad():
        a = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True)
        b = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


def test_bad_bottleneck_recipe_is_one_cli_line(tmp_path):
    """The CLI's view of the refusals above (one subprocess: the rest are tested in Python)."""
    method, words = {"method": "parallel_adapter", "bottleneck_size": 0, "connected": True}, "bottleneck_size"
    import subprocess
    import sys

    import yaml

    recipe = {"model": str(tmp_path / "no-model"), "task": "causal-lm", "data": {"train": str(tmp_path / "t.jsonl")},
              "method": method, "output": {"dir": str(tmp_path / "run")}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    res = subprocess.run([sys.executable, "-m", "graftkit.cli", "train", str(tmp_path / "r.yaml"), "--no-progress"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    lines = res.stderr.splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("graft: error:"), res.stderr
    assert words in lines[0] and not (tmp_path / "run").exists()


def test_options_together_with_layer_norm_tuning(tmp_path, ids):
    """connected + shared + train_layer_norm on BERT: the norms train as BitFit-style deltas beside
    the shared, connected adapter, and everything round-trips."""
    model = TINY_MODELS["bert"]()
    gk.inject(model, {"method": "parallel_adapter", "connected": True, "shared": "layers", "train_layer_norm": True,
                      "init_weights": False})
    randomize(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "LayerNorm" in n:
                p.add_(0.05)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    norms = {n for n in trainable if "LayerNorm" in n}
    assert norms and len(norms) == 8  # attention and output LayerNorm of 2 blocks, weight and bias
    d, m = 32, 2
    assert count_parameters(model)[0] == single_adapter_count(d, m) + 8 * d
    gk.save_adapter(model, tmp_path / "a")
    fresh = gk.load_adapter(TINY_MODELS["bert"](), tmp_path / "a")
    assert torch.equal(logits(fresh, ids), logits(model, ids))


def test_connected_adapter_whose_predecessor_did_not_run_is_refused():
    model = copy.deepcopy(gk.inject(tiny_llama(), {"method": "pfeiffer", "connected": True}))  # a copy: no pass yet
    with pytest.raises(GraftError) as exc:  # block 1's FFN alone: block 0's adapter never ran in this pass
        model.model.layers[1].mlp(torch.zeros(1, 3, 32))
    msg = one_line(exc)
    assert "model.layers.0.mlp" in msg and "model.layers.1.mlp" in msg
