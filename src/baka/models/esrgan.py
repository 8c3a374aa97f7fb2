"""ESRGAN-family upscaler files (RRDBNet): the original ESRGAN layout, BSRGAN / RealSR and Real-ESRGAN.

The network is Wang et al. 2018 ("ESRGAN", section 3.1): a first conv, ``nb`` residual-in-residual
dense blocks (each three 5-conv dense blocks, growth ``gc``, LeakyReLU 0.2, residuals scaled by 0.2)
and a trunk conv added back to the first conv's features, then per 2x a nearest-neighbour upsample +
conv + LeakyReLU, an HR conv + LeakyReLU and the last conv. Real-ESRGAN's x2 / x1 files take the
picture pixel-unshuffled (12 or 48 input channels; Wang et al. 2021, section 4.3).

Files come in three key layouts, all read into the new (BasicSR) names this module's network uses:
the original ``model.N...`` sequence (``model.1.sub.I.RDBk.convJ.0``), BSRGAN's ``RRDB_trunk`` /
``trunk_conv`` / ``upconvN`` / ``HRconv`` and BasicSR's ``body.I.rdbk.convJ`` / ``conv_body`` /
``conv_upN`` / ``conv_hr``; Real-ESRGAN's ``params_ema`` / ``params`` wrapper and a ``module.``
prefix are unwrapped. The same files A1111 1.10 loads (through spandrel) for its ESRGAN upscalers.
No well-kept library loads them here: spandrel needs torchvision, which cannot sit beside this torch.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from baka.errors import BakaError, ModelFileError
from baka.models.sources import read_raw

SUFFIXES = (".pth", ".pt", ".safetensors")
_SLOPE = 0.2  # LeakyReLU slope, the paper's
_RESIDUAL = 0.2  # residual scaling of dense blocks and RRDBs (section 3.1, "residual scaling")


class _DenseBlock(nn.Module):
    """Five 3x3 convs, each seeing the block input and every earlier output (growth ``gc``)."""

    conv5: nn.Conv2d  # set with its siblings below, under the files' names conv1 .. conv5

    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        for j in range(1, 6):
            out = nf if j == 5 else gc
            setattr(self, f"conv{j}", nn.Conv2d(nf + (j - 1) * gc, out, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for j in range(1, 5):
            feats.append(F.leaky_relu(getattr(self, f"conv{j}")(torch.cat(feats, 1)), _SLOPE))
        return self.conv5(torch.cat(feats, 1)) * _RESIDUAL + x


class _RRDB(nn.Module):
    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (_DenseBlock(nf, gc) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * _RESIDUAL + x


class RRDBNet(nn.Module):
    """ESRGAN's generator; ``unshuffle`` > 1 for Real-ESRGAN's pixel-unshuffled x2 / x1 inputs."""

    def __init__(self, in_nc: int, out_nc: int, nf: int, nb: int, gc: int, ups: int, unshuffle: int = 1):
        super().__init__()
        self.unshuffle = unshuffle
        self.scale = 2**ups // unshuffle
        self.conv_first = nn.Conv2d(in_nc, nf, 3, padding=1)
        self.body = nn.Sequential(*(_RRDB(nf, gc) for _ in range(nb)))
        self.conv_body = nn.Conv2d(nf, nf, 3, padding=1)
        for i in range(1, ups + 1):
            setattr(self, f"conv_up{i}", nn.Conv2d(nf, nf, 3, padding=1))
        self.ups = ups
        self.conv_hr = nn.Conv2d(nf, nf, 3, padding=1)
        self.conv_last = nn.Conv2d(nf, out_nc, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) in [0, 1] -> (1, 3, H * scale, W * scale), clamped to [0, 1]."""
        h, w = x.shape[-2:]
        if self.unshuffle > 1:
            # the sides must divide by 4 (spandrel's size rule for these files): reflect, then repeat
            ph, pw = -h % 4, -w % 4
            rh, rw = min(ph, h - 1), min(pw, w - 1)
            x = F.pad(F.pad(x, (0, rw, 0, rh), "reflect"), (0, pw - rw, 0, ph - rh), "replicate")
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for i in range(1, self.ups + 1):
            up = F.interpolate(feat, scale_factor=2, mode="nearest")
            feat = F.leaky_relu(getattr(self, f"conv_up{i}")(up), _SLOPE)
        out = self.conv_last(F.leaky_relu(self.conv_hr(feat), _SLOPE))
        return out[..., : h * self.scale, : w * self.scale].clamp(0, 1)


