"""A1111's "Restart" sampler as a diffusers scheduler (baka's denoising loop runs any scheduler).

Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes"): Heun steps
down a Karras schedule; at the restart interval's low end the sample is noised back up to its high end
and that stretch is run again, which contracts the errors the earlier steps made. A1111's parameters
(modules/sd_samplers_extra.py, its sampler table's Karras default): under 20 steps no restarts; from
20 steps the run is a Karras schedule of ``steps - k * times`` steps plus ``times`` restarts of ``k``
Heun steps each over sigma [0.1, 2] (both ends taken as the nearest schedule sigmas), with k = 9 and
one restart, or from 36 steps k = steps // 4 and two; a restart adds noise of standard deviation
sqrt(hi^2 - lo^2); the last step (to sigma 0) is an Euler step. Each segment evaluates the model
twice (once for the Euler step), so a run makes about twice as many model calls as it has steps.
img2img and the hires second pass run it over the tail of the Karras schedule (A1111's
``sigma_sched``), with the same rules.
"""

from __future__ import annotations

import torch

from baka.generate.ksched import KSampler

RESTART_FROM = 20  # A1111: restarts from this many steps on
RESTART_SPAN = (0.1, 2.0)  # the interval (sigma) run again


def restart_segments(sigmas: torch.Tensor) -> list[tuple[float, float]]:
    """The (from, to) sigma of every Heun segment of A1111's Restart run over ``sigmas`` (its schedule:
    n + 1 values ending in 0; k-diffusion's float32 Karras sigmas, as A1111 computes them). From 20
    steps the run is a fresh Karras schedule between ``sigmas[-2]`` and ``sigmas[0]``, as A1111's."""
    from baka.generate.samplers import karras as _k

    def karras(n: int, lo: float, hi: float) -> torch.Tensor:
        return _k(n, lo, hi, dtype=torch.float32)

    steps = len(sigmas) - 1
    if steps >= RESTART_FROM:
        k, times = (steps // 4, 2) if steps >= 36 else (9, 1)
        base = karras(steps - k * times, float(sigmas[-2]), float(sigmas[0]))
    else:
        k, times, base = 0, 0, sigmas.float()
    low = int(torch.argmin((base - RESTART_SPAN[0]).abs()))
    high = int(torch.argmin((base - RESTART_SPAN[1]).abs()))
    segments = []
    for i in range(len(base) - 1):
        segments.append((float(base[i]), float(base[i + 1])))
        if times and i + 1 == low and high < low:
            again = karras(k + 1, float(base[low]), float(base[high]))[:-1]
            segments += [(float(a), float(b)) for a, b in zip(again[:-1], again[1:], strict=True)] * times
    return segments


class RestartScheduler(KSampler):
    """Restart sampling (see the module docstring): the timesteps list one entry per model call,
    ``step`` keeps the Heun state between a segment's two calls."""

    sampler_name = "Restart"
    fixed_schedule = "Karras"  # A1111 recomputes Karras sigmas from 20 steps on, whatever was chosen

    def set_timesteps(self, num_inference_steps=None, device=None, *args, **kw):
        super().set_timesteps(num_inference_steps, device, *args, **kw)
        self.num_inference_steps = int(num_inference_steps)
        self.plan_over(self.schedule_sigmas(self.num_inference_steps), device)

    def schedule_sigmas(self, steps: int) -> torch.Tensor:
        from baka.generate.samplers import karras

        return karras(steps, *self.sigma_range(), dtype=torch.float32)

    def plan_over(self, sigmas: torch.Tensor, device) -> None:
        self.segments = restart_segments(sigmas)
        calls: list[tuple[float, str]] = []
        for a, b in self.segments:
            calls += [(a, "euler")] if b == 0 else [(a, "first"), (b, "second")]
        self.calls = calls
        self.start(torch.tensor([s for s, _ in calls]), device)
        self.sigmas = torch.cat([self.call_sigmas, torch.zeros(1)])
        self._segment = 0
        self._heun: tuple[torch.Tensor, torch.Tensor, float] | None = None

    @property
    def order(self) -> int:  # type: ignore[override]
        return 2

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, **kw):
        kind = self.calls[self._call][1]
        denoised, sigma = self.denoised(model_output, sample)
        x = sample.float()
        d = (x - denoised) / sigma
        a, b = self.segments[self._segment]
        if kind == "first":  # Heun's predictor: the second call is at b from here
            self._heun = (x, d, b - a)
            return self.finish(x + d * (b - a), denoised, sample, return_dict)
        if kind == "second":
            assert self._heun is not None
            x0, d1, dt = self._heun
            out = x0 + (d1 + d) / 2 * dt
        else:  # the step to sigma 0: Euler
            out = x + d * (b - a)
        self._segment += 1
        if self._segment < len(self.segments):
            nxt = self.segments[self._segment][0]
            if nxt > b:  # a restart: back up to the interval's top with fresh noise
                out = out + self.noise(out, generator) * self.s_noise * (nxt**2 - b**2) ** 0.5
        return self.finish(out, denoised, sample, return_dict)


__all__ = ["RestartScheduler", "restart_segments"]
