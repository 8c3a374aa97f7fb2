"""Danbooru-style caption handling as kohya does it: tags split on the separator, the first
``keep_tokens`` tags stay in place, the rest may be shuffled and dropped; the whole caption may be
dropped (unconditional training)."""

from __future__ import annotations

import random


def process_caption(
    caption: str,
    rng: random.Random,
    *,
    keep_tokens: int = 0,
    shuffle: bool = False,
    tag_dropout: float = 0.0,
    caption_dropout: float = 0.0,
    separator: str = ",",
) -> str:
    if caption_dropout > 0 and rng.random() < caption_dropout:
        return ""
    tags = [t.strip() for t in caption.split(separator) if t.strip()]
    fixed, rest = tags[:keep_tokens], tags[keep_tokens:]
    if tag_dropout > 0:
        rest = [t for t in rest if rng.random() >= tag_dropout]
    if shuffle:
        rng.shuffle(rest)
    return (separator + " ").join(fixed + rest)
