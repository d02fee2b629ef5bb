"""``augment``: EDA on the training text, mixup of sentence representations, the supervised
contrastive loss (graftkit.train.augment), their recipe checks and tiny ``graft train`` runs."""
from __future__ import annotations

import json
import math
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers

import graftkit as gk
from graftkit.cli import main as graft_main
from graftkit.errors import ConfigError
from graftkit.tensors import read_safetensors
from graftkit.train import parse_recipe, train
from test_train import WORDS, _rows, write_jsonl
from graftkit.train.augment import (SentenceAugment, augment_rows, eda, mixup_draw, random_deletion, random_insertion, random_swap,
                                    supervised_contrastive, synonym_replacement)
from graftkit.train.data import IGNORE, collate, prepare
from graftkit.train.recipe import EDAConfig

CHAT_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} [SEP] {% endfor %}"
                 "{% if add_generation_prompt %}[assistant] {% endif %}")


class Scripted:
    """A stand-in for random.Random that returns the values a test lists, so expectations are by hand."""

    def __init__(self, ints=(), floats=()):
        self.ints, self.floats = list(ints), list(floats)

    def randrange(self, n):
        v = self.ints.pop(0)
        assert 0 <= v < n, (v, n)
        return v

    def random(self):
        return self.floats.pop(0)

    def choice(self, seq):
        return seq[self.randrange(len(seq))]

    def shuffle(self, seq):
        seq.reverse()  # a fixed, visible reordering


THESAURUS = {"movie": ["film", "picture show"], "great": ["big", "outstanding"], "plot": ["secret plan"]}


def thesaurus(word):
    return THESAURUS.get(word.lower(), [])


# -- the four EDA operations, exactly ------------------------------------------------------------

def test_random_swap_exact():
    words = "a b c d e".split()
    # i=1, j drawn 2 among the 4 other positions: 2 >= i, so position 3
    assert random_swap(words, 1, Scripted(ints=[1, 2])) == "a d c b e".split()
    # j below i stays: (4, 0), then (0, 1): j=0 >= i=0 -> 1
    assert random_swap(words, 2, Scripted(ints=[4, 0, 0, 0])) == "b e c d a".split()
    assert random_swap(["only"], 3, Scripted()) == ["only"]
    assert words == "a b c d e".split()  # the input is not modified


def test_random_deletion_exact():
    words = "the cat sat on mats".split()
    assert random_deletion(words, 0.1, Scripted(floats=[0.05, 0.5, 0.2, 0.01, 0.9])) == "cat sat mats".split()
    assert random_deletion(words, 0.1, Scripted(floats=[0.1, 0.5, 0.5, 0.5, 0.5])) == "cat sat on mats".split()  # > p keeps
    # everything deleted: one random word stays
    assert random_deletion(words, 1.0, Scripted(ints=[2], floats=[0.3] * 5)) == ["sat"]
    assert random_deletion(["alone"], 1.0, Scripted()) == ["alone"]


def test_synonym_replacement_and_insertion_exact():
    words = "the great movie had a great plot".split()
    # candidates (non-stop words, first appearance): great, movie, plot -> shuffled (reversed): plot, movie, great
    # n=2: plot -> "secret plan" (choice 0), movie -> "picture show" (choice 1); a synonym may be two words
    out = synonym_replacement(words, 2, Scripted(ints=[0, 1]), thesaurus)
    assert out == "the great picture show had a great secret plan".split()
    # the chosen word is replaced everywhere: candidates movie, great -> reversed: great -> "outstanding"
    assert synonym_replacement("movie great great".split(), 1, Scripted(ints=[1]), thesaurus) == "movie outstanding outstanding".split()
    # case and punctuation around a word: looked up without them, kept around the synonym
    assert synonym_replacement('A "Great" movie.'.split(), 2, Scripted(ints=[0, 1]), thesaurus) == 'A "outstanding" film.'.split()
    # words without synonyms are skipped
    assert synonym_replacement("zz movie".split(), 1, Scripted(ints=[0]), thesaurus) == "zz film".split()
    # insertion: content words [great, movie, great, plot]; movie (1) -> "film" (0) at position 7 (the end)
    assert random_insertion(words, 1, Scripted(ints=[1, 0, 7]), thesaurus) == "the great movie had a great plot film".split()
    # a word without synonyms is retried: zz (0), then movie (1) -> "picture show" (1) at position 0
    assert random_insertion("zz movie".split(), 1, Scripted(ints=[0, 1, 1, 0]), thesaurus) == "picture show zz movie".split()
    # no content word has synonyms: 10 tries, then unchanged
    assert random_insertion("had zz".split(), 1, Scripted(ints=[0] * 10), thesaurus) == "had zz".split()


