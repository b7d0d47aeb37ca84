"""Named registries (attacks, models, ...): one mechanism instead of a copy per kind."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to entries; unknown names raise ValueError listing the known ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # used in messages: "unknown {kind} 'x' (known: ...)"
        self._items: dict[str, T] = {}
        # Read-only live view: `name in view`, `sorted(view)` give the known names.
        self.view: Mapping[str, T] = MappingProxyType(self._items)

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding an entry under `name`; a second entry of one name is an error."""

        def wrap(entry: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._items[name] = entry
            return entry

        return wrap

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ValueError(f"unknown {self.kind} '{name}' (known: {', '.join(sorted(self._items))})")
        return self._items[name]
