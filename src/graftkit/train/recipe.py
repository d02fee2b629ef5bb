"""The training recipe: one YAML file (or dict) that says what to train, on what, and how.

Every section is a :class:`~graftkit.config.StrictModel`, so an unknown or mistyped key is
an error that names the key and the keys that section accepts. ``key=value`` overrides from
the command line use dotted paths (``optim.lr=3e-4``) and are checked the same way.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from ..config import StrictModel, describe_validation_error, read_yaml
from ..errors import ConfigError


class DataConfig(StrictModel):
    """Local files (JSONL, CSV or Parquet, by suffix or ``format``) and the fields to read."""

    train: str
    validation: str | None = None
    format: Literal["auto", "json", "csv", "parquet"] = "auto"
    text_field: str = "text"  # classification input; plain-text LM input
    label_field: str = "label"  # classification
    labels: list[str] | None = None  # classification label order (default: sorted train labels)
    prompt_field: str | None = None  # chat SFT: user turn ...
    response_field: str | None = None  # ... and the assistant turn the loss is taken on
    system_prompt: str | None = None
    task_field: str | None = None  # multi-task data (see multitask.balance)
    answer_field: str | None = None  # exact-match eval target (causal-lm, validation)
    max_length: int = Field(256, ge=8)
    packing: bool = True  # plain-text LM: concatenate documents into max_length blocks (examples attend across their joins)
    # chat SFT / unpacked plain text: whole examples packed into rows of max_length, each with its
    # own position ids from 0 and no attention across examples (graftkit.train.data.pack)
    pack_examples: bool = False
    limit: int | None = Field(None, ge=1)  # use only the first N training rows


class OptimConfig(StrictModel):
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    batch_size: int = Field(8, ge=1)  # per process; global batch = batch_size x processes x grad_accum
    grad_accum: int = Field(1, ge=1)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)  # optimizer steps; overrides epochs
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    gradient_checkpointing: bool = False
    # CPU: dropout (modules and attention probabilities) with a mask recomputed in the backward
    # pass instead of torch's stored Bernoulli mask - same distribution, less time and memory
    # (graftkit.train.dropout); false: torch's dropout
    fast_dropout: bool = True
    # auto: liger-kernel's fused Triton kernels on CUDA when installed, else torch's (graftkit.train.kernels)
    kernels: Literal["auto", "liger", "torch"] = "auto"
    compile: bool = False  # torch.compile each transformer block's forward
    # LoRA+ (Hayou et al., 2024): LoRA's B matrices (and, as peft's create_loraplus_optimizer, every
    # 1-D trainable tensor) learn at lr x loraplus_ratio; LoRA tensors of an embedding at
    # loraplus_lr_embedding. None: one learning rate for all
    loraplus_ratio: float | None = Field(None, gt=0)
    loraplus_lr_embedding: float = Field(1e-6, gt=0)


class EvalConfig(StrictModel):
    every: int | None = Field(None, ge=1)  # optimizer steps; the final step is always evaluated
    at_start: bool = False  # also evaluate the untrained model (logged as step 0): the baseline
    batch_size: int = Field(32, ge=1)
    exact_match: bool = False  # causal-lm: greedy-generate answers for the validation prompts
    max_new_tokens: int = Field(64, ge=1)
    limit: int | None = Field(None, ge=1)  # evaluate on the first N validation rows


class OutputConfig(StrictModel):
    dir: str
    export: list[Literal["peft", "merged"]] = Field(default_factory=list)
    checkpoint_every: int | None = Field(None, ge=1)  # optimizer steps
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)


class LayerwiseConfig(StrictModel):
    """Stabilizers for fine-tuning BERT-style encoders (see :mod:`graftkit.train.layerwise`)."""

    lr_decay: float | None = Field(None, gt=0, le=1)
    freeze_bottom: int = Field(0, ge=0)
    reinit_top: int = Field(0, ge=0)


class HFTConfig(StrictModel):
    """Half Fine-Tuning (see :mod:`graftkit.train.hft`)."""

    stage_steps: int = Field(..., ge=1)
    fraction: float = Field(0.5, gt=0, lt=1)


class MaskedThoughtConfig(StrictModel):
    """Masked Thought (see :mod:`graftkit.train.masked_thought`)."""

    ratio: float = Field(..., ge=0, lt=1)
    mask_token: str | None = None  # default: the tokenizer's mask, unk or pad token


class MultitaskConfig(StrictModel):
    """Task-balanced loss as in MFTCoder (see :mod:`graftkit.train.multitask`)."""

    balance: bool = True


class EDAConfig(StrictModel):
    """Easy Data Augmentation (Wei & Zou 2019) of the training text (see :mod:`graftkit.train.augment`);
    the defaults are EDA's. Synonym replacement and insertion read WordNet (nltk)."""

    alpha_sr: float = Field(0.1, ge=0, le=1)  # share of words replaced by a synonym
    alpha_ri: float = Field(0.1, ge=0, le=1)  # share of words inserted (synonyms of words in the text)
    alpha_rs: float = Field(0.1, ge=0, le=1)  # share of words swapped
    p_rd: float = Field(0.1, ge=0, le=1)  # probability of deleting each word
    num_aug: int = Field(9, ge=1)  # augmented copies per training example (the original is kept too)


