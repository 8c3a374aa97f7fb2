"""``baka lora merge L1[:W[:LBW]] L2 ... -o out``: several LoRAs as one file.

Without ``dim`` the ranks are concatenated (kohya ``merge_lora.py --concat``): each module's up and
down factors are stacked, each scaled by sqrt(|weight * alpha / rank|) (the sign on up), so the file
holds exactly the sum of the weighted deltas at alpha = rank. With ``dim`` every module's summed
delta is re-factored by a truncated SVD at that rank (kohya ``svd_merge_lora.py``), which also takes
LyCORIS modules; formats that read the layer's weight (IA3, GLoRA, DoRA) need ``model``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from baka.errors import BakaError
from baka.merge.lora.common import BlockError, LoraArg, lora_metadata, save_precision, svd_factors
from baka.merge.lora.ranks import RankRule
from baka.models.config import sd15_config
from baka.models.lbw import parse_lbw
from baka.models.networks import LoRA, Module, load_network, multiplier
from baka.models.safetensors_io import save_file
from baka.models.sources import open_source, shapes_of_source
from baka.models.targets import Target, checkpoint_targets, is_conv3x3
from baka.models.tiny import model_specs


@dataclass
class CombineReport:
    path: Path
    modules: int
    ranks: dict[str, int] = field(default_factory=dict)
    block_error: dict[str, float] = field(default_factory=dict)  # SVD mode only


def _sd15_targets() -> dict[str, Target]:
    # module name -> block for files made for any SD1.x model: the real topology's names
    return checkpoint_targets({k: s.shape for k, s in model_specs(sd15_config()).items()})


def _plain_lora(m: Module) -> bool:
    return m.format is LoRA and "lora_mid.weight" not in m.tensors and not m.unsupported()


def _layer_shape(m: Module) -> tuple[int, ...] | None:
    """The layer shape a plain LoRA module implies (up's rows x down's input and kernel)."""
    if not _plain_lora(m):
        return None
    up, down = m.tensors["lora_up.weight"], m.tensors["lora_down.weight"]
    return (up.shape[0], *down.shape[1:])


def merge_loras(
    loras: list[LoraArg],
    output: str | Path,
    *,
    dim: int | None = None,
    conv_dim: int | None = None,
    model: str | Path | None = None,
    clamp_quantile: float = 0.99,
    precision: str = "float",
    progress: bool = True,
) -> CombineReport:
    """Merge ``loras`` (each with its weight and lora-block-weight) into one kohya LoRA at ``output``.
    ``dim`` None: concatenate ranks (exact); else SVD to ``dim`` (``conv_dim`` for 3x3 convs,
    default ``dim``); ``clamp_quantile`` applies to the SVD mode only (1: no clamp)."""
    if len(loras) < 1:
        raise BakaError("name the LoRAs to merge")
    if dim is not None and (dim < 1 or (conv_dim is not None and conv_dim < 1)):
        raise BakaError(f"--dim and --conv-dim must be at least 1 (got {dim}, {conv_dim})")
    out = Path(output)
    if out.suffix.lower() != ".safetensors":
        raise BakaError(f"{out}: the LoRA is written as a .safetensors file")
    dtype = save_precision(precision)
    nets = [(arg, load_network(arg.path), parse_lbw(arg.lbw)) for arg in loras]
    names = sorted({n for _, net, _ in nets for n in net.modules})
    report = CombineReport(out, 0)
    tensors: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(open_source(model)) if model is not None else None
        targets = checkpoint_targets(shapes_of_source(src)) if src is not None else _sd15_targets()
        errors = BlockError()
        for name in tqdm(names, desc="merge LoRAs", disable=not progress, leave=False):
            target = targets.get(name)
            if target is None:
                where = f"{model}" if model is not None else "an SD1.x model"
                raise BakaError(f"{name}: no such layer in {where}")
            uses = []
            for arg, net, blocks in nets:
                m = net.modules.get(name)
                mult = multiplier(target.component, target.block, arg.weight, arg.weight, blocks)
                if m is not None and mult != 0:
                    uses.append((net.name, m, mult))
            if not uses:
                continue
            if dim is None:
                up, down = _concat(name, uses)
            else:
                orig = src.get(target.key) if src is not None else None
                shape = target.shape if src is not None else _layer_shape(uses[0][1])
                if shape is None:
                    raise BakaError(
                        f"{name}: {uses[0][1].format and uses[0][1].format.name} module; give"
                        " --model so the layer's shape is known"
                    )
                delta = sum(
                    (mult * _delta(net_name, m, torch.Size(shape), orig) for net_name, m, mult in uses),
                    torch.zeros(shape),
                )
                rank = (conv_dim or dim) if is_conv3x3(shape) else dim
                up, down = svd_factors(delta, rank, RankRule(), clamp_quantile)
                errors.add("TE" if target.component == "text_encoder" else target.block, delta, up, down)
            r = down.shape[0]
            tensors[f"{name}.lora_up.weight"] = up.to(dtype)
            tensors[f"{name}.lora_down.weight"] = down.to(dtype)
            tensors[f"{name}.alpha"] = torch.tensor(float(r), dtype=dtype)
            report.ranks[name] = r
        report.block_error = errors.relative()
        protect = [a.path for a in loras] + ([src.path] if src is not None and src.path else [])
    if not tensors:
        raise BakaError("the merged LoRA would be empty (every weight is 0)")
    report.modules = len(report.ranks)
    conv = {n for n in report.ranks if is_conv3x3(tuple(tensors[f"{n}.lora_down.weight"].shape))}
    lin_dim = max((r for n, r in report.ranks.items() if n not in conv), default=0)
    conv_rank = max((report.ranks[n] for n in conv), default=0)
    tool = {
        "tool": "merge",
        "loras": [{"lora": a.path.name, "weight": a.weight, "lbw": a.lbw} for a in loras],
        "dim": dim,
        "conv_dim": conv_dim,
        "clamp_quantile": clamp_quantile if dim is not None else None,
    }
    meta = lora_metadata(out.stem, lin_dim, conv_rank, tool, tensors)
    save_file(tensors, out, meta, protect=protect)
    return report


def _delta(net: str, m: Module, shape: torch.Size, orig: torch.Tensor | None) -> torch.Tensor:
    try:
        return m.delta_weight(shape, orig)
    except BakaError as e:
        raise BakaError(f"{net}: {e}; give --model (it needs the layer's weight)") from None


def _concat(name: str, uses: list[tuple[str, Module, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    ups, downs = [], []
    for net, m, mult in uses:
        if not _plain_lora(m):
            kind = m.format.name if m.format else "unknown"
            raise BakaError(
                f"{net}: {name} is a {kind} module; concatenation needs plain LoRA modules"
                " (give --dim to re-factor by SVD)"
            )
        up, down = m.tensors["lora_up.weight"].float(), m.tensors["lora_down.weight"].float()
        r = down.shape[0]
        alpha = float(m.tensors["alpha"]) if "alpha" in m.tensors else r
        c = mult * alpha / r
        root = math.sqrt(abs(c))
        ups.append(up * (root if c >= 0 else -root))
        downs.append(down * root)
    if len({d.shape[1:] for d in downs}) > 1 or len({u.shape[0] for u in ups}) > 1:
        raise BakaError(f"{name}: the LoRAs give this layer different shapes")
    return torch.cat(ups, 1), torch.cat(downs, 0)


__all__ = ["CombineReport", "merge_loras"]
