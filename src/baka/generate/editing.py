"""A1111 prompt editing, alternation and composable diffusion (``AND``), by their documented semantics.

- ``[from:to:when]`` uses ``from`` up to step ``when`` and ``to`` after it; ``[to:when]`` adds ``to``
  after ``when``; ``[from::when]`` removes ``from`` after it. An integer ``when`` is a step, one with a
  decimal point a fraction of the steps (``int(when * steps)``, capped at ``steps``).
- ``[a|b|c]`` alternates every step: step s (from 1) uses option ``(s - 1) % n``.
- Emphasis brackets ``(x)``, ``(x:1.2)``, ``[x]`` pass through unchanged (weights are applied later).
- ``a AND b :1.5`` is composable diffusion: sub-prompts with weights (default 1).

A1111 parses with a grammar in which, outside any bracket, a stray ``[ ] ( ) :`` is plain text, but a
``|`` outside an alternation, or a backslash ending the prompt, makes the whole prompt unparseable:
then the prompt is used as written for every step. Hires fix's second pass counts integer steps from
the start of the first pass and fractions from 1.0 (``[a:b:1.5]`` switches half-way through hires).
The test table ``tests/data/a1111_prompt_schedules.json`` was produced by A1111's own parser.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# lark's NUMBER: an integer, a decimal (``5.``, ``.5``, ``0.5``) or either with an exponent; no sign
_NUMBER = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*")
_STOP = frozenset("[]():|")


@dataclass
class _Edit:
    before: list | None  # None: ``[to:when]``
    after: list
    when_text: str
    when: int = 0


@dataclass
class _Alt:
    options: list[list]


class _NoParse(Exception):
    """The whole prompt does not parse (A1111 then uses it unchanged)."""


class _NoMatch(Exception):
    """A bracket construct does not parse here (at top level its bracket is plain text)."""


class _Parser:
    def __init__(self, text: str):
        self.s = text

    def top(self) -> list:
        s, i, out = self.s, 0, []
        while i < len(s):
            if s[i] in "[(":
                try:
                    node, i = self.bracket(i)
                    out.append(node)
                    continue
                except _NoMatch:
                    pass
            if s[i] == "|":
                raise _NoParse
            if s[i] in _STOP:
                out.append(s[i])
                i += 1
                continue
            text, i = self.plain(i)
            out.append(text)
        return out

    def plain(self, i: int) -> tuple[str, int]:
        s, j = self.s, i
        while j < len(s) and s[j] not in _STOP:
            if s[j] == "\\":
                if j + 1 == len(s):
                    raise _NoParse  # a backslash escapes the next character; none is left
                j += 1
            j += 1
        return s[i:j], j

    def prompt(self, i: int) -> tuple[list, int]:
        """A run of text and bracket constructs up to the next ``] ) : |`` (or the end)."""
        s, out = self.s, []
        while i < len(s) and s[i] not in "]):|":
            if s[i] in "[(":
                node, i = self.bracket(i)
            else:
                node, i = self.plain(i)
            out.append(node)
        return out, i

    def expect(self, i: int) -> str:
        if i >= len(self.s):
            raise _NoMatch
        return self.s[i]

    def bracket(self, i: int) -> tuple[object, int]:
        if self.s[i] == "(":
            inner, j = self.prompt(i + 1)
            c = self.expect(j)
            if c == ")":
                return ["(", inner, ")"], j + 1
            if c == ":":
                weight, k = self.prompt(j + 1)
                if self.expect(k) == ")":
                    return ["(", inner, ":", weight, ")"], k + 1
            raise _NoMatch
        first, j = self.prompt(i + 1)
        c = self.expect(j)
        if c == "]":
            return ["[", first, "]"], j + 1
        if c == "|":
            options = [first]
            while self.expect(j) == "|":
                opt, j = self.prompt(j + 1)
                options.append(opt)
            if self.expect(j) != "]":
                raise _NoMatch
            return _Alt(options), j + 1
        if c != ":":
            raise _NoMatch
        second, k = self.prompt(j + 1)
        c = self.expect(k)
        if c == "]":  # [to:when]
            return self.edit(None, first, j + 1, k), k + 1
        if c == ":":
            m = _NUMBER.fullmatch(self.s, k + 1, self._close(k + 1))
            if m is not None:
                end = m.end()
                return _Edit(first, second, m.group(1)), end + 1
        raise _NoMatch

    def _close(self, i: int) -> int:
        j = self.s.find("]", i)
        if j < 0:
            raise _NoMatch
        return j

    def edit(self, before: list | None, after: list, start: int, end: int) -> _Edit:
        m = _NUMBER.fullmatch(self.s, start, end)
        if m is None:
            raise _NoMatch
        return _Edit(before, after, m.group(1))


def _walk(nodes: list):
    for n in nodes:
        if isinstance(n, list):
            yield from _walk(n)
        elif isinstance(n, _Edit):
            yield n
            if n.before is not None:
                yield from _walk(n.before)
            yield from _walk(n.after)
        elif isinstance(n, _Alt):
            yield n
            for o in n.options:
                yield from _walk(o)


def _at(nodes: list, step: int) -> str:
    out = []
    for n in nodes:
        if isinstance(n, str):
            out.append(n)
        elif isinstance(n, list):
            out.append(_at(n, step))
        elif isinstance(n, _Edit):
            out.append(_at(n.before or [], step) if step <= n.when else _at(n.after, step))
        else:
            out.append(_at(n.options[(step - 1) % len(n.options)], step))
    return "".join(out)


def prompt_schedule(
    text: str, steps: int, *, hires_steps: int | None = None, old_scheduling: bool = False
) -> list[tuple[int, str]]:
    """A1111's prompt schedule of one prompt: ``[(end_step, text), ...]``, each text used up to and
    including its end step (steps count from 1). ``hires_steps`` gives the hires-fix pass's schedule
    (``steps`` being the first pass's); ``old_scheduling`` is A1111's "old prompt editing timelines"
    option (a ``when`` below 1 is a fraction, anything else a step)."""
    if hires_steps is None or old_scheduling:
        int_offset, frac_offset, n = 0, 0.0, steps
    else:
        int_offset, frac_offset, n = steps, 1.0, hires_steps
    try:
        tree = _Parser(text).top()
    except _NoParse:
        return [(n, text)]
    ends = {n}
    for node in _walk(tree):
        if isinstance(node, _Alt):
            ends.update(range(1, n + 1))
            continue
        v = float(node.when_text)
        if old_scheduling:
            v = v * n if v < 1 else v
        elif "." in node.when_text:
            v = (v - frac_offset) * n
        else:
            v = v - int_offset
        node.when = min(n, int(v))
        if node.when >= 1:
            ends.add(node.when)
    return [(t, _at(tree, t)) for t in sorted(ends)]


_AND = re.compile(r"\bAND\b")
# a sub-prompt's trailing ``:weight`` (A1111: optional sign, digits with an optional decimal point)
_WEIGHT = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.S)


def split_and(text: str) -> list[tuple[str, float]]:
    """Composable diffusion: ``a AND b :1.5`` -> ``[("a ", 1.0), (" b", 1.5)]``."""
    out = []
    for part in _AND.split(text):
        m = _WEIGHT.match(part)
        if m is None:
            out.append((part, 1.0))
            continue
        out.append((m.group(1), float(m.group(2)) if m.group(2) is not None else 1.0))
    return out
