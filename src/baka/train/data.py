"""Images + captions, aspect-ratio buckets, deterministic resumable batch order, latent cache."""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from baka.errors import BakaError
from baka.train.captions import process_caption
from baka.train.config import DatasetConfig, Subset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def make_buckets(reso: int, min_size: int, max_size: int, step: int) -> list[tuple[int, int]]:
    """kohya's bucket set: every (w, h) with sides multiples of ``step`` in [min, max] and area <= reso^2."""
    area = reso * reso
    side = int(math.sqrt(area) // step) * step
    buckets = {(side, side)}
    w = min_size
    while w <= max_size:
        h = min(max_size, int((area // w) // step) * step)
        if h >= min_size:
            buckets.add((w, h))
            buckets.add((h, w))
        w += step
    return sorted(buckets)


@dataclass(frozen=True)
class Item:
    path: Path
    caption: str
    subset: Subset
    bucket: tuple[int, int]  # (width, height)


def _stable_fraction(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") / 2**64


class Dataset:
    """All images of the subsets, bucketed; ``train`` and ``val`` split deterministically."""

    def __init__(self, cfg: DatasetConfig):
        from PIL import Image

        self.cfg = cfg
        buckets = (
            make_buckets(cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps)
            if cfg.enable_bucket
            else [(cfg.resolution, cfg.resolution)]
        )
        items: list[Item] = []
        for sub in cfg.subsets:
            folder = Path(sub.image_dir)
            if not folder.is_dir():
                raise BakaError(f"{folder}: image folder does not exist")
            for p in sorted(folder.iterdir()):
                if p.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                cap_file = p.with_suffix(sub.caption_extension)
                caption = (
                    cap_file.read_text(encoding="utf-8").strip() if cap_file.exists() else sub.class_tokens
                )
                try:
                    with Image.open(p) as im:
                        w, h = im.size
                except OSError as e:
                    raise BakaError(f"{p}: cannot read image ({e})") from None
                ar = w / h
                bucket = min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - math.log(ar)))
                items.append(Item(p, caption, sub, bucket))
        if not items:
            raise BakaError("no training images found in " + ", ".join(s.image_dir for s in cfg.subsets))
        val = {i.path for i in items if _stable_fraction(str(i.path.name)) < cfg.validation_split}
        if len(val) == len({i.path for i in items}):
            val = set()
        self.val = [i for i in items if i.path in val]
        self.train = [i for i in items if i.path not in val]

    def epoch_batches(
        self, epoch: int, seed: int, world: int = 1, rank: int = 0, accumulation: int = 1
    ) -> list[list[Item]]:
        """This process's batches for ``epoch``: repeats expanded, shuffled within buckets, batches of
        one bucket, batch order shuffled; a function of (seed, epoch) only, so a resume replays it.
        With gradient ``accumulation`` k a batch holds k x batch_size items (one optimizer step's),
        so accumulating k x b sees the same samples as a batch of k b."""
        rng = random.Random(f"{seed}:{epoch}")
        by_bucket: dict[tuple[int, int], list[Item]] = {}
        for it in self.train:
            by_bucket.setdefault(it.bucket, []).extend([it] * it.subset.num_repeats)
        bs = self.cfg.batch_size * accumulation
        batches = []
        for bucket in sorted(by_bucket):
            group = by_bucket[bucket]
            rng.shuffle(group)
            batches += [group[i : i + bs] for i in range(0, len(group), bs)]
        rng.shuffle(batches)
        usable = len(batches) - len(batches) % world
        return batches[rank:usable:world]


def load_image(path: Path, bucket: tuple[int, int]) -> torch.Tensor:
    """RGB image resized to cover the bucket, center-cropped, as a [-1, 1] tensor [3, H, W]."""
    import numpy as np
    from PIL import Image

    w, h = bucket
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = max(w / im.width, h / im.height)
        size = (max(w, round(im.width * scale)), max(h, round(im.height * scale)))
        im = im.resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - w) // 2, (size[1] - h) // 2
        im = im.crop((left, top, left + w, top + h))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class LatentCache:
    """VAE latents per (image, bucket), computed once (the distribution mean, scaled)."""

    def __init__(self, vae, enabled: bool = True):
        self.vae = vae
        self.enabled = enabled
        self._cache: dict[tuple[Path, tuple[int, int], bool], torch.Tensor] = {}

    @torch.no_grad()
    def get(self, items: list[Item], device, flips: list[bool] | None = None) -> torch.Tensor:
        """The latents of ``items`` (``flips``: mirrored ones, kohya's flip_aug; cached apart)."""
        out = []
        for i, it in enumerate(items):
            flip = bool(flips[i]) if flips else False
            key = (it.path, it.bucket, flip)
            lat = self._cache.get(key)
            if lat is None:
                img = load_image(it.path, it.bucket)[None].to(device, self.vae.dtype)
                if flip:
                    img = torch.flip(img, dims=[-1])
                lat = self.vae.encode(img).latent_dist.mean[0] * self.vae.config.scaling_factor
                lat = lat.float().cpu()
                if self.enabled:
                    self._cache[key] = lat
            out.append(lat)
        return torch.stack(out).to(device)


def flips_for(items: list[Item], seed: int, step: int, rank: int) -> list[bool]:
    """kohya's flip_aug: each item of a flip_aug subset mirrored with probability 1/2, drawn from
    (seed, step, rank, slot) so a resume replays it."""
    return [
        it.subset.flip_aug and random.Random(f"{seed}:{step}:{rank}:{i}:flip").random() < 0.5
        for i, it in enumerate(items)
    ]


def captions_for(items: list[Item], seed: int, step: int, rank: int) -> list[str]:
    """Processed captions for a batch; the randomness is a function of (seed, step, rank, slot)."""
    out = []
    for i, it in enumerate(items):
        rng = random.Random(f"{seed}:{step}:{rank}:{i}")
        s = it.subset
        caption = " ".join(x for x in (s.caption_prefix, it.caption, s.caption_suffix) if x)
        out.append(
            process_caption(
                caption,
                rng,
                keep_tokens=s.keep_tokens,
                shuffle=s.shuffle_caption,
                tag_dropout=s.caption_tag_dropout_rate,
                caption_dropout=s.caption_dropout_rate,
                separator=s.caption_separator,
            )
        )
    return out
