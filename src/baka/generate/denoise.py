"""The denoising loop with A1111's classifier-free guidance: prompt schedules, composable diffusion
(``AND``) and prompt / negative of different lengths.

The scheduler is a diffusers one (built by :mod:`baka.generate.samplers`); what diffusers' pipeline
lacks and A1111 does is in :class:`CFGDenoiser`:

- the conditioning of step ``i`` (0-based) is the first schedule entry whose end step is >= ``i``
  (A1111's ``reconstruct_cond_batch``: so ``[a:b:10]`` uses ``a`` for sampler steps 0-10);
- ``AND`` sub-prompts each get a UNet pass; the guided output is
  ``uncond + sum_k w_k * cfg * (cond_k - uncond)`` (Liu et al. 2022, composable diffusion); sub-prompts
  of different lengths are padded by repeating their last token vector, as A1111 does;
- prompt and negative prompt of different token lengths are run as separate UNet passes (A1111's
  default, ``pad_cond_uncond`` off) instead of padding the shorter with empty-prompt chunks.

With one prompt, equal lengths and no schedule it computes exactly what diffusers'
``StableDiffusionPipeline`` computes (tests/test_denoise.py compares the two).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Schedule = list[tuple[int, torch.Tensor]]  # (end step, conditioning [1, tokens, width]) pairs


def alpha_at(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """alpha_bar at a (possibly fractional) timestep: log-sigma interpolated between the integer
    steps, as k-diffusion's ``DiscreteSchedule.t_to_sigma`` (the noise level the UNet is told)."""
    ac = alphas_cumprod.double()
    log_sigma = ((1 - ac) / ac).sqrt().log()
    t = t.double().clamp(0, len(ac) - 1)
    lo = t.floor().long()
    hi = t.ceil().long()
    w = t - lo
    sigma = ((1 - w) * log_sigma[lo] + w * log_sigma[hi]).exp()
    return 1 / (1 + sigma**2)


