"""``distill`` (PANDA): task loss + weight x KD from the source adapter's model, on tiny models."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import graftkit as gk
from graftkit.errors import ConfigError
from graftkit.train import parse_recipe, train
from graftkit.train.data import IGNORE, collate
from graftkit.train.distill import SeparateTeacher, SharedTeacher, auto_weight, kd_loss, task_embedding, transferability
from graftkit.train.lineage import setup_lineage
from graftkit.train.loop import Run
from test_init_from import HOULSBY, LORA, PREFIX, PROMPT, PTUNING, other_base, quick_cls, sources  # noqa: F401  (fixtures)
from test_train import _recipe_file, assert_one_line_error, assets, chat_recipe, cls_recipe, run_cli  # noqa: F401  (fixture)


def make_run(recipe: dict) -> Run:
    from rich.console import Console

    run = Run(parse_recipe(recipe), console=Console(quiet=True), progress=False)
    run.setup()
    return run


def recipe_for(assets: Path, sources, tmp_path: Path, which: str, **distill) -> dict:
    src = sources[which if which in ("chat", "prompt", "ptuning", "chat_prefix") else "lora"][0] / "adapter"
    if which.startswith("chat"):
        r = chat_recipe(assets, tmp_path / "run", optim={"max_steps": 3}, eval={"every": None})
        if which == "chat_prefix":
            r["method"] = PREFIX
    else:
        r = quick_cls(assets, tmp_path / "run", {"prompt": PROMPT, "ptuning": PTUNING}.get(which, LORA))
        r["optim"] = {**r["optim"], "max_steps": 3}
    r["init_from"] = str(src)
    if distill:
        r["distill"] = {"teacher": str(src), **distill}
    return r


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("which", ["cls", "prompt", "chat"])
def test_weight_zero_equals_plain_init_from(assets, sources, tmp_path, which):
    plain = recipe_for(assets, sources, tmp_path / "plain", which)
    zero = recipe_for(assets, sources, tmp_path / "zero", which, weight=0.0, temperature=2.0)
    runs = [plain, zero]
    if which == "cls":  # a weighted KD term changes the training: the comparison below can fail
        runs.append(recipe_for(assets, sources, tmp_path / "one", which, weight=1.0, temperature=2.0))
    for r in runs:
        train(r, progress=False)
    outs = [Path(r["output"]["dir"]) for r in runs]
    assert losses(outs[0]) == losses(outs[1])  # bitwise: the teacher's forward changes nothing
    tensors = [gk.read_adapter(o / "adapter").tensors for o in outs]
    a, b = tensors[:2]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if which == "cls":
        assert not all(torch.equal(a[k], tensors[2][k]) for k in a)
        meta = json.loads((outs[2] / "adapter" / "adapter.json").read_text())["lineage"]
        assert meta["distill"]["weight"] == 1.0 and meta["distill"]["temperature"] == 2.0
        assert meta["distill"]["teacher_shares_base"] is True and meta["distill"]["teacher"]["sha256"] == meta["init_from"]["sha256"]


@pytest.mark.parametrize("which", ["cls-shared", "cls-separate", "prompt-shared", "ptuning-shared", "chat-shared", "chat_prefix-shared"])
def test_kd_gradient_flows_only_into_the_student(assets, sources, tmp_path, which):
    """d(w * KD)/d(student) equals the hand-computed chain rule
    ``J^T . w T (softmax(z_s/T) - softmax(z_t/T)) / rows``; teacher and base get no gradient."""
    w, temp = 0.7, 2.0
    r = recipe_for(assets, sources, tmp_path, which.split("-")[0], weight=w, temperature=temp)
    teacher_dir = Path(r["distill"]["teacher"])
    if which == "cls-separate":  # a teacher of another method: a second model
        teacher_dir = sources["houlsby"][0] / "adapter"
        r["distill"]["teacher"] = str(teacher_dir)
    run = make_run(r)
    module = run.acc.unwrap_model(run.module)
    assert module.distill.teacher_model.shared is (which != "cls-separate")
    for step in range(2):  # the student moves away from the teacher (at the start their KL is 0, its gradient too)
        run.train_step(step)
    batch = run.micro_batch(5)
    params = [p for _, p in run.named]

    def grads(distill) -> list[torch.Tensor]:
        module.distill = distill
        for p in params:
            p.grad = None
        module.train()
        loss, _, _ = module(batch)
        loss.backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    distiller = module.distill
    g_kd = [a - b for a, b in zip(grads(distiller), grads(None))]
    module.distill = distiller

    # the hand computation: the teacher as an independent model (loaded from its folder), the student's logits
    task = run.recipe.task
    teacher = gk.load_model(run.recipe.model, head=task, **({"num_labels": 2} if task == "classification" else {}))
    gk.load_adapter(teacher, teacher_dir)
    model = module.model
    if task == "classification":
        with torch.no_grad():
            z_t = teacher.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        z_s = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    else:
        keep = batch["labels"][:, 1:] != IGNORE
        with torch.no_grad():
            z_t = teacher.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
        z_s = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
    upstream = w * temp * (torch.softmax(z_s.detach() / temp, -1) - torch.softmax(z_t / temp, -1)) / z_s.shape[0]
    expected = torch.autograd.grad(z_s, params, grad_outputs=upstream, allow_unused=True)
    expected = [torch.zeros_like(p) if e is None else e for p, e in zip(params, expected)]
    scale = max(float(e.abs().max()) for e in expected)
    assert scale > 1e-7  # the student moved: a real gradient to compare
    for (name, _), got, want in zip(run.named, g_kd, expected):
        assert torch.allclose(got, want, atol=1e-5 * max(scale, 1.0), rtol=1e-3), name
    # no gradient anywhere but the student's trainable tensors
    trainable = {id(p) for p in params}
    for name, p in model.named_parameters():
        if id(p) not in trainable:
            assert p.grad is None and not p.requires_grad, name
    held = module.distill.teacher_model
    if isinstance(held, SharedTeacher):
        assert all(t.grad is None and not t.requires_grad for t in held.teacher)
        # the teacher's tensors are still the source's after the optimizer steps, and apart from the student's
        assert all(t.data_ptr() != p.data_ptr() for t, p in zip(held.teacher, held.live))
    else:
        assert isinstance(held, SeparateTeacher)
        assert all(p.grad is None and not p.requires_grad for p in held.model.parameters())


def test_kd_loss_is_the_tempered_kl():
    s, t = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]), torch.tensor([[0.5, 2.5, 0.0], [1.0, 0.0, 2.0]])
    T = 3.0
    want = 0.0
    for i in range(2):
        pt = torch.softmax(t[i] / T, -1)
        ps = torch.softmax(s[i] / T, -1)
        want += float((pt * (pt.log() - ps.log())).sum())
    assert float(kd_loss(s, t, T)) == pytest.approx(T * T * want / 2, rel=1e-6)
    assert float(kd_loss(t, t, T)) == pytest.approx(0.0, abs=1e-7)


def test_transferability_and_auto_weight_on_small_tensors():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [9.0, 9.0]], [[0.0, 4.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # example 0: mean of its 2 real tokens (2, 1); example 1: (0, 4); their mean (1, 2.5)
    e = task_embedding(hidden, mask)
    assert e.tolist() == pytest.approx([1.0, 2.5])
    other = torch.tensor([2.0, -1.0])
    cos = (1.0 * 2.0 + 2.5 * -1.0) / (math.hypot(1.0, 2.5) * math.hypot(2.0, -1.0))
    assert transferability(e, other) == pytest.approx(cos)
    assert auto_weight(cos) == 0.0 and cos < 0  # a source pointing away: no distillation
    assert auto_weight(transferability(e, torch.tensor([1.0, 2.0]))) == pytest.approx(
        (1.0 + 5.0) / (math.hypot(1.0, 2.5) * math.hypot(1.0, 2.0)))


def test_auto_weight_in_a_run_matches_the_metric_by_hand(assets, sources, tmp_path):
    """weight auto: the cosine of the teacher's and the reference's task embeddings over the first
    ``samples`` training examples, each computed here from a separately loaded model."""
    src = sources["lora"][0] / "adapter"
    ref_dir = tmp_path / "ref"  # "trained on the target task": another LoRA run on the same data, from scratch
    train(quick_cls(assets, ref_dir, LORA, optim={"lr": 3e-2, "batch_size": 8, "max_steps": 3}), progress=False)
    r = recipe_for(assets, sources, tmp_path, "cls", weight="auto", reference=str(ref_dir / "adapter"), samples=10)
    run = make_run(r)
    d = run.lineage["distill"]
    examples = run.data.train[:10]
    batch = collate(examples, run.tokenizer.pad_token_id)

    def embedding(adapter: Path) -> torch.Tensor:
        m = gk.load_model(r["model"], head="classification", num_labels=2)
        gk.load_adapter(m, adapter)
        with torch.no_grad():
            out = m.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        h, mask = out.hidden_states[-1].double(), batch["attention_mask"].double()[..., None]
        return ((h * mask).sum(1) / mask.sum(1)).mean(0)

    a, b = embedding(src), embedding(ref_dir / "adapter")
    want = float(a @ b / (a.norm() * b.norm()))
    assert d["transferability"] == pytest.approx(want, rel=1e-6)
    assert d["weight"] == pytest.approx(max(0.0, want), rel=1e-6) and run.acc.unwrap_model(run.module).distill.weight == d["weight"]
    assert d["reference"]["path"] == str((ref_dir / "adapter").resolve())
    # the student's own tensors are the init_from source's again after the measurement
    saved = gk.read_adapter(src).tensors
    state = dict(run.model.named_parameters())
    assert torch.equal(state["bert.encoder.layer.1.attention.self.value.graft_adapter.weight.lora_B"],
                       saved["bert.encoder.layer.1.attention.self.value.weight.lora_B"])


# -- bad input -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_base_adapter(assets, other_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("otherbase") / "run"
    r = quick_cls(assets, out, LORA)
    r["model"] = str(other_base)
    r["optim"] = {**r["optim"], "max_steps": 1}
    train(r, progress=False)
    return out / "adapter"


@pytest.mark.parametrize("case, needles", [
    ("teacher_base", ["distill.teacher", "different base model"]),
    ("teacher_base_other_method", ["distill.teacher", "different base model"]),
    ("teacher_missing", ["distill.teacher", "does not exist"]),
    ("no_init_from", ["distill (PANDA)", "set init_from"]),
    ("auto_no_reference", ["distill.weight auto", "distill.reference"]),
    ("reference_unused", ["distill.reference is read only for weight auto"]),
    ("negative", ["distill.weight=-1", "finite number >= 0"]),
    ("temperature", ["distill", "temperature"]),
    ("teacher_labels", ["distill.teacher", "other labels"]),
])
def test_distill_refuses(assets, sources, other_base, other_base_adapter, tmp_path, capsys, case, needles):
    r = recipe_for(assets, sources, tmp_path, "cls", weight=1.0)
    d = r["distill"]
    if case == "teacher_base":
        d["teacher"] = str(other_base_adapter)
    elif case == "teacher_base_other_method":  # a second model is loaded for it: the fingerprint is checked there
        r["model"], r["init_from"] = str(other_base), str(other_base_adapter)
        d["teacher"] = str(sources["houlsby"][0] / "adapter")
    elif case == "teacher_missing":
        d["teacher"] = str(tmp_path / "nope")
    elif case == "no_init_from":
        del r["init_from"]
    elif case == "auto_no_reference":
        d["weight"] = "auto"
    elif case == "reference_unused":
        d["reference"] = str(sources["lora"][0] / "adapter")
    elif case == "negative":
        d["weight"] = -1.0
    elif case == "temperature":
        d["temperature"] = 0
    elif case == "teacher_labels":
        rows = [json.loads(x) for x in (assets / "cls_train.jsonl").read_text().splitlines()]
        data = tmp_path / "other.jsonl"
        data.write_text("".join(json.dumps({"text": x["text"], "label": {"pos": "yes", "neg": "no"}[x["label"]]}) + "\n" for x in rows))
        r["data"] = {**r["data"], "train": str(data), "validation": None}
    code, _, err = run_cli(capsys, _recipe_file(tmp_path / "r.yaml", r))
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "run" / "adapter").exists()


def test_distill_under_fsdp_is_refused(assets, sources, tmp_path):
    r = parse_recipe(recipe_for(assets, sources, tmp_path, "cls", weight=1.0))
    run = SimpleNamespace(recipe=r, fsdp="graftkit")
    with pytest.raises(ConfigError, match="distill does not run with the model sharded"):
        setup_lineage(run, None)


def test_resume_refuses_a_changed_teacher(assets, sources, tmp_path, capsys):
    import shutil

    from safetensors.torch import save_file

    teacher = tmp_path / "teacher"
    shutil.copytree(sources["lora"][0] / "adapter", teacher)
    r = recipe_for(assets, sources, tmp_path, "cls", weight=1.0)
    r["distill"]["teacher"] = str(teacher)
    r["output"] = {**r["output"], "checkpoint_every": 1}
    f = _recipe_file(tmp_path / "r.yaml", r)
    code, _, err = run_cli(capsys, f)
    assert code == 0, err
    first = gk.read_adapter(tmp_path / "run" / "adapter").tensors
    code, out, err = run_cli(capsys, f, "--resume")  # unchanged: resumes from step 2 and redoes step 3 bit for bit
    assert code == 0, err
    assert "resuming from" in out
    again = gk.read_adapter(tmp_path / "run" / "adapter").tensors
    assert all(torch.equal(first[k], again[k]) for k in first)
    tensors = gk.read_adapter(teacher).tensors
    key = next(k for k in tensors if k.endswith("lora_B"))
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, str(teacher / "adapter.safetensors"))
    code, _, err = run_cli(capsys, f, "--resume")
    assert_one_line_error(code, err, "cannot resume", "distill.teacher adapter", "changed since it was written")


def test_output_inside_a_source_is_refused(assets, sources, tmp_path, capsys):
    src = sources["lora"][0]
    before = sorted(p.name for p in src.iterdir())
    r = recipe_for(assets, sources, tmp_path, "cls", weight=1.0)
    r["output"] = {"dir": str(src)}
    code, _, err = run_cli(capsys, _recipe_file(tmp_path / "r.yaml", r), "--overwrite")
    assert_one_line_error(code, err, "contains the init_from adapter")
    assert sorted(p.name for p in src.iterdir()) == before


def test_two_processes_match_one(assets, sources, tmp_path):
    """DDP (torchrun, 2 CPU processes, batch 4 each) with a shared teacher gives the losses of one
    process with batch 8: each process's KD term is the mean over its half of the batch."""
    import os
    import subprocess
    import sys

    from test_train import ENV

    r1 = recipe_for(assets, sources, tmp_path / "a", "cls", weight=1.0, temperature=2.0)
    r2 = recipe_for(assets, sources, tmp_path / "b", "cls", weight=1.0, temperature=2.0)
    r2["optim"] = {**r2["optim"], "batch_size": 4}
    f = _recipe_file(tmp_path / "two.yaml", r2)
    port = str(29500 + (os.getpid() + 311) % 1000)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                          "-m", "graftkit.cli", "train", str(f), "--no-progress"], env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "2 process(es)" in res.stdout and "sharing this model" in res.stdout
    train(r1, progress=False)
    one, two = losses(Path(r1["output"]["dir"])), losses(Path(r2["output"]["dir"]))
    assert len(one) == len(two) == 3
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-4
    a, b = (gk.read_adapter(Path(r["output"]["dir"]) / "adapter").tensors for r in (r1, r2))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_a_method_that_trains_weights_in_place(assets, tmp_path):
    """BitFit changes the base's own tensors: once init_from has copied its source in, the
    teacher's base check reads the base's values from the sites, not the changed weights."""
    src = tmp_path / "src"
    s = train(quick_cls(assets, src, {"method": "bitfit"}), progress=False)
    r = quick_cls(assets, tmp_path / "run", {"method": "bitfit"}, init_from=str(src),
                  distill={"teacher": str(src), "weight": 1.0, "temperature": 2.0})
    r["eval"] = {"every": None, "at_start": True}
    out = train(r, progress=False)
    assert out["start_val_loss"] == pytest.approx(s["val_loss"], rel=1e-6)
