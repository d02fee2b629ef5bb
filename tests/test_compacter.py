"""Compacter and Compacter++ (methods/compacter.py, methods/compacter_pp.py).

Every expected value here is computed independently of graftkit's PHM code: weights from an
explicit sum of ``torch.kron`` products, the adapted forward from a hook-free copy of the model
whose sublayers are wrapped by hand, parameter counts from the paper's formula.
"""
from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn

import graftkit as gk
from conftest import TINY_MODELS, logits, tiny_inputs, tiny_llama
from graftkit.adapter import count_parameters, sites
from graftkit.errors import AdapterError, ConfigError
from graftkit.io.native import read_native
from graftkit.methods import method_named
from graftkit.methods.activation import article
from graftkit.methods.compacter import CompacterSite, phm_weight
from graftkit.train.params import t5_base_share

IDS = tiny_inputs()
N = 4  # phm_dim
M = 8  # bottleneck on the tiny models (hidden 32): both divisible by N


def tiny_t5(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.T5Config(vocab_size=96, d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2,
                                num_heads=4, d_kv=8, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg).eval()


MODELS = {**TINY_MODELS, "t5": tiny_t5}


def run(model, ids=IDS):
    """Logits, with T5 fed a decoder sequence too."""
    kwargs = {"decoder_input_ids": ids[:, :4]} if isinstance(model, transformers.T5ForConditionalGeneration) else {}
    return model(input_ids=ids, **kwargs).logits


def cfg(method="compacter", **kw):
    return {"method": method, "bottleneck_size": M, "phm_dim": N, **kw}


def kron_sum(a: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The paper's W = sum_i A_i (x) s_i t_i^T, term by term."""
    return sum(torch.kron(a[i], s[i] @ t[i].T) for i in range(a.shape[0]))


def compacter_sites(model) -> dict[str, CompacterSite]:
    return {n: s for n, s in sites(model).items() if isinstance(s, CompacterSite)}


# -- the PHM weight ----------------------------------------------------------------------------

@pytest.mark.parametrize("n,p,q,r", [(4, 2, 8, 1), (2, 3, 5, 2), (3, 4, 1, 3)])
def test_phm_weight_is_the_kron_sum(n, p, q, r):
    g = torch.Generator().manual_seed(n * 100 + p)
    a, s, t = (torch.randn(*shape, generator=g) for shape in ((n, n, n), (n, p, r), (n, q, r)))
    w = phm_weight(a, s, t)
    assert w.shape == (n * p, n * q)
    torch.testing.assert_close(w, kron_sum(a, s, t))
    # a hand case: n=2, rank 1, B_0 = 1, B_1 = 0 leaves A_0 itself
    a2 = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])
    s2, t2 = torch.tensor([[[1.0]], [[0.0]]]), torch.ones(2, 1, 1)
    assert torch.equal(phm_weight(a2, s2, t2), a2[0])


# -- the adapted forward against a hook-free reference --------------------------------------

class Ref(nn.Module):
    """``inner(x) = h`` then ``h + W_up gelu(W_down h + b_down) + b_up``, W from kron sums of leaf tensors."""

    def __init__(self, inner: nn.Module, leaves: dict[str, torch.Tensor], chain: list | None = None):
        super().__init__()
        self.inner = inner
        self.leaves = leaves
        self.chain = chain  # connected: the outputs of the adapters before this one, in forward order

    def forward(self, *args, **kwargs):
        h = self.inner(*args, **kwargs)
        v = self.leaves
        w_down = kron_sum(v["a_down"], v["down_s"], v["down_t"])
        w_up = kron_sum(v["a_up"], v["up_s"], v["up_t"])
        u = h + self.chain[-1] if self.chain else h
        a = nn.functional.gelu(u @ w_down.T + v["down_b"]) @ w_up.T + v["up_b"]
        if self.chain is not None:
            self.chain.append(a)
        return h + a


