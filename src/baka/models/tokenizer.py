"""The SD1.x CLIP tokenizer, built offline from the BPE merge list shipped in ``baka/models/data``.

The vocabulary is laid out as OpenAI CLIP builds it: 256 byte symbols, the same with ``</w>``, one
entry per merge, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407): 49408 tokens.
"""

from __future__ import annotations

import functools
import gzip
import html
from importlib import resources
from typing import TYPE_CHECKING

import regex

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

VOCAB_SIZE = 49408
BOS_ID = 49406
EOS_ID = 49407
_N_MERGES = 49152 - 256 - 2  # as in OpenAI CLIP's SimpleTokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


@functools.cache
def vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    data = resources.files("baka.models").joinpath("data/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _N_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    symbols = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    return {s: i for i, s in enumerate(symbols)}, merges  # type: ignore[return-value]


def clean_text(text: str) -> str:
    """OpenAI CLIP's cleaning: ftfy, double html unescape, whitespace collapse.

    transformers 5's CLIPTokenizer skips ftfy/html, so we do it before tokenizing.
    """
    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip()


@functools.cache
def load_tokenizer() -> CLIPTokenizer:
    """The CLIP ViT-L/14 tokenizer used by every SD1.x model (pad = ``<|endoftext|>``, 77 tokens)."""
    from transformers import CLIPTokenizer

    vocab, merges = vocab_and_merges()
    # transformers 5 takes the merges as (left, right) pairs; its annotation still says strings
    tok = CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=77)  # type: ignore[arg-type]
    # from_pretrained on a missing folder silently yields a 2-token tokenizer; never accept that.
    if len(tok) != VOCAB_SIZE or tok.bos_token_id != BOS_ID or tok.eos_token_id != EOS_ID:
        raise RuntimeError(f"CLIP tokenizer build is broken: {len(tok)} tokens")
    return tok


def tokenize(text: str) -> list[int]:
    """Token ids of ``text`` without BOS/EOS, after CLIP cleaning (lowercasing is the tokenizer's)."""
    return load_tokenizer()(clean_text(text), add_special_tokens=False)["input_ids"]
