import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port
from PIL import Image, ImageDraw

from baka.errors import BakaError
from baka.models.io import read_raw
from baka.models.tokenizer import load_tokenizer
from baka.train.block_dropout import parse_schedules, probability, resting_blocks
from baka.train.captions import process_caption
from baka.train.config import load_config
from baka.train.data import Dataset, make_buckets
from baka.train.network import LoRANetwork, lr_weight_preset
from baka.train.trainer import train

COLORS = ["red", "blue", "green", "yellow"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    for i, c in enumerate(COLORS):
        im = Image.new("RGB", (64 + 32 * (i % 2), 64), "white")  # two aspect ratios -> two buckets
        ImageDraw.Draw(im).ellipse([8, 8, 56, 56], fill=c)
        im.save(d / f"img{i}.png")
        (d / f"img{i}.txt").write_text(f"1girl, {c} circle, simple background, solo")
    return d


def write_config(tmp_path, model, images, **over):
    net = over.pop("network", {})
    ds = {
        "resolution": 64,
        "min_bucket_reso": 64,
        "max_bucket_reso": 128,
        "bucket_reso_steps": 32,
        "batch_size": 2,
        **over.pop("dataset", {}),
    }
    cfg = {
        "model": str(model),
        "output_dir": str(tmp_path / "out"),
        "max_steps": 6,
        "learning_rate": 1e-2,
        "mode": "lora",
        **over,
    }

    def toml_value(v):
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, list):
            return "[" + ", ".join(toml_value(x) for x in v) + "]"
        return str(v)

    lines = [f"{k} = {toml_value(v)}" for k, v in cfg.items()]
    lines += ["[network]"] + [f"{k} = {toml_value(v)}" for k, v in {"dim": 4, "alpha": 4, **net}.items()]
    lines += ["[[datasets]]"] + [f"{k} = {toml_value(v)}" for k, v in ds.items()]
    lines += ["[[datasets.subsets]]", f"image_dir = {json.dumps(str(images))}"]
    path = tmp_path / "train.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def lora_tensors(path):
    return read_raw(path)[0]


def test_buckets_and_captions(images):
    b = make_buckets(512, 256, 1024, 64)
    assert (512, 512) in b and (640, 384) in b and (384, 640) in b and (256, 1024) in b
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in b)
    import random

    rng = random.Random(0)
    cap = "1girl, red hair, smile, outdoors, day"
    out = process_caption(cap, rng, keep_tokens=1, shuffle=True)
    assert out.startswith("1girl, ") and sorted(out.split(", ")) == sorted(cap.split(", "))
    assert process_caption(cap, rng, caption_dropout=1.0) == ""
    assert process_caption(cap, rng, keep_tokens=2, tag_dropout=1.0) == "1girl, red hair"


def test_loss_eps_v_and_min_snr_by_hand():
    from baka.train.loss import LossWeighting, NoiseSchedule, diffusion_loss

    # a_t = 0.64, 0.36, 0 (zero terminal SNR): sqrt(a) = 0.8, 0.6, 0; sqrt(1 - a) = 0.6, 0.8, 1;
    # SNR = a / (1 - a) = 16/9, 9/16, 0
    sched = NoiseSchedule.of(torch.tensor([0.64, 0.36, 0.0]))
    assert torch.allclose(sched.snr, torch.tensor([16 / 9, 9 / 16, 0.0]))
    x0, eps, t = torch.ones(3, 1, 2, 2), torch.full((3, 1, 2, 2), 2.0), torch.tensor([0, 1, 2])
    seen = []

    def zero(noisy, tt, cond):  # predicts 0: the loss is the mean squared target
        seen.append((noisy, tt, cond))
        return torch.zeros_like(noisy)

    def loss(v_prediction=False, **kw):
        w = LossWeighting(**kw)
        return diffusion_loss(zero, x0, "cond", eps, t, sched, v_prediction=v_prediction, weighting=w).item()

    assert loss() == pytest.approx(4.0)  # eps target 2 everywhere
    noisy, tt, cond = seen[0]  # x_t = sqrt(a) x0 + sqrt(1 - a) eps = 0.8 + 1.2, 0.6 + 1.6, 0 + 2
    assert torch.allclose(noisy[:, 0, 0, 0], torch.tensor([2.0, 2.2, 2.0])) and tt is t and cond == "cond"
    # v = sqrt(a) eps - sqrt(1 - a) x0 = 1.6 - 0.6, 1.2 - 0.8, 0 - 1 -> squared 1, 0.16, 1
    assert loss(v_prediction=True) == pytest.approx((1 + 0.16 + 1) / 3)
    # min-SNR, gamma 1: min(snr, 1) = 1, 9/16, 0
    # eps: w = min(snr, g) / snr = 9/16, 1, and 1 where snr = 0
    assert loss(min_snr_gamma=1.0) == pytest.approx(4 * (9 / 16 + 1 + 1) / 3)
    # v: w = min(snr, g) / (snr + 1) = 1 / (25/9), (9/16) / (25/16), 0 / 1 = 9/25, 9/25, 0
    assert loss(v_prediction=True, min_snr_gamma=1.0) == pytest.approx((9 / 25 + 0.16 * 9 / 25 + 0) / 3)
    # gamma above every SNR: eps weights are all 1
    assert loss(min_snr_gamma=100.0) == pytest.approx(4.0)


def test_caption_free_loss_by_hand():
    """Below the threshold: even batch positions pull the captioned prediction to the uncaptioned one
    (stop-gradient, unweighted), the others train the empty caption on the noise; above it, as before."""
    from baka.train.loss import LossWeighting, NoiseSchedule, caption_free_loss, diffusion_loss

    sched = NoiseSchedule.of(torch.tensor([0.64, 0.36, 0.0]))  # SNR 16/9, 9/16, 0
    x0, eps = torch.ones(4, 1, 2, 2), torch.full((4, 1, 2, 2), 2.0)
    t = torch.tensor([0, 1, 2, 0])  # below 2: positions 0 (pulled), 1 and 3 (empty caption); 2 as before
    cond, empty = torch.tensor([1.0, 1.0, 3.0, 1.0]), torch.full((4,), 0.5)
    w = torch.ones((), requires_grad=True)

    def scaled(noisy, tt, c):  # predicts w * c everywhere
        return w * c.view(-1, 1, 1, 1).expand_as(noisy)

    # 0: (1 - 0.5)^2 = 0.25, d/dw 2 (0.5) 1 = 1 (through the captioned branch only);
    # 1, 3: (0.5 - 2)^2 = 2.25, d/dw 2 (-1.5) 0.5 = -1.5; 2: (3 - 2)^2 = 1, d/dw 2 (1) 3 = 6
    loss = caption_free_loss(scaled, x0, cond, empty, eps, t, sched, 2)
    loss.backward()
    assert loss.item() == pytest.approx((0.25 + 2.25 + 1 + 2.25) / 4)
    assert w.grad.item() == pytest.approx((1 - 1.5 + 6 - 1.5) / 4)
    # min-SNR gamma 1 weighs the noise losses (t = 0: 9/16), not the pull towards the uncaptioned branch
    got = caption_free_loss(scaled, x0, cond, empty, eps, t, sched, 2, weighting=LossWeighting(1.0))
    assert got.item() == pytest.approx((0.25 + 2.25 + 1 + 2.25 * 9 / 16) / 4)
    # threshold 0: every sample as diffusion_loss
    assert caption_free_loss(scaled, x0, cond, empty, eps, t, sched, 0).item() == pytest.approx(
        diffusion_loss(scaled, x0, cond, eps, t, sched).item()
    )


