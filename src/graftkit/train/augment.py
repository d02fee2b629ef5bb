"""Data augmentation for (parameter-efficient) tuning with little data: the recipe section ``augment``.

Obadinma, Guo & Zhu, "Effectiveness of Data Augmentation for Parameter Efficient Tuning with
Limited Data" (2023) study task-agnostic augmentation (EDA, back-translation, mixup) with
P-tuning v2 and LoRA, and add a contrastive loss on sentence representations. This module gives
the three that need no second model, for every tuning method:

**EDA** (Wei & Zou 2019), on the training text before tokenization: the classification text
field, or the prompt of chat SFT (never the response, which is the target). For a text of
``l`` whitespace-separated words, each augmented copy applies ONE operation:

* synonym replacement: ``n = max(1, int(alpha_sr * l))`` distinct non-stop words (in random
  order, skipping words without synonyms) are each replaced everywhere by a random synonym
  (words compared without case and surrounding punctuation, which stays: "plot." -> "scheme.");
* random insertion: ``n = max(1, int(alpha_ri * l))`` times, a random synonym of a random
  non-stop word is inserted at a random position (up to 10 tries to find a word with synonyms);
* random swap: ``n = max(1, int(alpha_rs * l))`` times, two distinct random positions swap;
* random deletion: each word is deleted with probability ``p_rd`` (one random word is kept
  if all would go; a one-word text is kept as is).

As in EDA's code, each operation with a non-zero rate makes ``num_aug // k + 1`` copies
(``k``: operations in use); they are shuffled and the first ``num_aug`` kept, after the
original. Synonyms are WordNet's lemma names (through nltk), sorted, so the augmented set is a
pure function of (``optim.seed``, the data): ``--resume`` sees the same examples. Words are
split on whitespace and kept as written (EDA lower-cases and strips punctuation; a tokenizer
here sees the text as the user wrote it, and synonyms are looked up without them).

**Mixup of sentence representations** (senMixup, Guo, Mao & Zhang 2019, the variant the paper
applies): with ``z_i`` the sentence representation that enters the classification head (BERT:
the pooled [CLS] output; decoders' ``score``: the last real token's hidden state; encoders whose
head pools itself: the first token), a permutation ``pi`` of the micro-batch and one
``lambda ~ Beta(alpha, alpha)`` per micro-batch,

    z~_i = lambda * z_i + (1 - lambda) * z_pi(i)
    loss = mean_i [ lambda * CE(head(z~_i), y_i) + (1 - lambda) * CE(head(z~_i), y_pi(i)) ]

which is the cross-entropy against the mixed one-hot target ``lambda e_y_i + (1 - lambda) e_y_pi(i)``.
``lambda`` and ``pi`` are drawn from (seed, micro-batch index, process), so a resumed run
draws the same ones. Training only: evaluation sees the clean inputs.

**Supervised contrastive loss** (Gunel et al. 2021, the SCL form the paper adds), on the same
(unmixed) sentence representations, L2-normalised: ``s_ij = cos(z_i, z_j)``,

    L_SCL = mean over anchors i with a positive of
            -1/|P(i)| * sum_{p in P(i)} log( exp(s_ip / tau) / sum_{k != i} exp(s_ik / tau) )
    loss  = (1 - weight) * CE + weight * L_SCL

with ``P(i)`` the other examples of the micro-batch with label ``y_i``. Gunel et al. write a
sum over anchors; the mean keeps ``weight``'s meaning independent of the batch size.

The paper's own text beyond its abstract was not available when this was written; the mixup
and contrastive forms above are those of the works it builds on (senMixup; Gunel et al.'s SCL).
"""
from __future__ import annotations

import random
import string
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ConfigError

Synonyms = Callable[[str], list[str]]

