"""``tokenizer_source: union`` (and ``base`` / a folder) for models with different vocabularies:
the union and the row alignment as pure functions checked by hand, merges of tiny Llamas with two
word-level tokenizers that load in transformers and generate, parity with the real mergekit
0.1.5's union, and the bad inputs."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
import yaml

import graftkit as gk
from graftkit.cli import main
from graftkit.errors import ConfigError
from graftkit.merge.vocab import Vocab, align_rows, check_overlap, permutation, union_additions
from merge_helpers import load_folder, run_mergekit

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
WORDS_A = SPECIALS + ["the", "cat", "dog", "sat", "on", "mat", "a", "red"]
WORDS_B = SPECIALS + ["dog", "the", "ran", "cat", "fast", "blue", "a"]
WORDS_C = SPECIALS + ["cat", "green", "the", "ran", "mat"]


def word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")


def word_llama(path, words, seed):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=3)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    word_tokenizer(words).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("union")
    return {"a": word_llama(root / "a", WORDS_A, 0), "b": word_llama(root / "b", WORDS_B, 1),
            "c": word_llama(root / "c", WORDS_C, 2), "root": root}


def linear(folders, names, **extra):
    return {"merge_method": "linear", "base_model": str(folders[names[0]]), "dtype": "float32",
            "models": [{"model": str(folders[n]), "parameters": {"weight": 1.0}} for n in names], **extra}


# -- pure functions ---------------------------------------------------------------------------------

def test_union_adds_the_others_tokens_in_order():
    a = Vocab({"x": 0, "y": 1, "<s>": 2}, {"<s>": "S"}, rows=3)
    b = Vocab({"z": 0, "y": 1, "w": 2, "pad": 3, "<t>": 4}, {"<t>": "T"}, rows=4)  # "<t>" is past b's rows: unused
    new, added = union_additions(a, [b])
    assert new == ["z", "w", "pad"] and added == ["S"]


def test_permutation_marks_missing_and_padding_ids():
    out = {"x": 0, "y": 1, "z": 2}
    assert permutation(out, Vocab({"y": 0, "x": 1, "z": 5}, rows=3)) == [1, 0, -1]


def test_align_rows_fills_missing_tokens_by_the_rule():
    # output tokens: 0 in all, 1 only in model 1, 2 in base and model 1, 3 in models 1 and 2 (not base), 4 in none
    perms = [[0, -1, 1, -1, -1], [2, 0, 1, 3, -1], [0, -1, -1, 1, -1]]
    t = [torch.arange(4.0).view(2, 2) + 10, torch.arange(8.0).view(4, 2) + 20, torch.arange(4.0).view(2, 2) + 30]
    out = align_rows(t, perms, base_index=0)
    assert [o.shape for o in out] == [(5, 2)] * 3
    for k in range(3):  # a model's own rows stay
        for i, j in enumerate(perms[k]):
            if j >= 0:
                assert torch.equal(out[k][i], t[k][j])
    assert torch.equal(out[0][1], t[1][0]) and torch.equal(out[2][1], t[1][0])  # one donor: its row
    assert torch.equal(out[2][2], t[0][1])  # the base has it: the base's row (a zero task vector)
    assert torch.equal(out[0][3], (t[1][3] + t[2][1]) / 2)  # the base lacks it: the mean of those that have it
    assert torch.equal(out[1][4], torch.zeros(2))  # nobody has it: zeros
    no_base = align_rows(t, perms, base_index=None)
    assert torch.equal(no_base[2][2], (t[0][1] + t[1][1]) / 2)  # no base: the mean


def test_no_common_token_is_refused():
    with pytest.raises(ConfigError, match="shares no token"):
        check_overlap([[0, 1, -1, -1], [-1, -1, 0, 1]], ["a", "b"])


# -- real merges ------------------------------------------------------------------------------------

def rows(folder):
    sd = load_folder(folder)
    return sd["model.embed_tokens.weight"], sd["lm_head.weight"]


def test_union_merge_aligns_rows_by_token_and_generates(folders, tmp_path, monkeypatch):
    import graftkit.merge.vocab as vocab

    monkeypatch.setattr(vocab, "ALIGN_ROWS", 4)  # rows aligned in blocks of 4: the blocks must join up
    out = gk.merge(linear(folders, ["a", "b"], tokenizer_source="union"), tmp_path / "u")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    vocab = tok.get_vocab()
    assert list(vocab)[:0] == [] and set(vocab) == set(WORDS_A) | set(WORDS_B)
    assert {w: vocab[w] for w in WORDS_A} == {w: i for i, w in enumerate(WORDS_A)}  # the base's ids stay
    assert sorted(vocab[w] for w in ["ran", "fast", "blue"]) == [12, 13, 14]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 15
    (ea, ha), (eb, hb), (eo, ho) = rows(folders["a"]), rows(folders["b"]), rows(out)
    ia, ib = {w: i for i, w in enumerate(WORDS_A)}, {w: i for i, w in enumerate(WORDS_B)}
    for mine, a, b in [(eo, ea, eb), (ho, ha, hb)]:
        assert mine.shape == (15, 32)
        for w, i in vocab.items():
            if w in ia and w in ib:
                want = (a[ia[w]] + b[ib[w]]) / 2
            else:
                want = a[ia[w]] if w in ia else b[ib[w]]  # one model has it: both rows are its row
            torch.testing.assert_close(mine[i], want, rtol=0, atol=1e-7)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tok("the dog ran fast", return_tensors="pt").input_ids
    assert ids.tolist() == [[vocab["the"], vocab["dog"], vocab["ran"], vocab["fast"]]]
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 7)


def test_union_task_arithmetic_fills_from_the_base_first(folders, tmp_path):
    cfg = {"merge_method": "task_arithmetic", "base_model": str(folders["a"]), "dtype": "float32", "tokenizer_source": "union",
           "models": [{"model": str(folders[n]), "parameters": {"weight": 1.0}} for n in ("b", "c")]}
    out = gk.merge(cfg, tmp_path / "ta")
    vocab = transformers.AutoTokenizer.from_pretrained(out).get_vocab()
    assert set(vocab) == set(WORDS_A) | set(WORDS_B) | set(WORDS_C)
    (ea, _), (eb, _), (ec, _), (eo, _) = rows(folders["a"]), rows(folders["b"]), rows(folders["c"]), rows(out)
    ia, ib, ic = ({w: i for i, w in enumerate(ws)} for ws in (WORDS_A, WORDS_B, WORDS_C))
    a, b, c = (lambda w: ea[ia[w]]), (lambda w: eb[ib[w]]), (lambda w: ec[ic[w]])
    torch.testing.assert_close(eo[vocab["cat"]], a("cat") + (b("cat") - a("cat")) + (c("cat") - a("cat")), rtol=0, atol=1e-6)
    # "mat": base a and c have it, b lacks it -> b gets the base's row (no change), so c's change alone remains
    torch.testing.assert_close(eo[vocab["mat"]], c("mat"), rtol=0, atol=1e-6)
    # "ran": b and c have it, the base lacks it -> the base's row is their mean
    torch.testing.assert_close(eo[vocab["ran"]], (b("ran") + c("ran")) / 2, rtol=0, atol=1e-6)
    # "green": only c -> every model gets c's row
    torch.testing.assert_close(eo[vocab["green"]], c("green"), rtol=0, atol=0)


def test_tokenizer_source_folder_aligns_to_that_vocabulary(folders, tmp_path):
    out = gk.merge(linear(folders, ["a", "b"], tokenizer_source=str(folders["c"])), tmp_path / "c")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == {w: i for i, w in enumerate(WORDS_C)}
    (ea, _), (eb, _), (eo, _) = rows(folders["a"]), rows(folders["b"]), rows(out)
    ia, ib = {w: i for i, w in enumerate(WORDS_A)}, {w: i for i, w in enumerate(WORDS_B)}
    assert eo.shape == (len(WORDS_C), 32)
    torch.testing.assert_close(eo[WORDS_C.index("cat")], (ea[ia["cat"]] + eb[ib["cat"]]) / 2, rtol=0, atol=1e-7)
    torch.testing.assert_close(eo[WORDS_C.index("ran")], eb[ib["ran"]], rtol=0, atol=0)
    torch.testing.assert_close(eo[WORDS_C.index("green")], torch.zeros(32), rtol=0, atol=0)  # in neither model
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(WORDS_C)


@pytest.mark.parametrize("recipe", ["linear", "slices"])
def test_union_parity_with_mergekit(union_parity, recipe):
    mk, ours = union_parity[recipe]
    mk_vocab = transformers.AutoTokenizer.from_pretrained(mk).get_vocab()
    gk_vocab = transformers.AutoTokenizer.from_pretrained(ours).get_vocab()
    assert set(mk_vocab) == set(gk_vocab)
    a, b = load_folder(mk), load_folder(ours)
    assert sorted(a) == sorted(b)
    for k in a:
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            for w, i in mk_vocab.items():  # ids of the added tokens may differ; rows match by token
                torch.testing.assert_close(b[k][gk_vocab[w]], a[k][i], rtol=1e-6, atol=1e-6)
        else:
            torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-6)
    mk_cfg, gk_cfg = (json.loads((p / "config.json").read_text()) for p in (mk, ours))
    assert gk_cfg["vocab_size"] == mk_cfg["vocab_size"] == len(mk_vocab)
    assert gk_cfg["num_hidden_layers"] == mk_cfg["num_hidden_layers"]


@pytest.fixture(scope="module")
def union_parity(folders):
    """mergekit 0.1.5 and graftkit on the same union recipes (one mergekit subprocess for all): linear
    over two tokenizers, and a passthrough stack of a's layers then b's (each vocabulary tensor is
    aligned over the model that supplies it: a token the embedding's model lacks gets zeros)."""
    pytest.importorskip("mergekit")
    root = folders["root"] / "parity"
    root.mkdir()
    lin = linear(folders, ["a", "b"], tokenizer_source="union")
    lin["models"][1]["parameters"]["weight"] = 0.4
    stack = {"merge_method": "passthrough", "dtype": "float32", "tokenizer_source": "union", "base_model": str(folders["a"]),
             "slices": [{"sources": [{"model": str(folders["a"]), "layer_range": [0, 2]}]},
                        {"sources": [{"model": str(folders["b"]), "layer_range": [0, 2]}]}]}
    jobs = []
    for name, cfg in {"linear": lin, "slices": stack}.items():
        (root / f"{name}.yml").write_text(yaml.safe_dump(cfg))
        jobs.append((str(root / f"{name}.yml"), str(root / f"mk_{name}")))
    run_mergekit(jobs, copy_tokenizer=True)
    return {name: (root / f"mk_{name}", gk.merge(root / f"{name}.yml", root / f"gk_{name}")) for name in ("linear", "slices")}


def test_union_slices_zero_rows_for_tokens_the_supplying_model_lacks(union_parity):
    _, ours = union_parity["slices"]
    vocab = transformers.AutoTokenizer.from_pretrained(ours).get_vocab()
    out, (ea, _), (_, hb) = load_folder(ours), rows(ours.parent.parent / "a"), rows(ours.parent.parent / "b")
    ia, ib = {w: i for i, w in enumerate(WORDS_A)}, {w: i for i, w in enumerate(WORDS_B)}
    assert torch.equal(out["model.embed_tokens.weight"][vocab["red"]], ea[ia["red"]])  # the embeddings are a's
    assert torch.equal(out["model.embed_tokens.weight"][vocab["ran"]], torch.zeros(32))  # a lacks "ran"
    assert torch.equal(out["lm_head.weight"][vocab["ran"]], hb[ib["ran"]])  # the head is b's
    assert torch.equal(out["lm_head.weight"][vocab["red"]], torch.zeros(32))  # b lacks "red"
    assert json.loads((ours / "config.json").read_text())["num_hidden_layers"] == 4
    model = transformers.AutoModelForCausalLM.from_pretrained(ours).eval()
    with torch.no_grad():
        assert model.generate(torch.tensor([[vocab["the"], vocab["ran"]]]), max_new_tokens=2, do_sample=False).shape == (1, 4)


def bad_cli(tmp_path, capsys, cfg, *extra) -> str:
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    rc = main(["merge", str(path), str(tmp_path / "bad_out"), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("graft: error:"), err
    assert not (tmp_path / "bad_out").exists() and not list(tmp_path.glob(".bad_out*"))
    return err


@pytest.mark.parametrize("dry", [[], ["--dry-run"]], ids=["run", "dry-run"])
def test_different_vocabularies_without_union_point_to_it(folders, tmp_path, capsys, dry):
    err = bad_cli(tmp_path, capsys, linear(folders, ["a", "b"]), *dry)
    assert "tokenizer_source: union" in err


def test_same_size_vocabularies_in_another_order_point_to_union(folders, tmp_path, capsys):
    # as many tokens as a's, but two swapped: merging row by row would mix "cat" with "dog"
    swapped = list(WORDS_A)
    swapped[5], swapped[6] = swapped[6], swapped[5]
    word_llama(tmp_path / "swapped", swapped, 3)
    cfg = linear(folders, ["a"])
    cfg["models"].append({"model": str(tmp_path / "swapped"), "parameters": {"weight": 1.0}})
    err = bad_cli(tmp_path, capsys, cfg)
    assert "different vocabularies" in err and "'cat'" in err and "tokenizer_source: union" in err
    # with union the rows are aligned: "cat" of the output is the mean of both models' "cat" rows
    out = gk.merge({**cfg, "tokenizer_source": "union"}, tmp_path / "u")
    (ea, _), (es, _), (eo, _) = rows(folders["a"]), rows(tmp_path / "swapped"), rows(out)
    torch.testing.assert_close(eo[5], (ea[5] + es[6]) / 2, rtol=0, atol=1e-7)


def test_slices_of_different_vocabularies_point_to_union(folders, tmp_path, capsys):
    stack = {"merge_method": "passthrough",
             "slices": [{"sources": [{"model": str(folders["a"]), "layer_range": [0, 2]}]},
                        {"sources": [{"model": str(folders["b"]), "layer_range": [0, 2]}]}]}
    assert "tokenizer_source: union" in bad_cli(tmp_path, capsys, stack)
    from graftkit.merge.vocab import check_same_rows  # without tokenizer files: the embedding sizes alone

    with pytest.raises(ConfigError, match="12 embedding rows.*11.*tokenizer_source: union"):
        check_same_rows({str(folders[n]): gk.tensors.Checkpoint(folders[n]) for n in ("a", "b")})


@pytest.mark.parametrize("dry", [[], ["--dry-run"]], ids=["run", "dry-run"])
def test_union_with_no_common_token(folders, tmp_path, capsys, dry):
    words = ["[UNK]", "[BOS]", "[EOS]", "[PAD]", "uno", "dos", "tres", "cuatro"]
    torch.manual_seed(5)
    cfg = transformers.LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "es")
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]").save_pretrained(tmp_path / "es")
    cfg = linear(folders, ["a"], tokenizer_source="union")
    cfg["models"].append({"model": str(tmp_path / "es"), "parameters": {"weight": 1.0}})
    err = bad_cli(tmp_path, capsys, cfg, *dry)
    assert "shares no token" in err and "es" in err


def test_union_without_a_base_tokenizer(folders, tmp_path, capsys):
    import shutil

    shutil.copytree(folders["a"], tmp_path / "bare")
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        (tmp_path / "bare" / f).unlink(missing_ok=True)
    cfg = linear(folders, ["b"], tokenizer_source="union")
    cfg["base_model"] = str(tmp_path / "bare")
    cfg["models"].insert(0, {"model": str(tmp_path / "bare"), "parameters": {"weight": 1.0}})
    err = bad_cli(tmp_path, capsys, cfg)
    assert "union" in err and "no tokenizer files" in err


def test_dry_run_describes_the_union_and_leaves_no_temporary_rows(folders, tmp_path, capsys):
    import glob
    import tempfile

    before = set(glob.glob(f"{tempfile.gettempdir()}/graft-vocab-*"))
    path = tmp_path / "u.yml"
    path.write_text(yaml.safe_dump(linear(folders, ["a", "b"], tokenizer_source="union")))
    capsys.readouterr()
    assert main(["merge", str(path), str(tmp_path / "o"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "vocabulary    15 tokens (union; 3 beyond the first model's)" in text, text
    assert not (tmp_path / "o").exists()
    assert main(["merge", str(path), str(tmp_path / "o")]) == 0
    assert set(glob.glob(f"{tempfile.gettempdir()}/graft-vocab-*")) == before


@pytest.mark.real
def test_union_of_the_smollm2_tokenizer_and_an_extended_copy(tmp_path):
    """The packaged SmolLM2 BPE tokenizer and a copy with two added special tokens and two new words,
    on tiny Llamas of those vocabulary sizes: the union keeps SmolLM2's ids, adds the four tokens with
    their special flags, aligns the rows by token, and matches mergekit 0.1.5's union."""
    pytest.importorskip("mergekit")
    base_tok = gk.load_tokenizer("smollm2")
    ext = gk.load_tokenizer("smollm2")
    ext.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    ext.add_tokens(["graftkit", "frankenmerge"])
    for name, tok, seed in (("a", base_tok, 0), ("b", ext, 1)):
        torch.manual_seed(seed)
        cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
        transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    recipe = {"merge_method": "linear", "base_model": str(tmp_path / "a"), "dtype": "float32", "tokenizer_source": "union",
              "models": [{"model": str(tmp_path / n), "parameters": {"weight": 1.0}} for n in ("a", "b")]}
    path = tmp_path / "u.yml"
    path.write_text(yaml.safe_dump(recipe))
    ours = gk.merge(path, tmp_path / "gk")
    out_tok = transformers.AutoTokenizer.from_pretrained(ours)
    vocab = out_tok.get_vocab()
    assert len(vocab) == len(base_tok) + 4 and all(vocab[t] == i for t, i in base_tok.get_vocab().items())
    special = {info.content: info.special for info in out_tok.added_tokens_decoder.values()}
    assert special["<tool_call>"] and special["</tool_call>"] and not special["graftkit"]
    assert out_tok("<tool_call>graftkit").input_ids[:2] == [vocab["<tool_call>"], vocab["graftkit"]]
    (ea, _), (eb, _), (eo, _) = rows(tmp_path / "a"), rows(tmp_path / "b"), rows(ours)
    vb = ext.get_vocab()
    for t in ("<tool_call>", "graftkit"):
        assert torch.equal(eo[vocab[t]], eb[vb[t]])
    torch.testing.assert_close(eo[vocab["Hello"]], (ea[vocab["Hello"]] + eb[vb["Hello"]]) / 2, rtol=0, atol=1e-7)
    run_mergekit([(path, tmp_path / "mk")], copy_tokenizer=True)
    mk_vocab = transformers.AutoTokenizer.from_pretrained(tmp_path / "mk").get_vocab()
    assert set(mk_vocab) == set(vocab)
    mk = load_folder(tmp_path / "mk")["model.embed_tokens.weight"]
    ids = torch.tensor([vocab[t] for t in mk_vocab])
    torch.testing.assert_close(eo[ids], mk[torch.tensor(list(mk_vocab.values()))], rtol=1e-6, atol=1e-6)
