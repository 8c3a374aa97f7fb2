"""A1111 sampler names -> diffusers schedulers, with zero-terminal-SNR and v-prediction options."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from baka.errors import BakaError
from baka.registry import Registry


@dataclass(frozen=True)
class Sampler:
    name: str
    scheduler: str  # diffusers class name
    options: dict = field(default_factory=dict)
    auto: str | None = None  # the schedule type "Automatic" means for it (A1111 1.9+'s 'scheduler' option)
    # the eta it runs at (A1111's eta: DDIM's sigma scale, the ancestral / SDE noise scale); None: no eta
    eta: float | None = None


SAMPLERS: Registry[Sampler] = Registry("sampler")


def _add(
    name: str,
    scheduler: str,
    aliases: tuple[str, ...] = (),
    auto: str | None = None,
    eta: float | None = None,
    **opts,
) -> None:
    SAMPLERS.add(name, Sampler(name, scheduler, opts, auto, eta), aliases)


_KARRAS = {"use_karras_sigmas": True}
# aliases: A1111 API / ComfyUI-style names, and kohya's sample_sampler names (k_euler, dpm_2_a, pndm, ...)
_add("Euler", "EulerDiscreteScheduler", ("k_euler",))
_add("Euler a", "EulerAncestralDiscreteScheduler", ("euler_a", "Euler Ancestral", "k_euler_a"), eta=1.0)
_add("Heun", "HeunDiscreteScheduler")
_add("LMS", "LMSDiscreteScheduler", ("k_lms",))
_add("LMS Karras", "LMSDiscreteScheduler", **_KARRAS)
_add("DPM2", "KDPM2DiscreteScheduler", ("dpm_2", "k_dpm_2"), auto="Karras")
_add("DPM2 Karras", "KDPM2DiscreteScheduler", **_KARRAS)
_add("DPM2 a", "KDPM2AncestralDiscreteScheduler", ("dpm_2_a", "k_dpm_2_a"), auto="Karras", eta=1.0)
_add("DPM2 a Karras", "KDPM2AncestralDiscreteScheduler", eta=1.0, **_KARRAS)
_add("DPM++ 2M", "DPMSolverMultistepScheduler", ("dpmpp_2m", "dpmsolver++"), auto="Karras")
_add("DPM++ 2M Karras", "DPMSolverMultistepScheduler", ("dpmpp_2m_karras",), **_KARRAS)
_add(
    "DPM++ 2M SDE",
    "DPMSolverMultistepScheduler",
    auto="Exponential",
    eta=1.0,
    algorithm_type="sde-dpmsolver++",
)
_add(
    "DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler", eta=1.0, algorithm_type="sde-dpmsolver++", **_KARRAS
)
_SDE = {"algorithm_type": "sde-dpmsolver++"}
# diffusers' SDE variants of DPM-Solver++ (its Heun-type correction, its third-order step)
_add(
    "DPM++ 2M SDE Heun",
    "DPMSolverMultistepScheduler",
    auto="Exponential",
    eta=1.0,
    solver_type="heun",
    **_SDE,
)
_add("DPM++ 3M SDE", "DPMSolverMultistepScheduler", auto="Exponential", eta=1.0, solver_order=3, **_SDE)
_add("DPM++ SDE", "DPMSolverSDEScheduler", auto="Karras", eta=1.0)
_add("DPM++ SDE Karras", "DPMSolverSDEScheduler", ("dpmpp_sde_karras",), eta=1.0, **_KARRAS)
# diffusers' single-step DPM-Solver++ adds no noise: A1111's "2S a" at eta 0
_add("DPM++ 2S a", "DPMSolverSinglestepScheduler", ("dpmsingle",), auto="Karras", eta=0.0)
_add("DDIM", "DDIMScheduler", eta=0.0, set_alpha_to_one=False)
_add("PLMS", "PNDMScheduler", ("pndm",), skip_prk_steps=True)
# DPM-Solver (not ++) multistep: kohya's sample sampler "dpmsolver" (no A1111 sampler is this one)
_add(
    "DPM-Solver 2M",
    "DPMSolverMultistepScheduler",
    ("dpmsolver",),
    algorithm_type="dpmsolver",
    final_sigmas_type="sigma_min",  # diffusers refuses "zero" for this algorithm
)
# A1111's Restart (baka.generate.restart: k-diffusion-style maths on diffusers' scheduler interface)
_add("Restart", "RestartScheduler", ("restart",), auto="Karras")
# A1111's DPM fast (k-diffusion's sample_dpm_fast at A1111's ancestral eta 1: baka.generate.dpm_fast)
_add("DPM fast", "DPMFastScheduler", ("k_dpm_fast", "dpm_fast"), eta=1.0)
# A1111's DPM adaptive (k-diffusion's sample_dpm_adaptive, eta 1; baka.generate.dpm_adaptive): it picks
# its own steps, so the step count does not set the number of model calls
_add("DPM adaptive", "DPMAdaptiveScheduler", ("k_dpm_ad", "dpm_adaptive"), eta=1.0)
_add("UniPC", "UniPCMultistepScheduler")
_add("DEIS", "DEISMultistepScheduler")
_add("LCM", "LCMScheduler")


# -- A1111 1.9+ schedule types (sd_schedulers.py), chosen beside the sampler ------------------------------
# Each gives the n + 1 sigmas of an n-step run from the model's training schedule (alphas_cumprod):
# computed here by A1111's formulas and set on the scheduler after its own set_timesteps where
# that is possible (SIGMA_SETTERS), otherwise through diffusers' own options where it has them
# (Karras, Exponential, Beta: equal to the formulas, tests/test_schedules.py).


def _log_sigmas(ac: torch.Tensor) -> torch.Tensor:
    ac = ac.double()
    return ((1 - ac) / ac).sqrt().log()


def t_to_sigma(log_sigmas: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """k-diffusion's ``DiscreteSchedule.t_to_sigma``: log-sigma interpolated between integer steps."""
    t = t.double()
    lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp()


