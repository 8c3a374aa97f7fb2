"""The shapes world: a deterministic procedural dataset of coloured shapes with Danbooru-style captions.

Every image is a function of ``(seed, index)`` only (its own numpy PCG64 stream), so ``n`` does not
change earlier images and the same seed gives the same bytes. Shapes are drawn at 4x and box-filtered
down, so edges are anti-aliased the same way every time.

Captions (kohya ``.txt`` next to each PNG), tags in this order::

    red circle, blue background, large, left           # one shape
    red circle, blue square, grey background, small    # two shapes: left one first, then right one

Held out of training (never rendered with ``split="train"``, evaluated by ``baka world eval``):
the colour/shape pairs in :data:`HELD_OUT_PAIRS` and the colour/background pairs in
:data:`HELD_OUT_BACKGROUNDS`. ``star`` is a reserved shape: the renderer draws it, training never does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SIZE = 64  # image side in pixels (8x8 latents with an f8 VAE)
_SS = 4  # supersampling factor

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (245, 225, 40),
    "purple": (150, 55, 195),
    "orange": (245, 130, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "grey": (128, 128, 128),
    "red": COLORS["red"],
    "green": COLORS["green"],
    "blue": COLORS["blue"],
    "yellow": COLORS["yellow"],
}
SHAPES = ("circle", "square", "triangle")
RESERVED_SHAPES = ("star",)  # drawable, never in training
# bounding-box side in pixels; even "small" spans 3x3 latent pixels of the f8 VAE, since at 2x2 (18 px,
# builds 1-3) the VAE itself could not keep circle, square and triangle apart (docs/world.md)
SIZES: dict[str, int] = {"small": 24, "medium": 33, "large": 42}
POSITIONS: dict[str, tuple[int, int]] = {  # shape centre (x, y)
    "center": (32, 32),
    "left": (22, 32),
    "right": (42, 32),
    "top": (32, 22),
    "bottom": (32, 42),
}
TWO_SHAPE_X = (18, 46)  # centres of the left and right shape of a two-shape image
TWO_SHAPE_SIZES = ("small",)  # two medium shapes would overlap
TWO_SHAPE_FRACTION = 0.15
STYLES = ("flat", "striped")
# pixels; diagonal stripes fixed in image coordinates. A period that divides the VAE's 8-pixel patch puts
# the same hatching in every latent pixel, so the decoder can draw it from a "striped" code; with 6 px
# (builds 1-3) its phase changed from patch to patch and the VAE returned muddy fills instead
STRIPE_PERIOD = 8
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("green", "triangle"), ("purple", "square"), ("orange", "circle")}
)
HELD_OUT_BACKGROUNDS: frozenset[tuple[str, str]] = frozenset({("red", "white"), ("blue", "yellow")})
SPLITS = ("train", "heldout", "all", "star")
# the world VAE never saw a star: through it the judge still reads 40/40 large stars as stars, 31/40
# medium and 0/40 small ones (their points fall inside one latent pixel), so the star split is large only
STAR_SIZES = ("large",)
MIN_CONTRAST = 90.0  # RGB distance below which a colour is never drawn on a background


def shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The darker tone of a colour used by the striped style for stripes and outline."""
    return tuple(int(round(0.45 * c)) for c in rgb)  # type: ignore[return-value]


