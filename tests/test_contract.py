"""The contract every tuning method keeps, checked on every (method, tiny model) cell.

Adding a method = one row in ``MATRIX`` below; ``test_every_registered_method_is_in_matrix``
fails until the row exists. For each cell:

1. identity at init (where the method declares it)
2. a random init changes output
3. merged forward == unmerged                          (weight delta only)
4. unmerge restores the weights                        (weight delta only)
5. disabled == base
6. save/load round trip is exact
7. only the method's parameters require grad (and get gradients)
8. base state-dict keys unchanged; unload(merge=False) restores
9. double injection is an error
10. base + materialized delta == merged weights        (weight delta only)
11. weight-only operations (materialize_delta, merge_adapter, unload(merge=True), export
    --merged of the saved adapter) refused in one line (no weight delta only)

Each row has a space column (weight / activation / sequence) and a weight-delta column, both
read from the registered method's declared capabilities (``space``, ``weight_delta(config)``,
``identity_at_init``), never from its name; they decide which cells run and which are skipped.

Then: every layer kind LoRA/DoRA/IA3 claims (Embedding, Conv2d, Linear, bare 2-D
parameter) on a small custom module, a classification head trained whole
(``train_also``), and deepcopy independence.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
from torch import nn

import graftkit as gk
import graftkit.methods  # noqa: F401  (registers every method)
from graftkit.adapter import get_state, method_for
from graftkit.io.native import adapter_from_model
from graftkit.errors import AdapterError, TargetError
from graftkit.methods.activation import article, refusal
from graftkit.registry import METHODS

from conftest import TINY_MODELS, logits, tiny_inputs



# --------------------------------------------------------------------------------------
# The matrix: one row per method configuration
# --------------------------------------------------------------------------------------

PERTURB = "perturb"  # in-place methods: randomize the trained base tensors after inject
#: P5 (issue 15): a start that rewrites the base into a residual (PiSSA, OLoRA): the non-identity start is
#: noise on the adapter's tensors, and comparisons with the original base hold to float32 rounding, not bitwise
RESIDUAL = "residual"


@dataclass(frozen=True)
class Case:
    method: str
    config: dict[str, Any]
    #: model -> targets; a missing model uses the config's own targets (or the method default);
    #: None means the method has nothing to adapt there and must say so (TargetError)
    targets: dict[str, list[str] | None] = field(default_factory=dict)
    #: config changes that give a non-identity start (a dict, or a function of the config), or PERTURB
    random: dict[str, Any] | Callable[[dict[str, Any]], dict[str, Any]] | str = PERTURB
    #: model -> extra config (e.g. IA3's feedforward subset)
    per_model: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the tiny models the row runs on (variants of a method's code path: one model keeps the
    #: suite fast; the method's main row runs on all of them)
    models: tuple[str, ...] | None = None


LORA_TARGETS = {
    # attention + MLP (Linear / GPT-2 Conv1D) and the input embedding
    "llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
    "bert": ["query", "value", "output.dense", "word_embeddings"],
    "gpt2": ["c_attn", "mlp.c_proj", "wpe"],
}
IA3_TARGETS = {
    "llama": ["k_proj", "v_proj", "down_proj"],
    "bert": ["key", "value", "intermediate.dense", "layer.*.output.dense"],
    "gpt2": ["c_attn", "mlp.c_proj"],
}
IA3_FEEDFORWARD = {
    "llama": {"feedforward": ["down_proj"]},
    "bert": {"feedforward": ["layer.*.output.dense"]},
    "gpt2": {"feedforward": ["mlp.c_proj"]},
}

FLORA_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "output.dense"], "gpt2": ["c_attn", "mlp.c_proj"]}
LYCORIS_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "output.dense"], "gpt2": ["c_attn", "mlp.c_proj"]}
OFT_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "output.dense"], "gpt2": ["c_attn", "mlp.c_proj"]}  # P3
COMPOSE_LORA = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"], "gpt2": ["c_attn"]}
#: each part's non-identity start (a composition's random start is its parts')
PART_RANDOM = {"lora": {"init_lora_weights": False}, "parallel_adapter": {"init_weights": False}}


def _compose_random(cfg: dict[str, Any]) -> dict[str, Any]:
    return {**cfg, "methods": [{**part, **PART_RANDOM.get(part["method"], {})} for part in cfg["methods"]]}


MATRIX: dict[str, Case] = {
    "lora": Case("lora", {"r": 4, "lora_alpha": 8}, LORA_TARGETS, {"init_lora_weights": False}),
    "lora+rslora": Case("lora", {"r": 4, "lora_alpha": 8, "use_rslora": True}, LORA_TARGETS, {"init_lora_weights": False}),
    "lora+dora": Case("lora", {"r": 4, "lora_alpha": 8, "use_dora": True}, LORA_TARGETS, {"init_lora_weights": False}),
    "lora-all-linear": Case("lora", {"r": 2, "targets": ["all-linear"]}, {}, {"init_lora_weights": False}),
    "ia3": Case("ia3", {}, IA3_TARGETS, {"init_ia3_weights": False}, IA3_FEEDFORWARD),
    # the tiny Llama has no bias terms at all
    "bitfit": Case("bitfit", {}, {"llama": None}),
    "full": Case("full", {}),
    "full-top1": Case("full", {"layers": "top:1"}),
    # activation space: bottleneck adapters at the method's default block roles
    "houlsby": Case("houlsby", {"reduction_factor": 4}, random={"init_weights": False}),
    "houlsby+ln": Case("houlsby", {"bottleneck_size": 3, "train_layer_norm": True, "layers": "top:1"},
                       random={"init_weights": False}, models=("bert",)),
    "pfeiffer": Case("pfeiffer", {"reduction_factor": 8, "non_linearity": "gelu"}, random={"init_weights": False}),
    "pfeiffer-targets": Case("pfeiffer", {"bottleneck_size": 4},
                             {"llama": ["layers.1.mlp"], "bert": ["layer.1.output.dense"], "gpt2": ["h.1.mlp"]},
                             random={"init_weights": False}, models=("bert",)),
    "parallel_adapter": Case("parallel_adapter", {"reduction_factor": 4, "scaling": 2.0}, random={"init_weights": False}),
    "parallel_adapter+connected": Case("parallel_adapter", {"bottleneck_size": 4, "connected": True},
                                       random={"init_weights": False}, models=("gpt2",)),
    "houlsby-shared": Case("houlsby", {"reduction_factor": 4, "shared": "layers"}, random={"init_weights": False},
                           models=("llama",)),
    "compacter": Case("compacter", {"reduction_factor": 4, "phm_dim": 4}, random={"init_weights": False}),
    "compacter-unshared": Case("compacter", {"bottleneck_size": 4, "phm_dim": 2, "phm_rank": 2, "shared_phm_rule": False},
                               random={"init_weights": False}, models=("bert",)),
    # Compacter with the FFN place only: compacter's rows cover the PHM layers on every model
    "compacter_pp": Case("compacter_pp", {"reduction_factor": 8, "phm_dim": 2}, random={"init_weights": False},
                         models=("gpt2",)),
    # weight space, trained in place (like BitFit)
    "ln_tuning": Case("ln_tuning", {}),
    # compositions (the unified view): one config list; the parts' own rows cover them alone
    "compose-mam": Case("compose", {}, per_model={m: {"methods": [
        {"method": "parallel_adapter", "reduction_factor": 4},
        {"method": "lora", "r": 2, "targets": t}]} for m, t in COMPOSE_LORA.items()},
        random=_compose_random, models=("llama", "bert")),
    "compose-weight": Case("compose", {}, per_model={m: {"methods": [
        {"method": "lora", "r": 2, "targets": t},
        {"method": "ln_tuning"}]} for m, t in COMPOSE_LORA.items()},
        random=_compose_random, models=("gpt2",)),
    # sequence space: soft tokens in front of the input (never the identity: a fresh prompt is random)
    "prompt_tuning": Case("prompt_tuning", {"num_virtual_tokens": 4}, random={}),
    "prompt_tuning-vocab": Case("prompt_tuning", {"num_virtual_tokens": 3, "init": "vocab"}, random={}, models=("gpt2",)),
    "p_tuning": Case("p_tuning", {"num_virtual_tokens": 4, "encoder_hidden_size": 16}, random={}),
    "p_tuning-lstm": Case("p_tuning", {"num_virtual_tokens": 3, "encoder_reparameterization_type": "LSTM"}, random={},
                          models=("llama",)),
    # sequence space: per-layer key/value prefixes in the cache (random start: N(0, 1) prefixes)
    "prefix_tuning": Case("prefix_tuning", {"num_virtual_tokens": 3}, random={}),
    "p_tuning_v2": Case("p_tuning_v2", {"num_virtual_tokens": 4, "prefix_dropout": 0.0}, random={}, models=("bert", "llama")),
    # per-layer prompts generated from the instruction, entering as key/value prefixes
    "iapt": Case("iapt", {"num_virtual_tokens": 2, "bottleneck": 4}, random={}),
    # P3 (issue 15): OFT and BOFT, rotations of each weight's inputs (W R^T), on methods/weight_delta.py; Conv1D too
    "oft": Case("oft", {"oft_block_size": 8}, OFT_TARGETS, {"init_weights": False}),
    "oft-cayley-share": Case("oft", {"r": 2, "use_cayley_neumann": False, "block_share": True}, OFT_TARGETS,
                             {"init_weights": False}, models=("gpt2",)),
    "boft": Case("boft", {"boft_block_size": 4, "boft_n_butterfly_factor": 2}, OFT_TARGETS, {"init_weights": False}),
    # P1 (issue 15): LoHa, LoKr, FourierFT - weight deltas from methods/weight_delta.py; GPT-2's Conv1D too
    "loha": Case("loha", {"r": 2, "alpha": 4}, LYCORIS_TARGETS, {"init_weights": False}),
    "lokr": Case("lokr", {"r": 2, "alpha": 4, "decompose_both": True}, LYCORIS_TARGETS, {"init_weights": False}),
    "lokr-full": Case("lokr", {"r": 8, "decompose_factor": 4, "init_weights": "lycoris"}, LYCORIS_TARGETS, {"init_weights": False},
                      models=("bert",)),
    "fourierft": Case("fourierft", {"n_frequency": 64, "scaling": 10.0, "init_weights": True}, LYCORIS_TARGETS, {"init_weights": False}),
    # lead: GreenTrainer trains a FLOPs-budgeted subset in place (the selection runs in graft train)
    "greentrainer": Case("greentrainer", {"flops_budget": 0.4}, models=("bert",)),
    # P8 (issue 15): random-subspace tuning, theta0 + P z over every parameter (GPT-2's tied wte left out)
    "subspace": Case("subspace", {"d": 8}, random={"init_weights": False}, per_model={"gpt2": {"exclude": ["wte"]}}),
    "subspace-fastfood": Case("subspace", {"d": 12, "projection": "fastfood"}, random={"init_weights": False}, models=("bert",)),
    # P7 (issue 15): sparse fine-tuning - in-place sparse sites (LT-SFT, APET) and diff pruning's gated delta, all saved
    # as indices + values (methods/sparse.py)
    "lt_sft": Case("lt_sft", {"fraction": 0.05}),
    "apet": Case("apet", {"num_trainable": 500, "targets": ["all-linear"]}),
    "apet-rows": Case("apet", {"fraction": 0.1, "structure": "rows"}, models=("bert",)),
    "diff_pruning": Case("diff_pruning", {}, random={"init_weights": False}, per_model={"gpt2": {"exclude": ["wte"]}}),
    # P6 (issue 15): FLoRA (Tucker delta) and DSEE (low-rank + sparse delta), on methods/weight_delta.py
    "flora": Case("flora", {"r": 2}, FLORA_TARGETS, {"init_weights": False}),
    "flora-ranks": Case("flora", {"r": [3, 2], "scale": 2.0}, FLORA_TARGETS, {"init_weights": False}, models=("llama",)),
    "dsee": Case("dsee", {"r": 2, "num_sparse": 16}, FLORA_TARGETS, {"init_weights": False}),
    "dsee-rows-pruned": Case("dsee", {"r": 2, "structure": "rows", "num_sparse": 3, "sparse_select": "decomposition",
                                      "decompose_rank": 2, "prune": 0.3}, FLORA_TARGETS, {"init_weights": False}, models=("bert", "gpt2")),
    "dsee-heads": Case("dsee", {"r": 2, "structure": "heads", "head_dim": 8, "sparse_fraction": 0.5, "sparse_select": "random"},
                       {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}, {"init_weights": False}, models=("llama", "bert")),
    # P4 (issue 15): AdaLoRA, the SVD-form delta P diag(E) Q (its rank allocation runs in graft train)
    "adalora": Case("adalora", {"init_r": 3, "target_r": 2, "lora_alpha": 4}, {"llama": ["q_proj", "v_proj", "down_proj"],
                    "bert": ["query", "value", "output.dense"], "gpt2": ["c_attn", "mlp.c_proj"]}, {"init_lora_weights": False}),
    # P4: Light-PEFT, a LoRA on Linear layers whose early pruning runs in graft train (GPT-2 has no Linear but its tied head)
    "light_peft": Case("light_peft", {"r": 4, "lora_alpha": 8}, {"llama": ["q_proj", "v_proj", "down_proj"],
                       "bert": ["query", "value", "output.dense"]}, {"init_lora_weights": False}, models=("llama", "bert")),
    # P5 (issue 15): LoRA starts that rewrite the base into a residual, W - s B0 A0 (PiSSA, OLoRA; GPT-2's Conv1D too).
    # EVA's start needs training batches (graft train or lora_init.eva_init): tests/test_lora_init.py covers it
    "lora+pissa": Case("lora", {"r": 4, "lora_alpha": 8, "init_lora_weights": "pissa"}, {"llama": ["q_proj", "v_proj", "down_proj"],
                       "bert": ["query", "value", "output.dense"], "gpt2": ["c_attn", "mlp.c_proj"]}, RESIDUAL),
    "lora+olora": Case("lora", {"r": 2, "lora_alpha": 4, "init": "olora", "use_rslora": True}, {"llama": ["k_proj", "up_proj"],
                       "bert": ["key", "intermediate.dense"], "gpt2": ["c_attn"]}, RESIDUAL, models=("llama", "gpt2")),
    # P2 (issue 15): VeRA (one shared frozen random pair, trained vectors; GPT-2's Conv1D too)
    "vera": Case("vera", {"r": 4}, LYCORIS_TARGETS, {"init_weights": False}),
    "vera-unsaved": Case("vera", {"r": 3, "save_projection": False, "projection_prng_key": 5}, LYCORIS_TARGETS,
                         {"init_weights": False}, models=("gpt2",)),
    # P2: DEFT is a LoRA trained with a density loss (training only): LoRA's contract on its own config
    "deft": Case("deft", {"r": 4, "lora_alpha": 8, "density_weight": 0.5}, LORA_TARGETS, {"init_lora_weights": False},
                 models=("bert", "gpt2")),
    # issue 16: MeteoRA, frozen LoRA experts mixed per token by a trained top-k gate (activation space; random experts here,
    # LoRA folders in tests/test_meteora.py)
    "meteora": Case("meteora", {"num_experts": 3, "r": 2, "top_k": 2}, LYCORIS_TARGETS, {"init_weights": False}),
}

MODELS = list(TINY_MODELS)


def config_for(row: str, model_name: str, random: bool = False) -> dict[str, Any]:
    case = MATRIX[row]
    cfg = {"method": case.method, **case.config, **case.per_model.get(model_name, {})}
    if case.targets.get(model_name) is not None:
        cfg["targets"] = case.targets[model_name]
    if random and isinstance(case.random, dict):
        cfg.update(case.random)
    elif random and callable(case.random):
        cfg = case.random(cfg)
    return cfg


def capabilities(row: str, model_name: str = MODELS[0]) -> tuple[Any, Any]:
    """The registered method of a row and its parsed config: the space column and which cells
    apply come from what the method declares, never from its name."""
    return method_for(config_for(row, model_name))


def space(row: str) -> str:
    method, cfg = capabilities(row)
    # a composition answers for its config (the widest space of its parts)
    return method.space_of(cfg) if hasattr(method, "space_of") else method.space


def identity_at_init(row: str) -> bool:
    method, cfg = capabilities(row)
    return method.identity_for(cfg) if hasattr(method, "identity_for") else method.identity_at_init


def weight_delta(row: str, model_name: str = MODELS[0]) -> bool:
    method, cfg = capabilities(row, model_name)
    return method.weight_delta(cfg)


def _cells(keep=lambda row, model: True, skip=lambda row, model: None):
    """(row, model) cells; ``skip`` returns a reason (derived from a capability) or None."""
    out = []
    for row, case in MATRIX.items():
        for model in case.models or MODELS:
            if case.targets.get(model, ()) is None or not keep(row, model):
                continue
            reason = skip(row, model)
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            out.append(pytest.param(row, model, id=f"{row}-{model}-{space(row)}", marks=marks))
    return out


def _no_delta(row: str, model: str) -> str | None:
    if weight_delta(row, model):
        return None
    return (f"{space(row)}-space method {capabilities(row)[0].name} declares no weight delta: merging and "
            "materializing are refused (test_weight_only_operations_refused)")


def _not_identity(row: str, model: str) -> str | None:
    return None if identity_at_init(row) else f"{capabilities(row)[0].name} does not declare identity_at_init"


CELLS = _cells()
#: cells that merge or materialize a weight delta
DELTA_CELLS = _cells(skip=_no_delta)
#: cells of methods without a weight delta
NO_DELTA_CELLS = _cells(keep=lambda row, model: not weight_delta(row, model))
INAPPLICABLE = [
    pytest.param(row, model, id=f"{row}-{model}")
    for row, case in MATRIX.items()
    for model in MODELS
    if case.targets.get(model, ()) is None
]


def tiny(model_name: str, seed: int = 0) -> nn.Module:
    """A conftest tiny model whose biases are not all zero (as in a pretrained model), so
    the bias paths of IA3 (scaled with the output), BitFit and merging are exercised."""
    model = TINY_MODELS[model_name](seed)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


_BASE_LOGITS: dict[str, torch.Tensor] = {}
_BASE_STATE: dict[str, dict[str, torch.Tensor]] = {}


def base_logits(model_name: str) -> torch.Tensor:
    if model_name not in _BASE_LOGITS:
        model = tiny(model_name)
        _BASE_LOGITS[model_name] = logits(model, tiny_inputs())
        _BASE_STATE[model_name] = {k: v.clone() for k, v in model.state_dict().items()}
    return _BASE_LOGITS[model_name]


def base_state(model_name: str) -> dict[str, torch.Tensor]:
    base_logits(model_name)
    return _BASE_STATE[model_name]


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 7, base_only: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.requires_grad and not (base_only and is_adapter_key(name)):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def build(row: str, model_name: str, random: bool = False, seed: int = 0) -> nn.Module:
    """A tiny model with the row's adapter; ``random`` gives it a non-identity start (base
    tensors trained in place alongside an adapter, e.g. layer norms, are perturbed too)."""
    model = tiny(model_name, seed)
    torch.manual_seed(1234)  # adapter init
    gk.inject(model, config_for(row, model_name, random))
    if random:
        perturb(model, base_only=MATRIX[row].random not in (PERTURB, RESIDUAL))
    return model


def same(row: str, got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Bitwise, or to float32 rounding for a RESIDUAL row (the original base is W_res + s B0 A0 there)."""
    if MATRIX[row].random == RESIDUAL:
        assert_close(got, want, 1e-5, what, relative=True)
    else:
        assert torch.equal(got, want), what


