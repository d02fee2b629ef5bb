"""Compacter: bottleneck adapters whose projections are low-rank PHM layers with shared matrices.

Karimi Mahabadi, Henderson and Ruder, 2021, "Compacter: Efficient Low-Rank Hypercomplex
Adapter Layers" (NeurIPS 2021, arXiv:2106.04647). Each projection of a Houlsby adapter
(after the attention sublayer and after the feed-forward sublayer of every block,
``h + W_up f(W_down h + b_down) + b_up``) is a parameterized hypercomplex multiplication
(PHM) layer ``y = W x + b`` whose ``k x d`` weight is a sum of Kronecker products

    W = sum_{i=1..n} A_i (x) B_i,      A_i in R^{n x n},   B_i = s_i t_i^T in R^{(k/n) x (d/n)}

* the "slow" matrices ``A_i`` are shared by every Compacter layer of the model: one
  ``n x n x n`` tensor for all down- and up-projections of all blocks (``shared_phm_rule``;
  off, each PHM layer has its own ``A``);
* the "fast" matrices ``B_i`` are per layer and low-rank: ``s_i in R^{(k/n) x r}``,
  ``t_i in R^{(d/n) x r}`` with rank ``r = phm_rank`` (1 in the paper);
* ``n = phm_dim`` (4 in the paper) must divide both widths of every PHM layer: the hidden
  size and the bottleneck ``m`` (``bottleneck_size`` or ``hidden // reduction_factor``).

A block's two adapters then cost ``4(k + d)`` parameters without biases, plus ``n^3`` once for
the model (the paper's count for Compacter, ``4L(k + d) + n^3``). Compacter++
(:mod:`graftkit.methods.compacter_pp`) keeps only the adapter after the feed-forward sublayer.

Initialisation (ours; the paper's code draws ``A`` from N(0, 1e-4) with Glorot-uniform ``s``,
``t`` and a 3e-3 learning rate): ``A_i ~ N(0, 1/n)``, ``s ~ N(0, 1/r)`` and ``t`` uniform with
the bound of ``nn.Linear`` (``1/sqrt(d)``), so ``W_down`` has the variance of a default
``nn.Linear`` and the usual adapter learning rates apply. With ``init_weights`` the up layer's
``t`` starts at zero, so ``W_up = 0`` (identity at init) while ``t`` still gets a gradient
through ``A`` and ``s`` (as LoRA's zero ``B`` does).

Saving: the shared ``A`` is saved once, as ``<first adapted module>.phm_rule``; the other sites
hold the same tensor without a slot of their own, so a saved file counts every trained
parameter exactly once and a load cannot leave copies that disagree. See
:mod:`graftkit.methods.bottleneck` for the sublayer wiring.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from ..errors import ConfigError
from ..registry import METHODS
from .bottleneck import BottleneckConfig, BottleneckMethod, BottleneckSite

#: the slot of the shared ``A`` tensor (held by the first site of an injection)
SHARED_RULE = "phm_rule"


class CompacterConfig(BottleneckConfig):
    #: the paper's T5 runs use GELU
    non_linearity: Literal["relu", "gelu", "swish", "silu", "tanh", "identity"] = "gelu"
    #: n: the number of Kronecker terms and the size of each A_i (divides every layer width)
    phm_dim: int = Field(default=4, ge=1)
    #: r: the rank of each B_i = s_i t_i^T
    phm_rank: int = Field(default=1, ge=1)
    #: one A for every PHM layer of the model (the paper); off: one per PHM layer
    shared_phm_rule: bool = True
    #: the biases b of the PHM layers
    phm_bias: bool = True


def check_phm_dim(n: int, widths: dict[str, int], where: str) -> None:
    """Refuse an ``n`` that does not divide every width of a PHM layer, in one line."""
    for what, width in widths.items():
        if width % n:
            raise ConfigError(
                f"phm_dim {n} does not divide the {what} {width} of {where}: a PHM layer splits each width into "
                f"n equal blocks; choose a phm_dim that divides {width}"
                + (" (or a bottleneck_size / reduction_factor giving a multiple of it)" if what == "bottleneck width" else "")
            )


def phm_weight(rule: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``sum_i A_i (x) (s_i t_i^T)`` as one ``(n*P) x (n*Q)`` matrix, for ``rule`` (n, n, n),
    ``s`` (n, P, r) and ``t`` (n, Q, r): entry ``(a*P + p, b*Q + q)`` is
    ``sum_i A_i[a, b] B_i[p, q]``, the block layout of ``torch.kron``."""
    n, p, _ = s.shape
    b = torch.bmm(s, t.transpose(1, 2))  # (n, P, Q): the B_i
    return torch.einsum("iab,ipq->apbq", rule, b).reshape(n * p, n * t.shape[1])


def new_rule(n: int, dtype: torch.dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.randn(n, n, n, dtype=dtype, device=device) / math.sqrt(n))


