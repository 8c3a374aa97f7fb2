"""Which weights of an LDM-layout SD1.x checkpoint a kohya / A1111 network module patches, by module
name, read from the file's key names and shapes alone (nothing is loaded).

A module answers to its kohya name (the diffusers module path: what kohya's trainer and extractor
write) and, for the UNet, to the LDM-path name some A1111-era files use; the live patch
(``baka.generate.lora.target_names``) answers to the same two.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from baka.models.blocks import block_of
from baka.models.config import infer_config
from baka.models.convert import key_table
from baka.models.keymap import UNET_PREFIX, kohya_module_name

# kohya's LoRA network (networks/lora.py) patches the Linear / Conv2d layers inside these diffusers
# modules: Transformer2DModel always; ResnetBlock2D, Downsample2D, Upsample2D with a conv dim (3x3
# kernels take conv_dim, 1x1 and Linear layers the dim); CLIPAttention and CLIPMLP in the text encoder
_GROUPS = (
    ("attn", re.compile(r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\.")),
    ("resnet", re.compile(r"(resnets\.\d+|downsamplers\.0|upsamplers\.0)\.")),
    ("te", re.compile(r"encoder\.layers\.\d+\.(self_attn|mlp)\.")),
)


@dataclass(frozen=True)
class Target:
    """One patchable weight: its LDM key, component, merge block and kohya group (``attn``,
    ``resnet``, ``te``; ``other`` for layers kohya's LoRA leaves alone, e.g. conv_in)."""

    key: str
    component: str
    block: str
    group: str
    shape: tuple[int, ...]

    @property
    def is_conv3x3(self) -> bool:
        return is_conv3x3(self.shape)


def is_conv3x3(shape: tuple[int, ...]) -> bool:
    """A conv with a kernel larger than 1x1: kohya gives these conv_dim, every other layer the dim."""
    return len(shape) == 4 and tuple(shape[2:]) != (1, 1)


def module_names(component: str, module_path: str, ldm_path: str | None = None) -> list[str]:
    """The names a network module for this layer may carry: kohya's (diffusers path) first, then the
    LDM-path spelling of UNet layers."""
    names = [kohya_module_name(component, module_path)]
    if ldm_path is not None:
        names.append(kohya_module_name(component, ldm_path))
    return names


def checkpoint_targets(shapes: dict[str, tuple[int, ...]]) -> dict[str, Target]:
    """kohya module name -> :class:`Target` for every Linear / Conv2d weight of the UNet and text
    encoder present in an LDM checkpoint with these key shapes."""
    table = key_table(infer_config(shapes))
    out: dict[str, Target] = {}
    for ldm_key, (comp, dkey) in table.items():
        shape = shapes.get(ldm_key)
        if comp == "vae" or shape is None or len(shape) not in (2, 4) or not dkey.endswith(".weight"):
            continue
        if "embeddings." in dkey:  # the text encoder's token / position tables are not Linear layers
            continue
        group = next((g for g, rx in _GROUPS if rx.search(dkey)), "other")
        t = Target(ldm_key, comp, block_of(ldm_key) or "BASE", group, tuple(shape))
        ldm_path = ldm_key[len(UNET_PREFIX) :].removesuffix(".weight") if comp == "unet" else None
        for name in module_names(comp, dkey.removesuffix(".weight"), ldm_path):
            out.setdefault(name, t)
    return out


__all__ = ["Target", "checkpoint_targets", "is_conv3x3", "module_names"]
