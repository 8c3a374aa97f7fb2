"""The common ground of baka's own samplers (Restart, DPM fast, DPM adaptive): k-diffusion-style maths
on diffusers' scheduler interface, which baka's denoising loop runs like any other scheduler.

A subclass lists one timestep per model call (``call_sigmas``); ``scale_model_input`` gives the model
x / sqrt(sigma^2 + 1) at the current call, ``denoised`` turns its output back into k-diffusion's
denoised estimate (epsilon or v-prediction), and x_T = noise * sigma_max. img2img and the hires second
pass re-plan the calls over the schedule's tail (``truncate``), as A1111 runs them.
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

    def timesteps_of(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The model's (fractional) timesteps at ``sigmas``, float32."""
        from baka.generate.samplers import _log_sigmas, sigma_to_t

        return sigma_to_t(_log_sigmas(self.alphas_cumprod), sigmas).float()

    def start(self, sigmas: torch.Tensor, device) -> None:
        """Set the calls' sigmas (and their timesteps) and go back to the first call."""
        if self.config.rescale_betas_zero_snr:
            raise BakaError(f"sampler {self.sampler_name!r} does not support zero terminal SNR")
        self.call_sigmas = sigmas.float()
        self.timesteps = self.timesteps_of(sigmas).to(device or "cpu")
        self._call = 0
        self.start_sigma = float(sigmas[0])  # what add_noise noises to (truncate sets A1111's own)

    def model_alphas(self) -> torch.Tensor:
        """alphas_cumprod as A1111's model holds them: LDM's product in float64, stored as float32
        (diffusers multiplies in float32; the last digits differ)."""
        c = self.config
        if c.beta_schedule == "scaled_linear" and c.trained_betas is None and not c.rescale_betas_zero_snr:
            n, lo, hi = c.num_train_timesteps, c.beta_start**0.5, c.beta_end**0.5
            b = torch.linspace(lo, hi, n, dtype=torch.float64) ** 2
            return torch.cumprod(1 - b, 0).float()
        return self.alphas_cumprod.float()

    def sigma_range(self) -> tuple[float, float]:
        """The model's smallest and largest sigma, float32 as A1111's k-diffusion wrapper computes them
        (CompVisDenoiser: sqrt((1 - alphas_cumprod) / alphas_cumprod))."""
        a = self.model_alphas()
        sig = ((1 - a) / a) ** 0.5
        return float(sig.min()), float(sig.max())

    @property
    def init_noise_sigma(self) -> float:  # type: ignore[override]
        return self.sigma_range()[1]  # k-diffusion: x_T = noise * sigma_max

    def set_begin_index(self, begin_index: int = 0) -> None:
        if begin_index:  # img2img re-plans the calls instead (truncate), then starts at call 0
            raise BakaError(f"sampler {self.sampler_name!r}: img2img starts through truncate(), at call 0")

    def schedule_sigmas(self, steps: int) -> torch.Tensor:
        """The n + 1 sigmas A1111 gives this sampler for ``steps`` steps (its Automatic schedule for
        these samplers: the model's own spacing, A1111's "Uniform")."""
        from baka.generate.samplers import SCHEDULES

        sigmas = SCHEDULES.get("Uniform").sigmas
        assert sigmas is not None
        return sigmas(steps, self.model_alphas()).float()

    def plan_over(self, sigmas: torch.Tensor, device) -> None:
        """Plan the model calls of a run over ``sigmas`` (A1111's sigma schedule, ending in 0)."""
        raise NotImplementedError

    def truncate(self, schedule_steps: int, run_steps: int) -> None:
        """img2img and the hires second pass as A1111 runs a k-diffusion sampler: over the last
        ``run_steps`` steps of a ``schedule_steps``-step schedule (``sigma_sched = sigmas[steps - t_enc
        - 1:]``), from the picture's latents plus noise times ``sigma_sched[0]`` (:meth:`add_noise`)."""
        sched = self.schedule_sigmas(schedule_steps)[max(schedule_steps - run_steps, 0) :]
        self.plan_over(sched, self.timesteps.device)
        self.start_sigma = float(sched[0])  # A1111's, not the first call's (DPM-Solver rounds it via t)

    def add_noise(self, original_samples, noise, timesteps=None):  # type: ignore[override]
        return original_samples + noise * self.start_sigma  # A1111: xi = x + noise * sigma_sched[0]

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
