"""kohya's sample prompts: the pictures a run draws while it trains.

Settings (kohya's names): ``sample_prompts`` (inline strings / tables, or a ``.txt`` / ``.toml`` /
``.json`` file), ``sample_every_n_steps`` (baka's older ``sample_every``), ``sample_every_n_epochs``
(wins over steps, as in kohya), ``sample_at_first`` and ``sample_sampler``. Files are read as kohya
reads them: ``.txt`` has one prompt per line (blank lines and lines starting with ``#`` skipped);
``.toml`` has a ``[prompt]`` table of defaults and ``[[prompt.subset]]`` entries; ``.json`` a list of
strings or objects.

A prompt string carries its options after `` --``: ``--n`` negative prompt, ``--w`` / ``--h`` size
(rounded down to a multiple of 8, at least 64), ``--d`` seed, ``--s`` steps (clamped to 1..1000),
``--l`` CFG scale, ``--ss`` sampler. Tables use kohya's keys: ``prompt``, ``negative_prompt``,
``width``, ``height``, ``seed``, ``sample_steps``, ``scale``, ``sample_sampler``. Defaults are
kohya's (30 steps, CFG 7.5, ``sample_sampler`` = ``ddim``) except two: the size is the model's native
size (kohya: 512x512) and a prompt without a seed gets ``seed + index`` (kohya: a random one), so a
run's samples can be compared from run to run. Sampler names are kohya's (``ddim``, ``k_euler_a``,
``dpmsolver++``, ...) or A1111's; both resolve through the sampler registry.

Files are kohya's: ``output_dir/sample/{output_name}_{step:06d}_{index:02d}_{time}_{seed}.png``
(``e{epoch:06d}`` in place of the step for per-epoch samples), each with A1111 infotext.
"""

from __future__ import annotations

import json
import logging
import re
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from baka.errors import BakaError

log = logging.getLogger(__name__)

DEFAULT_STEPS = 30  # kohya's sample_image_inference defaults
DEFAULT_SCALE = 7.5
DEFAULT_SAMPLER = "ddim"


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int | None = None  # None: the model's native size
    height: int | None = None
    seed: int | None = None  # None: the run's seed + the prompt's index
    steps: int | None = None  # None: the run's sample_steps
    scale: float = DEFAULT_SCALE
    sampler: str | None = None  # None: the run's sample_sampler


def _size(v: int) -> int:
    return max(64, v - v % 8)  # kohya: rounded down to a multiple of 8, at least 64


def _steps(v: int) -> int:
    return max(1, min(1000, v))


# option -> (SamplePrompt field, value pattern, conversion); kohya's line options
_OPTIONS = {
    "w": ("width", r"\d+", lambda s: _size(int(s))),
    "h": ("height", r"\d+", lambda s: _size(int(s))),
    "d": ("seed", r"\d+", int),
    "s": ("steps", r"\d+", lambda s: _steps(int(s))),
    "l": ("scale", r"[\d.]+", float),
    "n": ("negative", r".+", str),
    "ss": ("sampler", r".+", str),
}
# kohya's table keys -> SamplePrompt fields
_KEYS = {
    "prompt": ("prompt", str),
    "negative_prompt": ("negative", str),
    "width": ("width", lambda v: _size(int(v))),
    "height": ("height", lambda v: _size(int(v))),
    "seed": ("seed", int),
    "sample_steps": ("steps", lambda v: _steps(int(v))),
    "scale": ("scale", float),
    "sample_sampler": ("sampler", str),
}


def parse_line(line: str, where: str = "sample prompt") -> SamplePrompt:
    """One kohya prompt line: ``prompt --n negative --w 512 --h 768 --d 1 --s 28 --l 7 --ss euler_a``."""
    parts = line.split(" --")
    values: dict = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        part = part.strip()
        if not part:
            continue
        name, _, value = part.partition(" ")
        opt = _OPTIONS.get(name.lower())
        if opt is None:  # kohya ignores options it does not know (--g, --cn, ... are other models')
            log.warning("%s: option --%s ignored (baka reads --n --w --h --d --s --l --ss)", where, name)
            continue
        field, pattern, conv = opt
        value = value.strip()
        if not re.fullmatch(pattern, value):
            raise BakaError(f"{where}: --{name} {value!r} is not a valid value")
        values[field] = conv(value)
    return SamplePrompt(**values)


def parse_table(table: dict, where: str = "sample prompt") -> SamplePrompt:
    """One kohya prompt table (``.toml`` / ``.json`` / inline)."""
    values = {}
    for key, v in table.items():
        if key in ("enum", "subset"):  # kohya's own bookkeeping keys
            continue
        if key not in _KEYS:
            raise BakaError(f"{where}: unknown key {key!r} (kohya's: {', '.join(_KEYS)})")
        field, conv = _KEYS[key]
        try:
            values[field] = conv(v)
        except (TypeError, ValueError):
            raise BakaError(f"{where}: {key} = {v!r} is not a valid value") from None
    if "prompt" not in values:
        raise BakaError(f"{where}: a prompt table needs 'prompt'")
    return SamplePrompt(**values)


def _read_file(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise BakaError(f"{path}: cannot read sample prompts ({e.strerror})") from None
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [s.strip() for s in text.splitlines() if s.strip() and not s.startswith("#")]
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
            common = {k: v for k, v in data.get("prompt", {}).items() if k != "subset"}
            return [{**common, **sub} for sub in data.get("prompt", {}).get("subset", [])]
        if suffix == ".json":
            items = json.loads(text)
            if not isinstance(items, list):
                raise BakaError(f"{path}: sample prompts JSON must be a list")
            return items
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise BakaError(f"{path}: invalid sample prompts file ({e})") from None
    raise BakaError(f"{path}: sample prompts file must be .txt, .toml or .json")


def load_prompts(spec: str | list) -> list[SamplePrompt]:
    """The prompts of a ``sample_prompts`` setting: a file path or an inline list."""
    items, where = (_read_file(Path(spec)), str(spec)) if isinstance(spec, str) else (spec, "sample_prompts")
    out = []
    for i, item in enumerate(items):
        at = f"{where}: prompt {i + 1}"
        if isinstance(item, str):
            out.append(parse_line(item, at))
        elif isinstance(item, dict):
            out.append(parse_table(item, at))
        else:
            raise BakaError(f"{at}: a prompt is a string or a table, not {type(item).__name__}")
    return out


def sample_name(output_name: str, index: int, seed: int, *, step: int, epoch: int | None = None) -> str:
    """kohya's sample file name (with the time it was drawn, as kohya writes it)."""
    when = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    return f"{output_name}_{when}_{index:02d}_{time.strftime('%Y%m%d%H%M%S')}_{seed}.png"