def test_eda_makes_num_aug_copies_one_operation_each():
    cfg = EDAConfig(alpha_sr=0, alpha_ri=0, alpha_rs=0.2, p_rd=0.3, num_aug=5)
    text = "one two three four five six seven eight nine ten"
    out = eda(text, cfg, random.Random(0), None)
    assert len(out) == 5
    words = text.split()
    for t in out:
        w = t.split()
        swapped = sorted(w) == sorted(words) and w != words
        deleted = len(w) < len(words) and all(x in words for x in w) and w == [x for x in words if x in w]
        unchanged = w == words  # a deletion pass that drew nothing under p
        assert swapped or deleted or unchanged, t
    assert any(len(t.split()) < 10 for t in out) and any(len(t.split()) == 10 and t != text for t in out)
    assert eda(text, cfg, random.Random(0), None) == out
    assert eda("", cfg, random.Random(0), None) == []


def test_augment_rows_is_a_pure_function_of_seed_and_data():
    rows = [{"text": f"w{i} x{i} y{i} z{i}", "label": "a" if i % 2 else "b", "id": i} for i in range(6)]
    cfg = EDAConfig(alpha_sr=0, alpha_ri=0, num_aug=3)
    a = augment_rows(rows, "text", cfg, seed=7)
    assert a == augment_rows(rows, "text", cfg, seed=7)
    assert a != augment_rows(rows, "text", cfg, seed=8)
    assert len(a) == 6 * 4
    for i in range(6):
        group = a[4 * i: 4 * i + 4]
        assert group[0] is rows[i] and all(g["label"] == rows[i]["label"] and g["id"] == i for g in group)
    # a row's copies do not depend on the rows after it
    assert augment_rows(rows[:3], "text", cfg, seed=7) == a[:12]
    # each row draws its own operations: as word positions, the rows' copies differ
    patterns = [[[r["text"].split().index(w) for w in g["text"].split()] for g in a[4 * i + 1: 4 * i + 4]] for i, r in enumerate(rows)]
    assert len({json.dumps(p) for p in patterns}) > 1


def test_wordnet_missing_is_one_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "nltk", None)  # import nltk fails as if not installed
    monkeypatch.setitem(sys.modules, "nltk.corpus", None)
    with pytest.raises(ConfigError) as e:
        augment_rows([{"text": "a b"}], "text", EDAConfig(), seed=0)
    msg = str(e.value)
    assert "\n" not in msg and "WordNet" in msg and "nltk.downloader wordnet" in msg and "alpha_sr=0" in msg
    # swap and deletion need no WordNet
    assert len(augment_rows([{"text": "a b c"}], "text", EDAConfig(alpha_sr=0, alpha_ri=0, num_aug=2), seed=0)) == 3


@pytest.mark.parametrize("exc,needle", [(LookupError("Resource wordnet not found"), "no WordNet data"),
                                        (OSError("No such file or directory: 'index.sense'"), "index.sense")])
def test_nltk_without_usable_wordnet_data_is_one_config_error(monkeypatch, exc, needle):
    import types

    class Reader:
        def ensure_loaded(self):
            raise exc

    corpus = types.ModuleType("nltk.corpus")
    corpus.wordnet = Reader()
    nltk = types.ModuleType("nltk")
    nltk.corpus = corpus
    monkeypatch.setitem(sys.modules, "nltk", nltk)
    monkeypatch.setitem(sys.modules, "nltk.corpus", corpus)
    with pytest.raises(ConfigError) as e:
        augment_rows([{"text": "a b"}], "text", EDAConfig(alpha_sr=0, alpha_ri=0.2), seed=0)
    assert "\n" not in str(e.value) and needle in str(e.value) and "nltk.downloader wordnet" in str(e.value)