# common English function words: EDA leaves them alone (replacing "the" teaches nothing)
STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both but by
can could did do does doing down during each few for from further had has have having he her here hers herself him
himself his how i if in into is it its itself just me more most my myself no nor not now of off on once only or other
our ours ourselves out over own same she should so some such than that the their theirs them themselves then there
these they this those through to too under until up very was we were what when where which while who whom why will
with would you your yours yourself yourselves
""".split())

WORDNET_HINT = ("pip install nltk, then python -m nltk.downloader wordnet (on a machine with network; copy nltk_data "
                "to offline machines), or set augment.eda.alpha_sr=0 and augment.eda.alpha_ri=0 (swap and deletion need no WordNet)")


# -- EDA ------------------------------------------------------------------------------------------

def wordnet_synonyms() -> Synonyms:
    """WordNet's synonyms of a word through nltk; one ConfigError line when nltk or its data is missing
    (nothing is downloaded: training machines are often offline)."""
    try:
        from nltk.corpus import wordnet
    except ImportError:
        raise ConfigError(f"augment.eda synonym replacement/insertion needs WordNet, and nltk is not installed: {WORDNET_HINT}") from None
    try:
        wordnet.ensure_loaded()
    except LookupError:
        raise ConfigError(f"augment.eda synonym replacement/insertion needs WordNet, and nltk has no WordNet data: {WORDNET_HINT}") from None
    except OSError as exc:  # a partial copy of nltk_data: nltk names the missing file
        raise ConfigError(f"augment.eda: nltk's WordNet data is incomplete ({exc}); reinstall it: {WORDNET_HINT}") from None
    cache: dict[str, list[str]] = {}

    def synonyms(word: str) -> list[str]:
        key = word.lower()
        if key not in cache:
            names = {lemma.name().replace("_", " ").lower() for syn in wordnet.synsets(key) for lemma in syn.lemmas()}
            names.discard(key)
            cache[key] = sorted(n for n in names if n.replace(" ", "").replace("-", "").isalpha())
        return cache[key]

    return synonyms


PUNCT = string.punctuation + "\u201c\u201d\u2018\u2019\u00ab\u00bb\u2026"


def _parts(token: str) -> tuple[str, str, str]:
    """A token as (leading punctuation, word, trailing punctuation): "(great," -> ("(", "great", ",")."""
    core = token.strip(PUNCT)
    if not core:
        return token, "", ""
    i = token.index(core)
    return token[:i], core, token[i + len(core):]


def _content(token: str) -> str | None:
    """The word a token holds, lower-cased, unless it is a stop word or only punctuation."""
    core = _parts(token)[1].lower()
    return core if core and core not in STOP_WORDS else None


def synonym_replacement(words: list[str], n: int, rng: random.Random, synonyms: Synonyms) -> list[str]:
    candidates = list(dict.fromkeys(c for c in map(_content, words) if c))
    rng.shuffle(candidates)
    out = list(words)
    replaced = 0
    for word in candidates:
        options = synonyms(word)
        if options:
            pick = rng.choice(options)
            # "plot." -> "secret plan.": the punctuation around the word stays
            out = [(lambda pre, _, post: pre + pick + post)(*_parts(w)) if _content(w) == word else w for w in out]
            replaced += 1
            if replaced >= n:
                break
    return " ".join(out).split()  # a synonym may be several words


def random_insertion(words: list[str], n: int, rng: random.Random, synonyms: Synonyms) -> list[str]:
    out = list(words)
    for _ in range(n):
        content = [c for c in map(_content, out) if c]
        if not content:
            break
        for _ in range(10):
            options = synonyms(content[rng.randrange(len(content))])
            if options:
                pick = rng.choice(options)
                out.insert(rng.randrange(len(out) + 1), pick)
                break
    return " ".join(out).split()


def random_swap(words: list[str], n: int, rng: random.Random) -> list[str]:
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i = rng.randrange(len(out))
        j = rng.randrange(len(out) - 1)
        j += j >= i  # a position other than i, uniformly
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: list[str], p: float, rng: random.Random) -> list[str]:
    if len(words) <= 1:
        return list(words)
    kept = [w for w in words if rng.random() > p]
    return kept or [words[rng.randrange(len(words))]]


def eda(text: str, cfg, rng: random.Random, synonyms: Synonyms | None) -> list[str]:
    """``cfg.num_aug`` augmented versions of ``text`` (see the module docstring)."""
    words = text.split()
    if not words:
        return []
    count = lambda alpha: max(1, int(alpha * len(words)))  # noqa: E731
    ops: list[Callable[[], list[str]]] = []
    if cfg.alpha_sr > 0:
        ops.append(lambda: synonym_replacement(words, count(cfg.alpha_sr), rng, synonyms))
    if cfg.alpha_ri > 0:
        ops.append(lambda: random_insertion(words, count(cfg.alpha_ri), rng, synonyms))
    if cfg.alpha_rs > 0:
        ops.append(lambda: random_swap(words, count(cfg.alpha_rs), rng))
    if cfg.p_rd > 0:
        ops.append(lambda: random_deletion(words, cfg.p_rd, rng))
    per_op = cfg.num_aug // len(ops) + 1
    out = [" ".join(op()) for op in ops for _ in range(per_op)]
    rng.shuffle(out)
    return out[: cfg.num_aug]


def needs_wordnet(cfg) -> bool:
    return cfg.alpha_sr > 0 or cfg.alpha_ri > 0


def augment_rows(rows: list[dict[str, Any]], field: str, cfg, seed: int, synonyms: Synonyms | None = None) -> list[dict[str, Any]]:
    """Each row, then its ``num_aug`` EDA copies (``field`` rewritten, every other field kept).

    Example ``i`` draws from its own generator seeded by (seed, i), so the set does not depend on
    the order in which rows are augmented."""
    if synonyms is None and needs_wordnet(cfg):
        synonyms = wordnet_synonyms()
    out: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        out.append(row)
        rng = random.Random(f"graftkit-eda:{seed}:{i}")
        out.extend({**row, field: text} for text in eda(str(row[field]), cfg, rng, synonyms))
    return out


# -- recipe checks --------------------------------------------------------------------------------

def check_recipe(recipe) -> None:
    """One line for each combination that cannot mean anything (called when the recipe is parsed)."""
    a = recipe.augment
    if a.eda is None and a.mixup is None and a.contrastive is None:
        raise ConfigError("augment names no augmentation: give augment.eda, augment.mixup or augment.contrastive, or drop the section")
    if recipe.task != "classification":
        names = [n for n in ("mixup", "contrastive") if getattr(a, n) is not None]
        if names:
            raise ConfigError(f"augment.{names[0]} works on sentence representations and class labels: it needs task classification, "
                              f"not {recipe.task}; drop augment.{names[0]} (augment.eda works on chat SFT prompts)")
        if a.eda is not None and not recipe.data.prompt_field:
            raise ConfigError("augment.eda rewrites the input text, which in plain-text LM training is also the target; "
                              "use it with task classification or chat SFT (data.prompt_field), or drop it")
    if a.eda is not None and not (a.eda.alpha_sr or a.eda.alpha_ri or a.eda.alpha_rs or a.eda.p_rd):
        raise ConfigError("augment.eda has every rate at 0 (alpha_sr, alpha_ri, alpha_rs, p_rd), so it would only copy the data; "
                          "set at least one above 0, or drop augment.eda")


# -- mixup and the contrastive loss -------------------------------------------------------------

def mixup_draw(alpha: float, size: int, seed: int, index: int, rank: int) -> dict[str, torch.Tensor]:
    """This micro-batch's ``lambda ~ Beta(alpha, alpha)`` and pairing: a pure function of its position."""
    rng = random.Random(f"graftkit-mixup:{seed}:{index}:{rank}")
    lam = rng.betavariate(alpha, alpha)
    perm = list(range(size))
    rng.shuffle(perm)
    return {"mix_lambda": torch.tensor(lam, dtype=torch.float32), "mix_perm": torch.tensor(perm, dtype=torch.long)}


