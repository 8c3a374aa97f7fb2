"""LoRA and LyCORIS networks applied to a live model as a reversible patch (weights += delta,
originals kept and restored), with lora-block-weight per-block multipliers. The file formats and their
delta maths live in ``baka.models.networks``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from baka.errors import BakaError
from baka.models.blocks import BLOCK_IDS, BLOCK_INDEX, block_of_diffusers
from baka.models.keymap import kohya_module_name, unet_key_to_ldm
from baka.models.networks import Network, load_network
from baka.models.patch import Modules, Patch, WeightBackup
from baka.registry import Registry

BLOCKS17 = (
    "BASE",
    "IN01",
    "IN02",
    "IN04",
    "IN05",
    "IN07",
    "IN08",
    "M00",
    "OUT03",
    "OUT04",
    "OUT05",
    "OUT06",
    "OUT07",
    "OUT08",
    "OUT09",
    "OUT10",
    "OUT11",
)

LBW_PRESETS: Registry[tuple[float, ...]] = Registry("lora-block-weight preset")
for _name, _vals in {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}.items():
    LBW_PRESETS.add(_name, tuple(float(v) for v in _vals.split(",")))


def parse_lbw(spec: str | None) -> tuple[float, ...]:
    """26 block multipliers from a lora-block-weight preset or a 17/26-value list.

    17 values (BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03-OUT11) set the other 9 blocks
    (IN00, IN03, IN06, IN09-IN11, OUT00-OUT02, where only LoCon conv modules live) to 0, as the
    lora-block-weight extension's 17 -> 26 expansion does.
    """
    if not spec:
        return (1.0,) * 26
    try:
        vals = [float(v) for v in spec.split(",")]
    except ValueError:
        vals = list(LBW_PRESETS.get(spec))
    if len(vals) == 17:
        full = dict.fromkeys(BLOCK_IDS, 0.0)
        full.update(zip(BLOCKS17, vals, strict=True))
        return tuple(full[b] for b in BLOCK_IDS)
    if len(vals) == 26:
        return tuple(vals)
    raise BakaError(f"lbw {spec!r}: need 17 or 26 values or a preset ({', '.join(LBW_PRESETS.names())})")


def target_names(unet: torch.nn.Module | None, text_encoder: torch.nn.Module | None) -> dict[str, tuple]:
    """kohya module name -> (component, module, block). UNet modules answer to both the diffusers-path
    names (kohya) and the LDM-path names some A1111-era LoRAs use."""
    out: dict[str, tuple] = {}
    if unet is not None:
        for name, mod in unet.named_modules():
            if not isinstance(mod, torch.nn.Linear | torch.nn.Conv2d):
                continue
            block = block_of_diffusers("unet", name + ".weight")
            out[kohya_module_name("unet", name)] = ("unet", mod, block)
            try:
                ldm = unet_key_to_ldm(name + ".weight").removesuffix(".weight")
                out.setdefault(kohya_module_name("unet", ldm), ("unet", mod, block))
            except KeyError:
                pass
    if text_encoder is not None:
        for name, mod in text_encoder.named_modules():
            if isinstance(mod, torch.nn.Linear):
                out[kohya_module_name("text_encoder", name)] = ("text_encoder", mod, "BASE")
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
            mult = (use.te if comp == "text_encoder" else use.unet) * blocks[BLOCK_INDEX[block or "BASE"]]
            if mult == 0:
                continue
            w = mod.weight
            self._backup.keep(w)
            # IA3 / GLoRA scale the layer's own weight: the original one, as A1111 (not what
            # networks applied before this one made of it)
            w.copy_((w.float() + mult * m.delta_weight(w.shape, self._backup.original(w))).to(w.dtype))
            bias = m.bias_delta()
            if bias is not None and getattr(mod, "bias", None) is not None:
                self._backup.keep(mod.bias)
                mod.bias.copy_((mod.bias.float() + mult * bias.reshape(mod.bias.shape)).to(mod.bias.dtype))
        self.applied.append(use)

    def remove(self) -> None:
        self._backup.restore()
        self.applied.clear()


_LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")


def find_network(name: str, folders: list[Path]) -> Path:
    """``NAME.safetensors`` / ``.pt`` / ``.ckpt`` in the first folder that has it, else a LoRA shipped
    with baka (``world-star``); a file in a folder wins over a shipped one of the same name."""
    from baka.models.shipped import SHIPPED_NETWORKS, shipped_path

    for folder in folders:
        for suffix in _LORA_SUFFIXES:
            p = Path(folder) / f"{name}{suffix}"
            if p.is_file():
                return p
    shipped = shipped_path(name, SHIPPED_NETWORKS)
    if shipped is not None:
        return shipped
    where = ", ".join(str(f) for f in folders) or "no LoRA folder given (--lora-dir)"
    raise BakaError(f"LoRA {name!r} not found in {where}")


__all__ = ["LoraPatch", "NetworkUse", "Network", "load_network", "parse_lbw", "target_names", "find_network"]
