"""LoRA and LyCORIS networks applied to a live model as a reversible patch (weights += delta,
originals kept and restored), with lora-block-weight per-block multipliers. The file formats and their
delta maths live in ``baka.models.networks``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from baka.models.blocks import block_of_diffusers
from baka.models.keymap import unet_key_to_ldm
from baka.models.lbw import BLOCKS17, LBW_PRESETS, parse_lbw
from baka.models.networks import (
    Network,
    find_network,
    load_network,
    multiplier,
    patched_bias,
    patched_weight,
)
from baka.models.patch import Modules, Patch, WeightBackup
from baka.models.targets import module_names


def target_names(unet: torch.nn.Module | None, text_encoder: torch.nn.Module | None) -> dict[str, tuple]:
    """kohya module name -> (component, module, block). UNet modules answer to both the diffusers-path
    names (kohya) and the LDM-path names some A1111-era LoRAs use."""
    out: dict[str, tuple] = {}
    if unet is not None:
        for name, mod in unet.named_modules():
            if not isinstance(mod, torch.nn.Linear | torch.nn.Conv2d):
                continue
            block = block_of_diffusers("unet", name + ".weight")
            try:
                ldm: str | None = unet_key_to_ldm(name + ".weight").removesuffix(".weight")
            except KeyError:
                ldm = None
            for n in module_names("unet", name, ldm):
                out.setdefault(n, ("unet", mod, block))
    if text_encoder is not None:
        for name, mod in text_encoder.named_modules():
            if isinstance(mod, torch.nn.Linear):
                out[module_names("text_encoder", name)[0]] = ("text_encoder", mod, "BASE")
    return out


@dataclass(frozen=True)
class NetworkUse:
    """One ``<lora:name:te:unet:lbw=...>`` use: a network and its multipliers."""

    net: Network
    te: float = 1.0
    unet: float = 1.0
    lbw: str | None = None


class LoraPatch(Patch):
    """Networks added to live weights (``w += mult * delta``); ``remove()`` restores the exact
    originals. ``apply(modules)`` adds every use given at construction; ``add`` adds one more now."""

    def __init__(self, uses: list[NetworkUse] | None = None, targets: dict[str, tuple] | None = None):
        self.uses = list(uses or [])
        self.targets = targets
        self.unmatched: list[str] = []
        self.applied: list[NetworkUse] = []
        self._backup = WeightBackup()

    def apply(self, modules: Modules) -> None:
        targets = self.targets or target_names(modules.get("unet"), modules.get("text_encoder"))
        self.unmatched = []
        for use in self.uses:
            self._add(use, targets)

    def add(
        self,
        net: Network,
        targets: dict[str, tuple],
        te: float = 1.0,
        unet: float = 1.0,
        lbw: str | None = None,
    ) -> None:
        self._add(NetworkUse(net, te, unet, lbw), targets)

    @torch.no_grad()
    def _add(self, use: NetworkUse, targets: dict[str, tuple]) -> None:
        net, blocks = use.net, parse_lbw(use.lbw)
        for name, m in net.modules.items():
            hit = targets.get(name)
            if hit is None:
                self.unmatched.append(f"{net.name}: {name}")
                continue
            extra = m.unsupported()
            if extra:  # applying it without these would be silently wrong: report and skip instead
                self.unmatched.append(f"{net.name}: {name} (unsupported {', '.join(extra)})")
                continue
            comp, mod, block = hit
            mult = multiplier(comp, block, use.te, use.unet, blocks)
            if mult == 0:
                continue
            w = mod.weight
            self._backup.keep(w)
            # IA3 / GLoRA scale the layer's own weight: the original one, as A1111 (not what
            # networks applied before this one made of it)
            w.copy_(patched_weight(w, m, mult, self._backup.original(w)))
            if getattr(mod, "bias", None) is not None:
                bias = patched_bias(mod.bias, m, mult)
                if bias is not None:
                    self._backup.keep(mod.bias)
                    mod.bias.copy_(bias)
        self.applied.append(use)

    def remove(self) -> None:
        self._backup.restore()
        self.applied.clear()


__all__ = [
    "BLOCKS17",
    "LBW_PRESETS",
    "LoraPatch",
    "NetworkUse",
    "Network",
    "load_network",
    "parse_lbw",
    "target_names",
    "find_network",
]
