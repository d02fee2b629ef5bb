"""FSDP2 in ``graft train``: one sharding path (graftkit's ``fully_shard``) for CPUs and GPUs.

The multi-process runs go through ``accelerate launch --use_fsdp`` on CPU processes (gloo):
the same code a GPU run takes, since accelerate is built without its FSDP plugin on every
device. The in-process tests use a one-process group (``fsdp.start_processes``).
"""
from __future__ import annotations

import json
import os
import subprocess
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn

from graftkit.tensors import read_safetensors
from graftkit.train import fsdp, linear_ce, parse_recipe, train
from test_train import (ENV, _recipe_file, accelerate_fsdp, assert_one_process_matches, assert_same_run, assets, chat_recipe,  # noqa: F401
                        cls_recipe, kill_launch_after_checkpoints, losses)

CHECKPOINT_FILES = {"trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"}


@pytest.fixture
def one_process_group():
    """A one-process gloo group, ended after the test (as ``train`` ends the one it makes)."""
    assert fsdp.start_processes(torch.device("cpu"))
    yield
    fsdp.end_processes()


# -- one path -----------------------------------------------------------------------------------

def test_an_accelerator_that_reports_fsdp_on_cuda_is_sharded_by_graftkit(monkeypatch):
    """The path is picked the same way on every device: an accelerator that reports FSDP2 on a
    GPU (as accelerate's own plugin makes it) is sharded by graftkit, never by ``acc.prepare``."""
    from accelerate.utils import DistributedType

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    on_gpu = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True, device=torch.device("cuda", 0), num_processes=1)
    assert fsdp.requested(on_gpu) == "graftkit"
    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, is_fsdp2=False, device=torch.device("cuda", 1), num_processes=2)
    assert fsdp.requested(ddp) is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    for acc in (ddp, SimpleNamespace(distributed_type=DistributedType.NO, is_fsdp2=False, device=torch.device("cpu"), num_processes=1)):
        assert fsdp.requested(acc) == "graftkit"


def test_the_run_builds_accelerate_without_its_fsdp_plugin(assets, tmp_path, monkeypatch):
    """``Run`` builds its Accelerator while the FSDP request is hidden from accelerate (which
    would otherwise create its FSDP plugin and shard on GPUs), then sees the request itself."""
    import accelerate

    from graftkit.train.loop import Run

    seen = []

    class Spy(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            seen.append((os.environ.get("ACCELERATE_USE_FSDP"), kwargs.get("fsdp_plugin")))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(accelerate, "Accelerator", Spy)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    run = Run(parse_recipe(cls_recipe(assets, tmp_path / "out")))
    try:
        assert seen == [("false", None)]
        assert os.environ["ACCELERATE_USE_FSDP"] == "true"  # restored for transformers' loading and graftkit
        assert getattr(run.acc.state, "fsdp_plugin", None) is None and run.acc.distributed_type.name != "FSDP"
        assert run.fsdp == "graftkit" and run.own_group and torch.distributed.get_world_size() == 1
    finally:
        fsdp.end_processes()


def test_processes_without_a_group_are_refused_in_one_line(monkeypatch):
    """Several processes announced (WORLD_SIZE) but none set up by a launcher: one ConfigError
    line, not a hang or a group of one that would train on a slice of the data."""
    from graftkit.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"^WORLD_SIZE=2 but no process group was set up; start the processes with accelerate launch or torchrun$"):
        fsdp.start_processes(torch.device("cpu"))
    assert not torch.distributed.is_initialized()


