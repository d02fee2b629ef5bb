"""Tuning methods: one file each, registered in graftkit.registry.METHODS on import."""
from . import bitfit, compacter, compacter_pp, compose, full, houlsby, ia3, ln_tuning, lora, parallel_adapter, pfeiffer  # noqa: F401  (registration)
from . import prompt_tuning  # noqa: F401  (registration)
from . import p_tuning  # noqa: F401  (registration)
from . import prefix_tuning  # noqa: F401  (registration)
from . import p_tuning_v2  # noqa: F401  (registration)
from . import iapt  # noqa: F401  (registration)
from . import loha  # noqa: F401  (registration)
from . import lokr  # noqa: F401  (registration)
from . import fourierft  # noqa: F401  (registration)
from . import greentrainer  # noqa: F401  (registration)
from . import dsee  # noqa: F401  (registration)
from . import subspace  # noqa: F401  (registration)
from . import flora  # noqa: F401  (registration)
from . import adalora  # noqa: F401  (registration)
from . import light_peft  # noqa: F401  (registration)
from . import vera  # noqa: F401  (registration)
from . import deft  # noqa: F401  (registration)
from . import oft, boft  # noqa: F401  (registration)
from . import apet, diff_pruning, lt_sft  # noqa: F401  (registration)
from . import meteora  # noqa: F401  (registration)
from .bitfit import BitFitConfig
from .full import FullConfig
from .ia3 import IA3Config
from .lora import LoRAConfig

__all__ = ["LoRAConfig", "IA3Config", "BitFitConfig", "FullConfig"]


def method_named(name: object):
    """The registered tuning method called ``name``, or None: importing this package registers the
    built-in methods, so callers asking about capabilities never see an empty registry."""
    from ..registry import METHODS

    return METHODS.get(name) if isinstance(name, str) and name in METHODS else None


def registered_methods() -> list:
    """Every registered tuning method, by name."""
    from ..registry import METHODS

    return [METHODS.get(n) for n in METHODS]