def supervised_contrastive(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Gunel et al.'s SCL over one batch (see the module docstring); 0 when no two examples share a label."""
    z = nn.functional.normalize(z.float(), dim=-1)
    sim = z @ z.T / temperature
    n = len(z)
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    log_prob = sim - torch.logsumexp(sim.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    count = positive.sum(1)
    anchors = count > 0
    if not anchors.any():
        return sim.sum() * 0.0  # keeps the graph (every process must reach the same backward)
    per_anchor = -(log_prob * positive).sum(1)[anchors] / count[anchors]
    return per_anchor.mean()


class SentenceAugment:
    """Mixup and/or the contrastive loss inside a classification forward: a pre-hook on the head
    reads (and, for mixup, replaces) the sentence representation."""

    def __init__(self, model: nn.Module, head: str, cfg):
        self.head = head
        self.mixup = cfg.mixup
        self.contrastive = cfg.contrastive

    def _positions(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.head == "score":  # decoder heads score every position and read the last real token
            idx = torch.arange(mask.shape[1], device=mask.device)
            last = (mask * idx).argmax(-1)
            return last + (h.shape[1] - mask.shape[1])  # virtual tokens the base kept in front
        return torch.zeros(h.shape[0], dtype=torch.long, device=h.device)  # heads that pool the first token themselves

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(logits, per-example cross-entropy - both of the mixed vectors when the batch carries a
        mixup draw -, the contrastive term or None)."""
        lam, perm = batch.get("mix_lambda"), batch.get("mix_perm")
        seen: dict[str, torch.Tensor] = {}

        def pre(module, args):
            h = args[0]
            z = h if h.dim() == 2 else h[torch.arange(h.shape[0], device=h.device), self._positions(h, batch["attention_mask"])]
            seen["z"] = z
            if lam is None:
                return None
            mixed = lam.to(z.dtype) * z + (1 - lam.to(z.dtype)) * z[perm]
            # every position holds the mixed vector, so whichever position the head pools reads it
            return (mixed if h.dim() == 2 else mixed[:, None, :].expand(h.shape), *args[1:])

        handle = getattr(model, self.head).register_forward_pre_hook(pre)
        try:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        finally:
            handle.remove()
        y = batch["labels"]
        ce = nn.functional.cross_entropy(logits, y, reduction="none")
        if lam is not None:
            ce = lam * ce + (1 - lam) * nn.functional.cross_entropy(logits, y[perm], reduction="none")
        aux = None
        if self.contrastive is not None:
            aux = supervised_contrastive(seen["z"], y, self.contrastive.temperature)
        return logits, ce, aux

    def combine(self, loss: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
        if aux is None:
            return loss
        w = self.contrastive.weight
        return (1 - w) * loss + w * aux
