"""graft moe: Mixtral / Qwen2-MoE assembly from tiny Llama experts (merge/moe.py), parity with the
real mergekit-moe 0.1.5, and its bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers
import yaml

from conftest import tiny_gpt2, tiny_llama
from merge_helpers import load_folder, make_models

from graftkit.cli import main
from graftkit.errors import ConfigError, FileFormatError, UnsupportedError
from graftkit.merge.moe import run_moe

PROMPTS = [["w10 w20 w30", "w13 w23"], ["w11 w21 w31"], ["w12 w22 w32 w42"]]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 96)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    paths = make_models(root, n=3, scale=0.05)
    tok = _tokenizer()
    for p in paths.values():
        tok.save_pretrained(p)
    return paths


def _cfg(paths, mode="hidden", n=3, **extra):
    return {"base_model": str(paths["base"]), "gate_mode": mode, "experts_per_token": 1,
            "experts": [{"source_model": str(paths[f"ft{i}"]), "positive_prompts": PROMPTS[i]} for i in range(n)], **extra}


def _load(out):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def test_mixtral_hidden_gates_route_each_experts_prompt_to_it(experts, tmp_path):
    """Through the CLI: the output loads as MixtralForCausalLM with nothing missing, the experts are
    the dense experts' MLPs, everything else is the base, and the last token of each expert's
    positive prompt routes to that expert in every layer."""
    (tmp_path / "moe.yml").write_text(yaml.safe_dump(_cfg(experts)))
    assert main(["moe", str(tmp_path / "moe.yml"), str(tmp_path / "out")]) == 0
    model = _load(tmp_path / "out")
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_experts_per_tok == 1
    base = load_folder(experts["base"])
    dense = [load_folder(experts[f"ft{i}"]) for i in range(3)]
    state = model.state_dict()
    for layer in range(2):
        moe = model.model.layers[layer].mlp.experts
        for i in range(3):
            pre = f"model.layers.{layer}.mlp."
            want = torch.cat([dense[i][pre + "gate_proj.weight"], dense[i][pre + "up_proj.weight"]])
            assert torch.equal(moe.gate_up_proj[i], want)
            assert torch.equal(moe.down_proj[i], dense[i][pre + "down_proj.weight"])
    for key, value in base.items():
        if ".mlp." not in key:
            assert torch.equal(state[key], value), key
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    tok.pad_token, tok.padding_side = tok.bos_token, "left"  # as the gates saw the prompts
    for i, prompts in enumerate(PROMPTS):
        batch = tok([tok.bos_token + p for p in prompts], add_special_tokens=False, return_tensors="pt", padding=True)
        with torch.no_grad():
            router = model(**batch, output_router_logits=True).router_logits
        for layer_logits in router:
            last = layer_logits.view(len(prompts), -1, 3)[:, -1]
            assert last.argmax(-1).tolist() == [i] * len(prompts)
    out = model.generate(batch["input_ids"][:1], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, batch["input_ids"].shape[1] + 4)
    prov = json.loads((tmp_path / "out" / "graft_provenance.json").read_text())
    assert prov["gate_mode"] == "hidden" and (tmp_path / "out" / "mergekit_moe_config.yml").is_file()


def test_mixtral_of_one_expert_equals_the_dense_model(experts, tmp_path):
    """Every slot the same fine-tune: top-1 weights are 1, so the MoE computes the dense model with
    the base's attention and that fine-tune's MLPs (a swapped w1/w3 or w2 would not)."""
    cfg = _cfg(experts, mode="random", n=2)
    cfg["experts"][1]["source_model"] = cfg["experts"][0]["source_model"]
    run_moe(cfg, tmp_path / "out", allow_all_same=True)
    model = _load(tmp_path / "out")
    dense = tiny_llama(0)
    mixed = {k: v for k, v in load_folder(experts["base"]).items() if ".mlp." not in k}
    mixed.update({k: v for k, v in load_folder(experts["ft0"]).items() if ".mlp." in k})
    dense.load_state_dict(mixed)
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


def test_qwen2_moe_with_a_shared_expert(experts, tmp_path):
    cfg = _cfg(experts, n=2, experts_per_token=2)
    cfg["shared_experts"] = [{"source_model": str(experts["ft2"]), "positive_prompts": PROMPTS[2]}]
    run_moe(cfg, tmp_path / "out")
    model = _load(tmp_path / "out")
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert model.config.num_experts == 2 and model.config.num_experts_per_tok == 2
    shared = load_folder(experts["ft2"])
    written = load_folder(tmp_path / "out")
    layer = model.model.layers[1].mlp
    assert torch.equal(layer.shared_expert.down_proj.weight, shared["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(layer.experts.down_proj[1], load_folder(experts["ft1"])["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(written["model.layers.0.self_attn.q_proj.bias"], torch.zeros(32))  # a Llama base has none
    assert layer.shared_expert_gate.weight.shape == (1, 32)
    assert torch.allclose(layer.shared_expert_gate.weight.norm(), torch.tensor(1.0))
    out = model.generate(torch.tensor([[1, 11, 21]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


PARITY_SCRIPT = r"""
import sys
from mergekit.scripts.moe import main
for cfg, out in zip(sys.argv[1::2], sys.argv[2::2]):
    main([cfg, out, "--random-seed", "7", "--no-copy-tokenizer"], standalone_mode=False)
