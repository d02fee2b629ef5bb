"""``graft train`` with the adapter family (activation-space methods and LN tuning).

Tiny models (built in code, as in test_train.py): the first step's gradients of a bottleneck
adapter equal those of a hand-written loss over a hand-written adapter forward; gradient
checkpointing (hooks re-run in the recompute) gives the same gradients; an interrupted run
resumes to the same adapter; bf16; the peft / merged exports refused up front.
Real models (marked ``real``): every family lowers the loss of MiniLM on BBC News and of
SmolLM2 on gsm_symbolic in a few steps.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import graftkit as gk
from graftkit.registry import METHODS
from graftkit.tensors import read_safetensors
from graftkit.train import parse_recipe, train
from graftkit.train.data import IGNORE
from graftkit.train.loop import Run
from test_train import (_recipe_file, assert_one_line_error, assert_same_run, assets, chat_recipe, cls_recipe,  # noqa: F401  (assets: fixture)
                        losses, run_cli)

#: every family trained here (compose: the unified view's parallel adapter on the FFN plus LoRA
#: on attention, as in its MAM adapter)
FAMILIES = ("houlsby", "pfeiffer", "parallel_adapter", "compacter", "compacter_pp", "ln_tuning", "compose")
PHM = ("compacter", "compacter_pp")


def options(family: str, arch: str = "bert", real: bool = False, layers=None) -> dict:
    """The method config of ``family`` for a BERT or Llama model. Tiny models (hidden 32):
    reduction factor 4 and a random start where a method has ``init_weights``, so that the
    down-projections get a gradient at the first step too; real models: the papers' usual
    reduction factor 16 and the identity start. ``layers``: adapt only these blocks."""
    where = {"layers": layers} if layers is not None else {}
    if family == "ln_tuning":
        return {"method": family, **where}
    if family == "compose":
        lora = {"method": "lora", "r": 4, "lora_alpha": 8, "targets": ["query", "value"] if arch == "bert" else ["q_proj", "v_proj"], **where}
        return {"method": "compose", "methods": [options("parallel_adapter", arch, real, layers), lora]}
    o = {"method": family, "reduction_factor": 16 if real else 4, **where}
    if family in PHM:
        o["phm_dim"] = 4
    if not real:
        o["init_weights"] = False
    return o


def family_names() -> list[str]:
    return [n for n in FAMILIES if n in METHODS]


def test_every_adapter_family_is_trained_here():
    """A newly registered activation-space method (or LN tuning) gets a row in FAMILIES, so the
    loop is checked with it (sequence-space methods have their own tests)."""
    from graftkit.methods import registered_methods

    # MeteoRA trains gates over LoRA experts it reads from adapter folders: tests/test_meteora.py builds the experts
    # and trains its gates with graft train (the real-model rows here would have no experts to route between)
    trained_elsewhere = {"meteora"}
    missing = [m.name for m in registered_methods()
               if (m.space == "activation" or m.name == "ln_tuning") and m.name not in FAMILIES and m.name not in trained_elsewhere]
    assert not missing, f"add {missing} to FAMILIES"


def first_step(recipe: dict, count=None) -> tuple[Run, dict[str, torch.Tensor]]:
    """The run after setup, and the gradients its optimizer sees at the first step (clipping off);
    ``count``: a module name whose forward calls are counted into ``run.calls``."""
    run = Run(parse_recipe(recipe), progress=False)
    run.setup()
    seen: dict[str, torch.Tensor] = {}
    run.calls = 0
    if count is not None:
        def counter(*_):
            run.calls += 1

        run.model.get_submodule(count).register_forward_pre_hook(counter)

    def capture(*args, **kwargs):
        seen.update({n: p.grad.detach().clone() for n, p in run.named if p.grad is not None})

    run.optimizer.step = capture
    run.train_step(0)
    assert seen, "the optimizer step was not reached"
    return run, seen


NO_CLIP = {"lr": 1e-3, "max_grad_norm": None, "warmup_steps": 0}
#: first_step replaces optimizer.step, which the scheduler notices
QUIET_STEP = pytest.mark.filterwarnings("ignore:Seems like:UserWarning")


@QUIET_STEP
def test_first_step_gradients_equal_a_hand_computed_loss(assets, tmp_path):
    """Houlsby on a tiny Llama, two micro-batches: the loop's gradients of every adapter tensor
    equal those of the mean token cross-entropy over the response tokens, averaged over the
    micro-batches, through adapters written here with plain hooks on a fresh copy of the base
    (``o_proj`` and ``mlp`` outputs ``h -> h + W_up silu(W_down h + b_down) + b_up``)."""
    recipe = chat_recipe(assets, tmp_path / "run", method={"method": "houlsby", "reduction_factor": 4, "init_weights": False},
                         optim={**NO_CLIP, "batch_size": 2, "grad_accum": 2}, eval={"every": None})
    run, got = first_step(recipe)
    holder = ".graft_adapter.module."
    adapted = sorted({n.split(holder)[0] for n in got if holder in n})
    assert len(adapted) == 4 and {a.rsplit(".", 1)[-1] for a in adapted} == {"o_proj", "mlp"}
    assert set(got) == {f"{m}{holder}{s}" for m in adapted for s in ("adapter_down", "adapter_down_bias", "adapter_up", "adapter_up_bias")}

    base = gk.load_model(assets / "llama", head="causal-lm").train()
    for p in base.parameters():
        p.requires_grad_(False)
    modules = dict(base.named_modules())
    mine: dict[str, torch.Tensor] = {}
    for m in adapted:
        t = {s: run.model.get_parameter(f"{m}{holder}{s}").detach().clone().requires_grad_(True)
             for s in ("adapter_down", "adapter_down_bias", "adapter_up", "adapter_up_bias")}
        mine.update({f"{m}{holder}{s}": v for s, v in t.items()})

        def hook(module, args, out, t=t):
            z = torch.nn.functional.silu(out @ t["adapter_down"].T + t["adapter_down_bias"])
            return out + z @ t["adapter_up"].T + t["adapter_up_bias"]

        modules[m].register_forward_hook(hook)
    total = 0.0
    for k in range(2):
        b = run.micro_batch(k)
        logits = base(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        targets = b["labels"][:, 1:]
        keep = targets != IGNORE
        total = total + torch.nn.functional.cross_entropy(logits[keep], targets[keep]) / 2
    want = dict(zip(mine, torch.autograd.grad(total, list(mine.values()))))
    for name in got:
        assert float(want[name].abs().max()) > 1e-6, name
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-4, msg=name)


@QUIET_STEP
@pytest.mark.parametrize("family", family_names())
def test_gradient_checkpointing_gives_the_same_gradients(assets, tmp_path, family):
    """The adapters' hooks run again in the recomputed forward of a checkpointed block; the
    gradients (adapter tensors and, for a classifier, the head) are those of a plain step."""
    grads = []
    for gc in (False, True):
        r = cls_recipe(assets, tmp_path / str(gc), method=options(family),
                       optim={**NO_CLIP, "gradient_checkpointing": gc}, eval={"every": None})
        run, got = first_step(r, count="bert.encoder.layer.0.attention")
        assert run.calls == (2 if gc else 1)  # checkpointed: the block ran again in the backward pass
        grads.append(got)
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and any(not n.startswith("classifier.") for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def val_loss_by_hand(model_dir: Path, adapter: Path, validation: list[dict]) -> float:
    """Mean response-token cross-entropy of the base with the saved adapter loaded."""
    model = gk.load_model(model_dir, head="causal-lm").eval()
    gk.load_adapter(model, adapter)
    tok_sum, n = 0.0, 0
    with torch.no_grad():
        for ex in validation:
            ids = torch.tensor([ex["input_ids"]])
            labels = torch.tensor(ex["labels"][1:])
            keep = labels != IGNORE
            logits = model(input_ids=ids).logits[0, :-1]
            tok_sum += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            n += int(keep.sum())
    return tok_sum / n


@pytest.mark.parametrize("method, slot", [
    ({"method": "pfeiffer", "reduction_factor": 4, "train_layer_norm": True}, "mlp.graft_adapter.module.adapter_up"),
    ({"method": "compacter", "reduction_factor": 4, "phm_dim": 4, "train_layer_norm": True}, "graft_adapter.module.phm_rule"),
], ids=["pfeiffer", "compacter"])
def test_interrupted_run_resumes_to_the_same_adapter(assets, tmp_path, monkeypatch, method, slot):
    """Pfeiffer / Compacter (one PHM rule shared by every adapter) plus the blocks' RMSNorm weights
    (train_layer_norm): a run stopped after its checkpoint at step 4 and resumed saves the
    adapter of an uninterrupted run, bit for bit, and logs the same metrics; the checkpoint holds
    the adapter's tensors; the saved adapter reproduces the logged validation loss on a fresh base."""
    base = chat_recipe(assets, tmp_path / "x", method=method, optim={"max_steps": 8, "batch_size": 4, "schedule": "cosine", "warmup_steps": 2},
                       eval={"every": 4, "limit": 8}, output={"checkpoint_every": 4})
    full = {**base, "output": {**base["output"], "dir": str(tmp_path / "full")}}
    stopped = {**base, "output": {**base["output"], "dir": str(tmp_path / "stopped")}}
    summary = train(parse_recipe(full), progress=False)

    step = Run.train_step

    def stop_at_six(self, i):
        if i == 5:
            raise KeyboardInterrupt
        return step(self, i)

    monkeypatch.setattr(Run, "train_step", stop_at_six)
    with pytest.raises(KeyboardInterrupt):
        train(parse_recipe(stopped), progress=False)
    monkeypatch.setattr(Run, "train_step", step)
    assert json.loads((tmp_path / "stopped" / "run.json").read_text())["status"] == "interrupted"
    ckpt = read_safetensors(tmp_path / "stopped" / "checkpoints" / "step-000004" / "trainable.safetensors")
    assert any(k.endswith(slot) for k in ckpt)
    assert any(k.endswith("post_attention_layernorm.weight") for k in ckpt)
    train(parse_recipe(stopped), resume=True, progress=False)
    metrics = assert_same_run(tmp_path / "full", tmp_path / "stopped")
    assert len([m for m in metrics if "val_loss" in m]) == 2

    saved = read_safetensors(tmp_path / "full" / "adapter" / "adapter.safetensors")
    assert any(".mlp.adapter_" in k for k in saved) and any(k.endswith("input_layernorm.weight.delta") for k in saved)
    from graftkit.train.data import prepare

    data = prepare(parse_recipe(full), gk.load_tokenizer(assets / "llama"), 64)
    assert val_loss_by_hand(assets / "llama", tmp_path / "full" / "adapter", data.validation) == pytest.approx(summary["val_loss"], rel=1e-4)


