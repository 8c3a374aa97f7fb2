"""Training modes (``mode`` in the config): what trains, how captions reach the text encoder, and what
the run writes. ``lora`` (kohya LoRA / LoCon), ``full`` (EveryDream2 fine-tune), ``embedding``
(textual inversion, :mod:`baka.train.embedding`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache, partial
from pathlib import Path

import torch
from torch import nn

from baka.errors import BakaError
from baka.registry import Registry
from baka.train.config import TrainConfig

Trainable = dict[str, tuple[nn.Parameter, str]]  # name -> (parameter, block id)
# (cfg, unet, text encoder, trainable CLIP layers, device) -> (the mode's own module or None, trainables)
Build = Callable[[TrainConfig, nn.Module, nn.Module, set[int], object], tuple[nn.Module | None, Trainable]]
# (cfg, the unwrapped denoiser, base checkpoint, dataset, step, seconds) -> output file
Save = Callable[..., Path]


def caption_chunks(caption: str, chunks: int, *, parse: bool = False, embeddings=None) -> list:
    """The caption's first ``chunks`` 77-token chunks as generation builds them (kohya's
    ``max_token_length`` 150 / 225), a short caption padded with the empty prompt's chunk; ``parse``:
    A1111's emphasis syntax read (else brackets are literal); ``embeddings``: their names give way to
    vector slots (:func:`baka.generate.prompt.chunk_prompt`)."""
    from baka.generate.prompt import chunk_prompt

    got = chunk_prompt(caption, embeddings, parse=parse)[0][:chunks]
    return got + _empty_chunk() * (chunks - len(got))


@cache
def _empty_chunk() -> list:
    from baka.generate.prompt import chunk_prompt

    return chunk_prompt("", parse=False)[0]


def plain_tokens(extra: nn.Module | None, tok, captions: list[str], device, chunks: int = 1) -> torch.Tensor:
    """[B, 77 * chunks] token ids of the captions (cleaned as generation cleans a prompt). One chunk: cut
    at 77. More (kohya's ``max_token_length`` 150 / 225): A1111's 75-token chunks as generation builds
    them (brackets literal), the first ``chunks`` of each caption, short ones padded with the empty
    chunk."""
    from baka.models.tokenizer import clean_text

    if chunks == 1:
        return tok(
            [clean_text(c) for c in captions],
            padding="max_length",
            max_length=77,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
    rows = [[t for ch in caption_chunks(c, chunks) for t in ch.tokens] for c in captions]
    return torch.tensor(rows, device=device)


def plain_states(
    extra: nn.Module | None, text_encoder: nn.Module, cond: torch.Tensor, clip_skip: int = 1
) -> torch.Tensor:
    """[B, 77 * chunks, width]: each 77-token chunk encoded on its own and the states joined, as
    generation conditions on a long prompt; ``clip_skip`` as generation's."""
    from baka.generate.conditioning import clip_states

    b, n = cond.shape[0], cond.shape[1] // 77
    z = clip_states(text_encoder, cond.reshape(b * n, 77), clip_skip)
    return z.reshape(b, n * 77, z.shape[-1])


def weighted_tokens(
    extra: nn.Module | None, tok, captions: list[str], device, chunks: int = 1
) -> torch.Tensor:
    """kohya's ``weighted_captions``: [B, 2, 77 * chunks], each caption's token ids (row 0) and their
    A1111 emphasis weights (row 1; 1.0 at BOS, EOS and padding), float64 so the ids stay exact.

    The caption is parsed as A1111 parses a prompt (``(word:1.3)``, ``(word)``, ``[word]``) and each run
    tokenized on its own. One chunk: the runs' tokens cut at 75, between BOS and EOS padding, as kohya's
    ``_get_weighted_input_ids``; without emphasis syntax the ids are :func:`plain_tokens`'. More chunks
    (``max_token_length`` 150 / 225): the chunks generation builds, as :func:`plain_tokens` takes them."""
    from baka.generate.prompt import CHUNK, parse_prompt_attention
    from baka.models.tokenizer import BOS_ID, EOS_ID, tokenize

    rows = []
    for caption in captions:
        if chunks == 1:
            ids: list[int] = []
            weights: list[float] = []
            last = 1.0
            for text, w in parse_prompt_attention(caption):
                # kohya's caption parser knows no BREAK: the word is text, weighted as its bracket's text
                # (the run before it; A1111's parser marks BREAK with a negative weight)
                w = last if text == "BREAK" and w < 0 else w
                got, last = tokenize(text), w
                ids += got
                weights += [w] * len(got)
            ids, weights = ids[:CHUNK], weights[:CHUNK]
            pad = CHUNK - len(ids)
            rows.append([[BOS_ID, *ids, *[EOS_ID] * (pad + 1)], [1.0, *weights, *[1.0] * (pad + 1)]])
            continue
        got = caption_chunks(caption, chunks, parse=True)
        rows.append([[t for c in got for t in c.tokens], [w for c in got for w in c.weights]])
    return torch.tensor(rows, dtype=torch.float64, device=device)


def weighted_states(
    extra: nn.Module | None,
    text_encoder: nn.Module,
    cond: torch.Tensor,
    clip_skip: int = 1,
    emphasis: str = "No norm",
) -> torch.Tensor:
    """[B, 77 * chunks, width]: :func:`plain_states` of the ids, each token's state multiplied by its
    weight by A1111's ``emphasis`` mode, chunk by chunk: ``No norm`` (kohya's text encoding strategy
    today), ``Original`` (A1111's default and older kohya's: the chunk's mean restored afterwards)."""
    from baka.generate.conditioning import EMPHASIS

    ids, weights = cond[:, 0].long(), cond[:, 1].float()
    z = plain_states(extra, text_encoder, ids, clip_skip)
    b, n, width = z.shape[0], z.shape[1] // 77, z.shape[-1]
    out = EMPHASIS.get(emphasis).apply(z.float().reshape(b * n, 77, width), weights.reshape(b * n, 77))
    return out.to(z.dtype).reshape(b, n * 77, width)


@dataclass(frozen=True)
class Mode:
    build: Build
    save: Save
    tokens: Callable[..., torch.Tensor] = plain_tokens  # (extra, tokenizer, captions, device, chunks=)
    text_states: Callable[..., torch.Tensor] = plain_states  # (extra, text encoder, ids, clip_skip=)


def _lora(cfg: TrainConfig, unet: nn.Module, te: nn.Module, te_layers: set[int], device):
    from baka.train.network import LoRANetwork

    unet.requires_grad_(False)
    te.requires_grad_(False)
    network = LoRANetwork(unet, te if cfg.train_text_encoder else None, cfg.network, te_layers).to(device)
    if cfg.network_weights:
        network.load_kohya(cfg.network_weights)
    named = {
        f"{name}.{pn}": (p, m.block) for name, m in network.lora.items() for pn, p in m.named_parameters()
    }
    return network, named


def _full(cfg: TrainConfig, unet: nn.Module, te: nn.Module, te_layers: set[int], device):
    from baka.models.blocks import block_of_diffusers

    unet.requires_grad_(True)
    named = {f"unet.{n}": (p, block_of_diffusers("unet", n) or "BASE") for n, p in unet.named_parameters()}
    for n, p in te.named_parameters():
        if p.requires_grad:
            named[f"text_encoder.{n}"] = (p, "BASE")
    return None, named


def _embedding(cfg: TrainConfig, unet: nn.Module, te: nn.Module, te_layers: set[int], device):
    from baka.train.embedding import TrainableEmbedding

    unet.requires_grad_(False)
    te.requires_grad_(False)
    if not cfg.token_string:  # load_config refuses this too; a TrainConfig built in Python may not
        raise BakaError("mode 'embedding' needs token_string (the word captions use for it)")
    emb = TrainableEmbedding(te, cfg.token_string, cfg.init_word, cfg.num_vectors_per_token).to(device)
    return emb, {"embedding.vectors": (emb.vectors, "BASE")}


def _save_lora(cfg, model, ckpt, ds, step, seconds) -> Path:
    from baka.train.outputs import save_lora

    return save_lora(cfg, model.network, ds, step, seconds)


def _save_full(cfg, model, ckpt, ds, step, seconds) -> Path:
    from baka.train.outputs import save_full

    return save_full(cfg, model.unet, model.text_encoder, ckpt, step)


def _save_embedding(cfg, model, ckpt, ds, step, seconds) -> Path:
    from baka.train.outputs import save_textual_inversion

    return save_textual_inversion(cfg, model.network, ds, step, seconds)


def _embedding_tokens(extra, tok, captions: list[str], device, chunks: int = 1) -> torch.Tensor:
    return extra.tokenize(captions, device, chunks)


def _embedding_states(extra, text_encoder: nn.Module, cond: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    return extra.text_states(text_encoder, cond, clip_skip)


def with_weighted_captions(mode: Mode, emphasis: str) -> Mode:
    """``mode`` with kohya's ``weighted_captions``: captions keep their emphasis weights to the encoder's
    states (:func:`weighted_tokens`, :func:`weighted_states`)."""
    return replace(mode, tokens=weighted_tokens, text_states=partial(weighted_states, emphasis=emphasis))


MODES: Registry[Mode] = Registry("training mode")
MODES.add("lora", Mode(_lora, _save_lora))
MODES.add("full", Mode(_full, _save_full), aliases=("finetune",))
MODES.add(
    "embedding",
    Mode(_embedding, _save_embedding, _embedding_tokens, _embedding_states),
    aliases=("textual_inversion", "ti"),
)

__all__ = ["MODES", "Mode", "Trainable", "with_weighted_captions"]
