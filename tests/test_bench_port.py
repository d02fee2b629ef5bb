"""bench/analysis_port.py's v2 builder, without training: BERT's 15% / 80-10-10 masking and the
64-token windows it trains on (the run itself takes half an hour)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
_spec = importlib.util.spec_from_file_location("bench_analysis_port", BENCH / "analysis_port.py")
port_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(port_bench)


class Tok:
    """The few tokenizer fields the masking and windowing read; word pieces are the characters' codes."""
    cls_token_id, sep_token_id, pad_token_id, mask_token_id = 101, 102, 0, 103

    def __len__(self):
        return 1000

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [200 + ord(c) % 700 for c in text]}


def test_masking_follows_the_80_10_10_rule_and_never_touches_special_tokens():
    tok = Tok()
    batch = torch.randint(200, 900, (400, 64))
    batch[:, 0], batch[:, -1] = tok.cls_token_id, tok.sep_token_id
    inputs, labels = port_bench.mask(batch, tok, torch.Generator().manual_seed(0))
    chosen = labels != -100
    assert torch.equal(labels[chosen], batch[chosen])  # the labels are the original pieces
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    assert torch.equal(inputs[~chosen], batch[~chosen])  # nothing outside the chosen positions changes
    assert abs(chosen.float().sum().item() / (400 * 62) - 0.15) < 0.01
    n = chosen.sum().item()
    masked = (inputs[chosen] == tok.mask_token_id).sum().item() / n
    kept = (inputs[chosen] == batch[chosen]).sum().item() / n  # unchanged, plus the rare random draw of itself
    assert abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.02 and abs(1 - masked - kept - 0.1) < 0.02


def test_windows_are_full_length_with_cls_and_sep():
    tok = Tok()
    w = port_bench.windows(tok, ["x" * 130, "y" * 61])  # 130 pieces: two windows of 62; 61 pieces: none
    assert len(w) == 2 and all(len(x) == port_bench.SEQ for x in w)
    assert all(x[0] == tok.cls_token_id and x[-1] == tok.sep_token_id for x in w)
    assert w[0][1:-1] == [200 + ord("x") % 700] * 62
