"""``baka lora extract A B``: a kohya LoRA / LoCon approximating B - A, module by module.

Each targeted layer's difference is factored by a truncated SVD (``common.svd_factors``, kohya's
``extract_lora_from_models.py`` maths: singular values folded into up, quantile clamp). The targets
are kohya's LoRA network's: the UNet's transformer blocks, with ``conv_dim`` also its resnets and
up/down samplers (3x3 kernels at ``conv_dim``), with ``te`` the text encoder's attention and MLP.
Inputs are read tensor by tensor (memory-mapped); only the small factors are held.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from baka.errors import BakaError, ModelFileError
from baka.merge.lora.common import BlockError, lora_metadata, save_precision, svd_factors
from baka.merge.lora.ranks import RankRule
from baka.models import detect
from baka.models.safetensors_io import save_file
from baka.models.sources import open_source, shapes_of_source
from baka.models.targets import checkpoint_targets


@dataclass
class ExtractReport:
    path: Path
    modules: int
    unchanged: int  # targeted layers whose difference is within min_diff: not written
    # relative Frobenius error ||diff - up @ down|| / ||diff|| per block ("TE" for the text encoder)
    block_error: dict[str, float] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)  # module -> rank written
    te_unchanged: bool = False  # --te asked, but the text encoders are equal


def extract_lora(
    model_a: str | Path,
    model_b: str | Path,
    output: str | Path,
    *,
    dim: int = 64,
    conv_dim: int = 0,
    te: bool = False,
    clamp_quantile: float = 0.99,
    rank_rule: str | RankRule = "fixed",
    min_diff: float = 0.0,
    precision: str = "float",
    device: str = "cpu",
    progress: bool = True,
) -> ExtractReport:
    """Write to ``output`` a kohya LoRA (LoCon with ``conv_dim``) of ``model_b - model_a``.

    ``dim`` is the rank of Linear and 1x1 layers, ``conv_dim`` of 3x3 convs (0: resnets are not
    extracted, as kohya); ``rank_rule`` may lower a module's rank (``sv_fro:0.9``...). Layers whose
    largest absolute difference is at most ``min_diff`` are left out."""
    rule = rank_rule if isinstance(rank_rule, RankRule) else RankRule.parse(rank_rule)
    if dim < 1 or conv_dim < 0:
        raise BakaError(f"--dim must be at least 1 and --conv-dim at least 0 (got {dim}, {conv_dim})")
    if not 0 < clamp_quantile <= 1:
        raise BakaError(f"--clamp-quantile must be in (0, 1], not {clamp_quantile}")
    dtype = save_precision(precision)
    out = Path(output)
    if out.suffix.lower() != ".safetensors":
        raise BakaError(f"{out}: the LoRA is written as a .safetensors file")
    tensors: dict[str, torch.Tensor] = {}
    errors = BlockError()
    report = ExtractReport(out, 0, 0)
    te_changed = False
    with contextlib.ExitStack() as stack:
        src_a = stack.enter_context(open_source(model_a))
        src_b = stack.enter_context(open_source(model_b))
        shapes_a, shapes_b = shapes_of_source(src_a), shapes_of_source(src_b)
        inputs = [src_a.path, src_b.path]
        for path, shapes in ((model_a, shapes_a), (model_b, shapes_b)):
            detect.require_sd1(path, detect.classify(shapes), inpaint=True)
        targets = checkpoint_targets(shapes_a)
        wanted = {"attn"} | ({"resnet"} if conv_dim else set()) | ({"te"} if te else set())
        # kohya names only (a layer also answers to its LDM-path alias): one module per layer
        chosen = {}
        for name, t in targets.items():
            if t.group in wanted and t.key not in chosen:
                chosen[t.key] = (name, t)
        for key, (_, t) in chosen.items():
            if key not in shapes_b:
                raise ModelFileError(model_b, f"has no {key} (model A has it)")
            if shapes_b[key] != t.shape:
                raise ModelFileError(model_b, f"shape of {key} is {shapes_b[key]}, model A has {t.shape}")
        for key, (name, t) in tqdm(chosen.items(), desc="extract", disable=not progress, leave=False):
            diff = src_b.get(key).float() - src_a.get(key).float()
            if float(diff.abs().max()) <= min_diff:
                report.unchanged += 1
                continue
            te_changed |= t.component == "text_encoder"
            module_dim = conv_dim if t.is_conv3x3 else dim
            up, down = svd_factors(diff, module_dim, rule, clamp_quantile, device)
            block = "TE" if t.component == "text_encoder" else t.block
            errors.add(block, diff, up, down)
            r = down.shape[0]
            tensors[f"{name}.lora_up.weight"] = up.to(dtype)
            tensors[f"{name}.lora_down.weight"] = down.to(dtype)
            tensors[f"{name}.alpha"] = torch.tensor(float(r), dtype=dtype)
            report.ranks[name] = r
    report.te_unchanged = te and not te_changed
    if not tensors:
        raise BakaError(f"{model_a} and {model_b} do not differ in any layer a LoRA can hold")
    report.modules = len(report.ranks)
    report.block_error = errors.relative()
    tool = {
        "tool": "extract",
        "model_a": Path(model_a).name,
        "model_b": Path(model_b).name,
        "dim": dim,
        "conv_dim": conv_dim,
        "te": te,
        "clamp_quantile": clamp_quantile,
        "rank_rule": str(rule),
        "min_diff": min_diff,
    }
    meta = lora_metadata(out.stem, dim, conv_dim, tool, tensors)
    meta["ss_sd_model_name"] = Path(model_a).name
    save_file(tensors, out, meta, protect=[p for p in inputs if p])
    return report


__all__ = ["ExtractReport", "extract_lora"]
