"""Model sources: every SD1.x file layout read through one typed interface, tensor by tensor.

A :class:`TensorSource` (single-file safetensors, memory-mapped; pickled ``.ckpt``; a diffusers folder
converted to the LDM layout) answers ``keys`` / ``spec`` / ``specs`` / ``get`` and is a context manager.
The merge engine, ``baka diff`` and the loaders read models only through it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from baka.errors import BakaError, ModelFileError
from baka.models.ckpt import load_ckpt
from baka.models.config import SDConfig
from baka.models.convert import COMPONENTS, diffusers_to_ldm
from baka.models.safetensors_io import SafetensorsFile, TensorSpec
from baka.models.shipped import resolve

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@runtime_checkable
class TensorSource(Protocol):
    """What every model source answers (``SafetensorsFile`` and ``DictSource`` implement it)."""

    @property
    def path(self) -> Path | None: ...

    @property
    def metadata(self) -> dict[str, str]: ...

    def keys(self) -> list[str]: ...

    def spec(self, key: str) -> TensorSpec: ...

    def specs(self) -> dict[str, TensorSpec]: ...

    def get(self, key: str) -> torch.Tensor: ...

    def close(self) -> None: ...

    def __enter__(self) -> TensorSource: ...

    def __exit__(self, *exc: object) -> None: ...


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


def open_source(path: str | Path) -> TensorSource:
    """Open a model for reading tensor by tensor in the LDM layout.

    Single-file safetensors are memory-mapped (nothing is read until asked for); pickled checkpoints
    and diffusers folders are loaded and converted in memory.
    """
    path = resolve(path)  # shipped model names (world-flat, ...) work wherever a path does
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


def shapes_of_source(src: TensorSource) -> dict[str, tuple[int, ...]]:
    return {k: s.shape for k, s in src.specs().items()}


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


__all__ = [
    "PICKLE_SUFFIXES",
    "DictSource",
    "TensorSource",
    "open_source",
    "read_diffusers",
    "read_raw",
    "shapes_of_source",
]