def test_one_process_fsdp_shards_and_matches_the_unsharded_run(assets, tmp_path):
    """``accelerate launch --num_processes 1 --use_fsdp --fsdp_version 2`` (the command that
    crashed on a GPU) shards over a mesh of one: LoRA with the frozen-head chunked loss and the
    exact-match eval, whose losses equal an unsharded run's."""
    base = dict(method={"method": "lora", "r": 4, "lora_alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]},
                data={"answer_field": "answer"}, optim={"max_steps": 4, "batch_size": 4},
                eval={"every": 4, "exact_match": True, "max_new_tokens": 2, "limit": 4})
    sharded = _recipe_file(tmp_path / "sharded.yaml", chat_recipe(assets, tmp_path / "sharded", **base))
    res = subprocess.run(accelerate_fsdp(sharded, processes=1), env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    # 2 blocks + the root, counted on the model itself
    assert "1 process(es), FSDP2 sharded (3 modules)" in res.stdout, res.stdout[-2000:]
    train(parse_recipe(chat_recipe(assets, tmp_path / "plain", **base)), progress=False)
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "sharded")
    assert len(a) == len(b) == 4 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    evals = [json.loads(x) for x in (tmp_path / "sharded" / "metrics.jsonl").read_text().splitlines() if "val_exact_match" in x]
    assert evals
    sa = read_safetensors(tmp_path / "plain" / "adapter" / "adapter.safetensors")
    sb = read_safetensors(tmp_path / "sharded" / "adapter" / "adapter.safetensors")
    assert sa.keys() == sb.keys() and max(float((sa[k] - sb[k]).abs().max()) for k in sa) < 1e-5


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_bf16_runs_shard_in_process_and_save(assets, tmp_path, monkeypatch, capsys, kind):
    """What crashed on the GPU, in bf16 under autocast with one process: LoRA (frozen head, chunked
    loss, gradient checkpointing, exact-match eval, peft and merged exports) and full fine-tuning
    (theta0 kept beside the shards; saving gathers every unit). The library call ends the
    process group it made, so a later unsharded run in the same process is unaffected."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    out = tmp_path / "run"
    if kind == "lora":
        r = chat_recipe(assets, out, method={"method": "lora", "r": 4, "lora_alpha": 8, "targets": ["q_proj", "v_proj"]},
                        data={"answer_field": "answer"}, optim={"max_steps": 3, "precision": "bf16", "gradient_checkpointing": True},
                        eval={"every": 3, "exact_match": True, "max_new_tokens": 2, "limit": 4}, output={"export": ["peft", "merged"]})
    else:
        r = cls_recipe(assets, out, optim={"max_steps": 3, "precision": "bf16"}, eval={"every": 3}, output={"export": ["merged"]})
    summary = train(parse_recipe(r), progress=False)
    printed = capsys.readouterr().out
    units = 3 if kind == "lora" else 4  # the blocks (BERT's embeddings are one too) and the root
    assert f"1 process(es), FSDP2 sharded ({units} modules)" in printed, printed[:600]
    assert not torch.distributed.is_initialized()
    assert summary["steps"] == 3 and all(x == x for x in losses(out))
    assert (out / "merged" / "config.json").exists() and not (out / ".theta0").exists()
    saved = read_safetensors(out / "adapter" / "adapter.safetensors")
    assert saved and not any(fsdp.is_sharded(t) for t in saved.values())
    if kind == "lora":  # the frozen base held in bf16 as in an unsharded run: the same losses
        monkeypatch.delenv("ACCELERATE_USE_FSDP")
        train(parse_recipe({**r, "output": {**r["output"], "dir": str(tmp_path / "plain")}}), progress=False)
        assert "FSDP2" not in capsys.readouterr().out
        assert losses(tmp_path / "plain") == losses(out)
    if kind == "full":
        assert saved["bert.encoder.layer.0.output.dense.weight.delta"].shape == (32, 64)
        assert float(saved["bert.encoder.layer.0.output.dense.weight.delta"].abs().max()) > 0


def test_sharded_bf16_lora_holds_the_frozen_base_in_bf16(assets, tmp_path, monkeypatch):
    """As unsharded bf16 LoRA runs do (the same matmul operands without a cast per use): FSDP2
    gathers a unit whose frozen weights are bf16 and whose LoRA factors are float32, so the frozen
    base is no longer kept in float32 (twice the bytes gathered and held) when sharded."""
    from graftkit.train.loop import Run

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    r = chat_recipe(assets, tmp_path / "run", method={"method": "lora", "r": 4, "lora_alpha": 8, "targets": ["q_proj", "v_proj"]},
                    optim={"max_steps": 1, "precision": "bf16"})
    run = Run(parse_recipe(r), progress=False)
    try:
        run.setup()
        attn = run.model.model.layers[0].self_attn
        assert fsdp.is_sharded(attn.q_proj.weight) and attn.q_proj.weight.dtype == torch.bfloat16
        assert attn.o_proj.weight.dtype == torch.bfloat16  # frozen, no adapter
        assert run.named and all(p.dtype == torch.float32 for _, p in run.named)
        loss, _ = run.train_step(0)  # a step runs on the units of mixed dtype
        assert loss == loss
    finally:
        fsdp.end_processes()


# -- tensors that stay plain next to shards -----------------------------------------------------

def test_frozen_head_read_outside_its_units_forward_is_gathered(one_process_group):
    """The chunked loss reads the head's weight directly, not through the head's forward. Where
    the head is a unit of its own (accelerate's layout: the LoRA crash on GPU, 'aten.mm got mixed
    torch.Tensor and DTensor') the weight is still a shard there: it is gathered first."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    head = nn.Linear(8, 16, bias=True).requires_grad_(False)
    hidden, targets = torch.randn(5, 8, requires_grad=True), torch.randint(0, 16, (5,))
    want = linear_ce.frozen_linear_cross_entropy(hidden, head, targets)
    fully_shard(head, mesh=init_device_mesh("cpu", (1,)))
    assert fsdp.is_sharded(head.weight)
    got = linear_ce.frozen_linear_cross_entropy(hidden, head, targets)
    assert not fsdp.is_sharded(got) and torch.equal(got, want)
    got.sum().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


def test_no_cached_cast_of_a_weight_fsdp_gathers(assets, one_process_group):
    """Under bf16 autocast the frozen head's cast is cached by (id, address, version). FSDP refills
    the gathered weight every step without a version bump, possibly at the same address, so a
    cached cast could outlive a change to the shard: a sharded model's head is cast afresh, and a
    changed shard changes the loss."""
    from graftkit.train.loop import WithLoss

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(assets / "llama")
    model.requires_grad_(False)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    module = fsdp.shard(WithLoss(model, "causal-lm", False), model, torch.device("cpu"))
    ids = torch.randint(5, 100, (2, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    linear_ce._casts.clear()

    def loss() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = module(batch)[0]
        value.backward()
        return float(value.detach())

    first = loss()
    assert not linear_ce._casts  # nothing cached for a gathered weight
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)  # the shard changes in place, as a load would
    assert loss() != first
    assert not linear_ce._casts


def test_reshard_settings_come_back_after_gathering(assets, one_process_group):
    """``unsharded`` puts back the setting ``shard`` gave each unit (recorded by graftkit, not read
    from torch's private state, whose name changed between torch versions)."""
    from torch.distributed.fsdp import FSDPModule

    from graftkit.train.loop import WithLoss

    model = transformers.AutoModelForCausalLM.from_pretrained(assets / "llama")
    module = fsdp.shard(WithLoss(model, "causal-lm", False), model, torch.device("cpu"))
    flags = {id(m): getattr(m, fsdp.RESHARD) for m in module.modules() if isinstance(m, FSDPModule)}
    assert sorted(flags.values()) == [False, True, True]  # the root keeps its leftovers gathered
    with fsdp.unsharded(module):
        assert not fsdp.is_sharded(model.lm_head.weight) and not fsdp.is_sharded(model.model.layers[1].mlp.up_proj.weight)
    assert fsdp.is_sharded(model.model.layers[1].mlp.up_proj.weight)
    assert {id(m): getattr(m, fsdp.RESHARD) for m in module.modules() if isinstance(m, FSDPModule)} == flags
    ids = torch.randint(5, 100, (1, 6))
    module(dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids))
    assert fsdp.is_sharded(model.model.layers[1].mlp.up_proj.weight)  # a block resharded after its forward again


def test_full_finetuning_starting_values_are_cut_like_their_parameters(assets, tmp_path, one_process_group):
    """theta0 (full fine-tuning's starting values, for ``delta = theta - theta0``) is cut like its
    parameter - whole, it would be a second copy of the model on every GPU - memory-mapped on
    CPU, and whole again only inside ``unsharded``, where the saved delta is computed."""
    import graftkit as gk
    from graftkit.adapter import sites as adapter_sites
    from graftkit.methods.inplace import DeltaSite
    from graftkit.train.loop import WithLoss, _offload_theta0

    model = transformers.AutoModelForCausalLM.from_pretrained(assets / "llama")
    gk.inject(model, {"method": "full"})
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    module = fsdp.shard(WithLoss(model, "causal-lm", False), model, torch.device("cpu"))
    sites = [m for m in model.modules() if isinstance(m, DeltaSite)]
    assert len(sites) == len(start) > 10
    for site in sites:
        assert fsdp.is_sharded(site.theta0) and site.theta0.placements == site.base.placements, site.pname
    assert _offload_theta0(model, tmp_path / "theta0") > 0
    assert all(fsdp.is_sharded(site.theta0) for site in sites)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1.0)  # a training step, as far as the delta can tell
    with fsdp.unsharded(module):
        assert not any(fsdp.is_sharded(site.theta0) for site in sites)
        got = {name: site.delta()[site.pname] for name, site in adapter_sites(model).items()}
    assert all(fsdp.is_sharded(site.theta0) for site in sites)
    assert set(got) == set(start)
    for name, delta in got.items():
        if name == "model.layers.0.mlp.up_proj.weight":
            assert torch.allclose(delta, torch.ones_like(delta), atol=1e-6), name
        else:
            assert torch.equal(delta, torch.zeros_like(delta)), name


# -- several processes --------------------------------------------------------------------------

def test_fsdp_two_processes_match_one(assets, tmp_path):
    """FSDP2 (accelerate's FSDP config, 2 CPU processes): full fine-tuning with a new head - which
    transformers initialises on process 0 only under accelerate's RAM-efficient loading - has
    the loss curve and the saved delta of one process with the same global batch; process 0
    alone writes each checkpoint, one complete folder per checkpoint step with both processes'
    RNG states, and no temporary is left."""
    r1 = cls_recipe(assets, tmp_path / "one", optim={"batch_size": 4, "epochs": 1}, eval={"every": None})
    r2 = cls_recipe(assets, tmp_path / "two", optim={"batch_size": 2, "epochs": 1}, eval={"every": 6},
                    output={"export": ["merged"], "checkpoint_every": 4, "keep_checkpoints": 5})
    res = subprocess.run(accelerate_fsdp(_recipe_file(tmp_path / "two.yaml", r2)), env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "2 process(es), FSDP2 sharded" in res.stdout
    assert_one_process_matches(r1, tmp_path / "one", tmp_path / "two")
    a = read_safetensors(tmp_path / "one" / "adapter" / "adapter.safetensors")
    b = read_safetensors(tmp_path / "two" / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys() and len(a) > 30
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "two" / "merged")
    assert merged.classifier.weight.shape == (2, 32)
    ckpts = tmp_path / "two" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000004", "step-000008"]  # 12 steps; the last is the adapter
    for step, folder in ((4, ckpts / "step-000004"), (8, ckpts / "step-000008")):
        assert {p.name for p in folder.iterdir()} == CHECKPOINT_FILES
        assert json.loads((folder / "state.json").read_text())["step"] == step
        assert set(read_safetensors(folder / "rng.safetensors")) == {"rank0", "rank1"}
        trained = read_safetensors(folder / "trainable.safetensors")
        assert len(trained) > 30 and trained["classifier.weight"].shape == (2, 32)  # whole tensors, not shards
    leftovers = [str(p) for p in (tmp_path / "two").rglob(".*")]
    assert not leftovers, leftovers


def test_fsdp_kill_and_resume_is_bitwise_identical(assets, tmp_path):
    """FSDP2 over 2 processes, LoRA with the chunked frozen-head loss and the exact-match eval (run
    with the units gathered, on uneven shares): kill every process after the second checkpoint, resume,
    and the adapter and metrics equal an uninterrupted sharded run's bit for bit."""
    base = chat_recipe(assets, tmp_path / "x", method={"method": "lora", "r": 4, "lora_alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]},
                       data={"answer_field": "answer"}, optim={"epochs": 4, "batch_size": 4, "grad_accum": 2, "weight_decay": 0.01},
                       # 5 validation rows at batch 2: the processes' eval shares differ (2 batches vs 1)
                       eval={"every": 3, "exact_match": True, "max_new_tokens": 3, "limit": 5, "batch_size": 2}, output={"checkpoint_every": 2})
    full = _recipe_file(tmp_path / "full.yaml", {**base, "output": {**base["output"], "dir": str(tmp_path / "full")}})
    killed = _recipe_file(tmp_path / "killed.yaml", {**base, "output": {**base["output"], "dir": str(tmp_path / "killed")}})
    res = subprocess.run(accelerate_fsdp(full), env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]

    proc = accelerate_fsdp(killed, env={**ENV, "GRAFT_TEST_STEP_SLEEP": "0.3"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_launch_after_checkpoints(proc, tmp_path / "killed", 2)
    res = subprocess.run(accelerate_fsdp(killed, "--resume"), env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming from" in res.stdout
    metrics = assert_same_run(tmp_path / "full", tmp_path / "killed")
    assert any("val_exact_match" in m for m in metrics)


def test_fsdp_version_1_is_refused(assets, tmp_path):
    f = _recipe_file(tmp_path / "r.yaml", cls_recipe(assets, tmp_path / "out"))
    res = subprocess.run(accelerate_fsdp(f, version=1), env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    # a process says it in one line (the launcher then reports its failed children); the first to
    # exit makes torchrun stop the other, which may not have printed yet, so one or two such lines
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("graft: ")]
    assert 1 <= len(lines) <= 2, res.stderr[-2000:]
    assert all(ln.startswith("graft: error: graft train supports FSDP version 2 only") for ln in lines), lines
    assert "internal error" not in res.stderr
    assert not (tmp_path / "out").exists()
