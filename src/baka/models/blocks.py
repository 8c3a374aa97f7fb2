"""The 26 merge blocks of supermerger / A1111 MBW and which SD1.x key belongs to which.

Order: BASE, IN00..IN11, M00, OUT00..OUT11. Choices where tools disagree (documented in
docs/blocks.md): ``time_embed.*`` belongs to IN00 (bbc-mc, sd-meh, supermerger 2025-11+; sd-mecha puts
it in BASE); ``out.*`` (final norm and conv) to OUT11; the text encoder and the VAE to BASE.
"""

from __future__ import annotations

import re

from baka.models.keymap import TE_PREFIX, UNET_PREFIX, VAE_PREFIX, unet_key_to_ldm

BLOCK_IDS: tuple[str, ...] = (
    ("BASE",) + tuple(f"IN{i:02d}" for i in range(12)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(12))
)
BLOCK_INDEX = {b: i for i, b in enumerate(BLOCK_IDS)}
N_BLOCKS = len(BLOCK_IDS)  # 26

_UNET_RE = re.compile(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.")


def block_of(ldm_key: str) -> str | None:
    """Block id of an LDM/A1111 key, or None for keys outside the model (EMA, schedule buffers)."""
    if ldm_key.startswith((TE_PREFIX, VAE_PREFIX, "cond_stage_model.")):
        return "BASE"
    if not ldm_key.startswith(UNET_PREFIX):
        return None
    rest = ldm_key[len(UNET_PREFIX) :]
    if m := _UNET_RE.match(rest):
        kind, n = m[1], int(m[2])
        return "M00" if kind == "middle_block" else f"{'IN' if kind == 'input_blocks' else 'OUT'}{n:02d}"
    if rest.startswith("time_embed."):
        return "IN00"
    if rest.startswith("out."):
        return "OUT11"
    return None


def block_of_diffusers(component: str, key: str) -> str | None:
    """Block id of a diffusers-layout key of ``component`` (``unet``, ``vae``, ``text_encoder``)."""
    if component in ("vae", "text_encoder"):
        return "BASE"
    try:
        return block_of(UNET_PREFIX + unet_key_to_ldm(key))
    except KeyError:
        return None


def parse_block_id(name: str) -> str:
    """Normalise user spellings ('in5', 'IN05', 'out11', 'mid', 'M00', 'base') to a block id."""
    s = name.strip().upper()
    if s in ("MID", "M", "M0", "M00", "MID00"):
        return "M00"
    if m := re.fullmatch(r"(IN|OUT)_?(\d{1,2})", s):
        s = f"{m[1]}{int(m[2]):02d}"
    if s not in BLOCK_INDEX:
        from baka.errors import BakaError

        raise BakaError(f"unknown block {name!r}; blocks are BASE, IN00-IN11, M00, OUT00-OUT11")
    return s
