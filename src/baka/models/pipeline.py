"""diffusers modules and pipelines built from an in-memory SD1.x checkpoint (no hub, no network)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from baka.models.config import MAKERS, SDConfig
from baka.models.convert import diffusers_to_ldm
from baka.models.io import Checkpoint, save_checkpoint


def build_module(component: str, cfg: SDConfig, state_dict: dict[str, torch.Tensor], dtype=None):
    """A diffusers/transformers module of ``component`` with ``state_dict`` loaded strictly."""
    from baka.models.meta import META_LOCK

    with META_LOCK:  # the meta build and the assignment, with no other thread's meta patch between
        return _build_module(component, cfg, state_dict, dtype)


def _build_module(component: str, cfg: SDConfig, state_dict: dict[str, torch.Tensor], dtype=None):
    from baka.models.meta import empty_weights

    with empty_weights():
        module = MAKERS[component](getattr(cfg, component))
    sd = state_dict
    if component == "text_encoder":
        names = set(module.state_dict())
        sd = {
            (k[len("text_model.") :] if k not in names and k.startswith("text_model.") else k): v
            for k, v in sd.items()
        }

    # assign=True materialises the meta module from our tensors: cast (or clone) them first, since
    # sources may be shared mmap views and the module must own its weights
    def own(v: torch.Tensor) -> torch.Tensor:
        return v.to(dtype) if dtype is not None and v.is_floating_point() and v.dtype != dtype else v.clone()

    module.load_state_dict({k: own(v) for k, v in sd.items()}, strict=True, assign=True)
    return module.eval()


def load_modules(ckpt: Checkpoint, components: Iterable[str] | None = None, dtype=None) -> dict:
    """Live modules (``unet``, ``text_encoder``, ``vae``) of a checkpoint; all present ones by default."""
    comps = ckpt.components()
    return {c: build_module(c, ckpt.config, comps[c], dtype) for c in (components or comps)}


def modules_to_ldm(ckpt: Checkpoint, modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The checkpoint as an LDM state dict, with the weights of ``modules`` (e.g. trained or edited)
    in place of those components."""
    comps = ckpt.components()
    for comp, module in modules.items():
        comps[comp] = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    return diffusers_to_ldm(comps, ckpt.config)


def save_modules(
    ckpt: Checkpoint,
    modules: dict[str, torch.nn.Module],
    path: str | Path,
    *,
    metadata: dict[str, str] | None = None,
    protect: Iterable[str | Path] = (),
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the checkpoint with ``modules``' weights in place (atomic; never over ``protect``);
    ``dtype`` casts every floating tensor (None: as they are)."""
    from baka.models.io import cast

    tensors = cast(modules_to_ldm(ckpt, modules), dtype)
    return save_checkpoint(tensors, path, metadata=metadata, protect=protect)


def build_pipeline(ckpt: Checkpoint, dtype=None):
    """A StableDiffusionPipeline over the checkpoint (safety checker off, offline tokenizer)."""
    return pipeline_from_modules(load_modules(ckpt, dtype=dtype), ckpt.config.scheduler)


def pipeline_from_modules(mods: dict, scheduler_config: dict):
    """A StableDiffusionPipeline around existing modules (nothing is copied)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.schedulers import PNDMScheduler

    from baka.models.tokenizer import load_tokenizer

    return StableDiffusionPipeline(
        vae=mods["vae"],
        text_encoder=mods["text_encoder"],
        tokenizer=load_tokenizer(),
        unet=mods["unet"],
        scheduler=PNDMScheduler.from_config(scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
