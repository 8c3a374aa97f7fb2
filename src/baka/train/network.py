"""A kohya-compatible LoRA/LoCon network for training, attached by forward hooks (``remove()``
detaches it; the base model is never modified).

Per module (kohya): out = base(x) + up(dropout(down(x))) * multiplier * alpha / rank, where
``dropout`` is network_dropout on the down output, rank_dropout masks rank channels per sample
and rescales by 1 / (1 - p), module_dropout skips the whole branch with probability p. All three
act in train mode only. Saved keys: ``lora_unet_<path>`` / ``lora_te_<path>`` with
``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``.

LyCORIS algorithms (``algo = "loha" | "lokr"``, ``dora_wd = true``; :data:`ALGOS`) train the tensors the
file holds (``hada_*``, ``lokr_*``, ``dora_scale``) with LyCORIS's shapes and initialisation, and their
weight delta is computed by the same code that loads such files for generation
(:mod:`baka.models.networks`, itself checked against lycoris-lora), so a trained file means exactly
what was trained. Per module: out = base(x) + op(x, delta * multiplier), op the layer's own linear /
conv; rank dropout masks the delta's output channels (LyCORIS's rule), module dropout skips it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from baka.errors import BakaError
from baka.models.blocks import BLOCK_IDS, block_of_diffusers
from baka.models.keymap import kohya_module_name
from baka.models.networks import NETWORK_FORMATS
from baka.registry import Registry
from baka.train.config import NetworkConfig

UNET_ATTN = ("Transformer2DModel",)
UNET_CONV = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_TARGETS = ("CLIPAttention", "CLIPMLP")


def lora_pair(base: nn.Module, dim: int) -> tuple[nn.Module, nn.Module]:
    """kohya's down / up for a layer: down as the layer (a conv keeps its kernel, stride and padding),
    Kaiming-uniform; up 1x1, zero (the network starts as the identity)."""
    if isinstance(base, nn.Conv2d):
        down: nn.Module = nn.Conv2d(
            base.in_channels, dim, base.kernel_size, base.stride, base.padding, bias=False
        )
        up: nn.Module = nn.Conv2d(dim, base.out_channels, 1, bias=False)
    else:
        down, up = nn.Linear(base.in_features, dim, bias=False), nn.Linear(dim, base.out_features, bias=False)
    nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
    nn.init.zeros_(up.weight)
    return down, up


class LoRAModule(nn.Module):
    def __init__(self, name: str, base: nn.Module, dim: int, alpha: float, cfg: NetworkConfig, block: str):
        super().__init__()
        self.name, self.block, self.dim = name, block, dim
        self.down, self.up = lora_pair(base, dim)
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

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The module's tensors by the suffix a kohya file stores them under."""
        return {"lora_down.weight": self.down.weight, "lora_up.weight": self.up.weight, "alpha": self.alpha}

    def loaded(self) -> None:
        self.scale = float(self.alpha) / self.dim


def _layer_op(base: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The layer's own operation with another weight (no bias: the base layer adds its own)."""
    if isinstance(base, nn.Conv2d):
        kw = {
            "stride": base.stride,
            "padding": base.padding,
            "dilation": base.dilation,
            "groups": base.groups,
        }
        return lambda x, w: nn.functional.conv2d(x, w, None, **kw)
    return lambda x, w: nn.functional.linear(x, w)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's split of a dimension into (m, n), m <= n, m * n = dimension (functional.general
    .factorization): ``factor`` itself when it divides, else the largest divisor m reached by stepping
    through divisors while m < n and m <= ``factor`` (-1: no limit). Its code, not its docstring's
    table, decides (e.g. 360 -> (18, 20), where the docstring says 8, 45): tests hold the code's table."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        if new_m > limit:
            break
        m, n = new_m, dimension // new_m
    return (m, n) if m <= n else (n, m)


