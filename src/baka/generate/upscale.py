"""Hires-fix and Extras upscalers by their A1111 names: latent interpolation modes, plain image
resamplers and ESRGAN-family model files (``baka.generate.model_upscale``) found in upscaler folders.

A1111's latent modes (``shared.latent_upscale_modes`` in 1.10) interpolate the first pass's latents with
``torch.nn.functional.interpolate``; the image upscalers decode, upscale as A1111's
``Upscaler.upscale`` does (``upscale_by``) and encode again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from baka.errors import BakaError
from baka.registry import Registry, did_you_mean, norm_name


@dataclass(frozen=True)
class Upscaler:
    name: str
    latent: bool
    # latent: (latents, (h, w)) -> latents; image: one pass, (PIL image, scale) -> PIL image (A1111's
    # ``do_upscale``: the resamplers go to ``int(side * scale)``, a model to its own factor)
    apply: Callable


UPSCALERS: Registry[Upscaler] = Registry("hires upscaler")


def _latent(name: str, mode: str, antialias: bool, aliases: tuple[str, ...] = ()) -> None:
    def apply(z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return torch.nn.functional.interpolate(z, size=size, mode=mode, antialias=antialias)

    UPSCALERS.add(name, Upscaler(name, True, apply), aliases)


def _image(name: str, resample: str) -> None:
    def apply(img, scale: float):
        from PIL import Image

        size = (int(img.width * scale), int(img.height * scale))
        return img.resize(size, resample=getattr(Image.Resampling, resample))

    UPSCALERS.add(name, Upscaler(name, False, apply))


# the mode / antialias pairs of A1111 1.10's latent upscalers
_latent("Latent", "bilinear", False, ("Latent (bilinear)",))
_latent("Latent (antialiased)", "bilinear", True)
_latent("Latent (bicubic)", "bicubic", False)
_latent("Latent (bicubic antialiased)", "bicubic", True)
_latent("Latent (nearest)", "nearest", False)
_latent("Latent (nearest-exact)", "nearest-exact", False)
# A1111's "None" (UpscalerNone): no pass of its own, so hires fix resizes with Lanczos alone; in
# Extras "None" means no upscale (baka.generate.extras). Registered first: A1111 lists it first
UPSCALERS.add("None", Upscaler("None", False, lambda img, scale: img))
_image("Lanczos", "LANCZOS")
_image("Nearest", "NEAREST")


def get_upscaler(name: str, dirs: Iterable[str | Path] = ()) -> Upscaler:
    """The upscaler called ``name``: a built-in one, else an ESRGAN-family file in ``dirs`` whose name
    without its suffix is ``name`` (A1111's names for model upscalers)."""
    if name in UPSCALERS:
        return UPSCALERS.get(name)
    from baka.generate.model_upscale import model_upscaler, model_upscalers

    dirs = list(dirs)
    files = model_upscalers(dirs)
    for stem, path in files.items():
        if norm_name(stem) == norm_name(name):
            return model_upscaler(stem, path)
    hint = did_you_mean(name, [*UPSCALERS.names(), *files])
    where = f" (model files looked for in {', '.join(map(str, dirs))})" if dirs else ""
    raise BakaError(f"unknown hires upscaler {name!r}{hint}{where}")


def upscale_by(up: Upscaler, img, scale: float):
    """A1111 1.10's ``Upscaler.upscale``: the target is ``side * scale`` floored to a multiple of 8;
    the upscaler runs (at most three passes) until the picture covers it, then Lanczos to the target."""
    from PIL import Image

    dest = (int(img.width * scale // 8 * 8), int(img.height * scale // 8 * 8))
    for i in range(3):
        if img.width >= dest[0] and img.height >= dest[1] and (i > 0 or scale != 1):
            break
        before = img.size
        img = up.apply(img, scale)
        if img.size == before:
            break
    return img if img.size == dest else img.resize(dest, resample=Image.Resampling.LANCZOS)


def resize_with(up: Upscaler, img, size: tuple[int, int]):
    """Hires fix's image upscale, A1111's ``images.resize_image`` (mode 0 with an upscaler): upscale by
    the larger ratio when it is above 1, then Lanczos to exactly ``size``."""
    from PIL import Image

    scale = max(size[0] / img.width, size[1] / img.height)
    if scale > 1.0:
        img = upscale_by(up, img, scale)
    return img if img.size == size else img.resize(size, resample=Image.Resampling.LANCZOS)


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The second pass's (width, height): A1111's ``int(side * hr_scale)``, floored to a multiple of 8
    (the latent grid; A1111's latent modes floor the same way when they divide by 8)."""
    return int(width * scale) // 8 * 8, int(height * scale) // 8 * 8


def hires_target(
    width: int, height: int, scale: float, resize: tuple[int, int] = (0, 0)
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The second pass's upscale size (w, h) and the latent columns / rows then cut off (x, y): A1111
    1.10's ``calculate_target_resolution``. By ``scale`` unless ``resize`` is set; a resize with one
    side 0 keeps the aspect ratio; with both, the picture is upscaled to cover the box and the latents
    are centre-cropped to it (A1111 cuts ``(over // 8) // 2`` before, the rest after)."""
    rx, ry = resize
    if (rx, ry) == (0, 0):
        return hires_size(width, height, scale), (0, 0)
    if ry == 0:
        up = rx, rx * height // width
    elif rx == 0:
        up = ry * width // height, ry
    elif width / height < rx / ry:
        up = rx, rx * height // width
    else:
        up = ry * width // height, ry
    cut = ((up[0] - rx) // 8, (up[1] - ry) // 8) if rx and ry else (0, 0)
    return (up[0] // 8 * 8, up[1] // 8 * 8), cut  # the latent grid, as hires_size


def crop_latents(latents, cut: tuple[int, int]):
    """Centre-crop [.., h, w] latents by ``cut`` = (columns, rows), A1111's hires truncation."""
    cx, cy = cut
    h, w = latents.shape[-2:]
    return latents[..., cy // 2 : h - (cy + 1) // 2, cx // 2 : w - (cx + 1) // 2]


def img2img_start(steps: int, denoise: float) -> tuple[int, int]:
    """(schedule length, steps run) of a second pass asked for ``steps`` steps at ``denoise``: A1111's
    ``setup_img2img_steps`` with explicit steps (its hires path): the schedule has
    ``int(steps / min(denoise, 0.999))`` steps and the last ``steps`` of them run."""
    d = min(denoise, 0.999)
    return (int(steps / d) if d > 0 else 0), steps


__all__ = [
    "RESIZE_MODES",
    "UPSCALERS",
    "Upscaler",
    "crop_latents",
    "get_upscaler",
    "hires_size",
    "hires_target",
    "img2img_start",
    "img2img_steps",
    "resize_with",
    "upscale_by",
]


# -- img2img input resizing ---------------------------------------------------------------------------
# A1111's resize modes (``images.resize_image``): the picture is scaled with Lanczos, then cropped
# (centred) or padded with its own stretched edge rows / columns.

RESIZE_MODES: Registry[Callable] = Registry("resize mode")


def _lanczos(img, size: tuple[int, int]):
    from PIL import Image

    return img.resize(size, resample=Image.Resampling.LANCZOS)


@RESIZE_MODES.register("Just resize", aliases=("0",))
def just_resize(img, w: int, h: int):
    return _lanczos(img, (w, h))


@RESIZE_MODES.register("Crop and resize", aliases=("1",))
def crop_and_resize(img, w: int, h: int):
    """Scale to cover w x h keeping the aspect ratio, crop the centre."""
    from PIL import Image

    wider = w / h > img.width / img.height
    sw = w if wider else img.width * h // img.height
    sh = h if not wider else img.height * w // img.width
    out = Image.new("RGB", (w, h))
    out.paste(_lanczos(img, (sw, sh)), box=(w // 2 - sw // 2, h // 2 - sh // 2))
    return out


@RESIZE_MODES.register("Resize and fill", aliases=("2",))
def resize_and_fill(img, w: int, h: int):
    """Scale to fit inside w x h keeping the aspect ratio; fill the bands by stretching the edge rows
    (or columns) of the scaled picture (PIL's default filter, as A1111)."""
    from PIL import Image

    taller = w / h < img.width / img.height  # the picture is relatively wider: bands above and below
    sw = w if taller else img.width * h // img.height
    sh = h if not taller else img.height * w // img.width
    small = _lanczos(img, (sw, sh))
    out = Image.new("RGB", (w, h))
    out.paste(small, box=(w // 2 - sw // 2, h // 2 - sh // 2))
    if taller:
        fill = h // 2 - sh // 2
        if fill > 0:
            out.paste(small.resize((w, fill), box=(0, 0, w, 0)), box=(0, 0))
            out.paste(small.resize((w, fill), box=(0, sh, w, sh)), box=(0, fill + sh))
    else:
        fill = w // 2 - sw // 2
        if fill > 0:
            out.paste(small.resize((fill, h), box=(0, 0, 0, h)), box=(0, 0))
            out.paste(small.resize((fill, h), box=(sw, 0, sw, h)), box=(fill + sw, 0))
    return out


def img2img_steps(steps: int, denoise: float) -> int:
    """Steps an img2img run makes of a ``steps``-step schedule (A1111's default, ``img2img_fix_steps``
    off): ``int(min(denoise, 0.999) * steps) + 1``, the schedule's last ones."""
    return int(min(denoise, 0.999) * steps) + 1
