"""Inpainting as A1111 1.10 does it: mask preparation, the two inpaint areas, masked content, the latent
blend during sampling, the final composite, and the image conditioning of 9-channel inpainting models.

What A1111's img2img does with a mask (``processing.StableDiffusionProcessingImg2Img.init`` and
``sample``, ``masking.py``, ``sd_samplers_cfg_denoiser.py``), restated:

1. The mask is made binary (alpha channel when it has a non-opaque one, else luminance; > 128 is
   masked), optionally inverted ("Inpaint not masked"), then blurred along x and along y with a
   Gaussian of sigma ``mask_blur`` and kernel ``2 * int(2.5 * sigma + 0.5) + 1`` (OpenCV's
   ``GaussianBlur``, reflect-101 border).
2. "Whole picture": mask and picture are resized to the generation size; the overlay mask is the
   resized mask doubled (so blur fades outward only). "Only masked": the mask's bounding box, grown by
   the padding and then to the generation aspect ratio, is cut out of both, resized with "Resize and
   fill", generated at full size and pasted back.
3. Masked content: "fill" repaints the masked part with blurred colours of its surroundings before
   encoding; "original" keeps it; "latent noise" / "latent nothing" replace its latents by the seed's
   noise / zeros.
4. During sampling the model's denoised estimate is replaced by the (clean) init latents where the
   picture is kept; after sampling the latents are blended the same way; after decoding, the original
   picture is composited back over everything outside the mask.

Step 4's blend is done here on the model prediction (eps or v), so it works under every diffusers
scheduler: in the kept region the prediction becomes the one whose x0 is the init latent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from baka.errors import BakaError
from baka.generate.denoise import Prediction, alpha_at
from baka.registry import Registry

# -- the mask ----------------------------------------------------------------------------------------


def binary_mask(image):
    """A1111's ``create_binary_mask``: the alpha channel if the mask has a non-opaque one, else its
    luminance; pixels above 128 are masked (255), the rest 0."""
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        image = image.getchannel("A")
    return image.convert("L").point(lambda v: 255 if v > 128 else 0)


def gaussian_kernel(sigma: float) -> np.ndarray:
    """The 1-D kernel A1111 asks OpenCV for: size ``2 * int(2.5 * sigma + 0.5) + 1``, weights
    ``exp(-x^2 / (2 sigma^2))`` normalised to sum 1 (``cv2.getGaussianKernel``)."""
    size = 2 * int(2.5 * sigma + 0.5) + 1
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def fixed_point_kernel(sigma: float) -> np.ndarray:
    """The kernel as OpenCV applies it to 8-bit pictures: weights in 1/256 steps, rounded from the
    outside in with the rounding error carried to the next weight, the centre taking what is left so
    the weights sum to exactly 256."""
    k = gaussian_kernel(sigma)
    out = np.zeros(len(k), dtype=np.int64)
    err = 0.0
    for i in range(len(k) // 2):
        v = k[i] * 256 + err
        out[i] = out[-1 - i] = int(np.rint(v))
        err = v - out[i]
    out[len(k) // 2] = 256 - 2 * out[: len(k) // 2].sum()
    return out


def _blur_axis(a: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    k = fixed_point_kernel(sigma)
    r = len(k) // 2
    pad = [(0, 0), (0, 0)]
    pad[axis] = (r, r)
    # OpenCV's default border (BORDER_REFLECT_101) is numpy's "reflect"
    p = np.pad(a.astype(np.int64), pad, mode="reflect")
    n = a.shape[axis]
    total = np.zeros(a.shape, dtype=np.int64)
    for i, w in enumerate(k):
        total += w * (p[i : i + n] if axis == 0 else p[:, i : i + n])
    return ((total + 128) >> 8).astype(np.uint8)  # 8.8 fixed point back to 8 bits, half up


def blur_mask(mask, sigma_x: float, sigma_y: float):
    """Blur an L mask along x, then along y, as A1111's two ``cv2.GaussianBlur`` calls do (equal to
    OpenCV's output bit for bit: tests/test_inpaint.py compares with a table OpenCV produced)."""
    from PIL import Image

    a = np.asarray(mask, dtype=np.uint8)
    for sigma, axis in ((sigma_x, 1), (sigma_y, 0)):
        if sigma > 0:
            a = _blur_axis(a, sigma, axis)
    return Image.fromarray(a, mode="L")


