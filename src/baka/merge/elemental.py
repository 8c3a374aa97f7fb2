"""Elemental merge overrides, supermerger style: one rule per line (or ``,``- / ``;``-separated: a
grid axis value cannot hold commas),
``Blocks:Elements:Ratio``.

- Blocks: space-separated block ids (``IN05 OUT02``) or inclusive ranges in block order, either way
  round (``IN05-OUT02``); empty means all; a leading ``NOT`` inverts.
- Elements: space-separated substrings of the key (``attn2 norm``); empty means all; ``NOT`` inverts.
- Ratio: the alpha used for the matching keys instead of their block's; supermerger's random ``R``,
  ``U``, ``X`` draw it per key from the merge seed (r = the stream's value at the key's index in A
  plus 100: R = r, U = 1 - 2r, X = 1 - r, rounded to 3 digits).

Rules are applied in order; the last matching rule wins.
"""

from __future__ import annotations

from dataclasses import dataclass

from baka.errors import BakaError
from baka.models.blocks import BLOCK_IDS, BLOCK_INDEX, parse_block_id


@dataclass(frozen=True)
class Rule:
    blocks: frozenset[str]
    not_blocks: bool
    elements: tuple[str, ...]
    not_elements: bool
    ratio: float | str  # a number, or R / U / X
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
    for raw in (text or "").replace(",", "\n").replace(";", "\n").splitlines():
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
        ratio: float | str = parts[2].strip().upper()
        if ratio not in RANDOM_RATIOS:
            try:
                ratio = float(parts[2])
            except ValueError:
                raise BakaError(
                    f"bad elemental rule {line!r}: ratio {parts[2]!r} is not a number (or R, U, X)"
                ) from None
        ids = frozenset(b for tok in blocks for b in _block_range(tok))
        rules.append(Rule(ids, not_b, tuple(elements), not_e, ratio, line))
    return rules


def _block_range(token: str) -> list[str]:
    if "-" not in token:
        return [parse_block_id(token)]
    first, _, last = token.partition("-")
    i, j = sorted((BLOCK_INDEX[parse_block_id(first)], BLOCK_INDEX[parse_block_id(last)]))
    return list(BLOCK_IDS[i : j + 1])


RANDOM_RATIOS = {
    "R": lambda r: round(r, 3),
    "U": lambda r: round(1 - 2 * r, 3),  # not the block weights' 1.5 - 2r: supermerger's own
    "X": lambda r: round((0.0 - 1.0) * r + 1.0, 3),
}
ELEMENTAL_OFFSET = 100


def override(
    rules: list[Rule], block: str | None, key: str, alpha: float, index: int = 0, seed: int = 0
) -> float:
    """The alpha of ``key`` after the rules (the last match wins); ``index``: the key's position in
    model A, for random ratios."""
    for r in rules:
        if r.matches(block, key):
            if isinstance(r.ratio, str):
                from baka.merge.weights import randomer

                alpha = RANDOM_RATIOS[r.ratio](float(randomer(seed)[index + ELEMENTAL_OFFSET]))
            else:
                alpha = r.ratio
    return alpha
