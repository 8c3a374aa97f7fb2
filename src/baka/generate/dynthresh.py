"""Dynamic thresholding ("CFG Scale Fix"), as the sd-dynamic-thresholding extension defines it.

High CFG scales burn colours: the guided estimate x0 = u + cfg * (c - u) leaves the range the VAE
knows. The extension computes the estimate twice, at the real CFG scale and at a lower "mimic" scale,
and per channel (or per image) squeezes the real one into the mimic one's spread:

- both estimates are centred on their mean (``MEAN`` start point) or not (``ZERO``);
- the spread is the absolute maximum (``AD``; the real one's at ``percentile``, its values clamped to
  it) or the standard deviation (``STD``);
- the real estimate is rescaled to the mimic spread and the mean added back; ``phi`` < 1 blends it
  with the plain CFG result;
- both scales may follow a schedule over the steps (``MODES``: "Linear Down", "Cosine Up", ...,
  between the scale and its minimum).

It acts on the denoised estimates (x0), as the extension does inside A1111's k-diffusion denoiser;
:class:`baka.generate.denoise.CFGDenoiser` converts its eps / v predictions there and back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from baka.errors import BakaError
from baka.registry import Registry

# the scale schedules: (fraction of the run done, the mode's value) -> factor on (scale - minimum)
MODES: Registry[Callable[[float, float], float]] = Registry("dynamic thresholding mode")
MODES.add("Constant", lambda f, v: 1.0)
MODES.add("Linear Down", lambda f, v: 1.0 - f)
MODES.add("Half Cosine Down", lambda f, v: math.cos(f))
MODES.add("Cosine Down", lambda f, v: math.cos(f * 1.5707))  # the extension's own constant
MODES.add("Linear Up", lambda f, v: f)
MODES.add("Half Cosine Up", lambda f, v: 1.0 - math.cos(f))
MODES.add("Cosine Up", lambda f, v: 1.0 - math.cos(f * 1.5707))
MODES.add("Power Up", lambda f, v: math.pow(f, v))
MODES.add("Power Down", lambda f, v: 1.0 - math.pow(f, v))
MODES.add("Linear Repeating", lambda f, v: abs(0.5 - (f * v) % 1.0) * 2)
MODES.add("Cosine Repeating", lambda f, v: math.cos(f * 6.28318 * v) * 0.5 + 0.5)
MODES.add("Sawtooth", lambda f, v: (f * v) % 1.0)
WITH_VALUE = ("Power Up", "Power Down", "Linear Repeating", "Cosine Repeating", "Sawtooth")


@dataclass(frozen=True)
class DynThresh:
    """The extension's settings, with its defaults."""

    mimic_scale: float = 7.0
    percentile: float = 100.0  # "Top percentile of latents to clamp", 90-100
    mimic_mode: str = "Constant"
    mimic_scale_min: float = 0.0
    cfg_mode: str = "Constant"
    cfg_scale_min: float = 0.0
    sched_val: float = 4.0
    separate_channels: bool = True
    startpoint: str = "MEAN"  # or ZERO
    variability: str = "AD"  # or STD
    phi: float = 1.0  # "Interpolate Phi"

    def __post_init__(self) -> None:
        MODES.get(self.mimic_mode)
        MODES.get(self.cfg_mode)
        if self.startpoint not in ("MEAN", "ZERO"):
            raise BakaError(f"dynamic thresholding start point {self.startpoint!r}: MEAN or ZERO")
        if self.variability not in ("AD", "STD"):
            raise BakaError(f"dynamic thresholding variability {self.variability!r}: AD or STD")
        if not 0 < self.percentile <= 100:
            raise BakaError(f"dynamic thresholding percentile {self.percentile:g}: from 0 to 100")

    def _scale(self, scale: float, mode: str, minimum: float, step: int, steps: int) -> float:
        frac = step / max(steps - 1, 1)
        return (scale - minimum) * MODES.get(mode)(frac, self.sched_val) + minimum

    def combine(
        self,
        conds: list[torch.Tensor],
        uncond: torch.Tensor,
        weights: list[float],
        cfg: float,
        step: int,
        steps: int,
    ) -> torch.Tensor:
        """The thresholded guided estimate from the estimates of each AND sub-prompt and the negative
        ([b, c, h, w] each), at sampler step ``step`` of ``steps``."""
        mimic = self._scale(self.mimic_scale, self.mimic_mode, self.mimic_scale_min, step, steps)
        cfg = self._scale(cfg, self.cfg_mode, self.cfg_scale_min, step, steps)
        relative = sum((c - uncond) * w for c, w in zip(conds, weights, strict=True))
        mim = (uncond + relative * mimic).flatten(2)
        real = (uncond + relative * cfg).flatten(2)
        real_means = real.mean(dim=2, keepdim=True)
        mim_c = mim - mim.mean(dim=2, keepdim=True)
        real_c = real - real_means
        dims: dict = {"dim": 2, "keepdim": True} if self.separate_channels else {}
        q = self.percentile / 100
        if self.variability == "STD":
            mim_ref, real_ref = mim_c.std(**dims), real_c.std(**dims)
        elif self.separate_channels:
            mim_ref = mim_c.abs().amax(dim=2, keepdim=True)
            real_ref = torch.quantile(real_c.abs().float(), q, dim=2, keepdim=True).to(real_c.dtype)
        else:
            mim_ref, real_ref = mim_c.abs().max(), torch.quantile(real_c.abs().float(), q).to(real_c.dtype)
        if self.startpoint == "ZERO":
            out = real * (mim_ref / real_ref)
        elif self.variability == "STD":
            out = real_c / real_ref * mim_ref + real_means
        else:  # clamp to the larger spread, then shrink it to the mimic one
            top = torch.maximum(mim_ref, real_ref)
            out = real_c.clamp(-top, top) / top * mim_ref + real_means
        out = out.unflatten(2, uncond.shape[2:])
        if self.phi != 1.0:
            out = out * self.phi + (uncond + relative * cfg) * (1.0 - self.phi)
        return out

    def infotext(self) -> dict[str, object]:
        """The extension's infotext fields."""
        out: dict[str, object] = {
            "Dynamic thresholding enabled": True,
            "Mimic scale": f"{self.mimic_scale:g}",
            "Separate Feature Channels": self.separate_channels,
            "Scaling Startpoint": self.startpoint,
            "Variability Measure": self.variability,
            "Interpolate Phi": f"{self.phi:g}",
            "Threshold percentile": f"{self.percentile:g}",
        }
        if self.mimic_mode != "Constant":
            out["Mimic mode"] = self.mimic_mode
            out["Mimic scale minimum"] = f"{self.mimic_scale_min:g}"
        if self.cfg_mode != "Constant":
            out["CFG mode"] = self.cfg_mode
            out["CFG scale minimum"] = f"{self.cfg_scale_min:g}"
        if self.cfg_mode in WITH_VALUE or self.mimic_mode in WITH_VALUE:
            out["Scheduler value"] = f"{self.sched_val:g}"
        return out

    @classmethod
    def from_infotext(cls, fields: dict[str, str]) -> DynThresh | None:
        if fields.get("Dynamic thresholding enabled") != "True":
            return None
        d = cls()
        return cls(
            mimic_scale=float(fields.get("Mimic scale", d.mimic_scale)),
            percentile=float(fields.get("Threshold percentile", d.percentile)),
            mimic_mode=fields.get("Mimic mode", d.mimic_mode),
            mimic_scale_min=float(fields.get("Mimic scale minimum", d.mimic_scale_min)),
            cfg_mode=fields.get("CFG mode", d.cfg_mode),
            cfg_scale_min=float(fields.get("CFG scale minimum", d.cfg_scale_min)),
            sched_val=float(fields.get("Scheduler value", d.sched_val)),
            separate_channels=fields.get("Separate Feature Channels", "True") == "True",
            startpoint=fields.get("Scaling Startpoint", d.startpoint),
            variability=fields.get("Variability Measure", d.variability),
            phi=float(fields.get("Interpolate Phi", d.phi)),
        )

    @classmethod
    def from_script_args(cls, args: list) -> DynThresh | None:
        """From the A1111 API's ``alwayson_scripts`` args of the extension, in its UI order: enabled,
        mimic scale, percentile, mimic mode, mimic minimum, CFG mode, CFG minimum, scheduler value,
        separate channels, start point, variability, phi."""
        if not args or not args[0]:
            return None
        names = [
            "mimic_scale",
            "percentile",
            "mimic_mode",
            "mimic_scale_min",
            "cfg_mode",
            "cfg_scale_min",
            "sched_val",
            "separate_channels",
            "startpoint",
            "variability",
            "phi",
        ]
        return cls(**dict(zip(names, args[1:], strict=False)))


def parse_dynthresh(spec: str | None) -> DynThresh | None:
    """CLI form: ``off``, a mimic scale (``7``), or ``7,percentile=99.5,cfg_mode=Cosine Down,...``
    with any of :class:`DynThresh`'s field names."""
    if spec is None or spec.strip().lower() in ("", "off", "none", "0"):
        return None
    head, *rest = (part.strip() for part in spec.split(","))
    kw: dict[str, object] = {}
    try:
        kw["mimic_scale"] = float(head)
        for part in rest:
            key, eq, value = part.partition("=")
            key = key.strip()
            if not eq or key not in DynThresh.__dataclass_fields__:
                raise BakaError(
                    f"dynamic thresholding {part!r}: expected name=value with a name from "
                    + ", ".join(DynThresh.__dataclass_fields__)
                )
            kind = type(DynThresh.__dataclass_fields__[key].default)
            kw[key] = value.strip().lower() in ("1", "true", "on", "yes") if kind is bool else kind(value)
    except ValueError as e:
        raise BakaError(f"dynamic thresholding {spec!r}: {e}") from None
    return DynThresh(**kw)  # type: ignore[arg-type]


__all__ = ["MODES", "DynThresh", "parse_dynthresh"]