def sigma_to_t(log_sigmas: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Its inverse (``sigma_to_t`` without quantization), clamped to the training range."""
    log_sigma = sigma.double().log()
    dists = log_sigma - log_sigmas[:, None]
    lo = dists.ge(0).cumsum(0).argmax(0).clamp(max=len(log_sigmas) - 2)
    low, high = log_sigmas[lo], log_sigmas[lo + 1]
    w = ((low - log_sigma) / (low - high)).clamp(0, 1)
    return (1 - w) * lo + w * (lo + 1)


def _zero(s: torch.Tensor) -> torch.Tensor:
    return torch.cat([s, s.new_zeros(1)])


def _uniform(n: int, ac: torch.Tensor) -> torch.Tensor:
    """The model's own spacing: n timesteps evenly from the last to the first (k-diffusion get_sigmas)."""
    ls = _log_sigmas(ac)
    return _zero(t_to_sigma(ls, torch.linspace(len(ls) - 1, 0, n, dtype=torch.float64)))


def _normal(n: int, ac: torch.Tensor, sgm: bool = False) -> torch.Tensor:
    ls = _log_sigmas(ac)
    start, end = sigma_to_t(ls, ls[-1:].exp()), sigma_to_t(ls, ls[:1].exp())
    t = torch.linspace(float(start), float(end), n + 1 if sgm else n, dtype=torch.float64)
    return _zero(t_to_sigma(ls, t[:-1] if sgm else t))


def _polyexponential(n: int, ac: torch.Tensor, rho: float = 1.0) -> torch.Tensor:
    ls = _log_sigmas(ac)
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    return _zero((ramp * (ls[-1] - ls[0]) + ls[0]).exp())


def _kl_optimal(n: int, ac: torch.Tensor) -> torch.Tensor:
    """KL-optimal steps (Sabour et al. 2024): tan of evenly spaced arctan(sigma); ends at sigma_min."""
    ls = _log_sigmas(ac)
    i = torch.arange(n + 1, dtype=torch.float64) / n
    return torch.tan(i * ls[0].exp().atan() + (1 - i) * ls[-1].exp().atan())


def karras(n: int, sigma_min, sigma_max, rho: float = 7.0, dtype=torch.float64) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: n sigmas from sigma_max down to sigma_min, then 0 (k-diffusion's
    ``get_sigmas_karras``)."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _zero((hi + torch.linspace(0, 1, n, dtype=dtype) * (lo - hi)) ** rho)


def _karras(n: int, ac: torch.Tensor, rho: float = 7.0) -> torch.Tensor:
    """Karras over the model's sigma range."""
    ls = _log_sigmas(ac)
    return karras(n, ls[0].exp(), ls[-1].exp(), rho)


def _exponential(n: int, ac: torch.Tensor) -> torch.Tensor:
    ls = _log_sigmas(ac)
    return _zero(torch.linspace(float(ls[-1]), float(ls[0]), n, dtype=torch.float64).exp())


def _beta(n: int, ac: torch.Tensor, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """Lee et al. 2024: sigmas at the Beta(alpha, beta) quantiles of the sigma range."""
    import numpy as np
    from scipy import stats

    sig = _log_sigmas(ac).exp()
    q = torch.from_numpy(stats.beta.ppf(1 - np.linspace(0, 1, n), alpha, beta))
    return _zero(sig[0] + q * (sig[-1] - sig[0]))


# NVIDIA's Align Your Steps sigmas for SD1.5 (10 steps), as A1111 ships them
AYS_SD1 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)


def _align_your_steps(n: int, ac: torch.Tensor) -> torch.Tensor:
    import numpy as np

    if n == len(AYS_SD1):
        return _zero(torch.tensor(AYS_SD1, dtype=torch.float64))
    # log-linear interpolation of the table to n points
    ys = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(AYS_SD1)), np.log(AYS_SD1[::-1]))
    return _zero(torch.from_numpy(np.exp(ys)[::-1].copy()))


