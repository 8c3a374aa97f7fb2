"""Images + captions, aspect-ratio buckets, deterministic resumable batch order, latent cache."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from baka.errors import BakaError
from baka.train.augment import Aug, apply_color, crop_offset
from baka.train.captions import process_caption
from baka.train.config import DatasetConfig, Subset
from baka.train.everydream import NO_OPTIONS, FolderFiles, ImageOptions, weighted_tags

log = logging.getLogger(__name__)

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
    # times per epoch: num_repeats x EveryDream2's multiply.txt (a fraction is drawn per epoch); for
    # regularisation images, kohya's balancing against the training images
    repeats: float = 1.0
    options: ImageOptions = NO_OPTIONS  # EveryDream2's folder and sidecar files


def _stable_fraction(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") / 2**64


def _image_files(sub: Subset) -> list[Path]:
    folder = Path(sub.image_dir)
    if not folder.is_dir():
        raise BakaError(f"{folder}: image folder does not exist")
    found = folder.rglob("*") if sub.recursive else folder.iterdir()
    return sorted(
        p
        for p in found
        if p.suffix.lower() in IMAGE_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def balance_reg(train_total: float, reg: list[Item]) -> list[Item]:
    """kohya's regularisation balancing: reg images are taken in order with their repeats until they
    match the training images (repeats included); then one more repeat each, in order, until they do.
    With more reg than training images the last ones are left out (kohya warns, so does baka)."""
    target = math.floor(train_total + 1e-9)
    repeats: list[int] = []
    n = 0
    for it in reg:  # first pass: whole images with their subset's repeats
        if n >= target:
            break
        repeats.append(it.subset.num_repeats)
        n += it.subset.num_repeats
    while repeats and n < target:  # then one repeat more each, in order
        for i in range(len(repeats)):
            if n >= target:
                break
            repeats[i] += 1
            n += 1
    if len(repeats) < len(reg):
        unused = len(reg) - len(repeats)
        log.warning("baka: warning: more regularisation than training images; %d not used", unused)
    return [dataclasses.replace(it, repeats=float(r)) for it, r in zip(reg, repeats, strict=False)]


class Dataset:
    """All images of the subsets, bucketed; ``train`` and ``val`` split deterministically (regularisation
    images always train). An unreadable image is skipped with a warning."""

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
            files = _image_files(sub)
            ed2 = FolderFiles(Path(sub.image_dir))
            n_captions = 0
            for p in files:
                cap_file = p.with_suffix(sub.caption_extension)
                if cap_file.exists():
                    caption = cap_file.read_text(encoding="utf-8").strip()
                    n_captions += 1
                else:
                    caption = sub.class_tokens
                # ED2's last resort (Dataset.__ensure_caption): "a photo of ted, smiling_2.jpg"
                fallback = p.stem.split("_")[0] if sub.caption_from_filename else ""
                caption, opts = ed2.resolve(p, caption, fallback)
                try:
                    with Image.open(p) as im:
                        w, h = im.size
                except OSError as e:
                    log.warning("baka: warning: %s: cannot read image (%s); skipped", p, e)
                    continue
                ar = w / h
                bucket = min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - math.log(ar)))
                items.append(Item(p, caption, sub, bucket, sub.num_repeats * opts.multiply, opts))
            if files and not n_captions and any(p.with_suffix(".caption").exists() for p in files):
                # kohya's default caption_extension is ".caption"; baka's is ".txt" (A1111's, ED2's)
                log.warning(
                    "baka: warning: %s has .caption files but no %s captions; set caption_extension = "
                    '".caption"',
                    sub.image_dir,
                    sub.caption_extension,
                )
        if not any(not i.subset.is_reg for i in items):
            raise BakaError(
                "no training images found in " + ", ".join(s.image_dir for s in cfg.subsets if not s.is_reg)
            )
        plain = [i for i in items if not i.subset.is_reg]
        val = {i.path for i in plain if _stable_fraction(str(i.path.name)) < cfg.validation_split}
        if len(val) == len({i.path for i in plain}):
            val = set()
        self.val = [i for i in plain if i.path in val]
        train = [i for i in plain if i.path not in val]
        self.reg_found = [i for i in items if i.subset.is_reg]  # as found (kohya's ss_num_reg_images)
        self.reg = balance_reg(sum(i.repeats for i in train), self.reg_found)
        self.train = train + self.reg

    def epoch_batches(
        self, epoch: int, seed: int, world: int = 1, rank: int = 0, accumulation: int = 1
    ) -> list[list[Item]]:
        """This process's batches for ``epoch``: repeats expanded, shuffled within buckets, batches of
        one bucket, batch order shuffled; a function of (seed, epoch) only, so a resume replays it.
        A fractional repeat count (EveryDream2's multiply.txt) gives its whole part, and the epoch is
        filled to floor(total) by drawing the fractions as EveryDream2 does.
        With gradient ``accumulation`` k a batch holds k x batch_size items (one optimizer step's),
        so accumulating k x b sees the same samples as a batch of k b. Images with an EveryDream2
        ``batch_id`` are batched only with each other (micro-batches of whole batch_size)."""
        rng = random.Random(f"{seed}:{epoch}")
        by_bucket: dict[tuple[int, int], list[Item]] = {}
        named: dict[tuple[str, tuple[int, int]], list[Item]] = {}
        for it in self.train:
            group = named.setdefault((it.options.batch_id, it.bucket), []) if it.options.batch_id else None
            (by_bucket.setdefault(it.bucket, []) if group is None else group).extend(
                [it] * math.floor(it.repeats)
            )
        for it in _fractional_picks(self.train, rng):
            key = (it.options.batch_id, it.bucket)
            (named[key] if it.options.batch_id else by_bucket.setdefault(it.bucket, [])).append(it)
        b, bs = self.cfg.batch_size, self.cfg.batch_size * accumulation
        batches = []
        # EveryDream2's batch_id: a named group's batches hold only its images; the images left over
        # when the group is not a whole number of batches join the shared batches of their bucket
        for key in sorted(named):
            group = named[key]
            rng.shuffle(group)
            cut = len(group) - len(group) % b
            by_bucket.setdefault(key[1], []).extend(group[cut:])
            batches += [group[i : min(i + bs, cut)] for i in range(0, cut, bs)]
        for bucket in sorted(by_bucket):
            group = by_bucket[bucket]
            rng.shuffle(group)
            batches += [group[i : i + bs] for i in range(0, len(group), bs)]
        rng.shuffle(batches)
        usable = len(batches) - len(batches) % world
        return batches[rank:usable:world]


def _fractional_picks(items: list[Item], rng: random.Random) -> list[Item]:
    """EveryDream2's fill of an epoch (data_loader's multiplied set): the epoch holds floor(sum of
    repeats) items; passes over the items with a fractional part add each at most once, with
    probability its fraction, until it is full. No draw at all when every count is whole."""
    frac = [(it, it.repeats - math.floor(it.repeats)) for it in items]
    frac = [(it, f) for it, f in frac if f > 1e-9]
    if not frac:
        return []
    whole = sum(math.floor(it.repeats) for it in items)
    remaining = math.floor(sum(it.repeats for it in items) + 1e-9) - whole
    picked: list[Item] = []
    left = dict(enumerate(f for _, f in frac))
    while remaining > 0 and left:
        for i in list(left):
            if rng.random() < left[i]:
                picked.append(frac[i][0])
                del left[i]
                remaining -= 1
                if remaining <= 0:
                    break
    return picked


def load_image(path: Path, bucket: tuple[int, int], aug: Aug | None = None) -> torch.Tensor:
    """RGB image resized to cover the bucket and cropped to it (at the centre, or where ``aug``'s
    random crop says), colour-augmented and mirrored as ``aug`` says, as a [-1, 1] tensor [3, H, W]."""
    import numpy as np
    from PIL import Image

    w, h = bucket
    aug = aug or Aug()
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = max(w / im.width, h / im.height)
        size = (max(w, round(im.width * scale)), max(h, round(im.height * scale)))
        im = im.resize(size, Image.Resampling.BICUBIC)
        fx, fy = aug.crop if aug.crop is not None else (None, None)
        left, top = crop_offset(size[0] - w, fx), crop_offset(size[1] - h, fy)
        im = im.crop((left, top, left + w, top + h))
        rgb = apply_color(np.asarray(im), aug)
    arr = rgb.astype(np.float32) / 127.5 - 1.0
    x = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    return torch.flip(x, dims=[-1]) if aug.flip else x


def vae_fingerprint(vae) -> str:
    """sha256 over the VAE's weights: a disk cache entry is only reused by the same VAE."""
    from baka.models.safetensors_io import tensor_bytes

    h = hashlib.sha256()
    for name, t in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


class LatentCache:
    """VAE latents per (image, bucket, mirrored), computed once (the distribution mean, scaled);
    randomly cropped or colour-changed images are encoded each time.

    With ``disk`` (kohya's ``cache_latents_to_disk``) latents live in that folder, one small safetensors
    file each, and not in memory, so a dataset larger than memory trains; an entry's name hashes the
    image's path, size and modification time, the bucket, the mirroring and the VAE's weights, so a
    changed image or another VAE never reads a stale latent. Files are written atomically."""

    def __init__(self, vae, enabled: bool = True, disk: Path | None = None):
        self.vae = vae
        self.enabled = enabled
        self._cache: dict[tuple[Path, tuple[int, int], bool], torch.Tensor] = {}
        self.disk = Path(disk) if disk is not None else None
        self._vae_id = vae_fingerprint(vae) if disk is not None else ""
        if self.disk is not None:
            from baka.models.safetensors_io import clean_stale_parts

            self.disk.mkdir(parents=True, exist_ok=True)
            clean_stale_parts(self.disk)

    def _disk_path(self, key: tuple[Path, tuple[int, int], bool]) -> Path:
        assert self.disk is not None
        path, bucket, flip = key
        st = path.stat()
        text = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{bucket}|{flip}|{self._vae_id}"
        return self.disk / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.safetensors"

    def _lookup(self, key) -> torch.Tensor | None:
        if self.disk is None:
            return self._cache.get(key)
        f = self._disk_path(key)
        if not f.exists():
            return None
        from safetensors.torch import load_file

        try:
            return load_file(str(f))["latent"]
        except Exception:  # a damaged entry is recomputed (and rewritten)
            log.warning("baka: warning: %s: unreadable latent cache entry; recomputed", f)
            return None

    def _store(self, key, lat: torch.Tensor) -> None:
        if self.disk is None:
            self._cache[key] = lat
            return
        from safetensors.torch import save

        from baka.models.safetensors_io import atomic_output

        with atomic_output(self._disk_path(key), clean=False) as tmp:
            tmp.write_bytes(save({"latent": lat.contiguous()}))

    @torch.no_grad()
    def get(self, items: list[Item], device, augs: list[Aug] | None = None) -> torch.Tensor:
        """The latents of ``items`` with their augmentations (:func:`baka.train.augment.augments_for`)."""
        out = []
        for i, it in enumerate(items):
            aug = augs[i] if augs else Aug()
            key = (it.path, it.bucket, aug.flip)
            cached = self.enabled and aug.cacheable
            lat = self._lookup(key) if cached else None
            if lat is None:
                img = load_image(it.path, it.bucket, aug)[None].to(device, self.vae.dtype)
                lat = self.vae.encode(img).latent_dist.mean[0] * self.vae.config.scaling_factor
                lat = lat.float().cpu()
                if cached:
                    self._store(key, lat)
            out.append(lat)
        return torch.stack(out).to(device)


def captions_for(items: list[Item], seed: int, step: int, rank: int) -> list[str]:
    """Processed captions for a batch; the randomness is a function of (seed, step, rank, slot).
    EveryDream2's shuffle (``shuffle_tags``) keeps the first part (its main prompt) in place, and tags
    with differing weights are drawn by ED2's weighted shuffle (:func:`weighted_tags`)."""
    out = []
    for i, it in enumerate(items):
        rng = random.Random(f"{seed}:{step}:{rank}:{i}")
        s, o = it.subset, it.options
        caption, shuffle, keep = it.caption, s.shuffle_caption, s.keep_tokens
        if o.shuffle_tags and o.weighted:  # ED2's caption structure: main prompt, tags drawn by weight
            values, weights = [t.value for t in o.weighted], [t.weight for t in o.weighted]
            tags = weighted_tags(o.main_prompt, values, weights, o.max_caption_length, rng)
            caption, shuffle = ", ".join([o.main_prompt, *tags] if o.main_prompt else tags), False
            keep = max(keep, 1 if o.main_prompt else 0)
        elif o.shuffle_tags:  # ED2 shuffles the tags after the first part (its main prompt)
            shuffle, keep = True, max(keep, 1)
        caption = " ".join(x for x in (s.caption_prefix, caption, s.caption_suffix) if x)
        out.append(
            process_caption(
                caption,
                rng,
                keep_tokens=keep,
                shuffle=shuffle,
                tag_dropout=s.caption_tag_dropout_rate,
                caption_dropout=s.caption_dropout_rate if o.cond_dropout is None else o.cond_dropout,
                separator=s.caption_separator,
            )
        )
    return out
