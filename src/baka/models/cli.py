"""``baka info`` and ``baka convert``: the model-file commands."""

from __future__ import annotations

import argparse
import json

from baka._cli import args, command, print_config


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="model file (.safetensors, .ckpt) or diffusers folder")
    p.add_argument("--no-hash", action="store_true", help="skip hashing (fast on large files)")
    p.add_argument("--json", action="store_true", help="print JSON")


@command("info", "kind, dtypes, keys per block and hashes of a model file")
@args(_info_args)
def cmd_info(a: argparse.Namespace) -> int:
    from baka.models.info import describe

    info = describe(a.file, hashes=not a.no_hash, progress=True)
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    for k in (
        "file",
        "kind",
        "detail",
        "size",
        "components",
        "keys",
        "parameters",
        "dtypes",
        "outside_blocks",
    ):
        if k in info:
            print(f"{k:<15} {info[k]}")
    if "hashes" in info:
        h = info["hashes"]
        print(f"{'model hash':<15} {h['autov2']} (AutoV2)   legacy {h['legacy']}")
        if "addnet" in h:
            print(f"{'addnet hash':<15} {h['addnet'][:12]} (sha256 of tensor payload)")
    print("keys per block:", " ".join(f"{b}={n}" for b, n in info["blocks"].items()))
    return 0


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="checkpoint (.safetensors/.ckpt) or diffusers folder")
    p.add_argument(
        "-o", "--output", required=True, help="output .safetensors/.ckpt file, or a folder with --diffusers"
    )
    p.add_argument("--diffusers", action="store_true", help="write a diffusers folder")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="cast floating weights")
    p.add_argument("--ema", action="store_true", help="use the UNet's EMA weights")
    p.add_argument("--vae", help="bake in this VAE file")


@command("convert", "ckpt -> safetensors, single file <-> diffusers folder, fp16, VAE bake-in")
@args(_convert_args)
def cmd_convert(a: argparse.Namespace) -> int:
    from baka.models.diffusers_writer import save_diffusers
    from baka.models.io import DTYPE_BY_NAME, cast, load_checkpoint, save_checkpoint

    print_config(
        "convert",
        {
            "input": a.input,
            "output": a.output,
            "diffusers": a.diffusers,
            "dtype": a.dtype,
            "ema": a.ema,
            "vae": a.vae,
        },
    )
    ckpt = load_checkpoint(a.input, ema=a.ema, vae=a.vae)
    ckpt.tensors = cast(ckpt.tensors, DTYPE_BY_NAME.get(a.dtype or ""))
    protect = [a.input] + ([a.vae] if a.vae else [])
    if a.diffusers:
        save_diffusers(ckpt, a.output, protect=protect)
    else:
        save_checkpoint(
            ckpt.tensors, a.output, metadata=ckpt.metadata or None, protect=protect, progress=True
        )
    print(f"wrote {a.output}")
    return 0
