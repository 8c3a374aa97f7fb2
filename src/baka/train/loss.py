"""The diffusion training loss: forward noising, the eps / v target, per-timestep weighting
(min-SNR and kohya's other loss-weight options).

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
    shape: torch.Size,
    gen: torch.Generator,
    num_timesteps: int,
    noise_offset: float,
    device,
    timesteps: tuple[int, int | None] = (0, None),
) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, timesteps) for a batch of latents, drawn from ``gen`` in a fixed order (resume depends
    on it): the Gaussian noise, then the per-channel offset noise (if ``noise_offset``), then t,
    uniform in [lo, hi) of ``timesteps`` (kohya's min_timestep / max_timestep; hi None: all)."""
    noise = torch.randn(shape, generator=gen).to(device)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(shape[:2] + (1, 1), generator=gen).to(device)
    lo, hi = timesteps
    t = torch.randint(lo, num_timesteps if hi is None else hi, (shape[0],), generator=gen).to(device)
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


def _safe(snr: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weight 1 where SNR is 0 (zero terminal SNR), where the formulas below divide by 0."""
    return torch.where(snr > 0, w, torch.ones_like(w))


@dataclass(frozen=True)
class LossWeighting:
    """Per-timestep loss weights, kohya sd-scripts' options under their names, applied in kohya's order:
    min-SNR, then ``scale_v_pred_loss_like_noise_pred``, then ``v_pred_like_loss``, then
    ``debiased_estimation_loss``. kohya clamps the SNR at 1000 (t = 0 would be infinite) for the last
    three; so does this. Formulas (s = min(SNR, 1000)):

    - scale_v_pred_loss_like_noise_pred: w *= s / (s + 1)   (a v loss scaled like an eps loss)
    - v_pred_like_loss = k:               w *= 1 + k (s + 1) / s   (adds k times a v-like loss)
    - debiased_estimation_loss:           w *= 1 / sqrt(s) (eps), 1 / (s + 1) (v)   (Yu et al. 2023)
    """

    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float = 0.0
    debiased_estimation_loss: bool = False

    def weights(self, snr: torch.Tensor, v_prediction: bool) -> torch.Tensor:
        w = torch.ones_like(snr)
        if self.min_snr_gamma:
            w = w * min_snr_weights(snr, self.min_snr_gamma, v_prediction)
        s = snr.clamp(max=1000.0)
        pos = s.clamp_min(1e-12)
        if self.scale_v_pred_loss_like_noise_pred:
            w = w * (s / (s + 1))
        if self.v_pred_like_loss:
            w = w * _safe(snr, 1 + self.v_pred_like_loss * (s + 1) / pos)
        if self.debiased_estimation_loss:
            w = w * (1 / (s + 1) if v_prediction else _safe(snr, pos.rsqrt()))
        return w


def diffusion_loss(
    denoiser: Denoiser,
    latents: torch.Tensor,
    cond: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    v_prediction: bool = False,
    weighting: LossWeighting | None = None,
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over the batch of the per-sample MSE between ``denoiser(x_t, t, cond)`` and the target
    (``noise``, or the velocity with ``v_prediction``), weighted per timestep by ``weighting`` and
    per sample by ``sample_weights`` (kohya's prior_loss_weight on regularisation images)."""
    per = _per_sample(denoiser, latents, cond, noise, t, schedule, v_prediction, weighting)
    if sample_weights is not None:
        per = per * sample_weights
    return per.mean()


def _per_sample(denoiser, latents, cond, noise, t, schedule, v_prediction, weighting) -> torch.Tensor:
    pred = denoiser(add_noise(schedule.alphas_cumprod, latents, noise, t), t, cond)
    target = velocity(schedule.alphas_cumprod, latents, noise, t) if v_prediction else noise
    per = _mse(pred, target)
    if weighting is not None:
        per = per * weighting.weights(schedule.snr[t], v_prediction)
    return per


def _mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error, in float32."""
    return nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def caption_free_loss(
    denoiser: Denoiser,
    latents: torch.Tensor,
    cond: torch.Tensor,
    empty: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    below: int,
    *,
    v_prediction: bool = False,
    weighting: LossWeighting | None = None,
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`diffusion_loss`, except on the samples whose timestep is below ``below``: there the noise
    loss is on the empty caption ``empty`` (the unconditional branch learns the low-noise steps from every
    sample), and every other such sample (even positions in the batch) instead pulls the *captioned*
    prediction to the uncaptioned one (MSE to a stop-gradient target, unweighted). The two branches then
    agree on the low-noise steps, so classifier-free guidance has nothing there to amplify: the
    training-side counterpart of guidance only on the middle noise levels (Kynkaenniemi et al. 2024,
    "Applying guidance in a limited interval"), for a model whose users guide every step at CFG 7."""
    low = t < below
    distill = low & (torch.arange(len(t), device=t.device) % 2 == 0)
    keep = ~distill
    per = torch.zeros(len(t), device=latents.device)
    if keep.any():
        ids = torch.where(low.view(-1, *[1] * (cond.dim() - 1)), empty, cond)[keep]
        per[keep] = _per_sample(
            denoiser, latents[keep], ids, noise[keep], t[keep], schedule, v_prediction, weighting
        )
    if distill.any():
        x = add_noise(schedule.alphas_cumprod, latents[distill], noise[distill], t[distill])
        with torch.no_grad():
            target = denoiser(x, t[distill], empty[distill])
        pred = denoiser(x, t[distill], cond[distill])
        per[distill] = _mse(pred, target)
    if sample_weights is not None:
        per = per * sample_weights
    return per.mean()
