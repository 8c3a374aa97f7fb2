"""The judge: reads a shapes-world image with plain image processing (no neural net).

Background: median of the 2-pixel border, nearest background colour. Foreground: pixels far from the
measured background, connected components (largest first; for two shapes, the two largest by x).
Shape class from mask geometry: the 5th harmonic of the boundary radius around the centroid (a
five-pointed star has five-fold symmetry), fill ratio = area / bounding-box area (square ~1, circle
~pi/4, triangle ~1/2) and the ratio of the top to the bottom width (a triangle is narrow at the top).
Colour: each interior pixel votes for the nearest palette colour or its striped shade.
Luminance: mean Rec.601 luma of the whole image in [0, 1]. Texture energy: mean absolute difference
between the luma and its 3x3 box blur over the shape interior (flat fills ~0, stripes high).

Scorers (functions of a list of (reading, scene) pairs -> float) live in :data:`SCORERS`, so a merge
search can pick one by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from baka.registry import Registry
from baka.world.render import BACKGROUNDS, COLORS, POSITIONS, SIZES, TWO_SHAPE_X, Scene, shade

MASK_THRESHOLD = 60.0  # RGB distance from the background that counts as foreground
MIN_AREA = 12  # pixels; smaller blobs are noise
# a blob is a star when the 5th harmonic of its boundary radius dominates and reaches this: a drawn star
# measures ~0.33, large stars through the world VAE 0.11-0.27, generated circles / squares / triangles
# 0.08 at most, ground-truth triangles 0.04 (docs/world.md, tests/test_world.py)
STAR_HARMONIC = 0.09


@dataclass
class ShapeReading:
    color: str
    shape: str
    size: str
    position: str
    area: int
    fill_ratio: float
    center: tuple[float, float]
    texture: float


@dataclass
class Reading:
    """What the judge sees in one image."""

    background: str
    luminance: float
    texture_energy: float
    shapes: list[ShapeReading] = field(default_factory=list)

    @property
    def main(self) -> ShapeReading | None:
        return self.shapes[0] if self.shapes else None


def _nearest(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> str:
    return min(table, key=lambda k: float(np.sum((rgb - np.asarray(table[k], np.float32)) ** 2)))


def _luma(img: np.ndarray) -> np.ndarray:
    return (img[..., 0] * 0.299 + img[..., 1] * 0.587 + img[..., 2] * 0.114) / 255.0


def radial_harmonics(mask: np.ndarray, n_angles: int = 180) -> np.ndarray:
    """Amplitudes of harmonics 1..7 of the boundary radius r(theta) around the mask's centroid, relative
    to the mean radius. A shape with k-fold symmetry has energy at multiples of k only: a square at 4,
    the five-pointed star at 5; a circle has none. The star's 5th harmonic survives blur, which the
    star's thin points do not."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
    theta = np.arange(n_angles) * (2 * np.pi / n_angles)
    steps = np.arange(0.0, float(max(mask.shape)), 0.25)
    px = np.floor(cx + np.cos(theta)[:, None] * steps).astype(int)
    py = np.floor(cy + np.sin(theta)[:, None] * steps).astype(int)
    ok = (px >= 0) & (px < mask.shape[1]) & (py >= 0) & (py < mask.shape[0])
    inside = np.zeros(ok.shape, bool)
    inside[ok] = mask[py[ok], px[ok]]
    # the first step outside along each ray (rays never leave a blob whose centroid is outside it: 0)
    radius = steps[np.argmin(inside, axis=1)]
    amp = np.abs(np.fft.rfft(radius)) * (2.0 / n_angles)
    return amp[1:8] / max(float(radius.mean()), 1e-6)


