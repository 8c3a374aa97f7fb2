"""``baka info``: what a model file is, without loading it (kind, dtypes, keys per block, hashes)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from baka.models import detect
from baka.models.config import infer_config
from baka.models.shipped import resolve
from baka.models.sources import open_source


def describe(path: str | Path, *, hashes: bool = True, progress: bool = False) -> dict:
    """Kind, dtypes, key counts per block and hashes of a model file (`baka info`)."""
    from baka.models.blocks import BLOCK_IDS, block_of
    from baka.models.hashes import all_hashes
    from baka.models.safetensors_io import report_leftovers

    path = resolve(path)
    leftovers = report_leftovers(path)  # temp files of interrupted writes, warned even if path is bad
    src = open_source(path)
    with src:
        specs = src.specs()
        meta = dict(getattr(src, "metadata", {}) or {})
    shapes = {k: s.shape for k, s in specs.items()}
    kind = detect.classify(shapes)
    per_block = Counter(block_of(k) for k in specs)
    info: dict = {
        "file": str(path),
        "kind": kind.name,
        "detail": kind.detail,
        "components": kind.components,
        "keys": len(specs),
        "dtypes": dict(Counter(str(s.dtype).replace("torch.", "") for s in specs.values())),
        "parameters": sum(s.numel for s in specs.values()),
        "blocks": {b: per_block.get(b, 0) for b in BLOCK_IDS},
        "outside_blocks": per_block.get(None, 0),
        "metadata_keys": sorted(meta),
    }
    if kind.name == "sd1" and "unet" in kind.components:
        info["size"] = "real-size SD1.x" if infer_config(shapes).is_real_size else "tiny SD1.x topology"
    if hashes and path.is_file():
        info["hashes"] = all_hashes(path, progress=progress)
    info["leftover_temp_files"] = leftovers
    return info


__all__ = ["describe"]