def _simple(n: int, ac: torch.Tensor) -> torch.Tensor:
    sig = _log_sigmas(ac).exp()
    step = len(sig) / n
    return _zero(torch.stack([sig[-(1 + int(x * step))] for x in range(n)]))


def _ddim(n: int, ac: torch.Tensor) -> torch.Tensor:
    sig = _log_sigmas(ac).exp()
    return _zero(sig[1 :: max(len(sig) // n, 1)].flip(0))


@dataclass(frozen=True)
class Schedule:
    name: str
    options: dict | None = None  # diffusers config options giving this spacing (used where accepted)
    sigmas: Callable[[int, torch.Tensor], torch.Tensor] | None = None  # (steps, alphas_cumprod) -> n + 1
    rho: float = -1  # A1111's default_rho (for /schedulers)


SCHEDULES: Registry[Schedule] = Registry("schedule type")
_SIGMA_KEYS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
for _s in (
    Schedule("Automatic", {}),
    Schedule("Uniform", sigmas=_uniform),
    Schedule("Karras", {"use_karras_sigmas": True}, _karras, rho=7.0),
    Schedule("Exponential", {"use_exponential_sigmas": True}, _exponential),
    Schedule("Polyexponential", sigmas=_polyexponential, rho=1.0),
    # SGM Uniform: trailing integer timesteps where the sigmas cannot be set (close, not equal)
    Schedule("SGM Uniform", {"timestep_spacing": "trailing"}, lambda n, ac: _normal(n, ac, sgm=True)),
    Schedule("KL Optimal", sigmas=_kl_optimal),
    Schedule("Align Your Steps", sigmas=_align_your_steps),
    Schedule("Simple", sigmas=_simple),
    Schedule("Normal", sigmas=_normal),
    Schedule("DDIM", sigmas=_ddim),
    Schedule("Beta", {"use_beta_sigmas": True}, _beta),  # alpha = beta = 0.6, A1111's defaults
):
    SCHEDULES.add(_s.name, _s, tuple({_s.name.lower().replace(" ", "_"), _s.name.replace(" ", "")}))


def _set_flat(s, sigmas: torch.Tensor, t: torch.Tensor) -> None:
    s.sigmas, s.timesteps = sigmas.float(), t.float()


def _set_rounded(s, sigmas: torch.Tensor, t: torch.Tensor) -> None:
    # DPM-Solver++ keeps the exact sigmas and feeds the UNet rounded timesteps (as for its Karras sigmas)
    s.sigmas, s.timesteps = sigmas.float(), t.round().long()


def _set_heun(s, sigmas: torch.Tensor, t: torch.Tensor) -> None:
    # Heun evaluates each step twice: every inner sigma and timestep appears twice
    s.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]]).float()
    s.timesteps = torch.cat([t[:1], t[1:].repeat_interleave(2)]).float()


# diffusers schedulers whose sigmas can be set from outside: how
SIGMA_SETTERS: Registry[Callable] = Registry("scheduler with settable sigmas")
SIGMA_SETTERS.add("EulerDiscreteScheduler", _set_flat)
SIGMA_SETTERS.add("EulerAncestralDiscreteScheduler", _set_flat)
SIGMA_SETTERS.add("LMSDiscreteScheduler", _set_flat)
SIGMA_SETTERS.add("DPMSolverMultistepScheduler", _set_rounded)
SIGMA_SETTERS.add("HeunDiscreteScheduler", _set_heun)


def with_sigmas(cls: type, schedule: Schedule) -> type:
    """``cls`` with ``schedule``'s sigmas set after its own ``set_timesteps`` (a subclass: the scheduler
    still works inside diffusers' pipelines)."""
    setter = SIGMA_SETTERS.get(cls.__name__)
    make = schedule.sigmas
    assert make is not None

    def set_timesteps(self, num_inference_steps=None, device=None, *args, **kw):
        cls.set_timesteps(self, num_inference_steps, device, *args, **kw)
        sig = make(int(num_inference_steps), self.alphas_cumprod)
        t = sigma_to_t(_log_sigmas(self.alphas_cumprod), sig[:-1].clamp(min=1e-10))
        setter(self, sig.to(device or "cpu"), t.to(device or "cpu"))
        self.num_inference_steps = len(sig) - 1

    return type(cls.__name__, (cls,), {"set_timesteps": set_timesteps, "schedule_type": schedule.name})


