"""graft localize (skill localization, analysis/localize.py) and the bit-packed masks (analysis/masks.py)."""
from __future__ import annotations

import json

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