class MixupConfig(StrictModel):
    """Mixup of sentence representations (senMixup; see :mod:`graftkit.train.augment`)."""

    alpha: float = Field(1.0, gt=0)  # lambda ~ Beta(alpha, alpha)


class ContrastiveConfig(StrictModel):
    """Supervised contrastive auxiliary loss on sentence representations (see :mod:`graftkit.train.augment`)."""

    weight: float = Field(..., gt=0, lt=1)  # loss = (1 - weight) * cross-entropy + weight * contrastive
    temperature: float = Field(0.3, gt=0)


class AugmentConfig(StrictModel):
    """Data augmentation for (parameter-efficient) tuning with little data (see :mod:`graftkit.train.augment`)."""

    eda: EDAConfig | None = None
    mixup: MixupConfig | None = None
    contrastive: ContrastiveConfig | None = None


class QuantizeConfig(StrictModel):
    """QLoRA: the frozen base held in 4 bit through bitsandbytes (see :mod:`graftkit.io.quantize`)."""

    bits: int = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True  # quantize the per-block scales too (about 0.4 bits per weight less)
    compute_dtype: Literal["bf16", "fp32"] = "bf16"  # the dtype the 4-bit matmuls run in

    @field_validator("bits")
    @classmethod
    def _four(cls, value: int) -> int:
        if value != 4:
            raise ConfigError(f"quantize.bits={value}: graftkit holds a quantized base in 4 bits only (NF4 or FP4 through "
                              "bitsandbytes); set bits: 4 or drop the quantize section")
        return value

    def describe(self) -> str:
        return f"{self.quant_type.upper()}{' double-quant' if self.double_quant else ''}"


class DistillConfig(StrictModel):
    """PANDA: distillation from the source adapter's model (see :mod:`graftkit.train.distill`)."""

    teacher: str  # an adapter folder on this base (usually the init_from source)
    weight: float | Literal["auto"]  # of the KD term; auto: from the transferability of teacher -> reference
    temperature: float = Field(1.0, gt=0)
    reference: str | None = None  # weight auto: an adapter of this method trained on the target task alone
    samples: int = Field(64, ge=1)  # weight auto: training examples the task embeddings average over

    @field_validator("weight")
    @classmethod
    def _weight(cls, value: float | str) -> float | str:
        if value != "auto" and not (0 <= value < float("inf")):
            raise ConfigError(f"distill.weight={value}: give a finite number >= 0, or auto")
        return value


