"""``init_from`` (PVP): a run's adapter starts from a saved one, checked for method, base and shape,
and the saved adapter records its lineage. Tiny models from test_train's ``assets``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

import graftkit as gk
from graftkit.train import parse_recipe, train
from graftkit.train.lineage import _digest
from test_train import _recipe_file, assert_one_line_error, assets, chat_recipe, cls_recipe, run_cli  # noqa: F401  (fixture)

LORA = {"method": "lora", "r": 4, "lora_alpha": 8, "targets": ["query", "value"]}
HOULSBY = {"method": "houlsby", "reduction_factor": 4}
PROMPT = {"method": "prompt_tuning", "num_virtual_tokens": 4}
PTUNING = {"method": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 16}
PREFIX = {"method": "prefix_tuning", "num_virtual_tokens": 3, "prefix_projection": True, "encoder_hidden_size": 16}
QUICK = {"optim": {"lr": 1e-2, "batch_size": 8, "max_steps": 4}, "eval": {"every": None}}


def quick_cls(assets: Path, out: Path, method: dict, **over) -> dict:
    r = cls_recipe(assets, out, method=method, **QUICK)
    r.update(over)
    return r


@pytest.fixture(scope="module")
def sources(assets, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Trained source adapters: (run folder, summary) for LoRA and Houlsby on the tiny BERT and LoRA on the tiny Llama."""
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for name, method in (("lora", LORA), ("houlsby", HOULSBY), ("prompt", PROMPT), ("ptuning", PTUNING)):
        run = root / name
        out[name] = run, train(quick_cls(assets, run, method), progress=False)
    for name, method in (("chat", None), ("chat_prompt", PROMPT), ("chat_prefix", PREFIX)):
        run = root / name
        r = chat_recipe(assets, run, optim={"max_steps": 4}, eval={"every": None})
        if method:
            r["method"] = method
        out[name] = run, train(r, progress=False)
    return out


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("which", ["lora", "houlsby", "prompt", "ptuning", "chat", "chat_prompt", "chat_prefix"])
def test_init_from_reproduces_the_source_at_step_0(assets, sources, tmp_path, which):
    src, summary = sources[which]
    out = tmp_path / "run"
    if which.startswith("chat"):
        r = chat_recipe(assets, out, optim={"max_steps": 1}, eval={"every": None, "at_start": True})
        if which != "chat":
            r["method"] = PROMPT if which == "chat_prompt" else PREFIX
    else:
        r = quick_cls(assets, out, {"lora": LORA, "houlsby": HOULSBY, "prompt": PROMPT, "ptuning": PTUNING}[which])
        r["eval"] = {"every": None, "at_start": True}
        r["optim"] = {**r["optim"], "max_steps": 1}
    r["init_from"] = str(src / "adapter")
    from rich.console import Console

    console = Console(record=True, width=400)
    s = train(r, progress=False, console=console)
    # a prefix MLP (prefix_projection) is saved folded: the run goes on from the folded prefix, and says so
    assert ("replace this run's reparameterisation" in console.export_text()) is (which == "chat_prefix")
    step0 = metrics(out)[0]
    assert step0["step"] == 0
    # the source's own final evaluation, on the same validation rows: the same model, so the same loss
    assert step0["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-6, abs=1e-7)
    assert s["start_val_loss"] == pytest.approx(summary["val_loss"], rel=1e-6, abs=1e-7)
    # a fresh run of the same recipe starts elsewhere (the check above is not vacuous)
    fresh = tmp_path / "fresh"
    r2 = {**r, "output": {"dir": str(fresh)}}
    del r2["init_from"]
    assert train(r2, progress=False)["start_val_loss"] != pytest.approx(summary["val_loss"], rel=1e-4)
    # lineage: the source's path, hash, method and base fingerprint
    meta = json.loads((out / "adapter" / "adapter.json").read_text())
    lin = meta["lineage"]["init_from"]
    src_meta = json.loads((src / "adapter" / "adapter.json").read_text())
    assert lin["path"] == str((src / "adapter").resolve())
    assert lin["sha256"] == _digest(src / "adapter") and len(lin["sha256"]) == 64
    assert lin["method"] == src_meta["method"] == meta["method"]
    assert lin["base_fingerprint"] == src_meta["base_model"]["fingerprint"]["structure"]
    assert "lineage" not in src_meta  # a run without init_from records none
    # the run's identity follows the source's contents
    assert json.loads((out / "run.json").read_text())["inputs"]["init_from"] == lin["sha256"]


def test_init_from_a_run_folder_and_a_peft_folder(assets, sources, tmp_path):
    """A ``graft train`` output folder stands for its adapter; a peft folder works too (no fingerprint: a warning)."""
    src, summary = sources["chat"]
    peft_dir = tmp_path / "peft"
    model = gk.load_model(assets / "llama", head="causal-lm")
    gk.load_adapter(model, src / "adapter")
    gk.save_adapter(model, peft_dir, format="peft")
    for i, path in enumerate([src, peft_dir]):
        out = tmp_path / f"run{i}"
        r = chat_recipe(assets, out, optim={"max_steps": 1}, eval={"every": None, "at_start": True}, init_from=str(path))
        s = train(r, progress=False)
        assert s["start_val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    assert json.loads((tmp_path / "run1" / "adapter" / "adapter.json").read_text())["lineage"]["init_from"]["base_fingerprint"] is None


def test_a_head_for_other_labels_starts_fresh(assets, sources, tmp_path):
    """A classifier trained on other labels is not copied (its rows would mean other classes); the adapter is."""
    src, _ = sources["lora"]
    rows = [json.loads(x) for x in (assets / "cls_train.jsonl").read_text().splitlines()]
    data = tmp_path / "other.jsonl"
    data.write_text("".join(json.dumps({"text": r["text"], "label": {"pos": "yes", "neg": "no"}[r["label"]]}) + "\n" for r in rows))
    r = quick_cls(assets, tmp_path / "run", LORA, init_from=str(src))
    r["data"] = {**r["data"], "train": str(data), "validation": None}
    from graftkit.train.loop import Run
    from rich.console import Console

    run = Run(parse_recipe(r), console=Console(quiet=True), progress=False)
    run.setup()
    assert any("starts fresh" in w for w in run.warnings)
    saved = gk.read_adapter(src / "adapter").tensors
    state = dict(run.model.named_parameters())
    key = "bert.encoder.layer.0.attention.self.query.weight.lora_A"
    assert torch.equal(state["bert.encoder.layer.0.attention.self.query.graft_adapter.weight.lora_A"], saved[key])
    assert not torch.equal(state["classifier.weight"], saved["classifier.weight.value"])


# -- bad input: one line, exit 2 -----------------------------------------------------------------

@pytest.fixture(scope="module")
def other_base(tmp_path_factory) -> Path:
    """The tiny BERT's architecture with other weights: another pretrained model."""
    root = tmp_path_factory.mktemp("other_base")
    tok = gk.load_tokenizer("minilm")
    torch.manual_seed(123)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    transformers.BertModel(cfg).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    return root / "bert"


@pytest.mark.parametrize("case, needles", [
    ("not_adapter", ["init_from", "neither a graftkit adapter"]),
    ("missing", ["init_from", "does not exist"]),
    ("method", ["init_from", "is a lora adapter but this recipe trains houlsby"]),
    ("rank", ["init_from", "lora_A", "(4, 32) there but (8, 32)", "r 4 there, 8 here"]),
    ("width", ["init_from", "reduction_factor 4 there, 2 here"]),
    ("targets", ["init_from", "no tensors for", "use the targets it was trained with"]),
    ("prompt_length", ["init_from", "prompt_embeddings", "(4, 32) there but (6, 32)", "num_virtual_tokens 4 there, 6 here"]),
    ("base", ["init_from", "different base model", "fingerprint"]),
])
def test_init_from_refuses(assets, sources, other_base, tmp_path, capsys, case, needles):
    lora, houlsby = sources["lora"][0], sources["houlsby"][0]
    r = quick_cls(assets, tmp_path / "out", LORA, init_from=str(lora))
    if case == "not_adapter":
        (tmp_path / "empty").mkdir()
        r["init_from"] = str(tmp_path / "empty")
    elif case == "missing":
        r["init_from"] = str(tmp_path / "nope")
    elif case == "method":
        r["method"] = HOULSBY
    elif case == "rank":
        r["method"] = {**LORA, "r": 8}
    elif case == "width":
        r["method"] = {**HOULSBY, "reduction_factor": 2}
        r["init_from"] = str(houlsby)
    elif case == "targets":
        r["method"] = {**LORA, "targets": ["query", "value", "key"]}
    elif case == "prompt_length":
        r["method"] = {**PROMPT, "num_virtual_tokens": 6}
        r["init_from"] = str(sources["prompt"][0])
    elif case == "base":
        r["model"] = str(other_base)
    code, _, err = run_cli(capsys, _recipe_file(tmp_path / "r.yaml", r))
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "out" / "adapter").exists()


def test_a_source_head_this_run_does_not_train_is_named(assets, sources, tmp_path):
    """The chat source trained lm_head whole; a run without train_also says it does not copy it."""
    from rich.console import Console

    from graftkit.train.loop import Run

    r = chat_recipe(assets, tmp_path / "run", optim={"max_steps": 1}, init_from=str(sources["chat"][0]))
    r["method"] = {k: v for k, v in r["method"].items() if k != "train_also"}
    run = Run(parse_recipe(r), console=Console(quiet=True), progress=False)
    run.setup()
    assert any("also trained lm_head.weight whole" in w for w in run.warnings), run.warnings
