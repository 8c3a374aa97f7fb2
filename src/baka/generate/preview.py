"""Live previews: latents to a small RGB picture without the VAE.

A1111's "Approx cheap" preview: a fixed 4 -> 3 linear map of SD1.x latents (the coefficients A1111 1.10's
``sd_vae_approx.cheap_approximation`` uses, from the Hugging Face forum thread "Decoding latents to RGB
without upscaling"), then (x + 1) / 2 clamped to [0, 1]. One pixel per latent (1/8 of the picture's size)."""

from __future__ import annotations

import torch

# rows: latent channels 0-3; columns: R, G, B
SD1_LATENT_RGB = torch.tensor(
    [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ]
)


def approx_rgb(latents: torch.Tensor) -> torch.Tensor:
    """[.., 4, h, w] latents -> [.., 3, h, w] in [0, 1]."""
    rgb = torch.einsum("...lhw,lr->...rhw", latents.float(), SD1_LATENT_RGB.to(latents.device))
    return ((rgb + 1) / 2).clamp(0, 1)


def preview_image(latents: torch.Tensor):
    """The first latents of a batch as a PIL picture (latent size), A1111's cheap approximation."""
    from PIL import Image

    x = latents[0] if latents.dim() == 4 else latents
    rgb = (approx_rgb(x[:4]) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(rgb, "RGB")


__all__ = ["SD1_LATENT_RGB", "approx_rgb", "preview_image"]