"""


def test_parity_with_mergekit_moe(experts, tmp_path):
    """cheap_embed (with negative prompts), random and uniform_random gates are deterministic in
    mergekit-moe: the router rows and every expert tensor (one with residual_scale, one recipe in
    bfloat16) must match; hidden gates match to bfloat16 rounding (mergekit runs the base in
    bfloat16). One subprocess runs all four recipes."""
    configs = {}
    for mode in ("cheap_embed", "random", "uniform_random", "hidden"):
        cfg = _cfg(experts, mode=mode, experts_per_token=2)
        cfg["experts"][0]["negative_prompts"] = ["w40 w41"]
        cfg["experts"][1]["residual_scale"] = 0.5  # scales that expert's down projection
        if mode == "uniform_random":
            cfg["dtype"] = "bfloat16"
        configs[mode] = cfg
        (tmp_path / f"{mode}.yml").write_text(yaml.safe_dump(cfg))
        run_moe(cfg, tmp_path / f"graft_{mode}", seed=7)
    args = [a for m in configs for a in (str(tmp_path / f"{m}.yml"), str(tmp_path / f"mk_{m}"))]
    done = subprocess.run([sys.executable, "-c", PARITY_SCRIPT, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for mode in configs:
        ours, theirs = load_folder(tmp_path / f"graft_{mode}"), load_folder(tmp_path / f"mk_{mode}")
        for layer in range(2):
            pre = f"model.layers.{layer}."
            gate_ours, gate_theirs = ours[pre + "block_sparse_moe.gate.weight"], theirs[pre + "mlp.gate.weight"]
            if mode in ("random", "uniform_random"):
                assert torch.equal(gate_ours, gate_theirs)
            elif mode == "cheap_embed":
                torch.testing.assert_close(gate_ours, gate_theirs, rtol=1e-6, atol=1e-6)
            else:  # mergekit runs the base in bfloat16, graft moe in float32: the same unit rows to bf16 rounding
                cos = torch.nn.functional.cosine_similarity(gate_ours.float(), gate_theirs.float(), dim=1)
                assert cos.min() > 0.9999 and (gate_ours - gate_theirs).abs().max() < 1e-2
            fused = torch.stack([torch.cat([ours[pre + f"block_sparse_moe.experts.{i}.w1.weight"],
                                            ours[pre + f"block_sparse_moe.experts.{i}.w3.weight"]]) for i in range(3)])
            assert torch.equal(fused, theirs[pre + "mlp.experts.gate_up_proj"])
            down = torch.stack([ours[pre + f"block_sparse_moe.experts.{i}.w2.weight"] for i in range(3)])
            assert torch.equal(down, theirs[pre + "mlp.experts.down_proj"])
        for key, value in theirs.items():
            if ".mlp." not in key:
                assert torch.equal(ours[key], value), key
        assert ours["model.embed_tokens.weight"].dtype == (torch.bfloat16 if mode == "uniform_random" else torch.float32)
    down = load_folder(experts["ft1"])["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(load_folder(tmp_path / "graft_random")["model.layers.0.block_sparse_moe.experts.1.w2.weight"], down * 0.5)


def test_experts_of_different_architectures_is_one_line(experts, tmp_path, capsys):
    gpt2 = tmp_path / "gpt2"
    tiny_gpt2(0).save_pretrained(gpt2)
    cfg = _cfg(experts, n=2)
    cfg["experts"][1]["source_model"] = str(gpt2)
    (tmp_path / "moe.yml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["moe", str(tmp_path / "moe.yml"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("graft: error: experts of different architectures") and "\n" not in err
    assert f"{gpt2} is gpt2" in err
    assert not (tmp_path / "out").exists()


def _other_width(experts, tmp_path):
    """A Llama of another hidden size: same model type, not the same base."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "wide")
    c = _cfg(experts, n=2)
    c["experts"][1]["source_model"] = str(tmp_path / "wide")
    return c