class DeltaModule(nn.Module):
    """A module that adds a weight delta computed from its file tensors (LyCORIS formats, DoRA)."""

    format_name = ""

    def __init__(self, name: str, base: nn.Module, cfg: NetworkConfig, block: str, alpha: float, dora: bool):
        super().__init__()
        self.name, self.block = name, block
        self.shape = tuple(base.weight.shape)
        self._base = [base]  # not a submodule: the base layer is neither trained nor saved
        self.op = _layer_op(base)
        self.fmt = NETWORK_FORMATS.get(self.format_name)  # how the file's tensors make the delta
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.rank_dropout, self.module_dropout = cfg.rank_dropout, cfg.module_dropout
        self.multiplier = 1.0
        self.resting = False
        self.magnitude: nn.Parameter | None = None
        if dora:  # DoRA (Liu et al. 2024), LyCORIS's default wd_on_out: the weight's norm per output channel
            w = base.weight.detach().float()
            norm = w.reshape(w.shape[0], -1).norm(dim=1)
            self.magnitude = nn.Parameter(norm.reshape(w.shape[0], *[1] * (w.ndim - 1)).clone())
        self.handle = base.register_forward_hook(self._hook)

    def params(self) -> dict[str, torch.Tensor]:
        """The format's own tensors (file suffix -> parameter)."""
        raise NotImplementedError

    def file_tensors(self) -> dict[str, torch.Tensor]:
        out = {**self.params(), "alpha": self.alpha}
        if self.magnitude is not None:
            out["dora_scale"] = self.magnitude
        return out

    def loaded(self) -> None:
        pass

    def delta(self) -> torch.Tensor:
        base = self._base[0]
        orig = base.weight.detach() if self.magnitude is not None else None
        return self.fmt.delta_weight(self.file_tensors(), base.weight.shape, orig)

    def _hook(self, _base: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self.resting:
            return None
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return None
        d = self.delta()
        if self.training and self.rank_dropout:  # LyCORIS: whole output channels of the delta, no rescale
            keep = (torch.rand(d.shape[0], device=d.device) > self.rank_dropout).to(d.dtype)
            d = d * keep.view(-1, *[1] * (d.ndim - 1))
        x = inputs[0]
        return output + self.op(x.to(d.dtype), d * self.multiplier).to(output.dtype)


class LoRADoRAModule(DeltaModule):
    """LoRA (LoCon) with DoRA's magnitude: up @ down through the weight decomposition."""

    format_name = "LoRA"

    def __init__(self, name: str, base: nn.Module, dim: int, alpha: float, cfg: NetworkConfig, block: str):
        super().__init__(name, base, cfg, block, alpha, dora=True)
        self.dim = dim
        self.down, self.up = lora_pair(base, dim)

    def params(self) -> dict[str, torch.Tensor]:
        return {"lora_down.weight": self.down.weight, "lora_up.weight": self.up.weight}


class LoHaModule(DeltaModule):
    """LoHa (LyCORIS LohaModule): (w1a w1b) * (w2a w2b), w1b and w2b N(0, 1), w1a N(0, 0.1), w2a zero."""

    format_name = "LoHa"

    def __init__(self, name: str, base: nn.Module, dim: int, alpha: float, cfg: NetworkConfig, block: str):
        super().__init__(name, base, cfg, block, alpha, dora=cfg.dora_wd)
        out_dim, fan_in = self.shape[0], math.prod(self.shape[1:])
        self.hada_w1_a = nn.Parameter(torch.empty(out_dim, dim))
        self.hada_w1_b = nn.Parameter(torch.empty(dim, fan_in))
        self.hada_w2_a = nn.Parameter(torch.empty(out_dim, dim))
        self.hada_w2_b = nn.Parameter(torch.empty(dim, fan_in))
        nn.init.normal_(self.hada_w1_b, std=1)
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w2_b, std=1)
        nn.init.zeros_(self.hada_w2_a)

    def params(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}


class LoKrModule(DeltaModule):
    """LoKr (LyCORIS LokrModule): kron(w1, w2) over LyCORIS's factorisation of the in / out dims (``factor``);
    w2 is a rank-``dim`` product unless ``dim`` is at least half its larger side (then full, and the scale
    1, as LyCORIS); w1 full, or a product too with ``decompose_both``. Kaiming-uniform init, the last
    factor zero (w2 or w2_b)."""

    format_name = "LoKr"

    def __init__(self, name: str, base: nn.Module, dim: int, alpha: float, cfg: NetworkConfig, block: str):
        out_dim, in_dim, *k = base.weight.shape
        (a, b), (c, d) = factorization(out_dim, cfg.factor), factorization(in_dim, cfg.factor)
        ksize = math.prod(k)
        w1_full = not (cfg.decompose_both and dim < max(a, c) / 2)
        w2_full = dim >= max(b, d) / 2
        if w1_full and w2_full:
            alpha = dim  # LyCORIS: both factors full -> scale 1
        super().__init__(name, base, cfg, block, alpha, dora=cfg.dora_wd)
        self.names: list[str] = []

        def kaiming(t: torch.Tensor) -> None:
            nn.init.kaiming_uniform_(t, a=math.sqrt(5))

        if w1_full:
            self._param("lokr_w1", (a, c), kaiming)
        else:
            self._param("lokr_w1_a", (a, dim), kaiming)
            self._param("lokr_w1_b", (dim, c), kaiming)
        if w2_full:
            self._param("lokr_w2", (b, d, *k), nn.init.zeros_)
        else:
            self._param("lokr_w2_a", (b, dim), kaiming)
            self._param("lokr_w2_b", (dim, d * ksize), nn.init.zeros_)

    def _param(self, key: str, shape: tuple[int, ...], init) -> None:
        p = nn.Parameter(torch.empty(shape))
        init(p)
        setattr(self, key, p)
        self.names.append(key)

    def params(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.names}