def test_bf16_with_gradient_checkpointing_trains_and_saves_float32(assets, tmp_path):
    """Under bf16 autocast with checkpointed blocks a Houlsby run lowers the validation loss
    (evaluated with the adapter attached) and saves float32 adapter tensors."""
    r = chat_recipe(assets, tmp_path / "run", method={"method": "houlsby", "reduction_factor": 4},
                    optim={"max_steps": 12, "lr": 1e-2, "precision": "bf16", "gradient_checkpointing": True},
                    eval={"every": None, "at_start": True, "limit": 16})
    s = train(parse_recipe(r), progress=False)
    assert s["val_loss"] < s["start_val_loss"] - 0.15  # 10.35 -> 10.06 (a random tiny model: near ln(vocab))
    saved = read_safetensors(tmp_path / "run" / "adapter" / "adapter.safetensors")
    assert saved and all(t.dtype == torch.float32 for t in saved.values())
    assert any(float(t.abs().max()) > 0 for k, t in saved.items() if k.endswith("adapter_up"))  # the zero init moved


def test_fsdp_units_keep_blocks_that_share_a_tensor_together(assets):
    """Compacter shares one PHM rule across all blocks: FSDP2 cannot split a parameter between
    units, so the blocks form one unit; Houlsby's blocks share nothing and stay one unit each.
    graftkit shards on GPUs too (one path), so this holds there as well."""
    from graftkit.train.fsdp import block_classes, units

    for family, want in (("compacter", [2]), ("houlsby", [1, 1])):
        model = gk.load_model(assets / "llama", head="causal-lm")
        gk.inject(model, options(family, "llama"))
        assert [len(u) for u in units(model, block_classes(model))] == want, family


