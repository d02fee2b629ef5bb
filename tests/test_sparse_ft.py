"""Sparse fine-tuning: LT-SFT, diff pruning, APET (methods/sparse.py and one file each).

Golden hard-concrete expectations, the masks (exactly k entries train, only they change), the compact
file format, save/load, tiny ``graft train`` runs, bad input, and LT-SFT composition through
``graft merge`` (the sum of the parts, exactly)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

import graftkit as gk
from graftkit.adapter import get_state
from graftkit.errors import AdapterError, ConfigError
from graftkit.methods.diff_pruning import DiffPruning, diff_sites, expected_l0, hard_concrete
from graftkit.methods.sparse import random_positions, scatter, sparse_sites, split_count, to_sparse

from conftest import logits, tiny_bert, tiny_inputs, tiny_llama
from test_train import assets, cls_recipe, chat_recipe, losses  # noqa: F401  (assets is a fixture)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def logit(p: float) -> float:
    return math.log(p / (1 - p))


# -- hard-concrete gates: golden ---------------------------------------------------------------

@pytest.mark.parametrize("beta, gamma, zeta", [(1.0, -1.5, 1.5), (2 / 3, -0.1, 1.1)])  # Guo et al.'s code, Louizos et al.'s
def test_hard_concrete_matches_its_closed_form(beta, gamma, zeta):
    """Monte-Carlo gates against the closed form of the stretched binary concrete: P(z > 0) (the expected
    L0 per gate), P(z = 1) and P(z <= 0.5). With N draws a probability's estimate has standard deviation
    sqrt(p (1 - p) / N); the tolerance is 6 of those (a chance failure ~1e-9; the draws are seeded anyway),
    well below the gaps a wrong sign, a missing beta or a wrong stretch make (>= 0.02 here)."""
    alphas = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0, 4.0])
    n = 200_000
    g = torch.Generator().manual_seed(0)
    z = hard_concrete(alphas.repeat(n, 1), beta, gamma, zeta, sample=True, generator=g)
    assert z.min() >= 0 and z.max() <= 1
    for j, a in enumerate(alphas.tolist()):
        col = z[:, j]
        closed = {
            "P(z>0)": sigmoid(a - beta * math.log(-gamma / zeta)),
            "P(z=1)": sigmoid(a - beta * logit((1 - gamma) / (zeta - gamma))),
            "P(z<=0.5)": 1 - sigmoid(a - beta * logit((0.5 - gamma) / (zeta - gamma))),
        }
        measured = {"P(z>0)": (col > 0).double().mean().item(), "P(z=1)": (col == 1).double().mean().item(),
                    "P(z<=0.5)": (col <= 0.5).double().mean().item()}
        for k, p in closed.items():
            tol = 6 * math.sqrt(max(p * (1 - p), 1e-4) / n)
            assert abs(measured[k] - p) <= tol, (a, k, measured[k], p)
        # the expected L0 is the sum of P(z > 0)
        assert expected_l0(torch.tensor([a]), beta, gamma, zeta).item() == pytest.approx(closed["P(z>0)"], rel=1e-6)


def test_deterministic_gates_are_the_test_time_estimate():
    # min(1, max(0, sigmoid(a) (zeta - gamma) + gamma)) with (gamma, zeta) = (-1.5, 1.5): by hand
    a = torch.tensor([-2.0, 0.0, 0.5, 1.0, 5.0])
    want = [max(0.0, min(1.0, sigmoid(x) * 3 - 1.5)) for x in a.tolist()]  # 0, 0, 0.367..., 0.693..., 1
    got = hard_concrete(a, 1.0, -1.5, 1.5, sample=False)
    assert got.tolist() == pytest.approx(want, abs=1e-6)
    assert got[0] == 0 and got[1] == 0 and got[-1] == 1


def test_l0_penalty_is_the_extra_loss_and_trains_log_alpha():
    model = tiny_bert()
    gk.inject(model, {"method": "diff_pruning", "targets": ["query", "value"], "l0_weight": 0.01})
    training = DiffPruning.training({"targets": ["query", "value"], "l0_weight": 0.01})
    sites = list(diff_sites(model).values())
    loss = training.extra_loss(model)
    want = 0.01 * sum(len(s.log_alpha.reshape(-1)) * sigmoid(5.0 - math.log(1.5 / 1.5)) for s in sites)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    loss.backward()
    assert all(s.log_alpha.grad is not None and (s.log_alpha.grad > 0).all() for s in sites)  # pushes every gate shut


def test_gates_sample_in_training_and_not_in_evaluation():
    model = tiny_bert()
    gk.inject(model, {"method": "diff_pruning", "targets": ["query"], "init_weights": False})
    ids = tiny_inputs()
    model.eval()
    assert torch.equal(logits(model, ids), logits(model, ids))
    model.train()
    torch.manual_seed(0)
    a = logits(model, ids)
    assert not torch.equal(a, logits(model, ids)), "training-mode gates must be sampled"


def test_projection_keeps_the_target_share_and_fixes_the_gates():
    cfg = {"targets": ["query", "value"], "init_weights": False, "target_sparsity": 0.1}
    # project_at 1 (the default): after the last step, and nothing is rebuilt
    model = gk.inject(tiny_bert(), {"method": "diff_pruning", **cfg})
    training = DiffPruning.training(cfg)
    training.start(model, None, [], total_steps=4)
    assert training.after_update(model, 2) is False and not training.projected
    assert training.after_update(model, 3) is False and training.projected
    # project_at 0.5: after step 2 of 4, then w alone trains on (a new optimizer)
    model = gk.inject(tiny_bert(), {"method": "diff_pruning", **cfg})
    training = DiffPruning.training({**cfg, "project_at": 0.5})
    training.start(model, None, [], total_steps=4)
    sites = list(diff_sites(model).values())
    before = torch.cat([s.eval_delta().reshape(-1) for s in sites])
    assert training.after_update(model, 0) is False
    assert training.after_update(model, 1) is True
    after = torch.cat([s.eval_delta().reshape(-1) for s in sites])
    k = round(0.1 * before.numel())
    kept = after != 0
    assert int(kept.sum()) == k
    assert torch.equal(after[kept], before[kept])  # the kept entries keep their delta
    assert before.abs()[kept].min() >= before.abs()[~kept].max()  # ... and they are the largest
    assert all(not s.log_alpha.requires_grad for s in sites)
    model.train()  # fixed gates are exactly 0/1 in training too
    assert all(torch.equal(s.gates(), (s.log_alpha > 0).float()) for s in sites)
    assert training.extra_loss(model) is None
    model.eval()
    assert sum(int((d != 0).sum()) for d in gk.materialize_delta(model).values()) == k


def test_target_sparsity_outside_range_is_one_line():
    for bad in (0, 1.5):
        with pytest.raises(ConfigError, match="target_sparsity") as info:
            gk.inject(tiny_bert(), {"method": "diff_pruning", "targets": ["query"], "target_sparsity": bad})
        assert "\n" not in str(info.value)


# -- masks ---------------------------------------------------------------------------------------

def _adamw_steps(model, steps: int, training=None, start_step: int = 0, wd: float = 0.1):
    """AdamW with weight decay on every trainable tensor (as graft train does on matrices), the method's hooks."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=wd)
    ids = tiny_inputs()
    model.train()
    for step in range(start_step, start_step + steps):
        model(input_ids=ids).logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if training is not None and training.after_update(model, step):
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=wd)
    model.eval()


