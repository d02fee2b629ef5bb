"""graft extract-lora (a LoRA from a full fine-tune by truncated SVD) and the low-rank factoring it
shares with ``output: adapter`` (fixed rank, ``rank: auto`` with ``max_error``, DoRA output)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import graftkit as gk
from conftest import tiny_gpt2, tiny_llama
from graftkit.cli import main
from graftkit.merge.extract_lora import check_rank_options, choose_rank, factor

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def fine_tune(root, rank=3, seed=1, norms=True):
    """A base and a "fine-tune" whose Linear deltas have rank exactly ``rank`` (norms shifted too)."""
    tiny_llama(0).save_pretrained(root / "base")
    ft = tiny_llama(0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if name.endswith(tuple(f"{n}.weight" for n in LINEARS)):
                p.add_(torch.randn(p.shape[0], rank, generator=g) @ torch.randn(rank, p.shape[1], generator=g) * 0.03)
            elif norms and "norm" in name:
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    ft.save_pretrained(root / "ft")
    return ft


def test_exact_rank_delta_extracts_exactly_and_loads_in_peft(tmp_path, capsys, ids):
    from peft import PeftModel

    ft = fine_tune(tmp_path)
    want = ft(input_ids=ids).logits
    assert main(["extract-lora", str(tmp_path / "ft"), str(tmp_path / "base"), str(tmp_path / "lora"), "--rank", "3"]) == 0
    assert "SVD relative error" in capsys.readouterr().out
    meta = json.loads((tmp_path / "lora" / "adapter.json").read_text())
    ex = meta["extraction"]
    assert ex["relative_error"]["overall"] < 1e-6 and len(ex["rank"]) == 2 * len(LINEARS)
    assert set(ex["rank"].values()) == {3} and all(o["r"] == 3 for o in meta["target_options"].values())
    assert ex["whole"] == sorted(n for n, _ in ft.named_parameters() if "norm" in n)  # changed, not factorable: whole
    model = tiny_llama(0)
    gk.load_adapter(model, tmp_path / "lora")
    assert torch.allclose(model(input_ids=ids).logits, want, atol=1e-5)
    # a rank above the delta's: still exact, and each matrix keeps rank min(R, out, in)
    assert main(["extract-lora", str(tmp_path / "ft"), str(tmp_path / "base"), str(tmp_path / "peft"), "--rank", "40", "--peft"]) == 0
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 32 and set(cfg["rank_pattern"].values()) == {16}  # k/v_proj are (16, 32), the rest 32 or more
    peft_model = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "peft").eval()
    assert torch.allclose(peft_model(input_ids=ids).logits, want, atol=1e-5)
    # below the delta's rank the error is what the dropped singular values say
    assert main(["extract-lora", str(tmp_path / "ft"), str(tmp_path / "base"), str(tmp_path / "r1"), "--rank", "1",
                 "--skip-undecomposable"]) == 0
    ex = json.loads((tmp_path / "r1" / "adapter.json").read_text())["extraction"]
    assert ex["whole"] == [] and len(ex["skipped"]) == 5 and 0.1 < ex["relative_error"]["overall"] < 1


def spectrum(s, out=12, inn=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inn, len(s), generator=g, dtype=torch.float64))
    return (u * torch.tensor(s, dtype=torch.float64)) @ v.T


def test_sv_threshold_picks_the_rank_of_a_hand_built_spectrum():
    d = spectrum([5.0, 3.0, 1.0, 0.5, 0.1])
    s = torch.linalg.svdvals(d)
    for eps, r in ((0.75, 3), (0.05, 5), (2.9, 2), (3.5, 1), (6.0, 0), (0.3, 4)):
        assert choose_rank(s, sv_threshold=eps) == r, eps
        assert factor(d, sv_threshold=eps).rank == r
    assert choose_rank(s, sv_threshold=0.05, max_rank=2) == 2  # mergekit's --max-rank caps the threshold
    assert choose_rank(s, max_rank=2) == 2 and choose_rank(s, max_rank=50) == 9  # alone: a fixed rank, at most the size
    f = factor(d, sv_threshold=0.75)
    # the kept product is the top-3 part: its error is the norm of the dropped values
    assert abs(f.relative_error - (0.5**2 + 0.1**2) ** 0.5 / (25 + 9 + 1 + 0.25 + 0.01) ** 0.5) < 1e-9
    assert f.a.shape == (3, 9) and f.b.shape == (12, 3)


@pytest.mark.parametrize("max_error", [0.5, 0.2, 0.1, 0.02, 0.001])
def test_max_error_takes_the_smallest_rank_that_meets_it(max_error):
    d = spectrum([5.0, 3.0, 1.0, 0.5, 0.1])
    f = factor(d, max_error=max_error)
    assert f.relative_error <= max_error
    assert factor(d, rank=f.rank - 1).relative_error > max_error  # one rank less would miss it


def test_parity_with_mergekit_extract_lora(tmp_path):
    """The real mergekit-extract-lora on the same tiny models: the same rank per module and the
    same product B A (the SVD's signs may differ, the product may not)."""
    pytest.importorskip("mergekit")
    from safetensors.torch import load_file

    # a fine-tune of full rank (noise), so that truncation decides what is kept
    tiny_llama(0).save_pretrained(tmp_path / "base")
    ft = tiny_llama(0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    ft.save_pretrained(tmp_path / "ft")
    # a threshold inside the spectra: each matrix keeps its own number of values
    base = dict(tiny_llama(0).named_parameters())
    eps = float(torch.cat([torch.linalg.svdvals((p - base[n]).detach()) for n, p in ft.named_parameters()
                           if n.endswith(tuple(f"{m}.weight" for m in LINEARS))]).median())
    runs = {"rank": ["--max-rank", "5"], "eps": ["--max-rank", "64", "--sv-epsilon", str(eps)]}
    driver = ("import sys, json\nfrom mergekit.scripts.extract_lora import main\n"
              "for args in json.loads(sys.argv[1]):\n    main(args, standalone_mode=False)\n")
    calls = [["--model", str(tmp_path / "ft"), "--base-model", str(tmp_path / "base"), "--out-path", str(tmp_path / f"mk_{k}"),
              "--no-copy-tokenizer", "--quiet", *a] for k, a in runs.items()]
    subprocess.run([sys.executable, "-c", driver, json.dumps(calls)], check=True, capture_output=True)
    for k, ours in (("rank", ["--rank", "5"]), ("eps", ["--sv-threshold", str(eps), "--max-rank", "64"])):
        assert main(["extract-lora", str(tmp_path / "ft"), str(tmp_path / "base"), str(tmp_path / f"gk_{k}"), *ours]) == 0
        theirs = load_file(str(tmp_path / f"mk_{k}" / "adapter_model.safetensors"))
        adapter = gk.read_adapter(tmp_path / f"gk_{k}")
        assert adapter.targets, k
        ranks = set()
        for name in adapter.targets:
            module = name.removesuffix(".weight")
            a, b = theirs[f"base_model.model.{module}.lora_A.weight"], theirs[f"base_model.model.{module}.lora_B.weight"]
            mine = adapter.tensors[f"{name}.lora_B"] @ adapter.tensors[f"{name}.lora_A"]
            assert a.shape[0] == adapter.tensors[f"{name}.lora_A"].shape[0], name
            assert torch.allclose(mine, b @ a, atol=2e-6), name
            ranks.add(a.shape[0])
        # mergekit's linear modules are ours; what it keeps whole (norms, embeddings, lm_head) we keep whole
        assert {key.split("base_model.model.")[1].rsplit(".lora_", 1)[0] for key in theirs if ".lora_A" in key} == \
            {n.removesuffix(".weight") for n in adapter.targets}
        assert {n.removesuffix(".weight") for n in adapter.train_also} == \
            {key.split("base_model.model.")[1].removesuffix(".weight") for key in theirs if ".lora_" not in key}
        if k == "eps":
            assert len(ranks) > 1  # the threshold gives each matrix its own rank


@pytest.mark.parametrize("argv,needles", [
    (["--rank", "0"], ("--rank", ">= 1")),
    (["--rank", "-2"], ("--rank", ">= 1")),
    (["--rank", "4", "--sv-threshold", "0.1"], ("one of", "--rank and --sv-threshold")),
    (["--max-error", "1.5"], ("--max-error", "(0, 1)")),
    (["--max-error", "0"], ("--max-error", "(0, 1)")),
    ([], ("choose the rank",)),
])
def test_bad_rank_options_are_one_line_errors(tmp_path, capsys, argv, needles):
    fine_tune(tmp_path, norms=False)
    capsys.readouterr()
    code = main(["extract-lora", str(tmp_path / "ft"), str(tmp_path / "base"), str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("graft: error:"), err
    assert all(n in err[0] for n in needles), err[0]
    assert not (tmp_path / "out").exists()


def test_models_of_different_architecture_are_refused(tmp_path, capsys):
    tiny_llama(0).save_pretrained(tmp_path / "llama")
    tiny_gpt2(0).save_pretrained(tmp_path / "gpt2")
    capsys.readouterr()
    code = main(["extract-lora", str(tmp_path / "gpt2"), str(tmp_path / "llama"), str(tmp_path / "out"), "--rank", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "same architecture" in err[0] and "gpt2" in err[0], err
    assert not (tmp_path / "out").exists()
    # same architecture, another size: the first differing shape is named
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "narrow")
    capsys.readouterr()
    code = main(["extract-lora", str(tmp_path / "narrow"), str(tmp_path / "llama"), str(tmp_path / "out"), "--rank", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "down_proj" in err[0] and "(32, 48)" in err[0] and "(32, 64)" in err[0], err
    assert not (tmp_path / "out").exists()


def test_check_rank_options_names_config_keys_without_dashes():
    from graftkit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"max_error must lie in \(0, 1\)"):
        check_rank_options(max_error=1.0, flag=False)


# -- output: adapter: rank auto and DoRA output (the factoring shared with extract-lora) ---------------

def _lora_inputs(tmp_path, n=3, **cfg):
    from test_merge_adapters import make_adapter

    tiny_llama(0).save_pretrained(tmp_path / "base")
    return [make_adapter(tmp_path / "base", tmp_path / f"a{i}", seed=i, fmt=["native", "peft"][i % 2], **cfg) for i in range(n)]


def _merge_cfg(tmp_path, adapters, **extra):
    return {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"), "dtype": "float32", "output": "adapter",
            "models": [{"model": str(a), "parameters": {"weight": w}} for a, w in zip(adapters, [1.0, 0.7, 0.4])], **extra}


def test_rank_auto_meets_max_error_per_key_with_the_smallest_rank(tmp_path, ids):
    from peft import PeftModel

    from merge_helpers import load_folder

    adapters = _lora_inputs(tmp_path)
    out = gk.merge(_merge_cfg(tmp_path, adapters, rank="auto", max_error=0.3), tmp_path / "lora")
    meta = json.loads((out / "adapter.json").read_text())
    ranks, errs = meta["merge"]["ranks"], meta["merge"]["relative_error"]["per_key"]
    full = load_folder(gk.merge({**_merge_cfg(tmp_path, adapters), "output": "model"}, tmp_path / "full"))
    base = load_folder(tmp_path / "base")
    assert set(ranks) == set(meta["targets"]) and len(set(ranks.values())) > 1  # each key its own rank
    for key, r in ranks.items():
        delta = full[key] - base[key]
        assert meta["target_options"][key]["r"] == r
        assert errs[key] <= 0.3 and factor(delta, rank=r).relative_error <= 0.3, key
        assert factor(delta, rank=r - 1).relative_error > 0.3, key  # one less would not do
    # the per-key ranks survive the peft export (rank_pattern): the same logits in the real peft
    model = tiny_llama(0)
    gk.load_adapter(model, out)
    ours = model(input_ids=ids).logits
    gk.save_adapter(model, tmp_path / "peft", format="peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["rank_pattern"]
    peft_model = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "peft").eval()
    assert torch.allclose(peft_model(input_ids=ids).logits, ours, atol=1e-5)


def test_dora_inputs_give_a_dora_adapter_equal_to_the_merged_model_in_peft(tmp_path, ids):
    import transformers
    from peft import PeftModel

    adapters = _lora_inputs(tmp_path, use_dora=True, r=2)
    full = transformers.AutoModelForCausalLM.from_pretrained(gk.merge({**_merge_cfg(tmp_path, adapters), "output": "model"},
                                                                      tmp_path / "full")).eval()
    want = full(input_ids=ids).logits
    out = gk.merge(_merge_cfg(tmp_path, adapters, rank=6), tmp_path / "dora")  # 3 x rank 2 directions
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["config"]["use_dora"] and meta["merge"]["dora"]
    assert meta["merge"]["relative_error"]["overall"] < 1e-3
    model = tiny_llama(0)
    gk.load_adapter(model, out)
    gk.save_adapter(model, tmp_path / "peft", format="peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["use_dora"]
    peft_model = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "peft").eval()
    got = peft_model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-3), (got - want).abs().max()
    # the same merge as a plain LoRA of the same rank cannot hold the magnitude rescaling
    plain = gk.merge(_merge_cfg(tmp_path, adapters, rank=6, dora=False), tmp_path / "plain")
    err = json.loads((plain / "adapter.json").read_text())["merge"]["relative_error"]["overall"]
    assert err > 10 * meta["merge"]["relative_error"]["overall"]


@pytest.mark.parametrize("extra,needles", [
    ({"rank": "auto", "max_error": 1.5}, ("max_error must lie in (0, 1)",)),
    ({"rank": "auto"}, ("rank: auto needs max_error",)),
    ({"rank": 4, "max_error": 0.1}, ("max_error goes with rank: auto",)),
    ({"rank": 0}, ("rank must be a whole number >= 1",)),
    ({"output": "model", "max_error": 0.1}, ("applies to output: adapter",)),
])
def test_bad_output_adapter_rank_options(tmp_path, capsys, extra, needles):
    import yaml

    cfg = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"), "output": "adapter",
           "models": [{"model": str(tmp_path / "a0"), "parameters": {"weight": 1.0}}], **extra}
    (tmp_path / "m.yml").write_text(yaml.safe_dump(cfg))
    code = main(["merge", str(tmp_path / "m.yml"), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("graft: error:") and all(n in err[0] for n in needles), err
    assert not (tmp_path / "out").exists()


def test_gpt2_conv1d_extracts_exactly_and_a_changed_bias_of_a_lora_layer_is_refused_for_peft(tmp_path, capsys, ids):
    """Conv1D stores (in, out): the delta is factored in the (out, in) view; a changed bias is
    kept whole natively, but peft cannot hold c_attn both as a LoRA target and whole."""
    tiny_gpt2(0).save_pretrained(tmp_path / "base")
    ft = tiny_gpt2(0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if name.endswith(("c_attn.weight", "c_fc.weight")):
                p.add_(torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g) * 0.03)
        ft.transformer.h[0].attn.c_attn.bias.add_(0.01)
    ft.save_pretrained(tmp_path / "ft")
    capsys.readouterr()
    assert main(["extract-lora", str(tmp_path / "ft"), str(tmp_path / "base"), str(tmp_path / "lora"), "--rank", "2"]) == 0
    adapter = gk.read_adapter(tmp_path / "lora")
    assert adapter.meta["extraction"]["relative_error"]["overall"] < 1e-6
    assert {adapter.meta["target_kinds"][t] for t in adapter.targets} == {"conv1d"} and adapter.train_also == ["transformer.h.0.attn.c_attn.bias"]
    model = tiny_gpt2(0)
    gk.load_adapter(model, tmp_path / "lora")
    assert torch.allclose(model(input_ids=ids).logits, ft(input_ids=ids).logits, atol=1e-5)
    capsys.readouterr()
    code = main(["extract-lora", str(tmp_path / "ft"), str(tmp_path / "base"), str(tmp_path / "out"), "--rank", "2", "--peft"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "c_attn.bias" in err[0] and "--skip-undecomposable" in err[0], err
    assert not (tmp_path / "out").exists()


def test_dora_rank_auto_takes_the_smallest_rank_within_max_error():
    """W' = diag(g) (W + L) with L of rank 5 is a DoRA target of rank 5 exactly: rank auto finds 5."""
    from graftkit.merge.extract_lora import factor_dora

    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 16, generator=g, dtype=torch.float64)
    low = torch.randn(24, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 16, generator=g, dtype=torch.float64) * 0.1
    merged = (1 + 0.05 * torch.randn(24, 1, generator=g, dtype=torch.float64)) * (w + low)
    f = factor_dora(w, merged, max_error=1e-4)
    assert f.rank == 5 and f.relative_error <= 1e-4
    assert factor_dora(w, merged, rank=4).relative_error > 1e-4
    assert factor(merged - w, rank=5).relative_error > 0.01  # the plain LoRA of the same rank cannot
