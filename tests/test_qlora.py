"""QLoRA: LoRA on a 4-bit (bitsandbytes NF4/FP4) frozen base, on CPU.

bitsandbytes runs 4-bit quantization, its matmul and the matmul's backward on CPU, so this file
covers the whole path: the LoRA site on ``Linear4bit`` (gradients equal a plain Linear holding the
dequantized weights), the adapter's record of the quantization, the merged export onto the
dequantized weights (checked against bitsandbytes' own ``dequantize_4bit``), the peft export
loaded by peft onto its own quantized base, a ``graft train`` run that checkpoints and resumes
bit for bit, and the one-line refusals. What needs a GPU is listed in docs/train.md (QLoRA).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import graftkit as gk
from graftkit.cli import main as graft_main
from graftkit.errors import AdapterError, ConfigError, UnsupportedError
from graftkit.tensors import read_safetensors
from graftkit.train import parse_recipe, train
from graftkit.train.loop import Run
from conftest import tiny_inputs, tiny_llama
from test_train import _recipe_file, assert_one_line_error, assert_same_run, assets, chat_recipe, cls_recipe  # noqa: F401  (assets: fixture)

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402

FP32 = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "fp32"}
LORA = {"method": "lora", "r": 4, "lora_alpha": 8, "targets": ["q_proj", "v_proj", "up_proj", "down_proj"]}
QLORA = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bf16"}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qlora") / "llama"
    tiny_llama().save_pretrained(path)
    return path


def trained_adapter(model, seed: int = 3) -> None:
    """Give every LoRA factor random values, so that a delta is not zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site in gk.sites(model).values():
            for t in site.slot_tensors().values():
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


