"""Writing a complete, offline-loadable diffusers folder (``StableDiffusionPipeline.from_pretrained``)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from baka.errors import ModelFileError
from baka.models.io import Checkpoint
from baka.models.keymap import te_key_to_ldm
from baka.models.safetensors_io import save_file


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_configs(cfg, folder: str | Path, *, with_components: bool = True) -> Path:
    """Everything of a diffusers SD1 folder but the weights: ``model_index.json``, the scheduler, the
    CLIP tokenizer (from baka's own BPE list) and, ``with_components``, the UNet / VAE / text-encoder
    configs. A folder written so is what ``from_single_file(config=...)`` reads offline."""
    from baka.models.tokenizer import vocab_and_merges

    folder = Path(folder)
    if with_components:
        for comp in ("unet", "vae", "text_encoder"):
            _write_json(folder / comp / "config.json", dict(getattr(cfg, comp)))
    _write_json(folder / "scheduler" / "scheduler_config.json", cfg.scheduler)
    vocab, merges = vocab_and_merges()
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "tokenizer" / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges)
    )
    tok_cfg = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    _write_json(folder / "tokenizer" / "tokenizer_config.json", tok_cfg)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", cfg.scheduler["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    _write_json(folder / "model_index.json", index)
    return folder


def save_diffusers(ckpt: Checkpoint, folder: str | Path, *, protect: Iterable[str | Path] = ()) -> Path:
    """Write a complete offline-loadable diffusers folder (StableDiffusionPipeline.from_pretrained)."""
    from baka.errors import OutputError
    from baka.models.safetensors_io import OUTPUT_ERRNOS, output_error

    folder = Path(folder)
    for p in protect:
        if Path(p).resolve() == folder.resolve():
            raise ModelFileError(folder, "refusing to overwrite an input; choose another output folder")
    if folder.exists() and any(folder.iterdir()):
        raise ModelFileError(folder, "output folder exists and is not empty")
    tmp = folder.with_name(f".{folder.name}.part")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        comps = ckpt.components()
        for comp, sd in comps.items():
            (tmp / comp).mkdir(parents=True)
            if comp == "text_encoder":
                sd = {te_key_to_ldm(k): v for k, v in sd.items()}  # HF's on-disk names carry text_model.
                name, cfg = "model.safetensors", dict(ckpt.config.text_encoder)
            else:
                name = "diffusion_pytorch_model.safetensors"
                cfg = dict(getattr(ckpt.config, comp))
            save_file({k: v.contiguous() for k, v in sd.items()}, tmp / comp / name, {"format": "pt"})
            _write_json(tmp / comp / "config.json", cfg)
        write_configs(ckpt.config, tmp, with_components=False)
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
    except (OSError, OutputError) as e:  # disk full, read-only: one line naming the folder, nothing left
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OutputError):
            raise OutputError(folder, e.cause) from None
        if e.errno in OUTPUT_ERRNOS:
            raise output_error(folder, e) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


__all__ = ["save_diffusers", "write_configs"]
