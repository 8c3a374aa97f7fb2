"""A1111's Extras tab upscale (``/sdapi/v1/extra-single-image``, ``baka upscale``) with the image
upscalers baka has (Lanczos, Nearest, ESRGAN-family files; "None" leaves the picture as it is, as
A1111's does).

A1111's rules (``scripts/postprocessing_upscale.py``): "Scale by" upscales by the factor, "Scale to"
by the larger of the two ratios; either way through ``Upscaler.upscale``, whose result has both
sides floored to multiples of 8 (``upscale_by``); with crop, "Scale to" then cuts (or pads) the centre
to the exact size. A second upscaler's result is blended over the first with its visibility."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from baka.errors import BakaError

MAX_PIXELS = 64 * 2**20  # 8192 x 8192: past that one picture is gigabytes in memory


@dataclass(frozen=True)
class Upscale:
    upscaler: str = "None"
    scale: float = 2.0  # "Scale by"
    to: tuple[int, int] | None = None  # "Scale to" (w, h); then ``scale`` is unused
    crop: bool = True  # "Crop to fit" with ``to``
    upscaler_2: str = "None"
    visibility_2: float = 0.0
    upscaler_dirs: tuple[str | Path, ...] = ()  # folders of ESRGAN-family files

    def __post_init__(self) -> None:
        from baka.generate.upscale import get_upscaler

        for name in (self.upscaler, self.upscaler_2):
            if name.lower() != "none" and get_upscaler(name, self.upscaler_dirs).latent:
                raise BakaError(
                    f"upscaler {name!r} works on latents (hires fix only); use Lanczos or Nearest"
                )
        if not 0 <= self.visibility_2 <= 1:
            raise BakaError(f"second upscaler visibility {self.visibility_2:g}: must be from 0 to 1")
        if self.to is None and not 0 < self.scale <= 8:
            raise BakaError(f"upscale factor {self.scale:g}: must be above 0 and at most 8")


def _resample(img, name: str, scale: float, dirs: tuple[str | Path, ...]):
    from baka.generate.upscale import get_upscaler, upscale_by

    if name.lower() == "none":
        return img
    return upscale_by(get_upscaler(name, dirs), img, scale)


def upscale(img, u: Upscale):
    """The picture upscaled by ``u``, A1111's Extras rules."""
    from PIL import Image

    img = img.convert("RGB")
    scale = max(u.to[0] / img.width, u.to[1] / img.height) if u.to else u.scale
    if int(img.width * scale) * int(img.height * scale) > MAX_PIXELS:
        raise BakaError(
            f"upscaling {img.width}x{img.height} by {scale:g} makes over {MAX_PIXELS // 2**20} Mpx;"
            " use a smaller factor"
        )
    out = _resample(img, u.upscaler, scale, u.upscaler_dirs)
    if u.upscaler_2.lower() != "none" and u.visibility_2 > 0:
        second = _resample(img, u.upscaler_2, scale, u.upscaler_dirs)
        out = Image.blend(out, second.resize(out.size), u.visibility_2)
    if u.to and u.crop and out.size != u.to:
        w, h = u.to
        cropped = Image.new("RGB", (w, h))
        cropped.paste(out, box=(w // 2 - out.width // 2, h // 2 - out.height // 2))
        out = cropped
    return out


__all__ = ["Upscale", "upscale"]
