"""``graft train`` on the packaged models and corpora (marked ``real``; kept short)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from graftkit.cli import main as graft_main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    sys.path.insert(0, str(ROOT / "examples"))
    import make_data

    out = tmp_path_factory.mktemp("data")
    make_data.main(str(out))
    return out


def example(name: str, folder: Path, out: Path, **patch) -> Path:
    r = yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())
    for key in ("train", "validation"):
        r["data"][key] = str(folder / Path(r["data"][key]).relative_to("examples/data"))
    r["output"]["dir"] = str(out)
    for section, values in patch.items():
        r[section] = {**r.get(section, {}), **values}
    f = out.parent / f"{name}.yaml"
    f.write_text(yaml.safe_dump(r))
    return f


def test_bbc_lora_example_short(data, tmp_path):
    f = example("bbc_lora", data, tmp_path / "bbc", data={"limit": 64, "max_length": 64}, optim={"max_steps": 4},
                eval={"limit": 32, "every": None, "at_start": False}, output={"export": ["peft"], "checkpoint_every": 2})
    assert graft_main(["train", str(f), "--no-progress"]) == 0
    run = json.loads((tmp_path / "bbc" / "run.json").read_text())
    assert run["status"] == "done" and run["summary"]["final_loss"] < run["summary"]["first_loss"] + 0.5
    assert (tmp_path / "bbc" / "adapter-peft" / "adapter_config.json").exists()


def test_gsm_example_data_and_chat_template(data, tmp_path):
    import graftkit as gk
    from graftkit.train import load_recipe
    from graftkit.train.data import IGNORE, prepare

    f = example("gsm_lora", data, tmp_path / "gsm", data={"limit": 4}, eval={"limit": 2})
    r = load_recipe(f)
    tok = gk.load_tokenizer("smollm2")
    p = prepare(r, tok, 8192)
    ex = p.train[0]
    response = tok.decode([t for t, y in zip(ex["input_ids"], ex["labels"]) if y != IGNORE])
    row = json.loads((data / "gsm" / "train.jsonl").read_text().splitlines()[0])
    assert response.startswith(row["solution"][:40]) and "<|im_end|>" in response
    assert "<|im_start|>assistant" in tok.decode(p.validation[0]["prompt_ids"])
