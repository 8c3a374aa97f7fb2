"""Per-block comparison of two models: cosine similarity and relative change ``|B - A| / |A|``.

Streams key by key (memory-mapped inputs); sums are accumulated in fp64 per block.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from baka.models.blocks import BLOCK_IDS, block_of
from baka.models.sources import open_source


@dataclass
class BlockStats:
    block: str
    keys: int
    cosine: float
    rel_change: float


def block_diff(path_a: str | Path, path_b: str | Path, *, progress: bool = False) -> list[BlockStats]:
    dot = dict.fromkeys(BLOCK_IDS, 0.0)
    na = dict.fromkeys(BLOCK_IDS, 0.0)
    nb = dict.fromkeys(BLOCK_IDS, 0.0)
    nd = dict.fromkeys(BLOCK_IDS, 0.0)
    count = dict.fromkeys(BLOCK_IDS, 0)
    with contextlib.ExitStack() as st:
        sa = st.enter_context(open_source(path_a))
        sb = st.enter_context(open_source(path_b))
        spec_b = sb.specs()
        for k in tqdm(sa.keys(), desc="diff", disable=not progress, leave=False):
            blk = block_of(k)
            if blk is None or k not in spec_b:
                continue
            a = sa.get(k)
            if not a.is_floating_point():
                continue
            a = a.double().flatten()
            b = sb.get(k).double().flatten()
            dot[blk] += float(a @ b)
            na[blk] += float(a @ a)
            nb[blk] += float(b @ b)
            nd[blk] += float(torch.sum((b - a) ** 2))
            count[blk] += 1
    out = []
    for blk in BLOCK_IDS:
        den = (na[blk] * nb[blk]) ** 0.5
        out.append(
            BlockStats(
                blk,
                count[blk],
                dot[blk] / den if den else 1.0,
                (nd[blk] / na[blk]) ** 0.5 if na[blk] else 0.0,
            )
        )
    return out


def format_table(stats: list[BlockStats]) -> str:
    lines = [f"{'block':<6} {'keys':>5} {'cosine':>10} {'rel.change':>11}"]
    lines += [f"{s.block:<6} {s.keys:>5} {s.cosine:>10.6f} {s.rel_change:>11.6f}" for s in stats]
    return "\n".join(lines)


def heatmap_png(stats: list[BlockStats], path: str | Path, title: str = "") -> Path:
    """Two-row heatmap (relative change, 1 - cosine) over the 26 blocks, with labels and values."""
    from PIL import Image, ImageDraw

    cell_w, cell_h, left, top = 44, 36, 90, 40
    rows = [("rel.change", [s.rel_change for s in stats]), ("1-cosine", [1 - s.cosine for s in stats])]
    img = Image.new("RGB", (left + cell_w * len(stats) + 10, top + cell_h * len(rows) + 40), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 8), title or "block diff", fill="black")
    for r, (label, vals) in enumerate(rows):
        vmax = max(vals) or 1.0
        y = top + r * cell_h
        d.text((8, y + cell_h // 2 - 6), label, fill="black")
        for i, v in enumerate(vals):
            x = left + i * cell_w
            t = max(0.0, min(1.0, v / vmax))
            color = (255, int(255 * (1 - t)), int(255 * (1 - t)))  # white -> red
            d.rectangle([x, y, x + cell_w - 2, y + cell_h - 2], fill=color, outline=(200, 200, 200))
            d.text((x + 3, y + cell_h // 2 - 6), f"{v:.3g}", fill="black")
    for i, s in enumerate(stats):
        d.text((left + i * cell_w + 3, top + cell_h * len(rows) + 6), s.block, fill="black")
    from baka.models.safetensors_io import atomic_output

    with atomic_output(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)
