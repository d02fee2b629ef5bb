"""DARE tolerance: base + DARE(expert - base, p) scored by graft eval's classification runner."""
from __future__ import annotations

import pytest
import torch

import graftkit as gk
from eval_helpers import GOLD, TEXTS, bert, cls_file, save


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dare")
    tok = gk.load_tokenizer("minilm")
    base = save(bert(tok, seed=0), tok, tmp / "base")
    expert = bert(tok, seed=0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return base, save(expert, tok, tmp / "expert"), cls_file(tmp, TEXTS * 3, GOLD * 3), tmp


def test_rate_zero_is_the_expert_and_kept_share_follows_the_rate(pair):
    from graftkit.analysis.dare_tolerance import dare_tolerance
    from graftkit.eval.runner import evaluate_model

    base, expert, task, _ = pair
    res = dare_tolerance(base, expert, task, rates=[0.5, 0.9])
    assert [r["rate"] for r in res["rows"]] == [0.0, 0.5, 0.9]
    own = evaluate_model({"name": "expert", "path": expert}, [{"name": res["task"], "kind": "classification", "file": task}])
    assert res["rows"][0]["accuracy"] == own[res["task"]]["metrics"]["accuracy"]
    assert res["rows"][0]["kept_share"] == 1.0 and res["rows"][0]["retained"] == 1.0
    assert abs(res["rows"][1]["kept_share"] - 0.5) < 0.02
    assert abs(res["rows"][2]["kept_share"] - 0.1) < 0.02


def test_dropped_delta_keeps_survivors_rescaled():
    from graftkit.analysis.dare_tolerance import dropped_delta

    delta = torch.randn(200, 100)
    d = dropped_delta(delta, 0.9, seed=3)
    kept = d != 0
    assert abs(kept.float().mean().item() - 0.1) < 0.01
    assert torch.allclose(d[kept], delta[kept] / 0.1, rtol=1e-6)
    assert torch.equal(d, dropped_delta(delta, 0.9, seed=3))  # seeded: the same mask


def test_cli_table_and_report(pair, capsys):
    from graftkit.cli import main

    base, expert, task, tmp = pair
    assert main(["dare-tolerance", base, expert, task, "--rates", "0.95", "--out", str(tmp / "rep")]) == 0
    out = capsys.readouterr().out
    assert "0.95" in out and "report:" in out
    md = (tmp / "rep" / "report.md").read_text()
    assert "DARE tolerance" in md and (tmp / "rep" / "report_files" / "dare_tolerance.png").is_file()


@pytest.mark.parametrize("case", ["rate_one", "other_base"])
def test_bad_inputs_are_one_line_exit_2(pair, capsys, case, tmp_path):
    from graftkit.cli import main

    base, expert, task, _ = pair
    rates = ["0.5"]
    if case == "rate_one":
        rates, expect = ["1.0"], "outside [0, 1)"
    else:
        import transformers

        cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=128, num_labels=3)
        transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "other")
        base, expect = str(tmp_path / "other"), "give the base the expert was fine-tuned from"
    capsys.readouterr()
    code = main(["dare-tolerance", base, expert, task, "--rates", *rates, "--out", str(tmp_path / "rep")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("graft: error:") and err.count("\n") == 1 and expect in err, err
    assert not (tmp_path / "rep").exists()


def test_written_model_is_base_plus_the_dropped_delta(pair, tmp_path):
    from graftkit.analysis.dare_tolerance import dropped_delta, write_dropped
    from graftkit.merge.plan import seed_for
    from graftkit.tensors import Checkpoint
    from merge_helpers import load_folder

    base, expert, _, _ = pair
    b, e = Checkpoint(base), Checkpoint(expert)
    for p in (0.0, 0.5):
        out = tmp_path / f"p{p}"
        out.mkdir()
        write_dropped(b, e, p, 4, out)
        got, eb, ee = load_folder(out), load_folder(base), load_folder(expert)
        for k in ee:
            head = k.startswith("classifier.")  # kept whole: a head has no pre-trained value to drop towards
            want = ee[k] if p == 0 or head else eb[k] + dropped_delta(ee[k] - eb[k], p, seed_for(4, k))
            assert torch.equal(got[k], want), (p, k)


def test_a_base_head_of_another_label_count_is_not_an_error(pair, tmp_path):
    """graft study's base layout has a 2-label head; an expert of another task has its own: kept whole."""
    from graftkit.analysis.dare_tolerance import _check_pair, write_dropped
    from graftkit.tensors import Checkpoint
    from merge_helpers import load_folder

    base, expert, _, _ = pair
    tok = gk.load_tokenizer("minilm")
    two = save(bert(tok, seed=0, labels=["a", "b"]), tok, tmp_path / "two")
    b, e = Checkpoint(two), Checkpoint(expert)
    _check_pair(b, {"model_type": "bert"}, e, {"model_type": "bert"})
    (tmp_path / "o").mkdir()
    write_dropped(b, e, 0.5, 0, tmp_path / "o")
    assert torch.equal(load_folder(tmp_path / "o")["classifier.weight"], load_folder(expert)["classifier.weight"])