# kohya sd-scripts' loss weights (library/custom_train_functions.py, formulas by hand), with s the SNR
# clamped at 1000: scale_v_pred_loss_like_noise_pred s / (s + 1); v_pred_like_loss k: 1 + k (s + 1) / s;
# debiased estimation 1 / sqrt(s) (eps), 1 / (s + 1) (v); applied after min-SNR, in that order.
# SNRs 16/9, 9/16, 4000 (clamped to 1000) and 0 (weight 1 where a formula divides by 0).
KOHYA_WEIGHTS = [
    ({"scale_v_pred_loss_like_noise_pred": True}, False, [16 / 25, 9 / 25, 1000 / 1001, 0.0]),
    ({"v_pred_like_loss": 0.5}, False, [1 + 0.5 * 25 / 16, 1 + 0.5 * 25 / 9, 1 + 0.5 * 1001 / 1000, 1.0]),
    ({"debiased_estimation_loss": True}, False, [3 / 4, 4 / 3, 1000**-0.5, 1.0]),
    ({"debiased_estimation_loss": True}, True, [9 / 25, 16 / 25, 1 / 1001, 1.0]),
    # min-SNR gamma 1 (eps: 9/16, 1, 1/4000, 1) then debiased
    (
        {"min_snr_gamma": 1.0, "debiased_estimation_loss": True},
        False,
        [27 / 64, 4 / 3, 1000**-0.5 / 4000, 1.0],
    ),
    # min-SNR gamma 1 (v: 9/25, 9/25, 1/4001, 0) then the v-like term
    (
        {"min_snr_gamma": 1.0, "v_pred_like_loss": 1.0},
        True,
        [9 / 25 * (1 + 25 / 16), 9 / 25 * (1 + 25 / 9), 1 / 4001 * (1 + 1001 / 1000), 0.0],
    ),
]


@pytest.mark.parametrize(("options", "v_pred", "expected"), KOHYA_WEIGHTS)
def test_kohya_loss_weights_by_hand(options, v_pred, expected):
    from baka.train.loss import LossWeighting

    snr = torch.tensor([16 / 9, 9 / 16, 4000.0, 0.0])
    got = LossWeighting(**options).weights(snr, v_pred)
    assert torch.allclose(got, torch.tensor(expected), rtol=1e-6), (got, expected)


# diffusers' schedules by hand: base LR 1, 10 steps; warmup w: lr = step / w; cosine after warmup:
# 0.5 (1 + cos(pi p)), p = (step - w) / (10 - w); linear: (10 - step) / (10 - w); restarts, 2 cycles:
# 0.5 (1 + cos(pi ((2 p) mod 1)))
def _cos(p):
    import math

    return 0.5 * (1 + math.cos(math.pi * p))


LR_TABLE = [
    ("constant", 0, [1.0] * 10),
    ("constant_with_warmup", 2, [0, 0.5] + [1.0] * 8),
    ("linear", 2, [0, 0.5] + [(10 - s) / 8 for s in range(2, 10)]),
    ("cosine", 0.2, [0, 0.5] + [_cos((s - 2) / 8) for s in range(2, 10)]),  # 0.2 = 20% of max_steps
    ("cosine_with_restarts", 0, [_cos((2 * s / 10) % 1) for s in range(10)]),
]


@pytest.mark.parametrize(("name", "warmup", "expected"), LR_TABLE)
def test_lr_schedulers_by_hand(name, warmup, expected):
    from baka.train.config import TrainConfig
    from baka.train.optim import make_lr_scheduler

    cfg = TrainConfig(
        model="m", max_steps=10, lr_scheduler=name, lr_warmup_steps=warmup, lr_scheduler_num_cycles=2
    )
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_lr_scheduler(cfg, opt)
    got = []
    for _ in range(10):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert got == pytest.approx(expected, abs=1e-9)


def test_min_max_timestep(tmp_path, images):
    from baka.train.loss import draw_noise

    g = torch.Generator().manual_seed(0)
    _, t = draw_noise(torch.Size([4000, 1, 1, 1]), g, 1000, 0.0, "cpu", (600, 700))
    assert int(t.min()) == 600 and int(t.max()) == 699  # kohya: [min_timestep, max_timestep)
    _, t = draw_noise(torch.Size([4000, 1, 1, 1]), g, 1000, 0.0, "cpu", (990, None))
    assert int(t.min()) == 990 and int(t.max()) == 999
    for lo, hi in ((500, 500), (-1, None), (0, 1001)):
        extra = {"min_timestep": lo} | ({"max_timestep": hi} if hi is not None else {})
        with pytest.raises(BakaError, match="min_timestep"):
            load_config(write_config(tmp_path, "m.safetensors", images, **extra))


def test_lr_scheduler_errors():
    from baka.train.config import TrainConfig
    from baka.train.optim import make_lr_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(BakaError, match="did you mean 'cosine'"):
        make_lr_scheduler(TrainConfig(model="m", lr_scheduler="cosin"), opt)
    with pytest.raises(BakaError, match="constant_with_warmup"):
        make_lr_scheduler(TrainConfig(model="m", lr_warmup_steps=5), opt)


def test_loss_noising_matches_diffusers_bit_for_bit():
    from diffusers import DDPMScheduler

    from baka.train.loss import add_noise, ddpm_schedule, velocity

    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    for zero_snr in (False, True):
        ref = DDPMScheduler(rescale_betas_zero_snr=zero_snr)
        ac = ddpm_schedule(ref.config, zero_snr, "cpu").alphas_cumprod
        assert torch.equal(ac, ref.alphas_cumprod) and (ac[-1] == 0) == zero_snr
        assert torch.equal(add_noise(ac, x0, eps, t), ref.add_noise(x0, eps, t))
        assert torch.equal(velocity(ac, x0, eps, t), ref.get_velocity(x0, eps, t))


def test_kohya_dataset_toml_and_errors(tmp_path, tiny_files, images):
    (tmp_path / "ds.toml").write_text(
        f"[general]\nshuffle_caption = true\nkeep_tokens = 1\n[[datasets]]\nresolution = 96\nbatch_size = 2\n"
        f"min_bucket_reso = 32\nmax_bucket_reso = 128\nbucket_reso_steps = 32\n"
        f"[[datasets.subsets]]\nimage_dir = {json.dumps(str(images))}\nnum_repeats = 3\n"
    )
    (tmp_path / "t.toml").write_text(f'model = "{tiny_files[0]}"\ndataset_config = "ds.toml"\n')
    cfg = load_config(tmp_path / "t.toml")
    sub = cfg.dataset.subsets[0]
    assert (
        sub.num_repeats == 3 and sub.shuffle_caption and sub.keep_tokens == 1 and cfg.dataset.batch_size == 2
    )
    ds = Dataset(cfg.dataset)
    # kohya buckets for 96 px (area <= 96^2, sides multiples of 32): 64x64 -> 96x96, 96x64 (1.5) -> 128x64
    assert {it.bucket for it in ds.train} == {(96, 96), (128, 64)}
    batches = ds.epoch_batches(0, 0)
    assert sum(len(b) for b in batches) == 12 and all(len({it.bucket for it in b}) == 1 for b in batches)
    assert batches == ds.epoch_batches(0, 0) and batches != ds.epoch_batches(1, 0)
    (tmp_path / "bad.toml").write_text(f'model = "{tiny_files[0]}"\nlearning_rat = 1\n')
    with pytest.raises(BakaError, match="unknown setting 'learning_rat'; did you mean 'learning_rate'"):
        load_config(tmp_path / "bad.toml")


def test_kohya_caption_keys_flip_aug_and_key_checks(tmp_path, tiny_files, images):
    """caption_prefix / caption_suffix around the caption (before shuffle and dropout, as kohya),
    class_tokens for images without a caption file, flip_aug mirrored latents drawn per step; every
    dataset key at every level known or refused by name."""
    from baka.models.io import load_checkpoint
    from baka.models.pipeline import build_module
    from baka.train.augment import Aug, augments_for
    from baka.train.data import LatentCache, captions_for, load_image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for f in sorted(images.glob("img[01].*")):
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "img1.txt").unlink()  # img1 has no caption file: class_tokens
    sub = {"image_dir": str(folder), "caption_prefix": "masterpiece,", "caption_suffix": ", by sks",
           "class_tokens": "sks circle", "flip_aug": True}  # fmt: skip
    ds_toml = "[[datasets]]\nresolution = 64\n[[datasets.subsets]]\n" + "".join(
        f"{k} = {json.dumps(v)}\n" for k, v in sub.items()
    )
    (tmp_path / "ds.toml").write_text(ds_toml)
    (tmp_path / "t.toml").write_text(f'model = "{tiny_files[0]}"\ndataset_config = "ds.toml"\n')
    cfg = load_config(tmp_path / "t.toml")
    ds = Dataset(cfg.dataset)
    items = sorted(ds.train, key=lambda it: it.path.name)
    assert captions_for(items, 0, 0, 0) == [
        "masterpiece, 1girl, red circle, simple background, solo, by sks",
        "masterpiece, sks circle, by sks",
    ]
    flips = [[a.flip for a in augments_for(items, 0, step, 0)] for step in range(40)]
    assert flips == [[a.flip for a in augments_for(items, 0, step, 0)] for step in range(40)]  # replayable
    assert 10 < sum(f[0] for f in flips) < 30  # about half
    ck = load_checkpoint(tiny_files[0])
    vae = build_module("vae", ck.config, ck.components()["vae"])
    cache = LatentCache(vae)
    lat = cache.get(items[:1], "cpu", [Aug(flip=True)])
    img = torch.flip(load_image(items[0].path, items[0].bucket), dims=[-1])[None]
    with torch.no_grad():
        want = vae.encode(img).latent_dist.mean * vae.config.scaling_factor
    assert torch.allclose(lat, want, atol=1e-5)
    assert not torch.allclose(cache.get(items[:1], "cpu", [Aug()]), lat)  # the two are cached apart
    for bad, match in (
        ("caption_prefx", "did you mean 'caption_prefix'"),
        ("alpha_mask", "kohya's 'alpha_mask' is not supported"),
    ):
        (tmp_path / "ds.toml").write_text(ds_toml + f"{bad} = true\n")
        with pytest.raises(BakaError, match=match):
            load_config(tmp_path / "t.toml")
    (tmp_path / "ds.toml").write_text("[general]\ncolour_aug = true\n" + ds_toml)
    with pytest.raises(BakaError, match=r"\[general\]: unknown dataset setting 'colour_aug'"):
        load_config(tmp_path / "t.toml")


