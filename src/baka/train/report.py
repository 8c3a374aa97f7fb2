"""The run's report: ``losses.json`` and the loss plot ``loss.png``."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(out_dir: Path, losses: list[float], val: list[tuple[int, float]]) -> None:
    loss_plot(out_dir / "loss.png", losses, val)
    (out_dir / "losses.json").write_text(json.dumps({"train": losses, "val": val}))


def moving_average(values: list[float], k: int) -> list[float]:
    """Mean of each value and the up to ``k`` before it."""
    return [
        sum(values[max(0, i - k) : i + 1]) / len(values[max(0, i - k) : i + 1]) for i in range(len(values))
    ]


def loss_plot(path: Path, losses: list[float], val: list[tuple[int, float]]) -> None:
    """Training loss (light: raw, dark: moving average) and validation loss (red dots) over steps."""
    from PIL import Image, ImageDraw

    from baka.models.safetensors_io import atomic_output

    w, h, m = 640, 360, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    vals = losses + [v for _, v in val]
    if not vals:
        return
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    n = max(len(losses), max((s for s, _ in val), default=1))

    def xy(i: float, v: float) -> tuple[float, float]:
        return m + (w - 2 * m) * i / max(1, n - 1), h - m - (h - 2 * m) * (v - lo) / span

    if len(losses) > 1:
        d.line([xy(i, v) for i, v in enumerate(losses)], fill=(170, 190, 230), width=1)
        avg = moving_average(losses, max(1, len(losses) // 20))
        d.line([xy(i, v) for i, v in enumerate(avg)], fill=(30, 60, 160), width=2)
    for s, v in val:
        x, y = xy(s - 1, v)
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(200, 30, 30))
    d.rectangle([m, m, w - m, h - m], outline="black")
    d.text((m, 8), f"loss (train blue, validation red)  steps 1-{n}", fill="black")
    d.text((4, m - 6), f"{hi:.4g}", fill="black")
    d.text((4, h - m - 6), f"{lo:.4g}", fill="black")
    with atomic_output(path) as tmp:
        img.save(tmp, format="PNG")
