"""Models shipped inside the package, usable by name wherever a model path is accepted.

:func:`resolve` is called where model files are opened (``baka.models.io.open_source``), so every
command (generate, merge, train, serve, info) takes ``world-flat`` like a path: an existing path
always wins, and a name is only looked up when no such file or folder exists.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SHIPPED = {
    "world-flat": "world/weights/world-flat.safetensors",
    "world-striped": "world/weights/world-striped.safetensors",
    "world-vpred-ztsnr": "world/weights/world-vpred-ztsnr.safetensors",
}
# LoRAs found by ``<lora:NAME:w>`` when no LoRA folder holds NAME
SHIPPED_NETWORKS = {
    "world-star": "world/weights/lora/world-star.safetensors",
    "world-no-red": "world/weights/lora/world-no-red.safetensors",  # ESD-x "red", extracted as a LoRA
    "world-no-red-u": "world/weights/lora/world-no-red-u.safetensors",  # ESD-u "red", trained as a LoRA
}
# textual-inversion embeddings, for an embeddings folder (``--embeddings``): prompts use them by name
SHIPPED_EMBEDDINGS = {
    "world-azure": "world/weights/embeddings/world-azure.safetensors",
}


def shipped_path(name: str, table: dict[str, str] = SHIPPED) -> Path | None:
    """The packaged file of shipped model ``name`` (``.safetensors`` suffix optional) in ``table``
    (:data:`SHIPPED`, :data:`SHIPPED_NETWORKS` or :data:`SHIPPED_EMBEDDINGS`), or None."""
    key = name[: -len(".safetensors")] if name.endswith(".safetensors") else name
    rel = table.get(key)
    if rel is None:
        return None
    p = Path(str(resources.files("baka").joinpath(rel)))
    return p if p.is_file() else None


def resolve(path: str | Path) -> Path:
    """``path`` itself when it exists (or is not a shipped name), else the shipped file it names."""
    p = Path(path)
    if p.exists() or p.parent != Path("."):
        return p
    return shipped_path(str(path)) or p
