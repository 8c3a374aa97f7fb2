"""supermerger's "Adjust": eight numbers (IN, OUT, OUT2, Contrast, Brightness, COL1, COL2, COL3) that
scale the UNet's first conv, its final norm and conv, and offset the final conv's bias per latent
channel, applied to the merged tensors (facts from supermerger, tests/data/supermerger_calcmodes.json):

- ``input_blocks.0.0.weight`` x (1 - 0.01 IN), its bias x (1 + 0.02 IN)
- ``out.0.weight`` x (1 - 0.01 OUT), its bias x (1 + 0.02 OUT); ``out.2.weight`` x (1 - 0.01 OUT2)
- ``out.2.bias`` + 0.02 [CONT, -BRI + COL1 + COL3, BRI/3 + COL1 - COL2, 2 BRI/3 - COL2 + COL3]

COL1 is cyan (-) / red (+), COL2 magenta / green, COL3 yellow / blue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from baka.models.keymap import UNET_PREFIX

NAMES = ("IN", "OUT", "OUT2", "CONT", "BRI", "COL1", "COL2", "COL3")
# each colour parameter's share of latent channels 1-3 (SD1), added in this order
_ROWS = (
    ("BRI", (-1.0, 1 / 3, 2 / 3)),
    ("COL1", (1.0, 1.0, 0.0)),
    ("COL2", (0.0, -1.0, -1.0)),
    ("COL3", (1.0, 0.0, 1.0)),
)


@dataclass(frozen=True)
class Adjust:
    values: dict[str, float]

    @classmethod
    def parse(cls, text: str | None) -> Adjust | None:
        """supermerger's reading: off when empty, all zeros or without a comma; then the first eight
        fields, unreadable or missing ones 0."""
        if not text or not text.rstrip(",0").strip() or "," not in text:
            return None
        vals = []
        for f in text.split(",")[:8]:
            try:
                vals.append(float(f))
            except ValueError:
                vals.append(0.0)
        vals += [0.0] * (8 - len(vals))
        return cls(dict(zip(NAMES, vals, strict=True)))

    def factors(self) -> dict[str, float | list[float]]:
        """LDM key (without the UNet prefix) -> factor, or the 4-channel offset of ``out.2.bias``."""
        v = self.values
        offset = [v["CONT"] * 0.02, 0.0, 0.0, 0.0]
        for name, row in _ROWS:
            for ch, coef in enumerate(row, start=1):
                offset[ch] += (coef * v[name]) * 0.02
        return {
            "input_blocks.0.0.weight": 1 - 0.01 * v["IN"],
            "input_blocks.0.0.bias": 1 + 0.02 * v["IN"],
            "out.0.weight": 1 - 0.01 * v["OUT"],
            "out.0.bias": 1 + 0.02 * v["OUT"],
            "out.2.weight": 1 - 0.01 * v["OUT2"],
            "out.2.bias": offset,
        }

    def keys(self) -> set[str]:
        return {UNET_PREFIX + k for k in self.factors()}

    def apply(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """The merged tensor of ``key`` adjusted (unchanged for every other key)."""
        f = self.factors().get(key.removeprefix(UNET_PREFIX)) if key.startswith(UNET_PREFIX) else None
        if f is None:
            return t
        if isinstance(f, list):
            return t + torch.tensor(f, dtype=torch.float32).to(t.dtype) if t.numel() == 4 else t
        return t * f

    def __str__(self) -> str:
        return ",".join(f"{self.values[n]:g}" for n in NAMES)


__all__ = ["NAMES", "Adjust"]
