"""What a model file is, from its key names and shapes alone (nothing is loaded)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from baka.errors import ModelFileError
from baka.models.keymap import TE_PREFIX, UNET_PREFIX, VAE_PREFIX


@dataclass
class Kind:
    name: str  # sd1 | vae | lora | embedding | sd2 | sdxl | sd1-inpaint | unknown
    components: list[str] = field(default_factory=list)
    detail: str = ""


# keys every SD1.x UNet has (real-size and tiny topologies alike); a file whose model.diffusion_model.*
# keys include none of them is not an SD1.x checkpoint, whatever its prefixes say
_UNET_ANCHORS = ("input_blocks.0.0.weight", "time_embed.0.weight", "out.2.weight")


def classify(shapes: dict[str, tuple[int, ...]]) -> Kind:
    keys = shapes.keys()
    if any(
        k.startswith(("lora_unet_", "lora_te_", "lycoris_")) or ".lora_down." in k or ".lora_A." in k
        for k in keys
    ):
        return Kind("lora", detail="LoRA/LyCORIS network")
    if any(k in ("string_to_param.*", "emb_params") or k.startswith("string_to_param") for k in keys):
        return Kind("embedding", detail="textual-inversion embedding")
    if (
        any(k.startswith("conditioner.embedders.") for k in keys)
        or UNET_PREFIX + "label_emb.0.0.weight" in keys
    ):
        return Kind("sdxl", detail="SDXL checkpoint")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return Kind("sd2", detail="SD2.x checkpoint (OpenCLIP text encoder)")
    comps = []
    if any(k.startswith(UNET_PREFIX) for k in keys):
        comps.append("unet")
    if any(k.startswith(TE_PREFIX) for k in keys):
        comps.append("text_encoder")
    if any(k.startswith(VAE_PREFIX) for k in keys):
        comps.append("vae")
    if "unet" in comps and not any(UNET_PREFIX + a in shapes for a in _UNET_ANCHORS):
        n = sum(k.startswith(UNET_PREFIX) for k in keys)
        return Kind("unknown", detail=f"none of its {n} {UNET_PREFIX}* keys is an SD1.x UNet key")
    if "unet" in comps:
        k_attn = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        if k_attn in shapes and shapes[k_attn][1] == 1024:
            return Kind("sd2", comps, "SD2.x checkpoint (1024-wide cross-attention)")
        k_in = UNET_PREFIX + "input_blocks.0.0.weight"
        if k_in in shapes and shapes[k_in][1] == 9:
            return Kind("sd1-inpaint", comps, "SD1.x inpainting checkpoint (9 input channels)")
        return Kind("sd1", comps, "SD1.x checkpoint")
    if comps == ["vae"] or any(
        k.startswith(("encoder.down.", "decoder.up.", "encoder.down_blocks.")) for k in keys
    ):
        return Kind("vae", ["vae"], "VAE")
    if comps:
        return Kind("sd1", comps, "SD1.x partial checkpoint")
    return Kind("unknown", detail="no SD1.x keys")


_WRONG = {
    "lora": "this is a LoRA/LyCORIS file, not a checkpoint; use it with <lora:name:weight> in a prompt",
    "embedding": "this is a textual-inversion embedding, not a checkpoint",
    "sd2": "SD2.x checkpoints are not supported (baka is for SD1.x: 768-wide CLIP-L cross-attention)",
    "sdxl": "SDXL checkpoints are not supported (baka is for SD1.x)",
    "sd1-inpaint": "inpainting checkpoints (9-channel UNet input) are not supported here",
    "vae": "this is a VAE file, not a full checkpoint; pass it with --vae",
    "unknown": "not a Stable Diffusion checkpoint (no SD1.x keys found)",
}


def require_sd1(path: str | Path, kind: Kind, *, need_unet: bool = True, inpaint: bool = False) -> None:
    """Raise a one-line :class:`ModelFileError` unless ``kind`` is a usable SD1.x checkpoint
    (``inpaint``: 9-channel inpainting checkpoints are usable too, e.g. for generation)."""
    if kind.name == "unknown" and kind.detail != "no SD1.x keys":
        raise ModelFileError(path, f"not a Stable Diffusion checkpoint ({kind.detail})")
    if kind.name != "sd1" and not (inpaint and kind.name == "sd1-inpaint"):
        raise ModelFileError(path, _WRONG[kind.name])
    if need_unet and "unet" not in kind.components:
        raise ModelFileError(path, "checkpoint has no UNet (model.diffusion_model.*) keys")
