"""Textual-inversion training (``mode = "embedding"``, kohya's ``train_textual_inversion`` options): only
``num_vectors_per_token`` new token vectors train; UNet and text encoder stay frozen.

A caption names the embedding by ``token_string``; it is tokenized exactly as generation tokenizes a
prompt that uses an embedding file of that name (:func:`baka.generate.prompt.chunk_prompt`: the name's
tokens give way to one placeholder per vector, and the vectors replace the placeholders' token
embeddings), so what trains is what a prompt later gets. The vectors start from ``init_word``'s token
embeddings (cycled to the vector count, as A1111 does). Output: ``emb_params`` in a ``.safetensors``
(kohya) or A1111's ``.pt`` (``string_to_param``), both loaded by baka's and A1111's embeddings folders.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from baka.errors import BakaError


class TrainableEmbedding(nn.Module):
    """The vectors being learnt, and the caption -> (token ids, vector slots) tokenization."""

    def __init__(self, text_encoder: nn.Module, token_string: str, init_word: str, n_vectors: int):
        super().__init__()
        from baka.generate.embeddings import Embedding, EmbeddingDB
        from baka.models.tokenizer import tokenize

        if n_vectors < 1 or n_vectors > 75:
            raise BakaError(f"num_vectors_per_token must be 1-75, not {n_vectors}")
        table = text_encoder.get_input_embeddings().weight
        init_ids = tokenize(init_word) or tokenize("*")
        init = table[torch.tensor([init_ids[i % len(init_ids)] for i in range(n_vectors)])]
        self.name = token_string
        self.vectors = nn.Parameter(init.detach().float().clone())
        self.db = EmbeddingDB(table.shape[1])
        self.db.add(Embedding(token_string, self.vectors, Path(token_string)))

    def tokenize(self, captions: list[str], device, chunks: int = 1) -> torch.Tensor:
        """[B, 2, 77 chunks]: each caption's first ``chunks`` 77-token chunks as generation builds them
        (kohya's max_token_length 150 / 225; short captions padded with the empty chunk), and for each
        position the index of the vector that replaces it (-1: the token's own embedding)."""
        from baka.train.modes import caption_chunks

        rows = []
        for caption in captions:
            ids: list[int] = []
            slots: list[int] = []
            for chunk in caption_chunks(caption, chunks, embeddings=self.db):
                here = [-1] * len(chunk.tokens)
                for pos, emb in chunk.fixes:
                    for k in range(emb.vectors.shape[0]):
                        here[pos + k] = k
                ids += chunk.tokens
                slots += here
            rows.append([ids, slots])
        return torch.tensor(rows, device=device)

    def text_states(self, text_encoder: nn.Module, cond: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """The text encoder's states (``clip_skip`` as generation's; each 77-token chunk encoded alone
        and the states joined) with the vectors in their slots (gradients reach them)."""
        from baka.generate.conditioning import clip_states

        b, n = cond.shape[0], cond.shape[-1] // 77
        ids, slots = (x.reshape(b * n, 77) for x in cond.unbind(1))
        hit = (slots >= 0)[..., None]

        def splice(_module, _inp, out):
            return torch.where(hit, self.vectors[slots.clamp(min=0)].to(out.dtype), out)

        handle = text_encoder.get_input_embeddings().register_forward_hook(splice)
        try:
            z = clip_states(text_encoder, ids, clip_skip)
        finally:
            handle.remove()
        return z.reshape(b, n * 77, z.shape[-1])

    def snapshot(self):
        """The vectors now, as an :class:`~baka.generate.embeddings.Embedding` a generator can use."""
        from baka.generate.embeddings import Embedding

        return Embedding(self.name, self.vectors.detach().clone(), Path(self.name))


def save_embedding(path: Path, name: str, vectors: torch.Tensor, meta: dict[str, str], fmt: str) -> Path:
    """Write ``vectors`` [n, width] atomically: ``fmt`` ``safetensors`` (kohya: ``emb_params``) or ``pt``
    (A1111: ``string_to_param`` under ``*`` and the training step / checkpoint fields)."""
    from baka.models.safetensors_io import atomic_output, save_file

    vectors = vectors.detach().cpu().contiguous()
    if fmt == "safetensors":
        return save_file({"emb_params": vectors}, path.with_suffix(".safetensors"), meta)
    out = path.with_suffix(".pt")
    data = {
        "string_to_token": {"*": 265},  # A1111 writes the "*" token's id here
        "string_to_param": {"*": vectors},
        "name": name,
        "step": int(meta.get("ss_steps", 0)),
        "sd_checkpoint": meta.get("ss_sd_model_hash"),
        "sd_checkpoint_name": meta.get("ss_sd_model_name"),
    }
    with atomic_output(out) as tmp:
        torch.save(data, tmp)
    return out


__all__ = ["TrainableEmbedding", "save_embedding"]
