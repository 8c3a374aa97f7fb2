"""A1111 emphasis on the shapes world, measured (issue #10: "``(red:1.4)`` vs ``(red:0.6)`` moves colour
measurably").

Build 8's world-flat read its colour from the padding states, which emphasis never touches; build 9
(shipped) learns it with kohya's ``weighted_captions`` (colour words weighted, the colour faded towards
the background below 1) and a decoder fitted to faded colours (docs/world.md, "Build 9"). This bench
measures the shipped world-flat and, for comparison, any other model given (``--compare``, e.g. build
8's world-flat from git history or a build folder's ``ship/world-flat.safetensors``): the colour strength
(:func:`baka.world.score.color_strength`: 1 the palette colour, 0 the background) of
``(colour:w) shape, bg background, large, center`` at several w, in A1111's ``No norm`` (kohya's training
emphasis) and ``Original`` (generation's default) modes, and the quick suite. ~3 min per model on 2
cores.

    .venv/bin/python bench/world_emphasis.py [--n 16] [--compare MODEL ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (colour, background, shape) of the measured prompts: three contrasts (dark on mid-grey, dark on light,
# light on dark)
PROBES = (("red", "grey", "circle"), ("blue", "white", "square"), ("yellow", "black", "triangle"))
WEIGHTS = (0.5, 0.6, 0.8, 1.0, 1.4)
EMPHASES = ("No norm", "Original")


def strengths(gen, n: int, emphasis: str) -> dict[str, float]:
    from baka.world.eval import color_strength

    got = {}
    for color, bg, shape in PROBES:
        for w in WEIGHTS:
            word = color if w == 1.0 else f"({color}:{w:g})"
            s = color_strength(
                gen, f"{word} {shape}, {bg} background, large, center", color, bg, n=n, emphasis=emphasis
            )
            got[f"{color}/{bg}@{w:g}"] = sum(s) / n
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16, help="seeds per prompt (default: 16)")
    ap.add_argument("--compare", nargs="*", default=[], help="other models to measure beside the shipped one")
    ap.add_argument("--json", help="also write every figure here")
    a = ap.parse_args()
    from world_claims import md_table

    from baka.generate.engine import Generator
    from baka.world.eval import evaluate

    models = {"world-flat": "world-flat"}
    for m in a.compare:  # a build's ship/world-flat.safetensors is labelled by its build folder
        label = Path(m).parent.parent.name
        models[m if not label or label in models else label] = m
    figures: dict[str, dict] = {}
    rows: dict[str, list] = {e: [] for e in EMPHASES}
    suite_rows = []
    for label, model in models.items():
        gen = Generator(model, progress=False)
        for emphasis in EMPHASES:
            s = figures[f"{label} ({emphasis})"] = strengths(gen, a.n, emphasis)
            for color, bg, _ in PROBES:
                cells = (f"{s[f'{color}/{bg}@{w:g}']:.2f}" for w in WEIGHTS)
                rows[emphasis].append([label, f"{color} on {bg}", *cells])
        m = figures[f"{label} quick suite"] = evaluate(gen, suite="quick", cfg=7.0, progress=False).metrics
        suite_rows.append(
            [label, *(f"{m[k]:.0%}" for k in ("color_accuracy", "shape_accuracy", "background_accuracy"))]
        )
    head = ["model", "colour", *(f"w {w:g}" for w in WEIGHTS)]
    for emphasis in EMPHASES:
        title = f"Colour strength of `(colour:w) shape` (emphasis {emphasis}, {a.n} seeds, CFG 7)"
        print(md_table(title, head, rows[emphasis]))
    print(md_table("Quick suite, CFG 7", ["model", "colour", "shape", "background"], suite_rows))
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
