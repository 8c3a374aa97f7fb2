"""SD1.x model configs: the shipped SD1.5 configs, shape inference for any SD1.x-topology state
dict (real or tiny), and the tiny test/demo configs."""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass, field
from importlib import resources

from baka.models.keymap import TE_PREFIX, UNET_PREFIX, VAE_PREFIX

_FILES = {
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}


@functools.cache
def _shipped(name: str) -> dict:
    text = resources.files("baka.models").joinpath(f"configs/sd15/{_FILES[name]}").read_text()
    return json.loads(text)


def shipped_config(name: str) -> dict:
    """A copy of the shipped SD1.5 config for ``unet``, ``vae``, ``text_encoder`` or ``scheduler``."""
    return copy.deepcopy(_shipped(name))


def text_heads(hidden: int) -> int:
    # CLIP ViT-L/14 uses 64-wide heads; tiny test encoders narrower than 64 use 4 heads.
    return hidden // 64 if hidden % 64 == 0 else 4


@dataclass
class SDConfig:
    unet: dict
    vae: dict
    text_encoder: dict
    scheduler: dict = field(default_factory=lambda: shipped_config("scheduler"))

    @property
    def is_real_size(self) -> bool:
        return self.unet["block_out_channels"][0] == 320


def sd15_config() -> SDConfig:
    return SDConfig(shipped_config("unet"), shipped_config("vae"), shipped_config("text_encoder"))


def tiny_config() -> SDConfig:
    """SD1.x topology at toy width: 4 levels, layers_per_block 2, 3 cross-attention down blocks,
    12 text-encoder layers and the real 49408-token vocabulary, so the LDM keys and the 26 merge
    blocks are exactly SD1.5's."""
    cfg = sd15_config()
    # widths double like SD1.5's (320, 640, 1280, 1280) so the same shortcut convs exist
    cfg.unet.update(block_out_channels=[32, 64, 128, 128], cross_attention_dim=32, sample_size=8)
    cfg.vae.update(block_out_channels=[8, 16, 32, 32], norm_num_groups=8, sample_size=64)
    cfg.text_encoder.update(hidden_size=32, intermediate_size=64, num_attention_heads=4, projection_dim=32)
    return cfg


def norm_groups(chans: list[int]) -> int:
    """GroupNorm groups of an SD1.x-topology UNet or VAE, from its widths.

    SD1.5 and the tiny test models (last two levels equally wide, like SD1.5's): ``min(32, width)``.
    Toy widths that keep doubling to the last level (the shipped world models, ``baka.world``): two
    channels per group, because a one-channel group is an instance norm, and the norm before the last
    conv would then erase every per-channel mean (an image's colour, a latent's DC).
    """
    if chans[0] >= 64 or chans[-1] == chans[-2]:
        return min(32, chans[0])
    return chans[0] // 2


def infer_config(shapes: dict[str, tuple[int, ...]]) -> SDConfig:
    """Config of an SD1.x-topology LDM state dict from its tensor shapes alone."""
    cfg = sd15_config()
    u = UNET_PREFIX
    if f"{u}input_blocks.1.0.out_layers.3.weight" in shapes:
        chans = [shapes[f"{u}input_blocks.{3 * i + 1}.0.out_layers.3.weight"][0] for i in range(4)]
        ctx = shapes[f"{u}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"][1]
        cfg.unet.update(
            block_out_channels=chans,
            cross_attention_dim=ctx,
            in_channels=shapes[f"{u}input_blocks.0.0.weight"][1],
            out_channels=shapes[f"{u}out.2.weight"][0],
            norm_num_groups=norm_groups(chans),
            sample_size=64 if chans[0] >= 320 else 8,
        )
    v = VAE_PREFIX
    if f"{v}encoder.down.0.block.0.conv1.weight" in shapes:
        chans = [shapes[f"{v}encoder.down.{i}.block.0.conv1.weight"][0] for i in range(4)]
        cfg.vae.update(
            block_out_channels=chans,
            latent_channels=shapes[f"{v}quant_conv.weight"][0] // 2,
            norm_num_groups=norm_groups(chans),
            sample_size=512 if chans[0] >= 128 else 64,
        )
    t = TE_PREFIX + "text_model."
    if f"{t}embeddings.token_embedding.weight" in shapes:
        vocab, hidden = shapes[f"{t}embeddings.token_embedding.weight"]
        layers = 1 + max(
            int(k[len(t) :].split(".")[2]) for k in shapes if k.startswith(t + "encoder.layers.")
        )
        cfg.text_encoder.update(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=shapes[f"{t}encoder.layers.0.mlp.fc1.weight"][0],
            num_hidden_layers=layers,
            num_attention_heads=text_heads(hidden),
            max_position_embeddings=shapes[f"{t}embeddings.position_embedding.weight"][0],
            projection_dim=hidden,
        )
    return cfg


def _model_kwargs(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k != "architectures"}


def make_unet(cfg: dict):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**_model_kwargs(cfg))


def make_vae(cfg: dict):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**_model_kwargs(cfg))


def make_text_encoder(cfg: dict):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**_model_kwargs(cfg)))


MAKERS = {"unet": make_unet, "vae": make_vae, "text_encoder": make_text_encoder}


@functools.cache
def _module_keys(component: str, cfg_json: str) -> tuple[str, ...]:
    from baka.models.meta import empty_weights

    with empty_weights():
        model = MAKERS[component](json.loads(cfg_json))
    return tuple(model.state_dict().keys())


def module_keys(component: str, cfg: dict) -> tuple[str, ...]:
    """State-dict keys of the diffusers/transformers module for ``cfg`` (built on the meta device)."""
    return _module_keys(component, json.dumps(cfg, sort_keys=True))