def test_fsdp_compacter_two_processes_match_one(assets, tmp_path):
    """FSDP2 over 2 CPU processes with Compacter (its shared rule in a unit of its own blocks):
    the losses and the saved adapter of one process with the same global batch."""
    import subprocess

    from test_train import ENV, accelerate_fsdp

    method = options("compacter")
    one = cls_recipe(assets, tmp_path / "one", method=method, optim={"batch_size": 4, "max_steps": 4}, eval={"every": None})
    two = cls_recipe(assets, tmp_path / "two", method=method, optim={"batch_size": 2, "max_steps": 4}, eval={"every": None})
    res = subprocess.run(accelerate_fsdp(_recipe_file(tmp_path / "two.yaml", two)), env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "FSDP2 sharded" in res.stdout
    train(parse_recipe(one), progress=False)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 4 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    sa = read_safetensors(tmp_path / "one" / "adapter" / "adapter.safetensors")
    sb = read_safetensors(tmp_path / "two" / "adapter" / "adapter.safetensors")
    assert sa.keys() == sb.keys() and any(k.endswith("phm_rule") for k in sa)
    assert max(float((sa[k] - sb[k]).abs().max()) for k in sa) < 1e-4


@pytest.mark.parametrize("export, needles", [
    ("peft", ("output.export peft", "peft has no format for 'houlsby'")),
    ("merged", ("output.export merged", "houlsby adapter has none")),
])
def test_exports_an_activation_adapter_lacks_are_refused_up_front(assets, tmp_path, capsys, export, needles):
    f = _recipe_file(tmp_path / "r.yaml", cls_recipe(assets, tmp_path / "out", method={"method": "houlsby"}, output={"export": [export]}))
    code, _, err = run_cli(capsys, f)
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "out").exists()