def test_lora_module_dropout_semantics(tiny_files):
    from baka.models.config import tiny_config
    from baka.models.io import load_checkpoint
    from baka.models.pipeline import build_module
    from baka.train.config import NetworkConfig

    ck = load_checkpoint(tiny_files[0])
    unet = build_module("unet", tiny_config(), ck.components()["unet"])
    x = torch.randn(2, 4, 8, 8)
    ctx = torch.randn(2, 77, 32)
    base = unet(x, 10, ctx).sample
    net = LoRANetwork(unet, None, NetworkConfig(dim=4, alpha=2, module_dropout=1.0))
    assert torch.equal(unet(x, 10, ctx).sample, base)  # up is zero-initialised: no change at start
    for m in net.lora.values():
        torch.nn.init.normal_(m.up.weight)
    net.train()
    assert torch.equal(unet(x, 10, ctx).sample, base)  # module dropout 1.0: every branch skipped
    net.eval()
    on = unet(x, 10, ctx).sample
    assert not torch.allclose(on, base)  # dropouts only act in train mode
    m = next(m for m in net.lora.values() if isinstance(m.down, torch.nn.Linear))
    m.module_dropout, m.rank_dropout = 0.0, 0.5
    m.train()
    lin = torch.randn(3, m.down.in_features)
    torch.manual_seed(0)
    got = m._hook(None, (lin,), torch.zeros(3, m.up.out_features))
    torch.manual_seed(0)
    mask = (torch.rand(3, m.dim) > 0.5).float()
    want = m.up(m.down(lin) * mask) * (m.scale / 0.5)  # kept ranks rescaled by 1 / (1 - p)
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(got, m.up(m.down(lin)) * m.scale)
    net.remove()
    assert torch.equal(unet(x, 10, ctx).sample, base)  # hooks removed: the base model is untouched


def test_lora_training_loss_falls_and_output_loads(tmp_path, tiny_files, images):
    cfg = load_config(
        write_config(
            tmp_path,
            tiny_files[0],
            images,
            max_steps=40,
            min_snr_gamma=5.0,
            sample_prompts=["red circle"],
            sample_steps=2,
            validate_every=20,
            dataset={"validation_split": 0.3},
        )
    )
    res = train(cfg, progress=False)
    first, last = sum(res.losses[:10]) / 10, sum(res.losses[-10:]) / 10
    assert last < 0.75 * first, (first, last)
    assert (
        len(res.val_losses) == 2
        and (cfg.out / "loss.png").exists()
        and list((cfg.out / "sample").glob("baka_000040_00_*_0.png"))
    )
    from baka.models.hashes import addnet_hash
    from baka.models.safetensors_io import SafetensorsFile

    with SafetensorsFile(res.output) as f:
        meta = f.metadata
    assert meta["ss_network_dim"] == "4" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["sshs_model_hash"] == addnet_hash(res.output)
    assert json.loads(meta["ss_tag_frequency"])[images.name]["1girl"] >= 1
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    # the trained LoRA loads in the generator and every module finds its layer
    from baka.generate.engine import Generator, GenParams

    gen = Generator(tiny_files[0], lora_dirs=[res.output.parent], progress=False)
    r = gen(GenParams("red circle <lora:baka:1>", steps=2, width=64, height=64, seed=1))[0]
    assert gen.lora_unmatched == [] and "Lora hashes" in r.infotext


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_trains_from_an_fp16_checkpoint(tmp_path, tiny_sds, images, mode):
    # shipped models and most downloaded ones are fp16: the trainer keeps fp32 master weights
    from baka.models.io import save_checkpoint

    half = tmp_path / "half.safetensors"
    save_checkpoint({k: v.half() if v.is_floating_point() else v for k, v in tiny_sds[0].items()}, half)
    res = train(
        load_config(write_config(tmp_path, half, images, max_steps=2, mode=mode, save_precision="fp16")),
        progress=False,
    )
    assert len(res.losses) == 2 and all(torch.isfinite(torch.tensor(res.losses)))
    # kohya's save_precision: every floating tensor of the file (a full model's VAE too)
    assert {v.dtype for v in lora_tensors(res.output).values() if v.is_floating_point()} == {torch.float16}
    with pytest.raises(BakaError, match="save_precision must be one of float, fp16, bf16"):
        load_config(write_config(tmp_path, half, images, save_precision="half"))


def test_caption_free_loss_makes_the_branches_agree_below_its_threshold():
    """A denoiser with a bias per (caption, timestep) trained on two captions (x0 = +1 / -1): with the
    plain loss the captioned biases stay apart from the uncaptioned one at every timestep (the caption
    tells the noise's sign); with ``caption_free_loss`` below t = 5 they meet there, and only there."""
    from baka.train.loss import NoiseSchedule, caption_free_loss, diffusion_loss

    sched = NoiseSchedule.of(torch.linspace(0.99, 0.01, 10))

    def trained(below: int) -> torch.Tensor:
        torch.manual_seed(0)
        a, b = torch.zeros(10, requires_grad=True), torch.zeros(3, 10, requires_grad=True)
        opt = torch.optim.Adam([a, b], lr=0.05)

        def model(x, t, c):
            return a[t].view(-1, 1, 1, 1) * x + b[c, t].view(-1, 1, 1, 1)

        for _ in range(300):
            c = torch.randint(1, 3, (64,))
            x0 = torch.where(c == 1, 1.0, -1.0).view(-1, 1, 1, 1).expand(64, 1, 2, 2)
            t, noise = torch.randint(0, 10, (64,)), torch.randn(64, 1, 2, 2)
            c = torch.where(torch.rand(64) < 0.2, 0, c)  # caption dropout
            if below:
                loss = caption_free_loss(model, x0, c, torch.zeros_like(c), noise, t, sched, below)
            else:
                loss = diffusion_loss(model, x0, c, noise, t, sched)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (b[1:] - b[0]).abs().min(dim=0).values.detach()  # per timestep, the nearer caption

    plain, free = trained(0), trained(5)
    assert (plain > 0.05).all(), plain  # ~ sqrt(a / (1 - a)): 0.1 at the noisiest step
    assert (free[:5] < 0.2 * plain[:5]).all() and (free[5:] > 0.5 * plain[5:]).all(), (plain, free)


def test_caption_free_below_timestep_reaches_the_loss(tmp_path, tiny_files, images, monkeypatch):
    from baka.train import trainer as trainer_module

    calls = []

    def spy(model, latents, ids, empty, noise, t, schedule, below, **kw):
        calls.append((ids.shape, empty.clone(), below))
        return trainer_module.diffusion_loss(model, latents, ids, noise, t, schedule, **kw)

    monkeypatch.setattr(trainer_module, "caption_free_loss", spy)
    cfg = load_config(
        write_config(tmp_path, tiny_files[0], images, max_steps=2, caption_free_below_timestep=400)
    )
    train(cfg, progress=False)
    tok = load_tokenizer()
    blank = tok([""], padding="max_length", return_tensors="pt").input_ids[0]
    assert len(calls) == 2 and all(below == 400 and e.shape == shape for shape, e, below in calls)
    assert all(torch.equal(row, blank) for _, e, _ in calls for row in e)
    with pytest.raises(BakaError, match="caption_free_below_timestep must be in 0..1000"):
        load_config(write_config(tmp_path, tiny_files[0], images, caption_free_below_timestep=1001))


