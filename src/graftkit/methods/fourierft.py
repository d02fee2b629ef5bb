"""FourierFT: the weight delta as a sparse spectrum, learned in the frequency domain.

Gao et al., 2024 ("Parameter-Efficient Fine-Tuning with Discrete Fourier Transform", ICML 2024,
arXiv:2405.03003) learn ``n`` spectral coefficients ``c`` per adapted (out, in) weight at fixed random
frequencies and take the real part of the inverse 2-D discrete Fourier transform as the delta::

    F = zeros(out, in);   F[E_0, E_1] = c                       (E: n random entries, shared seed)
    delta_W = scaling * Re(IDFT2(F))      IDFT2(F)[j, k] = 1/(out in) sum_{u,v} F[u, v] e^{2 pi i (u j / out + v k / in)}

The entries ``E`` are the first ``n`` of ``randperm(out * in)`` drawn from a generator seeded with
``random_loc_seed`` (peft's rule, row-major: entry ``e`` is row ``e // in``, column ``e % in``), so
only ``c`` is trained and saved: ``n`` numbers per layer, against LoRA's r (out + in).
``scaling`` plays the part of LoRA's alpha (the paper: 100-150 for RoBERTa on GLUE, 300 for LLaMA).
As in the paper and peft, ``c`` starts from N(0, 1) (``init_weights: false``, the default), so the
start is NOT the base model; ``init_weights: true`` starts from zero (the identity).

Layers: Linear and GPT-2's ``Conv1D`` (the canonical (out, in) view of :mod:`graftkit.layers`, as
peft's fan_in_fan_out), as in peft. peft's ``FOURIERFT`` folders convert both ways: the spectrum
keeps its name (``fourierft_spectrum``); peft's ``bias`` other than "none" (training biases too) is
refused by name.
"""
from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import torch
from pydantic import Field, field_validator
from torch import nn

from ..errors import AdapterError, ConfigError, FileFormatError, UnsupportedError
from ..layers import matrix_shape
from ..registry import METHODS
from ..targets import ParamInfo
from .base import MethodConfig, PeftConverter
from .loha import PEFT_COMMON, bad_pattern_key, refuse_unknown
from .weight_delta import WeightDeltaMethod, WeightDeltaSite

SLOT = "fourierft_spectrum"


class FourierFTConfig(MethodConfig):
    n_frequency: int = Field(1000, ge=1)
    scaling: float = 150.0
    random_loc_seed: int = 777
    init_weights: bool = False
    # per-module n_frequency, keyed by a regex matched against the end of the module name (peft's rule)
    n_frequency_pattern: dict[str, int] = Field(default_factory=dict)

    @field_validator("n_frequency_pattern")
    @classmethod
    def _regex_keys(cls, value):
        bad = bad_pattern_key(value)
        if bad:
            raise ValueError(f"{bad}; fix it")
        return value


def pattern_n(patterns: Mapping[str, int], module: str, default: int) -> int:
    """peft's lookup: the first key ``k`` with ``.*\\.k$`` matching the module name, else the name itself."""
    key = next((k for k in patterns if re.match(rf".*\.{k}$", module)), module)
    return int(patterns.get(key, default))


