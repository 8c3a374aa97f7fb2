"""A1111's "DPM adaptive" sampler (k-diffusion's ``sample_dpm_adaptive``) as a diffusers scheduler.

DPM-Solver-23 with adaptive step size (Lu et al. 2022, https://arxiv.org/abs/2206.00927, section 4.2
"adaptive step size"): in time t = -log(sigma), from the model's largest to its smallest sigma, each
attempt evaluates the model at s, s + h/3 and s + 2h/3 and forms a 2nd-order and a 3rd-order
solution sharing those points. Their scaled difference (tolerance max(atol, rtol max(|x_low|,
|x_low of the last accepted step|)), RMS over every element of the batch) drives an integral step-size
controller: h *= 1 + atan(error^(-1/k) - 1), k = 3 (1.5 when ancestral); the attempt is accepted when
that factor is at least 0.81, else retried from s with the smaller h. Defaults as k-diffusion's: rtol
0.05, atol 0.0078, first h 0.05. The number of model calls is therefore not known in advance (the
step count is ignored, as in A1111); baka's loop asks the scheduler for each next call
(:meth:`DPMAdaptiveScheduler.calls`). A1111 runs it at its ancestral eta (default 1): an accepted step
stops at k-diffusion's ancestral sigma_down and adds noise up to its end.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from baka.generate.dpm_fast import intermediate, solver_step
from baka.generate.ksched import KSampler


class StepSizeController:
    """The integral (I) step-size controller of k-diffusion's adaptive DPM-Solver at its defaults
    (proportional and derivative gains 0): the factor is the limited (1 / error)^(1 / order)."""

    def __init__(self, h: float, order: float, accept_safety: float = 0.81, eps: float = 1e-8):
        self.h, self.order, self.accept_safety, self.eps = h, order, accept_safety, eps

    def propose(self, error: float) -> bool:
        factor = (1 / (error + self.eps)) ** (1 / self.order)
        factor = 1 + math.atan(factor - 1)  # a soft limit on how fast h may change
        self.h *= factor
        return factor >= self.accept_safety


class DPMAdaptiveScheduler(KSampler):
    """DPM-Solver-23 with adaptive steps (see the module docstring). The calls are planned one
    attempt (three calls) at a time, so ``timesteps`` grows while sampling."""

    sampler_name = "DPM adaptive"
    eta = 1.0  # A1111's eta for k-diffusion samplers that take one (its "eta_ancestral" option)
    fixed_schedule = "Automatic"  # it chooses its own steps
    adaptive = True
    rtol, atol, h_init = 0.05, 0.0078, 0.05

    def set_timesteps(self, num_inference_steps=None, device=None, *args, **kw):
        super().set_timesteps(num_inference_steps, device, *args, **kw)
        self.num_inference_steps = int(num_inference_steps)
        self.expected_calls = self.num_inference_steps  # for progress only; the steps are its own
        self._plan_run(*self.sigma_range(), device)

    def plan_over(self, sigmas: torch.Tensor, device) -> None:
        # A1111's img2img: between sigma_sched's last non-zero and first sigma
        self._plan_run(float(sigmas[-2]), float(sigmas[0]), device)

    def _plan_run(self, smin: float, smax: float, device) -> None:
        self.t_end = -torch.tensor(smin).log()
        self.s = -torch.tensor(smax).log()
        self.pid = StepSizeController(self.h_init, 1.5 if self.eta else 3)
        self.n_accept = self.n_reject = 0
        self._x_prev: torch.Tensor | None = None
        self._x: torch.Tensor | None = None
        self._eps: list[torch.Tensor] = []
        self.start(self._plan(), device)
        self.sigmas = torch.cat([self.call_sigmas, torch.tensor([smin])])

    def _plan(self) -> torch.Tensor:
        """The next attempt from s with the controller's h: its target (ancestral sigma_down when eta),
        the noise added after it, and its three calls' sigmas."""
        t = torch.minimum(self.t_end, self.s + self.pid.h)
        self.target, self.noise_up = t, torch.zeros(())
        if self.eta:  # k-diffusion's get_ancestral_step, then the target clamped at t_end
            s_from, s_to = self.s.neg().exp(), t.neg().exp()
            up = torch.minimum(s_to, self.eta * (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5)
            self.target = torch.minimum(self.t_end, -((s_to**2 - up**2) ** 0.5).log())
            self.noise_up = (t.neg().exp() ** 2 - self.target.neg().exp() ** 2) ** 0.5
        self.t_next = t
        h = self.target - self.s
        # one scalar exp each, as k-diffusion (a vectorised exp may round differently)
        return torch.stack([v.neg().exp() for v in (self.s, self.s + 1 / 3 * h, self.s + 2 / 3 * h)])

    def calls(self) -> Iterator[torch.Tensor]:
        """The timestep of each model call, planned as the run goes."""
        while self._call < len(self.call_sigmas):
            yield self.timesteps[self._call]

    def _extend(self, sigmas: torch.Tensor) -> None:
        self.call_sigmas = torch.cat([self.call_sigmas, sigmas.float()])
        self.timesteps = torch.cat([self.timesteps, self.timesteps_of(sigmas).to(self.timesteps.device)])

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, **kw):
        denoised, sigma = self.denoised(model_output, sample)
        x = sample.float()
        if not self._eps:
            self._x = x
            if self._x_prev is None:
                self._x_prev = x
        assert self._x is not None and self._x_prev is not None
        self._eps.append((x - denoised) / sigma)
        x0, e, h = self._x, self._eps, self.target - self.s
        if len(e) < 3:
            return self.finish(intermediate(x0, e, self.s, h, 3), denoised, sample, return_dict)
        low = solver_step(x0, e[:2], self.target, h, 2, r1=1 / 3)
        high = solver_step(x0, e, self.target, h, 3)
        rtol, atol = torch.tensor(self.rtol), torch.tensor(self.atol)
        delta = torch.maximum(atol, rtol * torch.maximum(low.abs(), self._x_prev.abs()))
        error = float(torch.linalg.norm((low - high) / delta)) / low.numel() ** 0.5
        self._eps = []
        if self.pid.propose(error):
            self._x_prev, self.s = low, self.t_next
            out = high + self.noise_up * self.s_noise * self.noise(high, generator)
            self.n_accept += 1
        else:  # retried from the same point with the smaller step
            out = x0
            self.n_reject += 1
        if float(self.s) < float(self.t_end) - 1e-5:
            self._extend(self._plan())
        return self.finish(out, denoised, sample, return_dict)


__all__ = ["DPMAdaptiveScheduler", "StepSizeController"]