def test_eda_with_real_wordnet_when_installed():
    try:
        from graftkit.train.augment import wordnet_synonyms

        syn = wordnet_synonyms()
    except ConfigError as exc:
        assert "WordNet" in str(exc)
        pytest.skip("nltk's WordNet is not installed here (the refusal is checked above)")
    assert "film" in syn("movie")
    out = augment_rows([{"text": "a good movie with a great plot"}], "text", EDAConfig(num_aug=8), seed=0)
    assert len(out) == 9 and out == augment_rows([{"text": "a good movie with a great plot"}], "text", EDAConfig(num_aug=8), seed=0)


# -- the contrastive loss -----------------------------------------------------------------------

def test_supervised_contrastive_hand_value():
    z = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])  # cosines are 1, 0 or -1
    y = torch.tensor([0, 0, 1, 1])
    e = math.e
    l0 = -math.log(e / (e + 1 + 1 / e))  # anchor 0: positive 1 (cos 1); others 2 (0), 3 (-1)
    l1 = l0
    l2 = -math.log(1 / 3)  # anchor 2: positive 3 (cos 0); others cos 0, 0
    l3 = -math.log(1 / (1 + 2 / e))  # anchor 3: positive 2 (cos 0); others 0, 1 at cos -1
    want = (l0 + l1 + l2 + l3) / 4
    assert supervised_contrastive(z, y, 1.0).item() == pytest.approx(want, rel=1e-6)
    # temperature 0.5 doubles every logit
    l0 = -math.log(e ** 2 / (e ** 2 + 1 + e ** -2))
    l3 = -math.log(1 / (1 + 2 * e ** -2))
    assert supervised_contrastive(z, y, 0.5).item() == pytest.approx((2 * l0 + math.log(3) + l3) / 4, rel=1e-6)
    # anchors without a positive do not count; none at all gives 0 with a gradient path
    z2 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    one = supervised_contrastive(z2, torch.tensor([0, 0, 1]), 1.0)
    assert one.item() == pytest.approx(-math.log(e / (e + 1)), rel=1e-6)
    zero = supervised_contrastive(z2, torch.tensor([0, 1, 2]), 1.0)
    zero.backward()
    assert zero.item() == 0.0 and z2.grad is not None


# -- mixup ------------------------------------------------------------------------------------

