"""Per-block dropout schedules: for each of the 26 blocks, a probability over training steps that the
block rests for a step (its LoRA modules are bypassed, or in a full fine-tune its parameters get no
optimizer update). Written ``{"OUT05": "0:0, 500:0.5, 1000:0"}``: (step, probability) points,
linearly interpolated, held constant outside. Decisions come from a generator seeded by (seed, step),
identical on every process and on resume."""

from __future__ import annotations

import hashlib

import torch

from baka.errors import BakaError
from baka.models.blocks import parse_block_id


def parse_schedules(spec: dict[str, str]) -> dict[str, list[tuple[int, float]]]:
    out = {}
    for block, text in spec.items():
        points = []
        for part in str(text).split(","):
            if not part.strip():
                continue
            step, sep, p = part.partition(":")
            try:
                points.append((int(step), float(p)) if sep else (0, float(step)))
            except ValueError:
                raise BakaError(
                    f"block_dropout {block}: bad point {part.strip()!r}; write STEP:P, e.g. 0:0.5"
                ) from None
        if not points or any(not 0 <= p <= 1 for _, p in points):
            raise BakaError(f"block_dropout {block}: probabilities must be in [0, 1]")
        out[parse_block_id(block)] = sorted(points)
    return out


def probability(points: list[tuple[int, float]], step: int) -> float:
    if step <= points[0][0]:
        return points[0][1]
    for (s0, p0), (s1, p1) in zip(points, points[1:], strict=False):
        if step <= s1:
            return p0 + (p1 - p0) * (step - s0) / max(1, s1 - s0)
    return points[-1][1]


def resting_blocks(schedules: dict[str, list[tuple[int, float]]], step: int, seed: int) -> set[str]:
    if not schedules:
        return set()
    h = hashlib.sha256(f"block-dropout:{seed}:{step}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))
    draws = torch.rand(len(schedules), generator=g).tolist()
    return {
        b for (b, pts), u in zip(sorted(schedules.items()), draws, strict=True) if u < probability(pts, step)
    }