@pytest.mark.parametrize("case, error, words", [
    ("no experts", ConfigError, "no experts"),
    ("too few experts", ConfigError, "experts_per_token is 3 but there are only 2 experts"),
    ("zero per token", ConfigError, "at least 1"),
    ("no prompts", ConfigError, "has no positive_prompts"),
    ("same prompts", ConfigError, "same positive and negative prompts"),
    ("same models", ConfigError, "all experts are the same model"),
    ("other width", ConfigError, "hidden_size=48, the base has 32"),
    ("bad gate mode", ConfigError, "gate_mode"),
    ("deepseek", UnsupportedError, "DeepSeek-MoE"),
    ("two shared", ConfigError, "exactly one"),
    ("unknown architecture", UnsupportedError, "architecture 'deepseek'"),
    ("missing expert", FileFormatError, "has no config.json"),
])
def test_bad_moe_configs(experts, tmp_path, case, error, words):
    cfg = _cfg(experts, n=2)
    if case == "no experts":
        cfg["experts"] = []
    elif case == "too few experts":
        cfg["experts_per_token"] = 3
    elif case == "zero per token":
        cfg["experts_per_token"] = 0
    elif case == "no prompts":
        del cfg["experts"][1]["positive_prompts"]
    elif case == "same prompts":
        cfg["experts"][1]["positive_prompts"] = cfg["experts"][0]["positive_prompts"]
    elif case == "same models":
        cfg["experts"][1]["source_model"] = cfg["experts"][0]["source_model"]
    elif case == "other width":
        cfg = _other_width(experts, tmp_path)
    elif case == "bad gate mode":
        cfg["gate_mode"] = "learned"
    elif case == "deepseek":
        cfg["shared_experts"] = [{"source_model": str(experts["ft2"])}]
    elif case == "two shared":
        cfg["shared_experts"] = [{"source_model": str(experts["ft2"]), "positive_prompts": ["w5"]}] * 2
    elif case == "unknown architecture":
        cfg["architecture"] = "deepseek"
    elif case == "missing expert":
        (tmp_path / "empty").mkdir()
        cfg["experts"][1]["source_model"] = str(tmp_path / "empty")
    with pytest.raises(error, match=words.replace("(", r"\(")) as exc:
        run_moe(cfg, tmp_path / "out")
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_prompt_gates_need_a_tokenizer(experts, tmp_path):
    bare = tmp_path / "bare"
    tiny_llama(0).save_pretrained(bare)
    cfg = _cfg(experts, n=2, base_model=str(bare))
    with pytest.raises(FileFormatError, match="no tokenizer files"):
        run_moe(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