def reference(factory, adapted, shared: bool, chain: list | None = None):
    """A fresh base model with every adapted module wrapped by :class:`Ref`; each site gets its own
    leaf copies of the tensors (per-layer copies of a shared A too), returned for gradients."""
    ref = factory()
    modules = dict(ref.named_modules())
    leaves = {}
    for name, site in compacter_sites(adapted).items():
        a_down = site.phm_rule if shared else site.adapter_down_rule
        a_up = site.phm_rule if shared else site.adapter_up_rule
        v = {k: t.detach().clone().requires_grad_(True) for k, t in {
            "a_down": a_down, "a_up": a_up, "down_s": site.adapter_down_s, "down_t": site.adapter_down_t,
            "up_s": site.adapter_up_s, "up_t": site.adapter_up_t,
            "down_b": site.adapter_down_bias, "up_b": site.adapter_up_bias}.items()}
        parent, _, child = name.rpartition(".")
        setattr(modules[parent], child, Ref(modules[name], v, chain))
        leaves[name] = v
    return ref, leaves


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("method,shared", [("compacter", True), ("compacter_pp", True), ("compacter", False)])
def test_forward_and_gradients_match_reference(family, method, shared):
    factory = MODELS[family]
    model = gk.inject(factory(), cfg(method, init_weights=False, shared_phm_rule=shared))
    per_block = 2 if method == "compacter" else 1
    assert len(compacter_sites(model)) == per_block * (4 if family == "t5" else 2)
    ref, leaves = reference(factory, model, shared)
    out, want = run(model), run(ref)
    torch.testing.assert_close(out, want)
    assert not torch.allclose(out, run(factory())), "the random start should change the output"
    assert all(s.weights()[1].abs().sum() > 0 for s in compacter_sites(model).values())  # W_up too, not only b_up

    out.square().mean().backward()
    want.square().mean().backward()
    for name, site in compacter_sites(model).items():
        v = leaves[name]
        for slot, leaf in (("adapter_down_s", "down_s"), ("adapter_down_t", "down_t"), ("adapter_up_s", "up_s"),
                           ("adapter_up_t", "up_t"), ("adapter_down_bias", "down_b"), ("adapter_up_bias", "up_b")):
            torch.testing.assert_close(getattr(site, slot).grad, v[leaf].grad, msg=f"{name}.{slot}")
        if not shared:
            torch.testing.assert_close(site.adapter_down_rule.grad, v["a_down"].grad)
            torch.testing.assert_close(site.adapter_up_rule.grad, v["a_up"].grad)
    if shared:
        # the one A's gradient is the sum of every layer's (down and up) contributions
        total = sum(v["a_down"].grad + v["a_up"].grad for v in leaves.values())
        torch.testing.assert_close(next(iter(compacter_sites(model).values())).phm_rule.grad, total)


# -- sharing -----------------------------------------------------------------------------------

def test_one_shared_a_for_the_whole_model():
    model = gk.inject(tiny_llama(), cfg())
    found = list(compacter_sites(model).values())
    rule = found[0].phm_rule
    assert rule.shape == (N, N, N)
    assert all(s.phm_rule is rule for s in found)  # one Parameter, one storage
    assert len({s.phm_rule.data_ptr() for s in found}) == 1
    assert [n for n, _ in model.named_parameters() if n.endswith("phm_rule")] == [
        f"{next(iter(compacter_sites(model)))}.graft_adapter.module.phm_rule"]
    # saved once, by the first site
    assert [s.slots.count("phm_rule") for s in found] == [1] + [0] * (len(found) - 1)
    # a deep copy shares its own A and leaves the original's alone
    twin = copy.deepcopy(model)
    copies = list(compacter_sites(twin).values())
    assert all(s.phm_rule is copies[0].phm_rule for s in copies) and copies[0].phm_rule is not rule
    # not shared: every PHM layer has its own, and nothing is called phm_rule
    own = gk.inject(tiny_llama(), cfg(shared_phm_rule=False))
    rules = [r for s in compacter_sites(own).values() for r in (s.adapter_down_rule, s.adapter_up_rule)]
    assert len({id(r) for r in rules}) == len(rules) == 8
    assert not any(n.endswith("phm_rule") for n, _ in own.named_parameters())


def test_a_site_built_alone_has_its_own_a():
    from graftkit.methods.activation import find_module

    model = tiny_llama()
    method = method_named("compacter")
    config = method.config_cls(bottleneck_size=M)
    a = method.make_site(find_module(model, "model.layers.0.mlp"), config, {})
    b = method.make_site(find_module(model, "model.layers.1.mlp"), config, {})
    assert a.phm_rule is not b.phm_rule and "phm_rule" in a.slots and "phm_rule" in b.slots