def test_lora_on_4bit_base_has_the_gradients_of_the_dequantized_weights(base):
    """The LoRA factors on Linear4bit layers get the gradients a plain Linear holding
    dequant(quant(W)) gives them (compute in float32: the same matmuls), the quantized base is
    frozen and packed, and nothing of it is in the adapter."""
    from graftkit.io.quantize import dequantize, dequantize_model, quantized_modules
    from graftkit.layers import layer_kind

    q = gk.load_model(base, head="causal-lm", quantize=FP32)
    mods = quantized_modules(q)
    assert len(mods) == 14 and "lm_head" not in mods  # 7 projections x 2 blocks; the head stays full precision
    lin = q.model.layers[0].self_attn.q_proj
    assert isinstance(lin, bnb.nn.Linear4bit) and layer_kind(lin, "weight") == "linear"
    assert lin.weight.dtype == torch.uint8 and not lin.weight.requires_grad
    ref = gk.load_model(base, head="causal-lm", quantize=FP32)
    want = {n: dequantize(m.weight).clone() for n, m in quantized_modules(ref).items()}
    dequantize_model(ref)
    assert type(ref.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(ref.model.layers[0].self_attn.q_proj.weight, want["model.layers.0.self_attn.q_proj"], rtol=0, atol=0)
    cfg = {**LORA, "targets": ["all-linear"]}
    gk.inject(q, cfg)
    gk.inject(ref, cfg)
    trained_adapter(q)
    trained_adapter(ref)
    trainable = [n for n, p in q.named_parameters() if p.requires_grad]
    assert trainable and all(".graft_adapter." in n for n in trainable)
    ids = tiny_inputs()
    q.train(), ref.train()
    q(input_ids=ids, labels=ids).loss.backward()
    ref(input_ids=ids, labels=ids).loss.backward()
    qs, rs = gk.sites(q), gk.sites(ref)
    assert qs.keys() == rs.keys() and len(qs) == 14
    for name, site in qs.items():
        for slot in ("lora_A", "lora_B"):
            got, exp = getattr(site, slot).grad, getattr(rs[name], slot).grad
            assert got is not None and got.abs().sum() > 0, (name, slot)
            torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-6, msg=f"{name}.{slot}")
    # and the gradients differ from those against the original full-precision weights
    plain = gk.load_model(base, head="causal-lm")
    gk.inject(plain, cfg)
    trained_adapter(plain)
    plain.train()
    plain(input_ids=ids, labels=ids).loss.backward()
    site = gk.sites(plain)["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.allclose(site.lora_A.grad, qs["model.layers.0.self_attn.q_proj.weight"].lora_A.grad, rtol=1e-3, atol=1e-6)


def test_adapter_records_the_quantization_and_loads_on_the_full_precision_base(base, tmp_path):
    q = gk.load_model(base, head="causal-lm", quantize=QLORA)
    gk.inject(q, LORA)
    trained_adapter(q)
    gk.save_adapter(q, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter.json").read_text())
    rec = meta["quantization"]
    assert rec["library"] == "bitsandbytes" and rec["bits"] == 4 and rec["quant_type"] == "nf4" and rec["double_quant"] is True
    assert rec["compute_dtype"] == "bf16" and rec["blocksize"] == 64 and "model.layers.1.mlp.gate_proj.weight" in rec["quantized"]
    assert meta["target_kinds"]["model.layers.0.self_attn.q_proj.weight"] == "linear"
    saved = read_safetensors(tmp_path / "a" / "adapter.safetensors")
    assert sorted({k.rsplit(".", 1)[1] for k in saved}) == ["lora_A", "lora_B"] and len(saved) == 16  # no base tensor
    assert saved["model.layers.0.self_attn.q_proj.weight.lora_A"].shape == (4, 32)
    assert saved["model.layers.0.mlp.down_proj.weight.lora_B"].shape == (32, 4)
    # the fingerprint was taken on the 4-bit base; the full-precision base passes it once quantized the same way
    plain = gk.load_model(base, head="causal-lm")
    gk.load_adapter(plain, tmp_path / "a")
    # loaders put it back on the 4-bit base it was trained on (graft eval, graft export --native/--peft)
    from graftkit.io import apply_adapter, load_base_for, read_adapter
    from graftkit.io.quantize import quantized_modules

    again = load_base_for(read_adapter(tmp_path / "a"), base, dtype=torch.bfloat16)
    assert len(quantized_modules(again)) == 14 and again.model.embed_tokens.weight.dtype == torch.float32
    apply_adapter(again, read_adapter(tmp_path / "a"))
    ids = tiny_inputs()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, q(input_ids=ids).logits)
    assert graft_main(["export", str(tmp_path / "a"), "--base", str(base), "--native", str(tmp_path / "native")]) == 0
    assert json.loads((tmp_path / "native" / "adapter.json").read_text())["quantization"] == rec
    # the same adapter is refused on another base (a different seed)
    other = tmp_path / "other"
    tiny_llama(seed=5).save_pretrained(other)
    with pytest.raises(AdapterError, match="different base model"):
        gk.load_adapter(gk.load_model(other, head="causal-lm"), tmp_path / "a")
    # a live merge into 4-bit codes would re-quantize: refused in one line, the model unchanged
    with pytest.raises(UnsupportedError, match="export it merged") as exc:
        gk.merge_adapter(q)
    assert "\n" not in str(exc.value) and not any(s.merged for s in gk.sites(q).values())
    gk.unload(q, merge=False)
    assert gk.get_state(q) is None


def test_export_merged_folds_onto_the_dequantized_weights_in_bf16(base, tmp_path, capsys):
    """The merged export of a QLoRA adapter holds bf16(dequant(quant(W)) + delta) for the adapted
    linears, dequant(quant(W)) for the other quantized ones and the original weights elsewhere,
    computed here with bitsandbytes' own quantize_4bit / dequantize_4bit; one note says so."""
    q = gk.load_model(base, head="causal-lm", quantize=QLORA)
    gk.inject(q, LORA)
    trained_adapter(q)
    delta = gk.materialize_delta(q)
    gk.save_adapter(q, tmp_path / "a")
    capsys.readouterr()
    gk.export_merged(tmp_path / "a", base, tmp_path / "merged")
    err = capsys.readouterr().err
    notes = [ln for ln in err.splitlines() if ln.startswith("graft: note:")]
    assert len(notes) == 1 and "dequantized" in notes[0] and "NF4" in notes[0], err
    merged = read_safetensors(tmp_path / "merged" / "model.safetensors")
    original = read_safetensors(base / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    assert json.loads((tmp_path / "merged" / "config.json").read_text()).get("quantization_config") is None
    prov = json.loads((tmp_path / "merged" / "graft_provenance.json").read_text())
    assert "dequantized" in prov["folded_onto"]
    for name, w in original.items():
        if name.endswith("proj.weight"):
            data, state = BF.quantize_4bit(w.float(), blocksize=64, compress_statistics=True, quant_type="nf4")
            want = BF.dequantize_4bit(data, state).float()
            if name in delta:
                want = want + delta[name]
            assert torch.equal(merged[name], want.to(torch.bfloat16)), name
            assert not torch.equal(merged[name], (w + delta.get(name, 0)).to(torch.bfloat16)), name
        else:
            assert torch.equal(merged[name], w.to(torch.bfloat16)), name
    # the exported model computes what the quantized model with its adapter computes
    import transformers

    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    ids = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, q(input_ids=ids).logits, rtol=0.05, atol=0.05)


def test_qlora_adapter_as_a_merge_input_is_its_delta_on_the_dequantized_base(base, tmp_path, capsys):
    """In ``graft merge`` a QLoRA adapter stands for the model it trained: dequant(quant(W)) +
    delta on every quantized weight (a one-model linear merge gives exactly that), with the note."""
    q = gk.load_model(base, head="causal-lm", quantize=FP32)
    gk.inject(q, LORA)
    trained_adapter(q)
    delta = gk.materialize_delta(q)
    gk.save_adapter(q, tmp_path / "a")
    capsys.readouterr()
    out = gk.merge({"merge_method": "linear", "base_model": str(base), "dtype": "float32",
                    "models": [{"model": str(tmp_path / "a"), "parameters": {"weight": 1.0}}]}, tmp_path / "m")
    assert "dequantized" in capsys.readouterr().err
    merged = read_safetensors(out / "model.safetensors")
    original = read_safetensors(base / "model.safetensors")
    for name, w in original.items():
        if name.endswith("proj.weight"):
            data, state = BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            want = BF.dequantize_4bit(data, state) + delta.get(name, 0)
            torch.testing.assert_close(merged[name], want, rtol=0, atol=1e-6, msg=name)
        else:
            assert torch.equal(merged[name], w), name


def test_graft_train_qlora_checkpoints_resumes_and_exports(assets, tmp_path, monkeypatch, capsys):
    """A recipe with ``quantize`` trains LoRA on a 4-bit base (bf16 compute under bf16 autocast),
    checkpoints, resumes to the adapter of an uninterrupted run bit for bit, and exports the peft
    adapter, which peft loads onto its own 4-bit base with the same outputs, and a merged model."""
    base = chat_recipe(assets, tmp_path / "x", method=LORA, quantize=QLORA,
                       optim={"max_steps": 4, "batch_size": 4, "precision": "bf16", "lr": 1e-2},
                       eval={"every": 2, "limit": 8, "at_start": True}, output={"checkpoint_every": 2, "export": ["peft", "merged"]})
    full = {**base, "output": {**base["output"], "dir": str(tmp_path / "full")}}
    stopped = {**base, "output": {**base["output"], "dir": str(tmp_path / "stopped"), "export": []}}
    summary = train(parse_recipe(full), progress=False)
    assert summary["val_loss"] < summary["start_val_loss"]
    assert "dequantized" in capsys.readouterr().err  # the merged export's note
    step = Run.train_step

    def stop_at_three(self, i):
        if i == 2:
            raise KeyboardInterrupt
        return step(self, i)

    monkeypatch.setattr(Run, "train_step", stop_at_three)
    with pytest.raises(KeyboardInterrupt):
        train(parse_recipe(stopped), progress=False)
    monkeypatch.setattr(Run, "train_step", step)
    ckpt = read_safetensors(tmp_path / "stopped" / "checkpoints" / "step-000002" / "trainable.safetensors")
    assert ckpt and all("lora_" in k for k in ckpt)  # the 4-bit base is not in the checkpoint
    train(parse_recipe(stopped), resume=True, progress=False)
    assert_same_run(tmp_path / "full", tmp_path / "stopped")
    meta = json.loads((tmp_path / "full" / "adapter" / "adapter.json").read_text())
    assert meta["quantization"]["compute_dtype"] == "bf16"
    assert json.loads((tmp_path / "full" / "merged" / "config.json").read_text())["dtype"] == "bfloat16"

    # peft loads the peft export onto its own 4-bit base (transformers' BitsAndBytesConfig) and computes the same
    import peft
    import transformers

    qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                         bnb_4bit_compute_dtype=torch.bfloat16)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(assets / "llama", quantization_config=qc, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(theirs, tmp_path / "full" / "adapter-peft").eval()
    ours = gk.load_model(assets / "llama", head="causal-lm", quantize=QLORA).eval()
    gk.load_adapter(ours, tmp_path / "full" / "adapter")
    ids = torch.randint(5, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_classification_qlora_keeps_its_head_and_exports(assets, tmp_path):
    """A BERT classifier (Linear layers with biases) trains LoRA on its 4-bit encoder; the new head
    (trained whole) stays full precision, and the merged export computes what the run's model did."""
    import transformers

    from graftkit.io.quantize import quantized_modules

    r = cls_recipe(assets, tmp_path / "run", method={"method": "lora", "r": 2, "lora_alpha": 4, "targets": ["query", "value"]},
                   quantize=FP32, optim={"max_steps": 2, "epochs": 1}, eval={"every": None}, output={"export": ["merged"]})
    summary = train(parse_recipe(r), progress=False)
    assert summary["steps"] == 2 and "merged" in summary["outputs"]
    meta = json.loads((tmp_path / "run" / "adapter" / "adapter.json").read_text())
    assert "classifier.weight" in meta["train_also"]
    assert not any(n.startswith("classifier") for n in meta["quantization"]["quantized"])
    assert "bert.encoder.layer.0.attention.self.query.weight" in meta["quantization"]["quantized"]
    from graftkit.io import apply_adapter, load_base_for, read_adapter

    adapter = read_adapter(tmp_path / "run" / "adapter")
    ours = load_base_for(adapter, assets / "bert").eval()
    assert len(quantized_modules(ours)) > 0 and type(ours.classifier) is torch.nn.Linear
    apply_adapter(ours, adapter)
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "merged", dtype=torch.float32).eval()
    ids = torch.randint(1000, 2000, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0.02, atol=0.02)


# -- bad input: one line each ---------------------------------------------------------------------------

def run_cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = graft_main(["train", *map(str, args), "--no-progress"])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.mark.parametrize("method, quantize, needles", [
    ({"method": "ia3", "targets": ["k_proj", "v_proj", "down_proj"]}, QLORA, ["method 'ia3' cannot train on a 4-bit base", "use method lora"]),
    ({**LORA, "use_dora": True}, QLORA, ["LoRA with use_dora cannot train on a 4-bit base"]),
    ({"method": "full"}, QLORA, ["method 'full' cannot train on a 4-bit base"]),
    (LORA, {"bits": 8}, ["quantize.bits=8", "4 bits only"]),
    (LORA, {"quant_type": "int4"}, ["quantize", "quant_type"]),
], ids=["ia3", "dora", "full", "bits8", "quant_type"])
def test_bad_quantize_recipes_are_one_line(assets, tmp_path, capsys, method, quantize, needles):
    f = _recipe_file(tmp_path / "r.yaml", chat_recipe(assets, tmp_path / "out", method=method, quantize=quantize))
    code, _, err = run_cli(capsys, f)
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "out").exists()


