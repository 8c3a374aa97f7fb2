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

import math

import torch
from diffusers import EulerDiscreteScheduler
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput

from baka.errors import BakaError


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


class DPMFastScheduler(EulerDiscreteScheduler):
    """DPM-Solver-Fast (see the module docstring) on diffusers' interface: one timestep per model call,
    ``step`` keeps the step's earlier noise predictions until its last call."""

    eta = 1.0  # A1111's eta for k-diffusion samplers that take one (its "eta_ancestral" option)
    s_noise = 1.0
    fixed_schedule = "Automatic"  # its own spacing in log-sigma

    def set_timesteps(self, num_inference_steps=None, device=None, *args, **kw):
        from baka.generate.samplers import _log_sigmas, sigma_to_t

        super().set_timesteps(num_inference_steps, device, *args, **kw)
        if self.config.rescale_betas_zero_snr:
            raise BakaError("sampler 'DPM fast' does not support zero terminal SNR (it needs sigma_max)")
        log_sigmas = _log_sigmas(self.alphas_cumprod)
        # A1111 passes the model's sigma range as float32 (k-diffusion's DiscreteSchedule.sigmas)
        smin = float(log_sigmas.exp().float().min())
        smax = float(log_sigmas.exp().float().max())
        self.plan = fast_plan(int(num_inference_steps), smin, smax, self.eta)
        self.calls = [(i, j) for i, step in enumerate(self.plan) for j in range(len(step["times"]))]
        sig = torch.stack(
            [(-s["times"][j]).exp() for i, s in enumerate(self.plan) for j in range(len(s["times"]))]
        )
        self.call_sigmas = sig.float()
        self.timesteps = sigma_to_t(log_sigmas, sig).float().to(device or "cpu")
        self.sigmas = torch.cat([self.call_sigmas, torch.tensor([smin])])
        self.num_inference_steps = int(num_inference_steps)
        self._call = 0
        self._x: torch.Tensor | None = None
        self._eps: list[torch.Tensor] = []
        self._sigma_max = smax

    @property
    def init_noise_sigma(self) -> float:  # type: ignore[override]
        return self._sigma_max  # k-diffusion: x_T = noise * sigma_max

    def set_begin_index(self, begin_index: int = 0) -> None:
        if begin_index:
            raise BakaError("sampler 'DPM fast' runs from pure noise only (not img2img or a hires pass)")

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        sigma = float(self.call_sigmas[self._call])
        return sample / (sigma**2 + 1) ** 0.5

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, **kw):
        from diffusers.utils.torch_utils import randn_tensor

        i, j = self.calls[self._call]
        s = self.plan[i]
        sigma = float(self.call_sigmas[self._call])
        x = sample.float()
        out_ = model_output.float()
        if self.config.prediction_type == "v_prediction":
            denoised = x / (sigma**2 + 1) - out_ * sigma / (sigma**2 + 1) ** 0.5
        else:
            denoised = x - sigma * out_
        eps = (x - denoised) / sigma
        if j == 0:
            self._x, self._eps = x, []
        self._eps.append(eps)
        x0, e = self._x, self._eps
        assert x0 is not None
        t, target, order = s["t"], s["target"], s["order"]
        h = target - t

        def sig(tt) -> float:
            return float((-tt).exp())

        if len(e) < order:  # the next call's input: DPM-Solver's intermediate point
            r1, r2 = (1 / 2, None) if order == 2 else (1 / 3, 2 / 3)
            if len(e) == 1:
                rr = r1
                out = x0 - sig(t + rr * h) * math.expm1(float(rr * h)) * e[0]
            else:
                assert r2 is not None
                rh = float(r2 * h)
                out = x0 - sig(t + r2 * h) * math.expm1(rh) * e[0]
                out = out - sig(t + r2 * h) * (r2 / r1) * (math.expm1(rh) / rh - 1) * (e[1] - e[0])
        else:
            hf, sn = float(h), sig(target)
            out = x0 - sn * math.expm1(hf) * e[0]
            if order == 2:
                out = out - sn / (2 * (1 / 2)) * math.expm1(hf) * (e[1] - e[0])
            elif order == 3:
                out = out - sn / (2 / 3) * (math.expm1(hf) / hf - 1) * (e[2] - e[0])
            # k-diffusion draws the step's noise even at eta 0 (su = 0): the same draws either way
            noise = randn_tensor(out.shape, generator=generator, device=out.device, dtype=out.dtype)
            out = out + s["noise"] * self.s_noise * noise
        self._call += 1
        out = out.to(sample.dtype)
        if not return_dict:
            return (out,)
        return EulerDiscreteSchedulerOutput(prev_sample=out, pred_original_sample=denoised.to(sample.dtype))


__all__ = ["DPMFastScheduler", "fast_plan"]
