"""The diffusion training loss: forward noising, the eps / v target, min-SNR weighting.

:func:`diffusion_loss` is pure (no RNG, no globals): the caller draws the noise and timesteps
(:func:`draw_noise`) and passes the schedule's ``alphas_cumprod``. Zero-terminal-SNR lives in the
schedule itself (its last ``alphas_cumprod`` is 0, so the last SNR is exactly 0)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class NoiseSchedule:
    alphas_cumprod: torch.Tensor  # [T], float32
    snr: torch.Tensor  # alphas_cumprod / (1 - alphas_cumprod)

    @classmethod
    def of(cls, alphas_cumprod: torch.Tensor) -> NoiseSchedule:
        return cls(alphas_cumprod, alphas_cumprod / (1 - alphas_cumprod))

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]


def ddpm_schedule(scheduler_config: dict, zero_terminal_snr: bool, device) -> NoiseSchedule:
    """The model's DDPM training schedule (diffusers' betas), rescaled to zero terminal SNR if asked."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(scheduler_config, rescale_betas_zero_snr=zero_terminal_snr)
    return NoiseSchedule.of(sched.alphas_cumprod.to(device))


def draw_noise(
    shape: torch.Size, gen: torch.Generator, num_timesteps: int, noise_offset: float, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, timesteps) for a batch of latents, drawn from ``gen`` in a fixed order (resume depends
    on it): the Gaussian noise, then the per-channel offset noise (if ``noise_offset``), then t."""
    noise = torch.randn(shape, generator=gen).to(device)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(shape[:2] + (1, 1), generator=gen).to(device)
    t = torch.randint(0, num_timesteps, (shape[0],), generator=gen).to(device)
    return noise, t


def _coefficients(
    alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(a_t), sqrt(1 - a_t)) shaped to broadcast over ``like`` (as diffusers computes them)."""
    ac = alphas_cumprod.to(device=like.device, dtype=like.dtype)[t.to(like.device)]
    shape = (-1,) + (1,) * (like.ndim - 1)
    return (ac**0.5).reshape(shape), ((1 - ac) ** 0.5).reshape(shape)


def add_noise(alphas_cumprod: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps."""
    a, b = _coefficients(alphas_cumprod, t, latents)
    return a * latents + b * noise


def velocity(alphas_cumprod: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """v = sqrt(a_t) eps - sqrt(1 - a_t) x_0."""
    a, b = _coefficients(alphas_cumprod, t, latents)
    return a * noise - b * latents


def min_snr_weights(snr: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Hang et al. 2023: eps w = min(snr, g) / snr ; v w = min(snr, g) / (snr + 1). An eps sample at
    SNR 0 (zero-terminal-SNR's last step) gets weight 1."""
    g = torch.clamp(snr, max=gamma)
    if v_prediction:
        return g / (snr + 1)
    return torch.where(snr > 0, g / snr.clamp_min(1e-12), torch.ones_like(snr))


def diffusion_loss(
    denoiser: Denoiser,
    latents: torch.Tensor,
    cond: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    v_prediction: bool = False,
    min_snr_gamma: float | None = None,
) -> torch.Tensor:
    """Mean over the batch of the per-sample MSE between ``denoiser(x_t, t, cond)`` and the target
    (``noise``, or the velocity with ``v_prediction``), min-SNR weighted when ``min_snr_gamma``."""
    pred = denoiser(add_noise(schedule.alphas_cumprod, latents, noise, t), t, cond)
    target = velocity(schedule.alphas_cumprod, latents, noise, t) if v_prediction else noise
    per = nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:
        per = per * min_snr_weights(schedule.snr[t], min_snr_gamma, v_prediction)
    return per.mean()