def test_bottleneck_options_shared_layers_and_connected():
    """The bottleneck family's ``shared: layers`` and ``connected`` work on PHM adapters too."""
    # shared: layers: one adapter per block position (o_proj, mlp) besides the one A
    model = gk.inject(tiny_llama(), cfg(shared="layers", init_weights=False))
    assert count_parameters(model)[0] == hand_count(1, 2, 32, M, N, 1, True, True)
    found = compacter_sites(model)
    assert found["model.layers.0.mlp"].adapter_up_t is found["model.layers.1.mlp"].adapter_up_t
    assert all(s.phm_rule is found["model.layers.0.mlp"].phm_rule for s in found.values())
    # connected: each adapter reads its sublayer output plus the previous adapter's output
    model = gk.inject(tiny_llama(), cfg(connected=True, init_weights=False))
    chain: list = []
    ref, _ = reference(tiny_llama, model, True, chain)
    torch.testing.assert_close(run(model), run(ref))
    assert len(chain) == 4
    plain = gk.inject(tiny_llama(), cfg(init_weights=False))
    plain.load_state_dict(model.state_dict())
    assert not torch.allclose(run(plain), run(model))


# -- parameter counts --------------------------------------------------------------------------

def hand_count(blocks: int, per_block: int, d: int, m: int, n: int, r: int, bias: bool, shared: bool) -> int:
    """Per adapter: two PHM layers of n(k/n + d/n)r = r(k + d) each, the biases (k + d); then
    n^3 once (shared) or 2n^3 per adapter (one A per PHM layer)."""
    per_adapter = 2 * r * (m + d) + (m + d if bias else 0) + (0 if shared else 2 * n**3)
    return blocks * per_block * per_adapter + (n**3 if shared else 0)


@pytest.mark.parametrize("method,per_block", [("compacter", 2), ("compacter_pp", 1)])
@pytest.mark.parametrize("r,bias,shared", [(1, True, True), (2, False, True), (3, True, False)])
def test_trainable_count_matches_the_formula(method, per_block, r, bias, shared):
    model = gk.inject(tiny_llama(), cfg(method, phm_rank=r, phm_bias=bias, shared_phm_rule=shared))
    trainable, total = count_parameters(model)
    assert trainable == hand_count(2, per_block, 32, M, N, r, bias, shared)
    assert total == sum(p.numel() for p in tiny_llama().parameters())


def test_t5_base_share():
    """t5-base's shape (T5Config in code, no weights): Compacter++ with the paper's settings
    (reduction factor 32, n = 4, rank 1, PHM biases) on 24 blocks (12 encoder + 12 decoder).

    We get 57,088 trainable parameters, 0.0256% of 222,903,552; with ``train_layer_norm`` (the
    paper's runs also train the layer norms: 60 T5LayerNorms of 768 in the blocks) 103,168 =
    0.0463%. The paper reports 0.047%: that is 104,704 / 222,903,552, i.e. our count plus the
    encoder's and decoder's final layer norms (2 x 768), which sit outside the blocks and are not
    trained here. (Compacter, with the self-attention adapters too: 160,192 = 0.0719% here,
    161,728 = 0.0726% with the final norms, the paper's 0.073%.)"""
    base = 222_903_552
    trainable, total = t5_base_share({"method": "compacter_pp", "reduction_factor": 32})
    assert total == base
    assert trainable == hand_count(24, 1, 768, 24, 4, 1, True, True) == 57_088
    trainable, _ = t5_base_share({"method": "compacter_pp", "reduction_factor": 32, "train_layer_norm": True})
    assert trainable == 57_088 + 60 * 768 == 103_168
    assert round(100 * (trainable + 2 * 768) / base, 3) == 0.047  # the paper's figure, final norms included


# -- the adapter protocol ------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["compacter", "compacter_pp"])
def test_identity_at_init_and_trainable_from_zero(method):
    base = logits(tiny_llama(), IDS)
    model = gk.inject(tiny_llama(), cfg(method))
    assert method_named(method).identity_at_init
    assert torch.equal(logits(model, IDS), base)
    model(input_ids=IDS).logits.square().mean().backward()
    for site in compacter_sites(model).values():
        assert torch.count_nonzero(site.adapter_up_t) == 0
        assert torch.count_nonzero(site.adapter_up_t.grad) > 0  # W_up = 0 yet trainable


def test_disable_is_base_and_only_adapter_params_train():
    base = logits(tiny_llama(), IDS)
    model = gk.inject(tiny_llama(), cfg(init_weights=False, train_layer_norm=True))
    assert not torch.allclose(logits(model, IDS), base)
    with gk.disabled(model):
        assert torch.equal(logits(model, IDS), base)
    assert torch.allclose(logits(model, IDS), logits(model, IDS)) and not torch.allclose(logits(model, IDS), base)
    model(input_ids=IDS).logits.square().mean().backward()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".graft_adapter." in n or "norm" in n for n in trained)
    assert any("norm" in n for n in trained)  # train_layer_norm: the blocks' norms train in place
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trained), n


