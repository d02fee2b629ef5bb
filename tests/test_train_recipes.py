"""The fine-tuning recipes from the literature each do what they say (tiny models)."""
from __future__ import annotations

import pytest
import torch

import graftkit as gk
from graftkit.errors import ConfigError
from graftkit.train import parse_recipe
from graftkit.train.data import IGNORE, collate
from graftkit.train.hft import groups, unit_of
from graftkit.train.layerwise import depth
from graftkit.train.loop import Run, WithLoss
from graftkit.train.masked_thought import mask_thought
from graftkit.train.multitask import balanced_loss
from graftkit.train.rtuning import QUESTION, SURE, UNSURE, build_rtuning_rows, generate_answers, greedy_predictor, is_correct
from test_train import assets, chat_recipe, cls_recipe  # noqa: F401  (fixture)


def make_run(recipe: dict) -> Run:
    from rich.console import Console

    run = Run(parse_recipe(recipe), console=Console(quiet=True), progress=False)
    run.setup()
    return run


def values(run: Run) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in run.model.named_parameters()}


# -- layer-wise LR decay, freezing, re-initialization --------------------------------------------

def test_layerwise_lr_decay_gives_each_layer_its_rate(assets, tmp_path):
    run = make_run(cls_recipe(assets, tmp_path / "o", layerwise={"lr_decay": 0.5}, optim={"lr": 1e-3, "weight_decay": 0.0}))
    lr_of = {n: g["initial_lr"] for g in run.optimizer.param_groups for n in g["names"]}
    assert lr_of["classifier.weight"] == pytest.approx(1e-3)
    assert lr_of["bert.pooler.dense.weight"] == pytest.approx(1e-3)
    assert lr_of["bert.encoder.layer.1.attention.self.query.weight"] == pytest.approx(1e-3 * 0.5)
    assert lr_of["bert.encoder.layer.0.output.dense.bias"] == pytest.approx(1e-3 * 0.25)
    assert lr_of["bert.embeddings.word_embeddings.weight"] == pytest.approx(1e-3 * 0.125)
    assert len(lr_of) == len(run.named)
    # the rates the scheduler applies keep those ratios (warm-up scales every group alike)
    run.train_step(0)
    after = {n: g["lr"] for g in run.optimizer.param_groups for n in g["names"]}
    assert after["bert.encoder.layer.0.output.dense.bias"] / after["classifier.weight"] == pytest.approx(0.25)
    assert depth("model.layers.3.mlp.up_proj.graft_adapter.weight.lora_A", 4) == 1


def test_freeze_bottom_layers(assets, tmp_path):
    run = make_run(cls_recipe(assets, tmp_path / "o", layerwise={"freeze_bottom": 1}))
    names = {n for n, _ in run.named}
    assert not any(n.startswith(("bert.embeddings.", "bert.encoder.layer.0.")) for n in names)
    assert any(n.startswith("bert.encoder.layer.1.") for n in names) and "classifier.weight" in names
    before = values(run)
    for s in range(3):
        run.train_step(s)
    after = values(run)
    for n in before:
        frozen = n.startswith(("bert.embeddings.", "bert.encoder.layer.0."))
        assert torch.equal(before[n], after[n]) == frozen, n


def test_reinit_top_layers_and_delta_stays_relative_to_pretrained(assets, tmp_path):
    base = gk.load_model(assets / "bert", head="classification", num_labels=2)
    run = make_run(cls_recipe(assets, tmp_path / "o", layerwise={"reinit_top": 1}, optim={"max_steps": 2}, eval={"every": None}))
    now = dict(run.model.named_parameters())
    w = "bert.encoder.layer.1.attention.self.query.weight"
    assert not torch.equal(now[w], dict(base.named_parameters())[w])
    assert now[w].std().item() == pytest.approx(0.02, rel=0.2)  # the model's initializer_range
    assert torch.equal(now["bert.encoder.layer.1.output.LayerNorm.weight"], torch.ones(32))
    assert torch.equal(now["bert.encoder.layer.0.attention.self.query.weight"], dict(base.named_parameters())["bert.encoder.layer.0.attention.self.query.weight"])
    run.fit()
    gk.load_adapter(base, tmp_path / "o" / "adapter")  # onto the original pretrained base
    trained = dict(run.acc.unwrap_model(run.module).model.named_parameters())
    for n, p in base.named_parameters():
        if "graft_adapter" not in n:
            assert torch.allclose(p, trained[n], atol=1e-6), n


