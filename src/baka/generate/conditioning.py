"""Prompt -> CLIP conditioning, as A1111 computes it: chunks of 77, embedding vectors spliced in,
clip skip (the chosen layer then the final layer norm), and emphasis weights."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from baka.errors import BakaError
from baka.generate.denoise import Schedule
from baka.generate.editing import prompt_schedule, split_and
from baka.generate.embeddings import Embedding, EmbeddingDB
from baka.generate.prompt import Chunk, chunk_prompt, weights_tensor
from baka.registry import Registry


@dataclass(frozen=True)
class Emphasis:
    """An A1111 emphasis mode: whether the attention syntax is parsed, and how weights apply."""

    apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    parse: bool = True


EMPHASIS: Registry[Emphasis] = Registry("emphasis mode")


def _original(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Scale token vectors by their weights, then restore the chunk's mean (A1111 default)."""
    mean = z.mean(dim=(1, 2), keepdim=True)
    z = z * w[..., None]
    return z * (mean / z.mean(dim=(1, 2), keepdim=True))


def _no_norm(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Scale token vectors by their weights, no mean restoration."""
    return z * w[..., None]


def _unweighted(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return z


EMPHASIS.add("Original", Emphasis(_original))
EMPHASIS.add("No norm", Emphasis(_no_norm))
# "Ignore": the syntax is parsed and removed, every weight counts as 1
EMPHASIS.add("Ignore", Emphasis(_unweighted))
# "None": no emphasis mechanism at all; "(cat:1.2)" reaches CLIP as those characters
EMPHASIS.add("None", Emphasis(_unweighted, parse=False))


def clip_states(text_encoder: torch.nn.Module, ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """CLIP's states of [N, 77] token ids as A1111 and kohya take them: the last layer's output, or with
    clip skip N the output of layer -N through the final layer norm. Gradients flow (training uses it)."""
    out = text_encoder(input_ids=ids, output_hidden_states=clip_skip > 1)
    if clip_skip > 1:
        return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(
            out.hidden_states[-clip_skip]
        )
    return out.last_hidden_state


@dataclass
class PromptEncoder:
    text_encoder: torch.nn.Module
    embeddings: EmbeddingDB | None = None
    clip_skip: int = 1
    emphasis: str = "Original"
    used: dict[str, Embedding] = field(default_factory=dict)  # embeddings seen, for infotext
    _cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def chunks(self, text: str) -> list[Chunk]:
        return chunk_prompt(text, self.embeddings, parse=EMPHASIS.get(self.emphasis).parse)[0]

    @torch.no_grad()
    def encode_chunks(self, chunks: list[Chunk]) -> torch.Tensor:
        """[1, 77 * len(chunks), width] conditioning."""
        te = self.text_encoder
        layers = te.config.num_hidden_layers
        if not 1 <= self.clip_skip <= layers:
            raise BakaError(f"clip skip {self.clip_skip}: must be from 1 to {layers} (the encoder's layers)")
        device = next(te.parameters()).device
        ids = torch.tensor([c.tokens for c in chunks], device=device)
        fixes = [(row, pos, emb) for row, c in enumerate(chunks) for pos, emb in c.fixes]
        for _, _, emb in fixes:
            self.used[emb.name] = emb
        token_embedding = te.get_input_embeddings()

        def splice(_module, _inp, out):
            out = out.clone()
            for row, pos, emb in fixes:
                n = emb.vectors.shape[0]
                out[row, pos : pos + n] = emb.vectors.to(out.dtype).to(out.device)
            return out

        handle = token_embedding.register_forward_hook(splice) if fixes else None
        try:
            z = clip_states(te, ids, self.clip_skip)
        finally:
            if handle is not None:
                handle.remove()
        z = EMPHASIS.get(self.emphasis).apply(z.float(), weights_tensor(chunks).to(z.device))
        return z.reshape(1, -1, z.shape[-1])

    def encode(self, text: str) -> torch.Tensor:
        """[1, 77 * chunks, width] conditioning of one prompt (no editing syntax), cached by text."""
        if text not in self._cache:
            self._cache[text] = self.encode_chunks(self.chunks(text))
        return self._cache[text]

    def schedule(self, text: str, steps: int, hires_steps: int | None = None) -> Schedule:
        """A1111's prompt schedule of ``text`` (prompt editing, alternation), each distinct text encoded
        once: ``[(end_step, conditioning), ...]``; ``hires_steps``: the hires second pass's."""
        return [(end, self.encode(t)) for end, t in prompt_schedule(text, steps, hires_steps=hires_steps)]

    def conditioning(
        self, prompt: str, negative: str, steps: int, hires_steps: int | None = None
    ) -> tuple[list[tuple[Schedule, float]], Schedule]:
        """The prompt's ``AND`` sub-prompts (each a schedule, with its weight) and the negative's schedule
        (A1111 does not split the negative on ``AND``)."""
        conds = [(self.schedule(t, steps, hires_steps), w) for t, w in split_and(prompt)]
        return conds, self.schedule(negative, steps, hires_steps)

    def empty(self) -> torch.Tensor:
        """The empty prompt's one chunk: what A1111's ``pad_cond_uncond`` pads with."""
        return self.encode("")