@lru_cache(maxsize=512)
def spectral_entries(out_f: int, in_f: int, n: int, seed: int) -> torch.Tensor:
    """The (2, n) rows and columns of the learned frequencies (CPU; cached: a pure function of its arguments)."""
    flat = torch.randperm(out_f * in_f, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([flat // in_f, flat % in_f])


def fourier_formula(kind: str, weight: torch.Tensor, slots: Mapping[str, torch.Tensor], settings: Mapping[str, Any]) -> torch.Tensor:
    """``scaling * Re(IDFT2(spectrum scattered at the seeded entries))``, (out, in) float32."""
    c = slots[SLOT]
    out_f, in_f = matrix_shape(kind, weight.shape)
    rows, cols = spectral_entries(out_f, in_f, c.shape[0], int(settings["random_loc_seed"])).to(c.device)
    dense = torch.zeros(out_f, in_f, device=c.device, dtype=torch.float32)
    dense = dense.index_put((rows, cols), c.float())
    return torch.fft.ifft2(dense).real * float(settings["scaling"])


class FourierFTSite(WeightDeltaSite):
    slots = (SLOT,)
    formula = staticmethod(fourier_formula)

    def __init__(self, info: ParamInfo, kind: str, settings: Mapping[str, Any]):
        super().__init__(info, kind, settings)
        n = int(self.settings["n_frequency"])
        if n > self.out_features * self.in_features:
            raise ConfigError(f"FourierFTConfig: n_frequency={n} for {info.name} exceeds its {self.out_features} x {self.in_features} = "
                              f"{self.out_features * self.in_features} entries; lower n_frequency (or its n_frequency_pattern)")
        spectrum = torch.zeros(n, dtype=self.dtype, device=info.param.device)
        if not self.settings.get("init_weights"):
            spectrum.normal_()  # the paper's and peft's start: N(0, 1) coefficients
        self.fourierft_spectrum = nn.Parameter(spectrum)


def _check_saved(adapter, name: str, options: dict, where: str) -> None:
    from ..validate import saved_tensor

    c = saved_tensor(adapter, f"{name}.{SLOT}", where)
    if c.dim() != 1:
        raise AdapterError(f"{where}: adapter tensor {name}.{SLOT} has shape {tuple(c.shape)}; a FourierFT spectrum is 1-D - the file is corrupt")
    n = options.get("n_frequency")
    if n is not None and n != c.shape[0]:
        raise AdapterError(f"{where}: adapter.json says n_frequency={n!r} for {name} but {name}.{SLOT} holds {c.shape[0]} "
                           "coefficients; the file is corrupt or mixes two adapters")


def _saved_shapes(adapter, name: str, kind: str, base_shape: tuple, feedforward: bool = False) -> dict[str, tuple]:
    n = adapter.tensors[f"{name}.{SLOT}"].shape[0]
    out_f, in_f = matrix_shape(kind, base_shape)
    if n > out_f * in_f:
        raise AdapterError(f"adapter tensor {name}.{SLOT} holds {n} coefficients but the base weight {name} {tuple(base_shape)} has only "
                           f"{out_f * in_f} entries; the adapter was made for another base model")
    return {f"{name}.{SLOT}": (n,)}


FOURIER_KEYS = {"n_frequency", "scaling", "random_loc_seed", "init_weights", "n_frequency_pattern", "bias"}


def _peft_read(cfg: dict, raw: dict, path: Path):
    from ..io.native import AdapterFile
    from ..io.peft import CONFIG_NAME, WEIGHTS_NAME, _common_config, _heads, _meta, _number

    bias = cfg.get("bias", "none")
    if bias not in ("none", None):
        raise UnsupportedError(f"this peft FOURIERFT adapter uses bias={bias!r} (it trains biases too), which graftkit does not support; "
                               "supported: bias='none'")
    refuse_unknown(cfg, PEFT_COMMON | FOURIER_KEYS, "FOURIERFT")
    seed = cfg.get("random_loc_seed", 777)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise FileFormatError(f"{path / CONFIG_NAME}: random_loc_seed is {seed!r}; it must be an integer (it places the frequencies) - fix the file")
    n0 = _number(cfg, "n_frequency", 1000, path, integer=True, low=1)
    scaling = _number(cfg, "scaling", 150.0, path)
    spectra = {k[: -len(f".{SLOT}")]: v for k, v in raw.items() if k.endswith(f".{SLOT}")}
    if not spectra:
        raise FileFormatError(f"{path / WEIGHTS_NAME} holds no FourierFT tensors")
    heads, tensors = _heads(raw, {f"{m}.{SLOT}" for m in spectra})
    pattern = cfg.get("n_frequency_pattern") or {}
    if not isinstance(pattern, dict):
        raise FileFormatError(f"{path / CONFIG_NAME}: n_frequency_pattern is {pattern!r}; it must map module patterns to integers")
    if bad_pattern_key(pattern):
        raise FileFormatError(f"{path / CONFIG_NAME}: n_frequency_pattern {bad_pattern_key(pattern)} - fix the file")
    targets, options, kinds = [], {}, {}
    for module, c in sorted(spectra.items()):
        n = pattern_n(pattern, module, n0)
        if c.dim() != 1 or c.shape[0] != n:
            raise FileFormatError(f"{path / WEIGHTS_NAME}: {module}.{SLOT} has shape {tuple(c.shape)} but adapter_config.json gives it "
                                  f"n_frequency={n}; the file is corrupt or mixes two adapters")
        name = f"{module}.weight"
        targets.append(name)
        options[name] = {"n_frequency": n}
        kinds[name] = "conv1d" if cfg.get("fan_in_fan_out") else "linear"
        tensors[f"{name}.{SLOT}"] = c.contiguous()
    config = {**_common_config(cfg, heads), "n_frequency": n0, "scaling": scaling, "random_loc_seed": seed,
              "init_weights": False, "n_frequency_pattern": pattern}
    meta = _meta("fourierft", config, targets, options, heads, cfg, path)
    meta["target_kinds"] = kinds
    return AdapterFile(meta, tensors)


def _peft_write_site(site, key: str, tensors: dict, acc: dict) -> None:
    from ..io.peft import PREFIX

    tensors[f"{key}.{SLOT}"] = site.fourierft_spectrum.detach().cpu()
    acc.setdefault("n", {})[key[len(PREFIX):]] = int(site.settings["n_frequency"])


def _peft_write_config(state, acc: dict) -> dict:
    n = acc.get("n", {})
    n0 = Counter(n.values()).most_common(1)[0][0]
    c = state.config
    # a key equal to the module's full name is peft's fallback lookup: it selects exactly that module
    return {"n_frequency": n0, "scaling": c.scaling, "random_loc_seed": c.random_loc_seed, "init_weights": c.init_weights,
            "bias": "none", "n_frequency_pattern": {m: v for m, v in n.items() if v != n0}}


@METHODS.register("fourierft")
class FourierFT(WeightDeltaMethod):
    name = "fourierft"
    config_cls = FourierFTConfig
    site_cls = FourierFTSite
    kinds = ("linear", "conv1d")
    #: the default start is N(0, 1) coefficients (the paper's and peft's); ``init_weights: true`` is the identity
    identity_at_init = False
    check_saved = staticmethod(_check_saved)
    saved_shapes = staticmethod(_saved_shapes)
    peft = PeftConverter("FOURIERFT", _peft_read, _peft_write_site, _peft_write_config)

    @classmethod
    def identity_for(cls, config: Any) -> bool:
        data = config.model_dump() if isinstance(config, MethodConfig) else dict(config)
        return bool(data.get("init_weights", False))

    @classmethod
    def site_options(cls, config: FourierFTConfig, info: ParamInfo) -> dict[str, Any]:
        return {"n_frequency": pattern_n(config.n_frequency_pattern, info.module_name, config.n_frequency)}
