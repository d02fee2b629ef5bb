"""graft localize (skill localization, analysis/localize.py) and the bit-packed masks (analysis/masks.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import graftkit as gk
from graftkit.analysis.localize import Graft, budget, magnitude_masks, topk_masks
from graftkit.analysis.masks import MaskError, base_fingerprint, load_masks, pack_mask, save_masks, unpack_mask
from graftkit.cli import main as graft_main

from eval_helpers import GOLD, LABELS, TEXTS, bert, cls_file, save


# -- masks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 5), (17,), (1,), (8,), (2, 3, 4)])
def test_pack_round_trip(shape):
    g = torch.Generator().manual_seed(sum(shape))
    m = torch.rand(shape, generator=g) > 0.5
    packed, got_shape = pack_mask(m)
    n = m.numel()
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8 and got_shape == shape
    assert torch.equal(unpack_mask(packed, got_shape), m)


def test_pack_bit_order_and_bad_inputs():
    packed, _ = pack_mask(torch.tensor([True, False, False, False, False, False, False, True, True]))
    assert packed.tolist() == [0b10000001, 0b10000000]  # first entry in the high bit, last byte zero-padded
    with pytest.raises(MaskError):
        pack_mask(torch.ones(3))
    with pytest.raises(MaskError, match="must be 2 uint8 bytes"):
        unpack_mask(packed[:1], (9,))


def test_mask_file_round_trip_and_other_base(tmp_path):
    base = {"a.weight": torch.randn(4, 6), "b.bias": torch.randn(11)}
    masks = {k: torch.rand(v.shape) > 0.7 for k, v in base.items()}
    shapes = {k: v.shape for k, v in base.items()}
    fp = base_fingerprint(base.get, shapes)
    path = save_masks(tmp_path / "m.safetensors", masks, fp)
    back = load_masks(path, fp)
    assert set(back) == set(masks) and all(torch.equal(back[k], masks[k]) for k in masks)
    assert not list(tmp_path.glob(".*tmp*"))
    other = {k: v + 0.5 for k, v in base.items()}
    with pytest.raises(MaskError, match="different base model: the weights of"):
        load_masks(path, base_fingerprint(other.get, shapes))
    with pytest.raises(MaskError, match="different base model"):
        load_masks(path, base_fingerprint(base.get, {"a.weight": (4, 6)}))


# -- pure selection -------------------------------------------------------------------------------
def test_magnitude_mask_global_exact_budget():
    deltas = {"x": torch.tensor([[0.1, -5.0], [0.2, 0.3]]), "y": torch.tensor([4.0, -0.05, 3.0, 0.3])}
    m = magnitude_masks(deltas, 3 / 8)
    assert m["x"].tolist() == [[False, True], [False, False]]  # one global threshold, not a per-tensor share
    assert m["y"].tolist() == [True, False, True, False]
    # ties (0.3 twice) still give exactly the budget
    m = magnitude_masks(deltas, 4 / 8)
    assert sum(int(v.sum()) for v in m.values()) == 4
    assert budget(10, 1e-9) == 1 and budget(10, 1.0) == 10
    with pytest.raises(gk.GraftError, match=r"outside \(0, 1\]"):
        budget(10, 0)
    assert sum(int(v.sum()) for v in topk_masks({"a": torch.zeros(5), "b": torch.zeros(3)}, 2).values()) == 2


# -- end to end on a tiny BERT --------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A base classifier and an expert fine-tuned on the task, plus huge changes to embedding rows
    of tokens no example uses: the largest |delta| do nothing, so the magnitude mask at a small
    budget is all noise and only a learned mask can find the entries that matter."""
    tmp = tmp_path_factory.mktemp("loc")
    tok = gk.load_tokenizer("minilm")
    base = bert(tok, seed=0)
    base_dir = save(base, tok, tmp / "base")
    expert = bert(tok, seed=0)
    data = cls_file(tmp)
    ids = tok(TEXTS, padding=True, return_tensors="pt")
    gold = torch.tensor([LABELS.index(g) for g in GOLD])
    opt = torch.optim.Adam(expert.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(expert(**ids).logits, gold)
        opt.zero_grad()
        loss.backward()
        opt.step()
    used = set(ids["input_ids"].reshape(-1).tolist())
    unused = [i for i in range(1000, 1400) if i not in used][:100]
    with torch.no_grad():
        expert.bert.embeddings.word_embeddings.weight[unused] += 10.0
    expert_dir = save(expert.eval(), tok, tmp / "expert")
    other = save(bert(tok, seed=5), tok, tmp / "other")
    return tmp, base_dir, expert_dir, data, other


def recipe(tmp, base, expert, data, out, **kw):
    r = {"base": base, "expert": expert, "out": str(out), "sparsity": [0.002], "steps": 40, "lr": 0.2, "eval_every": 10,
         "task": {"name": "topic", "kind": "classification", "file": data, "batch_size": 4, "max_length": 32}, **kw}
    p = tmp / f"{out.name}.yaml"
    p.write_text(yaml.safe_dump(r))
    return str(p)


def test_localize_learned_beats_magnitude(setup, capsys):
    tmp, base, expert, data, _ = setup
    out = tmp / "run"
    assert graft_main(["localize", recipe(tmp, base, expert, data, out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("graft localize:") and "learned" in line
    res = json.loads((out / "result.json").read_text())
    (lv,) = res["levels"]
    assert lv["k"] == round(0.002 * res["delta_entries"])
    # the magnitude mask is all noise: nothing the model uses is grafted, so it scores as the base
    assert lv["magnitude"]["loss"] == pytest.approx(res["base_scores"]["loss"], abs=1e-5)
    assert lv["learned"]["loss"] < lv["magnitude"]["loss"] - 1e-3 and lv["learned"]["best_step"] > 0
    assert res["finetuned"]["accuracy"] == 1.0
    # the files: exactly the budget, keyed by the base's tensor names, fingerprinted
    from graftkit.analysis.localize import load_localize_config, mask_fingerprint, open_graft

    graft, info = open_graft(load_localize_config(recipe(tmp, base, expert, data, tmp / "unused")))
    fp = mask_fingerprint(graft, info["base_ckpt"])
    for kind in ("learned", "magnitude"):
        m = load_masks(out / "masks" / f"{kind}-s0.002.safetensors", fp)
        assert sum(int(v.sum()) for v in m.values()) == lv["k"]
        by_name = {graft.names[n]: n for n in graft.deltas}
        got = graft.score_mask({by_name[k]: v for k, v in m.items()})
        assert got["loss"] == pytest.approx(lv[kind]["loss"], rel=1e-5)
    md = (out / "report.md").read_text()
    for title in ("Summary", "Learned vs magnitude masks", "Optimisation history", "Files"):
        assert title in md
    assert (out / "report_files" / "localize_accuracy.png").exists()


def test_learned_never_worse_than_magnitude():
    """On a plain fine-tuning delta (no planted noise) the kept mask is at most the magnitude mask's loss."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return type("O", (), {"logits": self.m(input_ids)})()

    w = Wrap(model)
    base = {n: p.detach().clone() for n, p in w.named_parameters()}
    deltas = {n: torch.randn_like(p) * 0.5 for n, p in w.named_parameters()}
    with torch.no_grad():
        for n, p in w.named_parameters():
            p.add_(deltas[n])
    x = torch.randn(24, 6)
    gold = w(x, None).logits.argmax(-1)
    batches = [(x[i:i + 8], None, gold[i:i + 8]) for i in range(0, 24, 8)]
    g = Graft(w, base, deltas, batches)
    for s in (0.05, 0.2):
        mag = g.score_mask(magnitude_masks(deltas, s))
        mask, hist = g.learn(s, steps=30, lr=0.3, eval_every=5)
        assert hist["loss"] <= mag["loss"] + 1e-7
        assert sum(int(v.sum()) for v in mask.values()) == budget(g.numel, s)


def _linear_graft(seed: int = 0):
    """A 4->3 linear classifier as a Graft: base, delta and two batches, all hand-made."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(4, 3)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, input_ids, attention_mask):
            return type("O", (), {"logits": self.lin(input_ids)})()

    w = Wrap()
    base = {n: torch.randn(p.shape, generator=g) for n, p in w.named_parameters()}
    deltas = {n: torch.randn(p.shape, generator=g) for n, p in w.named_parameters()}
    x = torch.randn(10, 4, generator=g)
    y = torch.randint(0, 3, (10,), generator=g)
    return Graft(w, base, deltas, [(x[:6], None, y[:6]), (x[6:], None, y[6:])]), x, y


def test_mask_gradient_is_straight_through():
    """The forward grafts the binary top-k mask and dS = dL/dW (at that binary graft) * delta * sigmoid'(S),
    over the mean of the batches' losses: checked against autograd on the plain grafted weights."""
    from graftkit.analysis.localize import grafted

    graft, x, y = _linear_graft()
    g = torch.Generator().manual_seed(1)
    logits = {n: (torch.randn(d.shape, generator=g) * 2).requires_grad_(True) for n, d in graft.deltas.items()}
    k = 5
    loss = graft.mask_gradient(logits, k, graft.batches)
    hard = topk_masks(logits, k)
    w = {n: v.detach().clone().requires_grad_(True) for n, v in grafted(graft.base, graft.deltas, hard).items()}
    ref = sum(torch.nn.functional.cross_entropy(b[0] @ w["lin.weight"].T + w["lin.bias"], b[2]) for b in graft.batches) / 2
    ref.backward()
    assert loss == pytest.approx(float(ref.detach()), rel=1e-6)  # the binary mask's loss, not the relaxed model's
    for n, v in logits.items():
        sig = torch.sigmoid(v.detach())
        torch.testing.assert_close(v.grad, w[n].grad * graft.deltas[n] * sig * (1 - sig), rtol=1e-5, atol=1e-7)
    # without straight-through the forward is the relaxed model: another loss
    relaxed = {n: v.detach().clone().requires_grad_(True) for n, v in logits.items()}
    assert graft.mask_gradient(relaxed, k, graft.batches, straight_through=False) != pytest.approx(loss, rel=1e-3)


def test_sgd_step_moves_the_budget_th_gradient_by_lr():
    from graftkit.analysis.localize import sgd_step

    a = torch.zeros(4, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    a.grad = torch.tensor([4.0, -1.0, 0.5, 0.0])
    b.grad = torch.tensor([-2.0, 0.25])
    sgd_step({"a": a, "b": b}, lr=3.0, k=3)  # |grads| sorted: 4, 2, 1, ...: the third largest is 1
    torch.testing.assert_close(a.detach(), torch.tensor([-12.0, 3.0, -1.5, 0.0]))
    torch.testing.assert_close(b.detach(), torch.tensor([6.0, -0.75]))
    c = torch.zeros(3, requires_grad=True)
    c.grad = torch.tensor([0.0, 2.0, 0.0])
    sgd_step({"c": c}, lr=1.0, k=2)  # the budget-th gradient is 0: fall back to the largest
    torch.testing.assert_close(c.detach(), torch.tensor([0.0, -1.0, 0.0]))


def test_learned_sgd_lowers_the_binary_loss():
    """Full-batch straight-through SGD finds a mask with a lower training loss than the magnitude one
    on a delta whose largest entries are planted noise (so the magnitude mask is a poor start)."""
    graft, x, y = _linear_graft(3)
    graft.deltas["lin.weight"][0, 0] = 50.0  # huge but, on these inputs, harmful
    graft.deltas["lin.bias"][:] = torch.tensor([-40.0, 0.0, 0.0])
    s = 3 / graft.numel
    mag = graft.score_mask(magnitude_masks(graft.deltas, s))
    mask, hist = graft.learn(s, steps=20, eval_every=1)
    assert hist["best_step"] > 0 and hist["loss"] < mag["loss"] - 1e-3
    assert sum(int(v.sum()) for v in mask.values()) == 3


# -- bad input: one line, exit 2, nothing written -------------------------------------------------
def _error(capsys) -> str:
    """The one error line (in process, transformers' own loading bars may precede it on stderr;
    the CLI run as a command turns them off before transformers is imported)."""
    lines = [l for l in capsys.readouterr().err.replace("\r", "\n").splitlines() if l.strip() and "Loading weights" not in l]
    assert len(lines) == 1 and lines[0].startswith("graft: error:"), lines
    return lines[0]


@pytest.mark.parametrize("bad", [0, 1.5, -0.1])
def test_sparsity_outside_unit_interval(setup, capsys, bad):
    tmp, base, expert, data, _ = setup
    out = tmp / f"bad{str(bad).replace('.', '_')}"
    assert graft_main(["localize", recipe(tmp, base, expert, data, out, sparsity=[0.01, bad])]) == 2
    err = _error(capsys)
    assert "outside (0, 1]" in err
    assert not out.exists()


def test_masks_for_another_base(setup, capsys):
    tmp, base, expert, data, other = setup
    first = tmp / "first"
    assert graft_main(["localize", recipe(tmp, other, expert, data, first, steps=1, eval_every=1)]) == 0
    capsys.readouterr()
    out = tmp / "second"
    masks = [str(first / "masks" / "learned-s0.002.safetensors")]
    assert graft_main(["localize", recipe(tmp, base, expert, data, out, steps=1, masks=masks)]) == 2
    err = _error(capsys)
    assert "different base model" in err
    assert not out.exists()


def test_localize_lora_adapter_expert(setup, tmp_path):
    """An adapter expert: the delta is the folded LoRA product (query/value) plus its own head."""
    from eval_helpers import lora_adapter

    from graftkit.analysis.localize import load_localize_config, open_graft

    tmp, base, _, data, _ = setup
    model, adapter = lora_adapter(gk.load_tokenizer("minilm"), tmp_path)
    graft, _ = open_graft(load_localize_config(recipe(tmp_path, base, adapter, data, tmp_path / "lora")))
    touched = {n.split(".")[-2] for n in graft.deltas}
    assert touched == {"query", "value", "classifier"}
    gk.unload(model, merge=True)
    params = dict(model.named_parameters())
    for n, d in graft.deltas.items():  # base + delta is the folded adapter model
        assert torch.allclose(graft.base[n] + d, params[n], atol=1e-6)


def test_mask_jaccard_by_group():
    from graftkit.analysis.localize import LocalizeError, mask_group, mask_jaccard

    q, d = "bert.encoder.layer.1.attention.self.query.weight", "bert.encoder.layer.1.intermediate.dense.weight"
    assert mask_group(q) == ("1", "attention.self.query") and mask_group("model.layers.12.mlp.up_proj.weight") == ("12", "mlp.up_proj")
    assert mask_group("bert.embeddings.word_embeddings.weight") == ("-", "bert.embeddings.word_embeddings")
    a = {q: torch.tensor([True, True, False, False]), d: torch.tensor([True, False])}
    b = {q: torch.tensor([True, False, True, False]), d: torch.tensor([False, False])}
    res = mask_jaccard({"a": a, "b": b})
    assert res["groups"]["1/attention.self.query"][0][1] == pytest.approx(1 / 3)  # {0} of {0, 1, 2}
    assert res["groups"]["1/intermediate.dense"][0][1] == 0.0
    assert res["all"][0][1] == pytest.approx(1 / 4) and res["all"][1][0] == res["all"][0][1] and res["all"][0][0] == 1.0
    with pytest.raises(LocalizeError, match="different tensors"):
        mask_jaccard({"a": a, "b": {q: b[q]}})


def test_localize_overlap_of_given_masks(setup):
    """Two mask files given: their Jaccard overlap (whole model, per group) and the union grafted."""
    tmp, base, expert, data, _ = setup
    first = tmp / "ov1"
    assert graft_main(["localize", recipe(tmp, base, expert, data, first, steps=10, eval_every=10, sparsity=[0.002, 0.01])]) == 0
    given = [str(first / "masks" / "learned-s0.002.safetensors"), str(first / "masks" / "magnitude-s0.01.safetensors")]
    out = tmp / "ov2"
    assert graft_main(["localize", recipe(tmp, base, expert, data, out, steps=1, masks=given)]) == 0
    res = json.loads((out / "result.json").read_text())
    a, b = (load_masks(p, None) for p in given)
    inter = sum(int((a[k] & b[k]).sum()) for k in a)
    uni = sum(int((a[k] | b[k]).sum()) for k in a)
    assert res["overlap"]["all"][0][1] == pytest.approx(inter / uni) and 0 < inter < uni
    assert res["union"]["k"] == uni
    assert "Overlap of the given masks" in (out / "report.md").read_text()
    assert (out / "report_files" / "localize_overlap.png").exists()


# -- held-out scoring and the multi-expert recipe ----------------------------------------------------
HELD = ["stocks rallied on friday", "the team won the cup", "software update ships today", "ok", "markets slump again"]
HELD_GOLD = ["business", "sports", "tech", "tech", "business"]


def _held_task(tmp):
    return {"name": "topic-test", "kind": "classification", "file": cls_file(tmp, HELD, HELD_GOLD, name="held.jsonl"),
            "batch_size": 2, "max_length": 32}


def _independent(folder, tok):
    """Score a saved model folder on the held-out texts one at a time (no padding, no graftkit scoring)."""
    import transformers

    from eval_helpers import plain_probs
    from graftkit.eval.metrics import expected_calibration_error

    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    p = plain_probs(model, tok, HELD)
    g = torch.tensor([LABELS.index(x) for x in HELD_GOLD])
    pt = torch.from_numpy(p)
    return {"loss": float(-pt[torch.arange(len(g)), g].log().mean()), "accuracy": float((pt.argmax(-1) == g).float().mean()),
            "ece": expected_calibration_error(p, g.numpy())}


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(next(Path(folder).glob("*.safetensors"))))


def test_localize_heldout_scores(setup, capsys):
    """eval_task: every mask and the fine-tuned model are also scored on held-out data, and those
    numbers are what an independent scoring of the saved grafted weights gives."""
    tmp, base, expert, data, _ = setup
    out = tmp / "held"
    assert graft_main(["localize", recipe(tmp, base, expert, data, out, steps=40, eval_every=10, save_grafted=True,
                                          eval_task=_held_task(tmp))]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "held-out" in line
    res = json.loads((out / "result.json").read_text())
    assert res["eval_task"] == "topic-test" and res["eval_examples"] == len(HELD)
    tok = gk.load_tokenizer("minilm")
    (lv,) = res["levels"]
    assert lv["learned"]["best_step"] > 0  # a mask of its own, not the magnitude one
    for kind in ("learned", "magnitude"):
        want = _independent(out / "grafted" / f"{kind}-s0.002", tok)
        got = lv[kind]["heldout"]
        assert got["accuracy"] == want["accuracy"]
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-5) and got["ece"] == pytest.approx(want["ece"], abs=1e-5)
        assert got["loss"] != pytest.approx(lv[kind]["loss"], abs=1e-3)  # held-out, not the training data again
    want = _independent(expert, tok)
    assert res["finetuned"]["heldout"]["loss"] == pytest.approx(want["loss"], abs=1e-5)
    md = (out / "report.md").read_text()
    assert "held-out retained" in md and "held-out scores (topic-test, 5 examples)" in md


def test_union_masks_fills_missing_keys():
    from graftkit.analysis.localize import union_masks

    a = {"x": torch.tensor([True, False, False])}
    b = {"x": torch.tensor([False, False, True]), "y": torch.tensor([[True, False]])}
    u = union_masks([a, b], {"x": (3,), "y": (1, 2), "z": (2,)})
    assert u["x"].tolist() == [True, False, True] and u["y"].tolist() == [[True, False]] and u["z"].tolist() == [False, False]


def _multi_recipe(tmp, base, experts, out, **kw):
    r = {"base": base, "out": str(out), "sparsity": [0.002, 0.01], "steps": 5, "lr": 0.2, "eval_every": 5,
         "experts": experts, **kw}
    p = tmp / f"{out.name}.yaml"
    p.write_text(yaml.safe_dump(r))
    return str(p)


def _entry(expert, data, held=None):
    e = {"expert": expert, "task": {"name": "topic", "kind": "classification", "file": data, "batch_size": 4, "max_length": 32}}
    if held:
        e["eval_task"] = held
    return e


def test_localize_multi_expert_union(setup, tmp_path, capsys):
    """Two experts (a full fine-tune and a LoRA adapter, so their deltas cover different tensors):
    the overlap of their learned masks and each one grafted on the union, weights checked exactly."""
    from eval_helpers import lora_adapter
    from safetensors.torch import load_file

    tmp, base, expert, data, _ = setup
    tok = gk.load_tokenizer("minilm")
    lora_model, adapter = lora_adapter(tok, tmp_path)
    out = tmp_path / "multi"
    experts = {"full": _entry(expert, data, _held_task(tmp_path)), "lora": _entry(adapter, data)}
    assert graft_main(["localize", _multi_recipe(tmp_path, base, experts, out, save_grafted=True)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("graft localize: 2 experts;") and "full " in line and "lora " in line
    res = json.loads((out / "result.json").read_text())
    assert set(res["experts"]) == {"full", "lora"} and [lv["sparsity"] for lv in res["levels"]] == [0.002, 0.01]
    base_w = load_file(str(Path(base) / "model.safetensors"))
    full_w = _weights(expert)
    gk.unload(lora_model, merge=True)
    lora_w = {n: p.detach() for n, p in lora_model.named_parameters()}
    for lv in res["levels"]:
        s = lv["sparsity"]
        a = load_masks(out / "masks" / "full" / f"learned-s{s:g}.safetensors", None)
        b = load_masks(out / "masks" / "lora" / f"learned-s{s:g}.safetensors", None)
        assert set(b) < set(a)  # the LoRA delta covers query/value only
        assert sum(int(v.sum()) for v in a.values()) == res["experts"]["full"]["levels"][[0.002, 0.01].index(s)]["k"]
        u = {k: a[k] | b[k] if k in b else a[k] for k in a}
        inter = sum(int((a[k] & b[k]).sum()) for k in b)
        assert lv["overlap"]["all"][0][1] == pytest.approx(inter / sum(int(v.sum()) for v in u.values()))
        assert lv["k"] == sum(int(v.sum()) for v in u.values())
        assert all(torch.equal(v, u[k]) for k, v in load_masks(out / "masks" / f"union-s{s:g}.safetensors", None).items())
        # full: base + union * (expert - base), bit for bit; tensors it left unchanged are its own
        g = _weights(out / "grafted" / "full" / f"union-s{s:g}")
        assert "classifier.weight" in u and set(g) == set(full_w)
        for k, w in g.items():
            want = base_w[k] + u[k].to(w.dtype) * (full_w[k] - base_w[k]) if k in u else full_w[k]
            assert torch.equal(w, want), k
        # lora: base + union * (folded - base) on the tensors its delta covers (query/value, its head)
        g = _weights(out / "grafted" / "lora" / f"union-s{s:g}")
        for k, w in g.items():
            want = base_w[k] + u[k].to(w.dtype) * (lora_w[k] - base_w[k]) if k in b else lora_w[k]
            assert torch.allclose(w, want, atol=1e-6), k
        assert "heldout" in lv["union"]["full"] and "heldout" not in lv["union"]["lora"]
    md = (out / "report.md").read_text()
    for title in ("Every expert grafted on the union of the learned masks", "Overlap of the experts' learned masks",
                  "full: Learned vs magnitude masks", "lora: Optimisation history"):
        assert title in md
    assert (out / "report_files" / "localize_overlap_s0.01.png").exists()


@pytest.mark.parametrize("case,match", [
    ("empty", "experts: has 0 entries"),
    ("one", "experts: has 1 entry"),
    ("null", "experts.b is empty"),
    ("duplicate", "both name"),
    ("both", "give either experts: or expert/task"),
    ("badname", "must be letters"),
    ("missing", "experts.b: ExpertEntry: missing required key 'task'"),
])
def test_multi_expert_bad_recipe(setup, tmp_path, capsys, case, match):
    tmp, base, expert, data, other = setup
    e = _entry(expert, data)
    experts = {"empty": {}, "one": {"a": e}, "null": {"a": e, "b": None}, "duplicate": {"a": e, "b": _entry(expert + "/", data)},
               "both": {"a": e, "b": _entry(other, data)}, "badname": {"a": e, "b/c": _entry(other, data)},
               "missing": {"a": e, "b": {"expert": other}}}[case]
    extra = {"expert": expert, "task": e["task"]} if case == "both" else {}
    out = tmp_path / "out"
    assert graft_main(["localize", _multi_recipe(tmp_path, base, experts, out, **extra)]) == 2
    assert match in _error(capsys)
    assert not out.exists()


def test_multi_expert_missing_eval_data_before_any_work(setup, tmp_path, capsys):
    """A later expert's held-out file that does not exist is named before the first expert is localized."""
    tmp, base, expert, data, other = setup
    missing = {"name": "topic-test", "kind": "classification", "file": str(tmp_path / "nope.jsonl")}
    out = tmp_path / "out"
    experts = {"a": _entry(expert, data), "b": _entry(other, data, missing)}
    assert graft_main(["localize", _multi_recipe(tmp_path, base, experts, out)]) == 2
    err = _error(capsys)
    assert err.startswith("graft: error: expert 'b':") and "nope.jsonl" in err
    assert not out.exists()


def test_eval_task_must_be_classification(setup, tmp_path, capsys):
    tmp, base, expert, data, _ = setup
    out = tmp_path / "out"
    held = {"name": "lm", "kind": "perplexity", "file": data}
    assert graft_main(["localize", recipe(tmp_path, base, expert, data, out, eval_task=held)]) == 2
    assert "eval_task 'lm' is a perplexity task" in _error(capsys)
    assert not out.exists()


def test_multi_expert_adapter_for_another_base(setup, tmp_path, capsys):
    """An expert made on another base is refused before any expert is localized."""
    from eval_helpers import lora_adapter

    tmp, base, expert, data, _ = setup
    _, adapter = lora_adapter(gk.load_tokenizer("minilm"), tmp_path, base_seed=5)
    out = tmp_path / "out"
    experts = {"full": _entry(expert, data), "lora": _entry(adapter, data)}
    assert graft_main(["localize", _multi_recipe(tmp_path, base, experts, out)]) == 2
    err = _error(capsys)
    assert "expert 'lora'" in err and "different base model" in err
    assert not out.exists()
