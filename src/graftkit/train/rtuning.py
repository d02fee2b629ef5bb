"""R-Tuning data construction (Zhang et al., 2024, "R-Tuning: Teaching Large Language Models
to Refuse Unknown Questions").

1. Run the base model on every training question (greedy).
2. Split the questions by whether its answer matches the reference (exact match after
   normalization: the last number when the reference is a number, else the lower-cased text).
3. Build refusal-aware SFT rows: the prompt is the question, the response is the *reference*
   answer followed by the uncertainty question and "I am sure." (answered correctly: within
   the model's knowledge) or "I am unsure." (not).

``build_rtuning_rows`` takes any ``predict(questions) -> answers`` callable;
``greedy_predictor`` makes one from a causal LM and its tokenizer (chat template when it has
one). The output rows are ordinary chat SFT data (``prompt``, ``response``, ``certain``).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import torch

SURE = "I am sure."
UNSURE = "I am unsure."
QUESTION = "Are you sure you accurately answered the question based on your internal knowledge?"
NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize(text: str) -> str:
    numbers = NUMBER_RE.findall(str(text))
    if numbers:
        value = numbers[-1].replace(",", "")
        try:
            f = float(value)
            return str(int(f)) if f == int(f) else str(f)
        except ValueError:
            return value
    return " ".join(str(text).lower().split()).strip(" .")


def is_correct(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def build_rtuning_rows(rows: Sequence[dict[str, Any]], predict: Callable[[list[str]], list[str]],
                       question_field: str = "question", answer_field: str = "answer") -> tuple[list[dict], list[dict]]:
    """(certain rows, uncertain rows), each ``{"prompt", "response", "certain", "prediction"}``."""
    questions = [str(r[question_field]) for r in rows]
    predictions = predict(questions)
    certain, uncertain = [], []
    for q, r, pred in zip(questions, rows, predictions):
        ok = is_correct(pred, r[answer_field])
        row = {"prompt": q, "response": f"{r[answer_field]} {QUESTION} {SURE if ok else UNSURE}", "certain": ok, "prediction": pred}
        (certain if ok else uncertain).append(row)
    return certain, uncertain


def greedy_predictor(model, tokenizer, max_new_tokens: int = 64, batch_size: int = 8) -> Callable[[list[str]], list[str]]:
    """Greedy answers of a causal LM to a list of questions."""

    @torch.no_grad()
    def predict(questions: list[str]) -> list[str]:
        return generate_answers(model, tokenizer, questions, max_new_tokens, batch_size)

    return predict


@torch.no_grad()
def generate_answers(model, tokenizer, questions: list[str] | None, max_new_tokens: int, batch_size: int = 8,
                     prompt_ids: list[list[int]] | None = None) -> list[str]:
    """Greedy decoding, left-padded batches; prompts as text (chat template if any) or token ids."""
    if prompt_ids is None:
        prompt_ids = []
        for q in questions:
            if getattr(tokenizer, "chat_template", None):
                text = tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            else:
                text = q + "\n"
            prompt_ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    was_training = model.training
    model.eval()
    out: list[str] = []
    for i in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[i:i + batch_size]
        n = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), n), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), n), dtype=torch.long)
        for j, p in enumerate(chunk):
            ids[j, n - len(p):] = torch.tensor(p)
            mask[j, n - len(p):] = 1
        # synced_gpus off: a sharded training run calls this with every unit gathered, and its
        # processes may hold different numbers of prompts (transformers would pair their steps up)
        gen = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, synced_gpus=False)
        out.extend(tokenizer.batch_decode(gen[:, n:], skip_special_tokens=True))
    model.train(was_training)
    return out
