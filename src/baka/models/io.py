"""Loading and saving SD1.x models in every layout A1111, ComfyUI and diffusers users have.

In memory a model is a flat state dict in the LDM/A1111 single-file layout (``model.diffusion_model.*``,
``cond_stage_model.transformer.*``, ``first_stage_model.*``): the layout merges, hashes and block
maps are defined on. Diffusers folders are converted on load and on save.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from baka.errors import BakaError, ModelFileError
from baka.models import detect
from baka.models.ckpt import load_ckpt
from baka.models.config import SDConfig, infer_config
from baka.models.convert import (
    COMPONENTS,
    POSITION_IDS,
    diffusers_to_ldm,
    extract_ema,
    ldm_to_diffusers,
    normalize_ldm_keys,
)
from baka.models.keymap import VAE_PREFIX, te_key_to_ldm, vae_key_to_ldm
from baka.models.safetensors_io import SafetensorsFile, TensorSpec, atomic_output, save_file

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DTYPE_BY_NAME = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class DictSource:
    """An in-memory state dict with the same read interface as :class:`SafetensorsFile`."""

    tensors: dict[str, torch.Tensor]
    path: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def spec(self, key: str) -> TensorSpec:
        t = self.tensors[key]
        return TensorSpec(t.dtype, tuple(t.shape))

    def specs(self) -> dict[str, TensorSpec]:
        return {k: self.spec(k) for k in self.tensors}

    def get(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def close(self) -> None:
        pass

    def __enter__(self) -> DictSource:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise ModelFileError(path, "no such file or folder")


def open_source(path: str | Path) -> SafetensorsFile | DictSource:
    """Open a model for reading tensor by tensor in the LDM layout.

    Single-file safetensors are memory-mapped (nothing is read until asked for); pickled checkpoints
    and diffusers folders are loaded and converted in memory.
    """
    path = Path(path)
    _check_exists(path)
    if path.is_dir():
        return DictSource(read_diffusers(path), path)
    if path.suffix.lower() == ".safetensors":
        return SafetensorsFile(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return DictSource(load_ckpt(path), path)
    raise ModelFileError(
        path, f"unknown model file type {path.suffix!r} (want .safetensors, .ckpt or a folder)"
    )


def read_raw(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a file or folder (LDM layout for folders) and its safetensors metadata."""
    src = open_source(path)
    with src:
        return {k: src.get(k) for k in src.keys()}, dict(getattr(src, "metadata", {}) or {})


def shapes_of_source(src: SafetensorsFile | DictSource) -> dict[str, tuple[int, ...]]:
    return {k: s.shape for k, s in src.specs().items()}


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
    path: str | Path, *, ema: bool = False, vae: str | Path | None = None, keep_extra: bool = False
) -> Checkpoint:
    """Load an SD1.x checkpoint (single file or diffusers folder), validated and split.

    ``ema`` takes the UNet's EMA weights; ``vae`` replaces the VAE from a separate file. Keys outside
    the model (EMA copies, schedule buffers) are dropped unless ``keep_extra``.
    """
    path = Path(path)
    raw, meta = read_raw(path)
    raw = normalize_ldm_keys(raw)
    kind = detect.classify({k: tuple(v.shape) for k, v in raw.items()})
    detect.require_sd1(path, kind)
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


# ---------------------------------------------------------------------------------------------------------
# diffusers folders

_WEIGHT_NAMES = {
    "unet": ("diffusion_pytorch_model",),
    "vae": ("diffusion_pytorch_model",),
    "text_encoder": ("model", "pytorch_model"),
}
_CONFIG_NAMES = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json"}


def _find_weights(folder: Path, comp: str) -> Path | None:
    for stem in _WEIGHT_NAMES[comp]:
        for suffix in (".safetensors", ".fp16.safetensors", ".bin", ".fp16.bin"):
            p = folder / comp / f"{stem}{suffix}"
            if p.exists():
                return p
    return None


def read_diffusers(folder: str | Path) -> dict[str, torch.Tensor]:
    """A diffusers pipeline folder as an LDM state dict."""
    folder = Path(folder)
    comps: dict[str, dict[str, torch.Tensor]] = {}
    cfg = SDConfig(*(_read_json(folder / c / _CONFIG_NAMES[c], folder) for c in COMPONENTS))
    for comp in COMPONENTS:
        w = _find_weights(folder, comp)
        if w is None:
            raise ModelFileError(folder, f"diffusers folder has no {comp} weights")
        src = SafetensorsFile(w) if w.suffix == ".safetensors" else DictSource(load_ckpt(w), w)
        with src:
            sd = {k: src.get(k) for k in src.keys()}
        sd.pop("text_model.embeddings.position_ids", None)
        comps[comp] = sd
    try:
        return diffusers_to_ldm(comps, cfg)
    except BakaError as e:
        raise ModelFileError(folder, str(e)) from None


def _read_json(p: Path, folder: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise ModelFileError(folder, f"not a diffusers folder ({p.relative_to(folder)} missing)") from None
    except json.JSONDecodeError:
        raise ModelFileError(p, "invalid JSON") from None


def save_diffusers(ckpt: Checkpoint, folder: str | Path, *, protect: Iterable[str | Path] = ()) -> Path:
    """Write a complete offline-loadable diffusers folder (StableDiffusionPipeline.from_pretrained)."""
    from baka.errors import OutputError
    from baka.models.safetensors_io import OUTPUT_ERRNOS, output_error
    from baka.models.tokenizer import vocab_and_merges

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
            (tmp / comp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(ckpt.config.scheduler, indent=2))
        (tmp / "tokenizer").mkdir()
        vocab, merges = vocab_and_merges()
        (tmp / "tokenizer" / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (tmp / "tokenizer" / "merges.txt").write_text(
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
        (tmp / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
        index = {
            "_class_name": "StableDiffusionPipeline",
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", ckpt.config.scheduler["_class_name"]],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
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


# ---------------------------------------------------------------------------------------------------------
# info


def describe(path: str | Path, *, hashes: bool = True, progress: bool = False) -> dict:
    """Kind, dtypes, key counts per block and hashes of a model file (`baka info`)."""
    from baka.models.blocks import BLOCK_IDS, block_of
    from baka.models.hashes import all_hashes
    from baka.models.safetensors_io import report_leftovers

    path = Path(path)
    leftovers = report_leftovers(path)  # temp files of interrupted writes, warned even if path is bad
    src = open_source(path)
    with src:
        specs = src.specs()
        meta = dict(getattr(src, "metadata", {}) or {})
    shapes = {k: s.shape for k, s in specs.items()}
    kind = detect.classify(shapes)
    per_block = Counter(block_of(k) for k in specs)
    info: dict = {
        "file": str(path),
        "kind": kind.name,
        "detail": kind.detail,
        "components": kind.components,
        "keys": len(specs),
        "dtypes": dict(Counter(str(s.dtype).replace("torch.", "") for s in specs.values())),
        "parameters": sum(s.numel for s in specs.values()),
        "blocks": {b: per_block.get(b, 0) for b in BLOCK_IDS},
        "outside_blocks": per_block.get(None, 0),
        "metadata_keys": sorted(meta),
    }
    if kind.name == "sd1" and "unet" in kind.components:
        info["size"] = "real-size SD1.x" if infer_config(shapes).is_real_size else "tiny SD1.x topology"
    if hashes and path.is_file():
        info["hashes"] = all_hashes(path, progress=progress)
    info["leftover_temp_files"] = leftovers
    return info
