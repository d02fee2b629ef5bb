"""graftkit.files, the one reader of user files, on real files on disk: every bad file is one line
that names the file and says what is wrong (not UTF-8 with the byte offset, empty, a bad JSON
line by its 1-based number, a FIFO or folder for what it is, random bytes not called a pickle);
then the same files through the real ``graft`` commands (exit 2, one line, nothing written),
and ``graft eval``'s results keyed by the task file's content.
"""
from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

from graftkit import files
from graftkit.cli import main as graft_main
from graftkit.errors import ConfigError, EvalError, FileFormatError, GraftError
from test_bad_input import graft, tree

RECIPE = b"model: tiny\nname: caf\xe9 au lait\n"
BAD_OFFSET = RECIPE.index(b"\xe9")  # 21: the first byte that is not UTF-8


def one_line(excinfo, cls=GraftError, *needles: str) -> str:
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, cls), type(excinfo.value)
    assert msg and "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


# -- text and YAML -------------------------------------------------------------------------------

def test_not_utf8_names_the_file_and_the_byte_offset(tmp_path):
    f = tmp_path / "recipe.yaml"
    f.write_bytes(RECIPE)
    assert BAD_OFFSET == 21
    with pytest.raises(ConfigError) as e:
        files.read_yaml(f, "recipe file")
    one_line(e, ConfigError, str(f), "not UTF-8", "byte offset 21 ", "line 2", "0xe9")
    # a byte-order mark is UTF-8, and counts in the offset
    f.write_bytes(files.BOM + RECIPE)
    with pytest.raises(ConfigError) as e:
        files.read_yaml(f, "recipe file")
    one_line(e, ConfigError, "byte offset 24 ")
    f.write_bytes(files.BOM + b"a: 1\n")
    assert files.read_yaml(f) == {"a": 1}
    # a bad byte on line 1 of a JSONL file, through the row reader
    d = tmp_path / "d.jsonl"
    d.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(FileFormatError) as e:
        files.read_rows(d)
    one_line(e, FileFormatError, str(d), "byte offset 25 ", "line 2")


def test_empty_files_say_empty(tmp_path):
    f = tmp_path / "e.jsonl"
    f.write_bytes(b"")
    for read in (files.read_text, files.read_yaml, files.read_jsonl, files.read_csv, files.read_parquet, files.read_rows):
        with pytest.raises(GraftError) as e:
            read(f)
        one_line(e, GraftError, str(f), "empty")
    f.write_text("# nothing but a comment\n\n")
    with pytest.raises(ConfigError) as e:
        files.read_yaml(f, "merge config")
    one_line(e, ConfigError, str(f), "empty")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\n")
    with pytest.raises(FileFormatError) as e:
        files.read_rows(blank)
    one_line(e, FileFormatError, str(blank), "holds no rows")
    header = tmp_path / "h.csv"
    header.write_text("text,label\n")
    with pytest.raises(FileFormatError, match="holds no rows"):
        files.read_rows(header)


def test_missing_folder_and_fifo_say_what_they_are(tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    # a FIFO is never opened (that would wait for a writer forever): each reader names it
    for read in (files.read_text, files.read_yaml, files.read_jsonl, files.read_rows, files.read_csv, files.read_parquet):
        with pytest.raises(GraftError) as e:
            read(fifo)
        assert "does not exist" not in one_line(e, GraftError, str(fifo), "is a FIFO (named pipe)")
    with pytest.raises(FileFormatError) as e:
        files.read_text(tmp_path)
    one_line(e, FileFormatError, str(tmp_path), "is a folder")
    with pytest.raises(FileFormatError) as e:
        files.read_text(tmp_path / "nope.txt", "task file")
    one_line(e, FileFormatError, "task file", "nope.txt", "does not exist")
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "gone")
    assert files.path_kind(link) == "a broken symbolic link"
    assert files.path_kind("/dev/null") == "a character device"


