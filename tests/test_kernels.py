"""``optim.kernels`` and ``optim.compile`` (graftkit.train.kernels).

liger-kernel's Triton kernels need CUDA and are not installed here: the decision is tested as a
function of (request, device type, importable), the CPU run is checked to take torch's path with
the chunked cross-entropy, and the patching is tested against a stand-in table of apply
functions. What liger does on a GPU is measured by bench/gpu_train.py, not here."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama

from graftkit.errors import ConfigError
from graftkit.train import kernels, parse_recipe
from graftkit.train.loop import Run
from test_train import assert_one_line_error, assets, chat_recipe, run_cli  # noqa: F401  (fixture)

LORA = {"method": "lora", "r": 4, "lora_alpha": 8, "targets": ["q_proj", "v_proj"]}  # the head stays frozen


@pytest.mark.parametrize("requested, device, importable, chosen", [
    ("auto", "cpu", False, "torch"),
    ("auto", "cpu", True, "torch"),
    ("auto", "cuda", False, "torch"),
    ("auto", "cuda", True, "liger"),
    ("torch", "cuda", True, "torch"),
    ("liger", "cuda", True, "liger"),
])
def test_kernel_choice(requested, device, importable, chosen):
    assert kernels.choose(requested, device, importable) == chosen


@pytest.mark.parametrize("device, importable, needle", [
    ("cpu", True, "needs a CUDA GPU"),
    ("mps", False, "needs a CUDA GPU"),
    ("cuda", False, "pip install 'graftkit[gpu]'"),
])
def test_liger_where_it_cannot_run_is_refused(device, importable, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        kernels.choose("liger", device, importable)


def _graph_names(t: torch.Tensor) -> set[str]:
    seen, names, todo = set(), set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


def test_cpu_run_takes_torch_kernels_and_the_chunked_loss(assets, tmp_path):
    run = Run(parse_recipe(chat_recipe(assets, tmp_path / "run", method=LORA, optim={"max_steps": 2}, eval={"every": None})),
              progress=False)
    run.setup()
    assert run.kernels == "torch" and run.recipe.optim.kernels == "auto"
    run.module.train()
    loss, _, _ = run.module(run.micro_batch(0))
    assert "_FrozenLinearCrossEntropyBackward" in _graph_names(loss)  # graftkit.train.linear_ce
    summary = run.fit()
    assert summary["kernels"] == "torch"
    assert json.loads((tmp_path / "run" / "run.json").read_text())["summary"]["kernels"] == "torch"


def test_liger_on_cpu_is_one_line_and_writes_nothing(assets, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(chat_recipe(assets, tmp_path / "run", optim={"kernels": "liger"})))
    code, _, err = run_cli(capsys, recipe)
    assert_one_line_error(code, err, "optim.kernels liger", "CUDA")
    assert not (tmp_path / "run").exists()


def test_unknown_kernels_value_is_refused(assets, tmp_path):
    with pytest.raises(ConfigError, match="kernels"):
        parse_recipe(chat_recipe(assets, tmp_path / "run", optim={"kernels": "triton"}))


def test_liger_patching_goes_through_the_model_types_apply_function():
    calls = []

    def apply_llama(rope=True, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True, swiglu=True, model=None):
        calls.append({"model": model, "cross_entropy": cross_entropy, "fused_linear_cross_entropy": fused_linear_cross_entropy})

    model = tiny_llama()
    table = {"llama": apply_llama}
    assert kernels.apply_liger(model, explicit=False, table=table) is None
    # graftkit's loss stays: liger's patched forward-with-loss is turned off, the instance is patched
    assert calls == [{"model": model, "cross_entropy": False, "fused_linear_cross_entropy": False}]
    other = {"mistral": apply_llama}
    warning = kernels.apply_liger(model, explicit=False, table=other)
    assert "no kernels for model type 'llama'" in warning and "torch" in warning and len(calls) == 1
    with pytest.raises(ConfigError, match="no kernels for model type 'llama'"):
        kernels.apply_liger(model, explicit=True, table=other)


def test_compile_option_compiles_each_block(assets, tmp_path):
    run = Run(parse_recipe(chat_recipe(assets, tmp_path / "run", method=LORA, optim={"compile": True})), progress=False)
    run.setup()
    layers = run.model.model.layers
    originals = [getattr(block.forward, "_torchdynamo_orig_callable", None) for block in layers]
    assert all(o is not None and o.__self__ is block for o, block in zip(originals, layers))
    plain = Run(parse_recipe(chat_recipe(assets, tmp_path / "plain", method=LORA)), progress=False)
    plain.setup()
    assert not hasattr(plain.model.model.layers[0].forward, "_torchdynamo_orig_callable")


@pytest.mark.parametrize("frozen_head, balanced", [(True, False), (False, False), (False, True)])
def test_target_index_gives_the_boolean_masks_rows_bit_for_bit(frozen_head, balanced):
    """The step selects the target rows by an index computed on the CPU batch (no wait for the
    device, which a boolean mask costs on a GPU); loss, count and gradients equal the mask's."""
    from graftkit.train.data import IGNORE, collate
    from graftkit.train.loop import WithLoss, target_index

    model = tiny_llama().float()
    model.lm_head.weight.requires_grad_(not frozen_head)
    g = torch.Generator().manual_seed(3)
    examples = []
    for n, p in ((9, 3), (5, 1), (12, 0), (7, 6)):
        ids = torch.randint(1, 96, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE] * p + ids[p:], "task": n % 2})
    batch = collate(examples, 0)
    module = WithLoss(model, "causal-lm", balanced).train()
    results = []
    for b in (batch, {**batch, "target_index": target_index(batch["labels"])}):
        model.zero_grad(set_to_none=True)
        loss, n, _ = module(b)
        loss.backward()
        results.append((loss.detach(), int(n), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    (l1, n1, g1), (l2, n2, g2) = results
    assert n1 == n2 == sum(sum(t != IGNORE for t in e["labels"][1:]) for e in examples)
    assert torch.equal(l1, l2) and g1.keys() == g2.keys()
    assert all(torch.equal(g1[k], g2[k]) for k in g1)
