"""A1111's "DPM fast" sampler (k-diffusion's ``sample_dpm_fast``) as a diffusers scheduler.

DPM-Solver-Fast (Lu et al. 2022, https://arxiv.org/abs/2206.00927, Algorithm "fast"): in time
t = -log(sigma), from the model's largest to its smallest sigma, floor(n / 3) + 1 equal steps of
orders 3, 3, ..., 3 and then 2, 1 (when n divides by 3) or n mod 3, so the run makes exactly n model
calls. An order-k step evaluates the model at t and at t + h/2 (k = 2) or t + h/3 and t + 2h/3 (k = 3)
and combines the noise predictions by the DPM-Solver-k update. A1111 runs it at its ancestral eta
(default 1): each step then stops at k-diffusion's ancestral sigma_down and adds noise up to the step's
end (also after the last step, which ends at sigma_min, not 0).
"""

from __future__ import annotations

import torch

from baka.errors import BakaError
from baka.generate.ksched import KSampler

# The updates below are DPM-Solver's (the paper's eqs. for orders 1-3), written with 0-d float32
# tensors in k-diffusion's order of operations: the adaptive sampler's step-size control feeds back
# differences near float rounding, so the same rounding keeps it on k-diffusion's steps.


def _sig(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def intermediate(x: torch.Tensor, e: list[torch.Tensor], t: torch.Tensor, h: torch.Tensor, order: int):
    """DPM-Solver's next evaluation point of an order-2 / order-3 step from ``x`` at time t with the
    noise predictions ``e`` so far (u1 at r1 = 1/2 or 1/3, u2 at r2 = 2/3)."""
    r1, r2 = (1 / 2, None) if order == 2 else (1 / 3, 2 / 3)
    if len(e) == 1:
        return x - _sig(t + r1 * h) * (r1 * h).expm1() * e[0]
    assert r2 is not None
    s2 = t + r2 * h
    out = x - _sig(s2) * (r2 * h).expm1() * e[0]
    return out - _sig(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (e[1] - e[0])


def solver_step(
    x: torch.Tensor, e: list[torch.Tensor], target: torch.Tensor, h: torch.Tensor, order: int, r1=0.5
):
    """The DPM-Solver-``order`` update from ``x`` to time ``target`` (step h) with the step's noise
    predictions ``e`` (order 2's midpoint at r1 h: 1/2, or 1/3 when it shares order 3's points)."""
    sn = _sig(target)
    out = x - sn * h.expm1() * e[0]
    if order == 2:
        out = out - sn / (2 * r1) * h.expm1() * (e[1] - e[0])
    elif order == 3:
        out = out - sn / (2 / 3) * (h.expm1() / h - 1) * (e[2] - e[0])
    return out


def fast_plan(n: int, sigma_min: float, sigma_max: float, eta: float) -> list[dict]:
    """The steps of an n-call DPM-Solver-Fast run: order, t, the (ancestral) target t, the noise
    added after it, and the times the model is called at."""
    if n < 1:
        raise BakaError("DPM fast needs at least 1 step")
    t_start = -torch.tensor(sigma_max).log()
    t_end = -torch.tensor(sigma_min).log()
    m = n // 3 + 1
    ts = torch.linspace(float(t_start), float(t_end), m + 1)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    steps = []
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        s_from, s_to = float((-t).exp()), float((-t_next).exp())
        su = 0.0
        target = t_next
        if eta:  # k-diffusion's get_ancestral_step, then the target clamped at t_end
            up = min(s_to, eta * (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5)
            down = (s_to**2 - up**2) ** 0.5
            target = torch.minimum(t_end, -torch.tensor(down).log())
            su = float(((-t_next).exp() ** 2 - (-target).exp() ** 2) ** 0.5)
        h = target - t
        times = [t, t + h / 2] if order == 2 else [t, t + h / 3, t + 2 * h / 3] if order == 3 else [t]
        steps.append({"order": order, "t": t, "target": target, "noise": su, "times": times})
    return steps


class DPMFastScheduler(KSampler):
    """DPM-Solver-Fast (see the module docstring): one timestep per model call, ``step`` keeps the
    step's earlier noise predictions until its last call."""

    sampler_name = "DPM fast"
    eta = 1.0  # A1111's eta for k-diffusion samplers that take one (its "eta_ancestral" option)
    fixed_schedule = "Automatic"  # its own spacing in log-sigma

    def plan_over(self, sigmas: torch.Tensor, device) -> None:
        # A1111's img2img: n = len(sigma_sched) - 1 calls between its last non-zero and first sigma
        self._plan(len(sigmas) - 1, float(sigmas[-2]), float(sigmas[0]), device)

    def set_timesteps(self, num_inference_steps=None, device=None, *args, **kw):
        super().set_timesteps(num_inference_steps, device, *args, **kw)
        self._plan(int(num_inference_steps), *self.sigma_range(), device)

    def _plan(self, n: int, smin: float, smax: float, device) -> None:
        self.plan = fast_plan(n, smin, smax, self.eta)
        self.calls = [(i, j) for i, step in enumerate(self.plan) for j in range(len(step["times"]))]
        self.start(torch.stack([(-t).exp() for step in self.plan for t in step["times"]]), device)
        self.sigmas = torch.cat([self.call_sigmas, torch.tensor([smin])])
        self.num_inference_steps = n
        self._x: torch.Tensor | None = None
        self._eps: list[torch.Tensor] = []

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, **kw):
        i, j = self.calls[self._call]
        s = self.plan[i]
        denoised, sigma = self.denoised(model_output, sample)
        eps = (sample.float() - denoised) / sigma
        if j == 0:
            self._x, self._eps = sample.float(), []
        self._eps.append(eps)
        x0, e = self._x, self._eps
        assert x0 is not None
        t, target, order = s["t"], s["target"], s["order"]
        h = target - t

        if len(e) < order:  # the next call's input: DPM-Solver's intermediate point
            return self.finish(intermediate(x0, e, t, h, order), denoised, sample, return_dict)
        out = solver_step(x0, e, target, h, order)
        # k-diffusion draws the step's noise even at eta 0 (su = 0): the same draws either way
        out = out + s["noise"] * self.s_noise * self.noise(out, generator)
        return self.finish(out, denoised, sample, return_dict)


__all__ = ["DPMFastScheduler", "fast_plan", "intermediate", "solver_step"]
