"""Config parsing shared by every schema: strict keys, one-line errors.

All configs are pydantic models with ``extra="forbid"``. Pydantic's own error text spans
several lines and does not list the accepted keys, so :func:`parse_config` turns the first
problem into one line that names the key, what was wrong, and the keys that are accepted.
"""
from __future__ import annotations

import difflib
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError

C = TypeVar("C", bound=BaseModel)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)

    def __init__(self, **data: Any):
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(type(self), exc)) from None


def accepted_keys(cls: type[BaseModel]) -> list[str]:
    return sorted(cls.model_fields)


def describe_validation_error(cls: type[BaseModel], exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(config)"
    accepted = accepted_keys(cls)
    if err["type"] == "extra_forbidden":
        key = str(err["loc"][-1])
        close = difflib.get_close_matches(key, accepted, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{cls.__name__}: unknown key {loc!r}{hint}; accepted keys: {', '.join(accepted)}"
    msg = err["msg"]
    if err["type"] == "missing":
        return f"{cls.__name__}: missing required key {loc!r}; accepted keys: {', '.join(accepted)}"
    value = err.get("input")
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{cls.__name__}: bad value {shown} for {loc!r}: {msg}"


def parse_config(cls: type[C], data: Any) -> C:
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected a mapping of keys to values, got {type(data).__name__}")
    return cls(**data)


def read_yaml(path, what: str) -> Any:
    """Load a recipe's YAML file (train, merge, eval, study); every bad file is one ConfigError line
    (see :func:`graftkit.files.read_yaml`: missing, a folder or FIFO, empty, not UTF-8, bad syntax)."""
    from .files import read_yaml as read

    return read(path, what, ConfigError)
