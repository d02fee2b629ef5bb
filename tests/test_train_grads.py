"""Training checks that compare gradients and per-process RNG streams, not only losses (issue 11,
section 10: gradient accumulation without dividing the loss, and every process restoring
process 0's RNG state on resume, both went unnoticed)."""
from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from graftkit.train.checkpoint import load_checkpoint, restore, rng_state, save_checkpoint, snapshot
from graftkit.train.data import Order
from graftkit.train.loop import Run, _schedule
from graftkit.train.recipe import parse_recipe
from test_train import ENV, _recipe_file, assert_same_run, assets, chat_recipe, cls_recipe, kill_launch_after_checkpoints  # noqa: F401  (assets: fixture)


def first_step_grads(recipe: dict) -> dict[str, torch.Tensor]:
    """The gradients the optimizer sees at the first step of ``recipe`` (clipping off)."""
    run = Run(parse_recipe(recipe), progress=False)
    run.setup()
    seen = {}

    def capture(*args, **kwargs):
        seen.update({n: p.grad.detach().clone() for n, p in run.named if p.grad is not None})

    run.optimizer.step = capture
    run.train_step(0)
    assert seen, "the optimizer step was not reached"
    return seen


def test_accumulated_gradients_equal_the_whole_batch_gradient(assets, tmp_path):
    """Two micro-batches of 2 with grad_accum 2 hold the same 4 examples as one batch of 4
    (the order is a function of the seed and position), and the classification loss is a mean
    over examples, so the gradients agree - and are not twice as large."""
    optim = {"lr": 1e-3, "epochs": 1, "warmup_steps": 0, "max_grad_norm": None}
    whole = first_step_grads(cls_recipe(assets, tmp_path / "whole", optim={**optim, "batch_size": 4, "grad_accum": 1},
                                        eval={"every": None}))
    accum = first_step_grads(cls_recipe(assets, tmp_path / "accum", optim={**optim, "batch_size": 2, "grad_accum": 2},
                                        eval={"every": None}))
    assert whole.keys() == accum.keys() and len(whole) > 10
    assert max(float(g.abs().max()) for g in whole.values()) > 1e-3
    for name in whole:
        torch.testing.assert_close(accum[name], whole[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_causal_lm_loss_is_the_mean_over_target_tokens(grad):
    """The training loss of a causal LM is the mean cross-entropy over the tokens with a target
    (prompt and padding labels are IGNORE): the value logged, compared and clipped against."""
    from conftest import tiny_llama

    from graftkit.train.data import IGNORE
    from graftkit.train.loop import WithLoss

    model = tiny_llama()
    ids = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = IGNORE
    labels[1, :6] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE
    want = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    with torch.set_grad_enabled(grad):
        loss, n, _ = WithLoss(model, "causal-lm", False).train()(batch)
    assert int(n) == int(keep.sum()) == 5 + 3
    torch.testing.assert_close(loss.detach(), want, atol=1e-5, rtol=1e-5)


def test_restore_gives_each_process_its_own_rng_state(tmp_path):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def seed_all(s: int) -> None:
        torch.manual_seed(s)
        random.seed(s)
        np.random.seed(s)

    def draw() -> tuple:
        return torch.rand(4).tolist(), random.random(), float(np.random.rand())

    states, want = [], []
    for rank in range(3):
        seed_all(100 + rank)
        states.append(rng_state())
        want.append(draw())
    ckpt = save_checkpoint(tmp_path, 1, snapshot([("p", p)], opt), sched, states, {}, keep=2)
    for rank in (2, 1, 0):
        seed_all(0)
        restore(load_checkpoint(ckpt), [("p", p)], opt, sched, rank, 3)
        assert draw() == want[rank], rank


def test_schedule_factors(assets, tmp_path):
    """Warmup ramps (step + 1) / warmup, so the first step already trains; then linear decay to 0
    or a half cosine over the remaining steps."""
    def factors(schedule: str) -> list[float]:
        r = parse_recipe(cls_recipe(assets, tmp_path / schedule, optim={"warmup_steps": 2, "schedule": schedule}))
        f = _schedule(r, 6)
        return [round(f(s), 6) for s in range(6)]

    assert factors("linear") == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert factors("constant") == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert factors("cosine") == [0.5, 1.0, 1.0, 0.853553, 0.5, 0.146447]


def test_order_gives_the_processes_disjoint_slices_of_each_global_batch():
    n, bs, world = 20, 2, 2
    orders = [Order(n, bs, world, rank, seed=3) for rank in range(world)]
    per_epoch = orders[0].per_epoch
    assert per_epoch == 5
    for epoch in range(2):
        perm = orders[0].permutation(epoch)
        seen = []
        for pos in range(per_epoch):
            batch = [i for o in orders for i in o.micro_batch(epoch * per_epoch + pos)]
            assert batch == perm[pos * bs * world:(pos + 1) * bs * world]  # the global batch, rank 0's slice first
            seen += batch
        assert sorted(seen) == list(range(n))
    assert orders[0].permutation(0) != orders[0].permutation(1)


def _torchrun(recipe_file, *extra: str, port: int, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "graftkit.cli", "train", str(recipe_file), "--no-progress", *extra]
    return subprocess.Popen(cmd, **popen) if popen else cmd


def test_two_process_kill_and_resume_with_dropout_is_bitwise_identical(assets, tmp_path):
    """DDP over 2 processes with LoRA dropout (each process draws its own masks from its own
    stream): kill after the first checkpoint, resume, and the adapter and metrics equal an
    uninterrupted run's bit for bit - which needs each process to get back its own RNG state."""
    import os

    base = chat_recipe(assets, tmp_path / "x", method={"method": "lora", "r": 2, "lora_alpha": 4, "lora_dropout": 0.2,
                                                       "targets": ["q_proj", "v_proj"]},
                       data={"max_length": 16}, optim={"epochs": 1, "batch_size": 4, "lr": 1e-2},
                       eval={"every": None}, output={"checkpoint_every": 2})
    full = _recipe_file(tmp_path / "full.yaml", {**base, "output": {**base["output"], "dir": str(tmp_path / "full")}})
    killed = _recipe_file(tmp_path / "killed.yaml", {**base, "output": {**base["output"], "dir": str(tmp_path / "killed")}})
    port = 29500 + (os.getpid() + 13) % 1000
    res = subprocess.run(_torchrun(full, port=port), env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "2 process(es)" in res.stdout

    proc = _torchrun(killed, port=port + 1, env={**ENV, "GRAFT_TEST_STEP_SLEEP": "0.5"}, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    kill_launch_after_checkpoints(proc, tmp_path / "killed", 1)
    res = subprocess.run(_torchrun(killed, "--resume", port=port + 2), env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming from" in res.stdout
    assert_same_run(tmp_path / "full", tmp_path / "killed")