def without_method(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k != "method"}


def _changed(model) -> dict[str, torch.Tensor]:
    return {n: torch.nonzero((s.base.detach() != s.theta0).reshape(-1)).squeeze(1) for n, s in sparse_sites(model).items()}


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_apet_trains_exactly_the_masked_entries(wd):
    model = tiny_bert()
    cfg = {"method": "apet", "num_trainable": 300, "targets": ["query", "value", "output.dense"], "seed": 3}
    gk.inject(model, cfg)
    sites = sparse_sites(model)
    masks = {n: s.mask.clone() for n, s in sites.items()}
    assert sum(m.numel() for m in masks.values()) == 300
    # the training hooks undo weight decay on frozen entries; without decay the gradient mask alone suffices
    _adamw_steps(model, 3, gk.registry.METHODS.get("apet").training(without_method(cfg)) if wd else None, wd=wd)
    changed = _changed(model)
    for n, m in masks.items():
        assert torch.equal(changed[n], m), n  # every masked entry moved, nothing else did
    # the same seed draws the same mask; another seed another
    again = gk.inject(tiny_bert(), cfg)
    assert all(torch.equal(s.mask, masks[n]) for n, s in sparse_sites(again).items())
    other = gk.inject(tiny_bert(), {**cfg, "seed": 4})
    assert any(not torch.equal(s.mask, masks[n]) for n, s in sparse_sites(other).items())


