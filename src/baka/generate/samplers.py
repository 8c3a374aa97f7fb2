"""A1111 sampler names -> diffusers schedulers, with zero-terminal-SNR and v-prediction options."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from baka.errors import BakaError
from baka.registry import Registry


@dataclass(frozen=True)
class Sampler:
    name: str
    scheduler: str  # diffusers class name
    options: dict = field(default_factory=dict)


SAMPLERS: Registry[Sampler] = Registry("sampler")


def _add(name: str, scheduler: str, aliases: tuple[str, ...] = (), **options) -> None:
    SAMPLERS.add(name, Sampler(name, scheduler, options), aliases)


_KARRAS = {"use_karras_sigmas": True}
_add("Euler", "EulerDiscreteScheduler")
_add("Euler a", "EulerAncestralDiscreteScheduler", ("euler_a", "Euler Ancestral"))
_add("Heun", "HeunDiscreteScheduler")
_add("LMS", "LMSDiscreteScheduler")
_add("LMS Karras", "LMSDiscreteScheduler", **_KARRAS)
_add("DPM2", "KDPM2DiscreteScheduler")
_add("DPM2 Karras", "KDPM2DiscreteScheduler", **_KARRAS)
_add("DPM2 a", "KDPM2AncestralDiscreteScheduler")
_add("DPM2 a Karras", "KDPM2AncestralDiscreteScheduler", **_KARRAS)
_add("DPM++ 2M", "DPMSolverMultistepScheduler", ("dpmpp_2m",))
_add("DPM++ 2M Karras", "DPMSolverMultistepScheduler", ("dpmpp_2m_karras",), **_KARRAS)
_add("DPM++ 2M SDE", "DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++")
_add("DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++", **_KARRAS)
_add("DPM++ SDE", "DPMSolverSDEScheduler")
_add("DPM++ SDE Karras", "DPMSolverSDEScheduler", ("dpmpp_sde_karras",), **_KARRAS)
_add("DPM++ 2S a", "DPMSolverSinglestepScheduler")
_add("DDIM", "DDIMScheduler", set_alpha_to_one=False)
_add("PLMS", "PNDMScheduler", skip_prk_steps=True)
_add("UniPC", "UniPCMultistepScheduler")
_add("DEIS", "DEISMultistepScheduler")
_add("LCM", "LCMScheduler")


# A1111 1.9+ "Schedule type" (chosen beside the sampler) -> diffusers options; None: A1111 has it,
# baka does not yet (a clear error, never a silent substitute)
SCHEDULES: Registry[dict | None] = Registry("schedule type")
_SIGMA_KEYS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
SCHEDULES.add("Automatic", {})
SCHEDULES.add("Karras", {"use_karras_sigmas": True})  # Karras et al. 2022, rho 7
SCHEDULES.add("Exponential", {"use_exponential_sigmas": True})
SCHEDULES.add("Beta", {"use_beta_sigmas": True})  # alpha = beta = 0.6, A1111's defaults
SCHEDULES.add("SGM Uniform", {"timestep_spacing": "trailing"}, ("sgm_uniform",))
for _name in ("Uniform", "Polyexponential", "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM"):
    SCHEDULES.add(_name, None)


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

    s = SAMPLERS.get(name)
    cls = getattr(diffusers, s.scheduler)
    cfg = {k: v for k, v in base_config.items() if not k.startswith("_")}
    cfg.update(s.options)
    accepted = set(inspect.signature(cls.__init__).parameters)
    sched = SCHEDULES.get(schedule)
    if sched is None:
        raise BakaError(f"schedule type {schedule!r}: A1111 has it, baka does not yet")
    if sched:
        if not set(sched) <= accepted:
            raise BakaError(f"sampler {s.name!r} cannot use schedule type {schedule!r}")
        for k in _SIGMA_KEYS:
            cfg.pop(k, None)
        cfg.update(sched)
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
