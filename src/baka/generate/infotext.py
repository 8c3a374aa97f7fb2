"""A1111 "parameters" infotext: written into every PNG, parsed back for ``--from-png``.

Layout: the prompt, a ``Negative prompt: ...`` line, then one line of ``Key: value`` pairs separated
by ", "; values holding ',', ':' or a newline are JSON-quoted, as A1111 does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from baka.errors import BakaError

_PAIR_RE = re.compile(r'\s*([\w][\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _quote(v: object) -> str:
    s = str(v)
    if any(c in s for c in ',:\n"'):
        return json.dumps(s, ensure_ascii=False)
    return s


def build(prompt: str, negative: str, params: dict[str, object]) -> str:
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in params.items() if v is not None and v != ""))
    return "\n".join(lines)


def parse(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, params) from an infotext."""
    lines = text.strip().split("\n")
    params: dict[str, str] = {}
    if lines and len(_PAIR_RE.findall(lines[-1])) >= 3:
        for k, v in _PAIR_RE.findall(lines.pop()):
            v = v.strip()
            if v.startswith('"') and v.endswith('"') and len(v) >= 2:
                try:
                    v = json.loads(v)
                except json.JSONDecodeError:
                    pass
            params[k.strip()] = v
    prompt, negative, in_neg = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_neg = True
            line = line[len("Negative prompt:") :].lstrip()
        (negative if in_neg else prompt).append(line)
    return "\n".join(prompt), "\n".join(negative), params


def read_png(path: str | Path) -> str:
    from PIL import Image

    try:
        with Image.open(path) as im:
            text = im.info.get("parameters")
    except OSError as e:
        raise BakaError(f"{path}: cannot read PNG ({e})") from None
    if not text:
        raise BakaError(f"{path}: PNG has no 'parameters' infotext")
    return text