def test_apet_rows_are_whole_rows():
    model = gk.inject(tiny_bert(), {"method": "apet", "fraction": 0.25, "structure": "rows", "targets": ["query", "key"]})
    for n, s in sparse_sites(model).items():
        if s.base.dim() == 1:  # a bias: its rows are its entries
            assert s.mask.numel() == round(0.25 * s.base.numel())
            continue
        rows, width = s.base.shape
        m = torch.zeros(rows * width, dtype=torch.bool)
        m[s.mask] = True
        per_row = m.view(rows, width).sum(1)
        assert set(per_row.tolist()) <= {0, width}, n
        assert int((per_row > 0).sum()) == round(0.25 * rows)


def test_split_and_draw_helpers():
    assert split_count(10, [5, 3, 2]) == [5, 3, 2]
    assert sum(split_count(7, [100, 50, 1])) == 7
    g = torch.Generator().manual_seed(0)
    for numel, count in [(10, 3), (10_000, 5), (50, 50)]:
        p = random_positions(numel, count, g)
        assert p.numel() == count and torch.equal(p, torch.unique(p)) and int(p.max()) < numel


def test_lt_sft_keeps_exactly_k_and_only_they_change_in_phase_2(tmp_path):
    model = tiny_bert()
    cfg = {"method": "lt_sft", "num_trainable": 200, "targets": ["query", "value", "output.dense"], "phase1_steps": 2}
    gk.inject(model, cfg)
    training = gk.registry.METHODS.get("lt_sft").training(without_method(cfg))
    training.start(model, None, [], total_steps=5)
    sites = sparse_sites(model)
    _adamw_steps(model, 1, training)  # step 0: phase 1, every entry trains
    assert all(not s.masked for s in sites.values())
    # step 1 ends phase 1: the expected selection is the top-200 change over all sites now
    ids = tiny_inputs()
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    model(input_ids=ids).logits.float().pow(2).mean().backward()
    torch.optim.SGD(params, lr=1e-2).step()
    change = torch.cat([(s.base.detach() - s.theta0).abs().reshape(-1) for s in sites.values()])
    want = set(torch.topk(change, 200).indices.tolist())
    assert training.after_update(model, 1) is True  # the optimizer is rebuilt for phase 2
    offsets, got, start = {}, set(), 0
    for n, s in sites.items():
        offsets[n] = start
        got |= {start + i for i in s.mask.tolist()}
        start += s.base.numel()
        assert torch.equal(s.base.detach(), s.theta0), "phase 2 starts from theta0"
    assert got == want and len(got) == 200
    masks = {n: s.mask.clone() for n, s in sites.items()}
    _adamw_steps(model, 3, training, start_step=2)  # phase 2, with weight decay
    changed = _changed(model)
    assert sum(c.numel() for c in changed.values()) > 0
    for n in sites:
        assert set(changed[n].tolist()) <= set(masks[n].tolist()), n
    saved = gk.read_adapter(gk.save_adapter(model, tmp_path / "a"))
    assert sum(saved.tensors[f"{n}.indices"].numel() for n in sites) == 200  # exactly k entries saved
    report = training.report(model)
    assert report["kept_entries"] == 200 and report["changed_entries"] <= 200


# -- the compact format, save/load, merge input ---------------------------------------------------

