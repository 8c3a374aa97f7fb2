"""ESRGAN-family model upscalers (``baka.models.esrgan``) run as A1111 1.10 runs them.

A1111 (``modules/upscaler_utils.py``, ``images.split_grid`` / ``combine_grid``) cuts the picture into
``ESRGAN_tile`` squares (192 px by default) overlapping by ``ESRGAN_tile_overlap`` (8), spread evenly
with the last flush to the edge; a picture smaller than a tile is one tile padded with black on the
left / top. Each tile goes through the network as BGR in [0, 1] (the channel order A1111 feeds these
models), comes back clamped and rounded to 8 bits, and the upscaled tiles are pasted row by row:
each tile's first ``overlap`` columns (rows, for whole rows) are blended over what is there with a
linear ramp ``floor(255 i / overlap)``, the rest pasted as is.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from pathlib import Path

import torch

from baka.generate.upscale import Upscaler
from baka.models.esrgan import SUFFIXES, RRDBNet, load_esrgan

TILE, OVERLAP = 192, 8  # A1111 1.10's ESRGAN_tile / ESRGAN_tile_overlap defaults


def model_upscalers(dirs: Iterable[str | Path]) -> dict[str, Path]:
    """Upscaler files in ``dirs`` (and below) by A1111's name for them, the file name without its
    suffix; the first folder wins a name two folders share."""
    found: dict[str, Path] = {}
    for d in map(Path, dirs):
        if d.is_dir():
            for p in sorted(d.rglob("*")):
                if p.suffix.lower() in SUFFIXES and p.is_file():
                    found.setdefault(p.stem, p)
    return found


@functools.lru_cache(maxsize=2)
def _network(path: str, stamp: tuple[int, int]) -> RRDBNet:
    return load_esrgan(path)  # stamp (mtime, size): a rewritten file is loaded again


def model_upscaler(name: str, path: str | Path, tile: int = TILE, overlap: int = OVERLAP) -> Upscaler:
    """The upscaler of one model file; its network is loaded on first use (and kept for the next)."""
    path = Path(path)

    def apply(img, scale: float):
        st = path.stat()
        return tiled_upscale(_network(str(path), (st.st_mtime_ns, st.st_size)), img, tile, overlap)

    return Upscaler(name, False, apply)


def _run(net: RRDBNet, img):
    """One picture through the network: RGB 8-bit in, BGR [0, 1] to the model, 8-bit RGB out."""
    import numpy as np
    from PIL import Image

    x = torch.from_numpy(np.ascontiguousarray(np.asarray(img.convert("RGB"))[:, :, ::-1])).float() / 255
    with torch.inference_mode():
        y = net(x.permute(2, 0, 1)[None])[0]
    out = (y.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)[:, :, ::-1]
    return Image.fromarray(np.ascontiguousarray(out), "RGB")


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets along one side: evenly spread, the last flush with the end (negative when the
    side is shorter than a tile)."""
    n = max(1, math.ceil((size - overlap) / (tile - overlap)))
    step = (size - tile) / (n - 1) if n > 1 else 0
    return [min(int(i * step), size - tile) for i in range(n)]


def _ramp(overlap: int, w: int, h: int, across: bool):
    """A1111's blend mask: 0 .. 255 (floor(255 i / overlap)) along the overlap."""
    import numpy as np
    from PIL import Image

    r = (np.arange(overlap, dtype=np.float32) * 255 / overlap).astype(np.uint8)
    return Image.fromarray(np.tile(r, (h, 1)) if across else np.tile(r[:, None], (1, w)), "L")


def tiled_upscale(net: RRDBNet, img, tile: int = TILE, overlap: int = OVERLAP):
    """``img`` upscaled by ``net`` tile by tile (A1111's grid; ``tile`` <= 0: in one piece)."""
    from PIL import Image
    from tqdm import tqdm

    if tile <= 0:
        return _run(net, img)
    ys, xs = _starts(img.height, tile, overlap), _starts(img.width, tile, overlap)
    s = net.scale
    t, o, width = tile * s, overlap * s, img.width * s
    out = Image.new("RGB", (width, img.height * s))
    n = len(ys) * len(xs)
    with tqdm(total=n, desc="tiled upscale", leave=False, disable=n < 4) as bar:
        for y in ys:
            row = Image.new("RGB", (width, t))
            for x in xs:
                up = _run(net, img.crop((x, y, x + tile, y + tile)))
                bar.update(1)
                if x == 0:
                    row.paste(up, (0, 0))
                    continue
                row.paste(up.crop((0, 0, o, t)), (x * s, 0), mask=_ramp(o, o, t, across=True))
                row.paste(up.crop((o, 0, t, t)), (x * s + o, 0))
            if y == 0:
                out.paste(row, (0, 0))
                continue
            out.paste(row.crop((0, 0, width, o)), (0, y * s), mask=_ramp(o, width, o, across=False))
            out.paste(row.crop((0, o, width, t)), (0, y * s + o))
    return out


__all__ = ["OVERLAP", "TILE", "model_upscaler", "model_upscalers", "tiled_upscale"]
