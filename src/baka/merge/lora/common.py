"""What the LoRA tools share: ``FILE[:W[:LBW]]`` arguments, the truncated SVD that turns a weight
difference into kohya up / down factors, and the kohya metadata of the LoRA files they write."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from baka.errors import BakaError
from baka.merge.lora.ranks import RankRule
from baka.models.io import SAVE_PRECISION_DTYPES
from baka.models.networks import find_network


@dataclass(frozen=True)
class LoraArg:
    """One ``FILE[:W[:LBW]]`` argument: a LoRA file (or a name in the LoRA folders / shipped with
    baka), its weight and an optional lora-block-weight preset or 17 / 26-value list."""

    path: Path
    weight: float = 1.0
    lbw: str | None = None

    @classmethod
    def parse(cls, spec: str, folders: list[Path] | None = None) -> LoraArg:
        parts = spec.split(":")
        head, rest = parts[0], parts[1:]
        if len(rest) > 2:
            raise BakaError(f"{spec!r}: want FILE[:WEIGHT[:LBW]]")
        try:
            weight = float(rest[0]) if rest and rest[0] else 1.0
        except ValueError:
            raise BakaError(f"{spec!r}: weight {rest[0]!r} is not a number") from None
        p = Path(head)
        path = p if p.is_file() or p.suffix or p.parent != Path(".") else find_network(head, folders or [])
        return cls(path, weight, rest[1] if len(rest) > 1 and rest[1] else None)


def quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(x, q)`` (linear interpolation) for tensors of any size (torch.quantile
    refuses more than 2^24 elements)."""
    flat = x.flatten().float()
    pos = q * (flat.numel() - 1)
    lo, hi = int(pos), min(int(pos) + 1, flat.numel() - 1)
    a = torch.kthvalue(flat, lo + 1).values
    b = torch.kthvalue(flat, hi + 1).values
    return a + (b - a) * (pos - lo)


def svd_factors(
    diff: torch.Tensor, dim: int, rule: RankRule, clamp_quantile: float, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's extraction of one module: the truncated SVD of ``diff`` (conv kernels flattened),
    singular values folded into up, then up and down clamped to +-(the ``clamp_quantile`` quantile of
    their joined values) (1 = no clamp). Returns (up, down) shaped for the layer: [out, r] and
    [r, in] for Linear, [out, r, 1, 1] and [r, in, k, k] for Conv2d."""
    mat = diff.to(device, torch.float32).flatten(1)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    r = rule.rank(s, dim)
    up, down = u[:, :r] * s[:r], vh[:r]
    if clamp_quantile < 1:
        hi = quantile(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    up, down = up.cpu(), down.cpu()
    if diff.ndim == 4:
        return up.reshape(*up.shape, 1, 1).contiguous(), down.reshape(r, *diff.shape[1:]).contiguous()
    return up.contiguous(), down.contiguous()


class BlockError:
    """Relative Frobenius error ``||diff - approx|| / ||diff||`` of a factoring, summed per block."""

    def __init__(self) -> None:
        self.err: dict[str, float] = {}
        self.ref: dict[str, float] = {}

    def add(self, block: str, diff: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        approx = (up.flatten(1).double() @ down.flatten(1).double()).reshape(diff.shape)
        self.err[block] = self.err.get(block, 0.0) + float((diff.double() - approx).pow(2).sum())
        self.ref[block] = self.ref.get(block, 0.0) + float(diff.double().pow(2).sum())

    def relative(self) -> dict[str, float]:
        return {b: math.sqrt(self.err[b] / r) if r else 0.0 for b, r in self.ref.items()}


def lora_metadata(
    title: str, dim: int, conv_dim: int, tool: Mapping[str, object], tensors: dict[str, torch.Tensor]
) -> dict[str, str]:
    """kohya ``ss_*`` and modelspec metadata of a LoRA file (alpha = dim: every module at scale 1),
    with the addnet hash A1111 and Civitai match LoRAs by and the tool's own recipe."""
    from baka import __version__
    from baka.models.safetensors_io import payload_sha256

    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(dim),
        "ss_v2": "False",
        "ss_base_model_version": "sd_v1",
        "ss_output_name": title,
        "sshs_model_hash": payload_sha256(tensors),
        "baka_version": __version__,
        "baka_lora_tool": json.dumps(tool, sort_keys=True),
    }
    if conv_dim:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(conv_dim), "conv_alpha": str(conv_dim)})
    return meta


def save_precision(name: str) -> torch.dtype:
    try:
        return SAVE_PRECISION_DTYPES[name]
    except KeyError:
        raise BakaError(f"save precision {name!r}: one of {', '.join(SAVE_PRECISION_DTYPES)}") from None


__all__ = [
    "BlockError",
    "LoraArg",
    "lora_metadata",
    "quantile",
    "save_precision",
    "svd_factors",
]
