"""LDM (A1111 single file) <-> diffusers conversion of SD1.x state dicts, bit-exact both ways."""

from __future__ import annotations

import torch

from baka.errors import BakaError
from baka.models.config import SDConfig, infer_config, module_keys
from baka.models.keymap import TE_PREFIX, component_maps, is_vae_attn_matrix

COMPONENTS = ("unet", "vae", "text_encoder")
POSITION_IDS = TE_PREFIX + "text_model.embeddings.position_ids"


def key_table(cfg: SDConfig) -> dict[str, tuple[str, str]]:
    """LDM key -> (component, module key) for every parameter of an SD1.x model of config ``cfg``."""
    return component_maps(
        module_keys("unet", cfg.unet),
        module_keys("vae", cfg.vae),
        module_keys("text_encoder", cfg.text_encoder),
        cfg.unet["layers_per_block"],
        len(cfg.vae["block_out_channels"]),
    )


def shapes_of(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def ldm_to_diffusers(
    sd: dict[str, torch.Tensor], cfg: SDConfig | None = None
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Split an LDM state dict into diffusers component state dicts.

    Returns ``(components, extra)``: ``components[name]`` holds module keys for each component that
    is present (a component is present if any of its keys is); ``extra`` holds keys that belong to
    no model component (EMA copies, schedule buffers, position_ids). A component with some but not
    all of its keys raises :class:`BakaError`.
    """
    cfg = cfg or infer_config(shapes_of(sd))
    table = key_table(cfg)
    out: dict[str, dict[str, torch.Tensor]] = {c: {} for c in COMPONENTS}
    extra: dict[str, torch.Tensor] = {}
    for k, t in sd.items():
        hit = table.get(k)
        if hit is None:
            extra[k] = t
            continue
        comp, dk = hit
        if is_vae_attn_matrix(k) and t.ndim == 4:
            t = t[:, :, 0, 0]
        out[comp][dk] = t
    for comp in COMPONENTS:
        if out[comp]:
            want = {dk for c, dk in table.values() if c == comp}
            missing = sorted(want - set(out[comp]))
            if missing:
                raise BakaError(f"{comp} is incomplete: {len(missing)} keys missing (first: {missing[0]})")
    return {c: v for c, v in out.items() if v}, extra


def diffusers_to_ldm(
    components: dict[str, dict[str, torch.Tensor]], cfg: SDConfig
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`ldm_to_diffusers` (the text encoder's position_ids are regenerated)."""
    inverse = {(c, dk): k for k, (c, dk) in key_table(cfg).items()}
    out: dict[str, torch.Tensor] = {}
    for comp, sd in components.items():
        for dk, t in sd.items():
            key = (
                (comp, dk[len("text_model.") :])
                if comp == "text_encoder" and (comp, dk) not in inverse
                else (comp, dk)
            )
            if key not in inverse:
                raise BakaError(f"unexpected {comp} key {dk!r} for an SD1.x model")
            k = inverse[key]
            if is_vae_attn_matrix(k) and t.ndim == 2:
                t = t[:, :, None, None]
            out[k] = t
    if "text_encoder" in components:
        n = cfg.text_encoder["max_position_embeddings"]
        out[POSITION_IDS] = torch.arange(n, dtype=torch.int64)[None]
    return out


def normalize_ldm_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Older SD1.x files store the text encoder without ``text_model.``; add it."""
    old = TE_PREFIX
    if not any(k.startswith(old + "text_model.") for k in sd) and any(
        k.startswith(old + "embeddings.") for k in sd
    ):
        return {(old + "text_model." + k[len(old) :] if k.startswith(old) else k): v for k, v in sd.items()}
    return sd


def extract_ema(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace UNet weights by their EMA copies (``model_ema.diffusion_modelinput_blocks00weight``)."""
    prefix = "model.diffusion_model."
    out = dict(sd)
    n = 0
    for k in sd:
        if k.startswith(prefix):
            ema = "model_ema." + "".join(k.split(".")[1:])
            if ema in sd:
                out[k] = sd[ema]
                n += 1
    if n == 0:
        raise BakaError("checkpoint has no EMA weights (no model_ema.* keys)")
    return out
