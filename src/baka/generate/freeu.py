"""FreeU (Si et al. 2023) v1 and v2 with sd-webui-freeu's start/stop schedule and transition
smoothness, as a reversible patch: hooks on the decoder resnets, removed by ``remove()``.

At each decoder concatenation ``cat([h, skip])``: where h is 4C wide (C = the first block width,
1280 in SD1.x) use (b1, s1), where 2C wide (640) use (b2, s2) (the official code's stage rule).
- backbone: the first half of h's channels times ``b`` (v1), or times ``(b - 1) * m + 1`` with m the
  per-sample channel-mean map min-max normalised to [0, 1] (v2);
- skip: the lowest frequencies (FFT, a 2x2 window around DC) times ``s``.
Schedule: with n steps, start = int(start_ratio * n), stop = int(stop_ratio * n), step k:
flat = 1 if start <= k < stop else 0; smooth = clamp(k / start) before start, else
clamp(1 + (k - start) / (start - stop)); ratio = lerp(flat, smooth, smoothness); every factor f is
applied as lerp(1, f, ratio). A ratio of 0 leaves the step untouched (bit-identical to FreeU off).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from baka.models.patch import Modules, Patch
from baka.registry import Registry


@dataclass(frozen=True)
class FreeU:
    b1: float = 1.3
    b2: float = 1.4
    s1: float = 0.9
    s2: float = 0.2
    version: int = 2
    start: float = 0.0
    stop: float = 1.0
    smoothness: float = 0.0

    def describe(self) -> str:
        return (
            f"b1={self.b1:g} b2={self.b2:g} s1={self.s1:g} s2={self.s2:g} v{self.version} "
            f"start={self.start:g} stop={self.stop:g} smooth={self.smoothness:g}"
        )

    def schedule_ratio(self, step: int, steps: int) -> float:
        start, stop = int(self.start * steps), int(self.stop * steps)
        if start == stop:
            smooth = 0.0
        elif step < start:
            smooth = min(1.0, max(0.0, step / start))
        else:
            smooth = min(1.0, max(0.0, 1 + (step - start) / (start - stop)))
        flat = 1.0 if start <= step < stop else 0.0
        return (1 - self.smoothness) * flat + self.smoothness * smooth

    def apply(self, unet: torch.nn.Module, steps: int) -> FreeUPatch:
        """FreeU hooked onto ``unet`` now, for a loop of ``steps`` iterations."""
        patch = FreeUPatch(self, steps)
        patch.apply({"unet": unet})
        return patch


PRESETS: Registry[FreeU] = Registry("FreeU preset")
PRESETS.add("sd1", FreeU(1.3, 1.4, 0.9, 0.2, version=1), ("sd15", "sd14"))  # FreeU paper, SD1.4/1.5
PRESETS.add("sd1-v2", FreeU(1.3, 1.4, 0.9, 0.2, version=2))
PRESETS.add("sd21", FreeU(1.4, 1.6, 0.9, 0.2, version=1))


def parse_freeu(spec: str | None) -> FreeU | None:
    """``off``, a preset name, or ``b1,b2,s1,s2[,version[,start,stop[,smoothness]]]``."""
    if spec is None or spec.strip().lower() in ("", "off", "none"):
        return None
    parts = [p.strip() for p in spec.split(",")]
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        return PRESETS.get(spec)
    if len(nums) < 4:
        from baka.errors import BakaError

        raise BakaError(f"FreeU {spec!r}: give b1,b2,s1,s2[,version[,start,stop[,smoothness]]] or a preset")
    keys = ["b1", "b2", "s1", "s2", "version", "start", "stop", "smoothness"]
    kw = dict(zip(keys, nums, strict=False))
    if "version" in kw:
        kw["version"] = int(kw["version"])
    return FreeU(**kw)


@functools.lru_cache(maxsize=64)
def _low_modes(n: int, device: torch.device, dtype=torch.complex64) -> torch.Tensor:
    """[n, k] complex exponentials of the frequencies inside FreeU's window: {0, -1}, or {0} if n == 1.

    FreeU scales a 2x2 window of the fftshift-ed spectrum around DC, i.e. frequencies 0 and -1 per axis.
    """
    freqs = torch.tensor([0.0] if n == 1 else [0.0, -1.0], device=device)
    pos = torch.arange(n, device=device, dtype=torch.float32)
    return torch.exp(2j * math.pi * pos[:, None] * freqs[None, :] / n).to(dtype)


def _low_pass_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x with its lowest spatial frequencies (FreeU's window) scaled by ``scale``.

    Same result as FFT -> mask -> inverse FFT, computed as a projection on the window's few Fourier
    modes: x + (scale - 1) * Re(Bh (Bh^H x Bw) Bw^H) / (H W), much cheaper than two full FFTs.
    """
    if scale == 1.0:
        return x
    h, w = x.shape[-2:]
    bh, bw = _low_modes(h, x.device), _low_modes(w, x.device)
    xf = x.float().to(torch.complex64)
    coef = bh.conj().T @ xf @ bw.conj()  # [..., kh, kw]: the DFT coefficients inside the window
    low = (bh @ coef @ bw.T).real / (h * w)
    return (x.float() + (scale - 1) * low).to(x.dtype)


class FreeUPatch(Patch):
    """FreeU as forward pre-hooks on a diffusers UNet's decoder resnets; ``set_step`` moves the
    schedule, ``remove`` detaches the hooks (the weights are never touched)."""

    def __init__(self, freeu: FreeU, steps: int):
        self.freeu = freeu
        self.steps = steps
        self.step = 0
        self.handles: list = []

    def apply(self, modules: Modules) -> None:
        unet = modules["unet"]
        chans = list(unet.config.block_out_channels)
        stage = {4 * chans[0]: (self.freeu.b1, self.freeu.s1), 2 * chans[0]: (self.freeu.b2, self.freeu.s2)}
        rev = chans[::-1]
        for i, block in enumerate(unet.up_blocks):
            for j, resnet in enumerate(block.resnets):
                hidden = (rev[i - 1] if i > 0 else rev[0]) if j == 0 else rev[i]
                if hidden in stage:
                    b, s = stage[hidden]
                    self.handles.append(resnet.register_forward_pre_hook(self._hook(hidden, b, s)))

    def _hook(self, hidden: int, b: float, s: float):
        def pre(_module, args):
            ratio = self.freeu.schedule_ratio(self.step, self.steps)
            if ratio == 0.0:
                return None
            # x is the fresh cat([h, skip]) the up block just built: edit it in place unless autograd
            # needs the original
            x = args[0] if not args[0].requires_grad else args[0].clone()
            h, half = x[:, :hidden], hidden // 2
            b_eff = 1 + (b - 1) * ratio
            if self.freeu.version == 2:
                m = h.mean(1, keepdim=True)
                lo = m.amin(dim=(2, 3), keepdim=True)
                hi = m.amax(dim=(2, 3), keepdim=True)
                m = (m - lo) / (hi - lo).clamp_min(1e-12)
                x[:, :half] = h[:, :half] * ((b_eff - 1) * m + 1)
            else:
                x[:, :half] = h[:, :half] * b_eff
            x[:, hidden:] = _low_pass_scale(x[:, hidden:], 1 + (s - 1) * ratio)
            return (x, *args[1:])

        return pre

    def set_step(self, step: int) -> None:
        self.step = step

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


__all__ = ["FreeU", "FreeUPatch", "PRESETS", "parse_freeu"]