@dataclass
class Prediction:
    """What the UNet predicts (eps or v) over its training schedule, and the denoised estimate x0 it
    implies for its input x = sqrt(a) x0 + sqrt(1 - a) eps (the space A1111's k-diffusion denoiser,
    inpainting blend and dynamic thresholding work in)."""

    alphas_cumprod: torch.Tensor
    v_pred: bool = False

    def _coeffs(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = alpha_at(self.alphas_cumprod, torch.as_tensor(t).reshape(-1)[:1]).to(x.device)
        return a.sqrt().to(x.dtype), (1 - a).sqrt().to(x.dtype)

    def to_x0(self, pred: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sa, s1 = self._coeffs(x, t)
        return sa * x - s1 * pred if self.v_pred else (x - s1 * pred) / sa

    def from_x0(self, x0: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The prediction whose estimate is ``x0`` (finite at a = 0, zero-terminal SNR)."""
        sa, s1 = self._coeffs(x, t)
        return (sa * x - x0) / s1 if self.v_pred else (x - sa * x0) / s1


def at_step(schedule: Schedule, step: int) -> torch.Tensor:
    """The conditioning a schedule gives sampler step ``step`` (0-based; A1111's rule)."""
    for end, cond in schedule:
        if step <= end:
            return cond
    return schedule[-1][1]


def pad_tokens(conds: list[torch.Tensor]) -> list[torch.Tensor]:
    """Pad [1, L, D] conditionings to the longest L by repeating each one's last token vector."""
    n = max(c.shape[1] for c in conds)
    return [
        c if c.shape[1] == n else torch.cat([c, c[:, -1:].expand(-1, n - c.shape[1], -1)], 1) for c in conds
    ]


@dataclass
class CFGDenoiser:
    """One guided model evaluation per call, A1111-style."""

    unet: torch.nn.Module
    conds: list[tuple[Schedule, float]]  # per AND sub-prompt: its schedule and weight
    uncond: Schedule
    cfg: float
    guidance_rescale: float = 0.0
    pad_with: torch.Tensor | None = None  # A1111's pad_cond_uncond: the empty prompt's chunk
    # inpainting: (guided prediction, x, t) -> prediction, see baka.generate.inpaint.LatentBlend
    blend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # 9-channel inpainting models: [b, 5, h, w] (mask, masked-picture latents) beside each input
    image_cond: torch.Tensor | None = None
    # dynamic thresholding (baka.generate.dynthresh.DynThresh), on the x0 estimates of `prediction`
    dynthresh: object | None = None
    prediction: Prediction | None = None
    steps: int = 1  # the run's step count, for the thresholding's scale schedules

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        guided = self._guided(x, t, step)
        return guided if self.blend is None else self.blend(guided, x, t)

    def _guided(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        b = x.shape[0]
        conds = pad_tokens([at_step(s, step) for s, _ in self.conds])
        weights = [w for _, w in self.conds]
        if self.cfg == 1 and weights == [1.0] and self.dynthresh is None:  # guidance is the identity
            return self._unet(x, t, conds[0], b)
        uncond = at_step(self.uncond, step)
        if self.pad_with is not None and uncond.shape[1] != conds[0].shape[1]:
            uncond, *conds = self._pad([uncond, *conds])
        k = len(conds)
        if uncond.shape[1] == conds[0].shape[1]:
            both = torch.cat([uncond, *conds])
            out = self._unet(torch.cat([x] * (k + 1)), t, both, b).chunk(k + 1)
            u, cs = out[0], list(out[1:])
        else:
            u = self._unet(x, t, uncond, b)
            cs = list(self._unet(torch.cat([x] * k), t, torch.cat(conds), b).chunk(k))
        if self.dynthresh is not None:
            pr = self.prediction
            assert pr is not None, "dynamic thresholding needs the model's prediction type"
            x0 = self.dynthresh.combine(  # type: ignore[attr-defined]
                [pr.to_x0(c, x, t) for c in cs], pr.to_x0(u, x, t), weights, self.cfg, step, self.steps
            )
            guided = pr.from_x0(x0, x, t)
        else:
            guided = u.clone()
            for c, w in zip(cs, weights, strict=True):
                guided += (c - u) * (w * self.cfg)
        if self.guidance_rescale > 0:
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

            text = (
                cs[0] if weights == [1.0] else u + sum((c - u) * w for c, w in zip(cs, weights, strict=True))
            )
            guided = rescale_noise_cfg(guided, text, guidance_rescale=self.guidance_rescale)
        return guided

    def _pad(self, conds: list[torch.Tensor]) -> list[torch.Tensor]:
        """Append empty-prompt chunks to the shorter conditionings (all are whole 77-token chunks)."""
        e = self.pad_with
        n = max(c.shape[1] for c in conds)
        return [torch.cat([c, *[e] * ((n - c.shape[1]) // e.shape[1])], 1) for c in conds]

    def _unet(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, b: int) -> torch.Tensor:
        # each conditioning row serves the b images of the batch
        c = cond.repeat_interleave(b, dim=0).to(x.device, x.dtype)
        if self.image_cond is not None:  # the batch is k copies of the b images: one row each
            ic = self.image_cond.to(x.device, x.dtype)
            x = torch.cat([x, ic.repeat(x.shape[0] // ic.shape[0], 1, 1, 1)], 1)
        return self.unet(x, t, encoder_hidden_states=c, return_dict=False)[0]


def sample(
    denoiser: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    scheduler,
    latents: torch.Tensor,
    steps: int,
    *,
    generator=None,
    on_step: Callable[[int, int], bool] | None = None,
    progress: bool = False,
    start: int = 0,
    on_latents: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run ``scheduler`` (already ``set_timesteps``) from ``latents`` (noise scaled by
    ``init_noise_sigma``). ``steps`` is the user's step count: second-order samplers make ~2 model
    calls per step, and the prompt schedule counts steps, not calls. ``on_step(done, total)`` returning
    True stops the loop (interrupt); the latents as far as they got are returned.

    ``start`` > 0 (img2img, a hires second pass) starts at that index of ``scheduler.timesteps`` (the
    latents already noised to it, see :func:`noise_to`); the prompt schedule then counts from 0.

    ``on_latents`` gets, after each step, the scheduler's estimate of the clean latents where it gives
    one (``pred_original_sample``), else the latents: what a live preview shows."""
    import inspect

    from tqdm import tqdm

    if start and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    # an adaptive sampler (DPM adaptive) plans its calls as it goes: ask it for each one
    adaptive = getattr(scheduler, "adaptive", False)
    timesteps = scheduler.calls() if adaptive else scheduler.timesteps[start:]
    total = expected_calls(scheduler, start)
    accepted = set(inspect.signature(scheduler.step).parameters)
    kw = {"generator": generator} if "generator" in accepted else {}
    if "eta" in accepted:
        kw["eta"] = 0.0
    bar = tqdm(
        timesteps, total=None if adaptive else total, disable=not progress, leave=False, desc="sampling"
    )
    for i, t in enumerate(bar):
        x_in = scheduler.scale_model_input(latents, t)
        # the prompt schedule counts steps; A1111 counts an adaptive sampler's calls as steps
        pred = denoiser(x_in, t, i if adaptive else i * steps // total)
        out = scheduler.step(pred, t, latents, **kw, return_dict=True)
        latents = out[0]  # prev_sample (diffusers' outputs index like tuples)
        if on_latents is not None:
            x0 = getattr(out, "pred_original_sample", None)
            on_latents(latents if x0 is None else x0)
        if on_step is not None and on_step(i + 1, max(total, i + 1)):
            break
    return latents


def expected_calls(scheduler, start: int = 0) -> int:
    """The model calls a run from index ``start`` makes (an adaptive sampler's estimate: its steps)."""
    if getattr(scheduler, "adaptive", False):
        return scheduler.expected_calls
    return len(scheduler.timesteps) - start


def first_index(scheduler, schedule_steps: int, run_steps: int) -> int:
    """The index in ``scheduler.timesteps`` (set for ``schedule_steps``) where the last ``run_steps``
    steps begin; second-order schedulers list ``order`` timesteps per step (diffusers' img2img rule).
    baka's own samplers re-plan their calls over those steps instead (A1111's ``sigma_sched``) and
    start at 0."""
    if hasattr(scheduler, "truncate"):
        scheduler.truncate(schedule_steps, run_steps)
        return 0
    return max(schedule_steps - run_steps, 0) * getattr(scheduler, "order", 1)


def noise_to(scheduler, latents: torch.Tensor, noise: torch.Tensor, start: int) -> torch.Tensor:
    """``latents`` noised to the level of ``scheduler.timesteps[start]`` (k-diffusion's
    ``x + noise * sigma`` for sigma schedulers; diffusers' ``add_noise`` in each scheduler's own space)."""
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    t = scheduler.timesteps[start : start + 1]
    return scheduler.add_noise(latents, noise.to(latents.dtype), t.repeat(latents.shape[0]))