class Recipe(StrictModel):
    model: str
    tokenizer: str | None = None
    task: Literal["causal-lm", "classification"]
    data: DataConfig
    method: dict[str, Any] = Field(default_factory=lambda: {"method": "full"})
    optim: OptimConfig = Field(default_factory=OptimConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig
    layerwise: LayerwiseConfig | None = None
    hft: HFTConfig | None = None
    masked_thought: MaskedThoughtConfig | None = None
    multitask: MultitaskConfig | None = None
    init_from: str | None = None  # PVP: start the adapter from a saved one (graftkit.train.lineage)
    distill: DistillConfig | None = None  # PANDA (graftkit.train.distill); needs init_from
    quantize: QuantizeConfig | None = None
    augment: AugmentConfig | None = None

    @field_validator("method")
    @classmethod
    def _check_method(cls, value: dict[str, Any]) -> dict[str, Any]:
        from .. import methods  # noqa: F401  (registration)
        from ..adapter import method_for

        try:
            method_for(value)
        except ConfigError as exc:
            raise ConfigError(f"method: {exc}") from None
        return value

    @model_validator(mode="after")
    def _check_task(self) -> "Recipe":
        d = self.data
        if (d.prompt_field is None) != (d.response_field is None):
            raise ConfigError("data.prompt_field and data.response_field go together (chat SFT); set both or neither")
        if self.task == "classification" and (d.prompt_field or self.masked_thought):
            raise ConfigError("data.prompt_field/response_field and masked_thought are for task causal-lm, not classification")
        if self.masked_thought and not d.prompt_field:
            raise ConfigError("masked_thought masks response (chain-of-thought) tokens: it needs chat SFT data (data.prompt_field and data.response_field)")
        if d.pack_examples and self.task == "classification":
            raise ConfigError("data.pack_examples packs causal-LM examples (chat SFT, plain text); a classification batch "
                              "has one label per row, so its examples cannot share one: set data.pack_examples=false")
        if d.pack_examples and d.task_field:
            raise ConfigError("data.pack_examples would put examples of different tasks in one row, and multi-task data "
                              "is weighted per row: set data.pack_examples=false or drop data.task_field")
        if d.pack_examples and d.packing and "packing" in d.model_fields_set and not d.prompt_field:
            raise ConfigError("data.packing (documents concatenated into blocks, attending across their joins) and "
                              "data.pack_examples (whole documents packed, kept apart) exclude each other; set one of them to false")
        if self.multitask and not d.task_field:
            raise ConfigError("multitask needs data.task_field naming the field that holds each row's task")
        if "peft" in self.output.export:
            from ..io.peft import peft_method_names
            from ..methods import method_named

            name = self.method.get("method")
            if getattr(method_named(name), "peft", None) is None:
                raise ConfigError(f"output.export peft: peft has no format for {name!r} adapters (only {peft_method_names()}); "
                                  "export merged instead, or drop peft")
        if "merged" in self.output.export:
            from ..methods import method_named

            method = method_named(self.method.get("method"))
            if method is not None and not method.weight_delta({k: v for k, v in self.method.items() if k != "method"}):
                from ..methods.activation import refusal

                raise ConfigError(f"output.export merged: {refusal(method.name, 'a merged export', method.space)}; drop merged from output.export")
        if self.eval.exact_match and (self.task != "causal-lm" or not d.prompt_field or not d.answer_field):
            raise ConfigError("eval.exact_match needs task causal-lm with chat data (data.prompt_field/response_field) and data.answer_field")
        return self

    @model_validator(mode="after")
    def _check_distill(self) -> "Recipe":
        d = self.distill
        if d is None:
            return self
        if not self.init_from:
            raise ConfigError("distill (PANDA) trains a student started from the source adapter: set init_from to the source "
                              "adapter's folder (usually the same as distill.teacher)")
        if d.weight == "auto" and not d.reference:
            raise ConfigError("distill.weight auto measures the transferability between the teacher and an adapter trained on the "
                              "target task: set distill.reference to one (a plain run of this recipe), or give weight a number")
        if d.weight != "auto" and d.reference:
            raise ConfigError("distill.reference is read only for weight auto; drop it or set weight: auto")
        augment = getattr(self, "augment", None)
        if augment is not None and (getattr(augment, "mixup", None) or getattr(augment, "contrastive", None)):
            raise ConfigError("distill with augment.mixup/contrastive: the teacher sees the unmixed inputs and the losses would not "
                              "line up; drop one of them")
        return self

    @model_validator(mode="after")
    def _check_augment(self) -> "Recipe":
        if self.augment is not None:
            from .augment import check_recipe

            check_recipe(self)
        return self

    @model_validator(mode="after")
    def _check_quantize(self) -> "Recipe":
        if self.quantize is not None:
            from ..io.quantize import check_method

            check_method(self.method)
        return self

    # -- identity of a run -------------------------------------------------------------------

    def resolved(self) -> dict[str, Any]:
        from ..adapter import method_for

        data = self.model_dump(mode="json")
        method, config = method_for(self.method)
        data["method"] = {"method": method.name, **config.model_dump(mode="json")}
        return data

    def identity(self) -> dict[str, Any]:
        """What must match for a checkpoint to resume this run (output and eval settings may differ)."""
        data = self.resolved()
        for key in ("output", "eval"):
            data.pop(key)
        return data

    def fingerprint(self) -> str:
        """The settings' hash. A run's full identity adds the contents of its data files and
        base model (:mod:`graftkit.train.inputs`), which the recipe alone cannot see."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]

    def data_files(self) -> dict[str, str]:
        """The data files a run reads, by role (``train``, ``validation``)."""
        files = {"train": self.data.train}
        if self.data.validation:
            files["validation"] = self.data.validation
        return files


SECTIONS: dict[str, type[BaseModel]] = {
    "data": DataConfig, "optim": OptimConfig, "eval": EvalConfig, "output": OutputConfig,
    "layerwise": LayerwiseConfig, "hft": HFTConfig, "masked_thought": MaskedThoughtConfig, "multitask": MultitaskConfig, "quantize": QuantizeConfig, "augment": AugmentConfig,
    "distill": DistillConfig,
}


def _describe(exc: ValidationError) -> str:
    """One line naming the key (with its section) and the keys that section accepts."""
    loc = [str(p) for p in exc.errors()[0]["loc"]]
    if loc and loc[0] in SECTIONS and len(loc) >= 2:
        return describe_validation_error(SECTIONS[loc[0]], exc).replace(f"{SECTIONS[loc[0]].__name__}: ", f"recipe section '{loc[0]}': ", 1)
    return describe_validation_error(Recipe, exc).replace("Recipe: ", "", 1)


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from None
    except ConfigError as exc:  # raised by a section's own (strict) constructor
        msg = str(exc)
        if msg.startswith("Recipe: "):
            msg = msg[len("Recipe: "):]
        for name, cls in SECTIONS.items():
            if msg.startswith(f"{cls.__name__}: "):
                msg = f"recipe section '{name}': " + msg[len(cls.__name__) + 2:]
        raise ConfigError(f"{source}: {msg}") from None


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    data = read_yaml(path, "recipe file")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of keys (model, task, data, method, optim, eval, output)")
    return data


def _fields_of(cls: type[BaseModel] | None) -> list[str] | None:
    return sorted(cls.model_fields) if cls is not None else None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["optim.lr=3e-4", "method.r=16"]`` applied to a recipe dict (values parsed as YAML)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. optim.lr=3e-4)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        cls: type[BaseModel] | None = Recipe
        node = data
        for depth, part in enumerate(parts):
            if cls is not None and part not in cls.model_fields:
                close = difflib.get_close_matches(part, cls.model_fields, n=1)
                hint = f" (did you mean {'.'.join(parts[:depth] + [close[0]])!r}?)" if close else ""
                where = "recipe" if depth == 0 else f"recipe section '{'.'.join(parts[:depth])}'"
                raise ConfigError(f"override {key!r}: unknown key {part!r}{hint}; accepted keys of the {where}: {', '.join(_fields_of(cls))}")
            if depth == len(parts) - 1:
                node[part] = value
                break
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {'.'.join(parts[:depth + 1])} is not a section")
            node = child
            cls = SECTIONS.get(part) if depth == 0 else None  # method.* keys are checked by the method's config
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    data = apply_overrides(read_recipe_file(path), overrides or [])
    return parse_recipe(data, source=str(path))
