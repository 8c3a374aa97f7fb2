"""The ``baka`` command: builds the parser from the command registry and maps errors to one line.

Subcommands live beside their layer (``baka.models.cli``, ``baka.merge.cli``, ...) and register
themselves in ``baka._cli.COMMANDS`` when imported; heavy imports happen inside each handler.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from baka._cli import COMMANDS, DefaultsFormatter, show_defaults
from baka.errors import BakaError

# modules whose import registers subcommands, in the order ``baka --help`` lists them
COMMAND_MODULES = (
    "baka.models.cli",
    "baka.merge.cli",
    "baka.merge.lora.cli",
    "baka.generate.cli",
    "baka.train.cli",
    "baka.erase.cli",
    "baka.serve.cli",
    "baka.world.cli",
    "baka.tune.cli",
    "baka.demo",
)


def build_parser() -> argparse.ArgumentParser:
    for mod in COMMAND_MODULES:
        importlib.import_module(mod)
    from baka import __version__

    parser = argparse.ArgumentParser(prog="baka", description="SD1.x model-author toolkit")
    parser.add_argument("--version", action="version", version=f"baka {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        cmd = COMMANDS.get(name)
        p = sub.add_parser(
            cmd.name,
            help=cmd.help,
            description=cmd.help,
            formatter_class=DefaultsFormatter,
        )
        cmd.add_args(p)
        show_defaults(p)
        p.set_defaults(func=cmd.handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # diffusers' pipeline module names CLIPImageProcessor, and transformers then warns that torchvision
    # (deliberately absent) is missing; nothing is imported, so this one logger is quieted
    import logging

    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"] and argv[1:2] in (["probe"], ["search"]):  # `baka merge probe` spelling
        argv = [f"merge-{argv[1]}", *argv[2:]]
    a = parser.parse_args(argv)
    try:
        return int(a.func(a) or 0)
    except BakaError as e:
        print(f"baka: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"baka: error: {e.filename or Path()}: {e.strerror}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed early: not an error of ours
        sys.stderr.close()
        return 0
    except OSError as e:  # disk full, read-only file system, I/O error: one line naming the path
        where = f"{e.filename}: " if e.filename else ""
        print(f"baka: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("baka: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
