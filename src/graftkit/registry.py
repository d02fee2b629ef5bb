"""Name -> implementation registries, one per kind (tuning methods, merge methods, metrics).

Registration happens at import through a decorator; a second registration under the same
name is a programming error and fails the import, so two files can never silently shadow
each other.
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from .errors import UnsupportedError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(obj: T) -> T:
            if name in self._items:
                raise RuntimeError(f"duplicate {self.kind} name {name!r}: already registered by {self._items[name]!r}")
            self._items[name] = obj
            return obj

        return decorate

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UnsupportedError(
                f"unknown {self.kind} {name!r}{hint}; available: {', '.join(sorted(self._items))}"
            ) from None

    def unregister(self, name: str) -> T:
        """Remove ``name`` (a method defined by a test or a plugin, gone again at its teardown)."""
        return self._items.pop(name)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))


METHODS: Registry = Registry("tuning method")
MERGES: Registry = Registry("merge method")  # name -> graftkit.merge._common.MergeMethod
