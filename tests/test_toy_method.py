"""A tuning method defined here only, registered for the test, and used through ``gk.inject``,
``graft train``, ``graft merge``, peft export and ``graft study``: everything the rest of graftkit
needs comes from the capabilities on the registered object, so no other file is edited.

The toy method adds a rank-one delta ``u v^T`` to a linear weight, ``u`` zero at init (identity at
init, like LoRA's B). It declares ``merge_deltas`` (so its adapters are merge inputs) and no peft
converter (so peft export is refused, naming the method).
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
import yaml
from torch import nn

import graftkit as gk
from graftkit.methods.base import MergeDelta, MethodConfig, SavedTarget, Site, TuningMethod
from graftkit.registry import METHODS
from test_study import study_recipe, tiny_base, write_task  # noqa: F401  (tiny_base is a fixture)

NAME = "toy_rank1"


class ToyConfig(MethodConfig):
    method: str = NAME


class ToySite(Site):
    slots = ("toy_u", "toy_v")

    def __init__(self, info, kind: str):
        super().__init__(info, kind)
        out_f, in_f = info.param.shape
        g = torch.Generator().manual_seed(len(info.name))
        self.toy_u = nn.Parameter(torch.zeros(out_f))
        self.toy_v = nn.Parameter(torch.randn(in_f, generator=g) / in_f ** 0.5)

    def attach(self) -> None:
        self.owner.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        if not self.enabled or self.merged:
            return None
        x = args[0] if args else next(iter(kwargs.values()))
        return output + (x @ self.toy_v.to(x.dtype))[..., None] * self.toy_u.to(x.dtype)

    def delta(self) -> dict[str, torch.Tensor]:
        return {self.pname: toy_delta(self.toy_u.detach(), self.toy_v.detach())}

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.add_(toy_delta(self.toy_u, self.toy_v).to(self.base.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.sub_(toy_delta(self.toy_u, self.toy_v).to(self.base.dtype))
            self.merged = False


def toy_delta(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.outer(u.float(), v.float())


def toy_merge_deltas(t: SavedTarget) -> dict[str, MergeDelta]:
    u, v = t.slots["toy_u"], t.slots["toy_v"]
    return {t.name: MergeDelta("linear", lambda w: toy_delta(u, v))}


class Toy(TuningMethod):
    name = NAME
    config_cls = ToyConfig
    kinds = ("linear",)
    space = "weight"
    has_weight_delta = True
    identity_at_init = True
    merge_deltas = staticmethod(toy_merge_deltas)
    peft = None

    @classmethod
    def make_site(cls, info, config, options: dict[str, Any]) -> Site:
        return ToySite(info, "linear")


@pytest.fixture
def toy():
    import graftkit.methods  # noqa: F401  (the built-in methods register first)

    METHODS.register(NAME)(Toy)
    try:
        yield Toy
    finally:
        METHODS.unregister(NAME)
    assert NAME not in METHODS


def tiny_bert_classifier():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32, num_labels=2)
    return transformers.BertForSequenceClassification(cfg).eval()


def test_inject_is_identity_at_init_and_saves_its_slots(toy, tmp_path):
    model = tiny_bert_classifier()
    ids = torch.randint(0, 100, (2, 7))
    before = model(ids).logits
    gk.inject(model, {"method": NAME, "targets": ["query", "value"]})
    assert toy.identity_at_init and torch.allclose(model(ids).logits, before, atol=1e-6)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.rsplit(".", 1)[-1] in ("toy_u", "toy_v") for n in names)
    with torch.no_grad():
        for site in gk.sites(model).values():
            site.toy_u.normal_()
    out = model(ids).logits
    delta = gk.materialize_delta(model)
    assert set(delta) == {n for n in gk.sites(model)} and len(delta) == 4
    gk.save_adapter(model, tmp_path / "a")
    again = gk.load_adapter(tiny_bert_classifier(), tmp_path / "a")
    assert torch.allclose(again(ids).logits, out, atol=1e-6)


def test_train_merge_export_and_study_through_the_registry(toy, tmp_path, tiny_base, capsys):
    from graftkit.cli import main
    from graftkit.eval.study import run_study
    from graftkit.train import train
    from merge_helpers import load_folder

    import transformers

    # a classifier base, so the adapter's names are the base's own (a merge input must fit it)
    base_dir = tmp_path / "clsbase"
    transformers.BertForSequenceClassification.from_pretrained(tiny_base, num_labels=2).save_pretrained(base_dir)
    transformers.AutoTokenizer.from_pretrained(tiny_base).save_pretrained(base_dir)
    files = write_task(tmp_path / "data", "topic", 1)
    recipe = {"model": str(base_dir), "task": "classification",
              "data": {"train": files["train"], "validation": files["validation"], "max_length": 16},
              "method": {"method": NAME, "targets": ["query", "value"]},
              "optim": {"lr": 5e-2, "batch_size": 16, "epochs": 3, "seed": 0}, "output": {"dir": str(tmp_path / "run")}}
    summary = train(recipe, progress=False)
    assert summary["final_loss"] < summary["first_loss"]
    adapter = tmp_path / "run" / "adapter"
    saved = load_folder(adapter) if (adapter / "model.safetensors").exists() else None
    from graftkit.io import read_adapter

    a = read_adapter(adapter)
    assert a.method == NAME
    # only the toy slots (and the new head, trained whole) were saved
    assert {k.rsplit(".", 1)[-1] for k in a.tensors} <= {"toy_u", "toy_v", "value"} and saved is None
    assert any(k.endswith("toy_u") and a.tensors[k].abs().sum() > 0 for k in a.tensors)

    # graft merge: the saved adapter enters as a weight-space delta onto the base
    cfg = {"merge_method": "linear", "base_model": str(base_dir), "dtype": "float32",
           "models": [{"model": str(adapter), "parameters": {"weight": 1.0}}]}
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(path), str(tmp_path / "merged")]) == 0
    merged, base = load_folder(tmp_path / "merged"), load_folder(base_dir)
    for name in a.targets:
        want = base[name].float() + toy_delta(a.tensors[f"{name}.toy_u"], a.tensors[f"{name}.toy_v"])
        assert torch.allclose(merged[name].float(), want, atol=1e-6), name
        assert not torch.equal(merged[name], base[name])
    untouched = "bert.encoder.layer.0.attention.self.key.weight"
    assert torch.equal(merged[untouched], base[untouched])

    # peft export: the method declares no converter, so it is refused in one line naming it
    capsys.readouterr()
    code = main(["export", str(adapter), "--base", str(base_dir), "--peft", str(tmp_path / "peft")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("graft: error:") and "\n" not in err and NAME in err, err
    assert not (tmp_path / "peft").exists()
    bad = dict(recipe, output={"dir": str(tmp_path / "run2"), "export": ["peft"]})
    from graftkit.errors import ConfigError

    with pytest.raises(ConfigError, match=NAME):
        train(bad, progress=False)

    # graft study: an expert family of the toy method merges from its adapters (no merged export), as
    # full fine-tuning's (its saved dense delta is a merge input); an activation-space method exports merged
    from types import SimpleNamespace

    from graftkit.eval.study import expert_recipe

    cfg = SimpleNamespace(seed=0, base=str(tiny_base))
    for method, export in ((NAME, []), ("full", []), ("houlsby", ["merged"])):
        family = SimpleNamespace(optim={}, method={"method": method})
        assert expert_recipe(cfg, family, {}, tmp_path / "e")["output"]["export"] == export
    study = study_recipe(tmp_path / "s", tiny_base, experts=[
        {"family": "toy", "method": {"method": NAME, "targets": ["query", "value"]},
         "optim": {"lr": 5e-2, "batch_size": 16, "epochs": 2}}], merges=[{"method": "linear"}])
    result = run_study(study, progress=False)
    assert result["failures"] == []
    assert {"toy/topic", "toy/mood", "toy/linear"} <= {m["name"] for m in result["models"]}
