"""graft eval, causal LMs: greedy/sampled generation vs a plain loop, extract + normalize, scorers,
chat templates, stop strings, perplexity by hand, code tasks."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

import graftkit as gk
from graftkit.errors import ConfigError, EvalError
from graftkit.eval import EvalCache, evaluate, evaluate_model
from graftkit.eval.config import TaskSpec
from graftkit.eval.generate import cut_at_stop, extract_answer

PROMPTS = ["the cat sat on", "one two three", "where is the station", "a b"]
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return gk.load_tokenizer("minilm")


@pytest.fixture(scope="module")
def llama(tok, tmp_path_factory):
    """A tiny Llama speaking MiniLM's vocabulary, saved with that tokenizer (plus a chat template)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a peaked output distribution: greedy has no near-ties for padding noise to flip
        model.lm_head.weight.mul_(30)
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    chat_folder = tmp_path_factory.mktemp("llama_chat")
    model.save_pretrained(chat_folder)
    chat_tok = gk.load_tokenizer("minilm")
    chat_tok.chat_template = TEMPLATE
    chat_tok.save_pretrained(chat_folder)
    return model, str(folder), str(chat_folder)


def greedy(model, tok, ids: list[int], max_new: int) -> str:
    """The reference: one prompt, no padding, no cache, argmax until [SEP] (the eos) or max_new."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == tok.sep_token_id:
                break
            ids.append(nxt)
            out.append(nxt)
    return tok.decode(out, skip_special_tokens=True)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def gen_task(file, name="gen", **kw):
    return TaskSpec(name=name, kind="generation", file=file, max_new_tokens=kw.pop("max_new_tokens", 6), batch_size=3, **kw)


# -- generation ---------------------------------------------------------------------------------

def test_greedy_matches_plain_loop_and_exact_match(tmp_path, tok, llama):
    model, folder, _ = llama
    refs = [greedy(model, tok, tok(p)["input_ids"], 6) for p in PROMPTS]
    assert all(refs) and len(set(refs)) > 1
    answers = refs[:3] + ["certainly not this"]
    # normalization: case and punctuation do not matter by default
    answers[0] = answers[0].upper() + " !"
    f = write_jsonl(tmp_path / "g.jsonl", [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, answers)])
    r = evaluate_model({"name": "m", "path": folder}, [gen_task(f)], out_dir=tmp_path / "out")["gen"]
    assert [row["output"] for row in r["rows"]] == refs
    assert [row["score"] for row in r["rows"]] == [1.0, 1.0, 1.0, 0.0]
    assert r["metrics"] == {"exact_match": 0.75} and r["main"] == "exact_match"
    lines = [json.loads(l) for l in (tmp_path / "out" / "predictions" / "gen.jsonl").read_text().splitlines()]
    assert [l["output"] for l in lines] == refs and [l["reference"] for l in lines] == answers
    # strict normalization: the upper-cased answer no longer matches
    strict = gen_task(f, normalize={"lower": False, "strip_punct": False})
    assert evaluate_model({"name": "m", "path": folder}, [strict])["gen"]["metrics"]["exact_match"] == 0.5


def test_extract_last_match_group(tmp_path, tok, llama):
    model, folder, _ = llama
    refs = [greedy(model, tok, tok(p)["input_ids"], 6) for p in PROMPTS]
    last = [o.split()[-1] for o in refs]
    f = write_jsonl(tmp_path / "g.jsonl", [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, last[:3] + ["zzz"])])
    r = evaluate_model({"name": "m", "path": folder}, [gen_task(f, extract=r"(\S+)")])["gen"]
    assert [row["prediction"] for row in r["rows"]] == last
    assert r["metrics"]["exact_match"] == 0.75 and r["metrics"]["extracted"] == 1.0
    assert extract_answer("#### 12 and #### 13", r"####\s*(\d+)") == ("13", True)
    assert extract_answer("no number", r"####\s*(\d+)") == ("", False)
    assert extract_answer("x = 5", r"\d") == ("5", True)  # no group: the whole match


def test_scorer_plugin_file_and_module(tmp_path, tok, llama, monkeypatch):
    model, folder, _ = llama
    refs = [greedy(model, tok, tok(p)["input_ids"], 6) for p in PROMPTS]
    (tmp_path / "myscore.py").write_text(
        "def score(prediction, row):\n    return 1.0 if prediction == row['expected'] else 0.25\n"
        "def bad(prediction, row):\n    return 2\n")
    f = write_jsonl(tmp_path / "g.jsonl", [{"prompt": p, "answer": "-", "expected": e}
                                           for p, e in zip(PROMPTS, refs[:2] + ["x", refs[3]])])
    r = evaluate_model({"name": "m", "path": folder}, [gen_task(f, scorer=f"{tmp_path}/myscore.py:score")])["gen"]
    assert r["main"] == "score" and [row["score"] for row in r["rows"]] == [1.0, 1.0, 0.25, 1.0]
    assert r["metrics"]["score"] == pytest.approx(3.25 / 4)
    monkeypatch.syspath_prepend(str(tmp_path))
    r = evaluate_model({"name": "m", "path": folder}, [gen_task(f, scorer="myscore:score")])["gen"]
    assert r["metrics"]["score"] == pytest.approx(3.25 / 4)
    with pytest.raises(EvalError, match=r"scorer myscore:bad returned 2.0 for row 1; a scorer returns a number in \[0, 1\]"):
        evaluate_model({"name": "m", "path": folder}, [gen_task(f, scorer="myscore:bad")])
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        evaluate_model({"name": "m", "path": folder}, [gen_task(f, scorer="myscore:nope")])
    with pytest.raises(ConfigError, match="cannot import the scorer module 'no_such_mod'"):
        evaluate_model({"name": "m", "path": folder}, [gen_task(f, scorer="no_such_mod:f")])


def test_chat_template_and_stop_strings(tmp_path, tok, llama):
    model, folder, chat_folder = llama
    chat_tok = gk.load_tokenizer(chat_folder)
    ids = [chat_tok(chat_tok.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": p}],
                                                 tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
           for p in PROMPTS]
    refs = [greedy(model, tok, x, 8) for x in ids]
    f = write_jsonl(tmp_path / "g.jsonl", [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, refs)])
    t = gen_task(f, chat=True, system_prompt="be brief", max_new_tokens=8)
    r = evaluate_model({"name": "m", "path": chat_folder}, [t])["gen"]
    assert [row["output"] for row in r["rows"]] == refs and r["metrics"]["exact_match"] == 1.0
    # stop strings: the text is cut before the first one (the plain run's output, cut)
    stop = [refs[0].split()[1][:2], "\n"]
    r = evaluate_model({"name": "m", "path": chat_folder}, [gen_task(f, chat=True, system_prompt="be brief", max_new_tokens=8,
                                                                     stop=stop)])["gen"]
    assert [row["output"] for row in r["rows"]] == [cut_at_stop(o, stop) for o in refs]
    assert r["rows"][0]["output"] != refs[0]
    # chat without a template is one clear error
    with pytest.raises(EvalError, match="chat: true but the tokenizer has no chat template"):
        evaluate_model({"name": "m", "path": folder}, [gen_task(f, chat=True)])


def test_sampling_is_seeded_and_keeps_every_sample(tmp_path, llama):
    _, folder, _ = llama
    f = write_jsonl(tmp_path / "g.jsonl", [{"prompt": p, "answer": "x"} for p in PROMPTS])

    def outputs(seed):
        t = gen_task(f, decoding={"do_sample": True, "temperature": 50.0, "num_samples": 3, "seed": seed})
        return [row["outputs"] for row in evaluate_model({"name": "m", "path": folder}, [t])["gen"]["rows"]]

    before = torch.random.get_rng_state()
    a, b, c = outputs(1), outputs(1), outputs(2)
    assert torch.equal(before, torch.random.get_rng_state())  # the caller's RNG is untouched
    assert a == b and a != c
    assert all(len(s) == 3 for s in a) and any(len(set(s)) > 1 for s in a)


def test_missing_prompt_field(tmp_path, llama):
    f = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "a", "answer": "b"}, {"question": "c", "answer": "d"}])
    with pytest.raises(EvalError, match=r"g\.jsonl: line 2 has no value for field 'prompt'"):
        evaluate_model({"name": "m", "path": llama[1]}, [gen_task(f)])


# -- perplexity ---------------------------------------------------------------------------------

TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world", "a much longer sentence about trains, "
         "stations and the people who wait in them every single morning"]


def nll_by_hand(model, ids: list[int]) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))


def test_perplexity_by_hand(tmp_path, tok, llama):
    model, folder, _ = llama
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in TEXTS])
    t = TaskSpec(name="ppl", kind="perplexity", file=f, max_length=64, batch_size=2)
    r = evaluate_model({"name": "m", "path": folder}, [t])["ppl"]
    enc = [tok(x)["input_ids"] for x in TEXTS]
    nll = [nll_by_hand(model, ids) for ids in enc]
    n = [len(ids) - 1 for ids in enc]
    assert [row["tokens"] for row in r["rows"]] == n
    assert [row["nll"] for row in r["rows"]] == pytest.approx(nll, rel=1e-5)
    assert [row["score"] for row in r["rows"]] == pytest.approx([a / b for a, b in zip(nll, n)], rel=1e-5)
    assert r["metrics"]["perplexity"] == pytest.approx(math.exp(sum(nll) / sum(n)), rel=1e-5)
    assert r["main"] == "perplexity" and r["higher_is_better"] is False


def test_perplexity_windows(tmp_path, tok, llama):
    """Windows of L tokens overlap by one: every token after the first is predicted once."""
    model, folder, _ = llama
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": TEXTS[2]}])
    r = evaluate_model({"name": "m", "path": folder}, [TaskSpec(name="ppl", kind="perplexity", file=f, max_length=8)])["ppl"]
    ids = tok(TEXTS[2])["input_ids"]
    pieces = [ids[s:s + 8] for s in range(0, len(ids) - 1, 7)]
    assert sum(len(p) - 1 for p in pieces) == len(ids) - 1 == r["rows"][0]["tokens"]
    assert r["rows"][0]["nll"] == pytest.approx(sum(nll_by_hand(model, p) for p in pieces), rel=1e-5)


def test_summary_marks_lower_is_better(tmp_path, llama):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in TEXTS])
    cfg = {"models": [{"name": "m", "path": llama[1]}], "tasks": [{"name": "ppl", "kind": "perplexity", "file": f}]}
    s = evaluate(cfg, tmp_path / "out")
    assert s["higher_is_better"] == {"ppl": False} and s["main"] == {"ppl": "perplexity"}
    assert json.loads((tmp_path / "out" / "m" / "results.json").read_text())["tasks"]["ppl"]["higher_is_better"] is False


# -- code -----------------------------------------------------------------------------------------

PROBLEMS = [
    {"task_id": "t/0", "prompt": "def add(a, b):\n", "test": "def check(f):\n    assert f(1, 2) == 3\n", "entry_point": "add"},
    {"task_id": "t/1", "prompt": "def neg(a):\n", "test": "def check(f):\n    assert f(4) == -4\n", "entry_point": "neg"},
]


@pytest.mark.usefixtures("unsafe_where_no_isolation")
def test_code_from_samples_file(tmp_path):
    problems = write_jsonl(tmp_path / "p.jsonl", PROBLEMS)
    samples = write_jsonl(tmp_path / "s.jsonl", [
        {"task_id": "t/0", "completion": "    return a + b\n"}, {"task_id": "t/0", "completion": "    return a - b\n"},
        {"task_id": "t/1", "completion": "    return a\n"}, {"task_id": "t/1", "completion": "    return a\n"}])
    t = TaskSpec(name="code", kind="code", file=problems, samples_file=samples, k=[1, 2])
    r = evaluate_model({"name": "m", "path": "not-needed"}, [t], out_dir=tmp_path / "out")["code"]  # no model is loaded
    assert r["metrics"] == {"pass@1": pytest.approx(0.25), "pass@2": pytest.approx(0.5)} and r["main"] == "pass@1"
    assert [row["passed"] for row in r["rows"]] == [[True, False], [False, False]]
    assert [row["score"] for row in r["rows"]] == [0.5, 0.0]
    assert r["rows"][0]["completions"] == ["    return a + b\n", "    return a - b\n"]
    few = write_jsonl(tmp_path / "few.jsonl", [{"task_id": "t/0", "completion": "x"}, {"task_id": "t/1", "completion": "y"}])
    with pytest.raises(EvalError, match=r"has only 1 completion\(s\) for t/0; pass@2 needs 2"):
        evaluate_model({"name": "m", "path": "x"}, [TaskSpec(name="c", kind="code", file=problems, samples_file=few, k=[1, 2])])


@pytest.mark.usefixtures("unsafe_where_no_isolation")
def test_code_generation_stops_at_top_level(tmp_path, tok, llama):
    """Generated completions are cut at HumanEval's stop strings and scored (a random model fails)."""
    model, folder, _ = llama
    problems = write_jsonl(tmp_path / "p.jsonl", PROBLEMS)
    t = TaskSpec(name="code", kind="code", file=problems, num_samples=2, k=[1, 2], max_new_tokens=5, timeout=5)
    r = evaluate_model({"name": "m", "path": folder}, [t])["code"]
    ref = greedy(model, tok, tok(PROBLEMS[0]["prompt"])["input_ids"], 5)
    assert r["rows"][0]["completions"] == [cut_at_stop(ref, ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"])] * 2
    assert r["metrics"]["pass@1"] == 0.0 and r["rows"][1]["passed"] == [False, False]


def test_code_config_checks():
    with pytest.raises(ConfigError, match="pass@5 needs at least 5 samples per problem"):
        TaskSpec(name="c", kind="code", k=[1, 5], num_samples=2)
    with pytest.raises(ConfigError, match="set num_samples on the code task itself"):
        TaskSpec(name="c", kind="code", decoding={"num_samples": 3})


def test_mixed_kinds_load_each_head_once(tmp_path, tok, llama, monkeypatch):
    """A causal LM folder evaluated on generation + perplexity loads once and tokenizes each task once."""
    import graftkit.eval.models as models

    _, folder, _ = llama
    loads = []
    original = models.load
    monkeypatch.setattr(models, "load", lambda *a, **k: (loads.append(a[1]), original(*a, **k))[1])
    g = write_jsonl(tmp_path / "g.jsonl", [{"prompt": p, "answer": "x"} for p in PROMPTS])
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in TEXTS])
    tasks = [gen_task(g), TaskSpec(name="ppl", kind="perplexity", file=p)]
    cache = EvalCache()
    evaluate_model({"name": "a", "path": folder}, tasks, cache=cache)
    evaluate_model({"name": "b", "path": folder}, tasks, cache=cache)
    assert loads == ["causal-lm", "causal-lm"]
    assert cache.stats == {"read": 2, "tokenize": 2, "tokenizer_load": 1}


def test_decoder_classification_with_score_head(tmp_path, tok, llama):
    """A causal-LM folder read out through another folder's ``score`` head (Llama-style, no bias)."""
    _, folder, _ = llama
    head_model = gk.load_model(folder, head="classification", num_labels=2, id2label={0: "no", 1: "yes"},
                               label2id={"no": 0, "yes": 1}).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        head_model.score.weight.normal_(0, 1)
    head_dir = tmp_path / "head"
    head_model.save_pretrained(head_dir)
    texts = ["is it raining", "yes of course it is", "no", "maybe later today"]
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": t, "label": l} for t, l in zip(texts, ["yes", "no", "no", "yes"])])
    t = TaskSpec(name="yn", kind="classification", file=f, head=str(head_dir), batch_size=4)
    r = evaluate_model({"name": "m", "path": folder}, [t])["yn"]
    with torch.no_grad():
        ref = [torch.softmax(head_model(input_ids=torch.tensor([tok(x)["input_ids"]])).logits[0], -1).tolist() for x in texts]
    assert [row["probs"] for row in r["rows"]] == [pytest.approx(p, abs=1e-5) for p in ref]
    assert r["labels"] == ["no", "yes"]
