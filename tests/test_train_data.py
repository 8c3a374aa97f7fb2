"""The trainer's dataset features from kohya and EveryDream2: regularisation images (is_reg,
prior_loss_weight, kohya's repeat balancing), the "10_name" folder layout (train_data_dir /
reg_data_dir), random_crop, color_aug, EveryDream2's multiply.txt and recursive folders, bad files."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

from baka.errors import BakaError
from baka.train.augment import Aug, augments_for, crop_offset, hue_shift, kohya_gamma
from baka.train.config import DatasetConfig, Subset, load_config
from baka.train.data import Dataset, Item, LatentCache, balance_reg, load_image
from baka.train.trainer import train


def _image(path, color="red", size=(64, 64), caption=None):
    im = Image.new("RGB", size, "white")
    ImageDraw.Draw(im).ellipse([8, 8, 56, 56], fill=color)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


def _items(n, repeats, reg=True):
    sub = Subset(image_dir="r", num_repeats=repeats, is_reg=reg)
    return [Item(Path(f"r/{i}.png"), "", sub, (64, 64), float(repeats)) for i in range(n)]


@pytest.mark.parametrize(
    "train_total, reg_images, reg_repeats, want",
    [
        # hand-computed from kohya's DreamBoothDataset: first pass takes whole images with their
        # repeats until the count reaches the training images, then +1 each in order until it does
        (10, 3, 1, [4, 3, 3]),
        (7, 2, 2, [4, 3]),
        (3, 1, 5, [5]),  # one image already over: no extra
        (2, 5, 1, [1, 1]),  # more reg than training images: the last three are left out
        (6, 3, 2, [2, 2, 2]),
    ],
)
def test_kohya_reg_balancing(train_total, reg_images, reg_repeats, want):
    got = balance_reg(train_total, _items(reg_images, reg_repeats))
    assert [it.repeats for it in got] == want


def test_reg_images_train_with_prior_loss_weight_and_metadata(tmp_path, tiny_files, monkeypatch, caplog):
    """kohya's folder layout: train_data_dir/N_tokens and reg_data_dir/N_tokens; other folders skipped
    with a warning; reg images never in the validation split; their losses weighted by prior_loss_weight;
    kohya's ss_* fields (reg dirs apart, images x repeats)."""
    import baka.train.trainer as trainer_mod

    for i, c in enumerate(("red", "blue")):
        _image(tmp_path / "img" / "3_sks circle" / f"a{i}.png", c)  # no caption files: class tokens
    _image(tmp_path / "img" / "notes" / "x.png")  # no repeat count: skipped
    for i in range(4):
        _image(tmp_path / "reg" / "1_circle" / f"r{i}.png", "green", caption="green circle")
    (tmp_path / "t.toml").write_text(
        f'model = "{tiny_files[0]}"\noutput_dir = "{tmp_path / "out"}"\nmax_steps = 4\nmode = "lora"\n'
        'train_data_dir = "img"\nreg_data_dir = "reg"\nprior_loss_weight = 0.25\n'
        'resolution = "64"\ntrain_batch_size = 4\nenable_bucket = false\nflip_aug = true\n'
        "[network]\ndim = 4\nalpha = 4\n"
    )
    with caplog.at_level(logging.WARNING):
        cfg = load_config(tmp_path / "t.toml")
    assert "notes: no repeat count" in caplog.text
    subs = {(s.num_repeats, s.class_tokens, s.is_reg) for s in cfg.dataset.subsets}
    assert subs == {(3, "sks circle", False), (1, "circle", True)}
    assert cfg.dataset.batch_size == 4 and cfg.dataset.resolution == 64 and cfg.dataset.subsets[0].flip_aug
    ds = Dataset(cfg.dataset)
    # 2 images x 3 repeats = 6 training samples: the 4 reg images get 2, 2, 1, 1 repeats
    assert sorted(it.repeats for it in ds.reg) == [1, 1, 2, 2]
    assert sum(len(b) for b in ds.epoch_batches(0, 0)) == 12
    seen = []
    real = trainer_mod.diffusion_loss

    def spy(*a, sample_weights=None, **k):
        seen.append(None if sample_weights is None else sample_weights.tolist())
        return real(*a, sample_weights=sample_weights, **k)

    monkeypatch.setattr(trainer_mod, "diffusion_loss", spy)
    res = train(cfg, progress=False)
    assert all(w is not None and set(w) <= {1.0, 0.25} and 0.25 in w for w in seen if w is not None)
    assert any(w is not None for w in seen)
    with safe_open(str(res.output), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["ss_dataset_dirs"]) == {"3_sks circle": {"n_repeats": 3, "img_count": 2}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_circle": {"n_repeats": 1, "img_count": 4}}
    assert (meta["ss_num_train_images"], meta["ss_num_reg_images"]) == ("6", "4")
    assert (meta["ss_prior_loss_weight"], meta["ss_flip_aug"], meta["ss_color_aug"]) == (
        "0.25",
        "True",
        "False",
    )


def test_prior_loss_weight_scales_each_samples_loss():
    from baka.train.loss import ddpm_schedule, diffusion_loss

    class Zero(torch.nn.Module):
        def forward(self, x, t, cond):
            return torch.zeros_like(x)

    sched = ddpm_schedule({}, False, "cpu")
    lat = torch.zeros(2, 4, 2, 2)
    noise = torch.stack([torch.full((4, 2, 2), 1.0), torch.full((4, 2, 2), 2.0)])
    t = torch.tensor([10, 10])
    plain = diffusion_loss(Zero(), lat, None, noise, t, sched)
    weighted = diffusion_loss(Zero(), lat, None, noise, t, sched, sample_weights=torch.tensor([1.0, 0.25]))
    assert plain.item() == pytest.approx((1 + 4) / 2) and weighted.item() == pytest.approx((1 + 4 * 0.25) / 2)


def test_folder_layout_errors(tmp_path, tiny_files):
    _image(tmp_path / "img" / "2_x" / "a.png")
    base = f'model = "{tiny_files[0]}"\n'
    cases = [
        ('reg_data_dir = "img"\n', "'reg_data_dir' goes with train_data_dir"),
        (
            "train_batch_size = 2\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'img'\n",
            "goes with train_data_dir",
        ),
        ('train_data_dir = "nowhere"\n', "nowhere is not a folder"),
        ('train_data_dir = "img/2_x"\n', "has no 'N_name' image folders"),
        ('train_data_dir = "img"\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "img"\n', "keep one"),
        ('train_data_dir = "img"\nprior_loss_weight = -1\n', "prior_loss_weight must be >= 0"),
    ]
    for text, match in cases:
        (tmp_path / "t.toml").write_text(base + text)
        with pytest.raises(BakaError, match=match):
            load_config(tmp_path / "t.toml")


def test_everydream_multiply_and_recursive_folders(tmp_path):
    """multiply.txt: the whole part repeats every epoch; the epoch is filled to floor(total) by drawing
    fractions (EveryDream2's data loader); a folder's file applies to its own images only."""
    root = tmp_path / "data"
    for i in range(3):
        _image(root / f"a{i}.png", caption="a")
    (root / "multiply.txt").write_text("1.5\n")
    _image(root / "sub" / "b.png", caption="b")
    (root / "sub" / "multiply.txt").write_text("2")
    _image(root / ".hidden" / "c.png", caption="c")
    cfg = DatasetConfig([Subset(str(root), recursive=True)], resolution=64, enable_bucket=False, batch_size=1)
    ds = Dataset(cfg)
    assert sorted((it.path.name, it.repeats) for it in ds.train) == [
        ("a0.png", 1.5), ("a1.png", 1.5), ("a2.png", 1.5), ("b.png", 2.0)
    ]  # fmt: skip
    picks = []
    for epoch in range(30):
        names = Counter(b[0].path.name for b in ds.epoch_batches(epoch, 0))
        assert sum(names.values()) == 6 and names["b.png"] == 2  # floor(4.5) + 2
        assert all(names[f"a{i}.png"] in (1, 2) for i in range(3))
        picks.append(next(n for n, c in names.items() if c == 2 and n != "b.png"))
        assert ds.epoch_batches(epoch, 0) == ds.epoch_batches(epoch, 0)
    assert len(set(picks)) == 3  # the extra copy moves between epochs
    flat = Dataset(DatasetConfig([Subset(str(root))], resolution=64, enable_bucket=False))
    assert sorted(it.path.name for it in flat.train) == ["a0.png", "a1.png", "a2.png"]
    (root / "multiply.txt").write_text("lots")
    with pytest.raises(BakaError, match=r"multiply.txt: not a number \('lots'\)"):
        Dataset(cfg)


def test_bad_image_is_skipped_and_caption_extension_hint(tmp_path, caplog):
    root = tmp_path / "d"
    _image(root / "good.png")
    (root / "good.caption").write_text("red circle")
    (root / "broken.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING):
        ds = Dataset(DatasetConfig([Subset(str(root))], resolution=64, enable_bucket=False))
    assert [it.path.name for it in ds.train] == ["good.png"]
    assert "broken.png: cannot read image" in caplog.text
    assert 'has .caption files but no .txt captions; set caption_extension = ".caption"' in caplog.text


@pytest.mark.parametrize(
    "spare, frac, want",
    [(10, None, 5), (11, None, 5), (10, 0.0, 0), (10, 0.999, 10), (10, 0.5, 5), (0, 0.7, 0)],
)
def test_crop_offsets(spare, frac, want):
    # kohya: trim // 2 at the centre, random.randint(0, trim) for random_crop (both ends reachable)
    assert crop_offset(spare, frac) == want


def test_random_crop_moves_the_window_and_is_never_cached(tmp_path, tiny_files):
    from baka.models.io import load_checkpoint
    from baka.models.pipeline import build_module

    im = Image.new("RGB", (128, 64), "black")
    ImageDraw.Draw(im).rectangle([0, 0, 63, 63], fill="white")  # left half white
    im.save(tmp_path / "w.png")
    left = load_image(tmp_path / "w.png", (64, 64), Aug(crop=(0.0, 0.0)))
    right = load_image(tmp_path / "w.png", (64, 64), Aug(crop=(0.999, 0.0)))
    centre = load_image(tmp_path / "w.png", (64, 64))
    assert left.min() == 1.0 and right.max() == -1.0
    assert (centre[0] > 0).sum() == 32 * 64  # half and half
    ck = load_checkpoint(tiny_files[0])
    vae = build_module("vae", ck.config, ck.components()["vae"])
    cache = LatentCache(vae)
    sub = Subset(str(tmp_path), random_crop=True)
    it = Item(tmp_path / "w.png", "", sub, (64, 64))
    a = cache.get([it], "cpu", [Aug(crop=(0.0, 0.0))])
    b = cache.get([it], "cpu", [Aug(crop=(0.999, 0.0))])
    assert not torch.allclose(a, b) and not cache._cache
    augs = [augments_for([it], 0, s, 0)[0] for s in range(50)]
    assert all(a.crop is not None for a in augs) and len({a.crop for a in augs}) == 50


def test_kohya_gamma_table():
    # kohya: np.clip(image ** gamma, 0, 255).astype(np.uint8) on the 0-255 values
    v = np.array([[[0, 1, 100]], [[200, 255, 50]]], dtype=np.uint8)
    assert kohya_gamma(v, 1.05).tolist() == [[[0, 1, 125]], [[255, 255, 60]]]
    assert kohya_gamma(v, 0.95).tolist() == [[[0, 1, 79]], [[153, 193, 41]]]


@pytest.mark.parametrize(
    "rgb, shift, want",
    [
        ((255, 0, 0), 8.0, (255, 68, 0)),  # +16 degrees
        ((255, 0, 0), -8.0, (255, 0, 68)),
        ((255, 0, 0), 90.0, (0, 255, 255)),  # half a turn: cyan
        ((0, 128, 0), 30.0, (0, 128, 128)),  # green (120 degrees) + 60: cyan at value 128
        ((128, 128, 128), 8.0, (128, 128, 128)),  # grey has no hue
    ],
)
def test_hue_shift_table(rgb, shift, want):
    got = hue_shift(np.array([[rgb]], dtype=np.uint8), shift)[0, 0]
    assert tuple(int(x) for x in got) == want


def test_hue_shift_zero_is_identity_and_color_aug_rates():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert np.abs(hue_shift(img, 0.0).astype(int) - img).max() <= 1
    it = Item(Path("x.png"), "", Subset("d", color_aug=True), (64, 64))
    augs = [augments_for([it], 0, s, 0)[0] for s in range(3000)]
    hue = [a.hue for a in augs if a.hue is not None]
    gam = [a.gamma for a in augs if a.gamma is not None]
    # kohya: p 0.33 of a change, then hue or gamma with equal odds; hue in +-8, gamma in [0.95, 1.05]
    assert 0.30 < (len(hue) + len(gam)) / 3000 < 0.36 and 0.4 < len(hue) / (len(hue) + len(gam)) < 0.6
    assert max(map(abs, hue)) <= 8 and min(gam) >= 0.95 and max(gam) <= 1.05
    assert augs == [augments_for([it], 0, s, 0)[0] for s in range(3000)]  # replayable
    assert not any(a.crop or a.flip for a in augs)


def test_random_crop_color_aug_train_end_to_end(tmp_path, tiny_files):
    root = tmp_path / "d"
    for i, c in enumerate(("red", "blue", "green", "yellow")):
        _image(root / f"i{i}.png", c, size=(96, 64), caption=f"{c} circle")
    (tmp_path / "t.toml").write_text(
        f'model = "{tiny_files[0]}"\noutput_dir = "{tmp_path / "out"}"\nmax_steps = 3\nmode = "lora"\n'
        "[network]\ndim = 4\nalpha = 4\n"
        "[[datasets]]\nresolution = 64\nenable_bucket = false\nbatch_size = 2\n"
        f"[[datasets.subsets]]\nimage_dir = {json.dumps(str(root))}\nrandom_crop = true\ncolor_aug = true\n"
    )
    res = train(load_config(tmp_path / "t.toml"), progress=False)
    assert len(res.losses) == 3 and all(np.isfinite(res.losses))
    with safe_open(str(res.output), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_random_crop"], meta["ss_color_aug"], meta["ss_num_reg_images"]) == ("True", "True", "0")


def _vae(tiny_files):
    from baka.models.io import load_checkpoint
    from baka.models.pipeline import build_module

    ck = load_checkpoint(tiny_files[0])
    return build_module("vae", ck.config, ck.components()["vae"])


def test_latent_cache_on_disk(tmp_path, tiny_files, monkeypatch, caplog):
    """kohya's cache_latents_to_disk: one file per (image, bucket, mirrored), reused by a later run,
    recomputed when the image or the VAE changes or the entry is damaged."""
    root = tmp_path / "d"
    for i, c in enumerate(("red", "blue")):
        _image(root / f"i{i}.png", c)
    items = Dataset(DatasetConfig([Subset(str(root))], resolution=64, enable_bucket=False)).train
    vae = _vae(tiny_files)
    first = LatentCache(vae, disk=tmp_path / "cache").get(items, "cpu", [Aug(), Aug(flip=True)])
    files = sorted((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 2 and not list((tmp_path / "cache").glob("*.part"))
    calls = []
    real = vae.encode
    monkeypatch.setattr(vae, "encode", lambda x: calls.append(1) or real(x))
    again = LatentCache(vae, disk=tmp_path / "cache")  # a new run: nothing in memory
    assert torch.equal(again.get(items, "cpu", [Aug(), Aug(flip=True)]), first) and not calls
    assert torch.equal(
        again.get(items[:1], "cpu", [Aug(flip=True)]), again.get(items[:1], "cpu", [Aug(flip=True)])
    )
    assert len(calls) == 1  # the mirrored first image was new, then read back
    _image(root / "i0.png", "green")  # the image changes: its entries are stale
    assert not torch.equal(again.get(items[:1], "cpu")[0], first[0]) and len(calls) == 2
    with torch.no_grad():
        next(vae.parameters()).add_(0.01)  # another VAE: nothing reused
    LatentCache(vae, disk=tmp_path / "cache").get(items[1:], "cpu")
    assert len(calls) == 3
    for f in (tmp_path / "cache").glob("*.safetensors"):
        f.write_bytes(b"damaged")
    with caplog.at_level(logging.WARNING):
        LatentCache(vae, disk=tmp_path / "cache").get(items[1:], "cpu")
    assert "unreadable latent cache entry; recomputed" in caplog.text and len(calls) == 4


def _train_toml(tmp_path, tiny_files, root, extra="", subset=""):
    out = tmp_path / f"out{len(list(tmp_path.glob('t*.toml')))}"
    path = tmp_path / f"t{len(list(tmp_path.glob('t*.toml')))}.toml"
    path.write_text(
        f'model = "{tiny_files[0]}"\noutput_dir = "{out}"\nmax_steps = 3\nmode = "lora"\n{extra}'
        "[network]\ndim = 4\nalpha = 4\n"
        "[[datasets]]\nresolution = 64\nenable_bucket = false\nbatch_size = 2\n"
        f"[[datasets.subsets]]\nimage_dir = {json.dumps(str(root))}\n{subset}"
    )
    return path


def test_disk_latents_and_text_encoder_cache_train_the_same(tmp_path, tiny_files):
    root = tmp_path / "d"
    for i, c in enumerate(("red", "blue", "green", "yellow")):
        _image(root / f"i{i}.png", c, caption=f"{c} circle")
    plain = train(load_config(_train_toml(tmp_path, tiny_files, root)), progress=False)
    cfg = load_config(
        _train_toml(
            tmp_path, tiny_files, root, "cache_latents_to_disk = true\ncache_text_encoder_outputs = true\n"
        )
    )
    assert cfg.dataset.cache_latents_to_disk
    cached = train(cfg, progress=False)
    assert len(list((cfg.out / "latent_cache").glob("*.safetensors"))) == 4
    # the cache computes the encoder one caption at a time (float rounding of a smaller batch)
    assert cached.losses == pytest.approx(plain.losses, rel=1e-5)
    for extra, subset, match in (
        ("cache_text_encoder_outputs = true\ntrain_text_encoder = true\n", "", "the text encoder trains"),
        ("cache_text_encoder_outputs = true\n", "shuffle_caption = true\n", "shuffles or drops tags"),
    ):
        with pytest.raises(BakaError, match="cache_text_encoder_outputs cannot be used: .*" + match):
            load_config(_train_toml(tmp_path, tiny_files, root, extra, subset))


def test_text_encoder_cache_computes_each_caption_once(tiny_files):
    from baka.models.io import load_checkpoint
    from baka.models.pipeline import build_module
    from baka.models.tokenizer import load_tokenizer
    from baka.train.modes import MODES
    from baka.train.trainer import _Denoiser

    ck = load_checkpoint(tiny_files[0])
    unet = build_module("unet", ck.config, ck.components()["unet"])
    te = build_module("text_encoder", ck.config, ck.components()["text_encoder"])
    tok = load_tokenizer()
    ids = tok(
        ["red circle", "blue circle", "red circle"], padding="max_length", max_length=77, return_tensors="pt"
    )
    ids = ids.input_ids
    den = _Denoiser(unet, te, None, MODES.get("full"), 1, cache_text=True)
    ref = MODES.get("full").text_states(None, te, ids, clip_skip=1)
    with torch.no_grad():
        got = den.cached_states(ids)
    assert len(den.text_cache) == 2 and torch.allclose(got, ref, atol=1e-5)
    assert torch.equal(got[0], got[2])


def test_everydream_folder_files(tmp_path, tiny_files, monkeypatch):
    """EveryDream2's per-folder files for the folder's own images: flip_p.txt, cond_dropout.txt,
    shuffle_tags.txt (present: shuffle), loss_scale.txt (the loss weight the trainer gives them)."""
    import baka.train.trainer as trainer_mod
    from baka.train.augment import augments_for
    from baka.train.data import captions_for

    root = tmp_path / "ed2"
    _image(root / "a" / "x.png", caption="red circle, large, left, simple")
    _image(root / "b" / "y.png", caption="blue circle, small, right, plain")
    (root / "a" / "flip_p.txt").write_text("1.0")
    (root / "a" / "shuffle_tags.txt").write_text("")
    (root / "b" / "cond_dropout.txt").write_text("1")
    (root / "b" / "loss_scale.txt").write_text("0.25")
    cfg = DatasetConfig([Subset(str(root), recursive=True)], resolution=64, enable_bucket=False, batch_size=2)
    items = sorted(Dataset(cfg).train, key=lambda it: it.path.name)
    a, b = items
    assert (a.options.flip_p, a.options.shuffle_tags, b.options.cond_dropout, b.options.loss_scale) == (
        1.0, True, 1.0, 0.25
    )  # fmt: skip
    flips = [[x.flip for x in augments_for(items, 0, s, 0)] for s in range(20)]
    assert all(f == [True, False] for f in flips)  # flip_p 1 on a; b has no flip_aug
    caps = [captions_for(items, 0, s, 0) for s in range(20)]
    assert all(c[1] == "" for c in caps)  # cond_dropout 1: b's caption always dropped
    # ED2 shuffles the tags after the first part (its main prompt), which stays first
    assert len({c[0] for c in caps}) > 1 and all(c[0].startswith("red circle, ") and sorted(c[0].split(
        ", ")) == sorted("red circle, large, left, simple".split(", ")) for c in caps)  # fmt: skip
    seen = []
    real = trainer_mod.diffusion_loss

    def spy(*args, sample_weights=None, **kw):
        seen.append(None if sample_weights is None else sorted(sample_weights.tolist()))
        return real(*args, sample_weights=sample_weights, **kw)

    monkeypatch.setattr(trainer_mod, "diffusion_loss", spy)
    train(load_config(_train_toml(tmp_path, tiny_files, root, subset="recursive = true\n")), progress=False)
    assert seen == [[0.25, 1.0]] * 3  # each step's batch holds both images
    (root / "a" / "flip_p.txt").write_text("2")
    with pytest.raises(BakaError, match=r"flip_p.txt: '2' is out of range"):
        Dataset(cfg)
