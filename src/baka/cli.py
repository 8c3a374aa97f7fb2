"""The ``baka`` command. Each subcommand lives in a small function; heavy imports happen inside."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from baka.errors import BakaError

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Handler, str]] = {}


def command(name: str, help: str):
    """Register ``fn`` as subcommand ``name``; ``fn.args`` adds its arguments."""

    def deco(fn: Handler) -> Handler:
        if name in _COMMANDS:
            raise ValueError(f"duplicate command {name}")
        _COMMANDS[name] = (getattr(fn, "args", lambda p: None), fn, help)
        return fn

    return deco


def args(add: Callable[[argparse.ArgumentParser], None]):
    def deco(fn: Handler) -> Handler:
        fn.args = add  # type: ignore[attr-defined]
        return fn

    return deco


def print_config(title: str, cfg: dict) -> None:
    """The effective configuration of a run, printed before it starts."""
    print(f"[{title}]")
    width = max((len(k) for k in cfg), default=0)
    for k, v in cfg.items():
        print(f"  {k:<{width}} = {v}")


# ---------------------------------------------------------------------------------------------------------


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="model file (.safetensors, .ckpt) or diffusers folder")
    p.add_argument("--no-hash", action="store_true", help="skip hashing (fast on large files)")
    p.add_argument("--json", action="store_true", help="print JSON")


@command("info", "kind, dtypes, keys per block and hashes of a model file")
@args(_info_args)
def cmd_info(a: argparse.Namespace) -> int:
    from baka.models.io import describe

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
    from baka.models.io import DTYPE_BY_NAME, cast, load_checkpoint, save_checkpoint, save_diffusers

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


# ---------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    _load_commands()
    from baka import __version__

    parser = argparse.ArgumentParser(prog="baka", description="SD1.x model-author toolkit")
    parser.add_argument("--version", action="version", version=f"baka {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add, fn, help) in _COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        add(p)
        p.set_defaults(func=fn)
    return parser


def _load_commands() -> None:
    # Subcommands defined in other modules register themselves on import.
    import baka.demo  # noqa: F401
    import baka.erase.cli  # noqa: F401
    import baka.generate.cli  # noqa: F401
    import baka.merge.cli  # noqa: F401
    import baka.serve.cli  # noqa: F401
    import baka.train.cli  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # diffusers' pipeline module names CLIPImageProcessor, and transformers then warns that torchvision
    # (deliberately absent) is missing; nothing is imported, so this one logger is quieted
    import logging

    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return int(a.func(a) or 0)
    except BakaError as e:
        print(f"baka: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"baka: error: {e.filename or Path()}: {e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("baka: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # ``python -m baka.cli`` runs this file as __main__; commands register on the real baka.cli module
    from baka.cli import main as _main

    sys.exit(_main())