def is_adapter_key(name: str) -> bool:
    return ".graft_adapter." in f".{name}"


def base_keys(model: nn.Module) -> set[str]:
    return {k for k in model.state_dict() if not is_adapter_key(k)}


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float, what: str = "", relative: bool = False,
                 via: torch.Tensor | None = None) -> None:
    """``relative``: float32 rounding of ``w + d - d`` grows with |w + d|, so scale ``atol`` by
    the largest magnitude (above 1) of the two tensors and the intermediate ``via``."""
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    if not a.numel():
        return
    if relative:
        atol = atol * max(1.0, a.abs().max().item(), b.abs().max().item(), 0.0 if via is None else via.abs().max().item())
    err = (a.float() - b.float()).abs().max().item()
    assert err <= atol, f"{what}: max abs diff {err:.3g} > {atol:.3g}"


# --------------------------------------------------------------------------------------
# Completeness
# --------------------------------------------------------------------------------------

def test_every_registered_method_is_in_matrix():
    covered = {case.method for case in MATRIX.values()}
    missing = sorted(set(METHODS.names()) - covered)
    assert not missing, f"methods without a row in the contract MATRIX: {missing}"
    assert not covered - set(METHODS.names()), "MATRIX names a method that is not registered"


def test_matrix_rows_parse():
    for row, case in MATRIX.items():
        for model_name in MODELS:
            cfg = config_for(row, model_name, random=True)
            method, _ = method_for(cfg)
            assert method.name == case.method