def _dist(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    return math.dist(a, b)


def allowed_on(color: str, background: str) -> bool:
    """A colour is drawn on a background only with enough contrast (never e.g. red on red)."""
    return (
        _dist(COLORS[color], BACKGROUNDS[background]) >= MIN_CONTRAST
        and _dist(shade(COLORS[color]), BACKGROUNDS[background]) >= 0.5 * MIN_CONTRAST
    )


@dataclass(frozen=True)
class Shape:
    color: str
    shape: str
    size: str
    position: str  # for two-shape images: "left" / "right"
    center: tuple[float, float]
    side: float


@dataclass(frozen=True)
class Scene:
    """What one image shows; ``caption`` is its training caption."""

    shapes: tuple[Shape, ...]
    background: str
    style: str = "flat"
    index: int = 0
    seed: int = 0

    @property
    def caption(self) -> str:
        if len(self.shapes) == 1:
            s = self.shapes[0]
            return f"{s.color} {s.shape}, {self.background} background, {s.size}, {s.position}"
        tags = [f"{s.color} {s.shape}" for s in self.shapes]
        return ", ".join([*tags, f"{self.background} background", self.shapes[0].size])

    def is_held_out(self) -> bool:
        return any(
            (s.color, s.shape) in HELD_OUT_PAIRS or (s.color, self.background) in HELD_OUT_BACKGROUNDS
            for s in self.shapes
        )


def make_shape(
    color: str, shape: str, size: str, position: str, *, jitter: tuple[float, float, float] = (0, 0, 0)
) -> Shape:
    """A single shape at a named size and position, moved by ``jitter`` = (dx, dy, dside) pixels."""
    cx, cy = POSITIONS[position]
    return Shape(color, shape, size, position, (cx + jitter[0], cy + jitter[1]), SIZES[size] + jitter[2])


def _polygon(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]] | None:
    h = side / 2
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # upright, base at the bottom, bounding box side x side
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "star":
        pts = []
        outer = h / math.sin(0.4 * math.pi)  # the star's width (its widest points, 72 deg apart) is side
        for k in range(10):
            r = outer if k % 2 == 0 else outer * 0.42
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        return pts
    return None


def _shape_mask(s: Shape, shrink: float = 0.0):
    """A supersampled ("L") mask of the shape, optionally shrunk by ``shrink`` output pixels."""
    from PIL import Image, ImageDraw

    n = SIZE * _SS
    im = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(im)
    cx, cy = s.center[0] * _SS, s.center[1] * _SS
    side = (s.side - 2 * shrink * (2.0 if s.shape == "triangle" else 1.0)) * _SS
    if side <= 0:
        return im
    if s.shape == "circle":
        d.ellipse([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], fill=255)
    else:
        pts = _polygon(s.shape, cx, cy, side)
        if pts is None:
            raise ValueError(f"unknown shape {s.shape!r}")
        if s.shape == "triangle" and shrink:  # keep the inner triangle's centroid where the outer's is
            dy = (s.side * _SS - side) / 6
            pts = [(x, y + dy) for x, y in pts]
        d.polygon(pts, fill=255)
    return im


def render_scene(scene: Scene) -> np.ndarray:
    """The image of ``scene`` as uint8 [SIZE, SIZE, 3]."""
    from PIL import Image

    n = SIZE * _SS
    canvas = np.empty((n, n, 3), np.float32)
    canvas[:] = BACKGROUNDS[scene.background]
    yy, xx = np.mgrid[0:n, 0:n]
    stripes = ((xx + yy) // (STRIPE_PERIOD * _SS // 2)) % 2 == 1  # fixed diagonal hatching
    for s in scene.shapes:
        outer = np.asarray(_shape_mask(s), np.float32)[..., None] / 255
        rgb = np.asarray(COLORS[s.color], np.float32)
        if scene.style == "flat":
            canvas = canvas * (1 - outer) + rgb * outer
            continue
        dark = np.asarray(shade(COLORS[s.color]), np.float32)
        inner = np.asarray(_shape_mask(s, shrink=2.0), np.float32)[..., None] / 255
        fill = np.where(stripes[..., None], dark, rgb)
        canvas = canvas * (1 - outer) + (dark * (1 - inner) + fill * inner) * outer
    img = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), "RGB")
    return np.asarray(img.resize((SIZE, SIZE), Image.Resampling.BOX))


