"""Light-PEFT: LoRA with early pruning of the foundation model and of the LoRA modules.

Gu et al., 2024, "Light-PEFT: Lightening Parameter-Efficient Fine-Tuning via Early Pruning" (Findings
of ACL 2024). Early in training the method estimates what is redundant, prunes it, and trains the
smaller model for the rest of the run:

* **Masked early pruning of the foundation model.** Every attention head ``h`` and FFN neuron ``j``
  gets a trainable scalar mask (``m_h``, ``m_j``, starting at 1) on its path into the block's output
  projection, trained with the task and an L1 penalty ``mask_l1 * (mean|m_head| + mean|m_ffn|)``.
  At ``prune_step`` the ``head_prune_ratio`` heads and ``ffn_prune_ratio`` neurons with the smallest
  ``|m|`` (ranked over all layers; each layer keeps at least one of each) are removed from the model:
  the rows of Q, K, V (and of the FFN's up/gate projections) and the columns of the output (down)
  projection, so later steps really compute less. The masks only rank; the pruned model runs without
  them (a kept unit's path is unchanged).
* **Multi-granularity early pruning of the LoRA modules.** Coarse: each LoRA module's importance
  ratio ``||s B A x|| / ||W x||`` on the first training batches; the ``module_prune_ratio`` least
  important modules are removed. Fine: each rank unit ``i`` of a module scores the first-order Taylor
  estimate of the loss change when it is removed, ``|sum(A_i. * dL/dA_i.) + sum(B_.i * dL/dB_.i)|``,
  summed over the estimation steps; the ``rank_prune_ratio`` lowest units (over all modules, each
  keeping one) are removed, the module's scaling kept.

Removing a head (or neuron) is the same function as zeroing its columns of the output (down)
projection, since those columns are its only way to the block's output. A saved Light-PEFT adapter
records what was pruned (``pruned_heads``, ``pruned_neurons``) and the LoRA factors of the smaller
model; loading it prunes the original base the same way first, and ``graft merge`` sees it as the
exact delta on the original base: the LoRA factors with zeros at the removed rows/columns plus
``-W`` on the removed output-projection columns.

Blocks: BERT-style (``attention.self.query/key/value``, ``attention.output.dense``,
``intermediate.dense``, ``output.dense``) and Llama-style (``self_attn.q/k/v/o_proj``,
``mlp.gate/up/down_proj``; heads only without grouped-query attention).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from pydantic import Field, model_validator
from torch import nn

from ..errors import AdapterError, ConfigError, UnsupportedError
from ..registry import METHODS
from ..targets import ParamInfo
from .base import HOLDER, MergeDelta, MethodTraining, SavedTarget, Site
from .lora import LoRA, LoRAConfig, LoRASite, lora_delta


class LightPEFTConfig(LoRAConfig):
    head_prune_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    ffn_prune_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    module_prune_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    rank_prune_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    #: the update after which pruning happens; None: prune_fraction of the run's updates
    prune_step: int | None = Field(None, ge=1)
    prune_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    mask_l1: float = Field(1e-2, ge=0.0)
    #: training micro-batches the module importance ratio is measured on
    importance_batches: int = Field(2, ge=1)
    # filled by training (what was removed), read when the adapter is loaded: block module -> indices
    pruned_heads: dict[str, list[int]] = Field(default_factory=dict)
    pruned_neurons: dict[str, list[int]] = Field(default_factory=dict)
    head_sizes: dict[str, int] = Field(default_factory=dict)  # the head width of each block in pruned_heads

    @model_validator(mode="after")
    def _plain(self):
        if self.use_dora or self.init_lora_weights not in (True, False, "gaussian"):
            raise ConfigError("light_peft prunes a plain LoRA: use_dora and the residual initialisations (pissa, olora, eva) "
                              "are not supported with it; use method: lora for those")
        return self


# -- the blocks pruning acts on -------------------------------------------------------------------------

@dataclass
class Block:
    """One transformer layer's prunable parts (module paths from the model root)."""

    name: str
    heads_in: list[str]  # Q, K, V: rows grouped by head
    heads_out: str  # the attention output projection: columns grouped by head
    head_size: int
    ffn_in: list[str]  # up (and gate): one row per neuron
    ffn_out: str  # down: one column per neuron


