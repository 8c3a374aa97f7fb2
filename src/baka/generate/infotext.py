"""A1111 "parameters" infotext: written into every PNG, parsed back for ``--from-png``.

Layout: the prompt, a ``Negative prompt: ...`` line, then one line of ``Key: value`` pairs separated
by ", "; values holding ',', ':' or a newline are JSON-quoted, as A1111 does.
"""

from __future__ import annotations

import json
from pathlib import Path

from baka.errors import BakaError

_KEY_CHARS = frozenset(" -/+_")


def _is_key_char(c: str) -> bool:
    return c.isalnum() or c in _KEY_CHARS


def _key_before(line: str, colon: int, lo: int) -> str | None:
    """The key ending at ``colon``: the run of key characters before it (not before ``lo``), from its
    first word character; None when there is none."""
    i = colon
    while i > lo and _is_key_char(line[i - 1]):
        i -= 1
    while i < colon and not (line[i].isalnum() or line[i] == "_"):
        i += 1
    return line[i:colon] if i < colon else None


def _quoted_end(line: str, i: int) -> int | None:
    """Index after the JSON-style quoted string starting at ``i`` if a comma or the end follows it."""
    j, n = i + 1, len(line)
    while j < n and line[j] != '"':
        j += 2 if line[j] == "\\" else 1
    if j >= n:
        return None
    return j + 1 if j + 1 == n or line[j + 1] == "," else None


def pairs(line: str) -> list[tuple[str, str]]:
    """The ``Key: value`` pairs of an infotext parameter line, in one left-to-right pass.

    Same reading as the pattern ``\\s*(\\w[\\w \\-/+]*):\\s*("(?:\\\\.|[^\\\\"])*"|[^,]*)(?:,|$)`` applied
    with findall (values are quoted JSON strings or run to the next comma), but linear in the line's
    length: a regex of that shape backtracks quadratically on long lines without pairs.
    """
    out: list[tuple[str, str]] = []
    n, i = len(line), 0
    while i < n:
        comma = line.find(",", i)
        end = n if comma < 0 else comma
        key, colon, lo = None, line.find(":", i, end), i
        while colon >= 0 and key is None:
            key = _key_before(line, colon, lo)
            if key is None:
                lo = colon + 1
                colon = line.find(":", colon + 1, end)
        if key is None:
            i = end + 1
            continue
        v = colon + 1
        while v < n and line[v].isspace():
            v += 1
        q = _quoted_end(line, v) if v < n and line[v] == '"' else None
        if q is not None:
            out.append((key, line[v:q]))
            i = q + 1
        else:
            stop = line.find(",", v)
            stop = n if stop < 0 else stop
            out.append((key, line[v:stop]))
            i = stop + 1
    return out


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
    found = pairs(lines[-1]) if lines else []
    if len(found) >= 3:
        lines.pop()
        for k, v in found:
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
