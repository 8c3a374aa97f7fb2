"""ESRGAN-family upscaling speed: baka's A1111-style tiled run against one plain forward of the same
network (the peer: what the tiles cost over the picture in one piece). Real ESRGAN size (64 filters,
23 RRDBs, x4, 16.7M parameters), random weights; no file is read.

    .venv/bin/python bench/esrgan_bench.py [--side 384] [--tile 192] [--overlap 8]

spandrel (what A1111 1.10 loads these files with) cannot be the peer here: it needs torchvision,
which does not install beside this torch; tests/test_esrgan.py holds baka equal to it instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=384, help="picture side in pixels (default: 384)")
    ap.add_argument("--tile", type=int, default=192, help="A1111's ESRGAN_tile (default: 192)")
    ap.add_argument("--overlap", type=int, default=8, help="A1111's ESRGAN_tile_overlap (default: 8)")
    a = ap.parse_args()
    import numpy as np
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import esrgan_files as ef

    from baka.generate.model_upscale import tiled_upscale
    from baka.models.esrgan import build

    ef.NF, ef.NB = 64, 23  # ESRGAN's and Real-ESRGAN x4plus's sizes
    net = build(ef.basicsr(0, 2))
    img = ef.picture(a.side, a.side)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    t = time.perf_counter()
    with torch.inference_mode():
        net(x)
    plain = time.perf_counter() - t
    t = time.perf_counter()
    tiled_upscale(net, img, a.tile, a.overlap)
    tiled = time.perf_counter() - t
    params = sum(p.numel() for p in net.parameters()) / 1e6
    print(f"ESRGAN x4, {params:.1f}M parameters, {a.side}x{a.side} -> {4 * a.side}x{4 * a.side},"
          f" {torch.get_num_threads()} threads")  # fmt: skip
    print("| run | seconds | vs one plain forward |\n|---|---|---|")
    print(f"| one plain forward (peer) | {plain:.1f} | 1.00x |")
    print(f"| baka, A1111 tiles {a.tile} / overlap {a.overlap} | {tiled:.1f} | {tiled / plain:.2f}x |")


if __name__ == "__main__":
    main()
