"""Teach world-flat A1111 emphasis with kohya's ``weighted_captions`` and measure it (issue #10:
"``(red:1.4)`` vs ``(red:0.6)`` moves colour measurably"; the shipped world-flat reads its captions from
the padding states, so emphasis, which scales one token's state, moves nothing).

The data: the build's 4000 flat training scenes; in a share of the one-shape ones the shape's colour
word carries a weight w (``(red:0.7) circle, ...``), and below 1 the colour is faded towards the
background by w (above 1 the palette colour stays itself: it cannot be more itself). ``baka train``
fine-tunes the shipped world-flat on it with the build's epsilon settings (``EPS_KEYS``; the
caption-free stage's ``--caption-free-below 300`` as an option) plus ``weighted_captions`` (``No norm``,
kohya's SD text encoding). The measure, per image: the shape's
colour strength, its pixels' mean colour projected on the axis background -> named colour (1: the
palette colour, 0: the background), over ``--n`` seeds, for both models; and the quick suite, so what the
fine-tune costs shows. Nothing is shipped; ~20 min (training) + ~6 min (judging) on 2 cores; an
existing fine-tune in ``--out`` is judged again, not retrained.

    .venv/bin/python bench/world_emphasis.py [--steps 3000] [--lr 1e-3] [--caption-free-below 0] [--n 16]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

FADED = (0.5, 0.6, 0.7, 0.8, 0.9)
DEEPER = (1.1, 1.2, 1.3, 1.4, 1.5)
# (colour, background, shape) of the measured prompts: three contrasts (dark on mid-grey, dark on light,
# light on dark)
PROBES = (("red", "grey", "circle"), ("blue", "white", "square"), ("yellow", "black", "triangle"))
WEIGHTS = (0.5, 0.6, 0.8, 1.0, 1.4)


def weighted_caption(scene, w: float) -> str:
    """The scene's caption with its shape's colour word weighted (A1111 syntax)."""
    s = scene.shapes[0]
    return scene.caption.replace(f"{s.color} {s.shape}", f"({s.color}:{w:g}) {s.shape}", 1)


def render_set(out: Path, share: float, seed: int = 13) -> int:
    """The build's flat training scenes into ``out`` (png + txt); a ``share`` of one-shape scenes get a
    weighted colour word and, below 1, the faded colour. Returns how many are weighted."""
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from baka.world.build import N_FLAT
    from baka.world.render import BACKGROUNDS, render_scene, scenes

    out.mkdir(parents=True, exist_ok=True)
    rng, weighted = random.Random(seed), 0
    for i, sc in enumerate(tqdm(scenes(N_FLAT, 0, "flat", "train"), total=N_FLAT, desc="render")):
        img, caption = render_scene(sc), sc.caption
        if len(sc.shapes) == 1 and rng.random() < share:
            w = rng.choice(FADED + DEEPER)
            bg = np.array(BACKGROUNDS[sc.background], np.float32)
            img = np.clip(bg + min(w, 1.0) * (img.astype(np.float32) - bg), 0, 255).round().astype(np.uint8)
            caption, weighted = weighted_caption(sc, w), weighted + 1
        Image.fromarray(img).save(out / f"{i:05d}.png")
        (out / f"{i:05d}.txt").write_text(caption)
    return weighted


def strength(image, color: str, background: str) -> float:
    """The shape's colour strength: its pixels' (those 30 RGB units or more from the background) mean
    colour projected on background -> palette colour; 0 when fewer pixels than the judge's smallest
    shape are drawn."""
    import numpy as np

    from baka.world.render import BACKGROUNDS, COLORS
    from baka.world.score import MIN_AREA

    a = np.asarray(image.convert("RGB")).astype(np.float32)
    bg, c = np.array(BACKGROUNDS[background], np.float32), np.array(COLORS[color], np.float32)
    fg = np.sqrt(((a - bg) ** 2).sum(-1)) > 30
    if fg.sum() < MIN_AREA:
        return 0.0
    axis = c - bg
    return float(((a[fg] - bg) @ axis).mean() / (axis @ axis))


def strengths(model, n: int, emphasis: str) -> dict[str, float]:
    from baka.generate.engine import Generator, GenParams

    g, got = Generator(model, progress=False), {}
    for color, bg, shape in PROBES:
        for w in WEIGHTS:
            word = color if w == 1.0 else f"({color}:{w:g})"
            prompt = f"{word} {shape}, {bg} background, large, center"
            p = GenParams(
                prompt, "", steps=20, sampler="DPM++ 2M Karras", cfg=7.0, seed=0, width=64, height=64
            )
            p.batch, p.emphasis = n, emphasis
            got[f"{color}/{bg}@{w:g}"] = sum(strength(r.image, color, bg) for r in g(p)) / n
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--caption-free-below", type=int, default=0, help="the build's caption-free stage: 300")
    ap.add_argument("--share", type=float, default=0.5, help="share of one-shape images weighted")
    ap.add_argument("--n", type=int, default=16, help="seeds per prompt")
    ap.add_argument("--out", default="build/world-emphasis")
    ap.add_argument("--json", help="also write every figure here")
    a = ap.parse_args()
    from world_claims import md_table

    from baka.models.shipped import shipped_path
    from baka.world.build import EPS_KEYS, run_train, train_toml
    from baka.world.eval import evaluate

    out = Path(a.out)
    data, name = out / "data", "world-flat-emphasis"
    if not (data / "03999.txt").exists():
        print(f"weighted {render_set(data, a.share)} of 4000 images", flush=True)
    tuned = out / name / f"{name}.safetensors"
    if not tuned.exists():
        extra = {**EPS_KEYS, "weighted_captions": "true", "weighted_captions_emphasis": '"No norm"'}
        if a.caption_free_below:
            extra["caption_free_below_timestep"] = a.caption_free_below
        run_train(train_toml(out, name, shipped_path("world-flat"), data, a.steps, lr=a.lr, extra=extra))
    models = {"world-flat": shipped_path("world-flat"), "fine-tuned": tuned}
    figures: dict[str, dict] = {}
    for emphasis in ("No norm", "Original"):
        rows = []
        for label, path in models.items():
            s = figures.setdefault(f"{label} ({emphasis})", strengths(path, a.n, emphasis))
            for color, bg, _ in PROBES:
                rows.append(
                    [label, f"{color} on {bg}", *(f"{s[f'{color}/{bg}@{w:g}']:.2f}" for w in WEIGHTS)]
                )
        head = ["model", "colour", *(f"w {w:g}" for w in WEIGHTS)]
        print(
            md_table(f"Colour strength of `(colour:w) shape` (emphasis {emphasis}, {a.n} seeds)", head, rows)
        )
    rows = []
    for label, path in models.items():
        m = evaluate(path, suite="quick", cfg=7.0, progress=False).metrics
        figures[f"{label} quick suite"] = m
        rows.append(
            [label, *(f"{m[k]:.0%}" for k in ("color_accuracy", "shape_accuracy", "background_accuracy"))]
        )
    print(md_table("Quick suite, CFG 7", ["model", "colour", "shape", "background"], rows))
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
