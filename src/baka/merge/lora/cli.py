"""``baka lora extract | bake | merge``."""

from __future__ import annotations

import argparse
from pathlib import Path

from baka._cli import args, command, print_config

PRECISIONS = ["float", "fp16", "bf16"]  # baka.models.io.SAVE_PRECISION_DTYPES (torch-free here)


def _lora_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    e = sub.add_parser("extract", help="a kohya LoRA / LoCon approximating B - A (truncated SVD per layer)")
    e.add_argument("model_a", help="the base model A")
    e.add_argument("model_b", help="the tuned model B")
    e.add_argument("-o", "--output", required=True, help="output .safetensors")
    e.add_argument("--dim", type=int, default=64, help="rank of Linear and 1x1 layers")
    e.add_argument("--conv-dim", type=int, default=0, help="rank of 3x3 convs (0: no resnets, plain LoRA)")
    e.add_argument("--te", action="store_true", help="also extract the text encoder")
    e.add_argument(
        "--clamp-quantile", type=float, default=0.99, help="clamp up/down to this quantile (1: no clamp)"
    )
    e.add_argument(
        "--rank-rule",
        default="fixed",
        help="per-layer rank: fixed, sv_ratio:R, sv_fro:F or sv_cumulative:C (capped at --dim)",
    )
    e.add_argument(
        "--min-diff", type=float, default=0.0, help="skip layers whose largest |B - A| is this small"
    )
    e.add_argument("--save-precision", choices=PRECISIONS, default="float", help="dtype of the file")
    e.add_argument("--device", default="cpu", help="torch device for the SVDs (cuda if you have one)")
    b = sub.add_parser("bake", help="merge LoRA / LyCORIS files into a checkpoint (same maths as generation)")
    b.add_argument("model", help="checkpoint (.safetensors/.ckpt, diffusers folder, or a shipped name)")
    b.add_argument(
        "loras", nargs="+", metavar="LORA[:W[:LBW]]", help="file or name, weight, lora-block-weight"
    )
    b.add_argument("-o", "--output", required=True, help="output .safetensors")
    b.add_argument("--lora-dir", action="append", default=[], help="folder to find LoRAs by name in")
    b.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="cast floating tensors (default: keep)")
    m = sub.add_parser("merge", help="several LoRAs as one (concatenated ranks, or SVD to --dim)")
    m.add_argument(
        "loras", nargs="+", metavar="LORA[:W[:LBW]]", help="file or name, weight, lora-block-weight"
    )
    m.add_argument("-o", "--output", required=True, help="output .safetensors")
    m.add_argument("--dim", type=int, help="re-factor each layer by SVD at this rank (default: concatenate)")
    m.add_argument("--conv-dim", type=int, help="SVD rank of 3x3 convs (default: --dim)")
    m.add_argument("--model", help="checkpoint giving layer shapes and weights (IA3, GLoRA, DoRA need it)")
    m.add_argument("--clamp-quantile", type=float, default=0.99, help="SVD mode: clamp quantile (1: none)")
    m.add_argument("--lora-dir", action="append", default=[], help="folder to find LoRAs by name in")
    m.add_argument("--save-precision", choices=PRECISIONS, default="float", help="dtype of the file")
    for s in (e, b, m):
        s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _fmt_errors(errors: dict[str, float]) -> str:
    from baka.models.blocks import BLOCK_IDS

    order = ["TE", *BLOCK_IDS]
    return " ".join(f"{b}={errors[b]:.2e}" for b in sorted(errors, key=order.index))


def _extract(a: argparse.Namespace) -> int:
    from baka.merge.lora.extract import extract_lora

    cfg = {k: getattr(a, k) for k in ("model_a", "model_b", "output", "dim", "conv_dim", "te")}
    cfg |= {k: getattr(a, k) for k in ("clamp_quantile", "rank_rule", "min_diff", "save_precision", "device")}
    print_config("lora extract", cfg)
    r = extract_lora(
        a.model_a,
        a.model_b,
        a.output,
        dim=a.dim,
        conv_dim=a.conv_dim,
        te=a.te,
        clamp_quantile=a.clamp_quantile,
        rank_rule=a.rank_rule,
        min_diff=a.min_diff,
        precision=a.save_precision,
        device=a.device,
        progress=not a.quiet,
    )
    ranks = sorted(set(r.ranks.values()))
    print(
        f"wrote {r.path}: {r.modules} modules, ranks {ranks[0]}-{ranks[-1]}, {r.unchanged} layers unchanged"
    )
    if r.te_unchanged:
        print("note: the text encoders are equal; the LoRA holds the UNet only")
    print("relative error per block:", _fmt_errors(r.block_error))
    return 0


def _bake(a: argparse.Namespace) -> int:
    from baka.merge.lora.bake import bake_loras
    from baka.merge.lora.common import LoraArg

    folders = [Path(d) for d in a.lora_dir]
    loras = [LoraArg.parse(s, folders) for s in a.loras]
    print_config(
        "lora bake", {"model": a.model, "loras": a.loras, "output": a.output, "dtype": a.dtype or "keep"}
    )
    r = bake_loras(a.model, loras, a.output, dtype=a.dtype, progress=not a.quiet)
    print(f"wrote {r.path}: {r.applied} layer updates")
    for u in r.unmatched[:20]:
        print(f"warning: not applied: {u}")
    if len(r.unmatched) > 20:
        print(f"warning: ... and {len(r.unmatched) - 20} more modules not applied")
    return 0


def _merge(a: argparse.Namespace) -> int:
    from baka.merge.lora.combine import merge_loras
    from baka.merge.lora.common import LoraArg

    folders = [Path(d) for d in a.lora_dir]
    loras = [LoraArg.parse(s, folders) for s in a.loras]
    cfg = {"loras": a.loras, "output": a.output, "dim": a.dim or "concatenate", "conv_dim": a.conv_dim}
    cfg |= {"model": a.model, "clamp_quantile": a.clamp_quantile, "save_precision": a.save_precision}
    print_config("lora merge", cfg)
    r = merge_loras(
        loras,
        a.output,
        dim=a.dim,
        conv_dim=a.conv_dim,
        model=a.model,
        clamp_quantile=a.clamp_quantile,
        precision=a.save_precision,
        progress=not a.quiet,
    )
    ranks = sorted(set(r.ranks.values()))
    print(f"wrote {r.path}: {r.modules} modules, ranks {ranks[0]}-{ranks[-1]}")
    if r.block_error:
        print("relative error per block:", _fmt_errors(r.block_error))
    return 0


_ACTIONS = {"extract": _extract, "bake": _bake, "merge": _merge}


@command("lora", "LoRA tools: extract from two models, bake into a model, merge LoRAs")
@args(_lora_args)
def cmd_lora(a: argparse.Namespace) -> int:
    return _ACTIONS[a.action](a)
