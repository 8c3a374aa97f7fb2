"""kohya's per-step image augmentations: ``flip_aug``, ``random_crop`` and ``color_aug``.

Every draw is a function of (seed, step, rank, slot), so a resumed run replays it. ``color_aug`` follows
kohya's ``AugHelper.color_aug`` (library/train_util.py): with probability 0.33 an image gets either a hue
shift uniform in +-8 OpenCV hue units (+-16 degrees) or, equally likely, kohya's gamma
``clip(v ** g, 0, 255)`` with g uniform in [0.95, 1.05] applied to the 0-255 values themselves (so it
brightens or darkens by up to a quarter, not a gamma curve on [0, 1]).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

COLOR_AUG_P = 0.33  # kohya: share of images that get a colour change
HUE_SHIFT_LIMIT = 8.0  # kohya: OpenCV hue units (180 per turn)
GAMMA_RANGE = (0.95, 1.05)


@dataclass(frozen=True)
class Aug:
    """One image's augmentation at one step."""

    flip: bool = False
    # random_crop: where the crop starts, as a fraction in [0, 1) of (spare width + 1, spare height + 1)
    crop: tuple[float, float] | None = None
    hue: float | None = None  # color_aug: hue shift in OpenCV units
    gamma: float | None = None  # color_aug: kohya's gamma

    @property
    def cacheable(self) -> bool:
        """A mirrored image is cached apart; a random crop or a colour change is never cached."""
        return self.crop is None and self.hue is None and self.gamma is None


def augments_for(items: list, seed: int, step: int, rank: int) -> list[Aug]:
    """The augmentations of a batch's items (their subsets say which are on)."""
    out = []
    for i, it in enumerate(items):
        s = it.subset
        # kohya's flip_aug mirrors with probability 1/2; EveryDream2's flip_p.txt sets it per folder
        p_flip = it.options.flip_p
        if p_flip is None:
            p_flip = 0.5 if s.flip_aug else 0.0
        flip = p_flip > 0 and random.Random(f"{seed}:{step}:{rank}:{i}:flip").random() < p_flip
        crop = hue = gamma = None
        if s.random_crop:
            r = random.Random(f"{seed}:{step}:{rank}:{i}:crop")
            crop = (r.random(), r.random())
        if s.color_aug:
            r = random.Random(f"{seed}:{step}:{rank}:{i}:color")
            if r.random() <= COLOR_AUG_P:
                if r.random() > 0.5:
                    hue = r.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT)
                else:
                    gamma = r.uniform(*GAMMA_RANGE)
        out.append(Aug(bool(flip), crop, hue, gamma))
    return out


def crop_offset(spare: int, frac: float | None) -> int:
    """Where a crop with ``spare`` extra pixels starts: the centre (kohya: spare // 2), or the random
    fraction's place, uniform over 0..spare as kohya's ``random.randint(0, spare)``."""
    if frac is None:
        return spare // 2
    return min(spare, int(frac * (spare + 1)))


def hue_shift(rgb: np.ndarray, shift: float) -> np.ndarray:
    """Rotate the hue of a uint8 RGB image by ``shift`` OpenCV units (2 degrees each), keeping
    saturation and value; float maths, rounded back to uint8 (OpenCV rounds H to whole units first)."""
    x = rgb.astype(np.float64) / 255.0
    mx, mn = x.max(-1), x.min(-1)
    d = mx - mn
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    safe = np.where(d > 0, d, 1.0)
    h = np.select(
        [d == 0, mx == r, mx == g],
        [0.0, ((g - b) / safe) % 6.0, (b - r) / safe + 2.0],
        (r - g) / safe + 4.0,
    )  # sextants, 0..6
    h = (h + shift * 2.0 / 60.0) % 6.0
    s = np.where(mx > 0, d / np.where(mx > 0, mx, 1.0), 0.0)
    v = mx
    # HSV -> RGB, the standard piecewise form: channel n = v - v s clip(min(k, 4 - k), 0, 1),
    # k = (n + h) mod 6

    def channel(n: float) -> np.ndarray:
        k = (n + h) % 6.0
        return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)

    out = np.stack([channel(5.0), channel(3.0), channel(1.0)], axis=-1)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def kohya_gamma(rgb: np.ndarray, gamma: float) -> np.ndarray:
    """kohya's colour gamma: ``clip(v ** gamma, 0, 255)`` on the 0-255 values, truncated to uint8."""
    return np.clip(rgb.astype(np.float64) ** gamma, 0, 255).astype(np.uint8)


def apply_color(rgb: np.ndarray, aug: Aug) -> np.ndarray:
    if aug.hue is not None:
        return hue_shift(rgb, aug.hue)
    if aug.gamma is not None:
        return kohya_gamma(rgb, aug.gamma)
    return rgb