# -- the real models ------------------------------------------------------------------------------

#: slots that start at zero (identity init; LN tuning's delta), so a non-zero value means the
#: loss's gradient reached that tensor and the optimizer moved it
ZERO_AT_START = ("adapter_up", "adapter_up_t", "lora_B", "delta")


@pytest.fixture(scope="module")
def shared_loads():
    """``gk.load_model`` answered from one load per (model, head, labels): every family's run gets
    a fresh copy of the same weights (and, for classification, the same new head) without
    reading MiniLM or SmolLM2 again."""
    original = gk.load_model
    cache: dict = {}

    def load(name, *args, **kwargs):
        key = (str(name), repr(args), repr(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = original(name, *args, **kwargs)
        return copy.deepcopy(cache[key])

    mp = pytest.MonkeyPatch()
    mp.setattr(gk, "load_model", load)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def real_data(tmp_path_factory) -> Path:
    """10 BBC News articles (2 per topic) and 2 short gsm_symbolic chats, each used as its own
    validation set: the check is that training fits them, in a few steps."""
    import reasoning_gym

    from graftkit.data import bbc_news

    root = tmp_path_factory.mktemp("real_adapters")
    per: dict[str, list] = {}
    for text, label in bbc_news():
        if len(per.setdefault(label, [])) < 2:
            per[label].append({"text": text, "label": label})
    (root / "bbc.jsonl").write_text("".join(json.dumps(r) + "\n" for rows in per.values() for r in rows))
    chats = [{"prompt": x["question"].split(". ")[0] + ".", "response": x["metadata"]["answer_cot"]}
             for x in reasoning_gym.create_dataset("gsm_symbolic", size=2, seed=1)]
    (root / "gsm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    return root


def assert_learned(out: Path, summary: dict, before: float) -> None:
    """The validation loss (the training set itself) fell by more than noise, and every tensor
    that starts at zero moved: the gradient reached each adapter, not only the new head."""
    assert summary["val_loss"] < before - 0.05, (before, summary["val_loss"])
    saved = read_safetensors(out / "adapter" / "adapter.safetensors")
    moved = {k: float(t.abs().max()) for k, t in saved.items() if k.rsplit(".", 1)[-1] in ZERO_AT_START}
    assert moved and all(v > 0 for v in moved.values()), [k for k, v in moved.items() if v == 0][:3]


@pytest.mark.real
@pytest.mark.parametrize("family", family_names())
def test_minilm_bbc_loss_goes_down(shared_loads, real_data, tmp_path, family):
    out = tmp_path / "run"
    r = {"model": "minilm", "task": "classification",
         "data": {"train": str(real_data / "bbc.jsonl"), "validation": str(real_data / "bbc.jsonl"), "max_length": 48},
         "method": options(family, "bert", real=True), "optim": {"lr": 1e-2, "batch_size": 5, "max_steps": 4, "warmup_steps": 0},
         "eval": {"every": None, "at_start": True}, "output": {"dir": str(out)}}
    s = train(parse_recipe(r), progress=False)
    assert_learned(out, s, s["start_val_loss"])


@pytest.mark.real
@pytest.mark.parametrize("family", family_names())
def test_smollm2_gsm_loss_goes_down(shared_loads, real_data, tmp_path, family):
    """Causal LM, response-only loss, adapters in the top two of 30 blocks (the backward pass
    stops there). One batch holds both examples, so the first step's loss is the validation
    loss before training (Llama has no dropout)."""
    out = tmp_path / "run"
    r = {"model": "smollm2", "task": "causal-lm",
         "data": {"train": str(real_data / "gsm.jsonl"), "validation": str(real_data / "gsm.jsonl"), "prompt_field": "prompt",
                  "response_field": "response", "max_length": 64},
         "method": options(family, "llama", real=True, layers="top:2"), "optim": {"lr": 1e-2, "batch_size": 2, "max_steps": 3, "warmup_steps": 0},
         "eval": {"every": None}, "output": {"dir": str(out)}}
    s = train(parse_recipe(r), progress=False)
    assert_learned(out, s, s["first_loss"])