def test_full_finetune_freezing_is_bit_identical(tmp_path, tiny_files, images):
    cfg = load_config(
        write_config(
            tmp_path,
            tiny_files[0],
            images,
            mode="full",
            max_steps=3,
            learning_rate=1e-3,
            train_text_encoder=True,
            unfreeze_last_n_layers=2,
        )
    )
    res = train(cfg, progress=False)
    before, after = read_raw(tiny_files[0])[0], read_raw(res.output)[0]
    te = "cond_stage_model.transformer.text_model."
    for k in before:
        same = torch.equal(before[k], after[k])
        if k.startswith(te + "encoder.layers.1") and k[len(te + "encoder.layers.") :].split(".")[0] in (
            "10",
            "11",
        ):
            continue  # trainable: checked below
        if k.startswith(te + "final_layer_norm"):
            assert not same, k  # EveryDream2 trains the final layer norm unless told not to
        elif k.startswith(("first_stage_model.", te)):
            assert same, k  # VAE, embeddings (ED2: frozen when only some layers train), layers 0-9
    assert not torch.equal(
        before[te + "encoder.layers.11.mlp.fc1.weight"], after[te + "encoder.layers.11.mlp.fc1.weight"]
    )
    assert not torch.equal(
        before["model.diffusion_model.out.2.weight"], after["model.diffusion_model.out.2.weight"]
    )


def test_block_dropout_schedule_and_rest(tmp_path, tiny_files, images):
    s = parse_schedules({"OUT05": "0:0, 10:1", "in00": "0.25"})
    assert (
        probability(s["OUT05"], 5) == 0.5
        and probability(s["OUT05"], 99) == 1.0
        and probability(s["IN00"], 7) == 0.25
    )
    draws = [resting_blocks(s, step, 0) for step in range(200)]
    assert draws == [resting_blocks(s, step, 0) for step in range(200)]  # a function of (seed, step)
    assert 0.15 < sum("IN00" in d for d in draws) / 200 < 0.35
    with pytest.raises(BakaError, match="probabilities must be in"):
        parse_schedules({"OUT05": "0:2"})
    # OUT05 rests every step of a LoRA run (its up weights stay zero); IN01 rests in a full fine-tune
    res = train(
        load_config(write_config(tmp_path, tiny_files[0], images, max_steps=3, block_dropout={"OUT05": "1"})),
        progress=False,
    )
    t = lora_tensors(res.output)
    out05 = [k for k in t if k.startswith("lora_unet_up_blocks_1_attentions_2_") and "lora_up" in k]
    other = [k for k in t if k.startswith("lora_unet_up_blocks_1_attentions_1_") and "lora_up" in k]
    assert out05 and all(torch.count_nonzero(t[k]) == 0 for k in out05)
    assert all(torch.count_nonzero(t[k]) > 0 for k in other)
    (tmp_path / "full").mkdir()
    res = train(
        load_config(
            write_config(
                tmp_path / "full",
                tiny_files[0],
                images,
                mode="full",
                max_steps=2,
                learning_rate=1e-3,
                block_dropout={"IN01": "1"},
            )
        ),
        progress=False,
    )
    before, after = read_raw(tiny_files[0])[0], read_raw(res.output)[0]
    in01 = [k for k in before if k.startswith("model.diffusion_model.input_blocks.1.")]
    assert all(torch.equal(before[k], after[k]) for k in in01)
    assert not torch.equal(
        before["model.diffusion_model.input_blocks.2.0.in_layers.2.weight"],
        after["model.diffusion_model.input_blocks.2.0.in_layers.2.weight"],
    )


