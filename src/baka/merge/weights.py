"""Parsing the 26 block weights the way supermerger users write them.

Accepted: one number (all blocks), 26 comma-separated numbers (BASE, IN00..IN11, M00, OUT00..OUT11;
supermerger's random ``R`` / ``U`` / ``X`` in any position, drawn from the merge seed),
25 numbers (A1111 MBW style: BASE comes from ``base``), a preset name, and any of those followed by
per-block overrides ``;IN05=0.3;OUT11=1`` (also given on the CLI as ``--block IN05=0.3``).
"""

from __future__ import annotations

import functools

from baka.errors import BakaError
from baka.merge.presets import builtin_presets
from baka.models.blocks import BLOCK_IDS, BLOCK_INDEX, N_BLOCKS, parse_block_id
from baka.registry import Registry

Weights = tuple[float, ...]


def _floats(text: str) -> list[float] | None:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        return None


# supermerger's random block weights ("Let the Dice roll"), from r = numpy's legacy
# RandomState(seed).rand(3000)[position + offset] (offset 0 for alpha, 50 for beta), rounded to 3
# digits, within supermerger's default limits 0..1 (facts: tests/data/supermerger_calcmodes.json)
RANDOM_TOKENS = {
    "R": lambda r: r,
    "U": lambda r: min(max(1.5 - 2 * r, 0.0), 1.0),
    "X": lambda r: (0.0 - 1.0) * r + 1.0,  # (low - upp) r + upp with upp 1, low 0
}
BETA_OFFSET = 50


@functools.lru_cache(maxsize=4)
def randomer(seed: int):
    """supermerger's random stream: ``np.random.seed(seed); np.random.rand(3000)`` (drawn once per seed:
    random elemental ratios read it for every matching key; read-only)."""
    import numpy as np

    r = np.random.RandomState(seed).rand(3000)
    r.flags.writeable = False
    return r


def _random_values(tokens: list[str], seed: int | None, offset: int, text: str) -> list[float] | None:
    if not any(t.upper() in RANDOM_TOKENS for t in tokens):
        return None
    if seed is None:
        raise BakaError(f"random weights {text!r} need a seed")
    r = randomer(seed)
    out = []
    for i, t in enumerate(tokens):
        fn = RANDOM_TOKENS.get(t.upper())
        try:
            out.append(round(fn(float(r[i + offset])), 3) if fn else float(t))
        except ValueError:
            return None
    return out


def parse_weights(
    spec: str | float | list[float] | tuple[float, ...] | None,
    *,
    base: float | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    presets: Registry[Weights] | None = None,
    default: float = 0.5,
    seed: int | None = None,
    offset: int = 0,
) -> Weights:
    """26 block weights from a spec string, number or list (see module doc). Positions written
    ``R``, ``U`` or ``X`` are drawn as supermerger does from ``seed`` (``offset`` 50 for beta)."""
    presets = presets or builtin_presets()
    if spec is None:
        values = [default] * N_BLOCKS
        parts: list[str] = []
    elif isinstance(spec, int | float):
        values, parts = [float(spec)] * N_BLOCKS, []
    elif isinstance(spec, list | tuple):
        values, parts = _expand([float(v) for v in spec], base, str(spec)), []
    else:
        head, *parts = [p.strip() for p in spec.split(";")]
        nums = _floats(head)
        if nums is None:
            nums = _random_values([t.strip() for t in head.split(",") if t.strip()], seed, offset, head)
        values = _expand(nums, base, spec) if nums is not None else list(presets.get(head))
    for item in [*parts, *overrides]:
        if not item:
            continue
        block, sep, val = item.partition("=")
        if not sep:
            raise BakaError(f"bad block override {item!r}; write BLOCK=VALUE, e.g. IN05=0.3")
        try:
            values[BLOCK_INDEX[parse_block_id(block)]] = float(val)
        except ValueError:
            raise BakaError(f"bad block override {item!r}: {val!r} is not a number") from None
    return tuple(values)


def _expand(nums: list[float], base: float | None, text: str) -> list[float]:
    if len(nums) == 1:
        return nums * N_BLOCKS
    if len(nums) == N_BLOCKS:
        return nums
    if len(nums) == N_BLOCKS - 1:
        if base is None:
            raise BakaError(f"25 weights given ({text!r}) but no base alpha for BASE")
        return [base, *nums]
    raise BakaError(f"{len(nums)} block weights given; need 1, 25 or 26 (BASE, IN00-IN11, M00, OUT00-OUT11)")


def format_weights(w: Weights) -> str:
    return ",".join(f"{v:g}" for v in w)


def describe_weights(w: Weights) -> str:
    return " ".join(f"{b}={v:g}" for b, v in zip(BLOCK_IDS, w, strict=True))
