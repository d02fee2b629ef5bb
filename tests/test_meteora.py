"""MeteoRA (methods/meteora.py): frozen LoRA experts mixed per token by a trained top-k gate."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

import graftkit as gk
from graftkit.adapter import get_state
from graftkit.errors import AdapterError, ConfigError, UnsupportedError
from graftkit.train import parse_recipe, train

from conftest import tiny_inputs, tiny_llama


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(5, 3)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_gate_gradient_equals_the_hand_computed_one(top_k):
    """y = W x + sum_{i in top-k} w_i B_i A_i x, loss = sum(c * y): dL/dl_i = w_i (u_i - sum_j w_j u_j) over the
    chosen experts (u_i = c . B_i A_i x; top_k 1: the chosen expert's softmax probability straight through,
    top_k = N: the dense softmax); dL/dG = sum_tokens dL/dl x^T. Only the gate gets a gradient."""
    torch.manual_seed(0)
    model = Tiny()
    gk.inject(model, {"method": "meteora", "num_experts": 3, "r": 2, "top_k": top_k, "init_weights": False,
                      "targets": ["proj"], "gate_init_std": 0.5})
    site = next(iter(gk.sites(model).values()))
    x, c = torch.randn(4, 5), torch.randn(4, 3)
    (model(x) * c).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["proj.graft_adapter.module.meteora_gate"]
    g, a, b = site.meteora_gate.detach().double(), site.meteora_A.double(), site.meteora_B.double()
    want = torch.zeros_like(g)
    for t in range(4):
        xt, ct = x[t].double(), c[t].double()
        logits = g @ xt
        u = torch.stack([ct @ (b[i] @ (a[i] @ xt)) for i in range(3)])
        chosen = sorted(range(3), key=lambda i: -float(logits[i]))[:top_k]
        d = torch.zeros(3, dtype=torch.float64)
        if top_k == 1:
            p, s = torch.softmax(logits, 0), chosen[0]
            for i in range(3):
                d[i] = u[s] * p[s] * (float(i == s) - p[i])
        else:
            w = torch.softmax(logits[chosen], 0)
            mean = sum(w[j] * u[i] for j, i in enumerate(chosen))
            for j, i in enumerate(chosen):
                d[i] = w[j] * (u[i] - mean)
        want += d[:, None] * xt[None, :]
    torch.testing.assert_close(site.meteora_gate.grad.double(), want, rtol=1e-5, atol=1e-6)
    # the forward value: top-k weights sum to one (top_k 1: exactly the chosen expert)
    weights = site.routing(x)
    assert torch.allclose(weights.sum(-1), torch.ones(4)) and ((weights > 0).sum(-1) == top_k).all()


def _lora(model_fn, out: Path, seed: int, fmt: str = "native", **cfg) -> Path:
    model = model_fn(0)
    torch.manual_seed(seed)
    gk.inject(model, {"method": "lora", "init_lora_weights": False, **cfg})
    gk.save_adapter(model, out, format=fmt)
    return out


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("meteora")
    return {
        "a": _lora(tiny_llama, root / "a", 1, r=2, lora_alpha=4, targets=["q_proj", "v_proj"]),
        # another rank, rsLoRA, peft's format and one more module: padded ranks, its own scaling, a zero expert on down_proj for "a"
        "b": _lora(tiny_llama, root / "b", 2, "peft", r=4, lora_alpha=8, use_rslora=True, targets=["q_proj", "v_proj", "down_proj"]),
        "dora": _lora(tiny_llama, root / "dora", 3, r=2, use_dora=True, targets=["q_proj"]),
        "ia3": root / "ia3",
    }


def _delta_model(paths: list[Path], weights: list[float]):
    """The base with sum_i weights_i * (LoRA_i's dense delta) folded into its weights."""
    model = tiny_llama(0)
    total = {}
    for path, w in zip(paths, weights):
        m = tiny_llama(0)
        gk.load_adapter(m, path)
        for k, d in gk.materialize_delta(m).items():
            total[k] = total.get(k, 0) + w * d
    with torch.no_grad():
        params = dict(model.named_parameters())
        for k, d in total.items():
            params[k].add_(d)
    return model


def test_experts_are_the_loras_and_a_saved_adapter_needs_no_lora_folder(loras, tmp_path):
    """With a zero gate and top_k = N = 2 every token weighs both experts 1/2: the model equals the base with
    the mean of the two LoRA deltas folded in (ranks padded, scalings folded, a missing module a zero expert).
    The saved MeteoRA adapter reloads exactly after the LoRA folders are gone."""
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(loras["a"], a)
    shutil.copytree(loras["b"], b)
    model = tiny_llama(0)
    gk.inject(model, {"method": "meteora", "adapters": [str(a), str(b)], "top_k": 2})
    assert sorted(gk.sites(model)) == sorted(f"model.layers.{i}.{m}" for i in range(2)
                                             for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))
    with torch.no_grad():
        for site in gk.sites(model).values():
            site.meteora_gate.zero_()
    ids = tiny_inputs()
    with torch.no_grad():
        got = model(input_ids=ids).logits
        want = _delta_model([a, b], [0.5, 0.5])(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - tiny_llama(0)(input_ids=ids).logits).abs().max() > 1e-3
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("meteora_gate") for n in trainable)
    gk.save_adapter(model, tmp_path / "moe")
    shutil.rmtree(a)
    shutil.rmtree(b)
    fresh = tiny_llama(0)
    gk.load_adapter(fresh, tmp_path / "moe")
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, got)


