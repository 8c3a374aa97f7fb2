"""Network file formats (LoRA / LoCon, LoHa, LoKr) in kohya / A1111 layout: one class per format in a
registry, each turning one module's tensors into a weight delta (the shape of ComfyUI's weight
adapters). Generation applies the deltas as a reversible patch; merge tools can bake them.

Deltas (scale = alpha / rank, alpha defaulting to rank):
- LoRA / LoCon: up @ down (conv kernels flattened; Tucker ``lora_mid`` supported)
- LoHa: (w1a @ w1b) * (w2a @ w2b)  (Hadamard product; Tucker ``hada_t1/t2`` supported)
- LoKr: kron(w1, w2), each factor full or a low-rank product (scale 1 unless a factor is decomposed)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from baka.errors import BakaError, ModelFileError
from baka.models.keymap import KOHYA_PREFIX
from baka.registry import Registry

Tensors = dict[str, torch.Tensor]


def _tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # core [r, r, k, k], b (down) [r, in], a (up) [out, r] -> [out, in, k, k]
    return torch.einsum("ijkl,jr,ip->prkl", core, b.flatten(1), a.flatten(1))


class NetworkFormat:
    """One network format: which tensor suffixes it owns and how they make a weight delta."""

    name: ClassVar[str]
    marker: ClassVar[str]  # prefix of a tensor suffix that identifies the format
    keys: ClassVar[frozenset[str]]

    @classmethod
    def matches(cls, tensors: Tensors) -> bool:
        return any(k.startswith(cls.marker) for k in tensors)

    @classmethod
    def raw_delta(cls, t: Tensors) -> tuple[torch.Tensor, int | None]:
        """The unscaled delta and the rank that ``alpha`` divides (None: no alpha scaling)."""
        raise NotImplementedError

    @classmethod
    def delta_weight(cls, tensors: Tensors, shape: torch.Size) -> torch.Tensor:
        """The weight delta of one module for a layer of ``shape`` (scale included, multiplier not)."""
        t = {k: v.float() for k, v in tensors.items()}
        delta, rank = cls.raw_delta(t)
        alpha = t.get("alpha")
        scale = 1.0 if rank is None or alpha is None else float(alpha) / rank
        if delta.numel() != shape.numel():
            raise BakaError(f"network delta {tuple(delta.shape)} does not fit layer {tuple(shape)}")
        return delta.reshape(shape) * scale


NETWORK_FORMATS: Registry[type[NetworkFormat]] = Registry("network format")


def _format(cls: type[NetworkFormat]) -> type[NetworkFormat]:
    return NETWORK_FORMATS.add(cls.name, cls)


@_format
class LoRA(NetworkFormat):
    """LoRA and LoCon: up @ down, conv kernels flattened; Tucker core ``lora_mid``."""

    name = "LoRA"
    marker = "lora_up."
    keys = frozenset({"lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha"})

    @classmethod
    def raw_delta(cls, t: Tensors) -> tuple[torch.Tensor, int | None]:
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        if "lora_mid.weight" in t:
            return _tucker(t["lora_mid.weight"], up, down), down.shape[0]
        return up.flatten(1) @ down.flatten(1), down.shape[0]


@_format
class LoHa(NetworkFormat):
    """LoHa: Hadamard product of two low-rank products; Tucker cores ``hada_t1/t2``."""

    name = "LoHa"
    marker = "hada_w1_a"
    keys = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"})

    @classmethod
    def raw_delta(cls, t: Tensors) -> tuple[torch.Tensor, int | None]:
        if "hada_t1" in t:
            w1 = _tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
            w2 = _tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        else:
            w1 = t["hada_w1_a"] @ t["hada_w1_b"]
            w2 = t["hada_w2_a"] @ t["hada_w2_b"]
        return w1 * w2, t["hada_w1_b"].shape[0]


@_format
class LoKr(NetworkFormat):
    """LoKr: kron(w1, w2), each factor full or a low-rank product (alpha applies only then)."""

    name = "LoKr"
    marker = "lokr_"
    keys = frozenset(
        {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"}
    )

    @classmethod
    def raw_delta(cls, t: Tensors) -> tuple[torch.Tensor, int | None]:
        rank = None
        w1 = t.get("lokr_w1")
        if w1 is None:
            w1, rank = t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w1_b"].shape[0]
        w2 = t.get("lokr_w2")
        if w2 is None:
            rank = t["lokr_w2_b"].shape[0]
            w2 = (
                _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
                if "lokr_t2" in t
                else t["lokr_w2_a"] @ t["lokr_w2_b"]
            )
        if w2.ndim == 4 and w1.ndim == 2:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2), rank


@dataclass
class Module:
    """One network module: its tensors by short suffix (``lora_up.weight`` ...)."""

    name: str
    tensors: Tensors = field(default_factory=dict)

    @property
    def format(self) -> type[NetworkFormat] | None:
        return next((f for f in map(NETWORK_FORMATS.get, NETWORK_FORMATS) if f.matches(self.tensors)), None)

    def unsupported(self) -> list[str]:
        """Tensors this module carries that its format does not apply (e.g. DoRA's dora_scale, bias
        diffs); applying the rest alone would be silently wrong."""
        fmt = self.format
        return sorted(set(self.tensors) - (fmt.keys if fmt else set()))

    def delta_weight(self, shape: torch.Size) -> torch.Tensor:
        fmt = self.format
        if fmt is None:
            raise BakaError(f"{self.name}: unsupported network module (keys {sorted(self.tensors)})")
        try:
            return fmt.delta_weight(self.tensors, shape)
        except BakaError as e:
            raise BakaError(f"{self.name}: {e}") from None


@dataclass
class Network:
    name: str
    path: Path
    modules: dict[str, Module]
    hash: str = ""


# kohya's text-encoder prefix, plus the SDXL-era "te1" spelling some SD1 files carry
_MODULE_PREFIXES = (*KOHYA_PREFIX.values(), "lora_te1_")


def load_network(path: str | Path) -> Network:
    """A kohya / A1111 network file (.safetensors, or a pickle read by the safe loader)."""
    from baka.models.hashes import addnet_hash, sha256_file
    from baka.models.sources import read_raw

    path = Path(path)
    raw, _ = read_raw(path)
    modules: dict[str, Module] = {}
    for key, t in raw.items():
        name, _, suffix = key.partition(".")
        if not name.startswith(_MODULE_PREFIXES):
            raise ModelFileError(path, f"not a kohya/A1111 LoRA (unexpected key {key!r})")
        modules.setdefault(name, Module(name)).tensors[suffix] = t
    if not modules:
        raise ModelFileError(path, "empty LoRA file")
    # A1111 names a LoRA by its addnet hash (the tensor payload, stable under metadata edits) when it
    # is a safetensors file, by the file's sha256 otherwise; Civitai matches the first 12 hex digits
    digest = addnet_hash(path) if path.suffix.lower() == ".safetensors" else sha256_file(path)
    return Network(path.stem, path, modules, digest[:12])


__all__ = ["NETWORK_FORMATS", "NetworkFormat", "Module", "Network", "load_network", "LoRA", "LoHa", "LoKr"]
