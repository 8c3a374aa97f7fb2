"""Named registries (merge methods, presets, samplers, erase methods...).

Registration is by decorator; a duplicate name is rejected and an unknown name gets the nearest
registered names as suggestions.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Generic, TypeVar

from baka.errors import BakaError

T = TypeVar("T")


def norm_name(name: str) -> str:
    """The spelling names compare by: case, '-', ' ' and '_' do not matter."""
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def did_you_mean(name: str, names: Iterable[str] | Mapping[str, str]) -> str:
    """ "; did you mean 'a', 'b'?" for the (up to three) of ``names`` nearest ``name``, else "". A
    mapping gives each spelling the name to show (an alias suggests its primary name)."""
    pairs = names.items() if isinstance(names, Mapping) else ((n, n) for n in names)
    known = {norm_name(k): v for k, v in pairs}
    close = difflib.get_close_matches(norm_name(name), list(known), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(repr(known[c]) for c in close)}?" if close else ""


class Registry(Generic[T]):
    """A case-insensitive name -> item table. Names compare with '-', ' ' and '_' treated alike."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._names: dict[str, str] = {}  # normalised -> name as registered

    def add(self, name: str, item: T, aliases: tuple[str, ...] = ()) -> T:
        names = {norm_name(n): n for n in reversed((name, *aliases))}  # spellings of one name count once
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
        key = norm_name(name)
        if key in self._items:
            return self._items[key]
        hint = did_you_mean(name, self._names)
        raise BakaError(f"unknown {self.kind} {name!r}{hint} (see the list of {self.kind}s)")

    def canonical(self, name: str) -> str:
        self.get(name)
        return self._names[norm_name(name)]

    def __contains__(self, name: str) -> bool:
        return norm_name(name) in self._items

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