def sample_scene(seed: int, index: int, *, style: str = "flat", split: str = "train") -> Scene:
    """Scene ``index`` of world ``seed``. ``split="train"`` never yields held-out combinations,
    ``"heldout"`` only yields them, ``"all"`` yields anything (reserved shapes never); ``"star"`` yields
    single large stars (the reserved shape a LoRA learns; any colour, background and position)."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} ({', '.join(SPLITS)})")
    rng = np.random.default_rng([seed, index])
    for _ in range(1000):
        bg = str(rng.choice(list(BACKGROUNDS)))
        if split == "star":
            c, size = str(rng.choice(list(COLORS))), str(rng.choice(STAR_SIZES))
            pos, jitter = str(rng.choice(list(POSITIONS))), tuple(rng.uniform(-2, 2, 3))
            if allowed_on(c, bg):
                return Scene((make_shape(c, "star", size, pos, jitter=jitter),), bg, style, index, seed)
            continue
        two = rng.random() < TWO_SHAPE_FRACTION
        if two:
            size = str(rng.choice(TWO_SHAPE_SIZES))
            shapes = []
            for pos, x in zip(("left", "right"), TWO_SHAPE_X, strict=True):
                c, sh = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
                j = rng.uniform(-1.5, 1.5, 3)
                shapes.append(Shape(c, sh, size, pos, (x + j[0], 32 + j[1]), SIZES[size] + j[2]))
        else:
            c, sh = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
            size, pos = str(rng.choice(list(SIZES))), str(rng.choice(list(POSITIONS)))
            shapes = [make_shape(c, sh, size, pos, jitter=tuple(rng.uniform(-2, 2, 3)))]
        scene = Scene(tuple(shapes), bg, style, index, seed)
        if not all(allowed_on(s.color, bg) for s in shapes):
            continue
        held = scene.is_held_out()
        if (split == "train" and held) or (split == "heldout" and not held):
            continue
        return scene
    raise RuntimeError("no scene found")  # pragma: no cover - 1000 tries never all fail


@dataclass
class RenderReport:
    folder: Path
    n: int
    held_out_skipped: int = 0
    captions: list[str] = field(default_factory=list)


def scenes(n: int, seed: int = 0, style: str = "flat", split: str = "train") -> Iterator[Scene]:
    for i in range(n):
        yield sample_scene(seed, i, style=style, split=split)


def png_bytes(img: np.ndarray) -> bytes:
    """Deterministic PNG encoding (no metadata, fixed compression)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def render_folder(
    folder: str | Path,
    n: int,
    *,
    seed: int = 0,
    style: str = "flat",
    split: str = "train",
    progress: bool = False,
    select: Callable[[Scene], bool] | None = None,
    caption: Callable[[Scene], str] | None = None,
    edit: Callable[[Scene, np.ndarray, str], tuple[np.ndarray, str]] | None = None,
) -> RenderReport:
    """Write ``n`` images ``00000.png`` + ``00000.txt`` (kohya layout: one folder = one subset).
    ``select`` keeps only the scenes it accepts (the first ``n`` of them, numbered from 0); ``caption``
    writes another caption than the scene's own (e.g. a textual-inversion word in place of a tag);
    ``edit`` (called once per written scene, in order) may change the image and caption together."""
    from itertools import count

    from tqdm import tqdm

    from baka.models.safetensors_io import atomic_output, clean_stale_parts

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clean_stale_parts(folder)  # once: a scan per file made writing n files O(n^2)
    rep = RenderReport(folder, n)
    chosen = (sample_scene(seed, i, style=style, split=split) for i in count())
    chosen = (sc for sc in chosen if select is None or select(sc))
    for k, scene in zip(tqdm(range(n), desc="render", disable=not progress), chosen, strict=False):
        stem = folder / f"{k:05d}"
        text = caption(scene) if caption else scene.caption
        img = render_scene(scene)
        if edit is not None:
            img, text = edit(scene, img, text)
        with atomic_output(stem.with_suffix(".png"), clean=False) as tmp:
            Path(tmp).write_bytes(png_bytes(img))
        with atomic_output(stem.with_suffix(".txt"), clean=False) as tmp:
            Path(tmp).write_text(text + "\n", encoding="utf-8")
        rep.captions.append(text)
    return rep