@pytest.mark.parametrize("row", list(MATRIX))
def test_space_column_matches_the_sites(row):
    """A method's declared space and weight delta agree with what it attaches: weight-space
    sites adapt parameters and have a delta, activation-space sites hook modules and have none."""
    from graftkit.methods.activation import ModuleSite

    model_name = next(m for m in MATRIX[row].models or MODELS if MATRIX[row].targets.get(m, ()) is not None)
    model = build(row, model_name)
    sites = gk.sites(model)
    hooked = [n for n, s in sites.items() if isinstance(s, ModuleSite)]
    if space(row) == "weight":
        assert weight_delta(row, model_name) and not hooked, hooked
        assert set(gk.materialize_delta(model)) == set(sites)
    else:
        assert space(row) in ("activation", "sequence")
        assert not weight_delta(row, model_name)
        if space(row) == "activation":
            assert hooked and all(n in dict(model.named_modules()) for n in hooked)


@pytest.mark.parametrize("row,model_name", INAPPLICABLE)
def test_inapplicable_cell_says_so(row, model_name):
    model = tiny(model_name)
    with pytest.raises(TargetError, match="no parameter"):
        gk.inject(model, config_for(row, model_name))
    assert get_state(model) is None
    assert all(p.requires_grad for p in model.parameters()), "a failed inject must leave the model as it was"