_OLD_BLOCK = re.compile(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$")
_BSR_BLOCK = re.compile(r"RRDB_trunk\.(\d+)\.RDB(\d)\.conv(\d)\.(weight|bias)$")
_BSR_NAMES = {"trunk_conv": "conv_body", "HRconv": "conv_hr"}


def to_basicsr(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors under BasicSR's RRDBNet names, whichever of the three layouts ``sd`` uses."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(".conv1x1." in k for k in sd):
        raise BakaError("an ESRGAN+ file (conv1x1 layers), which baka does not load")
    if "conv_first.weight" in sd and "body.0.rdb1.conv1.weight" in sd:
        return sd
    out: dict[str, torch.Tensor] = {}
    if "conv_first.weight" in sd:  # BSRGAN / RealSR
        for k, v in sd.items():
            m = _BSR_BLOCK.match(k)
            stem, _, kind = k.rpartition(".")
            if m:
                out[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = v
            else:
                out[f"{_BSR_NAMES.get(stem, stem.replace('upconv', 'conv_up'))}.{kind}"] = v
        return out
    if "model.0.weight" not in sd or "model.1.sub.0.RDB1.conv1.0.weight" not in sd:
        raise BakaError("not an ESRGAN (RRDBNet) file: no conv_first / model.0 and first dense block")
    # the original sequence: model.0 first conv, model.1 the RRDBs + trunk conv, then for each 2x
    # (upsample, conv, LeakyReLU), the HR conv, LeakyReLU and the last conv
    top = sorted({int(k.split(".")[1]) for k in sd if re.match(r"model\.\d+\.weight$", k)})
    nb = 1 + max(int(m[1]) for k in sd if (m := _OLD_BLOCK.match(k)))
    names = {0: "conv_first", top[-2]: "conv_hr", top[-1]: "conv_last"}
    names.update({n: f"conv_up{i}" for i, n in enumerate(top[1:-2], 1)})
    for k, v in sd.items():
        m = _OLD_BLOCK.match(k)
        parts = k.split(".")
        if m:
            out[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = v
        elif k.startswith(f"model.1.sub.{nb}."):
            out[f"conv_body.{parts[-1]}"] = v
        elif len(parts) == 3 and int(parts[1]) in names:
            out[f"{names[int(parts[1])]}.{parts[2]}"] = v
        else:
            raise BakaError(f"unexpected tensor {k!r} for an ESRGAN file")
    return out


def build(sd: dict[str, torch.Tensor]) -> RRDBNet:
    """The network for BasicSR-named tensors ``sd``, its sizes read from their shapes, weights loaded."""
    nf, in_nc = sd["conv_first.weight"].shape[:2]
    out_nc = sd["conv_last.weight"].shape[0]
    gc = sd["body.0.rdb1.conv1.weight"].shape[0]
    nb = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("body."))
    ups = sum(1 for k in sd if re.match(r"conv_up\d+\.weight$", k))
    # Real-ESRGAN x2 / x1: 4 or 16 times the output's channels come in, pixel-unshuffled
    unshuffle = {out_nc * 4: 2, out_nc * 16: 4}.get(in_nc, 1)
    net = RRDBNet(in_nc, out_nc, nf, nb, gc, ups, unshuffle)
    missing, unexpected = net.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    if missing or unexpected:
        raise BakaError(f"ESRGAN weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return net.eval().requires_grad_(False)


def load_esrgan(path: str | Path) -> RRDBNet:
    """The upscaler network of an ESRGAN-family file (.pth / .pt / .safetensors); one-line errors
    naming the file."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ModelFileError(path, f"not an upscaler file (want {', '.join(SUFFIXES)})")
    try:
        return build(to_basicsr(read_raw(path)[0]))
    except ModelFileError:
        raise
    except BakaError as e:
        raise ModelFileError(path, str(e)) from None
    except (KeyError, ValueError, RuntimeError) as e:
        raise ModelFileError(path, f"not an ESRGAN file ({e})") from None


__all__ = ["RRDBNet", "SUFFIXES", "build", "load_esrgan", "to_basicsr"]
