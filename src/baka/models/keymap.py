"""Bijective key maps between the LDM/A1111 single-file layout and the diffusers layout of SD1.x.

The maps are pure renames (plus the VAE mid-attention 1x1-conv <-> linear reshape), so a round trip
in either direction is bit-exact. The rules follow the SD1.x topology (see shared reference FACTS):
``input_blocks.N`` <-> ``down_blocks.i.{resnets,attentions}.j`` with N = 3i+j+1, and so on.
"""

from __future__ import annotations

import functools
import re

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TE_PREFIX = "cond_stage_model.transformer."

# diffusers ResnetBlock2D name -> LDM ResBlock name
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}  # the VAE keeps norm1/conv1/norm2/conv2
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _rename(rest: str, table: dict[str, str]) -> str:
    for src, dst in table.items():
        if rest == src or rest.startswith(src + "."):
            return dst + rest[len(src) :]
    return rest


def unet_key_to_ldm(key: str, layers_per_block: int = 2) -> str:
    """diffusers UNet2DConditionModel key -> LDM key (without the ``model.diffusion_model.`` prefix)."""
    L = layers_per_block
    for src, dst in _UNET_TOP.items():
        if key.startswith(src + "."):
            return dst + key[len(src) :]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = (L + 1) * i + j + 1
        return (
            f"input_blocks.{n}.0.{_rename(rest, _UNET_RESNET)}"
            if kind == "resnets"
            else f"input_blocks.{n}.1.{rest}"
        )
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(L + 1) * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_rename(m[2], _UNET_RESNET)}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = (L + 1) * i + j
        return (
            f"output_blocks.{n}.0.{_rename(rest, _UNET_RESNET)}"
            if kind == "resnets"
            else f"output_blocks.{n}.1.{rest}"
        )
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        i = int(m[1])
        # the upsampler follows the attention in CrossAttnUpBlocks (.2), the resnet in UpBlock2D (.1)
        return f"output_blocks.{(L + 1) * i + L}.{1 if i == 0 else 2}.{m[2]}"
    raise KeyError(f"unrecognised diffusers UNet key {key!r}")


def vae_key_to_ldm(key: str, levels: int = 4) -> str:
    """diffusers AutoencoderKL key -> LDM key (without the ``first_stage_model.`` prefix)."""
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_rename(m[3], _VAE_RESNET)}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{m[1]}.mid.attn_1.{_rename(m[2], _VAE_ATTN)}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_rename(m[3], _VAE_RESNET)}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        # LDM numbers decoder levels from the lowest resolution up; diffusers the other way round
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{_rename(m[3], _VAE_RESNET)}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if re.match(r"(encoder\.conv_(in|out)|decoder\.conv_(in|out)|quant_conv|post_quant_conv)\.", key):
        return key
    raise KeyError(f"unrecognised diffusers VAE key {key!r}")


def te_key_to_ldm(key: str) -> str:
    """transformers CLIPTextModel key (with or without ``text_model.``) -> LDM key without prefix."""
    return key if key.startswith("text_model.") else "text_model." + key


def is_vae_attn_matrix(ldm_key: str) -> bool:
    """LDM stores the VAE mid-attention projections as 1x1 convs; diffusers as linear layers."""
    return bool(re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_key))


@functools.cache
def component_maps(
    unet_keys: tuple[str, ...], vae_keys: tuple[str, ...], te_keys: tuple[str, ...], layers: int, levels: int
) -> dict[str, tuple[str, str]]:
    """Full LDM key -> (component, diffusers key) table for the given diffusers key sets."""
    table: dict[str, tuple[str, str]] = {}
    for k in unet_keys:
        table[UNET_PREFIX + unet_key_to_ldm(k, layers)] = ("unet", k)
    for k in vae_keys:
        table[VAE_PREFIX + vae_key_to_ldm(k, levels)] = ("vae", k)
    for k in te_keys:
        table[TE_PREFIX + te_key_to_ldm(k)] = ("text_encoder", k)
    if len(table) != len(unet_keys) + len(vae_keys) + len(te_keys):
        raise AssertionError("key map is not injective")
    return table


# kohya / A1111 LoRA module names: a prefix per component, then the module path with '.' -> '_'
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def kohya_module_name(component: str, module_path: str) -> str:
    """The kohya / A1111 network module name of a diffusers-layout module path (``unet`` or
    ``text_encoder``); text-encoder paths first take the ``text_model.`` prefix the files carry."""
    path = te_key_to_ldm(module_path) if component == "text_encoder" else module_path
    return KOHYA_PREFIX[component] + path.replace(".", "_")
