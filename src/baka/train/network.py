"""A kohya-compatible LoRA/LoCon network for training, attached by forward hooks (``remove()``
detaches it; the base model is never modified).

Per module (kohya): out = base(x) + up(dropout(down(x))) * multiplier * alpha / rank, where
``dropout`` is network_dropout on the down output, rank_dropout masks rank channels per sample
and rescales by 1 / (1 - p), module_dropout skips the whole branch with probability p. All three
act in train mode only. Saved keys: ``lora_unet_<path>`` / ``lora_te_<path>`` with
``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from baka.errors import BakaError
from baka.models.blocks import BLOCK_IDS, block_of_diffusers
from baka.models.keymap import kohya_module_name
from baka.train.config import NetworkConfig

UNET_ATTN = ("Transformer2DModel",)
UNET_CONV = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_TARGETS = ("CLIPAttention", "CLIPMLP")


class LoRAModule(nn.Module):
    def __init__(self, name: str, base: nn.Module, dim: int, alpha: float, cfg: NetworkConfig, block: str):
        super().__init__()
        self.name, self.block, self.dim = name, block, dim
        if isinstance(base, nn.Conv2d):
            self.down = nn.Conv2d(
                base.in_channels, dim, base.kernel_size, base.stride, base.padding, bias=False
            )
            self.up = nn.Conv2d(dim, base.out_channels, 1, bias=False)
        else:
            self.down = nn.Linear(base.in_features, dim, bias=False)
            self.up = nn.Linear(dim, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = alpha / dim
        self.dropout, self.rank_dropout, self.module_dropout = (
            cfg.dropout,
            cfg.rank_dropout,
            cfg.module_dropout,
        )
        self.multiplier = 1.0
        self.resting = False  # set by the per-block dropout schedule for one step
        self.handle = base.register_forward_hook(self._hook)

    def _hook(self, _base: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self.resting:
            return None
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return None
        lx = self.down(inputs[0].to(self.down.weight.dtype))
        if self.training and self.dropout:
            lx = nn.functional.dropout(lx, p=self.dropout)
        scale = self.scale
        if self.training and self.rank_dropout:
            mask = (torch.rand((lx.size(0), self.dim), device=lx.device) > self.rank_dropout).to(lx.dtype)
            if lx.ndim == 4:  # conv: [B, rank, H, W]
                mask = mask[:, :, None, None]
            elif lx.ndim == 3:  # tokens: [B, L, rank]
                mask = mask[:, None, :]
            lx = lx * mask
            scale = scale / (1.0 - self.rank_dropout)
        return output + (self.up(lx) * (self.multiplier * scale)).to(output.dtype)


class LoRANetwork(nn.Module):
    """LoRA modules for a diffusers UNet and (optionally) a CLIP text encoder."""

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module | None,
        cfg: NetworkConfig,
        te_layers: set[int] | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        mods: dict[str, LoRAModule] = {}
        block_dims = _block_values(cfg.block_dims, cfg.dim)
        block_alphas = _block_values(cfg.block_alphas, cfg.alpha)
        lr_w = block_lr_weights(cfg)
        targets = UNET_ATTN + (UNET_CONV if cfg.conv_dim else ())
        for parent_name, parent in unet.named_modules():
            if type(parent).__name__ not in targets:
                continue
            for child_name, child in parent.named_modules():
                if not isinstance(child, nn.Linear | nn.Conv2d) or not child_name:
                    continue
                full = f"{parent_name}.{child_name}"
                block = block_of_diffusers("unet", full + ".weight") or "BASE"
                is_3x3 = isinstance(child, nn.Conv2d) and child.kernel_size != (1, 1)
                if is_3x3 and not cfg.conv_dim:
                    continue
                dim = cfg.conv_dim if is_3x3 else block_dims[block]
                alpha = cfg.conv_alpha if is_3x3 else block_alphas[block]
                if dim <= 0 or lr_w[block] == 0:  # kohya creates no module where the LR weight is 0
                    continue
                name = kohya_module_name("unet", full)
                mods[name] = LoRAModule(name, child, dim, alpha, cfg, block)
        if text_encoder is not None:
            for parent_name, parent in text_encoder.named_modules():
                if type(parent).__name__ not in TE_TARGETS:
                    continue
                layer = int(parent_name.split("layers.")[1].split(".")[0])
                if te_layers is not None and layer not in te_layers:
                    continue
                for child_name, child in parent.named_modules():
                    if isinstance(child, nn.Linear):
                        name = kohya_module_name("text_encoder", f"{parent_name}.{child_name}")
                        mods[name] = LoRAModule(name, child, cfg.dim, cfg.alpha, cfg, "BASE")
        self.lora = nn.ModuleDict({k.replace(".", "_"): v for k, v in mods.items()})

    def kohya_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        sd = {}
        for name, m in self.lora.items():
            sd[f"{name}.lora_down.weight"] = m.down.weight.detach().to(dtype).contiguous()
            sd[f"{name}.lora_up.weight"] = m.up.weight.detach().to(dtype).contiguous()
            sd[f"{name}.alpha"] = m.alpha.detach().to(dtype)
        return sd

    @torch.no_grad()
    def load_kohya(self, path: str | Path) -> None:
        """Continue from a kohya LoRA file (kohya's ``network_weights``): each module's down, up and
        alpha from the file. Every module of the file must be one this network has, with the same
        shapes (the same dims); modules the file lacks keep their fresh initialisation."""
        from baka.models.sources import read_raw

        raw, _ = read_raw(path)
        names: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in raw.items():
            name, _, suffix = key.partition(".")
            names.setdefault(name, {})[suffix] = t
        for name, tensors in names.items():
            m = self.lora[name] if name in self.lora else None
            if m is None:
                raise BakaError(f"{path}: module {name} is not in this network (other targets or layers)")
            for suffix, param in (("lora_down.weight", m.down.weight), ("lora_up.weight", m.up.weight)):
                t = tensors.get(suffix)
                if t is None or tuple(t.shape) != tuple(param.shape):
                    got = None if t is None else tuple(t.shape)
                    want = tuple(param.shape)
                    raise BakaError(
                        f"{path}: {name}.{suffix} is {got}, the network's is {want} (dims differ)"
                    )
                param.copy_(t.to(param.dtype))
            if "alpha" in tensors:
                m.alpha.copy_(tensors["alpha"].float())
                m.scale = float(tensors["alpha"]) / m.dim

    def remove(self) -> None:
        for m in self.lora.values():
            m.handle.remove()


def _block_values(values: list | None, default: float) -> dict[str, float]:
    """25 per-block values (IN00..IN11, M00, OUT00..OUT11) -> {block: value}, BASE = default."""
    out = dict.fromkeys(BLOCK_IDS, default)
    if values is not None:
        if len(values) != 25:
            from baka.errors import BakaError

            raise BakaError(
                f"block_dims/block_alphas need 25 values (IN00-IN11, M00, OUT00-OUT11), got {len(values)}"
            )
        out.update(zip(BLOCK_IDS[1:], values, strict=True))
    return out


# ---------------------------------------------------------------------------------------------------------
# block-wise learning rates (kohya down_lr_weight / mid_lr_weight / up_lr_weight)


def lr_weight_preset(spec: str | list[float] | None, n: int = 12) -> list[float] | None:
    """12 weights from a list or a preset: sine, cosine, linear, reverse_linear, zeros, with "+x" offset."""
    if spec is None or isinstance(spec, list):
        return spec
    name, _, offset = spec.partition("+")
    base = {
        "sine": [math.sin(math.pi * (i / (n - 1)) / 2) for i in range(n)],
        "cosine": [math.sin(math.pi * (i / (n - 1)) / 2) for i in range(n)][::-1],
        "linear": [i / (n - 1) for i in range(n)],
        "reverse_linear": [i / (n - 1) for i in range(n)][::-1],
        "zeros": [0.0] * n,
    }
    if name.strip() not in base:
        from baka.errors import BakaError

        raise BakaError(f"unknown LR weight preset {name!r}; use {', '.join(base)} (optionally +offset)")
    off = float(offset) if offset else 0.0
    return [v + off for v in base[name.strip()]]


def block_lr_weights(cfg: NetworkConfig) -> dict[str, float]:
    out = dict.fromkeys(BLOCK_IDS, 1.0)
    down, up = lr_weight_preset(cfg.down_lr_weight), lr_weight_preset(cfg.up_lr_weight)
    if down:
        out.update({f"IN{i:02d}": v for i, v in enumerate(down)})
    if up:
        out.update({f"OUT{i:02d}": v for i, v in enumerate(up)})
    if cfg.mid_lr_weight is not None:
        out["M00"] = cfg.mid_lr_weight
    return out