def test_bad_meteora_inputs(loras, tmp_path):
    ia3 = tiny_llama(0)
    gk.inject(ia3, {"method": "ia3", "targets": ["k_proj", "v_proj", "down_proj"], "feedforward": ["down_proj"]})
    gk.save_adapter(ia3, loras["ia3"], overwrite=True)
    wide = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))
    torch.manual_seed(0)
    gk.inject(wide, {"method": "lora", "r": 2, "targets": ["q_proj"]})
    gk.save_adapter(wide, tmp_path / "wide")
    cases = [
        ({"adapters": [str(loras["a"]), str(loras["dora"])]}, UnsupportedError, "DoRA"),
        ({"adapters": [str(loras["a"]), str(loras["ia3"])]}, UnsupportedError, "ia3 adapter"),
        ({"adapters": [str(loras["a"]), str(tmp_path / "wide")]}, AdapterError, "another base model"),
        ({"adapters": [str(loras["a"]), str(tmp_path / "nothing")]}, ConfigError, "is not a folder"),
        ({"adapters": [str(loras["a"]), str(loras["b"])], "top_k": 3}, ConfigError, "top_k is 3 but there are only 2 experts"),
        ({"adapters": [str(loras["a"])], "num_experts": 2}, ConfigError, "not both"),
        ({}, ConfigError, "needs adapters"),
    ]
    for cfg, error, words in cases:
        model = tiny_llama(0)
        with pytest.raises(error, match=words) as exc:
            gk.inject(model, {"method": "meteora", **cfg})
        assert "\n" not in str(exc.value)
        assert get_state(model) is None
        assert all(p.requires_grad for p in model.parameters()), "a refused inject must leave the model as it was"


# -- the gate learns to route: a two-task toy trained with graft train --------------------------------------

def _toy_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 96)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                                pad_token="</s>")


def _doc(task: str, rng: random.Random) -> str:
    """Task a: ascending runs over w10..w39; task b: descending by two over w50..w89 (disjoint words)."""
    if task == "a":
        k = rng.randrange(30)
        return " ".join(f"w{10 + (k + j) % 30}" for j in range(12))
    k = rng.randrange(40)
    return " ".join(f"w{50 + (k - 2 * j) % 40}" for j in range(12))


