"""Textual-inversion embeddings: A1111 ``.pt`` (``string_to_param``), ``.safetensors``
(``emb_params``) and diffusers ``.bin`` (``{token: vector}``). An embedding is used where its file
name appears in a prompt or negative prompt (matched on CLIP tokens, as A1111 does)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from baka.errors import ModelFileError

SUFFIXES = (".pt", ".bin", ".safetensors")
log = logging.getLogger("baka.embeddings")


@dataclass
class Embedding:
    name: str
    vectors: torch.Tensor  # [n, width]
    path: Path
    hash: str = ""  # sha256[:12] of the file, as A1111's "TI hashes"


def load_embedding(path: str | Path, width: int | None = None) -> Embedding:
    """Load one embedding file; ``width`` (the text encoder's) is checked when given."""
    from baka.models.ckpt import safe_torch_load
    from baka.models.hashes import sha256_file

    path = Path(path)
    if path.suffix == ".safetensors":
        from baka.models.safetensors_io import SafetensorsFile

        with SafetensorsFile(path) as f:
            data: object = {k: f.get(k).clone() for k in f.keys()}
    else:
        data = safe_torch_load(path)
    vec = _vectors(data)
    if not isinstance(vec, torch.Tensor) or vec.ndim not in (1, 2) or not vec.numel():
        raise ModelFileError(
            path, "not a textual-inversion embedding (no string_to_param / emb_params / token vector)"
        )
    vec = vec.detach().float()
    if vec.ndim == 1:
        vec = vec[None]
    if width is not None and vec.shape[-1] != width:
        hint = " (an SD2.x embedding)" if vec.shape[-1] == 1024 else ""
        raise ModelFileError(
            path, f"embedding is {vec.shape[-1]} wide{hint}; this model's text encoder is {width}"
        )
    return Embedding(path.stem, vec, path, sha256_file(path)[:12])


def _vectors(data: object) -> torch.Tensor | None:
    if not isinstance(data, dict):
        return None
    if "string_to_param" in data and isinstance(data["string_to_param"], dict):
        params = list(data["string_to_param"].values())
        return params[0] if params else None
    if isinstance(data.get("emb_params"), torch.Tensor):
        return data["emb_params"]
    tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
    if len(tensors) == 1 and tensors[0].ndim in (1, 2):  # diffusers: {"<token>": vector}
        return tensors[0]
    return None


def try_load_embedding(path: Path, width: int | None = None) -> Embedding | str:
    """The embedding in ``path``, or one line saying why it cannot be used (hostile, empty,
    truncated, the wrong width): callers scanning a folder skip such a file and go on."""
    try:
        return load_embedding(path, width)
    except Exception as e:  # noqa: BLE001 - one bad file must not take the folder down
        why = str(e) if isinstance(e, ModelFileError) else f"{path}: {type(e).__name__}: {e}"
        return why.splitlines()[0] if why.strip() else f"{path}: unreadable"


class EmbeddingDB:
    """Embeddings from folders, looked up by the CLIP tokens of their names."""

    def __init__(self, width: int):
        self.width = width
        self.by_name: dict[str, Embedding] = {}
        self._by_first: dict[int, list[tuple[list[int], Embedding]]] = {}
        self.skipped: dict[str, str] = {}  # path -> why it was not loaded (one line naming the file)

    def add(self, emb: Embedding) -> None:
        from baka.models.tokenizer import tokenize

        ids = tokenize(emb.name)
        self.by_name[emb.name] = emb
        entries = self._by_first.setdefault(ids[0], [])
        entries.append((ids, emb))
        entries.sort(key=lambda e: -len(e[0]))  # longest name first

    def load_dir(self, folder: str | Path) -> list[str]:
        """Load every embedding file in ``folder``; returns the names loaded.

        A file that cannot be used (hostile, empty, truncated, the wrong width) is skipped with one
        warning naming it, as A1111 does, and recorded in :attr:`skipped`; the rest still load.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelFileError(folder, "embeddings folder does not exist")
        names = []
        for p in sorted(folder.iterdir()):
            if p.suffix in SUFFIXES and p.is_file():
                emb = try_load_embedding(p, self.width)
                if isinstance(emb, str):
                    self.skipped[str(p)] = emb
                    log.warning("baka: warning: skipped embedding %s", emb)
                    continue
                self.skipped.pop(str(p), None)
                self.add(emb)
                names.append(p.stem)
        return names

    def find(self, ids: list[int], i: int) -> tuple[Embedding, int] | None:
        for name_ids, emb in self._by_first.get(ids[i], ()):
            if ids[i : i + len(name_ids)] == name_ids:
                return emb, len(name_ids)
        return None