def test_yaml_syntax_and_control_characters(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("a: 1\nb: [unclosed\nc: 2\n")
    with pytest.raises(ConfigError) as e:
        files.read_yaml(f)
    one_line(e, ConfigError, "not valid YAML", "line")
    f.write_bytes(b"a: 1\nb: x\x01y\n")
    with pytest.raises(ConfigError) as e:
        files.read_yaml(f)
    one_line(e, ConfigError, "#x0001", "line 2")


# -- rows ----------------------------------------------------------------------------------------

def test_jsonl_bad_line_is_one_line_with_its_1_based_number(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": \n{"text": "c", "label": "y"}\n')
    with pytest.raises(FileFormatError) as e:
        files.read_jsonl(f)
    msg = one_line(e, FileFormatError, str(f), "line 3 is not valid JSON")
    assert "line 2" not in msg
    f.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(FileFormatError) as e:
        files.read_jsonl(f)
    one_line(e, FileFormatError, "line 2 is a JSON array")


def test_blank_lines_are_skipped_and_rows_keep_their_lines(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('\n{"t": 1}\n\n\n{"t": 2}\n\n')
    rows = files.read_rows(f)
    assert rows == [{"t": 1}, {"t": 2}] and rows.lines == [2, 5]
    assert rows.where(1) == "line 5" and rows[1:].where(0) == "line 5"  # slicing keeps the positions
    assert files.where([{"t": 1}], 0) == "row 1"


def test_json_array_csv_parquet_and_gzip(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 2}]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=1))
    assert files.read_rows(tmp_path / "a.json") == rows
    (tmp_path / "a.csv").write_text("text,label\na,1\nb,2\n")
    assert files.read_rows(tmp_path / "a.csv") == rows
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    assert files.read_rows(tmp_path / "a.parquet") == rows
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    assert files.read_rows(tmp_path / "a.jsonl.gz") == rows
    (tmp_path / "bad.csv").write_text("text,label\na,1\nb,2,3\n")
    with pytest.raises(FileFormatError) as e:
        files.read_rows(tmp_path / "bad.csv")
    one_line(e, FileFormatError, "bad.csv", "line 3")
    (tmp_path / "bad.parquet").write_bytes(os.urandom(64))
    with pytest.raises(FileFormatError) as e:
        files.read_rows(tmp_path / "bad.parquet")
    one_line(e, FileFormatError, "not a readable Parquet file")
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(FileFormatError) as e:
        files.read_rows(tmp_path / "bad.jsonl.gz")
    one_line(e, FileFormatError, "not a valid gzip file")
    with pytest.raises(ConfigError) as e:
        files.read_rows(tmp_path / "d.tsv", hint=" or set data.format")
    one_line(e, ConfigError, "cannot tell the format", "data.format")