def crop_region(mask, pad: int) -> tuple[int, int, int, int] | None:
    """The box (x1, y1, x2, y2) around the mask's non-zero pixels, grown by ``pad`` and clipped to the
    picture; None for a blank mask (A1111's ``get_crop_region_v2``)."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    if not pad:
        return box
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, mask.width), min(y2 + pad, mask.height)


def _grow(lo: int, hi: int, want: float, limit: int) -> tuple[int, int]:
    """Grow the span [lo, hi) to ``want`` long, centred, then shift it back inside [0, limit)."""
    diff = int(want - (hi - lo))
    lo -= diff // 2
    hi += diff - diff // 2
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def expand_crop_region(
    box: tuple[int, int, int, int], width: int, height: int, image_w: int, image_h: int
) -> tuple[int, int, int, int]:
    """Grow ``box`` to the generation's aspect ratio ``width / height`` (A1111's ``expand_crop_region``:
    the short side grows, centred, shifted back inside the picture, clipped last)."""
    x1, y1, x2, y2 = box
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = _grow(y1, y2, (x2 - x1) / ratio, image_h)
    else:
        x1, x2 = _grow(x1, x2, (y2 - y1) * ratio, image_w)
    return x1, y1, x2, y2


def fill_masked(image, mask):
    """A1111's "fill": the masked part repainted with ever less blurred colours of the unmasked part
    (Gaussian radii 256, 64, 16 twice, 4 four times, 2 twice, then 0; each composited over the last)."""
    from PIL import Image, ImageFilter, ImageOps

    out = Image.new("RGBA", image.size)
    known = Image.new("RGBa", image.size)
    known.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = known.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


# -- masked content and inpaint area -----------------------------------------------------------------


@dataclass(frozen=True)
class MaskedContent:
    name: str
    info: str | None  # the infotext's ``Masked content`` (A1111 writes none for "original")
    fill: bool = False  # repaint the masked pixels before encoding
    # (init latents, keep mask, the seed's noise) -> the latents sampling starts from
    latent: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None


MASKED_CONTENT: Registry[MaskedContent] = Registry("masked content")
MASKED_CONTENT.add("fill", MaskedContent("fill", "fill", fill=True), ("0",))
MASKED_CONTENT.add("original", MaskedContent("original", None), ("1",))
MASKED_CONTENT.add(
    "latent noise",
    MaskedContent("latent noise", "latent noise", latent=lambda z, k, noise: z * k + noise * (1 - k)),
    ("2",),
)
MASKED_CONTENT.add(
    "latent nothing",
    MaskedContent("latent nothing", "latent nothing", latent=lambda z, keep, noise: z * keep),
    ("3",),
)


@dataclass
class Masked:
    """An init picture and its mask, prepared for one generation."""

    image: object  # PIL RGB at the generation size: what is encoded
    mask: object | None  # PIL L at the generation size (None: a blank "Only masked" mask, plain img2img)
    overlay: object | None = None  # PIL RGBA: the original where it is kept, transparent elsewhere
    paste_to: tuple[int, int, int, int] | None = None  # "Only masked": (x, y, w, h) in the original
    info: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def composite(self, image):
        """The generated picture with the original put back outside the mask (A1111's
        ``apply_overlay``; "Only masked" first pastes the result into the crop box)."""
        from PIL import Image

        from baka.generate.upscale import RESIZE_MODES

        if self.overlay is None:
            return image
        if self.paste_to is not None:
            x, y, w, h = self.paste_to
            base = Image.new("RGBA", self.overlay.size)
            base.paste(RESIZE_MODES.get("Crop and resize")(image, w, h), (x, y))
            image = base
        out = image.convert("RGBA")
        out.alpha_composite(self.overlay)
        return out.convert("RGB")


def _overlay(image, mask):
    """The original as RGBA, transparent where ``mask`` is (premultiplied paste, as A1111)."""
    from PIL import Image, ImageOps

    layer = Image.new("RGBa", image.size)
    layer.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    return layer.convert("RGBA")


def _whole_picture(image, mask, p, resize) -> Masked:
    mask = resize(mask, p.width, p.height).convert("L")
    image = resize(image, p.width, p.height)
    doubled = np.clip(np.asarray(mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8)
    from PIL import Image

    return Masked(image, mask, overlay=_overlay(image, Image.fromarray(doubled, mode="L")))


def _only_masked(image, mask, p, resize) -> Masked:
    from baka.generate.upscale import RESIZE_MODES

    box = crop_region(mask, p.inpaint_padding)
    if box is None:
        note = 'Unable to perform "Only masked" inpainting: the mask is blank; ran as img2img'
        return Masked(resize(image, p.width, p.height), None, notes=[note])
    x1, y1, x2, y2 = expand_crop_region(box, p.width, p.height, mask.width, mask.height)
    fill = RESIZE_MODES.get("Resize and fill")
    info = {"Inpaint area": "Only masked", "Masked area padding": p.inpaint_padding}
    return Masked(
        fill(image.crop((x1, y1, x2, y2)), p.width, p.height),
        fill(mask.crop((x1, y1, x2, y2)), p.width, p.height).convert("L"),
        overlay=_overlay(image, mask),
        paste_to=(x1, y1, x2 - x1, y2 - y1),
        info=info,
    )


INPAINT_AREAS: Registry[Callable] = Registry("inpaint area")
INPAINT_AREAS.add("Whole picture", _whole_picture, ("0", "False", "false"))
INPAINT_AREAS.add("Only masked", _only_masked, ("1", "True", "true"))


def prepare(image, mask, p) -> Masked:
    """``image`` (PIL) and its ``mask`` (PIL, white = repaint) prepared as A1111 does for the
    parameters ``p`` (mask_blur, mask_invert, inpaint_area, inpaint_padding, masked_content,
    resize_mode, width, height)."""
    from PIL import ImageOps

    from baka.generate.upscale import RESIZE_MODES

    resize = RESIZE_MODES.get(str(p.resize_mode))
    content = MASKED_CONTENT.get(str(p.masked_content))
    area = INPAINT_AREAS.get(str(p.inpaint_area))
    if p.mask_blur < 0:
        raise BakaError(f"mask blur {p.mask_blur}: must be 0 or more")
    image = image.convert("RGB")
    m = binary_mask(mask)
    if m.size != image.size:  # A1111's UI always sends the picture's size; an API client may not
        m = m.resize(image.size, resample=0)  # nearest: the mask stays binary
    info: dict[str, object] = {}
    if p.mask_invert:
        m = ImageOps.invert(m)
        info["Mask mode"] = "Inpaint not masked"
    if p.mask_blur > 0:
        m = blur_mask(m, p.mask_blur, p.mask_blur)
        info["Mask blur"] = p.mask_blur
    out = area(image, m, p, resize)
    if out.mask is not None:
        if content.fill:
            out.image = fill_masked(out.image, out.mask)
        if content.info:
            info["Masked content"] = content.info
    out.info = {**info, **out.info}
    return out


def latent_keep(mask, height: int, width: int) -> torch.Tensor:
    """[1, 1, h, w]: 1 where the picture is kept, from the prepared mask (A1111: the mask resized to
    the latent grid with PIL's default bicubic filter, scaled to 0..1 and rounded)."""
    small = mask.convert("RGB").resize((width, height))
    m = np.around(np.asarray(small, dtype=np.float32)[..., 0] / 255)
    return torch.from_numpy(1 - m)[None, None]


# -- the blend during sampling -------------------------------------------------------------------------


@dataclass
class LatentBlend:
    """A1111's inpainting blend on a noise / v prediction: where ``keep`` is 1 the prediction is
    replaced by the one whose denoised estimate is ``init`` (A1111 blends the estimate itself:
    ``denoised = init * mask + nmask * denoised``). Works under every scheduler, since it acts on the
    UNet's own input ``x`` (see :class:`baka.generate.denoise.Prediction`)."""

    init: torch.Tensor  # clean init latents [b, 4, h, w]
    keep: torch.Tensor  # [1, 1, h, w]
    prediction: Prediction

    def __call__(self, pred: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        target = self.prediction.from_x0(self.init.to(x.device, x.dtype), x, t)
        keep = self.keep.to(x.device, x.dtype)
        return pred + keep * (target - pred)

    def final(self, latents: torch.Tensor) -> torch.Tensor:
        """After sampling: the init latents wherever the picture is kept."""
        keep = self.keep.to(latents.device, latents.dtype)
        return latents * (1 - keep) + self.init.to(latents.device, latents.dtype) * keep


# -- 9-channel inpainting models -----------------------------------------------------------------------


def conditioning_image(image, mask, weight: float, height: int, width: int) -> torch.Tensor:
    """The picture a 9-channel model is shown, in -1..1, [1, 3, H, W]: the init picture with the masked
    part blanked to grey (A1111's ``inpainting_image_conditioning``: ``lerp(x, x * (1 - round(m)),
    weight)``); grey everywhere without a picture (txt2img) or without a mask (plain img2img)."""
    if image is None:
        return torch.zeros(1, 3, height, width)
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    x = x * 2 - 1
    m = conditioning_mask(mask, image.height, image.width)
    return torch.lerp(x, x * (1 - m), weight)


def conditioning_mask(mask, height: int, width: int) -> torch.Tensor:
    """[1, 1, H, W]: the rounded mask (1 = repaint), all ones without a mask."""
    if mask is None:
        return torch.ones(1, 1, height, width)
    return torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255).round()[None, None]


__all__ = [
    "INPAINT_AREAS",
    "MASKED_CONTENT",
    "LatentBlend",
    "Masked",
    "Prediction",
    "alpha_at",
    "binary_mask",
    "blur_mask",
    "conditioning_image",
    "conditioning_mask",
    "crop_region",
    "expand_crop_region",
    "fill_masked",
    "fixed_point_kernel",
    "gaussian_kernel",
    "latent_keep",
    "prepare",
]