class CompacterSite(BottleneckSite):
    """A bottleneck adapter whose two projections are PHM layers (see the module docstring)."""

    def __init__(self, info, method: str, config: CompacterConfig, d_in: int, d_out: int, **kwargs: Any):
        # read by make_projections, which the base constructor calls
        object.__setattr__(self, "_phm", (config.phm_dim, config.phm_rank, config.shared_phm_rule, config.phm_bias))
        object.__setattr__(self, "_where", info.name)
        super().__init__(info, method, config, d_in, d_out, **kwargs)

    def make_projections(self, d_in: int, d_out: int, device) -> None:
        n, r, shared, bias = self._phm
        check_phm_dim(n, {"input width": d_in, "bottleneck width": self.width, "output width": d_out}, self._where)
        m = self.width

        def param(*shape):
            return nn.Parameter(torch.zeros(*shape, dtype=self.dtype, device=device))

        # down: (m x d_in) = sum A_i (x) s_i t_i^T with s_i (m/n x r), t_i (d_in/n x r); up likewise
        self.adapter_down_s, self.adapter_down_t = param(n, m // n, r), param(n, d_in // n, r)
        self.adapter_up_s, self.adapter_up_t = param(n, d_out // n, r), param(n, m // n, r)
        slots = ["adapter_down_s", "adapter_down_t", "adapter_up_s", "adapter_up_t"]
        if bias:
            self.adapter_down_bias, self.adapter_up_bias = param(m), param(d_out)
            slots += ["adapter_down_bias", "adapter_up_bias"]
        else:
            self.adapter_down_bias = self.adapter_up_bias = None
        if not shared:
            self.adapter_down_rule, self.adapter_up_rule = param(n, n, n), param(n, n, n)
            slots += ["adapter_down_rule", "adapter_up_rule"]
        self.slots = tuple(slots)

    @torch.no_grad()
    def reset(self, identity: bool) -> None:
        n, r, shared, _ = self._phm
        for s, t, fan_in in ((self.adapter_down_s, self.adapter_down_t, self.adapter_down_t.shape[1] * n),
                             (self.adapter_up_s, self.adapter_up_t, self.adapter_up_t.shape[1] * n)):
            s.normal_(std=1 / math.sqrt(r))
            t.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        if not shared:
            for rule in (self.adapter_down_rule, self.adapter_up_rule):
                rule.copy_(torch.randn_like(rule) / math.sqrt(n))
        if identity:
            self.adapter_up_t.zero_()  # W_up = 0 while s_up and A keep t_up's gradient alive
        else:  # a random start (tests, or users who want one): a visible but small change
            self.adapter_up_t.normal_(std=0.02)
            if self.adapter_up_bias is not None:
                self.adapter_up_bias.normal_(std=0.02)

    # -- sharing ----------------------------------------------------------------------------
    @property
    def needs_rule(self) -> bool:
        return self._phm[2] and SHARED_RULE not in self._parameters

    def share_rule(self, rule: nn.Parameter, keeper: bool) -> None:
        """Use ``rule`` (the one ``A`` of the injection). The keeper saves it as a slot; the
        others hold the same Parameter (deduplicated by ``model.parameters()``) and save nothing."""
        self.phm_rule = rule
        self.slots = tuple(s for s in self.slots if s != SHARED_RULE) + ((SHARED_RULE,) if keeper else ())

    def rules(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._phm[2]:
            return self.phm_rule, self.phm_rule
        return self.adapter_down_rule, self.adapter_up_rule

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense PHM weights ``(W_down (m x d_in), W_up (d_out x m))``."""
        down_rule, up_rule = self.rules()
        return (phm_weight(down_rule.to(self.dtype), self.adapter_down_s, self.adapter_down_t),
                phm_weight(up_rule.to(self.dtype), self.adapter_up_s, self.adapter_up_t))

    def down(self, x: torch.Tensor) -> torch.Tensor:
        rule = self.rules()[0].to(self.dtype)
        return nn.functional.linear(x, phm_weight(rule, self.adapter_down_s, self.adapter_down_t), self.adapter_down_bias)

    def up(self, h: torch.Tensor) -> torch.Tensor:
        rule = self.rules()[1].to(self.dtype)
        return nn.functional.linear(h, phm_weight(rule, self.adapter_up_s, self.adapter_up_t), self.adapter_up_bias)


@METHODS.register("compacter")
class Compacter(BottleneckMethod):
    name = "compacter"
    config_cls = CompacterConfig
    roles: ClassVar[tuple[str, ...]] = ("attn_out", "ffn_out")
    site_cls = CompacterSite

    @classmethod
    def make_site(cls, info, config: CompacterConfig, options: dict[str, Any]):
        site = super().make_site(info, config, options)
        if isinstance(site, CompacterSite) and site.needs_rule:  # built alone: a sharing group of one
            site.share_rule(new_rule(config.phm_dim, site.dtype, site.adapter_down_s.device), keeper=True)
        return site

    @classmethod
    def make_sites(cls, infos: list, config: CompacterConfig, options: dict[str, dict[str, Any]]) -> list:
        sites = []
        for info in infos:  # the bottleneck's per-site build, without make_site's private A
            sites.append(super().make_site(info, config, options.get(info.name, {})))
        # the bottleneck's ``shared``/``connected`` first: with no A among the slots yet, a group of
        # shared sites compares (and shares) only its own tensors
        sites = cls.link_sites(infos, sites, config)
        phm = [s for s in sites if isinstance(s, CompacterSite) and s.needs_rule]
        if phm:  # the one A of this injection, built once
            rule = new_rule(config.phm_dim, phm[0].dtype, phm[0].adapter_down_s.device)
            for k, site in enumerate(phm):
                site.share_rule(rule, keeper=k == 0)
        return sites
