"""lora-block-weight multipliers: the extension's presets and its 17 / 26-value lists, as 26 per-block
multipliers (live LoRA application and ``baka lora bake`` both read them here)."""

from __future__ import annotations

from baka.errors import BakaError
from baka.models.blocks import BLOCK_IDS
from baka.registry import Registry

BLOCKS17 = (
    "BASE",
    "IN01",
    "IN02",
    "IN04",
    "IN05",
    "IN07",
    "IN08",
    "M00",
    "OUT03",
    "OUT04",
    "OUT05",
    "OUT06",
    "OUT07",
    "OUT08",
    "OUT09",
    "OUT10",
    "OUT11",
)

LBW_PRESETS: Registry[tuple[float, ...]] = Registry("lora-block-weight preset")
for _name, _vals in {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}.items():
    LBW_PRESETS.add(_name, tuple(float(v) for v in _vals.split(",")))


def parse_lbw(spec: str | None) -> tuple[float, ...]:
    """26 block multipliers from a lora-block-weight preset or a 17/26-value list.

    17 values (BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03-OUT11) set the other 9 blocks
    (IN00, IN03, IN06, IN09-IN11, OUT00-OUT02, where only LoCon conv modules live) to 0, as the
    lora-block-weight extension's 17 -> 26 expansion does.
    """
    if not spec:
        return (1.0,) * 26
    try:
        vals = [float(v) for v in spec.split(",")]
    except ValueError:
        vals = list(LBW_PRESETS.get(spec))
    if len(vals) == 17:
        full = dict.fromkeys(BLOCK_IDS, 0.0)
        full.update(zip(BLOCKS17, vals, strict=True))
        return tuple(full[b] for b in BLOCK_IDS)
    if len(vals) == 26:
        return tuple(vals)
    raise BakaError(f"lbw {spec!r}: need 17 or 26 values or a preset ({', '.join(LBW_PRESETS.names())})")


__all__ = ["BLOCKS17", "LBW_PRESETS", "parse_lbw"]
