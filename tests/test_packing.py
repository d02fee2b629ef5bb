"""``data.pack_examples``: whole examples packed into rows, kept apart by per-example position ids.

The equivalence tests run the tiny Llama of conftest in float32: a packed row must give each
example the loss it gets alone and the batch the gradient of the unpacked batch. Letting one
example attend to another (the padding mask passed with the position ids, or position ids that
do not restart) or predicting an example's first token from the one before fails them."""
from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import tiny_llama

import graftkit as gk
from graftkit.errors import ConfigError
from graftkit.train import parse_recipe, train
from graftkit.train.data import IGNORE, collate, pack, packing_problem, prepare
from graftkit.train.loop import WithLoss
from test_train import assert_one_line_error, assets, chat_recipe, losses, run_cli, write_jsonl  # noqa: F401  (fixture)


def _examples(seed: int = 0, n: int = 7) -> list[dict]:
    """Chat-like examples (a prompt without targets, then a response) and plain-text ones, lengths 3..11."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length, prompt = rng.randint(3, 11), rng.randint(0, 2)  # 0: plain text, every token a target
        ids = [rng.randint(1, 95) for _ in range(length)]
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


def test_pack_places_every_example_once_and_restarts_positions():
    examples = _examples(n=9)
    rows = pack(examples, 16)
    assert all(len(r["input_ids"]) <= 16 for r in rows)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(e["input_ids"]) for e in examples) and len(rows) < len(examples)
    seen = []
    for r in rows:
        assert len(r["labels"]) == len(r["position_ids"]) == len(r["input_ids"])
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0]
        bounds = starts + [len(r["input_ids"])]
        for a, b in zip(bounds, bounds[1:]):
            assert r["position_ids"][a:b] == list(range(b - a))
            assert r["labels"][a] == IGNORE  # the first token is no target of the example before
            seen.append((tuple(r["input_ids"][a:b]), tuple(r["labels"][a + 1:b])))
    assert sorted(seen) == sorted((tuple(e["input_ids"]), tuple(e["labels"][1:])) for e in examples)
    assert pack(examples, 16) == rows  # deterministic
    assert len(pack([{"input_ids": [1] * 8, "labels": [1] * 8}] * 4, 16)) == 2  # full rows, no leftover room


def test_collate_pads_packed_rows_as_one_more_sequence():
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE, 6, IGNORE, 8, 9], "position_ids": [0, 1, 0, 1, 2]},
            {"input_ids": [5, 6], "labels": [IGNORE, 6], "position_ids": [0, 1]}]
    batch = collate(rows, 0)
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 0, 1, 2]]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0]]
    assert batch["labels"][1].tolist() == [IGNORE, 6, IGNORE, IGNORE, IGNORE]


def _per_example_losses(model, examples):
    """Each example alone: the sum of its token losses and its number of targets."""
    out = []
    for e in examples:
        ids = torch.tensor([e["input_ids"]])
        logits = model(input_ids=ids).logits[0, :-1]
        t = torch.tensor(e["labels"][1:])
        keep = t != IGNORE
        out.append(torch.nn.functional.cross_entropy(logits[keep], t[keep], reduction="sum"))
    return torch.stack(out)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("frozen_head", [False, True])
def test_packed_batch_gives_each_example_its_own_loss_and_the_same_gradient(frozen_head):
    model = tiny_llama().float()
    if frozen_head:  # the chunked cross-entropy of linear_ce
        model.lm_head.weight.requires_grad_(False)
    examples = _examples()
    rows = pack(examples, 24)
    assert len(rows) < len(examples) and any(sum(p == 0 for p in r["position_ids"]) > 1 for r in rows)
    batch = collate(rows, 0)

    # per-example losses read off the packed forward equal each example's alone
    with torch.no_grad():
        alone = _per_example_losses(model, examples)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    packed = []
    for r, lg in zip(rows, logits):
        bounds = [i for i, p in enumerate(r["position_ids"]) if p == 0] + [len(r["input_ids"])]
        for a, b in zip(bounds, bounds[1:]):
            t = torch.tensor(r["labels"][a + 1:b])
            keep = t != IGNORE
            packed.append((tuple(r["input_ids"][a:b]),
                           torch.nn.functional.cross_entropy(lg[a:b - 1][keep], t[keep], reduction="sum")))
    by_ids = dict(packed)
    got = torch.stack([by_ids[tuple(e["input_ids"])] for e in examples])
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)

    # the training loss through WithLoss: the same value and gradient as the unpacked batch
    module = WithLoss(model, "causal-lm", balanced=False).train()
    loss_packed, n_packed, _ = module(batch)
    loss_packed.backward()
    g_packed = _grads(model)
    model.zero_grad(set_to_none=True)
    loss_plain, n_plain, _ = module(collate(examples, 0))
    loss_plain.backward()
    g_plain = _grads(model)
    assert int(n_packed) == int(n_plain) == sum(sum(t != IGNORE for t in e["labels"][1:]) for e in examples)
    torch.testing.assert_close(loss_packed, loss_plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_packed, alone.sum() / n_plain, rtol=1e-5, atol=1e-6)
    assert g_packed.keys() == g_plain.keys() and ("lm_head.weight" in g_plain) != frozen_head
    for k in g_plain:
        torch.testing.assert_close(g_packed[k], g_plain[k], rtol=1e-4, atol=1e-6, msg=k)


def test_attending_across_examples_would_change_the_losses():
    """The check above has teeth: without the block-diagonal mask the same packed row gives
    other losses (here: the model's default KV cache left on, which turns transformers' packed-sequence
    detection off - the bug this test was written against)."""
    model = tiny_llama().float()
    examples = _examples()
    batch = collate(pack(examples, 24), 0)
    with torch.no_grad():
        right = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        wrong = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits  # a cache turns the detection off
    real = batch["attention_mask"].bool()
    assert (right - wrong)[real].abs().max() > 1e-3


def test_packing_probe_passes_the_tiny_llama_and_fails_a_prompt_method():
    assert packing_problem(tiny_llama()) is None
    assert packing_problem(tiny_llama().to(torch.bfloat16)) is None  # bf16 rounding across shapes is not mixing
    model = tiny_llama()
    original = model.model.forward

    def ignores_positions(*args, position_ids=None, **kw):  # a model that masks by position in the row only
        return original(*args, **kw)

    model.model.forward = ignores_positions
    assert "change when another example is packed" in packing_problem(model)


def _chat_rows(path, n=40, seed=3):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = rng.choice("good great fine bad awful sad".split())
        rows.append({"prompt": "repeat " + " ".join([w] * rng.randint(1, 4)), "response": f"{w} {w}"})
    return write_jsonl(path, rows)


def test_pack_examples_trains_a_chat_run_and_keeps_validation_per_example(assets, tmp_path):
    data = _chat_rows(tmp_path / "chat.jsonl")
    r = parse_recipe(chat_recipe(assets, tmp_path / "run", data={"train": str(data), "validation": str(data), "pack_examples": True},
                                 optim={"batch_size": 2, "max_steps": 4}, eval={"every": None, "limit": 8}))
    tok = gk.load_tokenizer(assets / "llama")
    prepared = prepare(r, tok, 64)
    assert len(prepared.train) < 40 and all("position_ids" in row and len(row["input_ids"]) <= 32 for row in prepared.train)
    assert all("position_ids" not in ex for ex in prepared.validation) and len(prepared.validation) == 8
    summary = train(r, progress=False)
    assert summary["steps"] == 4 and len(losses(tmp_path / "run")) == 4 and summary["val_loss"] > 0


def test_pack_examples_with_plain_text_keeps_documents_whole(assets, tmp_path):
    r = parse_recipe(chat_recipe(assets, tmp_path / "run", data={"train": str(assets / "text.jsonl"), "validation": None,
                                                                  "prompt_field": None, "response_field": None, "max_length": 64,
                                                                  "pack_examples": True}))
    tok = gk.load_tokenizer(assets / "llama")
    rows = prepare(r, tok, 64).train
    docs = [tok(json.loads(x)["text"], add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
            for x in (assets / "text.jsonl").read_text().splitlines()]
    pieces = []
    for row in rows:
        bounds = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        pieces += [row["input_ids"][a:b] for a, b in zip(bounds, bounds[1:])]
    assert sorted(pieces) == sorted(d[:64] for d in docs)


@pytest.mark.parametrize("over, needle", [
    ({"task": "classification", "data": {"text_field": "prompt", "label_field": "response", "prompt_field": None,
                                         "response_field": None, "pack_examples": True}}, "classification"),
    ({"data": {"task_field": "task", "pack_examples": True}}, "different tasks"),
    ({"data": {"prompt_field": None, "response_field": None, "packing": True, "pack_examples": True}}, "exclude each other"),
])
def test_pack_examples_refusals(assets, tmp_path, over, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_recipe(chat_recipe(assets, tmp_path / "run", **over))


def test_pack_examples_refused_in_one_line_for_a_model_that_mixes_examples(assets, tmp_path, capsys, monkeypatch):
    from graftkit.train import data

    monkeypatch.setattr(data, "packing_problem", lambda model: "an example's outputs change when another example is packed before it")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(chat_recipe(assets, tmp_path / "run", data={"pack_examples": True})))
    code, _, err = run_cli(capsys, recipe)
    assert_one_line_error(code, err, "data.pack_examples", "set data.pack_examples=false")
    assert not (tmp_path / "run").exists()