def find_blocks(model: nn.Module) -> list[Block]:
    blocks = []
    for name, m in model.named_modules():
        att, inter, out = getattr(m, "attention", None), getattr(m, "intermediate", None), getattr(m, "output", None)
        if att is not None and inter is not None and hasattr(getattr(att, "self", None), "query") and hasattr(out, "dense"):
            p = f"{name}." if name else ""
            blocks.append(Block(name, [f"{p}attention.self.{x}" for x in ("query", "key", "value")], f"{p}attention.output.dense",
                                int(att.self.attention_head_size), [f"{p}intermediate.dense"], f"{p}output.dense"))
            continue
        sa, mlp = getattr(m, "self_attn", None), getattr(m, "mlp", None)
        if sa is not None and mlp is not None and hasattr(sa, "q_proj") and hasattr(mlp, "down_proj"):
            p = f"{name}." if name else ""
            ffn_in = [f"{p}mlp.{x}" for x in ("gate_proj", "up_proj") if hasattr(mlp, x)]
            head_dim = int(getattr(sa, "head_dim", 0) or sa.q_proj.out_features // model.config.num_attention_heads)
            blocks.append(Block(name, [f"{p}self_attn.{x}" for x in ("q_proj", "k_proj", "v_proj")], f"{p}self_attn.o_proj",
                                head_dim, ffn_in, f"{p}mlp.down_proj"))
    return blocks


def _linear(model: nn.Module, path: str) -> nn.Linear:
    m = model.get_submodule(path)
    if not isinstance(m, nn.Linear):
        raise UnsupportedError(f"light_peft prunes nn.Linear projections; {path} is a {type(m).__name__}")
    return m


def _site(module: nn.Module) -> LoRASite | None:
    holder = module._modules.get(HOLDER)
    return holder["weight"] if holder is not None and "weight" in holder else None


@torch.no_grad()
def _keep_rows(module: nn.Linear, keep: torch.Tensor, record: list) -> None:
    gone = _kept_complement(module.out_features, keep)
    record.append(Cut(module, "rows", keep, gone, module.weight[gone].clone(),
                      None if module.bias is None else module.bias[gone].clone(), module.out_features))
    module.weight = nn.Parameter(module.weight[keep].clone(), requires_grad=module.weight.requires_grad)
    if module.bias is not None:
        module.bias = nn.Parameter(module.bias[keep].clone(), requires_grad=module.bias.requires_grad)
    module.out_features = int(keep.numel())
    site = _site(module)
    if site is not None:
        site.lora_B = nn.Parameter(site.lora_B[keep].clone())


@torch.no_grad()
def _keep_cols(module: nn.Linear, keep: torch.Tensor, record: list) -> None:
    gone = _kept_complement(module.in_features, keep)
    record.append(Cut(module, "cols", keep, gone, module.weight[:, gone].clone(), None, module.in_features))
    module.weight = nn.Parameter(module.weight[:, keep].clone(), requires_grad=module.weight.requires_grad)
    module.in_features = int(keep.numel())
    site = _site(module)
    if site is not None:
        site.lora_A = nn.Parameter(site.lora_A[:, keep].clone())


@dataclass
class Cut:
    """What pruning took from one Linear: its kept and removed rows (or columns) and their values."""

    module: nn.Linear
    axis: str  # "rows" or "cols"
    keep: torch.Tensor
    gone: torch.Tensor
    weight: torch.Tensor  # the removed rows / columns
    bias: torch.Tensor | None  # the removed bias entries (rows)
    size: int  # the original number of rows / columns

    @torch.no_grad()
    def undo(self, zero: bool) -> None:
        """Give the module back its original shape: the removed rows / columns return with their
        original values, or as zeros (``zero``: the pruned function on the original shape; used for
        the output projections' columns, the only way a removed unit reaches the block's output)."""
        m, w = self.module, self.module.weight
        if self.axis == "rows":
            full = w.new_empty(self.size, w.shape[1])
            full[self.keep], full[self.gone] = w, self.weight.to(w.dtype)
            if m.bias is not None:
                b = m.bias.new_empty(self.size)
                b[self.keep], b[self.gone] = m.bias, self.bias.to(b.dtype)
                m.bias = nn.Parameter(b, requires_grad=m.bias.requires_grad)
            m.out_features = self.size
        else:
            full = w.new_zeros(w.shape[0], self.size)
            full[:, self.keep] = w
            if not zero:
                full[:, self.gone] = self.weight.to(w.dtype)
            m.in_features = self.size
        m.weight = nn.Parameter(full, requires_grad=w.requires_grad)


class PruningSite(Site):
    """The structure Light-PEFT removed, kept so that unloading gives the model its original shapes:
    ``unload(merge=True)`` puts zeros in the removed output-projection columns (the same function as
    the pruned model, on the original shapes), ``unload(merge=False)`` the original values. It holds no
    tensors (nothing of it is saved: the adapter's config records the pruning) and sits after every
    other site, so the LoRA sites merge or restore before it expands the weights."""

    def __init__(self, owner: nn.Module, cuts: list[Cut]):
        super().__init__(ParamInfo(PRUNING_KEY, "", PRUNING_KEY, owner, None), "param")  # type: ignore[arg-type]
        self.cuts = cuts

    def merge(self) -> None:
        self.merged = True  # the pruning is always in force; merged only says how to unload

    def unmerge(self) -> None:
        self.merged = False

    def restore_base(self) -> None:
        self.merged = False

    def delta(self) -> dict[str, torch.Tensor]:
        return {}

    def detach(self) -> None:
        for cut in reversed(self.cuts):
            cut.undo(zero=self.merged)
        self.cuts = []


PRUNING_KEY = "light_peft_pruning"


def _kept_complement(total: int, keep: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(total, dtype=torch.bool)
    mask[keep] = False
    return torch.nonzero(mask).view(-1)


def _kept(total: int, removed: list[int]) -> torch.Tensor:
    drop = set(removed)
    return torch.tensor([i for i in range(total) if i not in drop], dtype=torch.long)


def check_record(model: nn.Module, heads: dict[str, list[int]], neurons: dict[str, list[int]], where: str = "") -> dict[str, Block]:
    """The blocks a pruning record names, refusing (one line) a record that does not fit ``model``."""
    blocks = {b.name: b for b in find_blocks(model)}
    for what, record in (("pruned_heads", heads), ("pruned_neurons", neurons)):
        for name, idx in record.items():
            b = blocks.get(name)
            if b is None:
                raise AdapterError(f"{where}{what} names {name!r}, which is no transformer block of this model; the adapter was made "
                                   "for another model")
            size = (_linear(model, b.heads_out).in_features // b.head_size) if what == "pruned_heads" else _linear(model, b.ffn_out).in_features
            if any(not isinstance(i, int) or i < 0 or i >= size for i in idx) or len(set(idx)) >= size:
                raise AdapterError(f"{where}{what}[{name!r}] = {idx} does not fit its {size} units (each block keeps at least one); "
                                   "the adapter was made for another model or is corrupt")
    return blocks


def prune_structure(model: nn.Module, heads: dict[str, list[int]], neurons: dict[str, list[int]]) -> list[Cut]:
    """Remove heads and FFN neurons from ``model`` in place (and the matching LoRA rows/columns);
    returns what was cut (:class:`Cut`), to give the shapes back on unload."""
    blocks = check_record(model, heads, neurons)
    record: list[Cut] = []
    for name, idx in heads.items():
        b = blocks[name]
        n = _linear(model, b.heads_out).in_features // b.head_size
        keep_heads = _kept(n, idx)
        keep = (keep_heads[:, None] * b.head_size + torch.arange(b.head_size)).reshape(-1)
        for path in b.heads_in:
            _keep_rows(_linear(model, path), keep, record)
        _keep_cols(_linear(model, b.heads_out), keep, record)
    for name, idx in neurons.items():
        b = blocks[name]
        keep = _kept(_linear(model, b.ffn_out).in_features, idx)
        for path in b.ffn_in:
            _keep_rows(_linear(model, path), keep, record)
        _keep_cols(_linear(model, b.ffn_out), keep, record)
    return record


def attach_pruning(model: nn.Module, cuts: list[Cut]) -> None:
    """Keep ``cuts`` in a :class:`PruningSite` on the model's last module (the last site unloaded)."""
    if not cuts:
        return
    last = list(model.modules())[-1]
    holder = last._modules.get(HOLDER)
    if holder is None:
        holder = nn.ModuleDict()
        last.add_module(HOLDER, holder)
    holder[PRUNING_KEY] = PruningSite(last, cuts)


def base_parameters(model: nn.Module) -> int:
    """The foundation model's parameters (the adapter's own tensors not counted)."""
    return sum(p.numel() for n, p in model.named_parameters() if HOLDER not in n.split("."))


def smallest(scores: dict[str, torch.Tensor], ratio: float) -> dict[str, list[int]]:
    """The ``ratio`` share of all units with the smallest scores, by group; every group keeps one."""
    total = sum(v.numel() for v in scores.values())
    count = int(ratio * total)
    if count == 0:
        return {}
    flat = [(float(v), name, i) for name, s in scores.items() for i, v in enumerate(s.view(-1).tolist())]
    flat.sort()
    left = {name: s.numel() for name, s in scores.items()}
    out: dict[str, list[int]] = {}
    for _, name, i in flat:
        if count == 0:
            break
        if left[name] > 1:
            out.setdefault(name, []).append(i)
            left[name] -= 1
            count -= 1
    return {k: sorted(v) for k, v in out.items()}


# -- training -----------------------------------------------------------------------------------------

class EarlyPruning(MethodTraining):
    """Masks and Taylor scores while estimating, then the pruning at ``prune_step`` (the loop rebuilds
    the optimizer). The removed structure cannot be put back into a checkpoint's model: no resume."""

    resumable = False

    def __init__(self, config: LightPEFTConfig):
        self.config = config
        self.batches_needed = config.importance_batches
        self.masks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # block -> (head mask, ffn mask)
        self.hooks: list = []
        self.taylor: dict[str, torch.Tensor] = {}
        self.times: list[float] = []
        self.last: float | None = None
        self.pruned_at: int | None = None
        self.numbers: dict[str, Any] = {}

    # -- setup ---------------------------------------------------------------------------------
    def start(self, model, forward, batches, total_steps):
        from ..adapter import require_state

        c = self.config
        self.forward, self.batches = forward, batches
        self.prune_step = c.prune_step or max(1, int(c.prune_fraction * total_steps))
        if self.prune_step >= total_steps:
            raise ConfigError(f"light_peft: prune_step {self.prune_step} leaves no training after pruning in a run of {total_steps} "
                              "updates; lower prune_step / prune_fraction or train longer")
        state = require_state(model)
        if state.config.pruned_heads or state.config.pruned_neurons:
            raise ConfigError("light_peft: this adapter was already pruned (its config records pruned_heads / pruned_neurons); "
                              "train a fresh one, or train it further with method: lora")
        self.blocks = find_blocks(model)
        if not self.blocks and (c.head_prune_ratio or c.ffn_prune_ratio):
            raise UnsupportedError(f"light_peft prunes heads and FFN neurons of BERT- and Llama-style blocks; {type(model).__name__} "
                                   "has none (set head_prune_ratio and ffn_prune_ratio to 0 to prune the LoRA modules only)")
        dev = next(model.parameters()).device
        for b in self.blocks:
            o = _linear(model, b.heads_out)
            if c.head_prune_ratio and any(_linear(model, p).out_features != o.in_features for p in b.heads_in):
                raise UnsupportedError(f"light_peft: {b.name} uses grouped-query attention (K/V narrower than Q), whose heads it cannot "
                                       "prune; set head_prune_ratio: 0")
            hm = torch.ones(o.in_features // b.head_size, device=dev, requires_grad=True)
            fm = torch.ones(_linear(model, b.ffn_out).in_features, device=dev, requires_grad=True)
            self.masks[b.name] = (hm, fm)
            self.hooks.append(o.register_forward_pre_hook(self._mask_hook(hm, b.head_size)))
            self.hooks.append(_linear(model, b.ffn_out).register_forward_pre_hook(self._mask_hook(fm, 1)))
        params = [t for pair in self.masks.values() for t in pair]
        self.mask_opt = torch.optim.Adam(params, lr=self.lr or 1e-3) if params else None
        self.params_before = base_parameters(model)
        self.trainable_before = sum(p.numel() for p in model.parameters() if p.requires_grad)

    @staticmethod
    def _mask_hook(mask: torch.Tensor, width: int) -> Callable:
        def hook(module, args):
            m = mask.repeat_interleave(width) if width > 1 else mask
            return (args[0] * m.to(args[0].dtype),) + tuple(args[1:])
        return hook

    def _lora_sites(self, model) -> dict[str, LoRASite]:
        from ..adapter import sites

        return {n: s for n, s in sites(model).items() if isinstance(s, LoRASite)}

    # -- estimation ---------------------------------------------------------------------------
    def extra_loss(self, model):
        if not self.masks or self.pruned_at is not None or self.config.mask_l1 == 0:
            return None
        heads = torch.cat([h for h, _ in self.masks.values()]).abs().mean()
        ffn = torch.cat([f for _, f in self.masks.values()]).abs().mean()
        return self.config.mask_l1 * (heads + ffn)

    def before_update(self, model, step):
        if self.pruned_at is not None:
            return
        with torch.no_grad():
            for n, s in self._lora_sites(model).items():
                if s.lora_A.grad is None or s.lora_B.grad is None:
                    continue
                score = ((s.lora_A * s.lora_A.grad).sum(1) + (s.lora_B * s.lora_B.grad).sum(0)).abs().float()
                self.taylor[n] = self.taylor.get(n, torch.zeros_like(score)) + score
        if self.mask_opt is not None:
            self.mask_opt.step()
            self.mask_opt.zero_grad(set_to_none=True)

    def after_update(self, model, step):
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        t = step + 1
        if t != self.prune_step:
            self.last = time.perf_counter()
            return False
        self.before_times, self.times = self.times, []
        self.prune(model)
        self.pruned_at = t
        self.last = time.perf_counter()  # the pruning itself is not a training step
        return True

    # -- pruning ----------------------------------------------------------------------------------
    @torch.no_grad()
    def prune(self, model) -> None:
        from ..adapter import require_state

        c, state = self.config, require_state(model)
        for h in self.hooks:
            h.remove()
        self.hooks = []
        heads = smallest({n: m[0].detach().abs() for n, m in self.masks.items()}, c.head_prune_ratio)
        neurons = smallest({n: m[1].detach().abs() for n, m in self.masks.items()}, c.ffn_prune_ratio)
        self.masks, self.mask_opt = {}, None
        lora = self._lora_sites(model)
        modules_before, ranks_before = len(lora), sum(s.r for s in lora.values())
        # coarse: LoRA modules by their importance ratio on the first batches (on the pruned model)
        names = sorted(lora)
        ratios = self.importance_ratios(model, lora) if c.module_prune_ratio and len(lora) > 1 else {}
        drop = smallest({"all": torch.stack([ratios[n] for n in names])}, c.module_prune_ratio).get("all", []) if ratios else []
        dropped = [names[i] for i in drop]  # (at least one module stays)
        self.module_ratios = {n: float(v) for n, v in ratios.items()}
        for name in dropped:
            s = lora.pop(name)
            s.detach()
            del s.owner._modules[HOLDER][s.pname]
            state.targets.remove(name)
            state.options.pop(name, None)
        # fine: rank units by their accumulated Taylor score
        scores = {n: self.taylor.get(n, torch.zeros(s.r)) for n, s in lora.items()}
        for name, idx in smallest(scores, c.rank_prune_ratio).items():
            s = lora[name]
            keep = _kept(s.r, idx).to(s.lora_A.device)
            s.lora_A = nn.Parameter(s.lora_A[keep].clone())
            s.lora_B = nn.Parameter(s.lora_B[:, keep].clone())
            s.r = int(keep.numel())
            s.alpha = s.scaling * s.r  # the same scaling for the kept units
            state.options[name] = {**state.options.get(name, {}), "r": s.r, "lora_alpha": s.alpha}
        attach_pruning(model, prune_structure(model, heads, neurons))
        sizes = {b.name: b.head_size for b in self.blocks if b.name in heads}
        state.config = state.config.model_copy(update={"pruned_heads": heads, "pruned_neurons": neurons, "head_sizes": sizes})
        params_after = base_parameters(model)
        heads_total = sum(_linear(model, b.heads_out).in_features // b.head_size for b in self.blocks) + sum(map(len, heads.values()))
        neurons_total = sum(_linear(model, b.ffn_out).in_features for b in self.blocks) + sum(map(len, neurons.values()))
        self.numbers = {
            "heads_pruned": sum(map(len, heads.values())), "heads": heads_total,
            "ffn_neurons_pruned": sum(map(len, neurons.values())), "ffn_neurons": neurons_total,
            "lora_modules_pruned": len(dropped), "lora_modules": modules_before,
            "lora_ranks_pruned": ranks_before - sum(s.r for s in lora.values()), "lora_ranks": ranks_before,
            "parameters_before": self.params_before, "parameters_after": params_after,
            "parameters_saved": 1 - params_after / self.params_before,
            "trainable_before": self.trainable_before,
            "trainable_after": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }

    @torch.no_grad()
    def importance_ratios(self, model, lora: dict[str, LoRASite]) -> dict[str, torch.Tensor]:
        """``||delta out|| / ||base out||`` of each LoRA module on the first training batches."""
        outs: dict[str, list[torch.Tensor]] = {n: [] for n in lora}
        hooks = [s.owner.register_forward_hook(lambda m, a, o, _n=n: outs[_n].append(o.detach().float().clone())) for n, s in lora.items()]
        was = model.training
        model.eval()  # no dropout: the two passes must differ by the LoRA terms only
        try:
            for s in lora.values():
                s.set_enabled(False)
            for b in self.batches:
                self.forward(b)
            base = {n: list(v) for n, v in outs.items()}
            for v in outs.values():
                v.clear()
            for s in lora.values():
                s.set_enabled(True)
            for b in self.batches:
                self.forward(b)
        finally:
            for h in hooks:
                h.remove()
            for s in lora.values():
                s.set_enabled(True)
            model.train(was)
        ratios = {}
        for n in lora:
            num = sum(float((o - b0).norm()) for o, b0 in zip(outs[n], base[n]))
            den = sum(float(b0.norm()) for b0 in base[n])
            ratios[n] = torch.tensor(num / den if den > 0 else 0.0)
        return ratios

    def report(self, model):
        out = dict(self.numbers)
        out["pruned_at_step"] = self.pruned_at
        before, after = getattr(self, "before_times", [])[1:], self.times[1:]
        if before and after:  # the first step of each phase warms up (allocations, a new optimizer)
            out["step_s_before"] = statistics.median(before)
            out["step_s_after"] = statistics.median(after)
            out["step_time_saved"] = 1 - out["step_s_after"] / out["step_s_before"]
        return out


# -- saved adapters -------------------------------------------------------------------------------

def _record(config) -> tuple[dict, dict]:
    c = config if isinstance(config, dict) else config.model_dump()
    return c.get("pruned_heads") or {}, c.get("pruned_neurons") or {}


def _saved_adapter(model, adapter):
    # the pruning site is no target (its record is the config's pruned_heads / pruned_neurons); the
    # fingerprint stays the original base's, which is what a merge and a load are given
    kinds = adapter.meta.get("target_kinds") or {}
    adapter.meta["target_kinds"] = {k: v for k, v in kinds.items() if not k.endswith(PRUNING_KEY)}
    return adapter


def _bind_saved(model, adapter):
    """Loading a pruned adapter prunes the original base first; the base is checked before it is
    touched, and the load then checks the pruned base against its own fingerprint."""
    heads, neurons = _record(adapter.meta["config"])
    if not heads and not neurons:
        return adapter
    from ..fingerprint import check_fingerprint, fingerprint
    from ..io.native import AdapterFile

    where = f"{adapter.path or 'the adapter'}: "
    base = adapter.meta.get("base_model") or {}
    check_record(model, heads, neurons, where)  # refuse before touching the model
    check_fingerprint(model, base.get("fingerprint"), set(adapter.train_also), base.get("name_or_path"))
    attach_pruning(model, prune_structure(model, heads, neurons))
    pruned = fingerprint(model, list(adapter.targets), skip=set(adapter.train_also))
    return AdapterFile({**adapter.meta, "base_model": {**base, "fingerprint": pruned}}, adapter.tensors, adapter.path)


def _saved_shapes(adapter, name: str, kind: str, base_shape: tuple, feedforward: bool = False) -> dict[str, tuple]:
    """A pruned adapter's factors have the pruned model's shapes: the base's less the removed units."""
    from ..layers import matrix_shape

    out_f, in_f = matrix_shape(kind, base_shape)
    r = adapter.tensors[f"{name}.lora_A"].shape[0]
    cut = _cuts(adapter.meta["config"]).get(name.rsplit(".", 1)[0], {})
    if "rows" in cut:
        out_f -= cut["rows"][0] * len(cut["rows"][1])
    if "cols" in cut:
        in_f -= cut["cols"][0] * len(cut["cols"][1])
    return {f"{name}.lora_A": (r, in_f), f"{name}.lora_B": (out_f, r)}


def _expand(t: torch.Tensor, dim: int, keep: torch.Tensor, size: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = size
    out = t.new_zeros(shape)
    out.index_copy_(dim, keep, t)
    return out


def _cuts(config: dict) -> dict[str, dict[str, tuple[int, list[int]]]]:
    """Per module path of the original base: {"rows" / "cols": (unit width, removed units)}."""
    heads, neurons = _record(config)
    sizes = config.get("head_sizes") or {}
    cuts: dict[str, dict[str, tuple[int, list[int]]]] = {}
    for block, idx in heads.items():
        p, width = (f"{block}." if block else ""), int(sizes.get(block, 0))
        if width <= 0:
            raise AdapterError(f"the Light-PEFT adapter prunes heads of {block!r} but records no head_sizes entry for it; it is corrupt - re-save it")
        for m in ("attention.self.query", "attention.self.key", "attention.self.value", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            cuts.setdefault(p + m, {})["rows"] = (width, idx)
        for m in ("attention.output.dense", "self_attn.o_proj"):
            cuts.setdefault(p + m, {})["cols"] = (width, idx)
    for block, idx in neurons.items():
        p = f"{block}." if block else ""
        for m in ("intermediate.dense", "mlp.up_proj", "mlp.gate_proj"):
            cuts.setdefault(p + m, {})["rows"] = (1, idx)
        for m in ("output.dense", "mlp.down_proj"):
            cuts.setdefault(p + m, {})["cols"] = (1, idx)
    return cuts


def _kept_units(size: int, width: int, removed: list[int]) -> torch.Tensor:
    groups = _kept(size // width, removed)
    return (groups[:, None] * width + torch.arange(width)).reshape(-1)


def _removed_cols(size: int, width: int, removed: list[int]) -> torch.Tensor:
    mask = torch.ones(size)
    mask[_kept_units(size, width, removed)] = 0.0
    return mask


def _merge_deltas(t: SavedTarget) -> dict[str, MergeDelta]:
    """The delta on the ORIGINAL base: the LoRA factors with zeros where pruning removed rows/columns,
    and ``-W`` on the removed columns of every output projection (the ones no LoRA targets are listed
    under the adapter's first target)."""
    from .lora import _merge_deltas as lora_merge

    heads, neurons = _record(t.config)
    if not heads and not neurons:
        return lora_merge(t)
    if len(t.base_shape) != 2:
        raise UnsupportedError(f"{t.where}: light_peft adapts Linear weights; {t.name} is {t.base_shape}")
    cuts = _cuts(t.config)
    module = t.name.rsplit(".", 1)[0]
    a, b = t.slots["lora_A"].float(), t.slots["lora_B"].float()
    out_f, in_f = t.base_shape
    cut = cuts.get(module, {})
    if "rows" in cut:
        b = _expand(b, 0, _kept_units(out_f, *cut["rows"]), out_f)
    if "cols" in cut:
        a = _expand(a, 1, _kept_units(in_f, *cut["cols"]), in_f)
    r = a.shape[0]
    scaling = float(t.options.get("lora_alpha", r)) / int(t.options.get("r", r))
    cols = _removed_cols(in_f, *cut["cols"]) if "cols" in cut else None

    def fn(w, _a=a, _b=b, _m=cols):
        d = lora_delta("linear", w, _a, _b, scaling)
        return d if _m is None else d - w.float() * _m.to(w.device)[None, :]

    deltas = {t.name: MergeDelta("linear", fn)}
    targets = sorted(k[: -len(".lora_A")] for k in t.tensors if k.endswith(".lora_A"))
    if targets and targets[0] == t.name:
        for path, c in cuts.items():
            key = f"{path}.weight"
            if "cols" in c and key not in targets and key in t.base_keys:
                deltas[key] = MergeDelta("linear", lambda w, _c=c["cols"]: -w.float() * _removed_cols(w.shape[1], *_c).to(w.device)[None, :])
    return deltas


@METHODS.register("light_peft")
class LightPEFT(LoRA):
    name = "light_peft"
    config_cls = LightPEFTConfig
    kinds = ("linear",)
    peft = None
    low_rank_factors = False
    saved_shapes = staticmethod(_saved_shapes)
    saved_adapter = staticmethod(_saved_adapter)
    bind_saved = staticmethod(_bind_saved)
    merge_deltas = staticmethod(_merge_deltas)

    @classmethod
    def frozen_base_in_bf16(cls, config):
        return False

    @classmethod
    def trains_on_quantized_base(cls, config):
        return False

    @classmethod
    def training(cls, config: Any):
        return EarlyPruning(config if isinstance(config, LightPEFTConfig) else LightPEFTConfig(**config))