def _tiny(kind: str):
    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                      max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
        return transformers.BertForSequenceClassification(cfg).eval()
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=32, num_labels=3, pad_token_id=0)
    return transformers.LlamaForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_mixup_loss_and_gradient_equal_the_hand_computed_mixed_cross_entropy(kind):
    from graftkit.train.recipe import AugmentConfig

    model = _tiny(kind)
    batch = collate([{"input_ids": [5, 6, 7, 8], "label": 0}, {"input_ids": [9, 10], "label": 2},
                     {"input_ids": [11, 12, 13], "label": 1}, {"input_ids": [14, 15, 16, 17], "label": 2}], pad_id=0)
    lam, perm = 0.7, [2, 0, 3, 1]
    batch["mix_lambda"], batch["mix_perm"] = torch.tensor(lam), torch.tensor(perm)
    head = "classifier" if kind == "bert" else "score"
    aug = SentenceAugment(model, head, AugmentConfig(mixup={"alpha": 0.4}))
    logits, ce, aux = aug.loss(model, batch)
    assert aux is None
    got = ce.mean()
    got_grads = torch.autograd.grad(got, list(model.parameters()), allow_unused=True)

    # by hand: the sentence vector each head reads, mixed, through the head's own layer
    mask, y = batch["attention_mask"], batch["labels"]
    if kind == "bert":
        z = model.bert(input_ids=batch["input_ids"], attention_mask=mask).pooler_output
    else:
        h = model.model(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
        z = h[torch.arange(4), mask.sum(1) - 1]  # right-padded: the last real token
    logits = getattr(model, head)(lam * z + (1 - lam) * z[perm])
    want = (lam * torch.nn.functional.cross_entropy(logits, y, reduction="none")
            + (1 - lam) * torch.nn.functional.cross_entropy(logits, y[perm], reduction="none")).mean()
    want_grads = torch.autograd.grad(want, list(model.parameters()), allow_unused=True)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    for g, w in zip(got_grads, want_grads):
        assert (g is None) == (w is None)
        if g is not None:
            assert torch.allclose(g, w, atol=1e-6, rtol=1e-4)
    # lambda = 1 is the plain cross-entropy
    batch["mix_lambda"] = torch.tensor(1.0)
    plain = torch.nn.functional.cross_entropy(model(input_ids=batch["input_ids"], attention_mask=mask).logits, y)
    assert aug.loss(model, batch)[1].mean().item() == pytest.approx(plain.item(), rel=1e-5)


def test_contrastive_term_reads_the_unmixed_sentence_vectors_and_is_weighted():
    from graftkit.train.recipe import AugmentConfig

    model = _tiny("bert")
    batch = collate([{"input_ids": [5, 6, 7], "label": 0}, {"input_ids": [8, 9], "label": 0}, {"input_ids": [10, 11, 12], "label": 1},
                     {"input_ids": [13, 14, 15, 16], "label": 1}], pad_id=0)
    batch["mix_lambda"], batch["mix_perm"] = torch.tensor(0.6), torch.tensor([1, 2, 3, 0])
    aug = SentenceAugment(model, "classifier", AugmentConfig(mixup={"alpha": 1}, contrastive={"weight": 0.25, "temperature": 0.5}))
    _, ce, aux = aug.loss(model, batch)
    z = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
    want = supervised_contrastive(z, batch["labels"], 0.5)
    assert aux.item() == pytest.approx(want.item(), rel=1e-5)
    assert aug.combine(ce.mean(), aux).item() == pytest.approx(0.75 * ce.mean().item() + 0.25 * want.item(), rel=1e-5)


def test_mixup_draw_is_a_pure_function_of_its_position():
    a = mixup_draw(0.4, 8, seed=3, index=5, rank=0)
    assert torch.equal(a["mix_lambda"], mixup_draw(0.4, 8, 3, 5, 0)["mix_lambda"])
    assert torch.equal(a["mix_perm"], mixup_draw(0.4, 8, 3, 5, 0)["mix_perm"])
    assert sorted(a["mix_perm"].tolist()) == list(range(8)) and 0 <= float(a["mix_lambda"]) <= 1
    others = [mixup_draw(0.4, 8, 3, 6, 0), mixup_draw(0.4, 8, 3, 5, 1), mixup_draw(0.4, 8, 4, 5, 0)]
    assert all(float(o["mix_lambda"]) != float(a["mix_lambda"]) for o in others)


# -- recipes and runs -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("augment_assets")
    tok = gk.load_tokenizer("minilm")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    transformers.BertModel(cfg).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    write_jsonl(root / "train.jsonl", _rows(32, 0))
    write_jsonl(root / "val.jsonl", _rows(16, 1))
    write_jsonl(root / "chat.jsonl", [{"prompt": f"say {w} now please", "response": f"{w} {w}"} for w in WORDS["pos"] * 2])
    return root


def recipe(assets: Path, out: Path, augment: dict | None, **over) -> dict:
    r = {"model": str(assets / "bert"), "task": "classification",
         "data": {"train": str(assets / "train.jsonl"), "validation": str(assets / "val.jsonl"), "max_length": 16},
         "method": {"method": "full"}, "optim": {"lr": 3e-3, "batch_size": 4, "max_steps": 40, "warmup_steps": 2},
         "eval": {"every": 40}, "output": {"dir": str(out)}}
    if augment is not None:
        r["augment"] = augment
    r.update(over)
    return r


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("augment,method,lr", [
    ({"eda": {"alpha_sr": 0, "alpha_ri": 0, "alpha_rs": 0.2, "p_rd": 0.2, "num_aug": 2}}, {"method": "full"}, 3e-3),
    ({"mixup": {"alpha": 0.4}}, {"method": "full"}, 3e-3),
    ({"contrastive": {"weight": 0.3, "temperature": 0.3}}, {"method": "lora", "r": 4, "targets": ["query", "value"]}, 3e-2),
], ids=["eda", "mixup", "contrastive-lora"])
def test_a_tiny_graft_train_classification_run_learns_with_each_option(assets, tmp_path, capsys, augment, method, lr):
    import yaml

    out = tmp_path / "run"
    r = recipe(assets, out, augment, method=method, optim={"lr": lr, "batch_size": 4, "max_steps": 40, "warmup_steps": 2})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    code = graft_main(["train", str(tmp_path / "r.yaml"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    ls = _losses(out)
    assert len(ls) == 40 and all(math.isfinite(x) for x in ls)
    assert sum(ls[-4:]) / 4 < 0.7 * sum(ls[:4]) / 4, ls
    run = json.loads((out / "run.json").read_text())
    assert math.isfinite(run["summary"]["val_loss"]) and run["summary"]["val_accuracy"] >= 0.9
    assert run["recipe"]["augment"] == parse_recipe(r).resolved()["augment"]
    if "eda" in augment:
        assert "96 training examples" in capsys.readouterr().out  # 32 rows and 2 copies of each


def test_training_set_grows_by_num_aug_and_chat_responses_stay(assets, tmp_path):
    tok = gk.load_tokenizer(assets / "bert")
    aug = {"eda": {"alpha_sr": 0, "alpha_ri": 0, "num_aug": 3}}
    plain = prepare(parse_recipe(recipe(assets, tmp_path / "a", None)), tok, 64)
    a = prepare(parse_recipe(recipe(assets, tmp_path / "a", aug)), tok, 64)
    b = prepare(parse_recipe(recipe(assets, tmp_path / "a", aug)), tok, 64)
    assert len(a.train) == 4 * len(plain.train) and a.train == b.train
    assert a.train[::4] == plain.train and a.validation == plain.validation  # originals kept, validation untouched
    assert [e["label"] for e in a.train] == [e["label"] for e in plain.train for _ in range(4)]
    other = prepare(parse_recipe(recipe(assets, tmp_path / "a", aug, optim={"seed": 1, "batch_size": 4, "max_steps": 40})), tok, 64)
    assert other.train != a.train

    chat_tok = gk.load_tokenizer(assets / "bert")
    chat_tok.chat_template = CHAT_TEMPLATE
    chat = {"model": str(assets / "bert"), "task": "causal-lm", "data": {"train": str(assets / "chat.jsonl"), "prompt_field": "prompt",
                                                                         "response_field": "response", "max_length": 32},
            "output": {"dir": str(tmp_path / "c")}, "augment": {"eda": {"alpha_sr": 0, "alpha_ri": 0, "alpha_rs": 0.5, "p_rd": 0.3, "num_aug": 2}}}
    c = prepare(parse_recipe(chat), chat_tok, 64)
    assert len(c.train) == 3 * 12
    for i in range(12):
        group = c.train[3 * i: 3 * i + 3]
        targets = [[t for t in e["labels"] if t != IGNORE] for e in group]
        assert targets[0] and targets[1] == targets[0] and targets[2] == targets[0]  # the response, untouched
    assert any(e["input_ids"] != c.train[3 * (k // 3)]["input_ids"] for k, e in enumerate(c.train) if k % 3)


def test_mixup_and_eda_resume_bitwise(assets, tmp_path):
    aug = {"eda": {"alpha_sr": 0, "alpha_ri": 0, "num_aug": 1}, "mixup": {"alpha": 0.4}, "contrastive": {"weight": 0.2}}
    full = tmp_path / "full"
    train(parse_recipe(recipe(assets, full, aug, output={"dir": str(full), "checkpoint_every": 5, "keep_checkpoints": 4},
                              optim={"lr": 3e-3, "batch_size": 4, "max_steps": 10})), progress=False)
    again = tmp_path / "again"
    shutil.copytree(full, again)
    shutil.rmtree(again / "adapter")
    summary = train(parse_recipe(recipe(assets, again, aug, output={"dir": str(again), "checkpoint_every": 5, "keep_checkpoints": 4},
                                        optim={"lr": 3e-3, "batch_size": 4, "max_steps": 10})), resume=True, progress=False)
    assert summary["resumed_from"] == 5
    a = read_safetensors(full / "adapter" / "adapter.safetensors")
    b = read_safetensors(again / "adapter" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in p.read_text().splitlines()]  # noqa: E731
    assert strip(full / "metrics.jsonl") == strip(again / "metrics.jsonl")


# -- bad input --------------------------------------------------------------------------------

def _chat(assets, tmp_path, augment, **data):
    return {"model": str(assets / "bert"), "task": "causal-lm", "output": {"dir": str(tmp_path / "out")}, "augment": augment,
            "data": {"train": str(assets / "chat.jsonl"), "prompt_field": "prompt", "response_field": "response", **data}}


@pytest.mark.parametrize("make,needles", [
    (lambda a, t: _chat(a, t, {"mixup": {"alpha": 1}}), ["augment.mixup", "classification", "causal-lm"]),
    (lambda a, t: _chat(a, t, {"contrastive": {"weight": 0.1}}), ["augment.contrastive", "classification"]),
    (lambda a, t: _chat(a, t, {"eda": {}}, prompt_field=None, response_field=None, text_field="prompt"), ["augment.eda", "plain-text LM"]),
    (lambda a, t: recipe(a, t / "o", {"eda": {"alpha_rs": 1.5}}), ["augment", "alpha_rs", "1.5", "less than or equal to 1"]),
    (lambda a, t: recipe(a, t / "o", {"eda": {"p_rd": -0.1}}), ["augment", "p_rd", "greater than or equal to 0"]),
    (lambda a, t: recipe(a, t / "o", {"eda": {"alpha_sr": 0, "alpha_ri": 0, "alpha_rs": 0, "p_rd": 0}}), ["every rate at 0"]),
    (lambda a, t: recipe(a, t / "o", {"contrastive": {"weight": 1.0}}), ["augment", "weight", "less than 1"]),
    (lambda a, t: recipe(a, t / "o", {"contrastive": {"weight": 0.1, "temperature": 0}}), ["temperature", "greater than 0"]),
    (lambda a, t: recipe(a, t / "o", {"mixup": {"alpha": 0}}), ["alpha", "greater than 0"]),
    (lambda a, t: recipe(a, t / "o", {"mixup": {"alpah": 1}}), ["unknown key", "alpah"]),
    (lambda a, t: recipe(a, t / "o", {}), ["augment names no augmentation"]),
    (lambda a, t: recipe(a, t / "o", {"mixup": {"alpha": 1}}, init_from=str(t), distill={"teacher": str(t), "weight": 0.5}),
     ["distill", "augment.mixup"]),  # refused by the distill check (train.distill): the teacher sees clean inputs
], ids=["mixup-lm", "contrastive-lm", "eda-plain-lm", "rate-above-1", "rate-below-0", "all-zero", "weight-1", "temperature-0",
        "alpha-0", "typo", "empty", "mixup-distill"])
def test_bad_augment_recipes_are_one_line(assets, tmp_path, capsys, make, needles):
    import yaml

    from graftkit.train.recipe import Recipe

    if "distill" in needles[0] and "distill" not in Recipe.model_fields:
        pytest.skip("this tree has no distill section yet")

    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(make(assets, tmp_path)))
    code = graft_main(["train", str(f), "--no-progress"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("graft: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not (tmp_path / "o").exists() and not (tmp_path / "out").exists()


def test_synonym_replacement_without_wordnet_is_one_line_and_writes_nothing(assets, tmp_path, capsys, monkeypatch):
    import yaml

    monkeypatch.setitem(sys.modules, "nltk", None)
    monkeypatch.setitem(sys.modules, "nltk.corpus", None)
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(recipe(assets, tmp_path / "o", {"eda": {"alpha_sr": 0.1}})))
    code = graft_main(["train", str(f), "--no-progress"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "WordNet" in lines[0] and "pip install nltk" in lines[0], err
    assert not (tmp_path / "o").exists()
