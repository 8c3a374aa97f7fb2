"""A1111 prompt syntax: emphasis parsing, BREAK, and 75-token chunking with comma backtrack.

Emphasis: ``(x)`` multiplies x's weight by 1.1, ``[x]`` divides it by 1.1, ``(x:1.3)`` multiplies it by
1.3; brackets nest (weights multiply); ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\\\`` are literals and any
other backslash is dropped; an unclosed bracket applies to the rest of the prompt; a closing bracket
with no opener is literal text.
``BREAK`` (upper case, a word of its own) ends the current 75-token chunk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

import torch

from baka.errors import BakaError
from baka.generate.editing import prompt_schedule, split_and

__all__ = ["Chunk", "NetworkTag", "chunk_prompt", "extract_networks", "parse_prompt_attention"]
__all__ += ["prompt_schedule", "split_and"]  # prompt editing / AND live in baka.generate.editing

CHUNK = 75  # tokens per chunk between BOS and EOS
COMMA_BACKTRACK = 20  # A1111 default: a chunk may end at a comma up to 20 tokens back
_ROUND, _SQUARE = 1.1, 1 / 1.1

_TOKEN_RE = re.compile(
    r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:",
)
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*")
_LITERAL = {"\\(": "(", "\\)": ")", "\\[": "[", "\\]": "]", "\\\\": "\\"}


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into (text, weight) runs; a BREAK is ``("BREAK", -1.0)``."""
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in res[start:]:
            run[1] *= factor

    for m in _TOKEN_RE.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok in _LITERAL:
            res.append([_LITERAL[tok], 1.0])
        elif tok == "\\":  # a backslash that escapes nothing is dropped (A1111 keeps an empty run)
            res.append(["", 1.0])
        elif tok == "(":
            round_open.append(len(res))
        elif tok == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:  # "(a:1.2.3)": A1111 raises here too
                raise BakaError(f"prompt: emphasis weight {weight!r} is not a number") from None
            scale(round_open.pop(), factor)
        elif tok == ")" and round_open:
            scale(round_open.pop(), _ROUND)
        elif tok == "]" and square_open:
            scale(square_open.pop(), _SQUARE)
        else:
            for i, part in enumerate(_BREAK_RE.split(tok)):
                if i > 0:
                    res.append(["BREAK", -1.0])
                res.append([part, 1.0])
    for start in round_open:
        scale(start, _ROUND)
    for start in square_open:
        scale(start, _SQUARE)
    if not res:
        return [("", 1.0)]
    merged: list[list] = [res[0]]
    for run in res[1:]:
        if run[1] == merged[-1][1] and run[1] != -1.0:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, w) for t, w in merged]


class EmbeddingLookup(Protocol):
    def find(self, ids: list[int], i: int) -> tuple[object, int] | None:
        """An embedding whose name's tokens start at ``ids[i]``, and how many tokens that is."""


@dataclass
class Chunk:
    """77 token ids (BOS, 75, EOS), their weights, and where embedding vectors go."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, object]] = field(default_factory=list)  # (position in the 77, embedding)


def chunk_prompt(
    text: str, embeddings: EmbeddingLookup | None = None, *, parse: bool = True
) -> tuple[list[Chunk], int]:
    """Parse and tokenize ``text`` into 77-token chunks as A1111 does; returns (chunks, token count).

    ``parse=False`` (A1111's emphasis "None") passes the text to CLIP as it is: brackets, weights and
    BREAK are plain characters."""
    from baka.models.tokenizer import BOS_ID, EOS_ID, tokenize

    comma = tokenize(",")[0]
    chunks: list[Chunk] = []
    cur = Chunk()
    last_comma = -1
    count = 0

    def close() -> None:
        nonlocal cur, last_comma, count
        count += len(cur.tokens)
        pad = CHUNK - len(cur.tokens)
        cur.tokens = [BOS_ID, *cur.tokens, *([EOS_ID] * pad), EOS_ID]
        cur.weights = [1.0, *cur.weights, *([1.0] * pad), 1.0]
        cur.fixes = [(pos + 1, emb) for pos, emb in cur.fixes]
        chunks.append(cur)
        cur = Chunk()
        last_comma = -1

    for run_text, weight in parse_prompt_attention(text) if parse else [(text, 1.0)]:
        if weight == -1.0 and run_text == "BREAK":
            close()
            continue
        ids = tokenize(run_text)
        i = 0
        while i < len(ids):
            tok = ids[i]
            hit = embeddings.find(ids, i) if embeddings else None
            if tok == comma:
                last_comma = len(cur.tokens)
            elif len(cur.tokens) == CHUNK and last_comma != -1 and CHUNK - last_comma <= COMMA_BACKTRACK:
                # move the words after the last comma to the next chunk instead of splitting them
                cut = last_comma + 1
                moved = (cur.tokens[cut:], cur.weights[cut:])
                cur.tokens, cur.weights = cur.tokens[:cut], cur.weights[:cut]
                close()
                cur.tokens, cur.weights = list(moved[0]), list(moved[1])
            if len(cur.tokens) == CHUNK:
                close()
            if hit is None:
                cur.tokens.append(tok)
                cur.weights.append(weight)
                i += 1
                continue
            emb, n_name = hit
            n_vec = emb.vectors.shape[0]
            if len(cur.tokens) + n_vec > CHUNK:
                close()
            cur.fixes.append((len(cur.tokens), emb))
            cur.tokens += [0] * n_vec  # placeholders; the vectors replace their embeddings
            cur.weights += [weight] * n_vec
            i += n_name
    if cur.tokens or not chunks:
        close()
    return chunks, count


def weights_tensor(chunks: list[Chunk]) -> torch.Tensor:
    return torch.tensor([c.weights for c in chunks], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------
# <lora:name:weight> style extra-network tags


@dataclass
class NetworkTag:
    kind: str  # "lora" (lyco / LyCORIS tags are LoRA tags), or another extra-network type
    name: str
    te: float = 1.0
    unet: float = 1.0
    lbw: str | None = None


# A1111's extra-network syntax: <type:name[:arg...]>; every such tag leaves the prompt text
_TAG_RE = re.compile(r"<(\w+):([^>]+)>")
LORA_KINDS = frozenset({"lora", "lyco"})


def _number(tag: str, v: str) -> float:
    try:
        return float(v)
    except ValueError:
        raise BakaError(f"extra-network tag {tag}: {v!r} is not a number") from None


def extract_networks(text: str) -> tuple[str, list[NetworkTag]]:
    """Remove every extra-network tag (``<lora:name:w>``, ``<lora:name:te:unet:lbw=PRESET>``,
    ``<hypernet:name:w>``, ...) from the text; return (prompt, tags). Only LoRA tags carry weights."""
    tags: list[NetworkTag] = []

    def take(m: re.Match) -> str:
        kind, (name, *args) = m.group(1).lower(), m.group(2).split(":")
        if kind not in LORA_KINDS:
            tags.append(NetworkTag(kind, name.strip()))
            return ""
        named = {k.strip(): v.strip() for k, _, v in (a.partition("=") for a in args if "=" in a)}
        pos = [a.strip() for a in args if "=" not in a and a.strip()]
        te = _number(m.group(0), named.get("te", pos[0] if pos else "1"))
        unet = _number(m.group(0), named.get("unet", pos[1] if len(pos) > 1 else str(te)))
        tags.append(NetworkTag("lora", name.strip(), te, unet, named.get("lbw")))
        return ""

    return _TAG_RE.sub(take, text), tags