def test_block_lr_and_dims(tmp_path, tiny_files, images):
    assert lr_weight_preset("linear") == [i / 11 for i in range(12)]
    assert lr_weight_preset("cosine")[0] == 1.0 and lr_weight_preset("sine+0.5")[0] == 0.5
    dims = [0] * 12 + [2] + [4] * 12  # no IN modules, rank 2 in M00, rank 4 in OUT
    res = train(
        load_config(
            write_config(
                tmp_path,
                tiny_files[0],
                images,
                max_steps=2,
                network={"block_dims": dims, "up_lr_weight": "zeros"},
            )
        ),
        progress=False,
    )
    t = lora_tensors(res.output)
    assert not any(k.startswith("lora_unet_down_blocks_") for k in t)
    assert t["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].shape[0] == 2
    # up_lr_weight zeros: as kohya, no module is created where the LR weight is 0 (none in the file)
    assert not any(k.startswith("lora_unet_up_blocks_") for k in t)
    assert torch.count_nonzero(t["lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"]) > 0


def test_v_pred_zero_snr_min_snr_and_ema(tmp_path, tiny_files, images):
    cfg = load_config(
        write_config(
            tmp_path,
            tiny_files[0],
            images,
            max_steps=1,
            v_prediction=True,
            zero_terminal_snr=True,
            min_snr_gamma=5.0,
            noise_offset=0.1,
            ema_decay=0.75,
            save_every=1,
        )
    )
    res = train(cfg, progress=False)
    assert all(torch.isfinite(torch.tensor(res.losses)))
    out = lora_tensors(res.output)
    ck = read_raw(cfg.out / "checkpoints" / "step-00000001" / "trainable.safetensors")[0]
    k = next(k for k in out if k.endswith("lora_up.weight"))
    name = k.removesuffix(".lora_up.weight")
    raw = ck[f"{name.replace('.', '_')}.up.weight"]
    # EMA after one step from a zero-initialised up: 0.75 * 0 + 0.25 * w1
    assert torch.allclose(out[k], 0.25 * raw, atol=1e-7) and torch.count_nonzero(raw) > 0


def _same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_equals_uninterrupted(tmp_path, tiny_files, images):
    net = {"dropout": 0.1, "rank_dropout": 0.2, "module_dropout": 0.1}
    # the LR keeps falling across the resume (restarts at step 3 of 6: the resumed run must know its step)
    sched = {"lr_scheduler": "cosine_with_restarts", "lr_warmup_steps": 1, "lr_scheduler_num_cycles": 2}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full = train(
        load_config(
            write_config(
                tmp_path / "a",
                tiny_files[0],
                images,
                max_steps=6,
                network=net,
                block_dropout={"OUT05": "0.5"},
                **sched,
            )
        ),
        progress=False,
    )
    cfg_b = load_config(
        write_config(
            tmp_path / "b",
            tiny_files[0],
            images,
            max_steps=6,
            save_every=3,
            network=net,
            block_dropout={"OUT05": "0.5"},
            **sched,
        )
    )
    part = train(cfg_b, stop_after=3, progress=False)
    assert part.output is None and (cfg_b.out / "checkpoints" / "latest").read_text() == "step-00000003"
    resumed = train(cfg_b, resume=True, progress=False)
    assert resumed.step == 6 and resumed.losses == full.losses
    _same(lora_tensors(full.output), lora_tensors(resumed.output))


# Run by the kill -9 test in a fresh interpreter: ``baka train CONFIG`` that, once the checkpoint of
# step 2 is fully written under its temporary name but not yet renamed into place, writes MARKER and
# waits there to be killed (a deterministic point, inside the atomic checkpoint write).
_HOLD_IN_CHECKPOINT = """
import os, sys, time
from pathlib import Path

_replace = os.replace


def replace(src, dst, *a, **k):
    if Path(dst).name == "step-00000002":
        Path(sys.argv[2]).write_text(str(os.getpid()))
        time.sleep(600)
    return _replace(src, dst, *a, **k)


os.replace = replace
from baka.cli import main

sys.exit(main(["train", sys.argv[1]]))
"""


def test_kill_9_then_resume(tmp_path, tiny_files, images):
    cfg_path = write_config(tmp_path, tiny_files[0], images, max_steps=3, save_every=1)
    marker = tmp_path / "holding"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_IN_CHECKPOINT, str(cfg_path), str(marker)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    (tmp_path / "ref").mkdir()  # the uninterrupted run, in this process while the subprocess starts
    ref = train(
        load_config(write_config(tmp_path / "ref", tiny_files[0], images, max_steps=3)), progress=False
    )
    deadline = time.time() + 300
    while time.time() < deadline and not marker.exists() and proc.poll() is None:
        time.sleep(0.02)
    assert marker.exists(), f"the run never reached the checkpoint of step 2 (exit code {proc.poll()})"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    ck = tmp_path / "out" / "checkpoints"
    # killed mid-write: step 2 exists only as the temporary folder, ``latest`` still names step 1
    assert (ck / "latest").read_text() == "step-00000001"
    assert (ck / ".step-00000002.part" / "state.json").exists() and not (ck / "step-00000002").exists()
    assert not (tmp_path / "out" / "baka.safetensors").exists()
    res = subprocess.run(
        [sys.executable, "-m", "baka", "train", str(cfg_path), "--resume"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "after 3 steps" in res.stdout  # resumed at step 1, trained steps 2-3 across an epoch boundary
    _same(lora_tensors(ref.output), lora_tensors(tmp_path / "out" / "baka.safetensors"))


LAUNCHERS = {
    "accelerate": [
        "accelerate",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ],
    "torchrun": ["torchrun", "--nproc_per_node", "2"],
}
PORT_FLAG = {"accelerate": "--main_process_port", "torchrun": "--master_port"}


def launch(launcher: str, *flags: str) -> list[str]:
    """The launcher's command line with its own free rendezvous port, ``flags`` before the module."""
    tool, *rest = LAUNCHERS[launcher]
    exe = str(Path(sys.executable).parent / tool)
    return [exe, *rest, *flags, PORT_FLAG[launcher], str(free_port()), "-m", "baka"]


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_gloo(tmp_path, tiny_files, images, launcher):
    cfg_path = write_config(tmp_path, tiny_files[0], images, max_steps=2)
    res = subprocess.run(
        [*launch(launcher), "train", str(cfg_path)], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("wrote ") == 1  # two ranks ran; only the main process writes
    assert (tmp_path / "out" / "baka.safetensors").exists()
    losses = json.loads((tmp_path / "out" / "losses.json").read_text())["train"]
    assert len(losses) == 2  # one gathered loss per step, not per process


def test_fsdp_on_cpu_processes_is_refused_not_run_as_ddp(tmp_path, tiny_files, images):
    """accelerate turns --use_fsdp on CPU processes into plain data parallel without a word; baka
    says so and stops instead of training something other than asked."""
    cfg_path = write_config(tmp_path, tiny_files[0], images, max_steps=2)
    flags = ["--use_fsdp", "--fsdp_sync_module_states", "false", "--fsdp_cpu_ram_efficient_loading", "false"]
    cmd = [*launch("accelerate", *flags), "train", str(cfg_path)]
    cmd.remove("--multi_gpu")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0 and "baka: error: accelerate launch asked for FSDP, but" in res.stderr
    assert not (tmp_path / "out" / "baka.safetensors").exists()


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_textual_inversion_trains_only_its_vectors_and_prompts_get_what_trained(tmp_path, tiny_files, fmt):
    from baka.generate.conditioning import PromptEncoder
    from baka.generate.embeddings import EmbeddingDB, load_embedding
    from baka.models.io import load_checkpoint
    from baka.models.pipeline import build_module
    from baka.train.embedding import TrainableEmbedding

    d = tmp_path / "ti"
    d.mkdir()
    for i, c in enumerate(COLORS):
        im = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(im).ellipse([8, 8, 56, 56], fill=c)
        im.save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(f"bakatok circle, {c} background")
    cfg = load_config(
        write_config(
            tmp_path,
            tiny_files[0],
            d,
            mode="textual_inversion",
            token_string="bakatok",
            init_word="circle",
            num_vectors_per_token=3,
            save_model_as=fmt,
            output_name="bakatok",
            learning_rate=5e-2,
            max_steps=8,
        )
    )
    assert cfg.mode == "embedding"
    res = train(cfg, progress=False)
    assert res.output.name == f"bakatok.{fmt}" and [p.name for p in cfg.out.glob("bakatok.*")] == [
        res.output.name
    ]
    ck = load_checkpoint(tiny_files[0])
    te = build_module("text_encoder", ck.config, ck.components()["text_encoder"])
    emb = load_embedding(res.output, te.config.hidden_size)
    assert emb.name == "bakatok" and emb.vectors.shape == (3, te.config.hidden_size)
    start = TrainableEmbedding(te, "bakatok", "circle", 3).vectors
    assert not torch.allclose(emb.vectors, start)  # the vectors trained ...
    # ... and a prompt naming the embedding file gets exactly the conditioning the training step saw
    db = EmbeddingDB(te.config.hidden_size)
    db.add(emb)
    enc = PromptEncoder(te, db)
    prompt = "bakatok circle, red background"
    at_inference = enc.encode_chunks(enc.chunks(prompt))
    trained = TrainableEmbedding(te, "bakatok", "circle", 3)
    with torch.no_grad():
        trained.vectors.copy_(emb.vectors)
        in_training = trained.text_states(te, trained.tokenize([prompt], "cpu"))
    torch.testing.assert_close(at_inference, in_training, rtol=1e-5, atol=1e-5)
    # kohya's max_token_length 225: a long caption whose embedding sits in a later chunk, and a short
    # one padded with empty chunks, get generation's conditioning too (with the vectors spliced in)
    long = ", ".join(f"tag{i}" for i in range(40)) + ", bakatok circle, red background"
    for text in (long, prompt):
        chunks = enc.chunks(text)
        ids = trained.tokenize([text], "cpu", chunks=3)
        assert ids.shape == (1, 2, 231)
        with torch.no_grad():
            got = trained.text_states(te, ids)[0]
            want = enc.encode_chunks(chunks[:3])[0]
            if len(chunks) < 3:
                want = torch.cat([want] + [enc.encode("")[0]] * (3 - len(chunks)))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    slots = trained.tokenize([long], "cpu", chunks=3)[0, 1]
    assert (slots >= 0).sum() == 3 and (slots >= 0).nonzero().min() >= 77  # the vectors in chunk 2+
    with pytest.raises(BakaError, match="needs token_string"):
        load_config(write_config(tmp_path, tiny_files[0], d, mode="embedding"))
    with pytest.raises(BakaError, match="unknown training mode 'lorra'; did you mean 'lora'"):
        load_config(write_config(tmp_path, tiny_files[0], d, mode="lorra"))


def test_clip_skip_and_long_captions_condition_as_generation(tmp_path, tiny_files):
    """kohya's clip_skip and max_token_length: a caption of more than 75 tokens is A1111's chunks, each
    encoded alone (brackets literal) and joined, with clip skip's layer -N: the states equal
    generation's encoder of the same text (emphasis "None", same clip skip)."""
    from baka.generate.conditioning import PromptEncoder
    from baka.models.io import load_checkpoint
    from baka.models.pipeline import build_module
    from baka.models.tokenizer import load_tokenizer as _tokenizer
    from baka.train.modes import plain_states, plain_tokens

    ck = load_checkpoint(tiny_files[0])
    te = build_module("text_encoder", ck.config, ck.components()["text_encoder"])
    long = ", ".join(f"tag{i} (detail)" for i in range(40))  # ~200 tokens: 3 chunks
    short = "red circle, simple background"
    ids = plain_tokens(None, _tokenizer(), [long, short], "cpu", chunks=2)
    assert ids.shape == (2, 154)
    with torch.no_grad():
        states = plain_states(None, te, ids, clip_skip=2)
        enc = PromptEncoder(te, clip_skip=2, emphasis="None")
        want_long = enc.encode_chunks(enc.chunks(long)[:2])[0]  # its first two chunks: cut at 150
        want_short = torch.cat([enc.encode(short)[0], enc.encode("")[0]])  # padded with the empty chunk
    assert torch.allclose(states[0], want_long, atol=1e-5)
    assert torch.allclose(states[1], want_short, atol=1e-5)
    one = plain_tokens(None, _tokenizer(), [short], "cpu")  # 75 tokens: the plain tokenizer, as before
    assert one.shape == (1, 77) and torch.equal(one[0], ids[1, :77])


def test_weighted_captions_tokens_and_states_by_hand(tiny_files):
    """kohya's weighted_captions: A1111's emphasis in a caption weights its tokens' states. The ids are
    the caption's without the brackets; the weights a table from the documented syntax ((x:w) times w,
    (x) times 1.1, [x] divided by 1.1, 1.0 at BOS / EOS / padding); "No norm" (kohya's SD strategy)
    multiplies the plain states by them, "Original" is generation's default emphasis (mean restored)."""
    from baka.generate.conditioning import PromptEncoder
    from baka.models.io import load_checkpoint
    from baka.models.pipeline import build_module
    from baka.models.tokenizer import BOS_ID, EOS_ID, tokenize
    from baka.models.tokenizer import load_tokenizer as _tokenizer
    from baka.train.modes import plain_states, plain_tokens, weighted_states, weighted_tokens

    ck = load_checkpoint(tiny_files[0])
    te = build_module("text_encoder", ck.config, ck.components()["text_encoder"])
    tok = _tokenizer()
    caption = "(red:1.4) circle, [blue] background, (large), ((center))"
    bare = "red circle, blue background, large, center"
    cond = weighted_tokens(None, tok, [caption, bare], "cpu")
    assert cond.shape == (2, 2, 77) and cond.dtype == torch.float64
    words = ["red", "circle", ",", "blue", "background", ",", "large", ",", "center"]
    assert [len(tokenize(w)) for w in words] == [1] * 9  # one token each, so the table is per word
    want_w = [1.0, 1.4, 1.0, 1.0, 1 / 1.1, 1.0, 1.0, 1.1, 1.0, 1.1 * 1.1] + [1.0] * 67
    assert cond[0, 0].long().tolist() == [BOS_ID, *[tokenize(w)[0] for w in words]] + [EOS_ID] * 67
    assert torch.equal(cond[0, 0].long(), plain_tokens(None, tok, [bare], "cpu")[0])
    torch.testing.assert_close(cond[0, 1], torch.tensor(want_w, dtype=torch.float64))
    assert torch.equal(cond[1, 1], torch.ones(77, dtype=torch.float64))  # no syntax: all 1
    # kohya's caption parser has no BREAK: the word stays text, weighted as its bracket
    brk = weighted_tokens(None, tok, ["(red BREAK circle:2)", "red BREAK circle"], "cpu")
    assert torch.equal(brk[1, 0].long(), plain_tokens(None, tok, ["red BREAK circle"], "cpu")[0])
    assert brk[0, 1, 1:4].tolist() == [2.0, 2.0, 2.0] and torch.equal(brk[0, 0], brk[1, 0])
    with torch.no_grad():
        plain = plain_states(None, te, cond[:, 0].long())
        no_norm = weighted_states(None, te, cond)
        original = weighted_states(None, te, cond, emphasis="Original")
        want_original = PromptEncoder(te, emphasis="Original").encode(caption)[0]
    w = torch.tensor(want_w, dtype=torch.float32)[:, None]
    torch.testing.assert_close(no_norm[0], plain[0] * w)
    torch.testing.assert_close(original[0], want_original, rtol=1e-5, atol=1e-5)
    assert torch.equal(no_norm[1], plain[1]) and torch.equal(original[1], plain[1])  # weights 1: unchanged
    ratio = (no_norm[0] / plain[0])[1:10, 0].tolist()  # each token's state scaled by its own weight
    assert ratio == pytest.approx(want_w[1:10], rel=1e-5)
    # max_token_length 150: generation's chunks of the weighted caption, each weighted as generation does
    long = ", ".join(f"(tag{i}:1.2) detail" for i in range(30))
    cond2 = weighted_tokens(None, tok, [long, caption], "cpu", chunks=2)
    assert cond2.shape == (2, 2, 154)
    with torch.no_grad():
        got = weighted_states(None, te, cond2, emphasis="Original")
        enc = PromptEncoder(te, emphasis="Original")
        want_long = enc.encode_chunks(enc.chunks(long)[:2])[0]
        want_short = torch.cat([enc.encode(caption)[0], enc.encode("")[0]])
    torch.testing.assert_close(got[0], want_long, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want_short, rtol=1e-5, atol=1e-5)


def test_weighted_captions_reach_training_and_are_checked(tmp_path, tiny_files, images):
    """weighted_captions = true trains on the weighted states: captions without emphasis train exactly
    as without the option; the same captions with "(red:2)" train other weights. Refused for textual
    inversion; an unknown emphasis mode names the nearest."""
    import shutil

    emph = tmp_path / "emph"
    shutil.copytree(images, emph)
    for f in emph.glob("*.txt"):
        f.write_text(f.read_text().replace("red circle", "(red:2) circle").replace(", solo", ", [solo]"))

    def run(name, data, **over):
        (tmp_path / name).mkdir()
        cfg = load_config(write_config(tmp_path / name, tiny_files[0], data, max_steps=2, **over))
        return lora_tensors(train(cfg, progress=False).output)

    base = run("base", images)
    same = run("same", images, weighted_captions=True)
    weighted = run("weighted", emph, weighted_captions=True, weighted_captions_emphasis="original")
    literal = run("literal", emph)  # the brackets as characters
    assert all(torch.equal(base[k], same[k]) for k in base)
    assert any(not torch.equal(weighted[k], base[k]) for k in base)
    assert any(not torch.equal(weighted[k], literal[k]) for k in base)
    for over, match in (
        ({"mode": "embedding", "token_string": "emb"}, "not with mode 'embedding'"),
        ({"weighted_captions_emphasis": "No nrom"}, "did you mean 'No norm'"),
    ):
        with pytest.raises(BakaError, match=match):
            load_config(write_config(tmp_path, tiny_files[0], images, weighted_captions=True, **over))
    from baka.train.config import TrainConfig, check_text_settings

    with pytest.raises(BakaError, match="not with mode 'embedding'"):  # an alias, as Python may give it
        check_text_settings(TrainConfig(model="m", output_dir="o", mode="ti", weighted_captions=True))


def test_clip_skip_and_max_token_length_train_and_are_recorded(tmp_path, tiny_files, images):
    cfg = load_config(
        write_config(tmp_path, tiny_files[0], images, max_steps=2, clip_skip=2, max_token_length=150)
    )
    res = train(cfg, progress=False)
    from baka.models.safetensors_io import SafetensorsFile

    with SafetensorsFile(res.output) as f:
        assert f.metadata["ss_clip_skip"] == "2" and f.metadata["ss_max_token_length"] == "150"
        assert f.metadata["ss_optimizer"] == "torch.optim.adamw.AdamW"
        meta = dict(f.metadata)
    # kohya's dataset / model fields, with kohya's value types (strings; JSON for the tables)
    from baka.models.hashes import legacy_hash, sha256_file

    assert meta["ss_sd_model_hash"] == legacy_hash(tiny_files[0])
    assert meta["ss_new_sd_model_hash"] == sha256_file(tiny_files[0])
    train_items = Dataset(cfg.dataset).train
    n = len(train_items)
    assert json.loads(meta["ss_dataset_dirs"]) == {images.name: {"n_repeats": 1, "img_count": n}}
    buckets = json.loads(meta["ss_bucket_info"])["buckets"]
    assert sum(b["count"] for b in buckets.values()) == n
    assert sorted(tuple(b["resolution"]) for b in buckets.values()) == sorted(
        {it.bucket for it in train_items}
    )
    per_epoch = int(meta["ss_num_batches_per_epoch"])
    assert meta["ss_num_epochs"] == str(-(-2 // per_epoch)) and meta["ss_total_batch_size"] == "2"
    assert all(isinstance(v, str) for v in meta.values())
    for bad, match in (({"max_token_length": 100}, "75, 150 or 225"), ({"clip_skip": 0}, "from 1 to 12")):
        with pytest.raises(BakaError, match=match):
            load_config(write_config(tmp_path, tiny_files[0], images, **bad))


def test_gradient_accumulation_equals_the_larger_batch(tmp_path, tiny_files, images):
    """kohya's gradient_accumulation_steps: 2 micro-batches of 1 per step train the same weights as
    batches of 2 (same samples, same noise), within float tolerance; max_steps counts optimizer steps.
    SGD, so the comparison is of the gradients themselves (Adam's normalisation turns 1e-9 differences
    in near-zero gradients into whole steps)."""
    runs = {}
    for name, bs, k in (("b2", 2, 1), ("b1k2", 1, 2)):
        d = tmp_path / name
        d.mkdir()
        over = {"optimizer": "SGD", "learning_rate": 1.0, "dataset": {"batch_size": bs}}
        cfg = load_config(
            write_config(d, tiny_files[0], images, max_steps=3, gradient_accumulation_steps=k, **over)
        )
        runs[name] = train(cfg, progress=False)
    a, b = lora_tensors(runs["b2"].output), lora_tensors(runs["b1k2"].output)
    assert set(a) == set(b) and runs["b1k2"].step == 3
    assert all(a[k].abs().max() > 0 for k in a if "lora_up" in k)  # up starts at 0: it trained
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k
    assert runs["b2"].losses == pytest.approx(runs["b1k2"].losses, rel=1e-5)
    with pytest.raises(BakaError, match="at least 1"):
        load_config(write_config(tmp_path, tiny_files[0], images, gradient_accumulation_steps=0))


def test_periodic_outputs_and_continuing_from_a_lora(tmp_path, tiny_files, images):
    """kohya's save_every_n_steps / save_every_n_epochs write loadable files named as kohya names them;
    network_weights continues from one (a step at LR 0 writes the same tensors back)."""
    from baka.generate.engine import Generator, GenParams

    cfg = load_config(write_config(tmp_path, tiny_files[0], images, max_steps=5, save_every_n_steps=2,
                                   save_every_n_epochs=1))  # fmt: skip
    res = train(cfg, progress=False)
    per_epoch = len(Dataset(cfg.dataset).epoch_batches(0, cfg.seed))
    epochs = [f"baka-{e:06d}.safetensors" for e in range(1, 5) if e * per_epoch < 5]
    names = sorted(p.name for p in cfg.out.glob("baka-*.safetensors"))
    assert epochs and names == sorted(
        [*epochs, "baka-step00000002.safetensors", "baka-step00000004.safetensors"]
    )
    step2 = cfg.out / "baka-step00000002.safetensors"
    gen = Generator(tiny_files[0], lora_dirs=[cfg.out], progress=False)
    gen(GenParams("red circle <lora:baka-step00000002:1>", steps=2, width=64, height=64, seed=1))
    assert gen.lora_unmatched == []
    early, final = lora_tensors(step2), lora_tensors(res.output)
    assert set(early) == set(final) and any(not torch.equal(early[k], final[k]) for k in early)  # it moved on

    d = tmp_path / "cont"
    d.mkdir()
    cont = load_config(write_config(d, tiny_files[0], images, max_steps=1, learning_rate=0.0, optimizer="SGD",
                                    network_weights=str(res.output)))  # fmt: skip
    out = lora_tensors(train(cont, progress=False).output)
    start = lora_tensors(res.output)
    assert set(out) == set(start) and all(torch.equal(out[k], start[k]) for k in out)
    wrong = load_config(write_config(d, tiny_files[0], images, max_steps=1, network={"dim": 8},
                                     network_weights=str(res.output)))  # fmt: skip
    with pytest.raises(BakaError, match="dims differ"):
        train(wrong, progress=False)


# kohya's sample prompt options, expected values from its documented rules: sizes rounded down to a
# multiple of 8 (at least 64), steps clamped to 1..1000
SAMPLE_LINES = [
    (
        "a cat --n lowres, bad --w 515 --h 40 --d 7 --s 2000 --l 6.5 --ss k_euler_a",
        dict(
            prompt="a cat",
            negative="lowres, bad",
            width=512,
            height=64,
            seed=7,
            steps=1000,
            scale=6.5,
            sampler="k_euler_a",
        ),
    ),
    ("1girl, solo", dict(prompt="1girl, solo")),
    ("x --s 0 --W 768", dict(prompt="x", steps=1, width=768)),
    ("x --g 3.5 --d 2", dict(prompt="x", seed=2)),  # --g is another model's option: ignored
]


@pytest.mark.parametrize(("line", "want"), SAMPLE_LINES)
def test_kohya_sample_prompt_lines(line, want):
    from baka.train.samples import SamplePrompt, parse_line

    assert parse_line(line) == SamplePrompt(**want)


def test_kohya_sample_prompt_files_and_errors(tmp_path):
    from baka.train.samples import SamplePrompt, load_prompts

    txt = tmp_path / "p.txt"
    txt.write_text("# a comment\n\nred circle --d 3\n  \nblue square --n red\n")
    assert [p.prompt for p in load_prompts(str(txt))] == ["red circle", "blue square"]
    toml = tmp_path / "p.toml"
    toml.write_text(
        '[prompt]\nwidth = 128\nscale = 5\n[[prompt.subset]]\nprompt = "a"\n'
        '[[prompt.subset]]\nprompt = "b"\nwidth = 64\nnegative_prompt = "c"\nsample_sampler = "euler"\n'
    )
    assert load_prompts(str(toml)) == [
        SamplePrompt("a", width=128, scale=5.0),
        SamplePrompt("b", "c", width=64, scale=5.0, sampler="euler"),
    ]
    js = tmp_path / "p.json"
    js.write_text(json.dumps(["x --d 1", {"prompt": "y", "seed": 2, "sample_steps": 4}]))
    assert load_prompts(str(js)) == [SamplePrompt("x", seed=1), SamplePrompt("y", seed=2, steps=4)]
    for bad, msg in [
        (["x --w wide"], "--w 'wide'"),
        ([{"prompt": "x", "cfg": 3}], "unknown key 'cfg'"),
        ([{"negative_prompt": "x"}], "needs 'prompt'"),
        ([3], "string or a table"),
    ]:
        with pytest.raises(BakaError, match=msg):
            load_prompts(bad)
    with pytest.raises(BakaError, match="p.yaml: sample prompts file must be"):
        (tmp_path / "p.yaml").write_text("x")
        load_prompts(str(tmp_path / "p.yaml"))


KOHYA_SAMPLERS = {  # kohya's sample_sampler names -> the diffusers scheduler kohya builds for them
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "k_lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "k_euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "k_euler_a": "EulerAncestralDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "dpmsingle": "DPMSolverSinglestepScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm_2": "KDPM2DiscreteScheduler",
    "k_dpm_2": "KDPM2DiscreteScheduler",
    "dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "k_dpm_2_a": "KDPM2AncestralDiscreteScheduler",
}


def test_kohya_sample_sampler_names_reach_kohyas_schedulers():
    from baka.generate.samplers import SAMPLERS

    for name, scheduler in KOHYA_SAMPLERS.items():
        assert SAMPLERS.get(name).scheduler == scheduler, name
    # kohya's dpmsolver / dpmsolver++ set the scheduler's algorithm_type to their own name
    assert SAMPLERS.get("dpmsolver").options["algorithm_type"] == "dpmsolver"
    assert SAMPLERS.get("dpmsolver++").options.get("algorithm_type", "dpmsolver++") == "dpmsolver++"


def test_sample_settings_are_checked_before_training(tmp_path, tiny_files, images):
    (tmp_path / "prompts.txt").write_text("red circle --ss k_eulr_a\n")
    with pytest.raises(BakaError, match="train.toml: .*k_eulr_a.*did you mean"):
        load_config(write_config(tmp_path, tiny_files[0], images, sample_prompts="prompts.txt"))
    with pytest.raises(BakaError, match="disagree"):
        load_config(write_config(tmp_path, tiny_files[0], images, sample_every=2, sample_every_n_steps=3))
    (tmp_path / "prompts.txt").write_text("red circle --d 5 --s 2\n")
    cfg = load_config(
        write_config(tmp_path, tiny_files[0], images, sample_prompts="prompts.txt", sample_every=2)
    )
    assert cfg.sample_prompts == str(tmp_path / "prompts.txt") and cfg.sample_every_n_steps == 2


def test_kohya_samples_at_first_and_per_epoch(tmp_path, tiny_files, images):
    """4 images in batches of 2: 2 steps an epoch. sample_at_first draws before step 1, per-epoch
    sampling at the end of epochs 1 and 2 (replacing per-step sampling, as in kohya), and the end of
    the run once more; names are kohya's."""
    import re

    cfg = load_config(
        write_config(
            tmp_path,
            tiny_files[0],
            images,
            max_steps=4,
            sample_prompts=["red circle --d 5 --s 2 --ss euler", "blue circle --s 2 --n red --w 72"],
            sample_at_first=True,
            sample_every_n_epochs=1,
            sample_every_n_steps=1,
        )
    )
    train(cfg, progress=False)
    names = sorted(p.name for p in (cfg.out / "sample").glob("*.png"))
    stamps = [re.sub(r"_\d{14}_", "_T_", n) for n in names]
    want = ["baka_000000_00_T_5.png", "baka_000000_01_T_1.png", "baka_e000001_00_T_5.png"]
    want += ["baka_e000001_01_T_1.png", "baka_e000002_00_T_5.png", "baka_e000002_01_T_1.png"]
    want += ["baka_000004_00_T_5.png", "baka_000004_01_T_1.png"]
    assert sorted(stamps) == sorted(want), names
    from baka.generate.infotext import parse, read_png

    path = next((cfg.out / "sample").glob("baka_e000001_01_*.png"))
    with Image.open(path) as im:
        assert im.size == (72, 64)
    prompt, negative, params = parse(read_png(path))
    assert (prompt, negative) == ("blue circle", "red")
    assert params["Sampler"] == "DDIM" and params["Steps"] == "2" and params["Seed"] == "1", params


def test_tensorboard_logs_kohya_names(tmp_path, tiny_files, images):
    """logging_dir alone means TensorBoard (kohya's rule); the run's folder is logging_dir /
    {log_prefix}{time} / {tracker name}; per step loss/current, loss/average (over one epoch of steps),
    lr/unet and lr/textencoder; loss/epoch at step = epoch; loss/validation; sample images."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(
        write_config(
            tmp_path,
            tiny_files[0],
            images,
            max_steps=4,
            train_text_encoder=True,
            text_encoder_lr=5e-3,
            logging_dir=str(tmp_path / "logs"),
            log_prefix="style-",
            validate_every=2,
            sample_prompts=["red circle --s 2"],
            dataset={"validation_split": 0.3},
        )
    )
    res = train(cfg, progress=False)
    runs = list((tmp_path / "logs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("style-") and len(runs[0].name) == len("style-") + 14
    ev = EventAccumulator(str(runs[0] / "network_train"), size_guidance={"images": 0, "scalars": 0})
    ev.Reload()
    tags = set(ev.Tags()["scalars"])
    assert {"loss/current", "loss/average", "lr/unet", "lr/textencoder", "loss/epoch"} <= tags, tags
    cur = [(e.step, e.value) for e in ev.Scalars("loss/current")]
    assert [s for s, _ in cur] == [1, 2, 3, 4]
    assert [v for _, v in cur] == pytest.approx(res.losses, rel=1e-6)
    per_epoch = len(Dataset(cfg.dataset).epoch_batches(0, cfg.seed))
    avg = [e.value for e in ev.Scalars("loss/average")]
    assert avg[-1] == pytest.approx(sum(res.losses[-per_epoch:]) / per_epoch, rel=1e-6)
    assert [e.value for e in ev.Scalars("lr/textencoder")] == pytest.approx([5e-3] * 4)
    assert [e.value for e in ev.Scalars("lr/unet")] == pytest.approx([1e-2] * 4)
    assert [e.step for e in ev.Scalars("loss/epoch")] == list(range(1, 4 // per_epoch + 1))
    assert res.val_losses and [(e.step, e.value) for e in ev.Scalars("loss/validation")] == [
        (s, pytest.approx(v, rel=1e-6)) for s, v in res.val_losses
    ]
    assert "samples/00" in ev.Tags()["images"]


def test_logging_settings_are_checked(tmp_path, tiny_files, images):
    cases = [
        ({"log_with": "tensorbord", "logging_dir": "l"}, "did you mean 'tensorboard'"),
        ({"log_with": "tensorboard"}, "needs logging_dir"),
    ]
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        cases.append(({"log_with": "wandb"}, "needs the wandb package"))
    for over, match in cases:
        with pytest.raises(BakaError, match=match):
            load_config(write_config(tmp_path, tiny_files[0], images, **over))


def test_lr_log_names():
    from baka.train.logs import lr_names

    g = lambda block, lr, te=False: {"block": block, "lr": lr, "te": te}  # noqa: E731
    # one LR per kind (however many block groups): kohya's two names
    assert lr_names([g("IN01", 1e-4), g("OUT02", 1e-4), g("BASE", 5e-5, True)]) == [
        "lr/unet", "lr/unet", "lr/textencoder"
    ]  # fmt: skip
    # block LR weights: per block; LoRA+ gives a block a second LR: the group index tells them apart
    assert lr_names([g("IN01", 1e-4), g("IN01", 1.6e-3), g("OUT02", 5e-5)]) == [
        "lr/unet/IN01", "lr/unet/IN01/1", "lr/unet/OUT02"
    ]  # fmt: skip


@pytest.mark.parametrize(
    "unfreeze, front, want",
    [(None, None, 12), (2, None, 2), (None, 10, 2), (None, -3, 3), (4, 10, 4), (20, None, 12)],
)
def test_everydream_text_encoder_layers(unfreeze, front, want):
    """EveryDream2's rules: unfreeze_last_n_layers wins; freeze_front_n_layers N freezes the first N,
    -N keeps the last N; neither trains all; at least one layer must train."""
    from baka.train.config import TrainConfig
    from baka.train.optim import trainable_te_layers

    cfg = TrainConfig(model="m", unfreeze_last_n_layers=unfreeze, freeze_front_n_layers=front)
    assert trainable_te_layers(cfg, 12) == want
    for bad in ({"unfreeze_last_n_layers": 0}, {"freeze_front_n_layers": 12}):
        with pytest.raises(BakaError, match="at least 1"):
            trainable_te_layers(TrainConfig(model="m", **bad), 12)


def test_everydream_freezing_defaults_and_overrides(tiny_files):
    """ED2's defaults: everything trains; with only some layers training the embeddings freeze unless
    freeze_embeddings = false; freeze_final_layer_norm = true freezes the final norm."""
    from baka.models.io import load_checkpoint
    from baka.models.pipeline import build_module
    from baka.train.config import TrainConfig
    from baka.train.optim import freeze_text_encoder

    ck = load_checkpoint(tiny_files[0])

    def frozen(**kw):
        te = build_module("text_encoder", ck.config, ck.components()["text_encoder"])
        layers = freeze_text_encoder(te, TrainConfig(model="m", train_text_encoder=True, **kw))
        tm = getattr(te, "text_model", te)
        emb = all(not p.requires_grad for p in tm.embeddings.parameters())
        norm = all(not p.requires_grad for p in tm.final_layer_norm.parameters())
        return emb, norm, (len(layers), len(tm.encoder.layers))

    emb, norm, (k, n) = frozen()
    assert (emb, norm) == (False, False) and k == n
    assert frozen(unfreeze_last_n_layers=1)[:2] == (True, False)
    assert frozen(unfreeze_last_n_layers=1, freeze_embeddings=False)[:2] == (False, False)
    assert frozen(freeze_final_layer_norm=True)[:2] == (False, True)


def test_gradient_checkpointing_and_plain_attention_train_the_same(tmp_path, tiny_files, images):
    """kohya's gradient_checkpointing (diffusers' / transformers' own) and sdpa = false (plain
    attention) change memory and speed, not the maths: the same losses and LoRA; recorded in ss_*."""
    from baka.models.safetensors_io import SafetensorsFile

    runs = {}
    for name, over in (
        ("plain", {}),
        ("ckpt", {"gradient_checkpointing": True, "training_comment": "hello"}),
        ("nosdpa", {"sdpa": False}),
    ):
        out = tmp_path / name
        out.mkdir()
        cfg = load_config(
            write_config(out, tiny_files[0], images, max_steps=3, train_text_encoder=True, **over)
        )
        runs[name] = train(cfg, progress=False)
    # checkpointing recomputes the same sums; plain attention sums in another order, which Adam's
    # normalised steps lift to ~1e-3 on weights whose gradient is near zero (measured 4e-4)
    for name, tol in (("ckpt", 1e-5), ("nosdpa", 2e-3)):
        assert runs[name].losses == pytest.approx(runs["plain"].losses, rel=1e-4)
        a, b = lora_tensors(runs[name].output), lora_tensors(runs["plain"].output)
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst < tol, (name, worst)
    with SafetensorsFile(runs["ckpt"].output) as f:
        meta = f.metadata
    assert (meta["ss_gradient_checkpointing"], meta["ss_training_comment"]) == ("True", "hello")
    assert int(meta["ss_session_id"]) >= 0 and float(meta["ss_training_finished_at"]) > 0
    from baka.train.trainer import _Run

    run = _Run(
        load_config(write_config(tmp_path / "ckpt", tiny_files[0], images, gradient_checkpointing=True))
    )
    assert run.acc.unwrap_model(run.model).unet.is_gradient_checkpointing
    with pytest.raises(BakaError, match="xformers is not used"):
        load_config(write_config(tmp_path, tiny_files[0], images, xformers=True))