def test_reinit_top_refuses_lora(assets, tmp_path):
    with pytest.raises(ConfigError, match="not trained in place"):
        make_run(cls_recipe(assets, tmp_path / "o", layerwise={"reinit_top": 1}, method={"method": "lora", "targets": ["query"]}))


# -- Half Fine-Tuning -----------------------------------------------------------------------------

def test_hft_freezes_half_of_each_group_and_redraws_each_stage(assets, tmp_path):
    run = make_run(chat_recipe(assets, tmp_path / "o", method={"method": "full"}, hft={"stage_steps": 2}, optim={"max_steps": 4}))
    hft = run.hft
    gs = groups([n for n, _ in run.named])
    assert set(gs) == {(0, "attention"), (0, "mlp"), (1, "attention"), (1, "mlp")}
    assert len(gs[(0, "attention")]) == 4 and len(gs[(0, "mlp")]) == 5  # q k v o; gate up down + 2 norms
    s0, s1 = hft.frozen_units(0), hft.frozen_units(2)
    assert hft.frozen_units(1) == s0
    for units in gs.values():
        assert sum(u in s0 for u in units) == round(len(units) / 2)
    assert s0 != s1
    # one stage: frozen units do not move, the others (and everything outside the blocks) do
    before = values(run)
    run.train_step(0)
    run.train_step(1)
    after = values(run)
    trained = {n for n, _ in run.named}
    for n in trained:
        moved = not torch.equal(before[n], after[n])
        assert moved != (unit_of(n) in s0), n
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])


def test_hft_with_lora_freezes_a_and_b_together(assets, tmp_path):
    run = make_run(chat_recipe(assets, tmp_path / "o", hft={"stage_steps": 1}, optim={"max_steps": 2}))
    frozen = run.hft.frozen_units(0)
    assert frozen and all(u.endswith(".weight") and ".graft_adapter." not in u for u in frozen)
    before = values(run)
    run.train_step(0)
    after = values(run)
    for n, _ in run.named:
        if unit_of(n) in frozen:
            assert torch.equal(before[n], after[n]), n
        elif n.endswith("lora_B"):  # B starts at zero, so only B moves on the first step
            assert not torch.equal(before[n], after[n]), n


# -- Masked Thought -------------------------------------------------------------------------------

def test_masked_thought_masks_the_stated_fraction_of_response_inputs_only():
    g = torch.Generator().manual_seed(0)
    examples = []
    for i in range(64):
        n_prompt, n_resp = 10 + i % 5, 40 + i % 7
        ids = torch.randint(5, 90, (n_prompt + n_resp,)).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE] * n_prompt + ids[n_prompt:]})
    batch = collate(examples, pad_id=0)
    out = mask_thought(batch, 0.3, mask_id=3, generator=g)
    response = batch["labels"] != IGNORE
    masked = out["input_ids"] != batch["input_ids"]
    assert (out["input_ids"][masked] == 3).all()
    assert not (masked & ~response).any()  # prompt and padding untouched
    frac = masked.sum().item() / response.sum().item()
    n = response.sum().item()
    assert abs(frac - 0.3) < 4 * (0.3 * 0.7 / n) ** 0.5  # within 4 standard deviations
    assert torch.equal(out["labels"], batch["labels"])  # targets kept


def test_masked_thought_in_training_batches(assets, tmp_path):
    run = make_run(chat_recipe(assets, tmp_path / "o", masked_thought={"ratio": 0.5}))
    idx = run.order.micro_batch(0)
    plain = collate([run.data.train[i] for i in idx], run.tokenizer.pad_token_id)
    b1, b2 = run.micro_batch(0), run.micro_batch(0)
    assert torch.equal(b1["input_ids"], b2["input_ids"])  # reproducible (exact resume)
    changed = b1["input_ids"] != plain["input_ids"]
    assert changed.any() and not (changed & (plain["labels"] == IGNORE)).any()
    assert (b1["input_ids"][changed] == run.tokenizer.mask_token_id).all()
    assert torch.equal(b1["labels"], plain["labels"])
    assert not torch.equal(run.micro_batch(1)["input_ids"] != collate([run.data.train[i] for i in run.order.micro_batch(1)], 0)["input_ids"], changed)


