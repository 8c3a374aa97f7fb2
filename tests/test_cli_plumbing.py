"""The command registry: `baka --help` is cheap (no torch), every layer's commands register once, and
subcommand modules do not import `baka.cli`."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from baka._cli import COMMANDS, command
from baka.errors import BakaError

SRC = Path(__file__).parents[1] / "src" / "baka"


def test_building_the_parser_loads_no_torch():
    code = "import sys, baka.cli; baka.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_command_registered_and_duplicates_refused():
    from baka.cli import build_parser

    build_parser()
    names = set(COMMANDS)
    assert {"info", "convert", "merge", "generate", "train", "erase", "serve", "world", "demo"} <= names
    with pytest.raises(BakaError, match="duplicate command"):
        command("merge", "again")(lambda a: 0)


def test_subcommand_modules_do_not_import_baka_cli():
    for path in SRC.rglob("*.py"):
        if path.parent == SRC and path.name in ("cli.py", "__main__.py"):  # the entry points
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "baka.cli":
                pytest.fail(f"{path.relative_to(SRC)} imports baka.cli (use baka._cli)")
