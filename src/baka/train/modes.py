"""Training modes (``mode`` in the config): what trains, how captions reach the text encoder, and what
the run writes. ``lora`` (kohya LoRA / LoCon), ``full`` (EveryDream2 fine-tune), ``embedding``
(textual inversion, :mod:`baka.train.embedding`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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


def plain_tokens(extra: nn.Module | None, tok, captions: list[str], device) -> torch.Tensor:
    """[B, 77] token ids of the captions (cleaned as generation cleans a prompt), cut at 77."""
    from baka.models.tokenizer import clean_text

    return tok(
        [clean_text(c) for c in captions],
        padding="max_length",
        max_length=77,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


def plain_states(extra: nn.Module | None, text_encoder: nn.Module, cond: torch.Tensor) -> torch.Tensor:
    return text_encoder(input_ids=cond).last_hidden_state


@dataclass(frozen=True)
class Mode:
    build: Build
    save: Save
    tokens: Callable[..., torch.Tensor] = plain_tokens
    text_states: Callable[[nn.Module | None, nn.Module, torch.Tensor], torch.Tensor] = plain_states


def _lora(cfg: TrainConfig, unet: nn.Module, te: nn.Module, te_layers: set[int], device):
    from baka.train.network import LoRANetwork

    unet.requires_grad_(False)
    te.requires_grad_(False)
    network = LoRANetwork(unet, te if cfg.train_text_encoder else None, cfg.network, te_layers).to(device)
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


def _embedding_tokens(extra, tok, captions: list[str], device) -> torch.Tensor:
    return extra.tokenize(captions, device)


def _embedding_states(extra, text_encoder: nn.Module, cond: torch.Tensor) -> torch.Tensor:
    return extra.text_states(text_encoder, cond)


MODES: Registry[Mode] = Registry("training mode")
MODES.add("lora", Mode(_lora, _save_lora))
MODES.add("full", Mode(_full, _save_full), aliases=("finetune",))
MODES.add(
    "embedding",
    Mode(_embedding, _save_embedding, _embedding_tokens, _embedding_states),
    aliases=("textual_inversion", "ti"),
)

__all__ = ["MODES", "Mode", "Trainable"]