# -- task-balanced multi-task loss (MFTCoder) -----------------------------------------------------

def test_balanced_loss_weights_each_task_mean_equally():
    loss = torch.tensor([[1.0, 3.0, 0.0], [2.0, 2.0, 2.0], [4.0, 0.0, 0.0], [6.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 0, 0]])
    task = torch.tensor([0, 0, 1, 1])
    got, k = balanced_loss(loss, mask, task)
    # task 0: (1 + 3 + 2 + 2 + 2) / 5 = 2; task 1: (4 + 6) / 2 = 5 -> (2 + 5) / 2
    assert k == 2 and got.item() == pytest.approx(3.5)
    plain = (loss * mask).sum() / mask.sum()
    assert plain.item() == pytest.approx(20 / 7)
    # a task's weight does not grow with its size: duplicating task 0's rows leaves the loss unchanged
    got2, _ = balanced_loss(torch.cat([loss[:2], loss]), torch.cat([mask[:2], mask]), torch.cat([task[:2], task]))
    assert got2.item() == pytest.approx(3.5)


def test_multitask_recipe_uses_the_balanced_loss(assets, tmp_path):
    run = make_run(chat_recipe(assets, tmp_path / "o", data={"task_field": "task"}, multitask={"balance": True}))
    assert run.data.tasks == ["a", "b"]
    batch = run.micro_batch(0)
    assert set(batch["task"].tolist()) == {0, 1}
    model = run.acc.unwrap_model(run.module).model
    with torch.no_grad():
        loss, _, _ = run.module(batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        tgt = batch["labels"][:, 1:]
        tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt.clamp(min=0), reduction="none") * (tgt != IGNORE)
        means = [tok[batch["task"] == t].sum() / (tgt[batch["task"] == t] != IGNORE).sum() for t in (0, 1)]
        plain = tok.sum() / (tgt != IGNORE).sum()
    assert loss.item() == pytest.approx(((means[0] + means[1]) / 2).item(), rel=1e-5)
    plain_run = WithLoss(model, "causal-lm", balanced=False)
    with torch.no_grad():
        assert plain_run(batch)[0].item() == pytest.approx(plain.item(), rel=1e-5)


def test_multitask_needs_task_field(assets, tmp_path):
    with pytest.raises(ConfigError, match="task_field"):
        parse_recipe(chat_recipe(assets, tmp_path / "o", multitask={"balance": True}))


# -- R-Tuning -------------------------------------------------------------------------------------

def test_rtuning_splits_by_correctness_and_appends_suffixes():
    rows = [{"question": "2+2?", "answer": "4"}, {"question": "capital of France?", "answer": "Paris"},
            {"question": "7*6?", "answer": "42"}]
    known = {"2+2?": "The answer is 4.", "capital of France?": "London", "7*6?": "it is 42"}
    certain, uncertain = build_rtuning_rows(rows, lambda qs: [known[q] for q in qs])
    assert [r["prompt"] for r in certain] == ["2+2?", "7*6?"] and [r["prompt"] for r in uncertain] == ["capital of France?"]
    assert certain[0]["response"] == f"4 {QUESTION} {SURE}"
    assert uncertain[0]["response"] == f"Paris {QUESTION} {UNSURE}"
    assert is_correct("#### 1,234", "1234") and not is_correct("12", "13") and is_correct("paris.", "Paris")


def test_rtuning_with_a_real_model_predictor(assets):
    model = gk.load_model(assets / "llama")
    tok = gk.load_tokenizer(assets / "llama")
    rows = [{"question": f"repeat {w}", "answer": w} for w in ("good", "bad", "sad")]
    predict = greedy_predictor(model, tok, max_new_tokens=3)
    preds = predict([r["question"] for r in rows])
    certain, uncertain = build_rtuning_rows(rows, predict)
    assert len(certain) + len(uncertain) == 3
    assert [r["certain"] for r in certain + uncertain] == [True] * len(certain) + [False] * len(uncertain)
    assert sorted(r["prediction"] for r in certain + uncertain) == sorted(preds)
    # left padding: a batch gives each prompt the same answer as decoding it alone
    assert generate_answers(model, tok, [rows[0]["question"]], 3) == preds[:1]