def _routing(model, batch) -> list[float]:
    """Per site: the share of the batch's tokens whose largest gate weight is on ``want`` (batch = (ids, want))."""
    ids, want = batch
    seen = {}

    def record(site):
        def hook(module, args, kwargs, output):
            seen[site] = site.routing(args[0]).argmax(-1)  # returns None: the output stays as it is
        return hook

    hooks = [s.owner.register_forward_hook(record(s), with_kwargs=True) for s in gk.sites(model).values()]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return [float((seen[s] == want).float().mean()) for s in gk.sites(model).values()]


def test_the_gate_learns_to_route_two_tasks_with_graft_train(tmp_path):
    """Two LoRA experts, each trained on its task (and to answer the other task's words with a fixed wrong
    word, so mixing in the wrong expert costs): `graft train` with method meteora trains only the gates on
    the mixed data, the loss goes down and the tokens of each task are routed to their expert at the head,
    where the experts differ most, far above the untrained gate. (The down_proj gates, where the experts'
    deltas are small, stay mixed: nothing in the loss asks them to choose.)"""
    tok = _toy_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    rng = random.Random(0)

    def ids(task, n):
        return torch.tensor([tok(_doc(task, rng))["input_ids"] for _ in range(n)])

    for task, other in (("a", "b"), ("b", "a")):
        m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
        gk.inject(m, {"method": "lora", "r": 8, "lora_alpha": 16, "targets": ["down_proj", "lm_head"]})
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-2)
        for _ in range(50):
            x, y = ids(task, 8), ids(other, 8)
            loss = m(input_ids=x, labels=x).loss + m(input_ids=y, labels=torch.full_like(y, 3)).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        gk.save_adapter(m, tmp_path / f"lora_{task}")
    rows = [{"text": _doc(t, rng)} for t in ["a", "b"] * 48]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    method = {"method": "meteora", "adapters": [str(tmp_path / "lora_a"), str(tmp_path / "lora_b")], "top_k": 2}
    recipe = {"model": str(tmp_path / "llama"), "task": "causal-lm",
              "data": {"train": str(tmp_path / "train.jsonl"), "text_field": "text", "max_length": 26, "packing": False},
              "method": method, "optim": {"lr": 0.1, "batch_size": 8, "max_steps": 60, "schedule": "constant"},
              "output": {"dir": str(tmp_path / "run")}}
    train(parse_recipe(recipe), progress=False)
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    batches = [(ids("a", 8), 0), (ids("b", 8), 1)]
    trained = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
    gk.load_adapter(trained, tmp_path / "run" / "adapter")
    fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
    torch.manual_seed(0)
    gk.inject(fresh, method)
    for batch in batches:
        after, before = _routing(trained, batch), _routing(fresh, batch)
        assert after[-1] >= 0.85 and after[-1] >= before[-1] + 0.25, (before, after)  # the head (lm_head)
    for name, site in gk.sites(trained).items():  # the experts stayed as the LoRAs made them
        start = gk.sites(fresh)[name]
        assert torch.equal(site.meteora_A, start.meteora_A) and torch.equal(site.meteora_B, start.meteora_B)
        assert not torch.equal(site.meteora_gate, start.meteora_gate)


def test_graft_train_refuses_a_dora_expert_in_one_line(loras, tmp_path, capsys):
    """Through the CLI: the refusal is one line, exit 2, and no run folder is left behind."""
    import yaml

    from graftkit.cli import main

    model_dir = tmp_path / "llama"
    tiny_llama(0).save_pretrained(model_dir)

    _toy_tokenizer().save_pretrained(model_dir)
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": " ".join(f"w{10 + i}" for i in range(20))}) + "\n")
    recipe = {"model": str(model_dir), "task": "causal-lm", "data": {"train": str(tmp_path / "train.jsonl"), "text_field": "text", "max_length": 8},
              "method": {"method": "meteora", "adapters": [str(loras["a"]), str(loras["dora"])]},
              "optim": {"max_steps": 1}, "output": {"dir": str(tmp_path / "run")}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    capsys.readouterr()
    code = main(["train", str(tmp_path / "r.yaml"), "--no-progress"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("graft: error: ") and "DoRA" in lines[0], err
    assert not (tmp_path / "run" / "adapter").exists()
