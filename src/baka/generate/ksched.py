"""The common ground of baka's own samplers (Restart, DPM fast, DPM adaptive): k-diffusion-style maths
on diffusers' scheduler interface, which baka's denoising loop runs like any other scheduler.

A subclass lists one timestep per model call (``call_sigmas``); ``scale_model_input`` gives the model
x / sqrt(sigma^2 + 1) at the current call, ``denoised`` turns its output back into k-diffusion's
denoised estimate (epsilon or v-prediction), and x_T = noise * sigma_max. They run from pure noise only.
"""

from __future__ import annotations

import torch
from diffusers import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput

from baka.errors import BakaError


class KSampler(EulerDiscreteScheduler):
    """Base of a scheduler that makes one model call per entry of ``call_sigmas``."""

    sampler_name = ""  # A1111's name, for the errors
    s_noise = 1.0
    call_sigmas: torch.Tensor
    _call = 0

    def start(self, sigmas: torch.Tensor, device) -> None:
        """Set the calls' sigmas (and their timesteps) and go back to the first call."""
        from baka.generate.samplers import _log_sigmas, sigma_to_t

        if self.config.rescale_betas_zero_snr:
            raise BakaError(f"sampler {self.sampler_name!r} does not support zero terminal SNR")
        self.call_sigmas = sigmas.float()
        self.timesteps = sigma_to_t(_log_sigmas(self.alphas_cumprod), sigmas).float().to(device or "cpu")
        self._call = 0

    def sigma_range(self) -> tuple[float, float]:
        """The model's smallest and largest sigma, float32 as A1111's k-diffusion wrapper computes them
        (CompVisDenoiser: sqrt((1 - alphas_cumprod) / alphas_cumprod) on LDM's float32 alphas)."""
        a = self.alphas_cumprod.float()
        c = self.config
        if c.beta_schedule == "scaled_linear" and c.trained_betas is None and not c.rescale_betas_zero_snr:
            # LDM's (A1111's) alphas_cumprod: the product in float64, stored as float32
            n, lo, hi = c.num_train_timesteps, c.beta_start**0.5, c.beta_end**0.5
            b = torch.linspace(lo, hi, n, dtype=torch.float64) ** 2
            a = torch.cumprod(1 - b, 0).float()
        sig = ((1 - a) / a) ** 0.5
        return float(sig.min()), float(sig.max())

    @property
    def init_noise_sigma(self) -> float:  # type: ignore[override]
        return self.sigma_range()[1]  # k-diffusion: x_T = noise * sigma_max

    def set_begin_index(self, begin_index: int = 0) -> None:
        if begin_index:
            raise BakaError(f"sampler {self.sampler_name!r} runs from pure noise only (not img2img or hires)")

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        sigma = float(self.call_sigmas[self._call])
        return sample / (sigma**2 + 1) ** 0.5

    def denoised(self, model_output: torch.Tensor, sample: torch.Tensor) -> tuple[torch.Tensor, float]:
        """k-diffusion's denoised estimate at the current call, and its sigma."""
        sigma = float(self.call_sigmas[self._call])
        x, out = sample.float(), model_output.float()
        if self.config.prediction_type == "v_prediction":  # k-diffusion's v-parameterisation
            return x / (sigma**2 + 1) - out * sigma / (sigma**2 + 1) ** 0.5, sigma
        return x - sigma * out, sigma

    def noise(self, like: torch.Tensor, generator) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(like.shape, generator=generator, device=like.device, dtype=like.dtype)

    def finish(self, out: torch.Tensor, denoised: torch.Tensor, sample: torch.Tensor, return_dict: bool):
        """The call is done: the next sample (in ``sample``'s dtype) and the denoised estimate."""
        self._call += 1
        out = out.to(sample.dtype)
        if not return_dict:
            return (out,)
        return EulerDiscreteSchedulerOutput(prev_sample=out, pred_original_sample=denoised.to(sample.dtype))


__all__ = ["KSampler"]
