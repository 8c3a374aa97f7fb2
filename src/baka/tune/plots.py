"""Pictures of block figures: the 26 blocks drawn as the U-Net's U (IN00-IN11 down the left, M00 at
the bottom, OUT00-OUT11 back up the right, BASE on top), one U per figure, and a score-per-trial plot."""

from __future__ import annotations

from pathlib import Path

from baka.models.blocks import BLOCK_IDS

CELL_W, CELL_H = 56, 26


def _u_position(block: str) -> tuple[int, int]:
    """(column, row) of a block in the U: 3 columns, 14 rows."""
    if block == "BASE":
        return 1, 0
    if block == "M00":
        return 1, 13
    n = int(block[-2:])
    return (0, 1 + n) if block.startswith("IN") else (2, 12 - n)


def _color(v: float, vmax: float) -> tuple[int, int, int]:
    t = max(-1.0, min(1.0, v / vmax)) if vmax else 0.0
    if t >= 0:  # white -> red for positive, white -> blue for negative
        return 255, int(255 * (1 - t)), int(255 * (1 - t))
    return int(255 * (1 + t)), int(255 * (1 + t)), 255


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    return f"{v:+.3f}" if abs(v) >= 0.01 else f"{v:+.1e}"


def u_panels(panels: list[tuple[str, dict[str, float]]], title: str = ""):
    """One U of coloured block cells per (label, {block: value}) panel; each panel has its own scale
    (signed: red up, blue down), values printed in the cells."""
    from PIL import Image, ImageDraw

    pw, ph, top = 3 * CELL_W + 16, 14 * CELL_H + 24, 22
    img = Image.new("RGB", (max(1, len(panels)) * pw + 8, ph + top + 8), "white")
    d = ImageDraw.Draw(img)
    d.text((6, 4), title, fill="black")
    for i, (label, values) in enumerate(panels):
        x0, y0 = 8 + i * pw, top
        d.text((x0, y0), label[:22], fill="black")
        vmax = max((abs(v) for v in values.values()), default=0.0)
        for block in BLOCK_IDS:
            col, row = _u_position(block)
            x, y = x0 + col * CELL_W, y0 + 14 + row * CELL_H
            v = values.get(block)
            fill = _color(v, vmax) if v is not None else (235, 235, 235)
            d.rectangle([x, y, x + CELL_W - 2, y + CELL_H - 2], fill=fill, outline=(190, 190, 190))
            dark = v is not None and vmax > 0 and abs(v) / vmax > 0.6
            d.text((x + 2, y + 1), block, fill="white" if dark else (90, 90, 90))
            if v is not None:
                d.text((x + 2, y + 12), _fmt(v), fill="white" if dark else "black")
    return img


def trials_plot(values: list[float | None], best: list[float], title: str = ""):
    """Score per trial (dots) and the best so far (line)."""
    from PIL import Image, ImageDraw

    w, h, m = 520, 260, 36
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((m, 6), title, fill="black")
    done = [v for v in values if v is not None]
    if not done:
        return img
    lo, hi = min(done), max(done)
    span = (hi - lo) or 1.0

    def xy(i: int, v: float) -> tuple[float, float]:
        x = m + (w - 2 * m) * (i / max(1, len(values) - 1))
        return x, h - m - (h - 2 * m) * (v - lo) / span

    d.rectangle([m, m, w - m, h - m], outline=(160, 160, 160))
    for i, v in enumerate(values):
        if v is not None:
            x, y = xy(i, v)
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(60, 60, 200))
    d.line([xy(i, v) for i, v in enumerate(best)], fill=(200, 40, 40), width=2)
    d.text((4, m - 6), f"{hi:.3g}", fill="black")
    d.text((4, h - m - 6), f"{lo:.3g}", fill="black")
    d.text((w - m - 40, h - m + 8), f"trial {len(values) - 1}", fill="black")
    return img


def save_png(img, path: str | Path) -> Path:
    from baka.models.safetensors_io import atomic_output

    with atomic_output(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


__all__ = ["save_png", "trials_plot", "u_panels"]
