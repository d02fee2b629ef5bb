"""One exception family. Every message says what is wrong and what to do, on one line."""
from __future__ import annotations


class GraftError(Exception):
    """Base of every error graftkit raises on purpose (bad input, bad files, misuse)."""

    exit_code = 2


class ConfigError(GraftError):
    """A config has an unknown, mistyped or out-of-range key."""


class TargetError(GraftError):
    """A target pattern selects nothing, or selects something the method cannot adapt."""


class AdapterError(GraftError):
    """Adapter state misuse: double injection, no adapter, wrong base model."""


class FileFormatError(GraftError):
    """A file or folder is missing, truncated, corrupt, or in a format we refuse to read."""


class UnsupportedError(GraftError):
    """A valid request for something graftkit does not implement (says what it does implement)."""


class TrainingError(GraftError):
    """A training run cannot go on (non-finite loss, output folder holding another run, bad resume)."""


class EvalError(GraftError):
    """An evaluation cannot run as asked (no head for a task, a label the head does not know, bad task data)."""