def test_saved_file_is_compact_and_round_trips(tmp_path):
    model = tiny_bert()
    gk.inject(model, {"method": "apet", "fraction": 0.05, "targets": ["query", "value", "word_embeddings"]})
    _adamw_steps(model, 2, wd=0.0)
    path = gk.save_adapter(model, tmp_path / "a")
    from safetensors import safe_open

    with safe_open(str(path / "adapter.safetensors"), "pt") as f:
        keys = list(f.keys())
        shapes = {k: f.get_slice(k).get_shape() for k in keys}
        dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
    targets = json.loads((path / "adapter.json").read_text())["targets"]
    for t in targets:
        assert dtypes[f"{t}.indices"] == "I32" and dtypes[f"{t}.values"] == "F32"
    assert all(len(s) == 1 for s in shapes.values()), "a sparse adapter holds no dense tensor"
    stored = sum(s[0] for k, s in shapes.items() if k.endswith(".values"))
    dense = sum(p.numel() for n, p in model.named_parameters() if n in targets)
    assert stored == round(0.05 * dense)
    assert (path / "adapter.safetensors").stat().st_size < 0.5 * 4 * dense  # a dense float32 copy would be 4 * dense bytes
    fresh = gk.load_adapter(tiny_bert(), path)
    ids = tiny_inputs()
    assert torch.equal(logits(fresh, ids), logits(model, ids))
    for n, s in sparse_sites(fresh).items():  # the saved support is the loaded adapter's mask
        assert torch.equal(s.mask, sparse_sites(model)[n].mask)


def test_sparse_helpers_round_trip():
    d = torch.zeros(4, 5)
    d[1, 2], d[3, 4] = 0.5, -2.0
    idx, val = to_sparse(d, keep=torch.tensor([0]))
    assert idx.tolist() == [0, 7, 19] and val.tolist() == [0.0, 0.5, -2.0]
    assert torch.equal(scatter(idx, val, d.shape), d)


@pytest.mark.parametrize("method", ["lt_sft", "diff_pruning"])
@pytest.mark.parametrize("corrupt, needle", [
    (lambda i, v: (i.flip(0), v), "strictly increasing"),
    (lambda i, v: (i, v[:-1]), "indices but"),
    (lambda i, v: (i + 10_000, v), "reach position"),
])
def test_corrupt_sparse_file_is_one_line(tmp_path, method, corrupt, needle):
    from safetensors.torch import load_file, save_file

    model = tiny_bert()
    cfg = {"method": method, "targets": ["query"]}
    if method == "diff_pruning":
        cfg["init_weights"] = False
    gk.inject(model, cfg)
    if method == "lt_sft":
        with torch.no_grad():
            for s in sparse_sites(model).values():
                s.base.add_(torch.randn_like(s.base) * (torch.rand_like(s.base) < 0.3))
    path = gk.save_adapter(model, tmp_path / "a")
    tensors = load_file(str(path / "adapter.safetensors"))
    key = next(k for k in tensors if k.endswith(".indices"))
    name = key[: -len(".indices")]
    tensors[key], tensors[f"{name}.values"] = corrupt(tensors[key], tensors[f"{name}.values"])
    save_file(tensors, str(path / "adapter.safetensors"))
    fresh = tiny_bert()
    with pytest.raises(AdapterError, match=needle) as info:
        gk.load_adapter(fresh, path)
    assert "\n" not in str(info.value)
    assert get_state(fresh) is None


# -- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["apet", "lt_sft"])
@pytest.mark.parametrize("option, needle", [({"fraction": 0}, "outside (0, 1]"), ({"fraction": 1.5}, "outside (0, 1]"),
                                            ({"fraction": -0.1}, "outside (0, 1]"),
                                            ({"num_trainable": 10**9}, "larger than the"),
                                            ({"num_trainable": 5, "fraction": 0.1}, "not both")])
def test_bad_sparse_amount_is_one_line(method, option, needle):
    model = tiny_bert()
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")) as info:
        gk.inject(model, {"method": method, "targets": ["query"], **option})
    assert "\n" not in str(info.value)
    assert get_state(model) is None


