"""Elemental merge overrides, supermerger style: one rule per line (or ``,``-separated),
``Blocks:Elements:Ratio``.

- Blocks: space-separated block ids (``IN05 OUT02``); empty means all; a leading ``NOT`` inverts.
- Elements: space-separated substrings of the key (``attn2 norm``); empty means all; ``NOT`` inverts.
- Ratio: the alpha used for the matching keys instead of their block's.

Rules are applied in order; the last matching rule wins.
"""

from __future__ import annotations

from dataclasses import dataclass

from baka.errors import BakaError
from baka.models.blocks import parse_block_id


@dataclass(frozen=True)
class Rule:
    blocks: frozenset[str]
    not_blocks: bool
    elements: tuple[str, ...]
    not_elements: bool
    ratio: float
    text: str

    def matches(self, block: str | None, key: str) -> bool:
        in_blocks = not self.blocks or block in self.blocks
        if self.not_blocks:
            in_blocks = not in_blocks
        hit = not self.elements or any(e in key for e in self.elements)
        if self.not_elements:
            hit = not hit
        return in_blocks and hit


def _split_not(words: list[str]) -> tuple[bool, list[str]]:
    if words and words[0].upper() == "NOT":
        return True, words[1:]
    return False, words


def parse_rules(text: str | None) -> list[Rule]:
    rules = []
    for raw in (text or "").replace(",", "\n").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) != 3:
            raise BakaError(
                f"bad elemental rule {line!r}; write Blocks:Elements:Ratio, e.g. IN05 OUT02:attn2:0.3"
            )
        not_b, blocks = _split_not(parts[0].split())
        not_e, elements = _split_not(parts[1].split())
        try:
            ratio = float(parts[2])
        except ValueError:
            raise BakaError(f"bad elemental rule {line!r}: ratio {parts[2]!r} is not a number") from None
        rules.append(
            Rule(frozenset(parse_block_id(b) for b in blocks), not_b, tuple(elements), not_e, ratio, line)
        )
    return rules


def override(rules: list[Rule], block: str | None, key: str, alpha: float) -> float:
    for r in rules:
        if r.matches(block, key):
            alpha = r.ratio
    return alpha
