"""Named registries (merge methods, presets, samplers, erase methods...).

Registration is by decorator; a duplicate name is rejected and an unknown name gets the nearest
registered names as suggestions.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from baka.errors import BakaError

T = TypeVar("T")


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


class Registry(Generic[T]):
    """A case-insensitive name -> item table. Names compare with '-', ' ' and '_' treated alike."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._names: dict[str, str] = {}  # normalised -> name as registered

    def add(self, name: str, item: T, aliases: tuple[str, ...] = ()) -> T:
        names = {_norm(n): n for n in reversed((name, *aliases))}  # spellings of one name count once
        for key, n in reversed(names.items()):
            if key in self._items:
                raise BakaError(
                    f"duplicate {self.kind} name {n!r} (already registered as {self._names[key]!r})"
                )
            self._items[key] = item
            self._names[key] = name
        return item

    def register(self, name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        def deco(item: T) -> T:
            return self.add(name, item, aliases)

        return deco

    def get(self, name: str) -> T:
        key = _norm(name)
        if key in self._items:
            return self._items[key]
        close = difflib.get_close_matches(key, list(self._items), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(self._names[c]) for c in close)}?" if close else ""
        raise BakaError(f"unknown {self.kind} {name!r}{hint} (see the list of {self.kind}s)")

    def canonical(self, name: str) -> str:
        self.get(name)
        return self._names[_norm(name)]

    def __contains__(self, name: str) -> bool:
        return _norm(name) in self._items

    def names(self) -> list[str]:
        """Registered primary names (aliases excluded), in registration order."""
        seen: list[str] = []
        for n in self._names.values():
            if n not in seen:
                seen.append(n)
        return seen

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())