@pytest.mark.parametrize("method,shared", [("compacter", True), ("compacter_pp", False)])
def test_save_load_round_trip(tmp_path, method, shared):
    model = gk.inject(tiny_llama(), cfg(method, init_weights=False, shared_phm_rule=shared, phm_rank=2))
    want = logits(model, IDS)
    gk.save_adapter(model, tmp_path / "a")
    saved = read_native(tmp_path / "a")
    assert saved.num_parameters() == count_parameters(model)[0]  # the shared A counted once
    assert sum(k.endswith(".phm_rule") for k in saved.tensors) == (1 if shared else 0)
    torch.manual_seed(123)  # the fresh sites start elsewhere; loading must overwrite every tensor
    fresh = gk.load_adapter(tiny_llama(), tmp_path / "a")
    assert torch.equal(logits(fresh, IDS), want)
    if shared:
        found = list(compacter_sites(fresh).values())
        assert all(s.phm_rule is found[0].phm_rule for s in found)  # still one tensor after the load
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), fresh.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_base_keys_unchanged_and_unload_restores():
    plain = tiny_llama()
    keys = list(plain.state_dict())
    model = gk.inject(tiny_llama(), cfg(init_weights=False))
    assert [k for k in model.state_dict() if "graft_adapter" not in k] == keys
    gk.unload(model, merge=False)
    assert list(model.state_dict()) == keys and torch.equal(logits(model, IDS), logits(plain, IDS))


def test_double_injection_refused():
    model = gk.inject(tiny_llama(), cfg())
    with pytest.raises(AdapterError, match="already has a compacter adapter"):
        gk.inject(model, cfg("compacter_pp"))


@pytest.mark.parametrize("method", ["compacter", "compacter_pp"])
def test_weight_only_operations_refused(method):
    model = gk.inject(tiny_llama(), cfg(method))
    for op, what in ((gk.materialize_delta, "materialize_delta"), (gk.merge_adapter, "merging into the weights")):
        with pytest.raises(AdapterError) as ei:
            op(model)
        msg = str(ei.value)
        assert "\n" not in msg and what in msg and f"{article(method)} {method} adapter has none" in msg


def test_learns():
    """A few steps on a fixed target lower the loss (the zero-initialised up layer does not stall it)."""
    model = gk.inject(tiny_llama(), cfg("compacter_pp"))
    opt = torch.optim.Adam(gk.trainable_parameters(model), lr=1e-2)
    target = tiny_inputs(seed=5)
    losses = []
    for _ in range(15):
        out = model(input_ids=IDS, labels=target)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


# -- bad input -----------------------------------------------------------------------------------

def refused(config: dict, *needles: str) -> None:
    model = tiny_llama()
    with pytest.raises(ConfigError) as ei:
        gk.inject(model, config)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    assert gk.get_state(model) is None and not any("graft_adapter" in n for n, _ in model.named_modules())


def test_phm_dim_not_dividing_the_hidden_size():
    refused(cfg(phm_dim=3, bottleneck_size=6), "phm_dim 3 does not divide the input width 32", "model.layers.0.self_attn.o_proj")


def test_phm_dim_not_dividing_the_bottleneck():
    refused(cfg(bottleneck_size=6), "phm_dim 4 does not divide the bottleneck width 6", "bottleneck_size")
    refused({"method": "compacter_pp"}, "bottleneck width 2")  # the default reduction factor 16 on hidden 32


@pytest.mark.parametrize("key", ["phm_dim", "phm_rank"])
def test_phm_dim_and_rank_below_one(key):
    refused(cfg(**{key: 0}), key, "greater than or equal to 1")


def test_bad_phm_dim_from_the_command_line(tmp_path, capsys):
    """``graft inspect --params`` on a recipe (a config-only model folder): one ``graft: error:`` line, exit 2."""
    import yaml

    from graftkit.cli import main

    transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path / "llama")
    for method, needle in (({"method": "compacter", "phm_dim": 3}, "phm_dim 3 does not divide"),
                           ({"method": "compacter_pp", "phm_rank": 0}, "phm_rank")):
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump({"model": str(tmp_path / "llama"), "task": "causal-lm", "method": method,
                                        "data": {"train": str(tmp_path / "train.jsonl")}, "output": {"dir": str(tmp_path / "out")}}))
        assert main(["inspect", "--params", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("graft: error:") and "\n" not in err and needle in err, err
    assert not (tmp_path / "out").exists()