def _restart() -> type:
    from baka.generate.restart import RestartScheduler

    return RestartScheduler


def _dpm_fast() -> type:
    from baka.generate.dpm_fast import DPMFastScheduler

    return DPMFastScheduler


def _dpm_adaptive() -> type:
    from baka.generate.dpm_adaptive import DPMAdaptiveScheduler

    return DPMAdaptiveScheduler


# schedulers baka writes itself (by the class name a Sampler gives), loaded when first used
OWN_SCHEDULERS: Registry[Callable[[], type]] = Registry("baka scheduler")
OWN_SCHEDULERS.add("RestartScheduler", _restart)
OWN_SCHEDULERS.add("DPMFastScheduler", _dpm_fast)
OWN_SCHEDULERS.add("DPMAdaptiveScheduler", _dpm_adaptive)


def split_name(name: str) -> tuple[str, str | None]:
    """A sampler name as A1111 1.9+ splits it: (sampler, the schedule type in the name or None);
    "DPM++ 2M Karras" -> ("DPM++ 2M", "Karras"), "Euler a" -> ("Euler a", None)."""
    # any "<sampler> <schedule type>" is read, registered or not (A1111 1.6-1.8 wrote e.g.
    # "DPM++ 3M SDE Karras", "Euler Karras")
    for sched in SCHEDULES.names():
        base = name.strip()[: -len(sched) - 1]
        if name.strip().lower().endswith(" " + sched.lower()) and base in SAMPLERS:
            return SAMPLERS.canonical(base), sched
    return SAMPLERS.canonical(name), None


def build_scheduler(
    name: str,
    base_config: dict,
    *,
    zero_snr: bool = False,
    v_pred: bool = False,
    spacing: str | None = None,
    schedule: str = "Automatic",
):
    """A diffusers scheduler for A1111 sampler ``name`` over the model's training schedule.

    ``zero_snr`` rescales betas to zero terminal SNR (Lin et al. 2023) and uses trailing timestep
    spacing unless ``spacing`` says otherwise; ``v_pred`` sets v-prediction; ``schedule`` (an A1111
    schedule type) replaces the sampler's own sigma spacing unless it is ``Automatic``.
    """
    import diffusers

    base, named = split_name(name)
    if named and SCHEDULES.canonical(schedule) == "Automatic":
        name, schedule = base, named  # "DPM++ 2M Karras" is DPM++ 2M with Karras, one way to build it
    s = SAMPLERS.get(name)
    cls = (
        OWN_SCHEDULERS.get(s.scheduler)()
        if s.scheduler in OWN_SCHEDULERS
        else getattr(diffusers, s.scheduler)
    )
    cfg = {k: v for k, v in base_config.items() if not k.startswith("_")}
    cfg.update(s.options)
    accepted = set(inspect.signature(cls.__init__).parameters)
    sched = SCHEDULES.get(schedule)
    if sched.name == "Automatic" and not (zero_snr or spacing):
        if s.auto:  # A1111 1.9+: e.g. DPM++ 2M means Karras, DPM++ 2M SDE Exponential
            sched = SCHEDULES.get(s.auto)
        elif s.scheduler in SIGMA_SETTERS and not set(_SIGMA_KEYS) & set(s.options):
            sched = SCHEDULES.get("Uniform")  # A1111's k-diffusion default: the model's own spacing
    fixed = getattr(cls, "fixed_schedule", None)  # a sampler that builds its own sigmas (Restart: Karras)
    if fixed and sched.name not in ("Automatic", fixed):
        raise BakaError(f"sampler {s.name!r} cannot use schedule type {sched.name!r} (it runs {fixed} only)")
    if sched.name != "Automatic":
        # A1111's own formula where the scheduler's sigmas can be set; else diffusers' options
        by_sigmas = sched.sigmas is not None and s.scheduler in SIGMA_SETTERS
        if not by_sigmas and not (sched.options is not None and set(sched.options) <= accepted):
            raise BakaError(f"sampler {s.name!r} cannot use schedule type {sched.name!r}")
        for k in _SIGMA_KEYS:
            cfg.pop(k, None)
        if by_sigmas:
            cls = with_sigmas(cls, sched)
        else:
            cfg.update(sched.options or {})
    if zero_snr:
        if "rescale_betas_zero_snr" not in accepted:
            raise BakaError(
                f"sampler {s.name!r} does not support zero terminal SNR; use Euler, Euler a, DDIM, "
                "DPM++ 2M or UniPC"
            )
        cfg["rescale_betas_zero_snr"] = True
        cfg["timestep_spacing"] = spacing or "trailing"
    elif spacing:
        cfg["timestep_spacing"] = spacing
    if v_pred:
        cfg["prediction_type"] = "v_prediction"
    return cls.from_config({k: v for k, v in cfg.items() if k in accepted or k in ("prediction_type",)})