# --------------------------------------------------------------------------------------
# The contract, per cell
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("row,model_name", _cells(skip=_not_identity))
def test_identity_at_init(row, model_name):
    model = build(row, model_name)
    out = logits(model, tiny_inputs())
    assert_close(out, base_logits(model_name), 1e-6, "default init must reproduce the base model")


@pytest.mark.parametrize("row,model_name", CELLS)
def test_random_init_changes_output(row, model_name):
    model = build(row, model_name, random=True)
    out = logits(model, tiny_inputs())
    base = base_logits(model_name)
    # relative: the tiny BERT's classification logits are themselves ~0.02
    assert (out - base).abs().max() > 1e-3 * base.abs().max(), "a non-identity adapter had no effect on the output"
    if weight_delta(row, model_name):
        delta = gk.materialize_delta(model)
        assert delta and any(d.abs().max() > 0 for d in delta.values())


@pytest.mark.parametrize("row,model_name", DELTA_CELLS)
def test_merged_equals_unmerged(row, model_name):
    model = build(row, model_name, random=True)
    ids = tiny_inputs()
    unmerged = logits(model, ids)
    gk.merge_adapter(model)
    merged = logits(model, ids)
    assert_close(merged, unmerged, 1e-5, "merged forward")
    gk.merge_adapter(model)  # merging twice is a no-op
    assert_close(logits(model, ids), unmerged, 1e-5, "merged twice")
    gk.unmerge_adapter(model)
    assert_close(logits(model, ids), unmerged, 1e-5, "unmerged again")