def test_cli_bad_fraction_is_one_line(assets, tmp_path, capsys):
    from graftkit.cli import main

    rec = cls_recipe(assets, tmp_path / "run", method={"method": "apet", "fraction": 1.5})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(rec))
    assert main(["train", str(tmp_path / "r.yaml")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graft: error: ") and "fraction 1.5 is outside (0, 1]" in lines[0], lines
    assert not (tmp_path / "run").exists(), "a refused run writes nothing"


def test_lt_sft_phase1_longer_than_the_run_is_one_line(assets, tmp_path):
    from graftkit.train import parse_recipe, train

    rec = cls_recipe(assets, tmp_path / "run", method={"method": "lt_sft", "phase1_steps": 100}, optim={"max_steps": 4})
    with pytest.raises(ConfigError, match="leaves no step for phase 2") as info:
        train(parse_recipe(rec), progress=False)
    assert "\n" not in str(info.value)


# -- graft train ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", [
    {"method": "lt_sft", "fraction": 0.3, "targets": ["all-linear"]},
    {"method": "apet", "fraction": 0.3, "targets": ["all-linear"]},
    {"method": "diff_pruning", "targets": ["all-linear"], "target_sparsity": 0.3, "project_at": 0.5, "l0_weight": 1e-4},
], ids=["lt_sft", "apet", "diff_pruning"])
def test_graft_train_learns_and_saves_sparse(assets, tmp_path, method):
    """A few epochs on the toy task (the linear layers only: the tiny BERT's embedding rows of unseen words
    would take most of a share of every entry); the loss goes down, the saved delta is as sparse as asked."""
    from graftkit.train import parse_recipe, train

    out = tmp_path / "run"
    summary = train(parse_recipe(cls_recipe(assets, out, method=method, optim={"lr": 1e-2, "epochs": 3})), progress=False)
    ls = losses(out)
    assert sum(ls[-4:]) / 4 < sum(ls[:4]) / 4, ls
    if method["method"] == "lt_sft":  # phase 2 learns again from theta0, under the recipe's schedule run again
        assert sum(ls[-4:]) / 4 < sum(ls[18:22]) / 4, ls
        lrs = [r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        assert lrs[18:20] == lrs[0:2] == [5e-3, 1e-2]  # warmup_steps 2 at the start of each phase
        assert lrs[-1] < lrs[20]
    report = summary["method_report"]
    adapter = gk.read_adapter(out / "adapter")
    values = sum(t.numel() for k, t in adapter.tensors.items() if k.endswith(".values"))
    for k, t in adapter.tensors.items():
        if k.rsplit(".", 1)[0] not in adapter.train_also:  # the classifier head is saved whole
            assert t.dim() == 1, k
    if method["method"] == "lt_sft":
        assert values == report["kept_entries"] == round(0.3 * report["entries"])
    elif method["method"] == "apet":
        assert values == report["trainable_entries"] == round(0.3 * report["entries"])
    else:
        assert report["projected"] and values == report["nonzero_entries"] == round(0.3 * report["entries"])
    model = gk.load_adapter(gk.load_model(assets / "bert", head="classification", num_labels=2), out / "adapter")
    assert sum(int((d != 0).sum()) for n, d in gk.materialize_delta(model).items() if n not in adapter.train_also) == values


# -- composition ------------------------------------------------------------------------------------

def test_lt_sft_deltas_compose_by_graft_merge_exactly(assets, tmp_path):
    """A "task" and a "language" sparse delta trained on different data; graft merge task_arithmetic of the
    two is base + phi_task + phi_lang, tensor by tensor, exactly."""
    from graftkit.cli import main
    from graftkit.train import parse_recipe, train
    from merge_helpers import load_folder

    lt = {"method": "lt_sft", "num_trainable": 2000, "targets": ["q_proj", "v_proj", "up_proj", "down_proj"]}
    train(parse_recipe(chat_recipe(assets, tmp_path / "task", method=lt, optim={"max_steps": 4}, output={"export": []})),
          progress=False)
    train(parse_recipe(chat_recipe(assets, tmp_path / "lang", method=lt, optim={"max_steps": 4, "seed": 1}, output={"export": []},
                                   data={"train": str(assets / "text.jsonl"), "validation": None, "prompt_field": None,
                                         "response_field": None, "max_length": 16})), progress=False)
    parts = [gk.read_adapter(tmp_path / p / "adapter") for p in ("task", "lang")]
    config = {"merge_method": "task_arithmetic", "base_model": str(assets / "llama"), "dtype": "float32",
              "models": [{"model": str(tmp_path / p / "adapter"), "parameters": {"weight": 1.0}} for p in ("task", "lang")]}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(config))
    assert main(["merge", str(tmp_path / "m.yaml"), str(tmp_path / "merged")]) == 0
    merged, base = load_folder(tmp_path / "merged"), load_folder(assets / "llama")
    touched = 0
    for key, w in base.items():
        deltas = [scatter(a.tensors[f"{key}.indices"], a.tensors[f"{key}.values"], w.shape) for a in parts
                  if f"{key}.indices" in a.tensors]
        touched += len(deltas)
        # task arithmetic reads each input as a model, theta_i = base + phi_i (float32), takes tau_i = theta_i - base
        # and writes base + (tau_1 + tau_2): the sum of the parts in that arithmetic, bit for bit
        taus = [(w.float() + d) - w.float() for d in deltas]
        want = w.float() + (taus[0] + taus[1]) if len(taus) == 2 else w.float() + taus[0] if taus else w.float()
        assert torch.equal(merged[key], want), key
        if deltas:  # and within float32 rounding of base + phi_1 + phi_2
            torch.testing.assert_close(merged[key] - w.float(), sum(deltas), atol=1e-6, rtol=0)
    assert touched == 2 * 8  # both deltas, on every target (4 kinds x 2 layers)


