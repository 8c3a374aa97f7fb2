"""Small random ESRGAN-family files in each key layout, from numpy's PCG64 (the same bytes on every
machine): the inputs of tests/test_esrgan.py and of the spandrel / A1111 run that made its table."""

from __future__ import annotations

import numpy as np
import torch

NF, NB, GC = 8, 1, 32  # spandrel builds every RRDB with gc 32


def _conv(rng, cin: int, cout: int, bias: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    w = rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)
    b = bias + 0.01 * rng.standard_normal(cout)
    return torch.tensor(w, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)


def basicsr(seed: int, ups: int, in_nc: int = 3) -> dict[str, torch.Tensor]:
    """BasicSR-named weights: first conv, NB RRDBs, trunk, ``ups`` upconvs, HR and last conv."""
    rng = np.random.default_rng(seed)
    convs = [("conv_first", in_nc, NF)]
    for i in range(NB):
        for k in (1, 2, 3):
            for j in range(1, 6):
                convs.append((f"body.{i}.rdb{k}.conv{j}", NF + (j - 1) * GC, NF if j == 5 else GC))
    convs += [("conv_body", NF, NF)] + [(f"conv_up{u}", NF, NF) for u in range(1, ups + 1)]
    convs += [("conv_hr", NF, NF), ("conv_last", NF, 3)]
    sd = {}
    for name, cin, cout in convs:
        sd[f"{name}.weight"], sd[f"{name}.bias"] = _conv(rng, cin, cout, 0.5 if name == "conv_last" else 0.0)
    return sd


def old_arch(sd: dict[str, torch.Tensor], ups: int) -> dict[str, torch.Tensor]:
    """The original ESRGAN repository's sequence keys (model.0, model.1.sub..., model.3, ...)."""
    top = {"conv_first": 0, **{f"conv_up{u}": 3 * u for u in range(1, ups + 1)}}
    top.update(conv_hr=3 * ups + 2, conv_last=3 * ups + 4)
    out = {}
    for k, v in sd.items():
        stem, kind = k.rsplit(".", 1)
        if stem.startswith("body."):
            _, i, rdb, conv = stem.split(".")
            out[f"model.1.sub.{i}.RDB{rdb[3:]}.{conv}.0.{kind}"] = v
        elif stem == "conv_body":
            out[f"model.1.sub.{NB}.{kind}"] = v
        else:
            out[f"model.{top[stem]}.{kind}"] = v
    return out


def bsrgan(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BSRGAN / RealSR names: RRDB_trunk, trunk_conv, upconvN, HRconv."""
    out = {}
    for k, v in sd.items():
        k = k.replace("conv_body", "trunk_conv").replace("conv_hr", "HRconv").replace("conv_up", "upconv")
        if k.startswith("body."):
            _, i, rdb, rest = k.split(".", 3)
            k = f"RRDB_trunk.{i}.RDB{rdb[3:]}.{rest}"
        out[k] = v
    return out


# layout -> (file name, contents, scale); the file contents as the layout's tools save them
def layouts() -> dict[str, tuple[str, object, int]]:
    return {
        "esrgan-x4": ("esrgan-x4.pth", old_arch(basicsr(1, 2), 2), 4),
        "esrgan-x2": ("esrgan-x2.pth", {"state_dict": old_arch(basicsr(2, 1), 1)}, 2),
        "bsrgan-x4": ("bsrgan-x4.safetensors", bsrgan(basicsr(3, 2)), 4),
        "realesrgan-x4": ("realesrgan-x4.pth", {"params_ema": basicsr(4, 2), "params": basicsr(5, 2)}, 4),
        "realesrgan-x2": ("realesrgan-x2.pth", {"params": basicsr(6, 2, in_nc=12)}, 2),
    }


def picture(w: int = 20, h: int = 14, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def save(name: str, contents: object, folder) -> str:
    from pathlib import Path

    path = Path(folder) / name
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(contents, str(path))  # type: ignore[arg-type]
    else:
        torch.save(contents, path)
    return str(path)