@pytest.mark.parametrize("row,model_name", DELTA_CELLS)
def test_unmerge_restores_weights(row, model_name):
    model = build(row, model_name, random=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gk.merge_adapter(model)
    after_merge = {k: v.clone() for k, v in model.state_dict().items()}
    if MATRIX[row].random != PERTURB:  # an unmerged method must actually change weights when merged
        assert any(not torch.equal(before[k], after_merge[k]) for k in before)
    gk.unmerge_adapter(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert_close(after[k], before[k], 1e-6, k, relative=True, via=after_merge[k])


@pytest.mark.parametrize("row,model_name", CELLS)
def test_disabled_equals_base(row, model_name):
    model = build(row, model_name, random=True)
    ids = tiny_inputs()
    adapted = logits(model, ids)
    with gk.disabled(model):
        same(row, logits(model, ids), base_logits(model_name), "disabled")
    assert torch.equal(logits(model, ids), adapted), "leaving disabled() must bring the adapter back"


@pytest.mark.parametrize("row,model_name", DELTA_CELLS)
def test_disable_while_merged(row, model_name):
    model = build(row, model_name, random=True)
    gk.merge_adapter(model)
    if MATRIX[row].random == PERTURB:  # in-place methods are always "merged" and can still be disabled
        with gk.disabled(model):
            assert torch.equal(logits(model, tiny_inputs()), base_logits(model_name))
    else:
        with pytest.raises(AdapterError, match="unmerge"):
            with gk.disabled(model):
                pass


@pytest.mark.parametrize("row,model_name", CELLS)
def test_save_load_roundtrip_exact(row, model_name, tmp_path):
    model = build(row, model_name, random=True)
    ids = tiny_inputs()
    expected = logits(model, ids)
    path = gk.save_adapter(model, tmp_path / "adapter")
    assert (path / "adapter.json").is_file() and (path / "adapter.safetensors").is_file()
    fresh = tiny(model_name)
    gk.load_adapter(fresh, path)
    same(row, logits(fresh, ids), expected, "a reloaded adapter must reproduce the logits bitwise")
    want, got = adapter_from_model(model).tensors, adapter_from_model(fresh).tensors
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    if weight_delta(row, model_name):
        want, got = gk.materialize_delta(model), gk.materialize_delta(fresh)
        assert want.keys() == got.keys()
        for k in want:
            same(row, got[k], want[k], k)
    assert get_state(fresh).targets == get_state(model).targets
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("row,model_name", CELLS)
def test_only_adapter_parameters_train(row, model_name):
    model = build(row, model_name)
    state = get_state(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing to train"
    if MATRIX[row].random == PERTURB:
        # in-place methods train exactly the targeted base tensors (tied aliases share one tensor)
        assert trainable == set(state.targets) | set(state.train_also)
        assert not any(is_adapter_key(n) for n in trainable)
        if MATRIX[row].method == "bitfit":
            assert all(n.endswith("bias") for n in trainable)
        if MATRIX[row].config.get("layers") == "top:1":
            from graftkit.targets import block_index

            assert {block_index(n) for n in trainable} == {1}
    else:
        # the adapter's own tensors, plus base tensors a method trains in place alongside them
        # (a bottleneck's layer norms, LN tuning in a composition)
        sites = gk.sites(model)
        inplace = {n for n, s in sites.items() if s.inplace}
        adapter_params = {n for n, _ in model.named_parameters() if is_adapter_key(n)}
        assert trainable == adapter_params | inplace, sorted(trainable ^ (adapter_params | inplace))
        assert set(state.targets) == set(sites), "every saved target is a site and every site a saved target"
        hooked = [s for s in sites.values() if not s.inplace]
        assert hooked, "no module carries the adapter"
        # every slot is a trainable parameter, counted once (shared tensors have one slot), except the
        # ones a site declares frozen (saved, never trained: VeRA's shared random pair)
        frozen = [(s, set(getattr(s, "frozen_slots", ()))) for s in hooked]

        def trained(s, f):  # a site saved in another form than it trains names its trained tensors (diff pruning)
            if hasattr(s, "trained_slots"):
                return {n: getattr(s, n) for n in s.trained_slots}
            return {k: t for k, t in s.slot_tensors().items() if k not in f}

        assert len(adapter_params) == sum(len(trained(s, f)) for s, f in frozen)
        for s, f in frozen:
            assert all(isinstance(t, nn.Parameter) and t.requires_grad for t in trained(s, f).values())
            assert not any(t.requires_grad for k, t in s.slot_tensors().items() if k in f)
        if MATRIX[row].method in ("lora", "ia3"):
            slots_per_site = 3 if MATRIX[row].config.get("use_dora") else (2 if MATRIX[row].method == "lora" else 1)
            assert len(trainable) == slots_per_site * len(state.targets)
        config = capabilities(row, model_name)[1]
        if getattr(config, "train_layer_norm", False):
            assert inplace and all("norm" in type(sites[n].owner).__name__.lower() for n in inplace), sorted(inplace)
        elif hasattr(config, "train_layer_norm"):
            assert not inplace, "a bottleneck adapter without train_layer_norm trains base tensors"
    # gradients flow to the trainable tensors only
    model.train()
    out = model(input_ids=tiny_inputs()).logits
    out.float().pow(2).mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{n} is trainable but got no gradient"
        else:
            assert p.grad is None, f"{n} is frozen but got a gradient"


@pytest.mark.parametrize("row,model_name", CELLS)
def test_base_keys_unchanged_and_unload_restores(row, model_name):
    original = base_state(model_name)
    model = build(row, model_name, random=True)
    assert base_keys(model) == set(original), "injection renamed or added base state-dict keys"
    inplace = {n for n, s in gk.sites(model).items() if s.inplace}  # e.g. layer norms trained alongside
    residual = set(get_state(model).targets) if MATRIX[row].random == RESIDUAL else set()
    for k, v in original.items():  # unmerged methods leave base values alone (a residual start: all but its targets)
        if MATRIX[row].random != PERTURB and k not in inplace and k not in residual:
            assert torch.equal(model.state_dict()[k], v), k
    gk.unload(model, merge=False)
    restored = model.state_dict()
    assert set(restored) == set(original)
    for k, v in original.items():
        same(row, restored[k], v, f"unload(merge=False) did not restore {k}")
    assert all(p.requires_grad for p in model.parameters()), "unload must give back the original requires_grad flags"
    assert not any("graft_adapter" in name for name, _ in model.named_modules())
    assert get_state(model) is None
    same(row, logits(model, tiny_inputs()), base_logits(model_name), "logits after unload(merge=False)")


@pytest.mark.parametrize("row,model_name", DELTA_CELLS)
def test_unload_merged_keeps_effect(row, model_name):
    model = build(row, model_name, random=True)
    ids = tiny_inputs()
    adapted = logits(model, ids)
    gk.unload(model, merge=True)
    assert set(model.state_dict()) == set(base_state(model_name))
    assert_close(logits(model, ids), adapted, 1e-5, "unload(merge=True)")


WEIGHT_ONLY = [  # (what the refusal names, the operation)
    ("materialize_delta", gk.materialize_delta),
    ("merging into the weights", gk.merge_adapter),
    ("unload(merge=True)", lambda m: gk.unload(m, merge=True)),
]


@pytest.mark.parametrize("row,model_name", NO_DELTA_CELLS)
def test_weight_only_operations_refused(row, model_name, tmp_path):
    from graftkit.methods.activation import refuse_weight_op

    method, _ = capabilities(row, model_name)
    model = build(row, model_name, random=True)
    ids = tiny_inputs()
    adapted = logits(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    messages = []
    for what, op in WEIGHT_ONLY:
        with pytest.raises(AdapterError) as exc:
            op(model)
        messages.append((what, str(exc.value)))
    # the saved adapter is refused too (export --merged reads it without a live model)
    saved = gk.read_adapter(gk.save_adapter(model, tmp_path / "a"))
    with pytest.raises(AdapterError) as exc:
        refuse_weight_op(saved.method, saved.meta["config"], "export --merged")
    messages.append(("export --merged", str(exc.value)))
    for what, msg in messages:
        assert "\n" not in msg, msg
        assert msg.startswith(f"{what} needs a weight delta, and {article(method.name)} {method.name} adapter has none: "
                              f"it changes the model's {method.space}s"), msg
    # a refused operation leaves the adapter attached and the model as it was
    assert get_state(model) is not None
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(logits(model, ids), adapted)
    gk.unload(model, merge=False)
    assert torch.equal(logits(model, ids), base_logits(model_name))


@pytest.mark.parametrize("row,model_name", CELLS)
def test_double_injection_detected(row, model_name):
    model = build(row, model_name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match="already"):
        gk.inject(model, config_for(row, model_name))
    with pytest.raises(AdapterError, match="already"):
        gk.inject(model, {"method": "lora", "targets": ["all-linear"]})
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    # a fresh inject after unload works
    gk.unload(model, merge=False)
    gk.inject(model, config_for(row, model_name))


@pytest.mark.parametrize("row,model_name", DELTA_CELLS)
def test_materialized_delta_matches_merge(row, model_name):
    original = base_state(model_name)
    model = build(row, model_name, random=True)
    delta = gk.materialize_delta(model)
    assert delta, "empty delta"
    state = get_state(model)
    for k, d in delta.items():
        assert k in original, f"delta key {k} is not a base parameter name"
        assert d.dtype == torch.float32 and d.shape == original[k].shape, k
    assert set(state.targets) <= set(delta)
    gk.merge_adapter(model)
    merged = model.state_dict()
    for k, d in delta.items():
        assert_close(original[k].float() + d, merged[k].float(), 1e-6, k, relative=True)
    # keys outside the delta are untouched by merging
    for k in set(original) - set(delta):
        if k == "lm_head.weight" and model_name == "gpt2":
            continue  # tied to transformer.wte.weight
        assert torch.equal(merged[k], original[k]), k
    # the delta of a merged adapter is the same delta
    again = gk.materialize_delta(model)
    for k in delta:
        assert_close(again[k], delta[k], 1e-6, k, relative=True)


@pytest.mark.parametrize("row", ["lora", "lora+dora", "ia3", "houlsby", "compacter"])
def test_half_precision_base(row, tmp_path):
    # bf16 base, float32 adapter tensors: identity, exact reload, merge within bf16 rounding
    ids = tiny_inputs()
    base = tiny("llama").to(torch.bfloat16)
    expected_base = logits(base, ids)
    model = tiny("llama").to(torch.bfloat16)
    gk.inject(model, config_for(row, "llama"))
    assert torch.equal(logits(model, ids), expected_base)
    assert all(p.dtype == torch.float32 for p in gk.trainable_parameters(model))
    with torch.no_grad():
        for p in gk.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
    out = logits(model, ids)
    assert out.dtype == torch.bfloat16 and not torch.equal(out, expected_base)
    gk.save_adapter(model, tmp_path / "a")
    fresh = tiny("llama").to(torch.bfloat16)
    gk.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(logits(fresh, ids), out)
    if not weight_delta(row, "llama"):
        return
    gk.merge_adapter(model)
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if not is_adapter_key(n))
    assert_close(logits(model, ids), out, 2e-2 * out.abs().max().item(), "bf16 merged forward")


# --------------------------------------------------------------------------------------
# Layer kinds on a custom module
# --------------------------------------------------------------------------------------

class KindsNet(nn.Module):
    """Embedding -> Conv2d -> Linear -> bare (in, out) matrix used as ``x @ self.proj``."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.conv = nn.Conv2d(2, 3, kernel_size=3, padding=1)
        self.fc = nn.Linear(18, 10)
        self.proj = nn.Parameter(torch.randn(10, 5) * 0.3)

    def forward(self, ids):
        b, n = ids.shape
        h = self.emb(ids).view(b, n, 2, 6).permute(0, 2, 1, 3)  # (b, 2, n, 6)
        h = torch.tanh(self.conv(h))  # (b, 3, n, 6)
        h = h.permute(0, 2, 1, 3).reshape(b, n, 18)
        h = torch.tanh(self.fc(h))
        return h @ self.proj


def kinds_net(seed: int = 0) -> KindsNet:
    torch.manual_seed(seed)
    return KindsNet().eval()


KIND_IDS = torch.randint(0, 20, (3, 4), generator=torch.Generator().manual_seed(3))
KIND_TARGETS = ["emb", "conv", "fc", "proj"]
KIND_CONFIGS = {
    "lora": {"method": "lora", "r": 2, "lora_alpha": 4, "targets": KIND_TARGETS},
    "dora": {"method": "lora", "r": 2, "lora_alpha": 4, "use_dora": True, "targets": KIND_TARGETS},
    "ia3": {"method": "ia3", "targets": ["conv", "fc"]},
    "ia3-ff": {"method": "ia3", "targets": ["conv", "fc"], "feedforward": ["conv", "fc"]},
}
KIND_RANDOM = {"lora": {"init_lora_weights": False}, "dora": {"init_lora_weights": False},
               "ia3": {"init_ia3_weights": False}, "ia3-ff": {"init_ia3_weights": False}}


def kinds_model(name: str, random: bool, seed: int = 0) -> KindsNet:
    model = kinds_net(seed)
    torch.manual_seed(99)
    cfg = {**KIND_CONFIGS[name], **(KIND_RANDOM[name] if random else {})}
    return gk.inject(model, cfg)


def run(model):
    with torch.no_grad():
        return model(KIND_IDS)


@pytest.mark.parametrize("name", list(KIND_CONFIGS))
def test_layer_kinds_contract(name, tmp_path):
    base = kinds_net()
    base_out = run(base)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}

    ident = kinds_model(name, random=False)
    assert_close(run(ident), base_out, 1e-6, "identity at init")
    kinds = {n: s.kind for n, s in gk.sites(ident).items()}
    if name.startswith("lora") or name == "dora":
        assert kinds == {"emb.weight": "embedding", "conv.weight": "conv2d", "fc.weight": "linear", "proj": "param"}
    else:
        assert kinds == {"conv.weight": "conv2d", "fc.weight": "linear"}

    model = kinds_model(name, random=True)
    assert set(k for k in model.state_dict() if not is_adapter_key(k)) == set(base_sd)
    out = run(model)
    assert (out - base_out).abs().max() > 1e-3, "random init must change the output"
    with gk.disabled(model):
        assert torch.equal(run(model), base_out)

    delta = gk.materialize_delta(model)
    assert set(delta) >= set(kinds)
    for k, d in delta.items():
        assert d.shape == base_sd[k].shape, k
    gk.merge_adapter(model)
    assert_close(run(model), out, 1e-5, "merged forward")
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    for k, d in delta.items():
        assert_close(base_sd[k] + d, merged[k], 1e-6, f"delta of {k}", relative=True)
    gk.unmerge_adapter(model)
    for k, v in base_sd.items():
        assert_close(model.state_dict()[k], v, 1e-6, f"unmerge {k}", relative=True, via=merged[k])
    assert_close(run(model), out, 1e-5, "unmerged forward")

    gk.save_adapter(model, tmp_path / "a")
    fresh = kinds_net()
    gk.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(run(fresh), out)
    d2 = gk.materialize_delta(fresh)
    assert all(torch.equal(d2[k], delta[k]) for k in delta)

    for m in (model, fresh):
        gk.unload(m, merge=False)
        assert type(m) is KindsNet, "unload must give the bare-parameter owner its class back"
        assert set(m.state_dict()) == set(base_sd)
    # fresh was never merged: its base tensors are bitwise the originals
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in base_sd.items())
    assert torch.equal(run(fresh), base_out)


def test_bare_parameter_swaps_class_per_instance():
    a, b = kinds_model("lora", random=True), kinds_net()
    assert type(a) is not KindsNet and isinstance(a, KindsNet)
    assert type(b) is KindsNet, "injecting one instance must not change another"
    assert "proj" in dict(a.named_parameters()) and a._parameters["proj"] is not None
    # the property reads the adapted value; the parameter itself is unchanged
    assert not torch.equal(a.proj, a._parameters["proj"])
    gk.merge_adapter(a)
    assert torch.equal(a.proj, a._parameters["proj"])
    gk.unload(a, merge=True)
    assert type(a) is KindsNet and isinstance(a.proj, nn.Parameter)


def test_bare_parameter_gets_gradient():
    model = kinds_model("lora", random=True)
    model.train()
    model(KIND_IDS).pow(2).mean().backward()
    site = gk.sites(model)["proj"]
    assert site.lora_A.grad is not None and site.lora_B.grad is not None
    assert model._parameters["proj"].grad is None


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    assert get_state(model) is None
    assert not type(model).__name__.startswith("Grafted")
    assert not any("graft_adapter" in n for n, _ in model.named_modules()), "a refused inject left sites behind"
    assert all(p.requires_grad for p in model.parameters()), "a refused inject froze the model"
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_grouped_conv_lora_is_refused_and_model_untouched():
    from graftkit.errors import UnsupportedError

    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 3, groups=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedError, match="groups"):
        gk.inject(model, {"method": "lora", "targets": ["0", "1"]})
    assert_untouched(model, before)


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_on_tied_embedding_is_refused(use_dora):
    # GPT-2 ties lm_head.weight to transformer.wte.weight: a hooked adapter on the embedding
    # would change the lookup only while unmerged, and the output head too once merged.
    model = tiny("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TargetError, match=r"transformer\.wte\.weight is tied to lm_head\.weight") as exc:
        gk.inject(model, {"method": "lora", "targets": ["wte", "c_attn"], "use_dora": use_dora})
    assert "\n" not in str(exc.value) and "tie_word_embeddings=False" in str(exc.value)
    assert_untouched(model, before)


def test_full_on_tied_embedding_is_consistent():
    # in-place methods train the one shared tensor, so both uses see the same change
    model = build("full", "gpt2", random=True)
    assert "transformer.wte.weight" in get_state(model).targets
    assert "lm_head.weight" not in get_state(model).targets
    assert model.lm_head.weight is model.transformer.wte.weight


# --------------------------------------------------------------------------------------
# A classification head trained whole
# --------------------------------------------------------------------------------------

def test_classification_head_train_also(tmp_path):
    model = tiny("bert")
    torch.manual_seed(5)
    gk.inject(model, gk.LoRAConfig(r=2, targets=["query", "value"], train_also=["classifier"], init_lora_weights=False))
    state = get_state(model)
    assert state.train_also == ["classifier.bias", "classifier.weight"]
    assert not any("classifier" in t for t in state.targets)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert all(is_adapter_key(n) or n.startswith("classifier.") for n in trainable)

    with torch.no_grad():  # "train" the head
        model.classifier.weight.add_(0.5)
        model.classifier.bias.fill_(0.25)
    ids = tiny_inputs()
    expected = logits(model, ids)

    path = gk.save_adapter(model, tmp_path / "cls")
    saved = gk.read_adapter(path)
    assert torch.equal(saved.tensors["classifier.weight.value"], model.classifier.weight.detach())
    assert torch.equal(saved.tensors["classifier.bias.value"], model.classifier.bias.detach())
    assert saved.meta["train_also"] == ["classifier.bias", "classifier.weight"]
    assert saved.meta["base_model"]["num_labels"] == 3

    # a fresh base whose (untrained) head is initialised differently still reloads exactly
    fresh = tiny("bert")
    with torch.no_grad():
        fresh.classifier.weight.normal_()
        fresh.classifier.bias.normal_()
    gk.load_adapter(fresh, path)
    assert torch.equal(logits(fresh, ids), expected)
    assert torch.equal(fresh.classifier.weight, model.classifier.weight)

    # without heads the delta holds the LoRA targets only
    no_heads = gk.materialize_delta(model, include_heads=False)
    assert set(no_heads) == set(state.targets)

    # disabling restores the base head too; unload(merge=False) gives the original head back
    base = tiny("bert")
    with gk.disabled(model):
        assert torch.equal(logits(model, ids), logits(base, ids))
    gk.unload(model, merge=False)
    assert torch.equal(model.classifier.weight, base.classifier.weight)


def test_classification_head_with_an_activation_adapter(tmp_path):
    # the head is a base parameter trained whole beside module sites (BERT/MiniLM classification)
    model = tiny("bert")
    torch.manual_seed(5)
    gk.inject(model, {"method": "pfeiffer", "reduction_factor": 4, "init_weights": False, "train_also": ["classifier"]})
    state = get_state(model)
    assert state.train_also == ["classifier.bias", "classifier.weight"]
    assert all(n.endswith("output.dense") for n in state.targets)
    with torch.no_grad():
        model.classifier.weight.add_(0.5)
    ids = tiny_inputs()
    expected = logits(model, ids)
    path = gk.save_adapter(model, tmp_path / "cls")
    fresh = tiny("bert")
    with torch.no_grad():
        fresh.classifier.weight.normal_()
    fresh_base = logits(fresh, ids)
    gk.load_adapter(fresh, path)
    assert torch.equal(logits(fresh, ids), expected)
    with gk.disabled(fresh):  # its own (untrained) head and no adapter
        assert torch.equal(logits(fresh, ids), fresh_base)
    with pytest.raises(AdapterError, match="pfeiffer adapter has none"):
        gk.materialize_delta(fresh, include_heads=False)


# --------------------------------------------------------------------------------------
# deepcopy
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("row", ["lora", "lora+dora", "ia3", "full", "parallel_adapter", "compacter"])
def test_deepcopy_is_independent(row):
    model = build(row, "gpt2", random=True)
    ids = tiny_inputs()
    out = logits(model, ids)
    clone = copy.deepcopy(model)
    assert torch.equal(logits(clone, ids), out)
    with torch.no_grad():
        for p in gk.trainable_parameters(clone):
            p.mul_(-3.0).add_(0.1)
    changed = logits(clone, ids)
    assert (changed - out).abs().max() > 1e-4, "changing the copy's adapter had no effect on the copy"
    assert torch.equal(logits(model, ids), out), "changing the copy's adapter changed the original"
    # merging / unloading the copy leaves the original alone (hooks of activation sites are
    # found through their bound site, which deepcopy maps to the copy's)
    if weight_delta(row, "gpt2"):
        gk.merge_adapter(clone)
    gk.unload(clone, merge=False)
    assert_close(logits(clone, ids), base_logits("gpt2"), 1e-5, "the copy unloaded")
    assert torch.equal(logits(model, ids), out)
    assert get_state(model) is not None
    if weight_delta(row, "gpt2"):
        gk.merge_adapter(model)
        assert_close(logits(model, ids), out, 1e-5, "original merged")


def test_deepcopy_bare_parameter_class():
    model = kinds_model("lora", random=True)
    out = run(model)
    clone = copy.deepcopy(model)
    assert torch.equal(run(clone), out)
    with torch.no_grad():
        gk.sites(clone)["proj"].lora_B.mul_(-2.0)
    assert not torch.equal(run(clone), out)
    assert torch.equal(run(model), out)
    gk.unload(clone, merge=False)
    assert type(clone) is KindsNet
    assert torch.equal(run(model), out), "unloading the copy removed the original's adapter"
    gk.unload(model, merge=False)
    assert type(model) is KindsNet


def test_fingerprint_probe_of_a_tensor_past_2_24_elements_stays_in_bounds():
    """float32 cannot hold 2**24 + 3: the last probe position rounded up to one past the end
    (full fine-tuning of SmolLM2, whose embedding has 28,311,552 values, failed on it)."""
    from graftkit.fingerprint import probe_values

    t = torch.arange(2**24 + 4, dtype=torch.int32)
    values = probe_values(t)
    assert len(values) == 16 and values[0] == 0 and values[-1] == float(t[-1].float())  # the last element


def test_refusal_reads_as_english():
    assert "and an iapt adapter has none" in refusal("iapt", "merge_adapter", "sequence")
    assert "and a houlsby adapter has none" in refusal("houlsby", "merge_adapter")
