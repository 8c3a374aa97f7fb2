"""Block-weight presets: supermerger's (shipped as presets.tsv) plus user TSV files.

A TSV has a header line, then ``name<TAB>26 comma-separated weights`` (BASE, IN00..IN11, M00,
OUT00..OUT11), the format supermerger's mbwpresets.txt uses.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

from baka.errors import BakaError
from baka.models.blocks import N_BLOCKS
from baka.registry import Registry


def parse_tsv(text: str, source: str) -> list[tuple[str, tuple[float, ...]]]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            parts = line.split(None, 1)
        if n == 1 and parts[0].strip().lower() == "preset_name":
            continue
        if len(parts) != 2:
            raise BakaError(f"{source}:{n}: expected 'name<TAB>weights'")
        name, weights = parts[0].strip(), parts[1].strip()
        try:
            values = tuple(float(v) for v in weights.split(","))
        except ValueError:
            raise BakaError(f"{source}:{n}: preset {name!r} has a non-numeric weight") from None
        if len(values) != N_BLOCKS:
            raise BakaError(f"{source}:{n}: preset {name!r} has {len(values)} weights, need {N_BLOCKS}")
        out.append((name, values))
    return out


@functools.cache
def builtin_presets() -> Registry[tuple[float, ...]]:
    reg: Registry[tuple[float, ...]] = Registry("preset")
    text = resources.files("baka.merge").joinpath("presets.tsv").read_text()
    for name, values in parse_tsv(text, "presets.tsv"):
        reg.add(name, values)
    return reg


def presets(user_files: tuple[str | Path, ...] = ()) -> Registry[tuple[float, ...]]:
    """Built-in presets plus those of ``user_files`` (a name already taken is an error)."""
    if not user_files:
        return builtin_presets()
    reg: Registry[tuple[float, ...]] = Registry("preset")
    for name in builtin_presets().names():
        reg.add(name, builtin_presets().get(name))
    for f in user_files:
        p = Path(f)
        try:
            text = p.read_text()
        except OSError as e:
            raise BakaError(f"{p}: cannot read preset file ({e.strerror})") from None
        for name, values in parse_tsv(text, str(p)):
            reg.add(name, values)
    return reg