def test_quantize_without_bitsandbytes_says_how_to_install(assets, base, tmp_path, capsys, monkeypatch):
    q = gk.load_model(base, head="causal-lm", quantize=QLORA)
    gk.inject(q, LORA)
    gk.save_adapter(q, tmp_path / "a")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes raises ImportError
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    f = _recipe_file(tmp_path / "r.yaml", chat_recipe(assets, tmp_path / "out", method=LORA, quantize=QLORA))
    code, _, err = run_cli(capsys, f)
    assert_one_line_error(code, err, "needs bitsandbytes", "pip install 'graftkit[gpu]'", "pip install bitsandbytes")
    # a QLoRA adapter on the full-precision base (its fingerprint check quantizes), and as a merge input
    with pytest.raises(UnsupportedError, match="QLoRA adapter .* needs bitsandbytes.*pip install") as exc:
        gk.load_adapter(gk.load_model(base, head="causal-lm"), tmp_path / "a")
    assert "\n" not in str(exc.value)
    with pytest.raises(UnsupportedError, match="needs bitsandbytes"):
        gk.merge({"merge_method": "linear", "base_model": str(base), "dtype": "float32",
                  "models": [{"model": str(tmp_path / "a"), "parameters": {"weight": 1.0}}]}, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_quantize_with_fsdp_is_refused(assets, tmp_path, capsys, monkeypatch):
    """FSDP2 cannot shard packed 4-bit weights: refused in one line before the model loads."""
    import graftkit.io.hf as hf

    monkeypatch.setattr(hf, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr("graftkit.train.fsdp.requested", lambda acc: "graftkit")
    monkeypatch.setattr("graftkit.train.fsdp.start_processes", lambda device: False, raising=False)
    f = _recipe_file(tmp_path / "r.yaml", chat_recipe(assets, tmp_path / "out", method=LORA, quantize=QLORA))
    code, _, err = run_cli(capsys, f)
    assert_one_line_error(code, err, "quantize", "FSDP2", "without --use_fsdp")


def test_conv1d_models_are_refused(tmp_path):
    from conftest import tiny_gpt2

    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedError, match="Conv1D") as exc:
        gk.load_model(tmp_path / "gpt2", head="causal-lm", quantize=QLORA)
    assert "\n" not in str(exc.value)


def test_quantize_config_parses_and_refuses(tmp_path):
    from graftkit.train.recipe import QuantizeConfig

    assert QuantizeConfig().model_dump() == {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bf16"}
    with pytest.raises(ConfigError, match="4 bits only"):
        QuantizeConfig(bits=3)
    with pytest.raises(ConfigError, match="unknown key"):
        QuantizeConfig(load_in_4bit=True)
