"""Network file formats (LoRA / LoCon, LoHa, LoKr) in kohya / A1111 layout: one class per format in a
registry, each turning one module's tensors into a weight delta (the shape of ComfyUI's weight
adapters). Generation applies the deltas as a reversible patch; merge tools can bake them.

Deltas (scale = alpha / rank, alpha defaulting to rank):
- LoRA / LoCon: up @ down (conv kernels flattened; Tucker ``lora_mid`` supported)
  (all three equal lycoris-lora's own ``diff_weight``, plain and Tucker: tests/test_lycoris_parity.py)
- LoHa: (w1a @ w1b) * (w2a @ w2b)  (Hadamard product; Tucker ``hada_t1/t2`` supported)
- LoKr: kron(w1, w2), each factor full or a low-rank product (scale 1 unless a factor is decomposed)
- IA3: W * w per channel; GLoRA: W a1 a2 + b1 b2 (both need the layer's weight); Full: diff (+ bias)
- OFT (kohya networks.oft, LyCORIS diag-oft) and BOFT: W's output channels rotated by Cayley R blocks
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
    # LyCORIS's rebuild_tucker: core [r1, r2, k, k], a [r1, out], b [r2, in] -> [out, in, k, k]
    return torch.einsum("ijkl,jr,ip->prkl", core, b.flatten(1), a.flatten(1)).contiguous()


class NetworkFormat:
    """One network format: which tensor suffixes it owns and how they make a weight delta."""

    name: ClassVar[str]
    marker: ClassVar[str]  # prefix of a tensor suffix that identifies the format
    keys: ClassVar[frozenset[str]]
    needs_orig: ClassVar[bool] = False  # the delta depends on the layer's own weight (IA3, GLoRA)

    @classmethod
    def matches(cls, tensors: Tensors) -> bool:
        return any(k.startswith(cls.marker) for k in tensors)

    @classmethod
    def raw_delta(cls, t: Tensors) -> tuple[torch.Tensor, int | None]:
        """The unscaled delta and the rank that ``alpha`` divides (None: no alpha scaling)."""
        raise NotImplementedError

    @classmethod
    def raw_delta_orig(cls, t: Tensors, orig: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        """As :meth:`raw_delta` for formats whose delta depends on the layer's weight ``orig``."""
        raise NotImplementedError

    @classmethod
    def bias_delta(cls, t: Tensors) -> torch.Tensor | None:
        """The layer's bias delta, for formats that carry one (full diff)."""
        return None

    @classmethod
    def delta_weight(
        cls, tensors: Tensors, shape: torch.Size, orig: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The weight delta of one module for a layer of ``shape`` (scale included, multiplier not);
        ``orig``: the layer's weight, for the formats that need it."""
        t = {k: v.float() for k, v in tensors.items()}
        if cls.needs_orig:
            if orig is None:
                raise BakaError(f"{cls.name} modules need the layer's own weight")
            delta, rank = cls.raw_delta_orig(t, orig.float())
        else:
            delta, rank = cls.raw_delta(t)
        alpha = t.get("alpha")
        scale = 1.0 if rank is None or alpha is None else float(alpha) / rank
        if delta.numel() != shape.numel():
            raise BakaError(f"network delta {tuple(delta.shape)} does not fit layer {tuple(shape)}")
        delta = delta.reshape(shape)
        if "dora_scale" in t:
            if orig is None:
                raise BakaError("DoRA modules need the layer's own weight")
            delta = dora(delta, orig.float().reshape(shape), t["dora_scale"])
        return delta * scale


def dora(delta: torch.Tensor, orig: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's weight decomposition (Liu et al. 2024) as A1111 1.10 applies it
    (``apply_weight_decompose``): W + delta is normalised per input channel (the norm over every other
    axis), scaled by ``dora_scale`` and W taken away again. A1111 does this before the alpha / rank
    scale and the multiplier, so a multiplier scales the whole change.

    LyCORIS's current default (``wd_on_out = True``) stores the magnitude per *output* channel, shape
    [out, 1, ...]; such a file is normalised per output row instead (ComfyUI's test: the magnitude's first
    axis is the layer's output axis). A1111 reads only the per-input layout."""
    merged = orig + delta
    ones = [1] * (merged.ndim - 1)
    if magnitude.shape[0] == merged.shape[0] != 1:
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(merged.shape[0], *ones)
        return merged * (magnitude.reshape(norm.shape) / norm) - orig
    norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1).reshape(merged.shape[1], *ones)
    return merged * (magnitude.reshape(norm.transpose(0, 1).shape) / norm.transpose(0, 1)) - orig


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
        if "lora_mid.weight" in t:  # LoCon's up is [out, r]: the Tucker product wants [r, out]
            return _tucker(t["lora_mid.weight"], up.flatten(1).T, down), down.shape[0]
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
        else:  # conv factors [r, in, k, k] are flattened to [r, in * k * k]
            w1 = t["hada_w1_a"].flatten(1) @ t["hada_w1_b"].flatten(1)
            w2 = t["hada_w2_a"].flatten(1) @ t["hada_w2_b"].flatten(1)
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
        # the rank alpha divides: lokr_w1_b's rows, else lokr_w2_b's (A1111's network_lokr)
        rank = next((t[k].shape[0] for k in ("lokr_w1_b", "lokr_w2_b") if k in t), None)
        w1 = t.get("lokr_w1")
        if w1 is None:
            w1 = t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t.get("lokr_w2")
        if w2 is None:
            a, b = t["lokr_w2_a"], t["lokr_w2_b"]
            if "lokr_t2" in t:  # Tucker: a [r, out], b [r, in], core [r, r, k, k]
                w2 = _tucker(t["lokr_t2"], a, b)
            else:  # conv: b [r, in, k, k]
                w2 = (a @ b.flatten(1)).reshape(a.shape[0], *b.shape[1:])
        while w1.ndim < w2.ndim:  # kron over the kernel axes: w1 broadcasts along them
            w1 = w1[..., None]
        return torch.kron(w1, w2.contiguous()), rank


@_format
class IA3(NetworkFormat):
    """(IA)^3: the layer's weight scaled per output channel (per input channel with ``on_input``);
    delta = W * w (LyCORIS's ``IA3Module``, A1111's network_ia3). No alpha."""

    name = "IA3"
    marker = "on_input"
    keys = frozenset({"weight", "on_input"})
    needs_orig = True

    @classmethod
    def raw_delta_orig(cls, t: Tensors, orig: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        w = t["weight"].flatten()
        ones = [1] * (orig.ndim - 2)
        scale = w.view(1, -1, *ones) if bool(t["on_input"].flatten()[0]) else w.view(-1, 1, *ones)
        return orig * scale, None


@_format
class GLoRA(NetworkFormat):
    """GLoRA: delta = W a1 a2 + b1 b2, scaled by alpha / rank (LyCORIS's ``GLoRAModule``)."""

    name = "GLoRA"
    marker = "a1."
    keys = frozenset({"a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"})
    needs_orig = True

    @classmethod
    def raw_delta_orig(cls, t: Tensors, orig: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        a1, a2 = t["a1.weight"].flatten(1), t["a2.weight"].flatten(1)
        b1, b2 = t["b1.weight"].flatten(1), t["b2.weight"].flatten(1)
        # W (out, in, k...) contracted with a1 on its input axis, then a2
        wa = torch.einsum("oi...,ij->oj...", torch.einsum("oi...,ij->oj...", orig, a1), a2)
        return (b1 @ b2).reshape(orig.shape) + wa, b2.shape[0]


@_format
class OFT(NetworkFormat):
    """OFT (Qiu et al. 2023): W's output channels in blocks, each block rotated by the Cayley transform
    R = (I + Q)(I - Q)^-1 of Q = B - B^T (``oft_blocks`` B: [blocks, size, size]); W' = R^T W per block,
    delta = W' - W (linear in the multiplier, as LyCORIS's ``get_diff_weight`` and kohya's weighted R).
    BOFT's ``oft_blocks`` [m, blocks, size, size] chain m butterfly factors (:func:`_butterfly`); its
    multiplier also scales the whole change here, where LyCORIS interpolates each factor (equal at 1).
    ``alpha`` > 0 bounds ||Q|| by alpha x out_dim (LyCORIS's diag-oft and kohya's networks.oft; kohya
    clamps with a 1e-8 fudge); optional LyCORIS ``rescale`` per output channel. No rank scale."""

    name = "OFT"
    marker = "oft_blocks"
    keys = frozenset({"oft_blocks", "alpha", "rescale"})
    needs_orig = True

    @classmethod
    def raw_delta_orig(cls, t: Tensors, orig: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        blocks = t["oft_blocks"]
        if blocks.ndim not in (3, 4):
            raise BakaError(
                f"OFT blocks of shape {tuple(blocks.shape)}: want [n, b, b] or BOFT's [m, n, b, b]"
            )
        size, out_dim = blocks.shape[-1], orig.shape[0]
        if blocks.shape[-3] * size != out_dim:
            raise BakaError(
                f"OFT blocks {tuple(blocks.shape)} do not cover the layer's {out_dim} output channels"
            )
        q = blocks - blocks.transpose(-1, -2)
        limit = float(t["alpha"]) * out_dim if "alpha" in t else 0.0
        norm = torch.linalg.norm(q)
        if limit > 0 and norm > limit:
            q = q * (limit / (norm + 1e-8))
        eye = torch.eye(size, dtype=q.dtype)
        r = (eye + q) @ torch.linalg.inv(eye - q)
        if blocks.ndim == 3:  # diagonal OFT: W' = R^T W per block
            w = orig.reshape(blocks.shape[0], size, *orig.shape[1:])
            new = orig + torch.einsum("knm,kn...->km...", r - eye, w).reshape(orig.shape)
        else:
            new = _butterfly(r, orig)
        if "rescale" in t:  # LyCORIS rescaled: s W'
            new = new * t["rescale"].reshape(out_dim, *[1] * (orig.ndim - 1))
        return new - orig, None


def _butterfly(r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """BOFT (Liu et al. 2024; LyCORIS ButterflyOFTModule.make_weight): the m factors R_i [n, b, b] applied
    in turn, factor i to the output channels regrouped by the butterfly permutation of stride 2^i b/2."""
    b = r.shape[-1]
    out = w
    for i, ri in enumerate(r):
        k = 2**i * (b // 2)
        x = out.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
        x = torch.einsum("bij,bj...->bi...", ri, x)
        out = x.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
    return out


@_format
class Full(NetworkFormat):
    """A full weight difference (LyCORIS "full" / A1111 network_full): ``diff``, and ``diff_b`` for
    the bias."""

    name = "Full"
    marker = "diff"
    keys = frozenset({"diff", "diff_b"})

    @classmethod
    def raw_delta(cls, t: Tensors) -> tuple[torch.Tensor, int | None]:
        return t["diff"], None

    @classmethod
    def bias_delta(cls, t: Tensors) -> torch.Tensor | None:
        return t["diff_b"].float() if "diff_b" in t else None


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
        return sorted(set(self.tensors) - (fmt.keys | {"dora_scale"} if fmt else set()))

    def delta_weight(self, shape: torch.Size, orig: torch.Tensor | None = None) -> torch.Tensor:
        fmt = self.format
        if fmt is None:
            raise BakaError(f"{self.name}: unsupported network module (keys {sorted(self.tensors)})")
        try:
            return fmt.delta_weight(self.tensors, shape, orig)
        except BakaError as e:
            raise BakaError(f"{self.name}: {e}") from None

    def bias_delta(self) -> torch.Tensor | None:
        fmt = self.format
        return fmt.bias_delta(self.tensors) if fmt is not None else None


def multiplier(component: str, block: str | None, te: float, unet: float, blocks: tuple[float, ...]) -> float:
    """A use's multiplier for one module: its text-encoder or UNet weight times the block's
    lora-block-weight value (26 values, ``baka.models.lbw.parse_lbw``)."""
    from baka.models.blocks import BLOCK_INDEX

    return (te if component == "text_encoder" else unet) * blocks[BLOCK_INDEX[block or "BASE"]]


def patched_weight(weight: torch.Tensor, module: Module, mult: float, orig: torch.Tensor) -> torch.Tensor:
    """``weight + mult * delta`` computed in fp32 and cast back to the weight's dtype, as A1111 adds a
    network to a layer; ``orig`` is the layer's weight before any network (IA3, GLoRA and DoRA read
    it). Live patching and ``baka lora bake`` both go through here, so they agree bit for bit."""
    # delta_weight returns a fresh fp32 tensor: scaled and summed in place (the same sums as
    # weight.float() + mult * delta, bit for bit), so a large layer costs two fp32 copies, not four
    delta = module.delta_weight(weight.shape, orig)
    if mult != 1:
        delta.mul_(mult)
    return delta.add_(weight).to(weight.dtype)


def patched_bias(bias: torch.Tensor, module: Module, mult: float) -> torch.Tensor | None:
    """The bias with the module's bias delta added (full-diff modules), or None when it has none."""
    delta = module.bias_delta()
    if delta is None:
        return None
    return (bias.float() + mult * delta.reshape(bias.shape)).to(bias.dtype)


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


_LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")


def find_network(name: str, folders: list[Path]) -> Path:
    """``NAME.safetensors`` / ``.pt`` / ``.ckpt`` in the first folder that has it, else a LoRA shipped
    with baka (``world-star``); a file in a folder wins over a shipped one of the same name."""
    from baka.models.shipped import SHIPPED_NETWORKS, shipped_path

    for folder in folders:
        for suffix in _LORA_SUFFIXES:
            p = Path(folder) / f"{name}{suffix}"
            if p.is_file():
                return p
    shipped = shipped_path(name, SHIPPED_NETWORKS)
    if shipped is not None:
        return shipped
    where = ", ".join(str(f) for f in folders) or "no LoRA folder given (--lora-dir)"
    raise BakaError(f"LoRA {name!r} not found in {where}")


__all__ = [
    "NETWORK_FORMATS",
    "Full",
    "GLoRA",
    "IA3",
    "LoHa",
    "LoKr",
    "LoRA",
    "Module",
    "OFT",
    "Network",
    "NetworkFormat",
    "find_network",
    "load_network",
    "multiplier",
    "patched_bias",
    "patched_weight",
]