def test_mixed_int_and_string_labels_name_both_lines(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": 0}\n{"text": "c", "label": "1"}\n')
    rows = files.read_rows(f)
    with pytest.raises(FileFormatError) as e:
        files.check_label_types(rows, "label", f)
    one_line(e, FileFormatError, str(f), "line 4 has label '1' (a string)", "line 1 has 1 (a number)")
    files.check_label_types(rows[:2], "label", f)  # all numbers: fine
    files.check_label_types([{"label": "a"}, {"label": None}, {"label": float("nan")}, {"label": "b"}], "label", f)
    with pytest.raises(FileFormatError, match=r"row 2: label field 'label' is a JSON array"):
        files.check_label_types([{"label": "a"}, {"label": [1]}], "label", f)


def test_mixed_labels_in_an_eval_task_file(tmp_path):
    from graftkit.eval.config import TaskSpec
    from graftkit.eval.tasks import load_task

    f = tmp_path / "t.jsonl"
    f.write_text('{"text": "a", "label": "1"}\n{"text": "b", "label": 1}\n')
    with pytest.raises(EvalError) as e:
        load_task(TaskSpec(name="t", kind="classification", file=str(f)))
    one_line(e, EvalError, str(f), "line 2", "line 1")


# -- weights files -------------------------------------------------------------------------------

def test_weights_kind_by_magic_bytes(tmp_path):
    from safetensors.torch import save_file

    t = {"w": torch.ones(2)}
    save_file(t, tmp_path / "a.safetensors")
    torch.save(t, tmp_path / "zip.bin")
    torch.save(t, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    (tmp_path / "proto2.pkl").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    (tmp_path / "rand.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "text.bin").write_text("root:x:0:0:root:/root:/bin/bash\n")
    got = {p.name: files.weights_kind(p) for p in sorted(tmp_path.iterdir())}
    assert got == {"a.safetensors": "safetensors", "legacy.bin": "pickle", "proto2.pkl": "pickle", "rand.bin": None,
                   "text.bin": None, "zip.bin": "torch-zip"}


@pytest.mark.parametrize("content", ["random", "passwd", "empty"])
def test_random_bytes_and_text_are_not_called_a_pickle(tmp_path, content):
    from graftkit.tensors import Checkpoint

    f = tmp_path / "weights.bin"
    if content == "passwd" and not Path("/etc/passwd").is_file():
        pytest.skip("no /etc/passwd on this machine")
    f.write_bytes({"random": bytes(range(7, 256)) * 8, "passwd": Path("/etc/passwd").read_bytes() if content == "passwd" else b"",
                   "empty": b""}[content])
    for path in (f, Path("/etc/passwd") if content == "passwd" else f):
        with pytest.raises(FileFormatError) as e:
            Checkpoint(path)
        msg = one_line(e, FileFormatError, str(path), "is not a safetensors file nor a PyTorch checkpoint")
        assert "pickle" not in msg
    folder = tmp_path / "model"  # the same bytes named like a checkpoint in a model folder
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(f.read_bytes())
    with pytest.raises(FileFormatError) as e:
        Checkpoint(folder)
    assert "pickle" not in one_line(e, FileFormatError, "not a safetensors file nor a PyTorch checkpoint")


def test_real_pickles_are_still_refused_as_pickles_and_safetensors_read_by_content(tmp_path):
    from safetensors.torch import save_file

    from graftkit.tensors import Checkpoint

    torch.save({"w": torch.ones(2)}, tmp_path / "w.bin")
    with pytest.raises(FileFormatError) as e:
        Checkpoint(tmp_path / "w.bin")
    one_line(e, FileFormatError, "is a pickled PyTorch file", "--allow-pickle")
    assert torch.equal(Checkpoint(tmp_path / "w.bin", allow_pickle=True).get("w"), torch.ones(2))
    save_file({"w": torch.zeros(3)}, tmp_path / "named.bin")  # safetensors under another name
    assert torch.equal(Checkpoint(tmp_path / "named.bin").get("w"), torch.zeros(3))
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(FileFormatError) as e:
        Checkpoint(tmp_path / "pipe")
    assert "does not exist" not in one_line(e, FileFormatError, "is a FIFO")


def test_inspect_cli_on_random_bytes_passwd_and_fifo(tmp_path):
    (tmp_path / "rand.bin").write_bytes(bytes(range(256)) * 4)
    os.mkfifo(tmp_path / "pipe")
    for target, needle in (("rand.bin", "not a safetensors file nor a PyTorch checkpoint"), ("pipe", "is a FIFO"),
                           ("/etc/passwd", "not a safetensors file nor a PyTorch checkpoint")):
        line = exits_2(tmp_path, "inspect", target, needles=(needle,))
        assert "pickle" not in line and "does not exist" not in line


# -- recipes through the real commands -----------------------------------------------------------

BAD_RECIPES = {
    "not-utf8": (RECIPE, ("not UTF-8", "byte offset 21 ", "line 2")),
    "empty": (b"", ("is empty",)),
    "comments-only": (b"# a recipe to be written\n\n", ("is empty",)),
    "bad-syntax": (b"base_model: [unclosed\nmodels: 1\n", ("not valid YAML", "line")),
    "control-char": (b"base_model: a\x00b\n", ("#x0000", "line 1")),
}
COMMANDS = {"train": ("train", "{f}"), "merge": ("merge", "{f}", "out"), "eval": ("eval", "{f}", "--out", "out"),
            "study": ("study", "{f}", "--out", "out")}


def exits_2(root: Path, *args, needles: tuple[str, ...] = ()) -> str:
    """What test_bad_input's check_cli_error asserts (one ``graft: error:`` line, no traceback,
    nothing written under ``root``), with the exit status pinned to 2."""
    before = tree(root)
    res = graft(*args, cwd=root)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stdout + res.stderr, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("graft: error:"), res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert tree(root) == before, "the failed command wrote files"
    assert not list(root.rglob("*.tmp-*")), "a temporary folder was left behind"
    return lines[0]


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_bad_recipe_files_through_the_cli(tmp_path, command, case):
    content, needles = BAD_RECIPES[case]
    (tmp_path / "r.yaml").write_bytes(content)
    exits_2(tmp_path, *[a.format(f="r.yaml") for a in COMMANDS[command]], needles=("r.yaml", *needles))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_fifo_and_folder_recipes_through_the_cli(tmp_path, command):
    os.mkfifo(tmp_path / "r.yaml")
    (tmp_path / "d.yaml").mkdir()
    for name, needle in (("r.yaml", "is a FIFO (named pipe)"), ("d.yaml", "is a folder")):
        line = exits_2(tmp_path, *[a.format(f=name) for a in COMMANDS[command]], needles=(name, needle))
        assert "does not exist" not in line


# -- data and task files through the real commands -----------------------------------------------

def _eval_config(tmp_path: Path, task_file: str, models=("a",)) -> Path:
    cfg = {"models": [{"name": m, "path": str(tmp_path / m)} for m in models],
           "tasks": [{"name": "topic", "kind": "classification", "file": task_file, "batch_size": 4, "max_length": 32}],
           "output": str(tmp_path / "out")}
    (tmp_path / "eval.yaml").write_text(json.dumps(cfg))
    return tmp_path / "eval.yaml"


@pytest.mark.parametrize("content,needles", [
    (b'{"text": "caf\xe9", "label": "x"}\n', ("not UTF-8", "byte offset 13 ", "line 1")),
    (b"", ("is empty",)),
    (b'{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c" "label": "x"}\n', ("line 3 is not valid JSON",)),
    (b'{"text": "a", "label": 1}\n{"text": "b", "label": "1"}\n', ("line 2 has label '1' (a string)", "line 1 has 1")),
])
def test_bad_task_files_through_graft_eval(tmp_path, content, needles):
    (tmp_path / "t.jsonl").write_bytes(content)
    cfg = _eval_config(tmp_path, str(tmp_path / "t.jsonl"))
    exits_2(tmp_path, "eval", cfg, needles=("t.jsonl", *needles))
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory):
    """Two constant-answer classifiers (always 'sports', always 'business') and a 7-row task file."""
    from eval_helpers import bert, save

    import graftkit as gk

    root = tmp_path_factory.mktemp("eval_pair")
    tok = gk.load_tokenizer("minilm")
    save(bert(tok, bias=[0.0, 2.0, 0.0]), tok, root / "a")
    save(bert(tok, seed=1, bias=[2.0, 0.0, 0.0]), tok, root / "b")
    return root


def test_eval_results_are_keyed_by_the_task_files_content(tmp_path, bert_pair, capsys):
    """A task file changed between runs into one output folder: the earlier model's scores (7 rows)
    must not stand beside the new ones (4 rows) under one task name."""
    import shutil

    from eval_helpers import GOLD, TEXTS, cls_file

    from graftkit.eval import evaluate

    for m in ("a", "b"):
        shutil.copytree(bert_pair / m, tmp_path / m)
    f = cls_file(tmp_path)
    cfg = _eval_config(tmp_path, f, models=("a", "b"))
    s1 = evaluate(cfg, tmp_path / "out", models=["a"])
    first = json.loads((tmp_path / "out" / "a" / "results.json").read_text())["tasks"]["topic"]
    assert first["n"] == 7 and first["file_sha256"] == files.file_sha256(f) == s1["task_files"]["topic"]
    # the same content rewritten: a's score stays
    cls_file(tmp_path)
    s2 = evaluate(cfg, tmp_path / "out", models=["b"])
    assert s2["scores"]["a"] == {"topic": pytest.approx(3 / 7)} and s2["stale"] == []
    # other content: a's score is left out, and the CLI says which model to re-run
    cls_file(tmp_path, TEXTS[:4], GOLD[:4])
    assert graft_main(["eval", str(cfg), "--models", "b", "--overwrite", "--no-progress"]) == 0
    err = capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["scores"]["b"] == {"topic": pytest.approx(2 / 4)}
    assert "topic" not in summary["scores"]["a"], summary["scores"]
    assert summary["stale"] == [{"model": "a", "task": "topic"}]
    assert summary["task_files"]["topic"] == files.file_sha256(f)
    warnings = [ln for ln in err.splitlines() if ln.startswith("graft: warning:")]
    assert len(warnings) == 1 and "'a'" in warnings[0] and "--models a --tasks topic --overwrite" in warnings[0], err
    # re-running a as told brings it back, from the new file
    assert graft_main(["eval", str(cfg), "--models", "a", "--tasks", "topic", "--overwrite", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["scores"]["a"] == {"topic": pytest.approx(1 / 4)} and summary["stale"] == []
    from graftkit.eval.runner import stale_warnings

    line = stale_warnings({"stale": [{"model": "a", "task": "t1"}, {"model": "a", "task": "t2"}]}, "e.yaml", "o")
    assert line == ["the score(s) of 'a' on 't1', 't2' came from a different version of the task file and are left out of "
                    "summary.json; re-run it: graft eval e.yaml --out o --models a --tasks t1,t2 --overwrite"]


def test_eval_cache_rereads_a_file_changed_under_the_same_mtime(tmp_path):
    """The in-process cache (a study evaluates many models) is keyed by content: an edit that
    keeps the size and the mtime still re-reads the file."""
    from eval_helpers import task, write_jsonl

    from graftkit.eval import EvalCache

    f = Path(write_jsonl(tmp_path / "t.jsonl", [{"text": "aaa", "label": "x"}, {"text": "bbb", "label": "y"}]))
    st = f.stat()
    cache = EvalCache()
    assert cache.task_data(task(str(f))).references == ["x", "y"]
    write_jsonl(f, [{"text": "aaa", "label": "y"}, {"text": "bbb", "label": "x"}])
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert cache.task_data(task(str(f))).references == ["y", "x"]
    assert cache.stats["read"] == 2


# -- the train CLI on bad data files -------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    import transformers

    import graftkit as gk

    folder = tmp_path_factory.mktemp("tiny_encoder") / "bert"
    tok = gk.load_tokenizer("minilm")
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    transformers.BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("content,needles", [
    (b'{"text": "good", "label": "pos"}\n{"text": "\xc3(", "label": "neg"}\n', ("not UTF-8", "byte offset 43 ", "line 2")),
    (b"", ("is empty",)),
    (b'{"text": "good", "label": "pos"}\n\n{"text": "bad", "label": }\n', ("line 3 is not valid JSON",)),
    (b"\n\n", ("holds no rows",)),
    (b'{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n{"text": "ok", "label": "1"}\n',
     ("line 3 has label '1' (a string)", "line 1 has 1 (a number)")),
])
def test_bad_training_data_files(tmp_path, capsys, tiny_encoder, content, needles):
    (tmp_path / "train.jsonl").write_bytes(content)
    recipe = {"model": str(tiny_encoder), "task": "classification", "data": {"train": str(tmp_path / "train.jsonl")},
              "method": {"method": "full"}, "optim": {"batch_size": 1, "epochs": 1}, "output": {"dir": str(tmp_path / "out")}}
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    capsys.readouterr()
    code = graft_main(["train", str(tmp_path / "r.yaml"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graft: error: ") and "train.jsonl" in lines[0], err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not (tmp_path / "out").exists()
