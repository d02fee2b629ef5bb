"""graft port (PortLLM): a patch made on base v1 applied to an updated base v2 equals v2 + (ft - v1)."""
from __future__ import annotations

import pytest
import torch
import transformers

import graftkit as gk
from conftest import logits, tiny_bert, tiny_inputs, tiny_llama
from eval_helpers import random_lora
from graftkit.errors import AdapterError
from merge_helpers import load_folder


def _v2(seed: int = 0, shift: float = 0.02):
    """An "updated" base: v1 with every weight moved (stands in for continued pre-training)."""
    model = tiny_llama(seed)
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(shift * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture
def bases(tmp_path):
    tiny_llama(0).save_pretrained(tmp_path / "v1")
    _v2().save_pretrained(tmp_path / "v2")
    return tmp_path / "v1", tmp_path / "v2"


def _finetune(tmp_path, v1):
    ft = transformers.LlamaForCausalLM.from_pretrained(v1)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if "layers.0" in name or "norm" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    ft.save_pretrained(tmp_path / "ft")
    return tmp_path / "ft"


def _lora(tmp_path, v1, name="lora", **cfg):
    model = transformers.LlamaForCausalLM.from_pretrained(v1)
    torch.manual_seed(3)
    gk.inject(model, gk.LoRAConfig(init_lora_weights=False, **{"r": 4, "lora_alpha": 8, "targets": ["q_proj", "v_proj"], **cfg}))
    with torch.no_grad():
        for site in gk.sites(model).values():
            site.lora_B.mul_(0.05)
    gk.save_adapter(model, tmp_path / name)
    return tmp_path / name


def test_port_of_a_full_finetune_is_v2_plus_the_delta(tmp_path, bases):
    from graftkit.analysis.port import port

    v1, v2 = bases
    ft = _finetune(tmp_path, v1)
    r = port(ft, v1, v2, tmp_path / "out")
    got, a, b, c = (load_folder(p) for p in (tmp_path / "out", v1, v2, ft))
    assert set(got) == set(b) and r["kind"] == "model"
    for k in got:
        assert torch.equal(got[k], b[k] + (c[k] - a[k])), k
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"])
    transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")  # a loadable HF folder


def test_ported_adapter_loads_on_v2_and_equals_v2_plus_its_delta(tmp_path, bases, capsys):
    from graftkit.cli import main

    v1, v2 = bases
    lora = _lora(tmp_path, v1)
    assert main(["port", str(lora), "--from", str(v1), "--to", str(v2), str(tmp_path / "ported")]) == 0
    assert "re-targeted adapter" in capsys.readouterr().out
    # the reference: the adapter folded into v1, then ported as a full fine-tune
    merged = gk.export_merged(lora, v1, tmp_path / "ft")
    assert main(["port", str(merged), "--from", str(v1), "--to", str(v2), str(tmp_path / "ref")]) == 0
    ids = tiny_inputs()
    model = transformers.LlamaForCausalLM.from_pretrained(v2)
    gk.load_adapter(model, tmp_path / "ported")  # the fingerprint is v2's now: no --force needed
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ref")
    assert torch.allclose(logits(model, ids), logits(ref, ids), atol=1e-5)
    plain = transformers.LlamaForCausalLM.from_pretrained(v2)
    assert not torch.allclose(logits(plain, ids), logits(ref, ids), atol=1e-3)
    # the original adapter is refused by v2 (its fingerprint is v1's)
    with pytest.raises(AdapterError):
        gk.load_adapter(transformers.LlamaForCausalLM.from_pretrained(v2), lora)


def test_a_base_dependent_delta_needs_full_and_full_adds_the_v1_delta(tmp_path, bases, capsys):
    from graftkit.analysis.port import PortError, port
    from graftkit.cli import main

    v1, v2 = bases
    dora = _lora(tmp_path, v1, "dora", use_dora=True)
    capsys.readouterr()
    assert main(["port", str(dora), "--from", str(v1), "--to", str(v2), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("graft: error:") and "--full" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
    port(dora, v1, v2, tmp_path / "full", full=True)
    merged = load_folder(gk.export_merged(dora, v1, tmp_path / "ft"))
    got, a, b = (load_folder(p) for p in (tmp_path / "full", v1, v2))
    for k in got:
        assert torch.allclose(got[k], b[k] + (merged[k] - a[k]), atol=1e-6), k
    with pytest.raises(PortError):
        port(dora, v1, v2, tmp_path / "o")


def _shifted_config(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "other")
    return tmp_path / "other"


@pytest.mark.parametrize("case", ["v2_shapes", "v2_arch", "ft_other_base", "adapter_other_base"])
def test_bad_inputs_are_one_line_exit_2_and_write_nothing(tmp_path, bases, capsys, case):
    from graftkit.cli import main

    v1, v2 = bases
    patch = tmp_path / "ft"
    if case == "v2_shapes":
        patch, v2 = _finetune(tmp_path, v1), _shifted_config(tmp_path)
        expect = "same shapes"
    elif case == "v2_arch":
        tiny_bert(0).save_pretrained(tmp_path / "bert")
        patch, v2 = _finetune(tmp_path, v1), tmp_path / "bert"
        expect = "one architecture"
    elif case == "ft_other_base":
        patch = _shifted_config(tmp_path)
        expect = "not a fine-tune of v1"
    else:
        tiny_llama(5).save_pretrained(tmp_path / "other_v1")
        patch = _lora(tmp_path, tmp_path / "other_v1")
        expect = "different base model"
    capsys.readouterr()
    code = main(["port", str(patch), "--from", str(v1), "--to", str(v2), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("graft: error:") and err.count("\n") == 1 and expect in err, err
    assert not (tmp_path / "out").exists()


def test_a_classifier_head_is_ported_whole_with_its_labels(tmp_path):
    """graft study's layout: v1 and v2 carry an untrained 2-label head, the expert its own 3-label one."""
    from graftkit.analysis.port import port

    tiny_bert(0, num_labels=2).save_pretrained(tmp_path / "v1")
    v2 = tiny_bert(0, num_labels=2)
    with torch.no_grad():
        for p in v2.parameters():
            p.add_(0.01)
    v2.save_pretrained(tmp_path / "v2")
    ft = tiny_bert(0, num_labels=3)
    with torch.no_grad():
        ft.bert.encoder.layer[0].attention.self.query.weight.add_(0.1)
    ft.save_pretrained(tmp_path / "ft")
    port(tmp_path / "ft", tmp_path / "v1", tmp_path / "v2", tmp_path / "out")
    got, a, b, c = (load_folder(tmp_path / n) for n in ("out", "v1", "v2", "ft"))
    assert torch.equal(got["classifier.weight"], c["classifier.weight"])
    k = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(got[k], b[k] + (c[k] - a[k]))
    assert transformers.BertForSequenceClassification.from_pretrained(tmp_path / "out").config.num_labels == 3


def test_full_port_of_an_adapter_takes_its_head_whole(tmp_path):
    from graftkit.analysis.port import port

    tiny_bert(0).save_pretrained(tmp_path / "v1")
    v2 = tiny_bert(0)
    with torch.no_grad():
        for p in v2.parameters():
            p.add_(0.01)
    v2.save_pretrained(tmp_path / "v2")
    model = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "v1")
    random_lora(model, tmp_path / "a")
    port(tmp_path / "a", tmp_path / "v1", tmp_path / "v2", tmp_path / "out", full=True)
    got = load_folder(tmp_path / "out")
    head = gk.read_adapter(tmp_path / "a").tensors["classifier.weight.value"]
    assert torch.allclose(got["classifier.weight"], head, atol=1e-6)