# network algorithms (kohya's networks.lora, LyCORIS's algo names): module factory per target layer
ALGOS: Registry[Callable[..., nn.Module]] = Registry("network algorithm")
ALGOS.add("lora", LoRAModule, aliases=("locon",))
ALGOS.add("loha", LoHaModule)
ALGOS.add("lokr", LoKrModule)


def module_factory(cfg: NetworkConfig) -> Callable[..., nn.Module]:
    """The module class for ``cfg.algo`` (DoRA: ``dora_wd``), with its settings checked."""
    algo = ALGOS.canonical(cfg.algo)
    plus = cfg.loraplus_lr_ratio or cfg.loraplus_unet_lr_ratio or cfg.loraplus_text_encoder_lr_ratio
    if algo != "lora" and (cfg.dropout or plus):
        raise BakaError(f"{algo}: network dropout and LoRA+ are LoRA's (LyCORIS has no plain dropout for it)")
    if cfg.dora_wd:
        if cfg.dropout or cfg.rank_dropout and algo == "lora":
            raise BakaError("DoRA (dora_wd): network / rank dropout act on LoRA's activations; remove them")
        if cfg.alpha != cfg.dim or (cfg.conv_dim and cfg.conv_alpha != cfg.conv_dim):
            raise BakaError(
                "DoRA (dora_wd) needs alpha = dim (and conv_alpha = conv_dim): A1111 scales a DoRA delta"
                " after the weight decomposition, LyCORIS and ComfyUI before; they agree only at scale 1"
            )
        if algo == "lora":
            return LoRADoRAModule
    return ALGOS.get(algo)


class LoRANetwork(nn.Module):
    """LoRA modules for a diffusers UNet and (optionally) a CLIP text encoder."""

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module | None,
        cfg: NetworkConfig,
        te_layers: set[int] | None = None,
        keep: Callable[[str], bool] | None = None,
    ):
        """``keep``: which of the UNet's target layers get a module, by the layer's diffusers name
        (``down_blocks.0.resnets.0.conv1``); default all (kohya's targets)."""
        super().__init__()
        self.cfg = cfg
        make = module_factory(cfg)
        mods: dict[str, nn.Module] = {}
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
                if keep is not None and not keep(full):
                    continue
                block = block_of_diffusers("unet", full + ".weight") or "BASE"
                is_3x3 = isinstance(child, nn.Conv2d) and child.kernel_size != (1, 1)
                if is_3x3 and not cfg.conv_dim:
                    continue
                dim = cfg.conv_dim if is_3x3 else block_dims[block]
                alpha = cfg.conv_alpha if is_3x3 else block_alphas[block]
                if dim <= 0 or lr_w[block] == 0:  # kohya creates no module where the LR weight is 0
                    continue
                name = kohya_module_name("unet", full)
                mods[name] = make(name, child, dim, alpha, cfg, block)
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
                        mods[name] = make(name, child, cfg.dim, cfg.alpha, cfg, "BASE")
        self.lora = nn.ModuleDict({k.replace(".", "_"): v for k, v in mods.items()})

    def kohya_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        sd = {}
        for name, m in self.lora.items():
            for suffix, t in m.file_tensors().items():
                sd[f"{name}.{suffix}"] = t.detach().to(dtype).contiguous()
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
            mine = m.file_tensors()
            extra = sorted(set(tensors) - set(mine))
            if extra:
                raise BakaError(
                    f"{path}: {name} carries {', '.join(extra)}: another algorithm or DoRA setting"
                )
            for suffix, param in mine.items():
                t = tensors.get(suffix)
                if t is None and suffix == "alpha":
                    continue
                if t is None or tuple(t.shape) != tuple(param.shape):
                    got = None if t is None else tuple(t.shape)
                    want = tuple(param.shape)
                    raise BakaError(
                        f"{path}: {name}.{suffix} is {got}, the network's is {want} (dims differ)"
                    )
                param.copy_(t.to(param.dtype))
            m.loaded()

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