@pytest.mark.parametrize("method", ["apet", "diff_pruning"])
def test_export_merged_and_merge_input_equal_the_live_model(tmp_path, method):
    """``graft export --merged`` of a sparse adapter and a one-input task-arithmetic merge both give
    base + scatter(indices, values) - the live model's weights."""
    from merge_helpers import load_folder

    tiny_llama().save_pretrained(tmp_path / "base")
    model = tiny_llama()
    cfg = {"method": method, "targets": ["q_proj", "down_proj", "embed_tokens"]}
    cfg.update({"fraction": 0.1} if method == "apet" else {"init_weights": False, "target_sparsity": 0.2})
    gk.inject(model, cfg)
    if method == "apet":
        _adamw_steps(model, 2)
    else:
        training = DiffPruning.training(without_method(cfg))
        training.start(model, None, [], total_steps=1)
        training.after_update(model, 0)  # the projection to 20%
    path = gk.save_adapter(model, tmp_path / "a")
    ids = tiny_inputs()
    want = logits(model.eval(), ids)
    exported = gk.export_merged(path, tmp_path / "base", tmp_path / "merged")
    import transformers

    merged = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    torch.testing.assert_close(logits(merged, ids), want, atol=1e-5, rtol=0)
    config = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"), "dtype": "float32",
              "models": [{"model": str(path), "parameters": {"weight": 1.0}}]}
    out = load_folder(gk.merge(config, tmp_path / "ta"))
    for k, t in load_folder(exported).items():
        torch.testing.assert_close(out[k], t, atol=1e-6, rtol=0)


def test_gradient_mask_follows_copies_and_goes_with_unload():
    """A deep copy masks its own parameter's gradient (and unloading it leaves the original's mask);
    unloading removes the mask."""
    import copy

    def outside_mask(model) -> int:
        for p in model.parameters():
            p.grad = None
        model.train()
        model(input_ids=tiny_inputs()).logits.sum().backward()
        return sum(int((torch.nonzero(s.base.grad.reshape(-1)).squeeze(1)[:, None] != s.mask[None]).all(1).sum())
                   for s in sparse_sites(model).values())

    model = gk.inject(tiny_bert(), {"method": "apet", "fraction": 0.1, "targets": ["query"]})
    assert outside_mask(model) == 0
    clone = copy.deepcopy(model)
    assert outside_mask(clone) == 0
    gk.unload(clone, merge=False)
    assert outside_mask(model) == 0
    sites = list(sparse_sites(model).values())
    gk.unload(model, merge=False)
    for p in model.parameters():
        p.grad = None
    model(input_ids=tiny_inputs()).logits.sum().backward()
    assert all(int((s.base.grad != 0).sum()) > s.mask.numel() for s in sites if s.base.dim() == 2)
