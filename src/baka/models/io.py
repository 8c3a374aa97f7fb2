"""Loading and saving SD1.x models in every layout A1111, ComfyUI and diffusers users have.

Reading goes through ``baka.models.sources`` (one typed source per layout); diffusers folders are
written by ``baka.models.diffusers_writer`` and described by ``baka.models.info``.

In memory a model is a flat state dict in the LDM/A1111 single-file layout (``model.diffusion_model.*``,
``cond_stage_model.transformer.*``, ``first_stage_model.*``): the layout merges, hashes and block
maps are defined on. Diffusers folders are converted on load and on save.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from baka.errors import BakaError, ModelFileError
from baka.models import detect
from baka.models.config import SDConfig, infer_config
from baka.models.convert import (
    POSITION_IDS,
    extract_ema,
    ldm_to_diffusers,
    normalize_ldm_keys,
)
from baka.models.keymap import VAE_PREFIX, vae_key_to_ldm
from baka.models.safetensors_io import atomic_output, save_file
from baka.models.shipped import resolve
from baka.models.sources import (
    PICKLE_SUFFIXES,
    DictSource,
    TensorSource,
    open_source,
    read_raw,
    shapes_of_source,
)

DTYPE_BY_NAME = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# kohya's --save_precision names (LoRA / embedding / model files the trainer and the LoRA tools write)
SAVE_PRECISION_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Checkpoint:
    """An SD1.x model in the LDM layout plus where it came from."""

    tensors: dict[str, torch.Tensor]
    config: SDConfig
    path: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def components(self) -> dict[str, dict[str, torch.Tensor]]:
        """diffusers-layout state dicts of the components present."""
        comps, _ = ldm_to_diffusers(self.tensors, self.config)
        return comps


def load_checkpoint(
    path: str | Path,
    *,
    ema: bool = False,
    vae: str | Path | None = None,
    keep_extra: bool = False,
    inpaint: bool = False,
) -> Checkpoint:
    """Load an SD1.x checkpoint (single file or diffusers folder), validated and split.

    ``ema`` takes the UNet's EMA weights; ``vae`` replaces the VAE from a separate file. Keys outside
    the model (EMA copies, schedule buffers) are dropped unless ``keep_extra``. ``inpaint`` accepts
    9-channel inpainting checkpoints (the generator drives them; merging and training do not yet).
    """
    path = resolve(path)
    raw, meta = read_raw(path)
    raw = normalize_ldm_keys(raw)
    kind = detect.classify({k: tuple(v.shape) for k, v in raw.items()})
    detect.require_sd1(path, kind, inpaint=inpaint)
    if ema:
        try:
            raw = extract_ema(raw)
        except BakaError as e:
            raise ModelFileError(path, str(e)) from None
    cfg = infer_config({k: tuple(v.shape) for k, v in raw.items()})
    try:
        comps, extra = ldm_to_diffusers(raw, cfg)
    except BakaError as e:
        raise ModelFileError(path, str(e)) from None
    model = {k: v for k, v in raw.items() if k not in extra or k == POSITION_IDS}
    if "text_encoder" in comps and POSITION_IDS not in model:
        model[POSITION_IDS] = torch.arange(cfg.text_encoder["max_position_embeddings"], dtype=torch.int64)[
            None
        ]
    extra.pop(POSITION_IDS, None)
    if vae is not None:
        model = {k: v for k, v in model.items() if not k.startswith(VAE_PREFIX)}
        model.update(load_vae(vae))
        cfg = infer_config({k: tuple(v.shape) for k, v in model.items()})
    return Checkpoint(model, cfg, path, meta, extra if keep_extra else {})


def load_vae(path: str | Path) -> dict[str, torch.Tensor]:
    """A separate VAE file (LDM ``.vae.pt``/``.ckpt``/``.safetensors`` or diffusers layout), returned
    with LDM ``first_stage_model.`` keys. Training-only ``loss.*`` keys are dropped."""
    path = Path(path)
    raw, _ = read_raw(path)
    out: dict[str, torch.Tensor] = {}
    for k, t in raw.items():
        k = k[len(VAE_PREFIX) :] if k.startswith(VAE_PREFIX) else k
        if k.startswith(("loss.", "model_ema.")):
            continue
        if ".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k or "conv_norm_out" in k:
            try:
                k = vae_key_to_ldm(k)
            except KeyError:
                raise ModelFileError(path, f"unrecognised VAE key {k!r}") from None
            if t.ndim == 2 and k.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
                t = t[:, :, None, None]
        out[VAE_PREFIX + k] = t
    if not any(k.startswith(VAE_PREFIX + "decoder.") for k in out):
        raise ModelFileError(path, "not a VAE file (no decoder weights)")
    cfg = infer_config({k: tuple(v.shape) for k, v in out.items()})
    try:
        comps, extra = ldm_to_diffusers(out, cfg)
    except BakaError as e:
        raise ModelFileError(path, str(e)) from None
    if extra:
        raise ModelFileError(path, f"unrecognised VAE key {next(iter(extra))!r}")
    return out


def cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Cast floating tensors to ``dtype`` (integer buffers such as position_ids keep theirs)."""
    if dtype is None:
        return tensors
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}


def save_checkpoint(
    tensors: dict[str, torch.Tensor],
    path: str | Path,
    *,
    metadata: dict[str, str] | None = None,
    protect: Iterable[str | Path] = (),
    progress: bool = False,
) -> Path:
    """Write an LDM single file atomically: ``.safetensors`` (default) or ``.ckpt``."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        with atomic_output(path, protect=protect) as tmp, open(tmp, "wb") as f:
            # through a file object, so a full disk is an OSError (torch's own writer reports it vaguely)
            try:
                torch.save({"state_dict": {k: v.contiguous() for k, v in tensors.items()}}, f)
            except RuntimeError as e:  # torch's zip writer masks the OSError with its own
                if isinstance(e.__context__, OSError):
                    raise e.__context__ from None
                raise
            f.flush()
            os.fsync(f.fileno())
        return path
    return save_file(
        {k: v.contiguous() for k, v in tensors.items()}, path, metadata, protect=protect, progress=progress
    )


# older import paths (README's `from baka.models.io import save_diffusers, describe`), resolved lazily
# because both modules build on this one
_MOVED = {"save_diffusers": "baka.models.diffusers_writer", "describe": "baka.models.info"}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DTYPE_BY_NAME",
    "SAVE_PRECISION_DTYPES",
    "PICKLE_SUFFIXES",
    "Checkpoint",
    "DictSource",
    "TensorSource",
    "cast",
    "load_checkpoint",
    "load_vae",
    "open_source",
    "read_raw",
    "save_checkpoint",
    "shapes_of_source",
]
