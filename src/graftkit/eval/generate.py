"""Generation tasks: batched decoding, answer extraction, exact match or a plug-in scorer.

Prompts (optionally wrapped in the tokenizer's chat template) are tokenized once per
tokenizer, sorted by length and left-padded per batch (a decoder continues from the last
position, so the padding goes on the left). Decoding is greedy, or sampled with
temperature / top-p / top-k from a seeded generator (the global RNG is restored afterwards).
A row stops at an end-of-sequence token (the tokenizer's and the model's generation config's)
or at ``max_new_tokens``; ``stop`` strings end a row early and the text is cut before them
(code tasks stop at a new top-level ``def``/``class``/``if __name__``/``print(``/``#``, as
HumanEval does).

Scoring a generation: ``extract`` (a regex; group 1 of its *last* match, or the whole match)
picks the answer out of the output (no match gives an empty answer); then either
``exact_match(answer, reference, **normalize)`` (:mod:`graftkit.eval.metrics`) or a
``scorer: "module:function"`` plug-in ``f(answer, row) -> float in [0, 1]`` (for instance a
wrapper around reasoning_gym's ``score_answer``). With several samples per prompt the
example's score is their mean.
"""
from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ConfigError, EvalError
from .config import Decoding, GenerationTask, Normalize

# -- prompts -------------------------------------------------------------------------------------


def encode_prompts(tokenizer, prompts: list[str], *, chat: bool, system_prompt: str | None, max_prompt_length: int | None,
                   where: str) -> list[list[int]]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise EvalError(f"{where}: chat: true but the tokenizer has no chat template; set chat: false, or give the model "
                            "a `tokenizer:` folder with a chat template")
        texts = []
        for p in prompts:
            msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": p}]
            texts.append(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    if max_prompt_length:
        ids = [x[-max_prompt_length:] for x in ids]
    for i, x in enumerate(ids):
        if not x:
            raise EvalError(f"{where}: prompt {i + 1} is empty after tokenization; give every row a prompt")
    return [list(x) for x in ids]


# -- decoding ------------------------------------------------------------------------------------

def eos_ids(model: nn.Module, tokenizer) -> list[int]:
    ids: set[int] = set()
    for v in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return sorted(ids)


def cut_at_stop(text: str, stops: list[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return text[:cut] if cut >= 0 else text


def _stop_criteria(tokenizer, stops: list[str], prompt_len: int):
    from transformers import StoppingCriteria, StoppingCriteriaList

    tail = 8 + max(len(s) for s in stops)  # tokens; a stop string is never longer than its characters

    class StopStrings(StoppingCriteria):
        """A row is done once its generated text holds a stop string (checked on its last tokens)."""

        def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
            gen = input_ids[:, prompt_len:]
            texts = tokenizer.batch_decode(gen[:, -tail:], skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stops) for t in texts], device=input_ids.device)

    return StoppingCriteriaList([StopStrings()])


@torch.inference_mode()
def generate(model: nn.Module, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, decoding: Decoding,
             num_samples: int = 1, stop: list[str] | None = None, batch_size: int = 16, pad: int = 0,
             advance: Callable[[int], None] | None = None) -> list[list[str]]:
    """``num_samples`` output texts per prompt (a greedy output is computed once and repeated)."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    stop = [s for s in (stop or []) if s]
    sampled = decoding.do_sample
    n_return = num_samples if sampled else 1
    eos = eos_ids(model, tokenizer)
    cfg = dict(max_new_tokens=max_new_tokens, do_sample=sampled, num_return_sequences=n_return, pad_token_id=pad,
               eos_token_id=eos or None, repetition_penalty=1.0, use_cache=True)
    if sampled:
        cfg.update(temperature=decoding.temperature, top_p=decoding.top_p, top_k=decoding.top_k)
    gen_config = GenerationConfig(**cfg)
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    outputs: list[list[str]] = [[] for _ in prompts]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(decoding.seed)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            n = max(len(prompts[i]) for i in batch)
            ids = torch.full((len(batch), n), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), n), dtype=torch.long)
            for j, i in enumerate(batch):
                ids[j, n - len(prompts[i]):] = torch.tensor(prompts[i], dtype=torch.long)
                mask[j, n - len(prompts[i]):] = 1
            extra = {"stopping_criteria": _stop_criteria(tokenizer, stop, n)} if stop else {}
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_config, **extra)
            texts = tokenizer.batch_decode(out[:, n:], skip_special_tokens=True)
            for j, i in enumerate(batch):
                got = [cut_at_stop(t, stop) for t in texts[j * n_return:(j + 1) * n_return]]
                outputs[i] = got if sampled else got * num_samples
            if advance is not None:
                advance(1)
    return outputs


# -- scoring -------------------------------------------------------------------------------------

def extract_answer(text: str, pattern: str | None) -> tuple[str, bool]:
    """(answer, whether the pattern matched); without a pattern the whole text is the answer."""
    if pattern is None:
        return text.strip(), True
    matches = list(re.finditer(pattern, text))
    if not matches:
        return "", False
    m = matches[-1]
    return (m.group(1) if m.re.groups else m.group(0)).strip(), True


def load_scorer(spec: str) -> Callable[[str, dict], float]:
    """``module:function`` (importable, or a module in the working folder) or ``file.py:function``."""
    module_name, func = spec.rsplit(":", 1)
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ConfigError(f"scorer file {path} does not exist")
            mod_spec = importlib.util.spec_from_file_location(f"graft_scorer_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
            mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            added = str(Path.cwd()) not in sys.path
            if added:
                sys.path.insert(0, str(Path.cwd()))
            try:
                module = importlib.import_module(module_name)
            finally:
                if added:
                    sys.path.remove(str(Path.cwd()))
    except ImportError as exc:
        raise ConfigError(f"cannot import the scorer module {module_name!r} ({exc}); give 'module:function' for an importable "
                          "module or 'path/to/file.py:function'") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise ConfigError(f"scorer {spec!r}: {module_name} has no function {func!r}")
    return fn


def _check_score(value: Any, spec: str, i: int) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise EvalError(f"scorer {spec} returned {value!r} for row {i + 1}; a scorer returns a number in [0, 1]") from None
    if not 0.0 <= v <= 1.0:
        raise EvalError(f"scorer {spec} returned {v} for row {i + 1}; a scorer returns a number in [0, 1]")
    return v


def score_generation(task: GenerationTask, outputs: list[list[str]], references: list[str], rows: list[dict]
                     ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    from .metrics import exact_match

    norm = task.normalize.model_dump() if isinstance(task.normalize, Normalize) else dict(task.normalize)
    scorer = load_scorer(task.scorer) if task.scorer else None
    out_rows = []
    extracted_total = 0
    for i, (samples, ref, row) in enumerate(zip(outputs, references, rows)):
        answers, scores = [], []
        for text in samples:
            answer, found = extract_answer(text, task.extract)
            extracted_total += found
            s = _check_score(scorer(answer, row), task.scorer, i) if scorer else float(bool(exact_match(answer, ref, **norm)))
            answers.append(answer)
            scores.append(s)
        rec = {"id": i, "prediction": answers[0], "reference": ref, "score": sum(scores) / len(scores), "output": samples[0]}
        if len(samples) > 1:
            rec.update(outputs=samples, predictions=answers, scores=scores)
        out_rows.append(rec)
    main = "score" if scorer else "exact_match"
    n = max(len(out_rows), 1)
    metrics = {main: sum(r["score"] for r in out_rows) / n}
    if task.extract:
        metrics["extracted"] = extracted_total / max(sum(len(s) for s in outputs), 1)
    return metrics, out_rows