def _classify_shape(mask: np.ndarray) -> tuple[str, float]:
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    h, w = y1 - y0 + 1, x1 - x0 + 1
    fill = float(mask.sum()) / float(h * w)
    harmonics = radial_harmonics(mask)
    if harmonics[4] >= STAR_HARMONIC and harmonics[4] == harmonics[1:6].max():
        return "star", fill
    box = mask[y0 : y1 + 1, x0 : x1 + 1]
    q = max(1, h // 4)
    top, bottom = box[:q].sum(axis=1).mean(), box[-q:].sum(axis=1).mean()
    taper = float(top / max(bottom, 1e-6))
    if fill < 0.66 or taper < 0.45:
        return "triangle", fill
    if fill < 0.885:
        return "circle", fill
    return "square", fill


def _classify_color(pixels: np.ndarray) -> str:
    names = list(COLORS)
    refs = np.asarray([COLORS[c] for c in names] + [shade(COLORS[c]) for c in names], np.float32)
    d = ((pixels[:, None, :] - refs[None]) ** 2).sum(-1)
    votes = np.bincount(d.argmin(1) % len(names), minlength=len(names))
    return names[int(votes.argmax())]


def read_image(img) -> Reading:
    """Judge one image (PIL image or uint8 array [H, W, 3]); positions and sizes assume 64x64."""
    from scipy import ndimage

    a = np.asarray(img.convert("RGB") if hasattr(img, "convert") else img)
    if a.shape[:2] != (64, 64):
        from PIL import Image

        a = np.asarray(Image.fromarray(a).resize((64, 64), Image.Resampling.BOX))
    a = a.astype(np.float32)
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[:, :2].reshape(-1, 3)])
    border = np.concatenate([border, a[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background = _nearest(bg_rgb, BACKGROUNDS)
    luma = _luma(a)
    hp = np.abs(luma - ndimage.uniform_filter(luma, size=3, mode="nearest"))
    fg = np.sqrt(((a - bg_rgb) ** 2).sum(-1)) > MASK_THRESHOLD
    labels, n = ndimage.label(fg)
    comps = []
    for i in range(1, n + 1):
        m = ndimage.binary_fill_holes(labels == i)
        if m.sum() >= MIN_AREA:
            comps.append(m)
    comps.sort(key=lambda m: -int(m.sum()))
    reading = Reading(background, float(luma.mean()), 0.0)
    big = comps[:2] if len(comps) > 1 and comps[1].sum() >= 0.35 * comps[0].sum() else comps[:1]
    two = len(big) == 2
    if two:
        big.sort(key=lambda m: float(np.nonzero(m)[1].mean()))
    textures = []
    for m in big:
        inner = ndimage.binary_erosion(m, iterations=2)
        if inner.sum() < 4:
            inner = m
        shape, fill = _classify_shape(m)
        ys, xs = np.nonzero(m)
        # the bounding-box centre, not the centroid: a triangle's centroid sits below its box centre
        cx, cy = float(xs.min() + xs.max()) / 2, float(ys.min() + ys.max()) / 2
        side = float(max(ys.max() - ys.min(), xs.max() - xs.min()) + 1)
        size = min(SIZES, key=lambda k: abs(SIZES[k] - side))
        if two:
            position = "left" if cx < 32 else "right"
        else:
            position = min(POSITIONS, key=lambda k: math.dist(POSITIONS[k], (cx, cy)))
        tex = float(hp[inner].mean())
        textures.append(tex)
        reading.shapes.append(
            ShapeReading(_classify_color(a[inner]), shape, size, position, int(m.sum()), fill, (cx, cy), tex)
        )
    reading.texture_energy = float(np.mean(textures)) if textures else 0.0
    return reading


STRENGTH_THRESHOLD = 30.0  # RGB distance from the background that counts for colour_strength


def color_strength(img, color: str, background: str) -> float:
    """How much of ``color`` the shape shows against the named ``background``: its pixels' (those
    :data:`STRENGTH_THRESHOLD` or more from the background colour) mean colour projected on the line
    background -> palette colour: 1 is the palette colour, 0.5 halfway faded, 0 no shape (fewer pixels
    than :data:`MIN_AREA`). The measure of A1111 emphasis on a colour word (``(red:0.6)``), which the
    colour class, nearest-palette, cannot see."""
    a = np.asarray(img.convert("RGB") if hasattr(img, "convert") else img).astype(np.float32)
    bg, c = np.array(BACKGROUNDS[background], np.float32), np.array(COLORS[color], np.float32)
    fg = np.sqrt(((a - bg) ** 2).sum(-1)) > STRENGTH_THRESHOLD
    if fg.sum() < MIN_AREA:
        return 0.0
    axis = c - bg
    return float(((a[fg] - bg) @ axis).mean() / (axis @ axis))


# ---------------------------------------------------------------------------------------------------------
# scorers

Pair = tuple[Reading, Scene]
Scorer = Callable[[Sequence[Pair]], float]
SCORERS: Registry[Scorer] = Registry("scorer")


def _match(r: Reading, s: Scene, attr: str) -> bool:
    if attr == "background":
        return r.background == s.background
    if len(r.shapes) != len(s.shapes):
        return False
    return all(getattr(a, attr) == getattr(b, attr) for a, b in zip(r.shapes, s.shapes, strict=True))


def _accuracy(attr: str) -> Scorer:
    def score(pairs: Sequence[Pair]) -> float:
        return float(np.mean([_match(r, s, attr) for r, s in pairs])) if pairs else 0.0

    score.__doc__ = f"fraction of images whose {attr} matches the prompt"
    return score


for _attr in ("color", "shape", "background", "size", "position"):
    SCORERS.add(f"{_attr}_accuracy", _accuracy(_attr), aliases=(_attr,))


@SCORERS.register("mean_luminance", aliases=("luminance",))
def mean_luminance(pairs: Sequence[Pair]) -> float:
    """Mean luma of the images in [0, 1]."""
    return float(np.mean([r.luminance for r, _ in pairs])) if pairs else 0.0


@SCORERS.register("texture_energy", aliases=("texture",))
def texture_energy(pairs: Sequence[Pair]) -> float:
    """Mean high-frequency luma energy inside the shapes (striped style >> flat style)."""
    return float(np.mean([r.texture_energy for r, _ in pairs])) if pairs else 0.0


def score(pairs: Sequence[Pair], names: Sequence[str] | None = None) -> dict[str, float]:
    """Every scorer (or those named) over ``pairs``."""
    return {SCORERS.canonical(n): SCORERS.get(n)(pairs) for n in (names or SCORERS.names())}


__all__ = ["Reading", "ShapeReading", "read_image", "SCORERS", "score", "TWO_SHAPE_X"]
