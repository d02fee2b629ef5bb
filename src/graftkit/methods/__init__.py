"""Tuning methods: one file each, registered in graftkit.registry.METHODS on import."""
from . import bitfit, full, ia3, lora  # noqa: F401  (registration)
from .bitfit import BitFitConfig
from .full import FullConfig
from .ia3 import IA3Config
from .lora import LoRAConfig

__all__ = ["LoRAConfig", "IA3Config", "BitFitConfig", "FullConfig"]
